"""/v1/embeddings with all-MiniLM-L6-v2 converted to GGUF, via the official openai client,
compared with sentence-transformers on the same checkpoint (the reference)."""

from __future__ import annotations

import math

import openai
import pytest
from support.bundles import minilm_folder, serve_bundle

pytestmark = pytest.mark.slow
TEXTS = ["The cat sits on the mat.", "A stock market crash wiped out savings."]


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_match_sentence_transformers(embedding_bundle):
    server = serve_bundle(embedding_bundle)
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        # The openai client asks for base64 by default and decodes it.
        r = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)
        floats = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS,
                                          encoding_format="float")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="all-minilm-l6-v2",
                                           messages=[{"role": "user", "content": "hi"}])
    finally:
        assert server.stop() == 0
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 384
    assert r.usage.prompt_tokens > 8
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_folder()), device="cpu").encode(TEXTS)
    for got, got_f, want in zip(r.data, floats.data, ref, strict=True):
        assert _cos(got.embedding, got_f.embedding) > 0.99999
        assert _cos(got.embedding, list(map(float, want))) > 0.99
