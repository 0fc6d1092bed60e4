"""The pure GGUF header parser and file-name rules behind GGUF repos, checked against real
files (llama.cpp's converter and quantizer output) and the ``gguf`` package's tables."""

from __future__ import annotations

import pytest
from support.gguf_repo import FILES, smollm2_gguf_repo

from edgepack.build.gguf_quantize import read_tensor_infos
from edgepack.build.gguf_repo import MAX_HEADER_BYTES, gguf_candidates, read_header
from edgepack.errors import BuildError
from edgepack.plan.gguf_header import (
    _EXTRA_SIZES,
    GGML_TYPE_IDS,
    LLAMA_FTYPES,
    HeaderIncomplete,
    gguf_model_facts,
    parse_gguf_header,
    quant_label,
    split_parts,
)


@pytest.fixture(scope="module")
def q8_file():
    return smollm2_gguf_repo() / FILES["Q8_0"]


def test_header_from_bytes_matches_the_file_reader(q8_file):
    data = q8_file.read_bytes()
    header = parse_gguf_header(data, q8_file.name)
    stored = read_tensor_infos(q8_file)  # the file-based reader, written independently
    assert [(t.name, t.shape, t.type) for t in header.tensors] == [
        (t.name, tuple(t.shape), t.type) for t in stored
    ]
    assert header.metadata["general.architecture"] == "llama"
    assert LLAMA_FTYPES[header.metadata["general.file_type"]] == "Q8_0"
    assert "tokenizer.chat_template" in header.metadata
    assert header.metadata["tokenizer.ggml.tokens.__len__"] == 49152
    # the tensor data starts after the header (aligned): sizes add up to the file
    assert header.header_bytes + header.weights_bytes <= len(data)
    assert len(data) - header.weights_bytes - header.header_bytes < 64 * 1024
    facts = gguf_model_facts(header)
    assert (facts.n_layer, facts.hidden_size, facts.n_head, facts.n_kv_head) == (30, 576, 9, 3)
    assert facts.tied_embeddings and facts.n_params == 134515008


def test_a_short_buffer_asks_for_more_and_reading_grows_to_it(q8_file):
    data = q8_file.read_bytes()
    with pytest.raises(HeaderIncomplete) as e:
        parse_gguf_header(data[:1000])
    assert e.value.need > 1000
    reads = []

    def read(start, end):
        reads.append((start, end))
        return data[start : end + 1]

    header, n = read_header(read, len(data), q8_file.name)
    assert header.tensors and n >= header.header_bytes and n < 2 * header.header_bytes + 65536
    assert reads[0][0] == 0
    assert all(b[0] == a[1] + 1 for a, b in zip(reads, reads[1:], strict=False))


def test_a_header_over_the_limit_is_refused_not_downloaded(q8_file):
    data = q8_file.read_bytes()

    def read(start, end):
        return data[start : end + 1]

    with pytest.raises(BuildError) as e:
        read_header(read, len(data), "big.gguf", limit=256 * 1024)
    assert "larger than" in e.value.message and "big.gguf" in e.value.message
    assert MAX_HEADER_BYTES >= 32 * 1024 * 1024  # a 256k-token vocabulary fits


def test_damaged_headers_are_build_errors_naming_the_file():
    with pytest.raises(BuildError, match="x.gguf is not a little-endian GGUF"):
        parse_gguf_header(b"GGML" + b"\x00" * 60, "x.gguf")
    with pytest.raises(BuildError, match="malformed"):
        parse_gguf_header(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "y.gguf")


def test_type_tables_agree_with_the_gguf_package():
    import gguf

    for type_id, name in GGML_TYPE_IDS.items():
        assert gguf.GGMLQuantizationType(type_id).name == name
    for name, (block, size) in _EXTRA_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (block, size)


def test_file_type_names_agree_with_llama_cpp():
    import llama_cpp

    for ftype, name in LLAMA_FTYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == ftype, name


@pytest.mark.parametrize(("name", "label"), [
    ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
    ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
    ("model-f16.gguf", "F16"),
    ("Q8_0/model-Q8_0-00001-of-00003.gguf", "Q8_0"),
    ("mistral-7b-instruct-v0.2.Q5_K_S.gguf", "Q5_K_S"),
    ("ggml-model.gguf", "unknown"),
])
def test_quant_labels_from_file_names(name, label):
    assert quant_label(name) == label


def test_candidates_group_split_parts_and_skip_projectors():
    names = ["README.md", "m-Q4_0.gguf", "mmproj-f16.gguf",
             "m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf"]
    assert gguf_candidates(names) == {
        "m-Q4_0.gguf": ("m-Q4_0.gguf",),
        "m-Q8_0-00001-of-00002.gguf": ("m-Q8_0-00001-of-00002.gguf",
                                       "m-Q8_0-00002-of-00002.gguf"),
    }
    assert split_parts("m-Q8_0-00002-of-00002.gguf") == ("m-Q8_0", 2, 2)
    with pytest.raises(BuildError, match="lacks part"):
        gguf_candidates(["m-00001-of-00003.gguf", "m-00003-of-00003.gguf"])


def test_an_architecture_edgepack_does_not_plan_is_refused(q8_file):
    header = parse_gguf_header(q8_file.read_bytes())
    other = type(header)(header.version, {**header.metadata, "general.architecture": "rwkv6"},
                         header.tensors, header.header_bytes)
    with pytest.raises(BuildError, match="rwkv6"):
        gguf_model_facts(other, name="rwkv.gguf")
