"""ruri v3 (ModernBERT: 8,192 tokens, local attention over 128-token windows, a SentencePiece-style
tokenizer, prompts in its sentence-transformers config) through both backends, against
sentence-transformers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import tiny_models
from helpers import EMBED, EMBED_V3, RERANK, RERANK_V3

LONG = "".join(tiny_models.corpus())


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def token_count(reference, text: str) -> int:
    return len(reference.tokenizer([text])["input_ids"][0])


def embed(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json={"model": EMBED_V3, "encoding_format": "float", **body}, timeout=60)


def vectors(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


@pytest.fixture(scope="module")
def texts(references) -> list[str]:
    """Inputs shorter than one local-attention window, longer than it, and longer than ruri v1's 512."""
    ref = references["embed_v3"]
    out = ["猫", LONG[:60], LONG[:400], LONG, LONG * 2]
    counts = [token_count(ref, t) for t in out]
    assert counts[1] < tiny_models.LOCAL_ATTENTION_V3 < counts[2] < 512 < counts[3] < counts[4] < 8192, counts
    return out


def test_embeddings_equal_sentence_transformers_past_the_window_and_512(server, references, texts):
    ref = references["embed_v3"]
    r = embed(server, {"input": texts})
    want = normalized(ref.encode(texts, convert_to_numpy=True))
    assert np.max(np.abs(vectors(r) - want)) <= 1e-5
    assert r.json()["usage"]["prompt_tokens"] == sum(token_count(ref, t) for t in texts)
    # One by one, as Dify sends them: the same vectors (no padding effect on the sliding window).
    for i, t in enumerate(texts):
        assert np.max(np.abs(vectors(embed(server, {"input": [t]}))[0] - want[i])) <= 1e-5


@pytest.mark.parametrize("name", ["query", "document", "topic"])
def test_input_type_equals_encode_with_prompt_name(server, references, texts, name):
    ref = references["embed_v3"]
    want = normalized(ref.encode(texts, prompt_name=name, convert_to_numpy=True))
    for field in ("input_type", "prompt_name"):  # TEI's spelling too
        r = embed(server, {"input": texts, field: name})
        assert np.max(np.abs(vectors(r) - want)) <= 1e-5, field
        assert r.json()["usage"]["prompt_tokens"] == sum(token_count(ref, ref.prompts[name] + t) for t in texts)
    plain = vectors(embed(server, {"input": texts}))
    assert np.max(np.abs(plain - want)) > 1e-3  # the prompt made a difference


def test_a_prompt_already_there_is_not_added_again(server, references):
    ref = references["embed_v3"]
    want = normalized(ref.encode(["猫が寝ている", "東京"], prompt_name="query", convert_to_numpy=True))
    # Dify with query_prefix "検索クエリ:" sends "検索クエリ: 猫が寝ている" (prefix, space, text).
    for body in (
        {"input": ["検索クエリ: 猫が寝ている", "東京"], "input_type": "query"},
        {"input": ["検索クエリ: 猫が寝ている", "検索クエリ: 東京"]},
    ):
        assert np.max(np.abs(vectors(embed(server, body)) - want)) <= 1e-5, body


def test_prompt_errors(server):
    cases = [
        ({"input": "猫", "input_type": "passage"}, "input_type"),
        ({"input": "猫", "prompt_name": "passage"}, "prompt_name"),
        ({"input": "猫", "input_type": "query", "prompt_name": "document"}, "prompt_name"),
        ({"input": [5, 6, 7], "input_type": "query"}, "input_type"),
        ({"input": [5, 6, 7], "prompt_name": "query"}, "prompt_name"),
    ]
    for body, param in cases:
        r = embed(server, body)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param
    # The message lists what the model has.
    assert "'document', 'query', 'topic'" in embed(server, {"input": "猫", "input_type": "passage"}).json()["error"]["message"]
    assert embed(server, {"input": "猫", "input_type": "query", "prompt_name": "query"}).status_code == 200


def test_models_list_context_and_prompts(server):
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert models[EMBED_V3]["max_length"] == models[RERANK_V3]["max_length"] == 8192
    assert models[EMBED_V3]["prompts"] == {"query": "検索クエリ: ", "document": "検索文書: ", "topic": "トピック: "}
    assert "default_prompt_name" not in models[EMBED_V3]
    assert "prompts" not in models[RERANK_V3]


