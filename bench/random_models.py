"""Random-weight models of ruri's real architectures and tokenizers, built offline and seeded.

The tests' tiny models and the benchmarks' full-size ones both come from here, so they differ only in
their ``Shape``:

- embed: BertModel + mean pooling in the sentence-transformers format (like cl-nagoya/ruri-large);
- rerank: BertForSequenceClassification with one label (like cl-nagoya/ruri-reranker-large);
- tokenizer: BertJapaneseTokenizer (MeCab + unidic-lite + WordPiece) with a vocabulary made from the
  given Japanese text: special tokens, every character alone and as a continuation piece (nothing in
  that text is [UNK], and WordPiece has real work to do on unknown words), then whole words by
  frequency, cut or filled with ``[unusedN]`` to the shape's vocabulary size.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    positions: int
    max_seq_length: int
    vocab: int | None = None  # None: exactly the pieces the text yields


TINY = Shape(hidden=32, layers=2, heads=2, intermediate=64, positions=128, max_seq_length=32)
RURI_LARGE = Shape(hidden=1024, layers=24, heads=16, intermediate=4096, positions=512, max_seq_length=512, vocab=32768)


def mecab_vocabulary(texts: Sequence[str], size: int | None = None) -> list[str]:
    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    mecab = MecabTokenizer(mecab_dic="unidic_lite")
    words: collections.Counter[str] = collections.Counter()
    chars: set[str] = set()
    for text in texts:
        words.update(mecab.tokenize(text))
        chars.update(text)
    ordered = sorted(chars)
    vocab = list(dict.fromkeys(SPECIAL + ordered + ["##" + c for c in ordered] + [w for w, _ in words.most_common()]))
    if size is not None:
        vocab = vocab[:size] + [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


def mecab_tokenizer(folder: Path, texts: Sequence[str], shape: Shape):
    """A BertJapaneseTokenizer saved in ``folder`` (and returned)."""
    from transformers import BertJapaneseTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(mecab_vocabulary(texts, shape.vocab)) + "\n", encoding="utf-8")
    tok = BertJapaneseTokenizer(
        str(folder / "vocab.txt"),
        word_tokenizer_type="mecab",
        subword_tokenizer_type="wordpiece",
        mecab_kwargs={"mecab_dic": "unidic_lite"},
        model_max_length=shape.max_seq_length,
    )
    tok.save_pretrained(str(folder))
    return tok


def bert_config(shape: Shape, vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.positions,
        **extra,
    )


def embedder(folder: Path, texts: Sequence[str], shape: Shape, seed: int = 0) -> Path:
    """A sentence-transformers model (Transformer + mean Pooling); returns its directory."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertModel

    hf_dir = folder / "hf"
    tok = mecab_tokenizer(hf_dir, texts, shape)
    torch.manual_seed(seed)
    BertModel(bert_config(shape, len(tok))).save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=shape.max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    st_dir = folder / "st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(st_dir))
    return st_dir


def reranker(folder: Path, texts: Sequence[str], shape: Shape, seed: int = 1, widen: float = 1.0) -> Path:
    """A one-label cross-encoder; returns its directory. ``widen`` scales the random head, whose
    logits are otherwise all near 0 (scores near 0.5), so that tests see a meaningful order."""
    import torch
    from transformers import BertForSequenceClassification

    tok = mecab_tokenizer(folder, texts, shape)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(shape, len(tok), num_labels=1))
    with torch.no_grad():
        model.classifier.weight.mul_(widen)
    model.save_pretrained(str(folder))
    return folder
