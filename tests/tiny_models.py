"""Tiny, seeded, random models of ruri's real architecture and tokenizer, built offline.

- embed: BertModel + mean pooling in the sentence-transformers format (like cl-nagoya/ruri-large);
- rerank: BertForSequenceClassification with one label (like cl-nagoya/ruri-reranker-large).
Both use BertJapaneseTokenizer (MeCab + unidic-lite + WordPiece) with a vocabulary made from the
Japanese text in ``tests/data/corpus_ja.txt``.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus_ja.txt"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_SEQ_LENGTH = 32  # small, so the tests exercise truncation


def corpus() -> list[str]:
    return [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(folder: Path):
    from transformers import BertJapaneseTokenizer
    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    mecab = MecabTokenizer(mecab_dic="unidic_lite")
    words: list[str] = []
    chars: set[str] = set()
    for line in corpus():
        words.extend(mecab.tokenize(line))
        chars.update(line)
    # Whole words, then every character alone and as a continuation piece, so nothing is [UNK]
    # within the corpus and WordPiece has real work to do on words it does not know.
    ordered = sorted(chars)
    vocab = list(dict.fromkeys(SPECIAL + words + ordered + ["##" + c for c in ordered]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertJapaneseTokenizer(
        str(folder / "vocab.txt"),
        word_tokenizer_type="mecab",
        subword_tokenizer_type="wordpiece",
        mecab_kwargs={"mecab_dic": "unidic_lite"},
        model_max_length=MAX_SEQ_LENGTH,
    )
    return tok


def _bert_config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **extra,
    )


def build_embedder(folder: Path, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertModel

    torch.manual_seed(seed)
    hf_dir = folder / "hf"
    tok = build_tokenizer(hf_dir)
    BertModel(_bert_config(len(tok))).save_pretrained(str(hf_dir))
    tok.save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=MAX_SEQ_LENGTH)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    st_dir = folder / "st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(st_dir))
    return st_dir


def build_reranker(folder: Path, seed: int = 1) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tok = build_tokenizer(folder)
    model = BertForSequenceClassification(_bert_config(len(tok), num_labels=1))
    # Random heads give logits near 0 and scores near 0.5; widen them so ordering is meaningful.
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
