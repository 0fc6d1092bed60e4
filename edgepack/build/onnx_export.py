"""Export a Hugging Face model folder to ONNX with optimum, plus the tokenizer the device needs.

Build side: optimum, transformers and torch are imported inside ``export_onnx`` only.

An export directory looks like::

    model.onnx                       the graph (+ model.onnx_data for graphs over 2 GB)
    tokenizer/tokenizer.json         the fast tokenizer, padding switched off (see below)
    tokenizer/edgepack_tokenizer.json  what the device engine needs besides the graph:
                                     kind, pooling, normalize, max length, special tokens,
                                     chat template (see ``runtimes.onnx_engine``)

The lead's bundle writer copies ``model.onnx*`` into ``model/`` and ``tokenizer/`` as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.build.model_files import read_folder_json
from edgepack.errors import BuildError, UsageError

TOKENIZER_CONFIG_NAME = "edgepack_tokenizer.json"
TOKENIZER_CONFIG_SCHEMA = 1

# edgepack task name -> (optimum task, engine kind)
TASKS: dict[str, tuple[str, str]] = {
    "feature-extraction": ("feature-extraction", "embedding"),
    "text-classification": ("text-classification", "classification"),
    "text-generation": ("text-generation-with-past", "generation"),
}
# Names users and optimum also use for the same things.
_ALIASES = {
    "embeddings": "feature-extraction",
    "embedding": "feature-extraction",
    "sentence-similarity": "feature-extraction",
    "sequence-classification": "text-classification",
    "text-generation-with-past": "text-generation",
    "causal-lm": "text-generation",
}
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last",
}
_ERROR_TAIL = 1200


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote.

    ``model_path`` is ``out_dir/model.onnx``; ``files`` lists every file under ``out_dir``
    (POSIX, relative, sorted) so a bundle writer can copy and hash them; ``tokenizer`` is the
    content of ``tokenizer/edgepack_tokenizer.json``.
    """

    out_dir: Path
    task: str
    kind: str
    model_path: Path
    tokenizer_dir: Path
    files: tuple[str, ...]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None


def normalize_task(task: str) -> str:
    """Map a task name or alias to one of ``TASKS``; UsageError for anything else."""
    name = _ALIASES.get(task, task)
    if name not in TASKS:
        raise UsageError(
            f"ONNX task {task!r} is not supported",
            hint=f"use one of {', '.join(sorted(TASKS))}",
        )
    return name


def infer_task(model_dir: str | os.PathLike[str]) -> str:
    """Guess the task from ``config.json`` (and ``modules.json``); BuildError when unclear."""
    root = Path(model_dir)
    if (root / "modules.json").is_file():
        return "feature-extraction"
    config = read_folder_json(root / "config.json")
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForCausalLM") for a in archs):
        return "text-generation"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    if any(a.endswith("Model") for a in archs):
        return "feature-extraction"
    raise BuildError(
        f"cannot tell the ONNX task of {str(root)!r} from architectures {archs}",
        hint="pass the task explicitly (feature-extraction, text-classification or "
        "text-generation)",
    )


def export_onnx(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    task: str | None = None,
    *,
    opset: int | None = None,
) -> ExportResult:
    """Export ``model_dir`` (a local HF folder) to ``out_dir`` for ``task``.

    The export goes to a temporary sibling of ``out_dir`` and is renamed into place only when
    it finished, so ``out_dir`` is either absent, the old content, or a whole export. An
    existing ``out_dir`` is replaced.

    Raises UsageError for an unknown task, BuildError when the model folder is unusable (e.g.
    a sentence-transformers pipeline with modules the device engine cannot run) or when the
    exporter fails (its message's tail is kept in the error).
    """
    src = Path(model_dir)
    dst = Path(out_dir)
    if not (src / "config.json").is_file():
        raise BuildError(
            f"{str(src)!r} has no config.json",
            hint="pass a Hugging Face model folder (edgepack pulls one for hub ids)",
        )
    name = normalize_task(task) if task else infer_task(src)
    optimum_task, kind = TASKS[name]
    # Read the tokenizer side first: a model the engine cannot serve fails before the slow part.
    tok_config = tokenizer_settings(src, kind)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        _run_optimum(src, tmp / "optimum", optimum_task, opset)
        _collect(src, tmp / "optimum", tmp / "export", tok_config)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp / "export", dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    files = tuple(
        sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    )
    return ExportResult(
        out_dir=dst,
        task=name,
        kind=kind,
        model_path=dst / "model.onnx",
        tokenizer_dir=dst / "tokenizer",
        files=files,
        tokenizer=tok_config,
        opset=_graph_opset(dst / "model.onnx"),
    )


