"""A random-weight model of cl-nagoya/ruri-large's exact shape, for benchmarks without the hub.

BertModel with 24 layers, hidden 1024, 16 heads, intermediate 4096, 512 positions, vocab 32768, mean
pooling; BertJapaneseTokenizer (MeCab + unidic-lite + WordPiece) with a vocabulary built from the
benchmark corpus and padded to 32768 entries. Same compute as the real model.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from .corpus import load as load_corpus

VOCAB = 32768
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build(folder: Path, corpus_path: Path | None = None, reranker: bool = False, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertJapaneseTokenizer, BertModel
    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    corpus = load_corpus(corpus_path)
    mecab = MecabTokenizer(mecab_dic="unidic_lite")
    words: collections.Counter[str] = collections.Counter()
    chars: set[str] = set()
    for text in corpus.short[:4000] + corpus.long[:1500]:
        words.update(mecab.tokenize(text))
        chars.update(text)
    ordered = sorted(chars)
    vocab = list(dict.fromkeys(SPECIAL + ordered + ["##" + c for c in ordered] + [w for w, _ in words.most_common()]))[:VOCAB]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertJapaneseTokenizer(str(hf / "vocab.txt"), word_tokenizer_type="mecab", subword_tokenizer_type="wordpiece",
                                mecab_kwargs={"mecab_dic": "unidic_lite"}, model_max_length=512)
    config = BertConfig(vocab_size=VOCAB, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config) if reranker else BertModel(config)
    model.save_pretrained(str(hf))
    tok.save_pretrained(str(hf))
    if reranker:
        return hf
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(hf), max_seq_length=512)
    st_dir = folder / "st"
    SentenceTransformer(modules=[transformer, Pooling(1024, pooling_mode="mean")], device="cpu").save(str(st_dir))
    return st_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--reranker", action="store_true")
    args = p.parse_args()
    print(build(args.folder, args.corpus, args.reranker))


if __name__ == "__main__":
    main()
