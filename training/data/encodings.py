"""Text encodings of local data files: checking a recipe's data.encoding, and naming the likely encoding
of a file that does not decode, so that the fix is one line of the recipe.

The likely encoding is only ever suggested in an error message, never applied: a wrong guess turns every
row into plausible-looking garbage that trains without a trace.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

EXAMPLES = "utf-8, cp949, euc-kr, cp932, shift_jis, euc-jp"

# JSON and CSV syntax, and the line breaks JSON Lines is split at as bytes, must be these very bytes.
_SYNTAX = '\n\r{}[]",:'

# The 2,350 syllables of KS X 1001 (EUC-KR) cover nearly all Korean text. The 8,822 others that CP949
# adds are where Shift-JIS bytes land when read as CP949 (ありがとう reads as 궇귟궕궴궎), so only these
# count as Korean.
_COMMON_HANGUL = frozenset(
    bytes([lead, trail]).decode("cp949") for lead in range(0xB0, 0xC9) for trail in range(0xA1, 0xFF)
)
_KANA = re.compile(r"[\u3040-\u30ff]")  # hiragana and full-width katakana
_KANJI = re.compile(r"[\u4e00-\u9fff]")

# A decoded text reads as its language when this share of its non-ASCII letters is in that language's
# script. Misread bytes land in other scripts (half-width katakana, rare Hangul, jamo) for the most part.
PLAUSIBLE_SHARE = 0.8
SAMPLE_LETTERS = 10_000  # enough to judge; scanning a whole large file letter by letter takes minutes
SAMPLE_BYTES = 1 << 20  # where misread looks for them: at most 2 bytes a letter in these encodings
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


def _reads_as_korean(letters: list[str]) -> bool:
    return bool(letters) and sum(ch in _COMMON_HANGUL for ch in letters) >= PLAUSIBLE_SHARE * len(letters)


def _reads_as_japanese(letters: list[str]) -> bool:
    kana = sum(bool(_KANA.match(ch)) for ch in letters)
    kanji = sum(bool(_KANJI.match(ch)) for ch in letters)
    # Japanese is written with kana between its kanji. Kanji alone are what EUC-KR Hangul and Latin-1
    # accents read as in EUC-JP and Shift-JIS (대한 reads as 企廃).
    return bool(letters) and kana + kanji >= PLAUSIBLE_SHARE * len(letters) and kana >= 0.1 * len(letters)


def _any_text(_: list[str]) -> bool:
    return True  # bytes that are valid UTF-8 are UTF-8 text, whatever the language


@dataclass(frozen=True)
class Candidate:
    codec: str
    described: str  # who writes files in it, for the message
    reads_well: Callable[[list[str]], bool]  # are these letters, decoded with `codec`, its language?


# In order: a file is named by the first whose decoding of it reads well. CP949 before the Japanese
# codecs, since EUC-KR Hangul decodes as (kana-less) kanji in EUC-JP.
CANDIDATES = (
    Candidate("utf-8", "the default", _any_text),
    Candidate(
        "cp949", "Korean: EUC-KR or its superset CP949, e.g. Excel on Korean Windows", _reads_as_korean
    ),
    Candidate("cp932", "Japanese Shift-JIS, e.g. Excel on Japanese Windows", _reads_as_japanese),
    Candidate("euc-jp", "Japanese EUC-JP, e.g. older Unix and web exports", _reads_as_japanese),
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
        if candidate.reads_well(_letters(text)):
            return candidate
    return None


def _letters(text: str) -> list[str]:
    """The first non-ASCII letters of `text` (punctuation and symbols are in every script)."""
    found = (m[0] for m in _NON_ASCII.finditer(text) if m[0].isalpha())
    return list(itertools.islice(found, SAMPLE_LETTERS))


def encoding_advice(data: bytes, failed: str | None) -> str:
    """What to do about `data` that is not text in the `failed` encoding (None: UTF-8), for an error."""
    candidate = likely_encoding(data, failed)
    if candidate is None:
        if failed is None:
            return f"save the file as UTF-8, or set data.encoding to the encoding it is in (e.g. {EXAMPLES})"
        return f"check data.encoding ({failed}), or save the file as UTF-8"
    fix = f"it decodes as {candidate.codec} ({candidate.described}): set data.encoding: {candidate.codec} in the recipe"
    return fix if candidate.codec == "utf-8" else f"{fix}, or save the file as UTF-8"


# The language each Korean or Japanese codec is for (Python's canonical codec names), so that a file that
# decodes without an error in the data.encoding a recipe gives can still be told to be another one's.
_LANGUAGE_OF = {
    **dict.fromkeys(("cp949", "euc_kr", "johab"), ("Korean", _reads_as_korean)),
    **dict.fromkeys(
        ("cp932", "shift_jis", "shift_jis_2004", "shift_jisx0213", "euc_jp", "euc_jis_2004", "euc_jisx0213"),
        ("Japanese", _reads_as_japanese),
    ),
}


def misread(data: bytes, encoding: str) -> str | None:
    """Why `data` is not text in `encoding` although it decodes in it without an error (EUC-KR bytes
    decode in EUC-JP as kanji), for an error; None when it reads as `encoding`'s language, or when no
    other encoding reads it better.

    Checked only where the encoding is given: a wrong one would otherwise train on garbage."""
    language = _LANGUAGE_OF.get(codecs.lookup(encoding).name)
    if language is None:
        return None
    name, reads_well = language
    try:
        # The file's start holds the letters judged by (SAMPLE_LETTERS); the reader decodes all of it.
        # An incremental decoder leaves a character the sample cuts in two undecoded, not an error.
        sample = codecs.getincrementaldecoder(encoding)().decode(data[:SAMPLE_BYTES])
    except UnicodeDecodeError:
        return None  # said row by row, or as the file's error, where it is read
    letters = _letters(sample)
    if not letters or reads_well(letters):
        return None
    candidate = likely_encoding(data, encoding)
    if candidate is None:
        return None
    return (
        f"decodes in data.encoding {encoding} without an error, but not into {name} text; it decodes as "
        f"{candidate.codec} ({candidate.described}): set data.encoding: {candidate.codec} in the recipe"
    )
