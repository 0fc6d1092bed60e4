"""Licence and model-card facts, read before any weight byte (build side).

A Hugging Face model card is the repo's ``README.md`` with YAML front matter; the keys edgepack
records are the ones the hub documents for model repos (``license``, ``license_name``,
``license_link``, ``base_model``, ``datasets``, ``language``, ``pipeline_tag``; see
https://huggingface.co/docs/hub/model-cards#model-card-metadata). Licence texts are the repo's
top-level ``LICENSE``/``LICENCE``/``COPYING``/``NOTICE`` files and ``USE_POLICY.md`` (which the
Llama licences make part of the terms). Both are read at the pinned commit by
:mod:`edgepack.build.hub`, so what the policy judged is what the build pulls.

The licence policy (``--allow-license``) is checked here, before the weights are touched: a
refused model costs the user a few kilobytes of metadata and exits 3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError
from edgepack.manifest import sha256_file

README = "README.md"
# A licence text larger than this is not a licence text; the bound keeps a hostile repo from
# making edgepack download something big before the policy has even run.
MAX_LICENSE_BYTES = 1 << 20
MAX_README_BYTES = 4 << 20
_LICENSE_NAME = re.compile(
    r"^(?:(?:LICEN[CS]E|COPYING|NOTICE)(?:[-_.][A-Za-z0-9.-]+)?|USE_POLICY\.md)$", re.IGNORECASE
)
_CARD_KEYS = ("license", "license_name", "license_link", "base_model", "datasets", "language",
              "pipeline_tag")


def is_license_file(name: str) -> bool:
    """A top-level licence text of a model repo (``LICENSE``, ``LICENSE.txt``, ``NOTICE``…)."""
    return "/" not in name and bool(_LICENSE_NAME.match(name))


@dataclass(frozen=True)
class LicenseFile:
    """A licence text of the source repo; ``local`` is where this build read it from."""

    path: str
    sha256: str
    size: int
    local: Path = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ModelCard:
    """What the card and the repo say about licence and lineage. Every field may be empty:
    a card is often missing or partial, and the manifest says so rather than guessing."""

    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    base_model: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    gated: str | None = None  # the hub's "auto" | "manual" when gated; None: not known gated
    readme_sha256: str | None = None
    license_files: tuple[LicenseFile, ...] = ()

    @property
    def license_label(self) -> str:
        """The licence as a person reads it: ``other`` names itself through ``license_name``."""
        if self.license == "other" and self.license_name:
            return f"other ({self.license_name})"
        return self.license or "unknown (the model card declares none)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "license": self.license,
            "license_name": self.license_name,
            "license_link": self.license_link,
            "base_model": list(self.base_model),
            "datasets": list(self.datasets),
            "language": list(self.language),
            "pipeline_tag": self.pipeline_tag,
            "gated": self.gated,
            "readme_sha256": self.readme_sha256,
            "license_files": [f.to_dict() for f in self.license_files],
        }


def parse_front_matter(text: str, where: str = README) -> dict[str, Any]:
    """The YAML mapping between the leading ``---`` lines of a card; {} without one.

    A malformed block is an error rather than an empty card: a licence policy must not pass a
    model because its card could not be read. Raises ConfigError.
    """
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
    except StopIteration:
        raise ConfigError(f"{where}: the metadata block opened by '---' is never closed",
                          hint="tell the model's owner; or build from a local folder with a "
                               "fixed README.md") from None
    import yaml

    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the model card's metadata is not valid YAML: {e}",
                          hint="tell the model's owner; or build from a local folder with a "
                               "fixed README.md") from e
    return data if isinstance(data, dict) else {}


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(str(v) for v in items if v is not None and str(v).strip())


def _string(value: Any) -> str | None:
    return str(value).strip() or None if value is not None else None


def card_from_files(readme: Path | None, license_files: Mapping[str, Path],
                    gated: str | None = None) -> ModelCard:
    """Build the card from a README (or none) and the licence texts found beside it.

    Raises ConfigError for a malformed card or an oversized file.
    """
    meta: dict[str, Any] = {}
    readme_sha = None
    if readme is not None:
        _check_size(readme, MAX_README_BYTES)
        meta = parse_front_matter(readme.read_text(encoding="utf-8", errors="replace"),
                                  str(readme))
        readme_sha = sha256_file(readme)
    files = []
    for name, path in sorted(license_files.items()):
        _check_size(path, MAX_LICENSE_BYTES)
        files.append(LicenseFile(name, sha256_file(path), path.stat().st_size, path))
    license_value = meta.get("license")
    if isinstance(license_value, list):  # the hub allows a list; record it as an expression
        license_value = " OR ".join(str(v) for v in license_value)
    return ModelCard(
        license=_string(license_value),
        license_name=_string(meta.get("license_name")),
        license_link=_string(meta.get("license_link")),
        base_model=_strings(meta.get("base_model")),
        datasets=_strings(meta.get("datasets")),
        language=_strings(meta.get("language")),
        pipeline_tag=_string(meta.get("pipeline_tag")),
        gated=gated or None,
        readme_sha256=readme_sha,
        license_files=tuple(files),
    )


def card_from_folder(folder: Path, gated: str | None = None) -> ModelCard:
    """The card of a local model folder (or a cached snapshot)."""
    readme = folder / README
    licenses = {p.name: p for p in sorted(folder.iterdir())
                if p.is_file() and is_license_file(p.name)} if folder.is_dir() else {}
    return card_from_files(readme if readme.is_file() else None, licenses, gated)


def _check_size(path: Path, limit: int) -> None:
    check_card_file_size(path.name, path.stat().st_size, limit)


def check_card_file_size(name: str, size: int | None, limit: int | None = None) -> None:
    """Raise ConfigError when a card or licence file is beyond its bound (checked from the
    hub's listing before a download, and on disk)."""
    limit = limit or (MAX_README_BYTES if name == README else MAX_LICENSE_BYTES)
    if size is not None and size > limit:
        raise ConfigError(f"{name} is {size} bytes, above edgepack's {limit}-byte bound "
                          "for a model card or licence text",
                          hint="this is not a model card or licence; check the repo")


# -- the policy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LicensePolicy:
    """Licences a build may use, by card id (``apache-2.0``) or, for ``license: other``, by
    ``license_name`` (``llama3.1``). Compared case-insensitively."""

    allowed: frozenset[str]

    @classmethod
    def parse(cls, values: Iterable[str]) -> LicensePolicy | None:
        """``--allow-license`` values (repeatable, comma-separated; ``@FILE`` reads a policy
        file: ids separated by commas or lines, ``#`` comments); None when none given.
        Raises ConfigError for an unreadable or empty policy file."""
        names: set[str] = set()
        for text in values:
            if text.strip().startswith("@"):
                text = _read_policy_file(Path(text.strip()[1:]).expanduser())
            names |= {v.strip().lower() for v in re.split(r"[,\n]", text) if v.strip()}
        return cls(frozenset(names)) if names else None

    def permits(self, card: ModelCard) -> bool:
        ids = {x.strip().lower() for x in re.split(r"\s+OR\s+", card.license or "") if x.strip()}
        if card.license == "other" and card.license_name:
            ids.add(card.license_name.lower())
        return bool(ids & self.allowed)

    def check(self, card: ModelCard, model: str) -> None:
        """Raise ConfigError (exit 3) unless ``card``'s licence is allowed."""
        if self.permits(card):
            return
        allowed = ", ".join(sorted(self.allowed))
        link = f" (terms: {card.license_link})" if card.license_link else ""
        raise ConfigError(
            f"model {model} is licensed {card.license_label}{link}, which the licence policy "
            f"does not allow (--allow-license {allowed}); nothing was downloaded",
            hint="choose a model under an allowed licence, or add its licence id to "
                 "--allow-license after reading its terms")


def _read_policy_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read licence policy file {path}: {e.strerror or e}",
                          hint="--allow-license @FILE names a file of licence ids, one per "
                               "line") from e
    kept = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    if not kept.strip():
        raise ConfigError(f"licence policy file {path} allows no licence",
                          hint="list licence ids such as apache-2.0 and mit, one per line")
    return kept


