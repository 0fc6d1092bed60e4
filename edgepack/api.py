"""edgepack as a library: ``edgepack.plan``, ``edgepack.build``, ``edgepack.serve``.

The same functions the command line calls, with Python values in and out::

    import edgepack

    p = edgepack.plan("HuggingFaceTB/SmolLM2-135M-Instruct", device="raspberry-pi-5-8gb")
    print(p.quant, p.ctx, p.estimate.required_bytes)
    result = edgepack.build("HuggingFaceTB/SmolLM2-135M-Instruct",
                            devices=["raspberry-pi-5-8gb"], out="bundles")
    with edgepack.serve(result.bundles[0]) as server:
        print(server.chat("What is the capital of France?"))

``import edgepack`` stays light (the device imports it): these names load their modules on
first use. Errors are :class:`edgepack.errors.EdgepackError` subclasses with ``exit_code``
and ``hint``, as on the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgepack.build.pipeline import BuildResult
    from edgepack.local_server import LocalServer
    from edgepack.plan.planner import Plan


def plan(model: str, device: str, *, format: str = "auto", ctx: int | None = None,
         quant: str | None = None, min_tokens_per_second: float | None = None,
         token: str | None = None) -> Plan:
    """Plan a build of ``model`` (``org/name[@rev]`` or a local folder) for ``device`` (a
    profile id, a .toml path, or ``"local"``) without downloading weights.

    Returns the frozen :class:`edgepack.plan.planner.Plan` (``format``, ``quant``, ``ctx``,
    ``threads``, ``gpu_layers``, ``estimate``, ``rationale``, ``rejected``; ``to_dict()``
    gives ``edgepack plan --json``'s content). Raises ProfileError (unknown device), FetchError
    (hub), UsageError (bad option), BuildError (nothing fits).
    """
    from edgepack.build.hub import read_model_metadata
    from edgepack.device.catalog import list_profiles
    from edgepack.device.resolve import for_format, load_profile
    from edgepack.plan.facts import model_facts
    from edgepack.plan.planner import PlanOptions, plan_build, planned_format

    profile = load_profile(device, decode_rate=False)
    meta = read_model_metadata(model, token=token)
    facts = model_facts(meta.config, meta.safetensors)
    options = PlanOptions(format=format, ctx=ctx, quant=quant,
                          min_tokens_per_second=min_tokens_per_second)
    profile = for_format(device, profile, planned_format(facts, profile, options))
    return plan_build(facts, profile, options, alternatives=list_profiles())


def build(model: str, devices: Sequence[str], *, out: str | Path = "bundles",
          format: str = "auto", quant: str | None = None, ctx: int | None = None,
          bundle_version: int | str = 1, name: str | None = None, token: str | None = None,
          golden: Sequence[tuple[str, str]] | None = None, archive: bool = False,
          overwrite: bool = False, threads: int | None = None,
          log: Callable[[str], None] | None = None, **thresholds: float) -> BuildResult:
    """Build one verified bundle per device; what ``edgepack build`` does.

    ``golden``: ``[(prompt, expected text), ...]``; ``None`` uses the default for chat
    models, ``[]`` skips golden prompts. ``thresholds``: ``min_agreement``, ``max_kl``,
    ``min_cosine``. ``log`` receives progress lines. Returns a
    :class:`edgepack.build.pipeline.BuildResult` whose ``summaries`` list each bundle's device,
    path, format, quant, size and validation (``to_dict()`` is ``build --json``'s item).
    Raises UsageError before any network for bad options or an occupied output folder.
    """
    from edgepack.build.pipeline import BuildRequest, Golden, run_build
    from edgepack.errors import UsageError

    unknown = sorted(set(thresholds) - {"min_agreement", "max_kl", "min_cosine"})
    if unknown:
        raise UsageError(f"build() got an unknown threshold {unknown[0]!r}",
                         hint="use min_agreement, max_kl or min_cosine")
    if isinstance(devices, str):
        devices = [devices]
    req = BuildRequest(
        model=model, devices=tuple(devices), fmt=format, quant=quant, ctx=ctx, out=Path(out),
        bundle_version=bundle_version, name=name, token=token,
        golden=None if golden is None else tuple(Golden(p, e) for p, e in golden),
        archive=archive, overwrite=overwrite, threads=threads,
        min_agreement=thresholds.get("min_agreement"), max_kl=thresholds.get("max_kl"),
        min_cosine=thresholds.get("min_cosine"),
    )
    return run_build(req, log=log or (lambda _m: None))


def serve(bundle: str | Path, *, api_key: str | None = None, args: Sequence[str] = (),
          timeout: float = 600) -> Server:
    """Start ``edgepack serve BUNDLE`` on 127.0.0.1 (a free port) and wait until ready.

    Returns a :class:`Server` (a context manager; ``stop()`` ends it): ``url`` for any
    OpenAI client (``base_url=server.url + "/v1"``), ``chat(text)`` for a quick answer.
    ``args`` are extra ``edgepack serve`` options (``["--ctx", "1024"]``). Raises
    RuntimeHealthError (exit 7) with the server's log when it cannot start.
    """
    from edgepack.local_server import LocalServer

    local = LocalServer(Path(bundle), api_key=api_key, args=args)
    try:
        local.wait_listening()
        status = local.wait_ready(timeout=timeout)
    except BaseException:
        local.stop()
        raise
    return Server(local, status)


class Server:
    """A running server started by :func:`serve`."""

    def __init__(self, local: LocalServer, status: dict[str, Any]) -> None:
        self._local = local
        self.url: str = local.url
        self.status = status  # /readyz: model, quant, n_ctx, bundle, ...
        self.model: str = str(status.get("model"))

    def chat(self, message: str, **params: Any) -> str:
        """One user message in, the whole answer out (streamed internally)."""
        messages = [{"role": "user", "content": message}]
        return "".join(self._local.client.stream_chat(self.model, messages, **params))

    def stop(self) -> int | None:
        """SIGTERM the server (it drains) and wait; its exit code."""
        return self._local.stop()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
