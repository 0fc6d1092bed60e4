"""Engine truth: compare what the bundle asks for with what this device's engine can do.

Before, a Jetson bundle asking for GPU layers on a llama-cpp-python built without CUDA
reported ready and silently ran on the CPU (issue #11). Now:

- GPU layers requested and ``llama_supports_gpu_offload()`` false → EngineError (exit 7)
  naming the fix, unless ``--cpu``: then it serves on the CPU and says so (log, /readyz);
- ONNX execution providers the installed onnxruntime lacks → exit 7 naming ``--providers``;
  ``--providers LIST`` picks them without editing the verified ``server.toml``;
- more threads than this machine's usable cores → a warning and the core count.

Device side: imports the engines' packages only when the bundle's format needs them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

from edgepack.runtimes.config import ServerConfig
from edgepack.runtimes.engine import EngineError

log = logging.getLogger("edgepack.serve")

CUDA_HINT = (
    "install a CUDA build of llama-cpp-python on the device (e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" "
    "pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python), or serve on "
    "the CPU with --cpu (slower; the plan's tok/s will not hold)"
)


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask, which cgroups/taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def llama_gpu_offload() -> bool:
    """Whether the installed llama-cpp-python can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def onnx_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def reconcile(
    cfg: ServerConfig,
    *,
    cpu: bool = False,
    providers: Sequence[str] | None = None,
    cores: int | None = None,
    gpu_offload: Callable[[], bool] = llama_gpu_offload,
    available_providers: Callable[[], list[str]] = onnx_providers,
) -> ServerConfig:
    """``cfg`` adjusted to what the engine can do; EngineError (exit 7) where it cannot.

    Every adjustment is logged and listed in ``cfg.adjustments`` (shown by /readyz).
    """
    notes: list[str] = []
    n_cores = cores or usable_cores()
    if cfg.n_threads > n_cores:
        notes.append(f"n_threads {cfg.n_threads} lowered to {n_cores}: this machine has "
                     f"{n_cores} usable cores (more threads than cores slows llama.cpp down)")
        cfg = replace(cfg, n_threads=n_cores)
    compute = "cpu"
    if cfg.model_format == "gguf" and cfg.n_gpu_layers != 0:
        if cpu:
            notes.append(f"serving on the CPU (--cpu): the bundle asked for "
                         f"{cfg.n_gpu_layers} GPU layers")
            cfg = replace(cfg, n_gpu_layers=0)
        elif not gpu_offload():
            raise EngineError(
                f"the bundle asks for {cfg.n_gpu_layers} GPU layers but the installed "
                "llama-cpp-python has no GPU offload (llama_supports_gpu_offload() is false)",
                hint=CUDA_HINT,
            )
        else:
            compute = "gpu"
    if cfg.model_format == "onnx":
        wanted: tuple[str, ...] = ("cpu",) if cpu else tuple(providers or cfg.providers)
        if cpu and tuple(cfg.providers) != ("cpu",):
            notes.append(f"serving on the CPU (--cpu): the bundle asked for providers "
                         f"{list(cfg.providers)}")
        from edgepack.runtimes.onnx_engine import PROVIDER_ALIASES

        names = [PROVIDER_ALIASES.get(p.lower(), p) for p in wanted]
        have = available_providers()
        missing = [n for n in names if n not in have]
        if missing:
            raise EngineError(
                f"execution provider(s) {missing} requested but this onnxruntime offers only "
                f"{have}",
                hint="serve with --providers naming available ones (e.g. --providers cpu), or "
                "install the onnxruntime build for this device (onnxruntime-gpu, or NVIDIA's "
                "Jetson wheel for CUDA/TensorRT)",
            )
        if providers and tuple(providers) != tuple(cfg.providers):
            notes.append(f"providers {list(providers)} (--providers) instead of the bundle's "
                         f"{list(cfg.providers)}")
        compute = "gpu" if any(n != "CPUExecutionProvider" for n in names) else "cpu"
        cfg = replace(cfg, providers=wanted)
    for note in notes:
        log.warning("%s", note)
    return replace(cfg, compute=compute, adjustments=cfg.adjustments + tuple(notes))
