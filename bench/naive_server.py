"""The baseline users run today: sentence-transformers in a plain synchronous FastAPI app.

One worker, ``encode`` / ``predict`` per request, no batching across requests; fp32 on the CPU, or fp16 on a
GPU (``--device cuda``), as a user would run it there.
"""

import argparse


def create_app(embed_dir: str | None, rerank_dir: str | None, name_embed: str, name_rerank: str, device: str = "cpu"):
    from fastapi import FastAPI
    from pydantic import BaseModel

    app = FastAPI()
    embedder = reranker = None
    if embed_dir:
        from sentence_transformers import SentenceTransformer

        embedder = SentenceTransformer(embed_dir, device=device)
        if device != "cpu":
            embedder.half()
    if rerank_dir:
        from sentence_transformers import CrossEncoder

        reranker = CrossEncoder(rerank_dir, device=device)
        if device != "cpu":
            reranker.model.half()

    class EmbeddingRequest(BaseModel):
        input: str | list[str]
        model: str | None = None

    class RerankRequest(BaseModel):
        query: str
        documents: list[str]
        model: str | None = None
        top_n: int | None = None

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest):
        texts = [req.input] if isinstance(req.input, str) else req.input
        assert embedder is not None, "started without --embed"
        vectors = embedder.encode(texts, normalize_embeddings=True)
        return {
            "object": "list",
            "model": name_embed,
            "data": [{"object": "embedding", "embedding": v.tolist(), "index": i} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    @app.post("/v1/rerank")
    def rerank(req: RerankRequest):
        assert reranker is not None, "started without --rerank"
        scores = reranker.predict([(req.query, d) for d in req.documents])
        order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[: req.top_n or len(scores)]
        return {"model": name_rerank, "results": [{"index": i, "relevance_score": float(scores[i])} for i in order]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--embed")
    p.add_argument("--rerank")
    p.add_argument("--embed-name", default="cl-nagoya/ruri-large")
    p.add_argument("--rerank-name", default="cl-nagoya/ruri-reranker-large")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (fp16)")
    args = p.parse_args()
    uvicorn.run(
        create_app(args.embed, args.rerank, args.embed_name, args.rerank_name, args.device),
        host="127.0.0.1",
        port=args.port,
        workers=1,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
