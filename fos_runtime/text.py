"""The one rule for text before any tokenizer sees it, and for text that says nothing.

MeCab (ruri v1's word splitter, through fugashi) reads C strings, so a NUL ends the text: the
sentence-transformers model itself embeds ``"テスト\\x00テスト"`` as ``"テスト"``, and other control
characters become ``[UNK]``. Text extracted from PDFs carries such characters where spaces or line
breaks were; the meaning is in the text around them. So every C0/C1 control character other than
tab, line feed and carriage return becomes a space, for every model and tokenizer alike.

A lone UTF-16 surrogate (JSON's ``"\\ud83d"``, left where a client cut a string inside an emoji) is no
character and has no UTF-8 form, so tokenizers and Triton's string tensors fail on it: it becomes U+FFFD, as a
UTF-8 decoder makes of bytes that are no character.

Format characters (zero-width space, BOM, joiners, soft hyphen) are kept: they can carry meaning
next to visible text. A text with nothing but whitespace, control and format characters has
nothing to embed and is refused by the caller.
"""

from __future__ import annotations

import re
import unicodedata

# Category Cc, less \t \n \r.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins pairs: what is left is lone
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def clean(text: str) -> str:
    """``text`` with each control character (NUL included) replaced by a space, each lone surrogate by U+FFFD."""
    return encodable(_CONTROL.sub(" ", text))


def encodable(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD: what UTF-8 (and so a JSON response) can carry."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)  # isascii: a flag, no scan


def blank(text: str) -> bool:
    """True if ``text`` has no visible character: only whitespace (U+3000 and NBSP included),
    control and format characters (U+200B, U+FEFF...), or nothing at all."""
    return all(c.isspace() or unicodedata.category(c) in _INVISIBLE for c in text)
