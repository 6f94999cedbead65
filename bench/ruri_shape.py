"""A random-weight model of cl-nagoya/ruri-large's exact shape (``random_models.RURI_LARGE``), for
benchmarks without the hub: BertModel with 24 layers, hidden 1024, 16 heads, intermediate 4096, 512
positions, vocab 32768, mean pooling; BertJapaneseTokenizer with a vocabulary built from the benchmark
corpus. Same compute as the real model; ``--reranker`` gives the cross-encoder of the same shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import random_models
from .corpus import load as load_corpus

SHAPES = {"ruri-large": random_models.RURI_LARGE, "tiny": random_models.TINY}


def build(
    folder: Path, corpus_path: Path | None = None, reranker: bool = False, seed: int = 0, shape: str = "ruri-large"
) -> Path:
    corpus = load_corpus(corpus_path)
    texts = corpus.short[:4000] + corpus.long[:1500]
    if reranker:
        return random_models.reranker(folder / "hf", texts, SHAPES[shape], seed=seed)
    return random_models.embedder(folder, texts, SHAPES[shape], seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--reranker", action="store_true")
    p.add_argument("--shape", choices=SHAPES, default="ruri-large", help="tiny: to try a script out quickly")
    args = p.parse_args()
    print(build(args.folder, args.corpus, args.reranker, shape=args.shape))


if __name__ == "__main__":
    main()
