"""The files of a model folder: which to pull, safetensors headers, shards, hashes (build side).

Pure selection rules and local-file helpers shared by the hub client (:mod:`.hub`) and the
build pipeline; no network.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgepack.errors import BuildError, FetchError

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)

# Small files a build needs besides the weights (tokenizer, chat template, sentence-transformers
# pooling); top-level only, except the pooling module folder.
SUPPORT_PATTERNS = (
    "config*.json", "tokenizer*", "*.model", "special_tokens_map.json", "chat_template.*",
    "generation_config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/*",
    # Slow (non-"fast") tokenizers need these when tokenizer.json is absent.
    "vocab.*", "merges.txt", "added_tokens.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# A safetensors header above this is not a real model (huggingface_hub uses the same bound).
_MAX_HEADER = 25_000_000


# -- file selection (pure) -------------------------------------------------------------------
def select_files(repo_files: list[str], *, ref: str = "") -> list[str]:
    """The repo files a build needs: the support files plus one set of weights.

    Safetensors are preferred; shards come from the index so that duplicate exports next to
    them (e.g. ``consolidated.safetensors``) are not fetched; PyTorch ``.bin`` weights only
    when there are no safetensors. Raises BuildError when there are no weights at all.
    """
    top = [f for f in repo_files if "/" not in f]
    support = [f for f in repo_files
               if any(fnmatch.fnmatchcase(f, p) for p in SUPPORT_PATTERNS)
               and ("/" not in f or f.startswith("1_Pooling/"))]
    support = [f for f in support if not f.endswith((".safetensors", ".bin"))]
    weights = _pick_weights(top)
    if not weights:
        raise BuildError(
            f"{ref or 'the model'} has no safetensors or PyTorch weights "
            f"(files: {', '.join(sorted(repo_files)[:12]) or 'none'})",
            hint="choose a repo with model.safetensors or pytorch_model.bin (GGUF-only or "
                 "adapter-only repos cannot be converted)")
    return sorted(set(support) | set(weights))


def _pick_weights(top: list[str]) -> list[str]:
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    if SAFETENSORS_INDEX in top:
        return [SAFETENSORS_INDEX]  # shards are added once the index is read
    if "model.safetensors" in safetensors:
        return ["model.safetensors"]
    if safetensors:
        return safetensors
    if PYTORCH_INDEX in top:
        return [PYTORCH_INDEX]
    return sorted(f for f in top if fnmatch.fnmatchcase(f, "pytorch_model*.bin"))


def shard_names(index: dict[str, Any], index_name: str) -> list[str]:
    """Shard file names listed by a ``*.index.json``; raises FetchError if it is malformed."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FetchError(f"{index_name} has no weight_map",
                         hint="the repo's index file is broken; report it to the model owner")
    return sorted(set(str(v) for v in weight_map.values()))


def weight_files_of(selected: list[str]) -> list[str]:
    return [f for f in selected if f.endswith((".safetensors", ".bin"))]


# -- safetensors headers ---------------------------------------------------------------------
def parse_safetensors_header(raw: bytes, name: str) -> dict[str, TensorSpec]:
    """{tensor: (dtype, shape)} from a header's JSON bytes; raises FetchError if malformed."""
    try:
        header = json.loads(raw)
        return {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"]))
                for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError) as e:
        raise FetchError(f"{name} has no valid safetensors header ({e})",
                         hint="the file is truncated or not a safetensors file") from e


def header_length(first8: bytes, name: str) -> int:
    if len(first8) != 8:
        raise FetchError(f"{name}: got {len(first8)} of the 8 header-length bytes",
                         hint="the file is truncated or the server ignored the Range header")
    n = int.from_bytes(first8, "little")
    if n > _MAX_HEADER:
        raise FetchError(f"{name}: safetensors header of {n} bytes exceeds {_MAX_HEADER}",
                         hint="the file is not a safetensors file")
    return n


def read_local_header(path: Path) -> dict[str, TensorSpec]:
    with path.open("rb") as f:
        n = header_length(f.read(8), path.name)
        return parse_safetensors_header(f.read(n), path.name)


# -- disk and hashes -------------------------------------------------------------------------
def check_disk_space(path: str | os.PathLike[str], needed_bytes: int) -> None:
    """Raise BuildError if the filesystem holding ``path`` has less than ``needed_bytes`` free."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise BuildError(
            f"not enough disk space in {path}: need {needed_bytes} bytes, {free} free",
            hint="free some space, or point HF_HUB_CACHE / --out at a larger disk")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_folder_json(path: Path) -> Any:
    """A JSON file of a model folder (config, tokenizer files); BuildError when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuildError(
            f"cannot read {path}: {e}", hint="the model folder is incomplete or damaged"
        ) from e


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FetchError(f"cannot read {path.name} as JSON ({e})",
                         hint="the file is corrupt; delete it from the cache and pull again") from e
    if not isinstance(value, dict):
        raise FetchError(f"{path.name} is not a JSON object", hint="the model files are broken")
    return value


def folder_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.relative_to(folder).as_posix().startswith(".cache/"))


def expand_shards(folder: Path, selected: list[str], ref: str) -> list[str]:
    """Replace an index file in ``selected`` by index + its shards (read from ``folder``)."""
    out = list(selected)
    for index in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        if index in selected:
            out += shard_names(read_json(folder / index), index)
    return sorted(set(out))
