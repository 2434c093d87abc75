"""Text encodings of local data files: checking a recipe's data.encoding, and naming the likely encoding
(Korean, Japanese, Simplified or Traditional Chinese) of a file that does not decode, so that the fix is
one line of the recipe.

The likely encoding is only ever suggested in an error message, never applied: a wrong guess turns every
row into plausible-looking garbage that trains without a trace.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from training.data.scripts import (
    reads_as_japanese,
    reads_as_korean,
    reads_as_simplified_chinese,
    reads_as_traditional_chinese,
)

EXAMPLES = "utf-8, cp949, euc-kr, cp932, shift_jis, euc-jp, gb18030, cp950"

# JSON and CSV syntax, and the line breaks JSON Lines is split at as bytes, must be these very bytes.
_SYNTAX = '\n\r{}[]",:'

SAMPLE_LETTERS = 10_000  # enough to judge; scanning a whole large file letter by letter takes minutes
SAMPLE_BYTES = 1 << 20  # where misread looks for them: 2 bytes a common letter in these encodings
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def check_encoding(name: str) -> str:
    """`name` if it is a text encoding a JSON or CSV file can be in; ValueError naming what is allowed."""
    try:
        keeps_syntax = _SYNTAX.encode("ascii").decode(name) == _SYNTAX
    except LookupError:  # an unknown name, or a codec that is not a text encoding (base64, rot13)
        raise ValueError(f"not a text encoding Python knows; give a codec name such as {EXAMPLES}") from None
    except UnicodeDecodeError:
        keeps_syntax = False
    if not keeps_syntax:  # UTF-16 and UTF-32: two or four bytes per ASCII character
        raise ValueError(
            f"{name} writes ASCII characters as other bytes, which this reader does not support; save the file "
            f"as UTF-8, or give an ASCII-compatible encoding such as {EXAMPLES}"
        )
    return name


def codec_for(encoding: str | None) -> str:
    """The codec that decodes a file in `encoding` (None: the default, UTF-8)."""
    if encoding is None or codecs.lookup(encoding).name == "utf-8":
        # -sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise become part of
        # the first column's name ("\ufeffinstruction"), and every row would miss that column.
        return "utf-8-sig"
    return encoding


def encoding_label(encoding: str | None) -> str:
    return "UTF-8" if encoding is None else encoding


def _any_text(_: list[str]) -> bool:
    return True  # bytes that are valid UTF-8 are UTF-8 text, whatever the language


@dataclass(frozen=True)
class Candidate:
    codec: str
    language: str
    described: str  # who writes files in it, for the message
    reads_well: Callable[[list[str]], bool]  # are these letters, decoded with `codec`, its language?


# In order: a file is named by the first whose decoding of it reads well. CP949 before the Japanese
# codecs, since EUC-KR Hangul decodes as (kana-less) kanji in EUC-JP; the Chinese ones last, since GB18030
# and CP950 decode nearly any Korean or Japanese bytes into common hanzi (see _claimed_by).
# CP950 rather than Big5: it is what Excel on Traditional Chinese Windows writes, and it decodes every file
# Python's big5 does, and more (€, and 碁 and six other hanzi that big5 refuses; ～ where big5 reads ∼).
CANDIDATES = (
    Candidate("utf-8", "UTF-8", "the default", _any_text),
    Candidate(
        "cp949",
        "Korean",
        "Korean: EUC-KR or its superset CP949, e.g. Excel on Korean Windows",
        reads_as_korean,
    ),
    Candidate("cp932", "Japanese", "Japanese Shift-JIS, e.g. Excel on Japanese Windows", reads_as_japanese),
    Candidate("euc-jp", "Japanese", "Japanese EUC-JP, e.g. older Unix and web exports", reads_as_japanese),
    Candidate(
        "gb18030",
        "Simplified Chinese",
        "Simplified Chinese: GB2312, GBK or their superset GB18030, e.g. Excel on Simplified Chinese Windows",
        reads_as_simplified_chinese,
    ),
    Candidate(
        "cp950",
        "Traditional Chinese",
        "Traditional Chinese: Big5 as Windows writes it, e.g. Excel on Traditional Chinese Windows",
        reads_as_traditional_chinese,
    ),
)


def likely_encoding(data: bytes, failed: str | None) -> Candidate | None:
    """The first candidate, other than the encoding `data` failed to decode in, that decodes all of it
    into text of its language; None if none does."""
    failed_codec = codecs.lookup(encoding_label(failed)).name
    for candidate in CANDIDATES:
        if codecs.lookup(candidate.codec).name == failed_codec:
            continue
        try:
            text = data.decode(candidate.codec)
        except UnicodeDecodeError:
            continue
        if candidate.reads_well(_letters(text)) and _claimed_by(data, candidate) is None:
            return candidate
    return None


def _claimed_by(data: bytes, candidate: Candidate) -> Candidate | None:
    """The legacy candidate before `candidate` whose language `data` is, although `candidate` reads it as
    its own; None if there is none.

    EUC-KR's 2,350 Hangul are, byte for byte, GB2312's first 2,350 hanzi (대한 reads as 措茄 in GB18030), and
    EUC-JP's kana are Big5's most common hanzi (ありがとう reads as 丐曰互午丹 in CP950): bytes that read as
    Korean or Japanese are that. Chinese reads as neither: it has no kana, and GBK read as CP949 is only
    about 70% common Hangul (the rest Hanja and rare syllables) where it decodes at all. The earlier
    reading is lenient, so that one stray byte does not make a Korean file Chinese, but counts each byte
    that does not decode against it: Big5's hanzi with a trail byte below 0xA1 (two in five of its codes)
    do not decode in EUC-JP, and the rest read as kana and kanji."""
    earlier = CANDIDATES[1 : CANDIDATES.index(candidate)]  # not UTF-8: bytes that are not UTF-8 are not it
    for other in earlier:
        if other.language != candidate.language and other.reads_well(
            _letters(_start(data, other.codec, errors="replace"))
        ):
            return other
    return None


def _letters(text: str) -> list[str]:
    """The first non-ASCII letters of `text` (punctuation and symbols are in every script), each U+FFFD
    a byte that did not decode in a lenient reading: a letter in no script."""
    found = (m[0] for m in _NON_ASCII.finditer(text) if m[0].isalpha() or m[0] == "\ufffd")
    return list(itertools.islice(found, SAMPLE_LETTERS))


def encoding_advice(data: bytes, failed: str | None, key: str = "data.encoding") -> str:
    """What to do about `data` that is not text in the `failed` encoding (None: UTF-8), for an error; `key`
    is the recipe key the encoding comes from."""
    candidate = likely_encoding(data, failed)
    if candidate is None:
        if failed is None:
            return f"save the file as UTF-8, or set {key} to the encoding it is in (e.g. {EXAMPLES})"
        return f"check {key} ({failed}), or save the file as UTF-8"
    fix = (
        f"it decodes as {candidate.codec} ({candidate.described}): set {key}: {candidate.codec} in the recipe"
    )
    return fix if candidate.codec == "utf-8" else f"{fix}, or save the file as UTF-8"


# The language each legacy codec is for (Python's canonical codec names), so that a file that decodes
# without an error in the data.encoding a recipe gives can still be told to be another one's.
_LANGUAGE_OF = {
    **dict.fromkeys(("cp949", "euc_kr", "johab"), "Korean"),
    **dict.fromkeys(
        ("cp932", "shift_jis", "shift_jis_2004", "shift_jisx0213", "euc_jp", "euc_jis_2004", "euc_jisx0213"),
        "Japanese",
    ),
    **dict.fromkeys(("gb2312", "gbk", "gb18030"), "Simplified Chinese"),
    **dict.fromkeys(("big5", "cp950", "big5hkscs"), "Traditional Chinese"),
}


def misread(data: bytes, encoding: str, key: str = "data.encoding") -> str | None:
    """Why `data` is not text in `encoding` although it decodes in it without an error (EUC-KR bytes
    decode in EUC-JP as kanji, and in GB18030 as common hanzi), for an error; None when it reads as
    `encoding`'s language and no language before it claims it (_claimed_by), or when no other encoding
    reads it better.

    Checked only where the encoding is given: a wrong one would otherwise train on garbage."""
    language = _LANGUAGE_OF.get(codecs.lookup(encoding).name)
    if language is None:
        return None
    try:
        letters = _letters(_start(data, encoding))
    except UnicodeDecodeError:
        return None  # said row by row, or as the file's error, where it is read
    if not letters:
        return None
    own = next(c for c in CANDIDATES if c.language == language)
    if own.reads_well(letters):
        candidate = _claimed_by(data, own)
        if candidate is None:
            return None
        return (
            f"decodes in {key} {encoding} without an error, but reads as {candidate.language} text in "
            f"{candidate.codec} as well, and a file that reads as both is taken to be {candidate.language}: set "
            f"{key}: {candidate.codec} in the recipe ({candidate.described}); if it is {language}, "
            "save it as UTF-8"
        )
    candidate = likely_encoding(data, encoding)
    if candidate is None:
        return None
    return (
        f"decodes in {key} {encoding} without an error, but not into {language} text; it decodes as "
        f"{candidate.codec} ({candidate.described}): set {key}: {candidate.codec} in the recipe"
    )


def _start(data: bytes, codec: str, errors: str = "strict") -> str:
    """The file's start, decoded: it holds the letters judged by (SAMPLE_LETTERS), while the reader decodes
    all of the file. An incremental decoder leaves a character the sample cuts in two undecoded, not an
    error."""
    return codecs.getincrementaldecoder(codec)(errors).decode(data[:SAMPLE_BYTES])
