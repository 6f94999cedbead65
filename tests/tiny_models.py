"""The tests' tiny, seeded, random models of ruri's architectures and tokenizers (``bench.random_models``
at ``TINY`` shape for ruri v1's BERT, ``TINY_V3`` for ruri v3's ModernBERT), with vocabularies made
from the Japanese text in ``tests/data/corpus_ja.txt``."""

from __future__ import annotations

from pathlib import Path

from bench import random_models

CORPUS = Path(__file__).parent / "data" / "corpus_ja.txt"
MAX_SEQ_LENGTH = random_models.TINY.max_seq_length  # small, so the tests exercise truncation
MAX_SEQ_LENGTH_V3 = random_models.TINY_V3.max_seq_length  # ruri v3's 8192
LOCAL_ATTENTION_V3 = random_models.TINY_V3.local_attention
LAYERS_V3 = random_models.TINY_V3.layers


def corpus() -> list[str]:
    return [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(folder: Path):
    return random_models.mecab_tokenizer(folder, corpus(), random_models.TINY)


def build_embedder(folder: Path) -> Path:
    return random_models.embedder(folder, corpus(), random_models.TINY, seed=0)


def build_reranker(folder: Path) -> Path:
    return random_models.reranker(folder, corpus(), random_models.TINY, seed=1, widen=20.0)


def build_embedder_v3(folder: Path) -> Path:
    return random_models.embedder(folder, corpus(), random_models.TINY_V3, seed=2)


def build_reranker_v3(folder: Path) -> Path:
    return random_models.reranker(folder, corpus(), random_models.TINY_V3, seed=3)
