"""A GGUF repo of SmolLM2-135M-Instruct, as a hub user finds one (``...-GGUF``): several
quantizations of the same model side by side, a README with a licence, no safetensors.

A second repo (``smollm2_gguf_repo(step_up=True)``) holds Q4_1, Q5_K_M, Q8_0 and F16, for the
build's step-up: with flash attention off, SmolLM2-135M's greedy answer to "What is the capital
of France?" is "L'Étoile, la Cité, ..." at Q4_1 and mentions Paris at Q5_K_M and above.

Files are made locally from the suite's SmolLM2 F16 GGUF (llama.cpp's converter of the HF
folder rebuilt from the shipped Q4_1 file, see support.models): Q8_0 and Q4_0 by llama.cpp's
own quantizer, and a Q4_0 copy split in two parts the way ``gguf-split`` names them
(``-00001-of-00002.gguf``), written by the ``gguf`` package's split writer. Cached under the
test-model cache, keyed by the converter version, built under a lock and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from support.models import _locked, build_gguf, build_smollm2, cache_root
from support.smollm import quantize_gguf

REPO_VERSION = "1"
README = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [gguf]
---
# SmolLM2-135M-Instruct-GGUF (edgepack test fixture)

Quantizations of SmolLM2-135M-Instruct made locally with llama.cpp.
"""
FILES = {
    "F16": "SmolLM2-135M-Instruct-F16.gguf",
    "Q8_0": "SmolLM2-135M-Instruct-Q8_0.gguf",
    "Q4_0": "SmolLM2-135M-Instruct-Q4_0.gguf",
}


def split_gguf(src: Path, out_dir: Path, stem: str, parts: int = 2) -> list[Path]:
    """Split ``src`` into ``parts`` files named ``<stem>-0000i-of-0000N.gguf``, tensors kept
    byte for byte (quantized blocks included), with llama.cpp's ``split.*`` keys."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    per_part = -(-len(reader.tensors) // parts)
    writer = gguf.GGUFWriter(str(out_dir / f"{stem}.gguf"), arch, split_max_tensors=per_part)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        # t.data is the stored block bytes (rows x bytes per row) for quantized types; the
        # writer derives the element shape from it and the type.
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out_dir.glob(f"{stem}-*-of-*.gguf"))


STEP_UP_QUANTS = ("Q4_1", "Q5_K_M", "Q8_0")


def repo_file(quant: str) -> str:
    return f"SmolLM2-135M-Instruct-{quant}.gguf"


def _build(out: Path, *, split: bool, quants: tuple[str, ...] = ("Q8_0", "Q4_0")) -> None:
    f16 = build_gguf(build_smollm2(), "f16")
    (out / "README.md").write_text(README)
    os.link(f16, out / FILES["F16"])
    for quant in quants:
        quantize_gguf(f16, out / repo_file(quant), quant)
    if split:
        split_gguf(out / FILES["Q4_0"], out, "SmolLM2-135M-Instruct-Q4_0-split")
        (out / FILES["Q4_0"]).unlink()


def smollm2_gguf_repo(*, split: bool = False, step_up: bool = False) -> Path:
    """Folder of the repo (F16, Q8_0, Q4_0 or, with ``split``, Q4_0 in two parts; with
    ``step_up``, F16 and :data:`STEP_UP_QUANTS`)."""
    from edgepack.build.gguf_convert import converter_version
    from support.models import converter_environ

    slug = "".join(ch if ch.isalnum() or ch == "." else "-"
                   for ch in converter_version(converter_environ()))
    root = cache_root()
    shape = "-split" if split else "-step-up" if step_up else ""
    final = root / f"smollm2-gguf-repo{shape}-{REPO_VERSION}-{slug}"
    if (final / "README.md").is_file():
        return final
    with _locked(root / f".{final.name}.lock"):
        if (final / "README.md").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            if step_up:
                _build(tmp, split=False, quants=STEP_UP_QUANTS)
            else:
                _build(tmp, split=split)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
