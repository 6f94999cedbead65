"""The tests' tiny, seeded, random models of ruri's architecture and tokenizer (``bench.random_models``
at ``TINY`` shape), with a vocabulary made from the Japanese text in ``tests/data/corpus_ja.txt``."""

from __future__ import annotations

from pathlib import Path

from bench import random_models

CORPUS = Path(__file__).parent / "data" / "corpus_ja.txt"
MAX_SEQ_LENGTH = random_models.TINY.max_seq_length  # small, so the tests exercise truncation


def corpus() -> list[str]:
    return [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(folder: Path):
    return random_models.mecab_tokenizer(folder, corpus(), random_models.TINY)


def build_embedder(folder: Path) -> Path:
    return random_models.embedder(folder, corpus(), random_models.TINY, seed=0)


def build_reranker(folder: Path) -> Path:
    return random_models.reranker(folder, corpus(), random_models.TINY, seed=1, widen=20.0)
