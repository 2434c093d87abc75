"""Which script decoded letters are in: whether the non-ASCII letters of a file, decoded in some encoding,
read as Korean, Japanese, Simplified or Traditional Chinese. The common characters of each are taken from
the standards' own layout (the rows of KS X 1001, GB2312 and Big5) through Python's codecs, not typed in."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable


def _decoded(codec: str, codes: Iterable[bytes]) -> frozenset[str]:
    """The characters the two-byte `codes` stand for in `codec`."""
    chars = set()
    for code in codes:
        # A code may be left unassigned, as at the end of GB2312's row 55.
        with contextlib.suppress(UnicodeDecodeError):
            chars.add(code.decode(codec))
    return frozenset(chars)


def _two_byte(leads: range, trails: Iterable[int]) -> list[bytes]:
    return [bytes(code) for code in itertools.product(leads, trails)]


_EUC_TRAILS = range(0xA1, 0xFF)
_BIG5_TRAILS = [*range(0x40, 0x7F), *_EUC_TRAILS]

# The 2,350 syllables of KS X 1001 (EUC-KR) cover nearly all Korean text. The 8,822 others that CP949
# adds are where Shift-JIS bytes land when read as CP949 (ありがとう reads as 궇귟궕궴궎), so only these
# count as Korean.
COMMON_HANGUL = _decoded("cp949", _two_byte(range(0xB0, 0xC9), _EUC_TRAILS))
# GB2312 level 1 (rows 16-55): the 3,755 hanzi that make up nearly all Simplified Chinese text.
COMMON_SIMPLIFIED = _decoded("gb2312", _two_byte(range(0xB0, 0xD8), _EUC_TRAILS))
# Big5 level 1 (A440-C67E): its 5,401 frequently used hanzi; level 2 holds the rarer ones.
COMMON_TRADITIONAL = _decoded(
    "cp950", (code for code in _two_byte(range(0xA4, 0xC7), _BIG5_TRAILS) if code <= b"\xc6\x7e")
)
_KANA = re.compile(r"[\u3040-\u30ff]")  # hiragana and full-width katakana
_KANJI = re.compile(r"[\u4e00-\u9fff]")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")  # jamo and syllables

# A decoded text reads as its language when this share of its non-ASCII letters is in that language's
# script. Misread bytes land in other scripts (half-width katakana, rare Hangul, jamo) for the most part.
PLAUSIBLE_SHARE = 0.8


def reads_as_korean(letters: list[str]) -> bool:
    return bool(letters) and sum(ch in COMMON_HANGUL for ch in letters) >= PLAUSIBLE_SHARE * len(letters)


def reads_as_japanese(letters: list[str]) -> bool:
    kana = sum(bool(_KANA.match(ch)) for ch in letters)
    kanji = sum(bool(_KANJI.match(ch)) for ch in letters)
    # Japanese is written with kana between its kanji. Kanji alone are what EUC-KR Hangul and Latin-1
    # accents read as in EUC-JP and Shift-JIS (대한 reads as 企廃).
    return bool(letters) and kana + kanji >= PLAUSIBLE_SHARE * len(letters) and kana >= 0.1 * len(letters)


def reads_as_simplified_chinese(letters: list[str]) -> bool:
    return _reads_as_chinese(letters, COMMON_SIMPLIFIED)


def reads_as_traditional_chinese(letters: list[str]) -> bool:
    return _reads_as_chinese(letters, COMMON_TRADITIONAL)


def _reads_as_chinese(letters: list[str], common: frozenset[str]) -> bool:
    # Chinese is written in hanzi alone. Kana among them are Japanese, or Big5's most common hanzi read in
    # GB18030 (中 reads as い); Hangul, Korean.
    if any(_KANA.match(ch) or _HANGUL.match(ch) for ch in letters):
        return False
    return bool(letters) and sum(ch in common for ch in letters) >= PLAUSIBLE_SHARE * len(letters)
