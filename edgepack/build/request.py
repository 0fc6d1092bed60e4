"""What a build is asked and what it reports: the request, the bundle summaries, the result,
and the small helpers every build path shares (stage logging, the cache folder, the version
option). Build side."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import UsageError
from edgepack.manifest import parse_bundle_version


@dataclass(frozen=True)
class Golden:
    prompt: str
    expect: str


@dataclass(frozen=True)
class BuildRequest:
    model: str
    devices: tuple[str, ...]
    fmt: str = "auto"
    quant: str | None = None  # for every device
    device_quants: tuple[tuple[str, str], ...] = ()  # (device ref, quant) overrides
    ctx: int | None = None
    out: Path = Path("bundles")
    bundle_version: int | str = 1
    name: str | None = None
    token: str | None = None
    golden: tuple[Golden, ...] | None = None  # None: the default golden prompts
    min_agreement: float | None = None
    max_kl: float | None = None
    min_cosine: float | None = None
    archive: bool = False
    overwrite: bool = False
    threads: int | None = None
    runtime: bool = False  # add runtime/ (offline wheels + install.sh) to each bundle
    allow_licenses: tuple[str, ...] = ()  # empty: no licence policy
    min_tokens_per_second: float | None = None  # None: the device class's interactive floor
    parallel: int | None = None  # slots for GGUF decoders; None: the plan's choice


@dataclass(frozen=True)
class BundleSummary:
    """One built bundle, as the CLI's summary and ``build --json`` report it."""

    device: str
    path: Path
    format: str
    quant: str
    size_bytes: int
    validation: dict[str, Any]
    archive: Path | None = None
    # the plan's step-up record, as the manifest's plan.step_up (build/step_up.py): the
    # quants tried before ``quant`` and why each failed; empty when the plan's choice shipped
    step_up: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        v = self.validation
        return {
            "device": self.device, "path": str(self.path), "format": self.format,
            "quant": self.quant, "size_bytes": self.size_bytes,
            "validation": {k: v.get(k) for k in ("metric", "value", "threshold", "passed")},
            "archive": None if self.archive is None else str(self.archive),
            "step_up": [dict(a) for a in self.step_up],
        }


@dataclass
class BuildResult:
    bundles: list[Path] = field(default_factory=list)
    archives: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summaries: list[BundleSummary] = field(default_factory=list)


@contextmanager
def build_stage(log: Callable[[str], None], name: str, text: str) -> Iterator[None]:
    """Log what starts, then how long it took (``name: 1.2 s``; bench/build.py reads it).

    A ``log`` with a ``stage(name, text)`` context manager (the CLI's progress reporter)
    shows the step live instead (a spinner with the elapsed time on a terminal).
    """
    stage = getattr(log, "stage", None)
    if stage is not None:
        with stage(name, text):
            yield
        return
    log(text)
    t0 = time.perf_counter()
    yield
    log(f"{name}: {time.perf_counter() - t0:.2f} s")


def cache_root() -> Path:
    from edgepack.paths import cache_dir

    return cache_dir()


def parse_version_option(text: str) -> int | str:
    """``--bundle-version``: an integer stays an integer in the manifest, semver a string."""
    value: int | str = int(text) if text.isdigit() else text
    try:
        parse_bundle_version(value)
    except Exception as e:  # IntegrityError: re-raise as a usage problem
        raise UsageError(
            f"--bundle-version {text!r} is not an integer or MAJOR[.MINOR[.PATCH]]",
            hint="for example --bundle-version 3 or --bundle-version 1.4.2",
        ) from e
    return value