def tokenizer_settings(model_dir: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """The content of ``edgepack_tokenizer.json`` for a model folder and engine kind.

    Honours sentence-transformers' ``modules.json``: the Pooling module's mode, a Normalize
    module, and ``max_seq_length`` from ``sentence_bert_config.json``. Raises BuildError for a
    module the device engine does not run (Dense, for one) or a missing ``tokenizer.json``.
    """
    root = Path(model_dir)
    if not (root / "tokenizer.json").is_file():
        raise BuildError(
            f"{str(root)!r} has no tokenizer.json (a fast tokenizer)",
            hint="the device engine uses the `tokenizers` library alone; pick a model that "
            "ships tokenizer.json or save one with transformers' AutoTokenizer",
        )
    config = read_folder_json(root / "config.json")
    tok_cfg = read_folder_json(root / "tokenizer_config.json") if (
        root / "tokenizer_config.json"
    ).is_file() else {}
    out: dict[str, Any] = {
        "schema": TOKENIZER_CONFIG_SCHEMA,
        "kind": kind,
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size") or config.get("n_embd") or config.get("d_model"),
        "pad_token_id": _pad_token_id(root, config),
    }
    max_len = _model_max_length(root, config, tok_cfg)
    if kind == "embedding":
        pooling, normalize, st_max = _sentence_transformers_pipeline(root)
        out.update(pooling=pooling, normalize=normalize, max_length=st_max or max_len)
    elif kind == "classification":
        labels = config.get("id2label") or {}
        out.update(
            max_length=max_len,
            labels=[labels.get(str(i), labels.get(i, f"LABEL_{i}")) for i in range(len(labels))],
            problem_type=config.get("problem_type"),
        )
    else:
        out.update(_generation_settings(root, config, tok_cfg))
    return out


def _sentence_transformers_pipeline(root: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) from modules.json; mean + no normalize without it."""
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        # A plain encoder: mean pooling is what sentence-transformers itself would add.
        return "mean", False, None
    pooling, normalize, max_len = "mean", False, None
    for module in read_folder_json(modules_path):
        mtype = str(module.get("type", ""))
        short = mtype.rsplit(".", 1)[-1]
        path = root / str(module.get("path", ""))
        if short == "Transformer":
            cfg = path / "sentence_bert_config.json"
            if cfg.is_file():
                max_len = read_folder_json(cfg).get("max_seq_length")
        elif short == "Pooling":
            cfg = read_folder_json(path / "config.json")
            modes = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
            if len(modes) != 1 or modes[0] not in ("mean", "cls", "max", "mean_sqrt_len"):
                raise BuildError(
                    f"pooling {modes or 'none'} in {path / 'config.json'} is not supported",
                    hint="the ONNX engine pools with exactly one of mean, cls, max or "
                    "mean_sqrt_len",
                )
            pooling = modes[0]
        elif short == "Normalize":
            normalize = True
        else:
            raise BuildError(
                f"sentence-transformers module {mtype!r} in {modules_path} is not supported "
                "by the ONNX engine",
                hint="only Transformer, Pooling and Normalize modules run on the device; "
                "use --format gguf or a model without this module",
            )
    return pooling, normalize, int(max_len) if max_len else None


def _generation_settings(root: Path, config: dict[str, Any], tok_cfg: dict[str, Any]) -> dict:
    gen = read_folder_json(root / "generation_config.json") if (
        root / "generation_config.json"
    ).is_file() else {}
    eos: Any = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    specials = read_folder_json(root / "special_tokens_map.json") if (
        root / "special_tokens_map.json"
    ).is_file() else {}

    def token_text(name: str) -> str | None:
        value = tok_cfg.get(name, specials.get(name))
        return value.get("content") if isinstance(value, dict) else value

    return {
        "n_ctx": int(config.get("max_position_embeddings") or 2048),
        "eos_token_ids": eos_ids,
        "bos_token": token_text("bos_token"),
        "eos_token": token_text("eos_token"),
        "chat_template": template,
    }


def _pad_token_id(root: Path, config: dict[str, Any]) -> int:
    # The padding value is masked out, so any id works; prefer the model's own.
    tok = read_folder_json(root / "tokenizer.json")
    padding = tok.get("padding") or {}
    for value in (padding.get("pad_id"), config.get("pad_token_id")):
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def _model_max_length(root: Path, config: dict[str, Any], tok_cfg: dict[str, Any]) -> int:
    # tokenizer_config's model_max_length is a huge sentinel when unset.
    candidates = [tok_cfg.get("model_max_length"), config.get("max_position_embeddings")]
    values = [int(v) for v in candidates if isinstance(v, (int, float)) and 0 < v < 1_000_000]
    return min(values) if values else 512


def _run_optimum(src: Path, out: Path, optimum_task: str, opset: int | None) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise BuildError(
            f"optimum's ONNX exporter is not installed ({e})",
            hint="pip install 'edgepack[onnx-build]'",
        ) from e
    try:
        # Tracing emits TracerWarnings and exporter UserWarnings about shapes it handles; they
        # tell a user nothing, and where warnings are errors (pytest -W error) torch's C code
        # turns them into "SystemError: ... returned a result with an exception set".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _main_export(main_export, src, out, optimum_task, opset)
    except Exception as e:  # noqa: BLE001 - any exporter failure is a build failure
        text = f"{type(e).__name__}: {e}"
        if len(text) > _ERROR_TAIL:
            text = "…" + text[-_ERROR_TAIL:]
        raise BuildError(
            f"optimum could not export {str(src)!r} for {optimum_task}: {text}",
            hint="check that the architecture is supported by optimum-onnx "
            "(https://huggingface.co/docs/optimum-onnx) or use --format gguf",
        ) from e
    if not (out / "model.onnx").is_file():
        found = sorted(p.name for p in out.glob("*.onnx"))
        raise BuildError(
            f"optimum wrote {found or 'no graph'} for {optimum_task}, expected model.onnx",
            hint="this model needs a multi-graph export (encoder-decoder?), which edgepack "
            "does not package yet; use --format gguf",
        )


def _main_export(main_export: Any, src: Path, out: Path, task: str, opset: int | None) -> None:
    main_export(
        str(src),
        output=out,
        task=task,
        opset=opset,
        library_name="transformers",
        local_files_only=True,
        # edgepack validates against the reference model itself (onnx_validate), with
        # thresholds that mean something to a user; optimum's atol check would run twice.
        do_validation=False,
    )


def _collect(src: Path, optimum_out: Path, export: Path, tok_config: dict[str, Any]) -> None:
    """Move the graph and build ``tokenizer/`` from the source folder."""
    export.mkdir()
    for p in optimum_out.iterdir():
        if p.name == "model.onnx" or p.name.startswith("model.onnx_data"):
            os.replace(p, export / p.name)
    tok_dir = export / "tokenizer"
    tok_dir.mkdir()
    _write_tokenizer_json(src / "tokenizer.json", tok_dir / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, tok_dir / name)
    (tok_dir / TOKENIZER_CONFIG_NAME).write_text(
        json.dumps(tok_config, sort_keys=True, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )


def _write_tokenizer_json(src: Path, dst: Path) -> None:
    """Copy tokenizer.json with padding and truncation switched off.

    all-MiniLM-L6-v2's tokenizer.json pads every input to 128 tokens (about 4x the compute
    for a sentence) and truncates at 128 where sentence-transformers uses 256; the engine
    pads each batch to its longest input and truncates at ``max_length`` itself.
    """
    data = json.loads(src.read_text(encoding="utf-8"))
    data["padding"] = None
    data["truncation"] = None
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _graph_opset(path: Path) -> int | None:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the opset is informative only
        return None
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
