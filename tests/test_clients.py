"""The clients users point at this server, unmodified, over loopback through both backends: the
``openai`` SDK, LangChain's OpenAIEmbeddings, LlamaIndex's OpenAILikeEmbedding and the Cohere SDK
(v1 and v2 rerank). These are the README's snippets; each result is held against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from helpers import EMBED_V3, RERANK, RERANK_V3

DOCS = [
    "富士山は日本で一番高い山です。",
    "ラーメンがおいしい店",
    "京都には古いお寺や神社がたくさんあります。",
    "春には桜が咲きます。",
]
QUERY = "日本で一番高い山は？"


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def close(got, want, tol: float = 1e-5) -> bool:
    return float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) <= tol


@pytest.fixture
def st(references):
    return references["embed_v3"]


def test_openai_sdk_with_input_type(server, st):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    docs = client.embeddings.create(model=EMBED_V3, input=DOCS, extra_body={"input_type": "document"})
    query = client.embeddings.create(model=EMBED_V3, input=QUERY, extra_body={"input_type": "query"})
    assert close([d.embedding for d in docs.data], normalized(st.encode(DOCS, prompt_name="document")))
    assert close(query.data[0].embedding, normalized(st.encode([QUERY], prompt_name="query"))[0])
    # The model list, and one model by its id (which holds a '/').
    assert EMBED_V3 in {m.id for m in client.models.list()}
    card = client.models.retrieve(EMBED_V3)
    assert card.id == EMBED_V3 and card.model_extra["task"] == "embed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope/nothing")


def test_langchain_openai_embeddings(server, st):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: by default LangChain sends tiktoken's token ids for OpenAI's
    # models, which mean nothing to ruri's tokenizer.
    embeddings = OpenAIEmbeddings(
        model=EMBED_V3, base_url=server.url + "/v1", api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    docs = embeddings.embed_documents(DOCS, extra_body={"input_type": "document"})
    query = embeddings.embed_query(QUERY, extra_body={"input_type": "query"})
    assert close(docs, normalized(st.encode(DOCS, prompt_name="document")))
    assert close(query, normalized(st.encode([QUERY], prompt_name="query"))[0])
    plain = embeddings.embed_documents(DOCS)
    assert close(plain, normalized(st.encode(DOCS)))
    # For callers that pass nothing per call (vector stores): one instance per input_type.
    for_queries = OpenAIEmbeddings(
        model=EMBED_V3,
        base_url=server.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
        model_kwargs={"extra_body": {"input_type": "query"}},
    )
    assert close(for_queries.embed_query(QUERY), normalized(st.encode([QUERY], prompt_name="query"))[0])


def test_llamaindex_openai_like_embedding(server, st):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    def model(input_type: str) -> OpenAILikeEmbedding:
        return OpenAILikeEmbedding(
            model_name=EMBED_V3,
            api_base=server.url + "/v1",
            api_key="unused",
            max_retries=0,
            additional_kwargs={"extra_body": {"input_type": input_type}},
        )

    docs = model("document").get_text_embedding_batch(DOCS)
    query = model("query").get_query_embedding(QUERY)
    assert close(docs, normalized(st.encode(DOCS, prompt_name="document")))
    assert close(query, normalized(st.encode([QUERY], prompt_name="query"))[0])


@pytest.mark.parametrize(("model", "key"), [(RERANK_V3, "rerank_v3"), (RERANK, "rerank")])
def test_cohere_v1_client_rerank(server, references, model, key):
    import cohere

    client = cohere.Client(api_key="unused", base_url=server.url, max_retries=0)
    got = client.rerank(model=model, query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    want = references[key].predict([(QUERY, d) for d in DOCS])
    best = list(np.argsort(-want, kind="stable")[:3])
    assert [r.index for r in got.results] == best
    assert close([r.relevance_score for r in got.results], want[best])
    assert [r.document.text for r in got.results] == [DOCS[i] for i in best]


@pytest.mark.parametrize(("model", "key"), [(RERANK_V3, "rerank_v3"), (RERANK, "rerank")])
def test_cohere_v2_client_rerank(server, references, model, key):
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=server.url, max_retries=0)
    got = client.rerank(model=model, query=QUERY, documents=DOCS, top_n=2)
    want = references[key].predict([(QUERY, d) for d in DOCS])
    best = list(np.argsort(-want, kind="stable")[:2])
    assert [r.index for r in got.results] == best
    assert close([r.relevance_score for r in got.results], want[best])
    tok = references[key].tokenizer
    limit = tiny_models.MAX_SEQ_LENGTH_V3 if key == "rerank_v3" else tiny_models.MAX_SEQ_LENGTH
    pairs = tok([QUERY] * len(DOCS), DOCS, truncation="longest_first", max_length=limit)["input_ids"]
    assert got.meta is not None and got.meta.tokens is not None
    assert got.meta.tokens.input_tokens == sum(len(ids) for ids in pairs)
    assert got.meta.api_version is not None and got.meta.api_version.version == "2"
    # max_tokens_per_doc is honoured (a one-token document per pair), not refused.
    cut = client.rerank(model=model, query=QUERY, documents=DOCS, max_tokens_per_doc=1)
    assert len(cut.results) == len(DOCS)
    q = len(tok(QUERY, add_special_tokens=False)["input_ids"])
    assert cut.meta.tokens.input_tokens == len(DOCS) * (q + 1 + tok.num_special_tokens_to_add(pair=True))


def test_cohere_v2_errors_are_typed(server):
    import cohere
    from cohere.errors import BadRequestError, NotFoundError

    client = cohere.ClientV2(api_key="unused", base_url=server.url, max_retries=0)
    with pytest.raises(NotFoundError):
        client.rerank(model="nope", query=QUERY, documents=DOCS)
    with pytest.raises(BadRequestError):
        client.rerank(model=RERANK_V3, query=QUERY, documents=DOCS, max_tokens_per_doc=0)