def test_rerank_equals_cross_encoder_on_long_documents(server, references):
    ref = references["rerank_v3"]
    query = "日本で一番高い山は？"
    docs = ["富士山は日本で一番高い山です。", LONG[:400], LONG, LONG * 2, "春には桜が咲きます。"]
    r = httpx.post(server.url + "/v1/rerank", json={"model": RERANK_V3, "query": query, "documents": docs}, timeout=60)
    assert r.status_code == 200, r.text
    want = ref.predict([(query, d) for d in docs])
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert max(abs(got[i] - float(want[i])) for i in range(len(docs))) <= 1e-5
    assert [x["index"] for x in r.json()["results"]] == list(np.argsort(-want, kind="stable"))
    pair_tokens = [len(ids) for ids in ref.tokenizer([query] * len(docs), docs)["input_ids"]]
    assert max(pair_tokens) > 1024
    assert r.json()["usage"]["total_tokens"] == sum(pair_tokens)


def _prefix_cut(reference) -> tuple[str, str, int]:
    """A document whose first n tokens are exactly the tokens of a shorter text, so that cutting the
    document to n tokens can be checked against the cross-encoder given that shorter text."""
    tok = reference.tokenizer
    lines = tiny_models.corpus()
    short, doc = lines[0], lines[0] + lines[1] + lines[2] + lines[3]  # short fits ruri v1's 32 tokens with the query
    n = len(tok(short, add_special_tokens=False)["input_ids"])
    assert tok(doc, add_special_tokens=False)["input_ids"][:n] == tok(short, add_special_tokens=False)["input_ids"]
    return short, doc, n


@pytest.mark.parametrize(("model", "key"), [(RERANK_V3, "rerank_v3"), (RERANK, "rerank")])
def test_max_tokens_per_doc_cuts_each_document(server, references, model, key):
    ref = references[key]
    short, doc, n = _prefix_cut(ref)
    query = "京都のお寺"
    docs = [doc, "猫", doc]
    body = {"model": model, "query": query, "documents": docs, "max_tokens_per_doc": n}
    r = httpx.post(server.url + "/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    want = ref.predict([(query, short), (query, "猫"), (query, short)])
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert max(abs(got[i] - float(want[i])) for i in range(3)) <= 1e-5
    uncut = ref.predict([(query, doc)])[0]
    assert abs(got[0] - float(uncut)) > 1e-4  # the cut changed the answer
    counts = [
        len(x) for x in ref.tokenizer([query] * 3, [short, "猫", short], truncation="longest_first", max_length=8192)["input_ids"]
    ]
    limit = tiny_models.MAX_SEQ_LENGTH_V3 if key == "rerank_v3" else tiny_models.MAX_SEQ_LENGTH
    assert r.json()["usage"]["total_tokens"] == sum(min(c, limit) for c in counts)


def test_max_tokens_per_doc_is_not_truncation_refused(server):
    # The v1 reranker's context is 32 tokens: the long document fits only once the client cuts it.
    body = {"model": RERANK, "query": "猫", "documents": [LONG], "truncate": False}
    assert httpx.post(server.url + "/v1/rerank", json=body).status_code == 400
    assert httpx.post(server.url + "/v1/rerank", json={**body, "max_tokens_per_doc": 8}).status_code == 200
    assert httpx.post(server.url + "/v1/rerank", json={**body, "max_tokens_per_doc": 0}).status_code == 400
    # A cap past the context (past int64 too) cuts nothing: the context's truncation still applies, and is refused.
    for huge in (10**6, 2**63, 10**20):
        r = httpx.post(server.url + "/v1/rerank", json={**body, "max_tokens_per_doc": huge})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    for model in (RERANK, RERANK_V3):
        kept = {"model": model, "query": "猫", "documents": [LONG, "犬"]}
        plain = httpx.post(server.url + "/v1/rerank", json=kept).json()["results"]
        assert httpx.post(server.url + "/v1/rerank", json={**kept, "max_tokens_per_doc": 2**64}).json()["results"] == plain


def test_v1_and_v3_side_by_side(server):
    # Both generations served by one server: the model picks prompts, context and tokenizer.
    r1 = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": LONG})
    r3 = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED_V3, "input": LONG})
    assert r1.json()["usage"]["prompt_tokens"] == tiny_models.MAX_SEQ_LENGTH
    assert r3.json()["usage"]["prompt_tokens"] > 512
    # Without a model, a server with two embedding models asks which.
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "猫"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
