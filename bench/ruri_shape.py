"""Random-weight models of ruri's exact shapes, for benchmarks without the hub: cl-nagoya/ruri-large
(``random_models.RURI_LARGE``: BertModel with 24 layers, hidden 1024, 16 heads, intermediate 4096,
512 positions, vocab 32768, mean pooling; BertJapaneseTokenizer with a vocabulary built from the
benchmark corpus) or, with ``--v3``, cl-nagoya/ruri-v3-310m (``random_models.RURI_V3_310M``:
ModernBertModel with 25 layers, hidden 768, 12 heads, intermediate 3072, 8192 positions, local
attention over 128 tokens with a global layer every third, vocab 102400; a SentencePiece-style
tokenizer trained on the corpus). Same compute as the real models; ``--reranker`` gives the
cross-encoder of the same shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import random_models
from .corpus import load as load_corpus

# (ruri v1, ruri v3) shapes by size: "full" is the real models' compute, "tiny" only tries a script out.
SHAPES = {"full": (random_models.RURI_LARGE, random_models.RURI_V3_310M), "tiny": (random_models.TINY, random_models.TINY_V3)}


def build(
    folder: Path,
    corpus_path: Path | None = None,
    reranker: bool = False,
    seed: int = 0,
    size: str = "full",
    v3: bool = False,
) -> Path:
    corpus = load_corpus(corpus_path)
    texts = corpus.short[:4000] + corpus.long[:1500]
    shape = SHAPES[size][1 if v3 else 0]
    if reranker:
        return random_models.reranker(folder / "hf", texts, shape, seed=seed)
    return random_models.embedder(folder, texts, shape, seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--reranker", action="store_true")
    p.add_argument("--size", choices=SHAPES, default="full", help="tiny: to try a script out quickly")
    p.add_argument("--v3", action="store_true", help="ruri-v3-310m's shape instead of ruri-large's")
    args = p.parse_args()
    print(build(args.folder, args.corpus, args.reranker, size=args.size, v3=args.v3))


if __name__ == "__main__":
    main()
