"""edgepack.build.gguf_quantize: llama.cpp's quantizer through llama-cpp-python, and the tensor
table."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edgepack.build.gguf_quantize import (
    QUANT_TYPES,
    quant_type,
    quantize_gguf,
    read_gguf_metadata,
    read_tensor_infos,
)
from edgepack.errors import BuildError


def test_every_quant_name_maps_to_a_llama_cpp_ftype() -> None:
    import llama_cpp

    for name, qt in QUANT_TYPES.items():
        assert isinstance(getattr(llama_cpp, qt.ftype), int), name
        assert llama_cpp.llama_ftype_name(getattr(llama_cpp, qt.ftype)), name
    assert quant_type("q4_k_m").name == "Q4_K_M"


def test_unknown_quant_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="'Q4_K_X'") as err:
        quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_X")
    assert "Q4_K_M" in (err.value.hint or "")


def test_missing_input_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no such file"):
        quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q8_0")


def test_reader_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(BuildError, match="not a little-endian GGUF"):
        read_tensor_infos(bogus)


def test_reader_rejects_a_truncated_header(tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama_f32_gguf.read_bytes()[:4096])
    with pytest.raises(BuildError, match="cannot read the GGUF header"):
        read_tensor_infos(cut)


def test_quantize_tiny_llama_to_q8_0(tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "tiny-q8_0.gguf"
    result = quantize_gguf(tiny_llama_f32_gguf, dst, "Q8_0", threads=2)
    assert result.path == dst and dst.is_file()
    assert result.size_bytes == dst.stat().st_size < tiny_llama_f32_gguf.stat().st_size / 2
    # 2-D weights Q8_0 (64 is a multiple of its 32-wide blocks), the 5 norms stay F32.
    assert result.type_counts == {"F32": 5, "Q8_0": 15}
    assert result.tensor_count == 20 and result.fallbacks == ()
    assert read_gguf_metadata(dst)["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644
    assert [p.name for p in dst.parent.iterdir()] == ["tiny-q8_0.gguf"]  # no temp files


def test_corrupt_input_is_a_build_error_with_llama_cpp_messages(
    tiny_llama_f32_gguf: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny_llama_f32_gguf.read_bytes()[:200_000])  # cut inside the metadata
    dst = tmp_path / "out" / "q.gguf"
    with pytest.raises(BuildError) as err:
        quantize_gguf(corrupt, dst, "Q4_0", threads=1)
    assert err.value.exit_code == 5
    assert "return code" in err.value.message
    # llama.cpp's own words, captured from its log callback / fd 2:
    assert "llama_model_quantize: failed to quantize" in err.value.message
    assert not dst.exists() and list(dst.parent.iterdir()) == []


@pytest.mark.slow
def test_smollm2_quant_mixes_and_k_quant_fallbacks(smollm2_f16_gguf: Path, tmp_path: Path) -> None:
    """What llama.cpp makes of SmolLM2-135M (272 tensors: 211 2-D weights, 61 norms).

    Its hidden size 576 is a multiple of 32 but not of 256: Q8_0 and Q4_0 apply everywhere,
    while the K-quants fall back on every tensor whose rows are 576 wide.
    """
    q8 = quantize_gguf(smollm2_f16_gguf, tmp_path / "q8_0.gguf", "Q8_0", threads=2)
    assert q8.type_counts == {"F32": 61, "Q8_0": 211} and q8.fallbacks == ()

    q4 = quantize_gguf(smollm2_f16_gguf, tmp_path / "q4_0.gguf", "Q4_0", threads=2)
    # The tied token embedding doubles as the output matrix, which llama.cpp keeps finer.
    assert q4.type_counts == {"F32": 61, "Q4_0": 210, "Q8_0": 1} and q4.fallbacks == ()

    km = quantize_gguf(smollm2_f16_gguf, tmp_path / "q4_k_m.gguf", "Q4_K_M", threads=2)
    assert km.tensor_count == 272
    assert km.type_counts == {"F32": 61, "Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}
    # 6 of the 9 tensors of each of the 30 blocks have 576-wide rows (q, k, v, output, gate,
    # up), plus token_embd: 181 fall back; only ffn_down (1536 wide) gets K types.
    assert len(km.fallbacks) == 181
    assert km.fallback_types == {"Q5_0": 166, "Q8_0": 15}
    assert "token_embd.weight" in km.fallbacks
    assert not any(name.endswith("ffn_down.weight") for name in km.fallbacks)
    assert q4.size_bytes < km.size_bytes < q8.size_bytes < smollm2_f16_gguf.stat().st_size
    assert km.as_dict()["fallbacks"] == 181 and km.as_dict()["file"] == "q4_k_m.gguf"
