"""Tokenize, truncate and count: the single implementation used by Triton's tokenizer model, the
embedded backend and export's parity check.

The tokenizer is called exactly as sentence-transformers calls it (``truncation="longest_first"``,
``max_length``), one sequence per input, so token counts are real and padding (``padding``) is ours to choose.
Text first goes through ``text.clean``, which sentence-transformers does not do: its MeCab tokenizer
drops everything after a NUL.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from . import spec, text

# MeCab groups a run of unknown characters of one kind at every position of the run: its time grows with the square of
# the run (50,000 'a' took 1.3 s here, under the tokenizer's lock, so every other request waited). A text past
# max_length x this many characters is cut to that before MeCab: it yields more tokens than fit unless its words
# average more than this many characters, and those beyond max_length are cut anyway.
MECAB_CHARS_PER_TOKEN = 32
# What MeCab skips, in linear time and with no token (its SPACE class, after the tokenizer's NFKC): not counted
# toward that cut, so that text padded with spaces or blank lines (PDF extractions) keeps the words after them. A
# carriage return is not one: 50,000 of them took 2.1 s, as many 'a' 2.4 s.
_MECAB_SKIPS = re.compile("[ \t\n\x0b\xa0\u2000-\u200a\u202f\u205f\u3000]+")


def mecab_cut(t: str, limit: int) -> str:
    """``t`` up to its ``limit``-th character that MeCab does not skip; all of it if it has no more."""
    if len(t) <= limit:
        return t
    counted = start = 0
    for skipped in _MECAB_SKIPS.finditer(t):
        run = skipped.start() - start
        if counted + run > limit:
            break
        counted += run
        start = skipped.end()
    return t[: start + (limit - counted)]


@dataclasses.dataclass
class Encoded:
    """Unpadded token sequences, one per input, in input order."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    # Per input: was it cut to the model's context? None: not asked (or nothing was cut).
    truncated: list[bool] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def subset(self, indices: Sequence[int]) -> Encoded:
        """These inputs, in this order."""
        types, flags = self.token_type_ids, self.truncated
        return Encoded(
            input_ids=[self.input_ids[i] for i in indices],
            token_type_ids=[types[i] for i in indices] if types is not None else None,
            truncated=[flags[i] for i in indices] if flags is not None else None,
        )

    @property
    def cut(self) -> list[bool]:
        """``truncated`` with one flag per input; False where it was not asked for."""
        return self.truncated if self.truncated is not None else [False] * len(self.input_ids)


def _not_overflow_notice(record: logging.LogRecord) -> bool:
    # transformers warns on every pair it truncates that it does not return the cut tokens; we never
    # ask for them, and a reranker fed long documents would log it on every request.
    return not record.getMessage().startswith("Be aware, overflowing tokens are not returned")