def describe_derivation(card: ModelCard, source: Mapping[str, Any], fmt: str, quant: str,
                        converter: Mapping[str, Any], engine: Mapping[str, Any],
                        validation: Mapping[str, Any]) -> dict[str, Any]:
    """What a derived bundle is: the base model's licence carries over, and the changes made
    to the weights are listed (the Apache-2.0 §4(b) "prominent notices" idea, and what the
    Llama licences ask of derivatives)."""
    origin = source.get("repo_id") or source.get("ref")
    rev = source.get("revision") or source.get("content_digest")
    changes = [
        f"converted to {fmt.upper()} with {converter.get('name')} {converter.get('version')}",
        f"quantized to {quant} with {engine.get('package') or engine.get('name')} "
        f"{engine.get('built_with')}",
    ]
    if validation:
        verdict = "passed" if validation.get("passed") else "FAILED"
        changes.append(
            f"validated against the unquantized model: {validation.get('metric')} = "
            f"{validation.get('value')} (threshold {validation.get('threshold')}, {verdict})")
    return {
        "derived_from": f"{origin}@{rev}",
        "license": card.license,
        "license_name": card.license_name,
        "license_note": "the bundle is a derivative of the source model and is under the "
                        "source model's licence; the licence texts are in license/",
        "changes": changes,
    }
