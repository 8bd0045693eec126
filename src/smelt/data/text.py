"""CJK-aware text primitives shared by the quality rules, decontamination and dedup.

Chinese has no spaces, so "a word" means: one Han (or kana) character, or a run of other
word characters (letters, digits, underscore). Every step that counts words or builds
n-grams uses `tokens()` so that they agree on what a word is.

N-gram hashes are deterministic 64-bit values (xxh3 per token, then a polynomial combination
over the window, vectorized with numpy), stable across processes and machines.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

# Han (CJK Unified Ideographs + Ext A + compatibility + Ext B-F), kana, CJK punctuation is separate.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_KANA = "\u3040-\u30ff"
CJK_CHARS = _HAN + _KANA
CJK_RE = re.compile(f"[{CJK_CHARS}]")
TOKEN_RE = re.compile(f"[{CJK_CHARS}]|[^\\W{CJK_CHARS}]+")
# Hangul is space-delimited like Latin text, so it stays inside ordinary word runs.

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: odd, well-mixed
_MIX = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finalizer constants
_MIX2 = np.uint64(0x94D049BB133111EB)


def cjk_count(text: str) -> int:
    return len(CJK_RE.findall(text))


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among non-whitespace characters (0 for empty text)."""
    n = len(text) - sum(text.count(c) for c in " \n\t\r")
    if n <= 0:
        return 0.0
    return cjk_count(text) / n


def is_cjk_text(text: str, threshold: float = 0.3) -> bool:
    return cjk_ratio(text[:5000]) >= threshold


def tokens(text: str) -> list[str]:
    """CJK-aware word tokens: single Han/kana characters, or runs of other word characters."""
    return TOKEN_RE.findall(text)


def token_hashes(toks: list[str], lowercase: bool = True) -> np.ndarray:
    """64-bit hash of each token (uint64 array), equal tokens hash equal."""
    if not toks:
        return np.empty(0, dtype=np.uint64)
    h = xxhash.xxh3_64_intdigest
    # each distinct token hashed once (text repeats its words), then one C-level pass to fill
    # the array: ~2x faster than hashing into a preallocated array element by element
    if lowercase:
        of = {t: h(t.lower().encode("utf-8")) for t in dict.fromkeys(toks)}
    else:
        of = {t: h(t.encode("utf-8")) for t in dict.fromkeys(toks)}
    return np.fromiter(map(of.__getitem__, toks), dtype=np.uint64, count=len(toks))


def _finalize(x: np.ndarray) -> np.ndarray:
    # splitmix64 finalizer so that n-gram hashes are uniformly spread in all 64 bits
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of `n` consecutive token hashes (uint64, length len-n+1).

    A sequence shorter than `n` yields one hash of the whole sequence (so short texts still
    have a shingle), and an empty sequence yields an empty array.
    """
    m = len(hashes)
    if m == 0:
        return np.empty(0, dtype=np.uint64)
    if m < n:
        n = m
    k = m - n + 1
    with np.errstate(over="ignore"):
        acc = hashes[:k].copy()
        for j in range(1, n):
            acc = acc * _MULT + hashes[j : j + k]
        return _finalize(acc)


def text_ngram_hashes(text: str, n: int, lowercase: bool = True) -> np.ndarray:
    """Convenience: n-gram hashes over `tokens(text)`."""
    return ngram_hashes(token_hashes(tokens(text), lowercase=lowercase), n)