class Tokenizer:
    def __init__(self, path: str | Path, max_length: int):
        from transformers import AutoTokenizer

        for name in ("transformers.tokenization_python", "transformers.tokenization_utils_base"):
            log = logging.getLogger(name)
            if _not_overflow_notice not in log.filters:
                log.addFilter(_not_overflow_notice)

        self.hf = AutoTokenizer.from_pretrained(str(path))
        # MeCab's tagger (fugashi) is not thread-safe: two threads in it at once corrupt its state and
        # return None. The embedded backend calls each tokenizer from one thread of its own, so the lock is
        # free there; it guards any other caller.
        self._lock = threading.Lock()
        self.max_length = max_length
        self.returns_token_types = spec.TOKEN_TYPE_IDS in self.hf.model_input_names

    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        detect_truncation: bool = False,
        max_pair_tokens: int | None = None,
    ) -> Encoded:
        """``detect_truncation`` also tells which inputs were cut; it tokenizes those a second time, so
        it is asked for only by requests that refuse truncation. ``max_pair_tokens`` first cuts each
        pair's second text (a reranked document) to that many tokens (Cohere's max_tokens_per_doc), a
        cut the client asked for and so never reported as truncation."""
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        texts = [text.clean(t) for t in texts]  # a NUL would end the text for MeCab
        pairs = [text.clean(t) for t in pairs] if pairs is not None else None
        cap = max_pair_tokens if pairs is not None else None
        # Fast (Rust) tokenizers take linear time: only the Python ones (MeCab) are cut.
        limit = None if self.hf.is_fast else self.max_length * MECAB_CHARS_PER_TOKEN
        cut = [False] * len(texts)
        if limit is not None:
            kept = [mecab_cut(t, limit) for t in texts]
            cut = [len(k) < len(t) for k, t in zip(kept, texts, strict=True)]
            texts = kept
            if pairs is not None:
                kept = [mecab_cut(p, limit) for p in pairs]
                # A document cut to max_tokens_per_doc was asked for, and is not a truncation.
                cut = [c or (cap is None and len(k) < len(p)) for c, k, p in zip(cut, kept, pairs, strict=True)]
                pairs = kept
        out = self._call(texts, pairs, self.max_length, cap)
        types = out.get(spec.TOKEN_TYPE_IDS)
        encoded = Encoded(input_ids=list(out[spec.INPUT_IDS]), token_type_ids=list(types) if types is not None else None)
        if detect_truncation:
            found = self._truncated(texts, pairs, encoded.lengths, cap)
            encoded.truncated = [a or b for a, b in zip(found, cut, strict=True)]
        return encoded

    def _call(self, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int, cap: int | None = None):
        with self._lock:
            # Fast tokenizers' pairs too: their own truncation pairs every overflowing part of one text with every
            # part of the other, 1.1 GB and 2.6 s for two texts of 50,000 tokens at 8,192, more than 6 GB at 512.
            if pairs is not None and (cap is not None or self.hf.is_fast):
                return self._capped_pairs(texts, pairs, max_length, cap)
            return self.hf(
                list(texts),
                list(pairs) if pairs is not None else None,
                truncation="longest_first",
                max_length=max_length,
                padding=False,
            )

    def _capped_pairs(self, texts: Sequence[str], pairs: Sequence[str], max_length: int, cap: int | None) -> dict:
        """Pairs whose second text is cut to ``cap`` tokens (None: not cut), then fitted to ``max_length`` as the
        plain call fits them. Each text is tokenized alone, as the tokenizer does within a pair, so the
        tokens are those of the plain call whenever nothing is cut. A fast tokenizer's texts are first cut to
        ``max_length`` tokens each, all that a pair can keep of one (``_first_tokens``)."""
        if not self.hf.is_fast:  # Python tokenizers (BertJapaneseTokenizer) build pairs from ids
            rows = [
                self.hf.prepare_for_model(
                    self._ids(a),
                    self._ids(b)[:cap] if cap is not None else self._ids(b),
                    truncation="longest_first",
                    max_length=max_length,
                    verbose=False,
                )
                for a, b in zip(texts, pairs, strict=True)
            ]
            return {key: [row[key] for row in rows] for key in rows[0].keys()} if rows else {spec.INPUT_IDS: []}
        backend = self.hf.backend_tokenizer
        # A tokenizer.json may set truncation or padding; both would apply to the parts and again to the pair.
        before, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            firsts = backend.encode_batch(list(texts), add_special_tokens=False)
            seconds = backend.encode_batch(list(pairs), add_special_tokens=False)
            if self.hf.truncation_side == "right":  # a pair keeps at most a text's first max_length tokens
                firsts = [_first_tokens(backend, a, text, max_length) for a, text in zip(firsts, texts, strict=True)]
                keep = min(cap, max_length) if cap is not None else max_length
                seconds = [_first_tokens(backend, b, text, keep) for b, text in zip(seconds, pairs, strict=True)]
            elif cap is not None:
                seconds = [_first_tokens(backend, b, text, cap) for b, text in zip(seconds, pairs, strict=True)]
            backend.enable_truncation(max_length, strategy="longest_first", direction=self.hf.truncation_side)
            encodings = [backend.post_process(a, b, add_special_tokens=True) for a, b in zip(firsts, seconds, strict=True)]
        finally:
            if before is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**before)
            if padding is not None:
                backend.enable_padding(**padding)
        out = {spec.INPUT_IDS: [e.ids for e in encodings]}
        if self.returns_token_types:
            out[spec.TOKEN_TYPE_IDS] = [e.type_ids for e in encodings]
        return out

    def _ids(self, text: str) -> list[int]:
        """A text's tokens without special tokens, as a Python tokenizer makes them within a pair."""
        return cast(list[int], self.hf.convert_tokens_to_ids(self.hf.tokenize(text)))

    def _truncated(
        self, texts: Sequence[str], pairs: Sequence[str] | None, lengths: list[int], cap: int | None = None
    ) -> list[bool]:
        """Only an input that came out exactly max_length long can have been cut; tokenizing those
        again with room for one more token tells which were (a pair is cut to exactly max_length too)."""
        full = [i for i, n in enumerate(lengths) if n >= self.max_length]
        truncated = [False] * len(lengths)
        if full:
            again = self._call(
                [texts[i] for i in full], [pairs[i] for i in full] if pairs is not None else None, self.max_length + 1, cap
            )
            for i, ids in zip(full, again[spec.INPUT_IDS], strict=True):
                truncated[i] = len(ids) > self.max_length
        return truncated


def _first_tokens(backend, encoding, text: str, cap: int):
    """``encoding`` (of ``text``, no special tokens) cut to its first ``cap`` tokens, with few overflowing parts.

    A cut keeps the rest as overflowing parts of ``cap`` tokens each, and a pair's post-processing pairs every one of
    them with a copy of the other text's: 40,000 tokens cut to 7, beside an 8,192-token query, took 24 GB and the
    server with it (review). So the text itself is cut just past its ``cap``-th token and tokenized again, which keeps
    the same first tokens (checked; with more of the text where its end would tokenize otherwise)."""
    if len(encoding) <= cap:
        return encoding
    want = encoding.ids[:cap]
    for extra in (0, 16, 256):
        end = encoding.offsets[min(cap - 1 + extra, len(encoding) - 1)][1]
        cut = backend.encode(text[:end], add_special_tokens=False)
        if cut.ids[:cap] == want:
            break
    else:  # never seen: the whole text, as before (exact, and costly only for a long one)
        cut = encoding
    cut.truncate(cap)
    return cut


def truncate_ids(sequences: Sequence[Sequence[int]], max_length: int, end_token_id: int | None = None) -> Encoded:
    """Token-id input (the OpenAI API's list of ints): taken as the full sequence, cut to max_length. A sequence that
    ends with the tokenizer's closing special token (``end_token_id``: [SEP], </s>) keeps it, as the tokenizer's own
    truncation does: cut without it, the client's ids of a long text embedded unlike the text."""

    def cut(seq: Sequence[int]) -> list[int]:
        if len(seq) <= max_length:
            return list(seq)
        if end_token_id is not None and seq[-1] == end_token_id and max_length > 1:
            return [*seq[: max_length - 1], end_token_id]
        return list(seq[:max_length])

    return Encoded(input_ids=[cut(s) for s in sequences], truncated=[len(s) > max_length for s in sequences])
