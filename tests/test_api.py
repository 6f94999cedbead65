"""The API through both backends (embedded and a real tritonserver), with the real clients users have."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx
import numpy as np
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from shim.repository import read_specs

import tiny_models
from helpers import EMBED, EMBED_V3, RERANK

TEXTS = [
    "東京は日本の首都です。",
    "猫が窓のそばで寝ている。",
    "検索システムでは、質問に関係する文章を上位に並べることが大切です。" * 4,  # longer than max_length
    "ＡＢＣ１２３とabc123",
]
DOCS = [
    "富士山は日本で一番高い山です。",
    "ラーメンがおいしい店",
    "新幹線を使えば東京から大阪まで約二時間半で行けます。",
    "春には桜が咲きます。",
]


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hf_token_counts(reference, texts, pairs=None) -> list[int]:
    tok = reference.tokenizer
    enc = tok(texts, pairs, truncation="longest_first", max_length=tiny_models.MAX_SEQ_LENGTH)
    return [len(ids) for ids in enc["input_ids"]]


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_default_base64_equals_sentence_transformers(client, references):
    result = client.embeddings.create(model=EMBED, input=TEXTS)  # the client asks for base64
    got = np.array([d.embedding for d in result.data])
    want = normalized(references["embed"].encode(TEXTS, convert_to_numpy=True))
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    assert np.max(np.abs(got - want)) <= 1e-4
    assert result.usage.prompt_tokens == sum(hf_token_counts(references["embed"], TEXTS))
    assert result.usage.total_tokens == result.usage.prompt_tokens


def test_openai_client_float(client, references):
    result = client.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float")
    want = normalized(references["embed"].encode([TEXTS[0]], convert_to_numpy=True))[0]
    assert np.max(np.abs(np.array(result.data[0].embedding) - want)) <= 1e-4
    assert result.model == EMBED


def test_base64_is_little_endian_float32(server):
    body = {"model": EMBED, "input": ["猫"], "encoding_format": "base64"}
    raw = httpx.post(server.url + "/v1/embeddings", json=body).json()["data"][0]["embedding"]
    floats = httpx.post(server.url + "/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert np.allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)


def test_dify_one_input_per_request_empty_authorization(server, references):
    # Dify's OpenAI-compatible plugin: one input per request, "Authorization:" empty when no key.
    for text in TEXTS:
        r = httpx.post(
            server.url + "/v1/embeddings",
            headers={"Authorization": ""},
            json={"model": EMBED, "input": [text], "encoding_format": "float"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        want = normalized(references["embed"].encode([text], convert_to_numpy=True))[0]
        assert np.max(np.abs(np.array(body["data"][0]["embedding"]) - want)) <= 1e-4
        assert body["usage"]["prompt_tokens"] == hf_token_counts(references["embed"], [text])[0]


def _truncated_count(server, model: str) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    found = re.search(rf'^fos_truncated_inputs_total{{model="{re.escape(model)}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_long_input_is_truncated_to_max_length(server, references):
    before = _truncated_count(server, EMBED), _truncated_count(server, RERANK)
    r = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": TEXTS[2] * 10})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == tiny_models.MAX_SEQ_LENGTH
    opened = references["embed"].tokenizer("a")["input_ids"][0]  # [CLS]: token ids open as the tokenizer's do
    assert httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": [opened] + [5] * 199}).status_code == 200
    r = httpx.post(server.url + "/v1/rerank", json={"model": RERANK, "query": TEXTS[0], "documents": [TEXTS[2] * 10, DOCS[0]]})
    assert r.status_code == 200
    # Cut, as Dify needs, and counted: the operator sees how often the context was too short.
    assert (_truncated_count(server, EMBED), _truncated_count(server, RERANK)) == (before[0] + 2, before[1] + 1)


def test_truncate_false_rejects_what_it_would_cut(server, references):
    long_text = TEXTS[2] * 10
    ids = references["embed"].tokenizer([TEXTS[0]])["input_ids"][0]
    fits = ids[:-1] + [5] * (tiny_models.MAX_SEQ_LENGTH - len(ids)) + ids[-1:]  # exactly the context
    cases = [
        ("/v1/embeddings", {"model": EMBED, "input": [TEXTS[0], long_text]}, "input", "input[1]"),
        ("/v1/embeddings", {"model": EMBED, "input": [fits, [*fits, 5]]}, "input", "input[1]"),
        ("/v1/rerank", {"model": RERANK, "query": TEXTS[0], "documents": [DOCS[0], long_text]}, "documents", "documents[1]"),
    ]
    for path, body, param, where in cases:
        r = httpx.post(server.url + path, json={**body, "truncate": False})
        _assert_envelope(r, 400, param)
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert where in r.json()["error"]["message"]
        assert httpx.post(server.url + path, json={**body, "truncate": True}).status_code == 200
        assert httpx.post(server.url + path, json=body).status_code == 200  # the server's default: cut
    # What fits is served with truncate=false.
    for body in (
        {"model": EMBED, "input": [TEXTS[0], TEXTS[1]]},
        {"model": EMBED, "input": [fits]},
        {"model": RERANK, "query": TEXTS[0], "documents": DOCS},
    ):
        path = "/v1/rerank" if "query" in body else "/v1/embeddings"
        assert httpx.post(server.url + path, json={**body, "truncate": False}).status_code == 200, body


def test_server_may_turn_truncation_off(exported):
    from shim.app import create_app
    from shim.backends.embedded import EmbeddedBackend
    from shim.service import Limits

    from helpers import ServerThread

    with ServerThread(create_app(EmbeddedBackend(exported["repository"]), limits=Limits(truncate=False))) as srv:
        body = {"model": EMBED, "input": TEXTS[2] * 10}
        _assert_envelope(httpx.post(srv.url + "/v1/embeddings", json=body), 400, "input")
        assert httpx.post(srv.url + "/v1/embeddings", json={**body, "truncate": True}).status_code == 200
        assert httpx.post(srv.url + "/v1/embeddings", json={"model": EMBED, "input": TEXTS[0]}).status_code == 200


def test_control_characters_are_spaces_never_the_end_of_the_text(server, references):
    # MeCab reads C strings: "テスト\x00テスト" was embedded as "テスト", by sentence-transformers too.
    sent = ["テスト\x00テスト", "テスト\x01テスト", "テスト\x7fテスト", "テスト\x9fテスト"]
    body = {"model": EMBED, "input": [*sent, "テスト"], "encoding_format": "float"}
    r = httpx.post(server.url + "/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    want = normalized(references["embed"].encode(["テスト テスト"], convert_to_numpy=True))[0]
    assert np.max(np.abs(got[: len(sent)] - want)) <= 1e-4
    assert np.max(np.abs(got[0] - got[-1])) > 1e-2  # not the prefix
    assert r.json()["usage"]["prompt_tokens"] == len(sent) * hf_token_counts(references["embed"], ["テスト テスト"])[0] + 5
    # The reranker's query and documents alike; the documents come back as they were sent.
    query, doc = "日本で\x00一番高い山は？", "富士山は\x00日本で一番高い山です。"
    body = {"model": RERANK, "query": query, "documents": [doc, "ラーメン"], "return_documents": True}
    results = httpx.post(server.url + "/v1/rerank", json=body).json()["results"]
    want_scores = references["rerank"].predict([(query.replace("\x00", " "), doc.replace("\x00", " "))])
    top = next(x for x in results if x["index"] == 0)
    assert abs(top["relevance_score"] - float(want_scores[0])) <= 1e-5
    assert top["document"]["text"] == doc


def test_a_lone_surrogate_is_a_replacement_character(server, references):
    # A client that cut a string inside an emoji sends half of its UTF-16 pair (json.dumps writes it as "\\ud83d"): it
    # has no UTF-8 form, so MeCab, Triton's string tensors and the response's JSON failed on it (500; on Triton every
    # request of the round with it).
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"})

    r = post("/v1/embeddings", {"model": EMBED, "input": ["東\ud83d京", "東\ufffd京"], "encoding_format": "float"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert np.max(np.abs(got[0] - got[1])) <= 1e-6
    body = {"model": RERANK, "query": "山\udc00", "documents": ["富士\ud800山", "海"], "return_documents": True}
    r = post("/v1/rerank", body)
    assert r.status_code == 200, r.text
    assert {x["document"]["text"] for x in r.json()["results"]} == {"富士\ufffd山", "海"}
    r = post("/v1/embeddings", {"model": "m\ud800", "input": "猫"})
    assert r.status_code == 404 and "m\ufffd" in r.json()["error"]["message"]


def test_token_id_input_matches_text_input(server, references, exported):
    ids = references["embed"].tokenizer([TEXTS[0], TEXTS[1]])["input_ids"]
    by_ids = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": ids}).json()
    by_text = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": TEXTS[:2]}).json()
    a = np.array([d["embedding"] for d in by_ids["data"]])
    b = np.array([d["embedding"] for d in by_text["data"]])
    assert np.max(np.abs(a - b)) <= 1e-5
    assert by_ids["usage"]["prompt_tokens"] == sum(len(x) for x in ids)
    single = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": ids[0]}).json()
    assert np.max(np.abs(np.array(single["data"][0]["embedding"]) - a[0])) <= 1e-5
    # A long text's full ids, cut by the server, embed as the text does (the closing [SEP] kept; v3's </s> too).
    long = "".join(TEXTS) * 4
    full = references["embed"].tokenizer(long)["input_ids"]
    by_ids = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": full})
    by_text = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": long})
    assert by_ids.status_code == by_text.status_code == 200, by_ids.text + by_text.text
    assert by_ids.json()["usage"]["prompt_tokens"] == by_text.json()["usage"]["prompt_tokens"] < len(full)
    assert np.max(np.abs(np.array(by_ids.json()["data"][0]["embedding"]) - by_text.json()["data"][0]["embedding"])) <= 1e-5
    # v3 closes its inputs too (its 8192 tokens are too long to check the same way here).
    ends = {s.served_name: s.end_token_id for s in read_specs(exported["repository"])}
    assert ends[EMBED_V3] == references["embed_v3"].tokenizer("a")["input_ids"][-1] and ends[EMBED] is not None


def test_token_ids_not_opened_as_the_tokenizer_opens_refused(server, references, exported):
    # LangChain's OpenAIEmbeddings sends tiktoken's ids by default; ids inside the vocabulary would embed as noise.
    starts = {s.served_name: s.start_token_id for s in read_specs(exported["repository"])}
    for name, key in ((EMBED, "embed"), (EMBED_V3, "embed_v3")):
        tokenizer = references[key].tokenizer
        assert starts[name] == tokenizer("a")["input_ids"][0]
        bare = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
        r = httpx.post(server.url + "/v1/embeddings", json={"model": name, "input": [tokenizer(TEXTS[1])["input_ids"], bare]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input" and error["message"].startswith(f"input[1] starts with token id {bare[0]}")
        assert "check_embedding_ctx_length=False" in error["message"]


def test_many_inputs_keep_their_order(server, references):
    texts = [f"{i}番目の文章です。" + "猫" * (i % 7) for i in range(70)]  # more than one sub-batch
    body = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": texts}, timeout=60).json()
    got = np.array([d["embedding"] for d in body["data"]])
    want = normalized(references["embed"].encode(texts, convert_to_numpy=True))
    assert [d["index"] for d in body["data"]] == list(range(70))
    assert np.max(np.abs(got - want)) <= 1e-4


def test_rerank_equals_cross_encoder(server, references):
    query = "日本で一番高い山は？"
    r = httpx.post(server.url + "/v1/rerank", json={"model": RERANK, "query": query, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    want = references["rerank"].predict([(query, d) for d in DOCS])
    got = {res["index"]: res["relevance_score"] for res in body["results"]}
    assert sorted(got) == list(range(len(DOCS)))
    assert max(abs(got[i] - float(want[i])) for i in got) <= 1e-5
    scores = [res["relevance_score"] for res in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert body["usage"]["total_tokens"] == sum(hf_token_counts(references["rerank"], [query] * len(DOCS), DOCS))


def test_rerank_dify_shape_top_n_and_documents(server, references):
    # Dify POSTs {endpoint}/rerank with top_n and reads results[].index and results[].relevance_score.
    query = "おいしい料理"
    r = httpx.post(
        server.url + "/v1/rerank",
        headers={"Authorization": ""},
        json={"model": RERANK, "query": query, "documents": DOCS, "top_n": 2, "return_documents": True},
    )
    body = r.json()
    want = references["rerank"].predict([(query, d) for d in DOCS])
    best = list(np.argsort(-want, kind="stable")[:2])
    assert [res["index"] for res in body["results"]] == best
    assert [res["document"]["text"] for res in body["results"]] == [DOCS[i] for i in best]
    # /rerank without /v1 and {"text": ...} documents, as Cohere and Jina clients send them.
    r2 = httpx.post(server.url + "/rerank", json={"model": RERANK, "query": query, "documents": [{"text": d} for d in DOCS]})
    assert [x["index"] for x in r2.json()["results"]][:2] == best
    assert "document" not in r2.json()["results"][0]


def test_models_and_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert models[EMBED]["task"] == "embed" and models[EMBED]["dimension"] == 32
    assert models[RERANK]["task"] == "rerank"
    assert models[EMBED]["max_length"] == tiny_models.MAX_SEQ_LENGTH


BAD_EMBEDDINGS = [
    ({"model": EMBED, "input": ""}, 400, "input"),
    ({"model": EMBED, "input": []}, 400, "input"),
    ({"model": EMBED, "input": ["ok", "  "]}, 400, "input"),
    ({"model": EMBED, "input": [1.5]}, 400, "input"),
    ({"model": EMBED, "input": [["a"]]}, 400, "input"),
    ({"model": EMBED, "input": [[]]}, 400, "input"),
    ({"model": EMBED, "input": [[1, 2, 10**9]]}, 400, "input"),
    ({"model": EMBED, "input": [-1]}, 400, "input"),
    ({"model": EMBED, "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"model": EMBED, "input": "x", "dimensions": 7}, 400, "dimensions"),
    ({"model": EMBED, "input": "x", "truncate": "no"}, 400, "truncate"),
    ({"model": EMBED, "input": "x", "input_type": "nonsense"}, 400, "input_type"),
    ({"model": RERANK, "input": "x"}, 400, "model"),
    ({"model": "nope/nothing", "input": "x"}, 404, "model"),
    ({"model": 5, "input": "x"}, 400, "model"),
    ({"model": EMBED, "input": ["猫"] * 2049}, 400, "input"),
    ({"model": EMBED, "input": "猫" * 50_001}, 400, "input"),
    ({"model": EMBED, "input": [[5] * 50_001]}, 400, "input"),
    ({"model": EMBED}, 400, "input"),
]

BAD_RERANKS = [
    ({"model": RERANK, "query": "q", "documents": []}, 400, "documents"),
    ({"model": RERANK, "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ({"model": RERANK, "query": "", "documents": ["a"]}, 400, "query"),
    ({"model": RERANK, "query": "q", "documents": [{"txt": "a"}]}, 400, "documents"),
    ({"model": RERANK, "query": "q", "documents": "a"}, 400, "documents"),
    ({"model": EMBED, "query": "q", "documents": ["a"]}, 400, "model"),
    ({"model": "nope", "query": "q", "documents": ["a"]}, 404, "model"),
    ({"model": RERANK, "query": "q", "documents": ["a", " "]}, 400, "documents"),
    ({"model": RERANK, "query": "q", "documents": ["a"] * 1001}, 400, "documents"),
    ({"model": RERANK, "query": "猫" * 50_001, "documents": ["a"]}, 400, "query"),
]


def _assert_envelope(r: httpx.Response, status: int, param: str | None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "status", "param"), BAD_EMBEDDINGS)
def test_bad_embedding_requests(server, body, status, param):
    _assert_envelope(httpx.post(server.url + "/v1/embeddings", json=body), status, param)


@pytest.mark.parametrize(("body", "status", "param"), BAD_RERANKS)
def test_bad_rerank_requests(server, body, status, param):
    _assert_envelope(httpx.post(server.url + "/v1/rerank", json=body), status, param)


def test_malformed_bodies_get_the_envelope_not_422(server):
    for content, headers in [
        (b"{bad", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b'{"input": "x"}', {"content-type": "text/plain"}),
    ]:
        r = httpx.post(server.url + "/v1/embeddings", content=content, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/embeddings")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(BadRequestError):
        client.embeddings.create(model=EMBED, input="")


def test_still_serving_after_bad_requests(server):
    for body, _, _ in BAD_EMBEDDINGS:
        httpx.post(server.url + "/v1/embeddings", json=body)
    r = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": "まだ動いていますか"})
    assert r.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


async def test_concurrent_requests_each_get_their_own_answer(server, references):
    # Coalesced into shared batches (embedded batcher, Triton's ragged dynamic batching): every
    # request must still get exactly its own vectors, in its own order.
    texts = [("猫" * (1 + i % 9)) + f"の文{i}" for i in range(40)]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        responses = await asyncio.gather(
            *(http.post("/v1/embeddings", json={"model": EMBED, "input": [t, t + "です"]}) for t in texts)
        )
    want = normalized(references["embed"].encode([x for t in texts for x in (t, t + "です")], convert_to_numpy=True))
    for n, r in enumerate(responses):
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]])
        assert np.max(np.abs(got - want[2 * n : 2 * n + 2])) <= 1e-4


def test_metrics_endpoint(server, request):
    httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": "猫"})
    text = httpx.get(server.url + "/metrics").text
    assert 'fos_requests_total{route="/v1/embeddings",status="200"}' in text
    assert f'fos_tokens_total{{model="{EMBED}"}}' in text
    assert f'fos_round_rows_total{{model="{EMBED}"}}' in text  # both backends coalesce
    if "embedded" in request.node.name:
        assert f'fos_padding_efficiency{{model="{EMBED}"}}' in text
        assert f'fos_encoder_seconds_total{{model="{EMBED}"}}' in text
