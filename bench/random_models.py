"""Random-weight models of ruri's real architectures and tokenizers, built offline and seeded.

The tests' tiny models and the benchmarks' full-size ones both come from here, so they differ only in
their ``Shape``. Two architectures, as ruri has them:

- ``bert`` (ruri v1, e.g. cl-nagoya/ruri-large): BertModel + mean pooling in the sentence-transformers
  format, or BertForSequenceClassification with one label (cl-nagoya/ruri-reranker-large); the
  tokenizer is BertJapaneseTokenizer (MeCab + unidic-lite + WordPiece) with a vocabulary made from the
  given Japanese text: special tokens, every character alone and as a continuation piece (nothing in
  that text is [UNK], and WordPiece has real work to do on unknown words), then whole words by
  frequency, cut or filled with ``[unusedN]`` to the shape's vocabulary size.
- ``modernbert`` (ruri v3, e.g. cl-nagoya/ruri-v3-310m): ModernBertModel (rotary positions, attention
  over local windows with a global layer every third) + mean pooling, with ruri v3's prompts in its
  sentence-transformers config, or ModernBertForSequenceClassification with one label
  (cl-nagoya/ruri-v3-reranker-310m); the tokenizer is a SentencePiece-style fast tokenizer (NFKC,
  Metaspace, Unigram) trained on the given text, wrapping inputs in ``<s> … </s>`` and returning no
  token type ids, like ModernBERT-Ja's.
"""

from __future__ import annotations

import collections
import dataclasses
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# ModernBERT-Ja's special pieces, in its id order (<unk> 0, <s> 1, </s> 2, <pad> 3, ...).
SENTENCEPIECE_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<sep>", "<mask>", "<cls>"]
# ruri v3's prompts (config_sentence_transformers.json), by prompt name; no default prompt.
RURI_V3_PROMPTS = {"query": "検索クエリ: ", "document": "検索文書: ", "topic": "トピック: "}


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    positions: int
    max_seq_length: int
    vocab: int | None = None  # None: exactly the pieces (or, for BERT, words) the text yields
    arch: Literal["bert", "modernbert"] = "bert"
    local_attention: int = 128  # modernbert: the window of its local layers
    global_every: int = 3  # modernbert: every n-th layer (the first included) attends globally


TINY = Shape(hidden=32, layers=2, heads=2, intermediate=64, positions=128, max_seq_length=32)
RURI_LARGE = Shape(hidden=1024, layers=24, heads=16, intermediate=4096, positions=512, max_seq_length=512, vocab=32768)
# Three layers: one global, two local, so inputs over 128 tokens go through the sliding window.
TINY_V3 = Shape(hidden=32, layers=3, heads=2, intermediate=64, positions=8192, max_seq_length=8192, arch="modernbert")
RURI_V3_310M = Shape(
    hidden=768, layers=25, heads=12, intermediate=3072, positions=8192, max_seq_length=8192, vocab=102400, arch="modernbert"
)


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


def sentencepiece_tokenizer(folder: Path, texts: Sequence[str], shape: Shape):
    """A fast SentencePiece-style tokenizer trained on ``texts``, saved in ``folder`` (and returned).

    Unigram pieces on NFKC text with Metaspace word boundaries, as SentencePiece makes them; every
    character of the text is a piece, so nothing in it is <unk>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted({c for t in texts for c in unicodedata.normalize("NFKC", t)})
    trainer = trainers.UnigramTrainer(
        vocab_size=shape.vocab or max(2000, 2 * len(alphabet)),  # pieces beyond what the text yields are dropped
        special_tokens=SENTENCEPIECE_SPECIAL,
        unk_token="<unk>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> <s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        sep_token="<sep>",
        mask_token="<mask>",
        cls_token="<cls>",
        model_max_length=shape.max_seq_length,
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(folder))
    return fast


def tokenizer(folder: Path, texts: Sequence[str], shape: Shape):
    """The tokenizer of the shape's architecture, saved in ``folder``."""
    if shape.arch == "modernbert":
        return sentencepiece_tokenizer(folder, texts, shape)
    return mecab_tokenizer(folder, texts, shape)


def modernbert_config(shape: Shape, tok, **extra):
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=max(shape.vocab or 0, len(tok)),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.positions,
        local_attention=shape.local_attention,
        layer_types=["sliding_attention" if i % shape.global_every else "full_attention" for i in range(shape.layers)],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        **extra,
    )


def _encoder(shape: Shape, tok):
    if shape.arch == "modernbert":
        from transformers import ModernBertModel

        return ModernBertModel(modernbert_config(shape, tok))
    from transformers import BertModel

    return BertModel(bert_config(shape, len(tok)))


def _classifier(shape: Shape, tok):
    if shape.arch == "modernbert":
        from transformers import ModernBertForSequenceClassification

        return ModernBertForSequenceClassification(modernbert_config(shape, tok, num_labels=1, classifier_pooling="mean"))
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(bert_config(shape, len(tok), num_labels=1))


def embedder(folder: Path, texts: Sequence[str], shape: Shape, seed: int = 0) -> Path:
    """A sentence-transformers model (Transformer + mean Pooling); returns its directory. ModernBERT
    models carry ruri v3's prompts, as ruri-v3-310m does."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    hf_dir = folder / "hf"
    tok = tokenizer(hf_dir, texts, shape)
    torch.manual_seed(seed)
    _encoder(shape, tok).save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=shape.max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    prompts = RURI_V3_PROMPTS if shape.arch == "modernbert" else None
    st_dir = folder / "st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu", prompts=prompts).save(str(st_dir))
    return st_dir


def reranker(folder: Path, texts: Sequence[str], shape: Shape, seed: int = 1, widen: float = 1.0) -> Path:
    """A one-label cross-encoder; returns its directory. ``widen`` scales the random head, whose
    logits are otherwise all near 0 (scores near 0.5), so that tests see a meaningful order."""
    import torch

    tok = tokenizer(folder, texts, shape)
    torch.manual_seed(seed)
    model = _classifier(shape, tok)
    with torch.no_grad():
        model.classifier.weight.mul_(widen)
    model.save_pretrained(str(folder))
    return folder
