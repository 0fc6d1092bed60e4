"""A transformers-4-readable working copy of a checkpoint written by transformers 5 (build side).

The build runs transformers 4.57 (optimum-onnx 0.1.0 pins ``transformers<4.58``), and llama.cpp's
converter loads tokenizers and configs through that same transformers. Checkpoints saved by
transformers 5 differ in ways 4.57 cannot read or reads wrongly (each seen in files written by
transformers 5.24, see tests/support/checkpoint_writer.py):

- ``tokenizer_config.json`` names ``"tokenizer_class": "TokenizersBackend"`` (5's class for a
  tokenizer.json-only tokenizer, which 4 calls ``PreTrainedTokenizerFast``): AutoTokenizer fails.
- ``extra_special_tokens`` is a list (4 expects a dict of named tokens and fails with
  ``'list' object has no attribute 'keys'``); 4 spells the list ``additional_special_tokens``.
- ``config.json`` keeps RoPE settings in ``rope_parameters``; 4 ignores that key and silently
  uses its default ``rope_theta``, so the PyTorch reference would be a different model.
- SentencePiece tokenizers are saved as tokenizer.json only (no ``tokenizer.model``), which
  llama.cpp's converter needs for Gemma 1/2 and SentencePiece Phi-3/Mistral/Llama-2; see
  :mod:`edgepack.build.spm_rebuild`.

Rather than run a second Python environment with transformers 5 (a second torch and ~1 GB per
build machine), the build converts from a **working copy**: every source file hard-linked (or
copied) into the build cache, the few files above rewritten in the spelling transformers 4
reads. The user's files and the hub cache are never touched, and each rewrite is returned as a
note for the manifest. A checkpoint that needs no rewrite is used where it lies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.build.model_files import read_folder_json

# Bump when a rewrite changes: working copies are cached under this recipe.
RECIPE = "1"
NOTE_FILE = "edgepack-working-copy.json"


@dataclass(frozen=True)
class WorkingCopy:
    """The folder to build from and what was changed to make it (empty: the source itself)."""

    folder: Path
    changes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": RECIPE, "changes": list(self.changes)}


def config_for_transformers4(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """config.json with transformers 5's ``rope_parameters`` also spelled the way 4 reads them.

    Keeps ``rope_parameters`` (llama.cpp's converter reads it first) and adds ``rope_theta``,
    ``rope_scaling``, ``partial_rotary_factor`` and, for per-layer-type parameters (Gemma 3),
    ``rope_local_base_freq``. Pure: returns a new dict and the notes.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return config, []
    out = dict(config)
    notes: list[str] = []
    per_type = "full_attention" in rope or "sliding_attention" in rope
    main = rope.get("full_attention", {}) if per_type else rope
    if "rope_theta" in main:
        out["rope_theta"] = main["rope_theta"]
        notes.append(f"config.json: rope_theta {main['rope_theta']} from rope_parameters")
    local = rope.get("sliding_attention", {}) if per_type else {}
    if "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
        notes.append(
            f"config.json: rope_local_base_freq {local['rope_theta']} from rope_parameters"
        )
    if "partial_rotary_factor" in main and "partial_rotary_factor" not in config:
        out["partial_rotary_factor"] = main["partial_rotary_factor"]
        notes.append("config.json: partial_rotary_factor from rope_parameters")
    rope_type = main.get("rope_type", "default")
    if rope_type != "default" and not config.get("rope_scaling"):
        scaling = {
            k: v for k, v in main.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
        scaling.setdefault("type", rope_type)
        out["rope_scaling"] = scaling
        notes.append(f"config.json: rope_scaling ({rope_type}) from rope_parameters")
    return out, notes


def tokenizer_config_for_transformers4(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """tokenizer_config.json in the spelling transformers 4 loads. Pure."""
    out = dict(cfg)
    notes: list[str] = []
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
        notes.append(
            "tokenizer_config.json: tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast"
        )
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        merged = list(out.get("additional_special_tokens") or [])
        merged += [t for t in extra if t not in merged]
        out["additional_special_tokens"] = merged
        notes.append(
            "tokenizer_config.json: extra_special_tokens list -> additional_special_tokens"
        )
    return out, notes


def working_copy_warning(config: dict[str, Any], tokenizer_config: dict[str, Any] | None,
                         names: Sequence[str], folder: Path | None = None) -> str | None:
    """What ``plan`` says when a build would go through a working copy (None when it would
    not): the transformers version that saved the checkpoint and the rewrites that apply.

    Reads what the planner already has: config.json, tokenizer_config.json and the file list.
    Whether a tokenizer.json is SentencePiece-style is read from ``folder`` when the files are
    local (a folder, the offline cache); remotely tokenizer.json is not fetched to plan, so a
    transformers 5 checkpoint without tokenizer.model is said to be checked after the pull.
    """
    notes = list(config_for_transformers4(config)[1])
    if isinstance(tokenizer_config, dict):
        notes += tokenizer_config_for_transformers4(tokenizer_config)[1]
    version = str(config.get("transformers_version") or "")
    saved_by_5 = version.split(".")[0] == "5"
    if "tokenizer.json" in names and "tokenizer.model" not in names:
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            from edgepack.build.spm_rebuild import needs_spm_model

            if needs_spm_model(Path(folder)):
                notes.append("tokenizer.model: rebuilt from tokenizer.json (SentencePiece)")
        elif saved_by_5 and notes:
            notes.append("tokenizer.model: rebuilt from tokenizer.json if that is "
                         "SentencePiece-style (read after the pull)")
    if not notes:
        return None
    who = f"saved by transformers {version}" if version else "written in transformers 5's format"
    return (f"checkpoint {who}: the build converts a build-owned working copy in edgepack's "
            f"cache (your files are not changed; recorded as source.working_copy), rewritten "
            f"for transformers 4.57: " + "; ".join(notes))


def plan_working_copy(source: Path) -> dict[str, tuple[bytes, list[str]]]:
    """{file name: (new bytes, notes)} for every file of ``source`` that needs a rewrite."""
    from edgepack.build.spm_rebuild import needs_spm_model, spm_model_bytes

    rewrites: dict[str, tuple[bytes, list[str]]] = {}
    for name, fix in (
        ("config.json", config_for_transformers4),
        ("tokenizer_config.json", tokenizer_config_for_transformers4),
    ):
        path = source / name
        if not path.is_file():
            continue
        data = read_folder_json(path)
        if not isinstance(data, dict):
            continue
        new, notes = fix(data)
        if notes:
            text = json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            rewrites[name] = (text.encode("utf-8"), notes)
    if needs_spm_model(source):
        model, notes = spm_model_bytes(source)
        rewrites["tokenizer.model"] = (model, notes)
    return rewrites


def make_working_copy(source: Path, cache_root: Path, source_id: str) -> WorkingCopy:
    """The folder to build ``source`` from: itself, or a cached rewritten copy.

    The copy lives in ``cache_root/working/<source_id>-r<RECIPE>/``, is built in a temporary
    sibling and renamed into place, so a present copy is complete. Raises BuildError when a
    source file cannot be read.
    """
    source = Path(source)
    rewrites = plan_working_copy(source)
    if not rewrites:
        return WorkingCopy(folder=source, changes=())
    changes = tuple(note for _, notes in sorted(rewrites.values()) for note in notes)
    changes = tuple(sorted(changes))
    final = Path(cache_root) / "working" / f"{source_id}-r{RECIPE}"
    if (final / NOTE_FILE).is_file():
        return WorkingCopy(folder=final, changes=changes)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for src in sorted(source.rglob("*")):
            rel = src.relative_to(source)
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() in rewrites:
                continue
            _link_or_copy(src, dst)
        for name, (data, _) in rewrites.items():
            (tmp / name).write_bytes(data)
        note = {"recipe": RECIPE, "source": str(source), "changes": list(changes)}
        (tmp / NOTE_FILE).write_text(json.dumps(note, indent=2) + "\n")
        if final.exists():  # an older, interrupted layout without the note file
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return WorkingCopy(folder=final, changes=changes)


def _link_or_copy(src: Path, dst: Path) -> None:
    # Hub snapshots are symlinks into blobs/: link the blob itself. A hard link shares the
    # inode, which is safe because the build never writes to a linked file (rewritten files
    # are new files).
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(real, dst)
