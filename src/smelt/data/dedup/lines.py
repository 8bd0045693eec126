"""Line- and sentence-level deduplication (C4 / datatrove ``SentenceDedup`` style).

Web pages share boilerplate: navigation, cookie banners, "Share this article", footers.
Removing a line (or a span of three sentences) that repeats across many documents drops the
boilerplate while keeping each page's own text. C4 (Raffel et al. 2020, Section 2.2)
"discarded all but one of any three-sentence span occurring more than once in the data set";
datatrove's SentenceDedup does the same with ``n_sentences=3``.

The executor runs it as stages: per shard, `units` of every document -> ``(hash, order)``
rows (each hash once per document); over the corpus, `removal_mask` marks the repeated ones
(``dedup.lines.max_repeats``, ``keep_first``); per shard again, `spans_to_remove` +
`remove_spans` rewrite the documents.

Unit hashes are xxh3-64 of the whitespace-collapsed unit text, so they are stable across
processes and machines. Letter case and punctuation are kept: boilerplate repeats verbatim,
and case-folding would start merging headings with prose.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import numpy as np
import xxhash

from smelt.data.text import CJK_CHARS

__all__ = ["SENTENCES_PER_UNIT", "removal_mask", "remove_spans", "sentence_spans", "spans_to_remove", "units"]

# C4, Raffel et al. 2020, Section 2.2: three-sentence spans (datatrove SentenceDedup n_sentences=3).
SENTENCES_PER_UNIT = 3

_xxh3 = xxhash.xxh3_64_intdigest

# Sentence ends. CJK full stops/exclamation/question marks end a sentence wherever they are
# (Chinese puts no space after them). ASCII . ! ? end one only before whitespace, the end of
# the text, or a CJK character, so "3.14", "example.com" and "v1.2" stay whole. Closing
# quotes and brackets after the mark belong to the sentence: 他说：“好。” / He said "yes."
_CLOSERS = "[\"'\u201d\u2019\u300d\u300f\uff09)\\]\u300b\u3009]*"
_CJK_END = "[\u3002\uff01\uff1f\uff61]+"  # 。！？｡
_ASCII_END = f"[.!?]+{_CLOSERS}(?=\\s|\\Z|[{CJK_CHARS}])"
# A sentence starts at a non-space and ends at the first sentence end or at the line end:
# a line break always ends a sentence (headings, list items, table rows).
_SENTENCE_RE = re.compile(f"(?=\\S)(?:[^\\n]*?(?:{_CJK_END}{_CLOSERS}|{_ASCII_END})|[^\\n]+)")

_HSPACE_RE = re.compile(r"[ \t]*")
_MANY_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
_TRAILING_BLANK = re.compile(r"\n[ \t\n]*\Z")


def _hash(s: str) -> int:
    return _xxh3(s.encode("utf-8", "surrogatepass"))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every sentence, without surrounding whitespace (CJK-aware)."""
    out = []
    for m in _SENTENCE_RE.finditer(text):
        s = m.group()
        out.append((m.start(), m.start() + len(s.rstrip())))
    return out


def units(text: str, mode: Literal["lines", "sentences"], min_chars: int) -> list[tuple[int, int, int]]:
    """``(start, end, hash)`` of each dedup unit of ``text``, in text order.

    lines: every line (span without its newline); the hash is of the stripped,
    whitespace-collapsed line. sentences: every window of 3 consecutive sentences (windows
    overlap, as in C4 and datatrove); the hash is of the window's whitespace-collapsed
    sentences joined by one space. A text with fewer than 3 sentences has no sentence units
    (as datatrove). Units whose normalized text is shorter than ``min_chars`` characters are
    not returned: short lines ("Home", "1", "Reply") repeat everywhere by chance and
    removing them would shred documents without removing boilerplate.
    """
    out: list[tuple[int, int, int]] = []
    if mode == "lines":
        pos = 0
        for line in text.split("\n"):
            end = pos + len(line)
            norm = " ".join(line.split())
            if len(norm) >= min_chars:
                out.append((pos, end, _hash(norm)))
            pos = end + 1
        return out
    if mode != "sentences":
        raise ValueError(f"mode must be 'lines' or 'sentences', got {mode!r}")
    spans = sentence_spans(text)
    k = SENTENCES_PER_UNIT
    if len(spans) < k:
        return out
    norms = [" ".join(text[s:e].split()) for s, e in spans]
    for i in range(len(spans) - k + 1):
        joined = " ".join(norms[i : i + k])
        if len(joined) >= min_chars:
            out.append((spans[i][0], spans[i + k - 1][1], _hash(joined)))
    return out


def spans_to_remove(doc_units: Iterable[tuple[int, int, int]],
                    remove: Iterable[int] | np.ndarray) -> list[tuple[int, int]]:
    """The ``(start, end)`` of the units whose hash is in ``remove`` (a set or uint64 array)."""
    doc_units = list(doc_units)
    if not doc_units:
        return []
    if isinstance(remove, np.ndarray):
        hashes = np.fromiter((h for _, _, h in doc_units), dtype=np.uint64, count=len(doc_units))
        hit = np.isin(hashes, remove)
        return [(s, e) for (s, e, _), h in zip(doc_units, hit.tolist(), strict=True) if h]
    rm = remove if isinstance(remove, (set, frozenset)) else set(remove)
    return [(s, e) for s, e, h in doc_units if h in rm]


def removal_mask(hashes: np.ndarray, orders: np.ndarray, max_repeats: int, keep_first: bool = True) -> np.ndarray:
    """Which ``(unit hash, document order)`` rows to remove, corpus-wide; bool array (N,).

    A unit is repeated when it occurs in more than ``max_repeats`` distinct documents; all
    its occurrences are removed, except, with ``keep_first``, those in the earliest
    document (smallest order), which keeps one copy of the text as C4 does. Rows may
    repeat (the same line twice in one document): they get the same answer.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    orders = np.asarray(orders, dtype=np.int64)
    if hashes.shape != orders.shape or hashes.ndim != 1:
        raise ValueError(f"hashes and orders must be 1-D of equal length, got {hashes.shape} and {orders.shape}")
    n = hashes.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    idx = np.lexsort((orders, hashes))
    sh, so = hashes[idx], orders[idx]
    head = np.empty(n, dtype=bool)  # first row of a hash group
    head[0] = True
    np.not_equal(sh[1:], sh[:-1], out=head[1:])
    new_doc = head.copy()  # first row of a (hash, order) pair
    new_doc[1:] |= so[1:] != so[:-1]
    group = np.cumsum(head) - 1
    docs_per_group = np.bincount(group, weights=new_doc)[group]
    repeated = docs_per_group > max_repeats
    if keep_first:
        repeated &= so != so[head][group]
    out = np.empty(n, dtype=bool)
    out[idx] = repeated
    return out


def remove_spans(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """Remove ``spans`` from ``text`` and tidy what they leave behind.

    Overlapping or touching spans are merged. Spaces/tabs after a removed span go with it
    (and those before it too when it ends its line), so no double spaces or trailing spaces
    are left; a line left empty is removed with its newline. Afterwards runs of blank lines
    are collapsed to one, and blank lines at the start and the end are dropped (a final
    newline is kept when the text had one). A text without spans is returned unchanged.
    """
    ivs = sorted((max(0, s), min(len(text), e)) for s, e in spans if e > s)
    if not ivs:
        return text
    merged: list[list[int]] = []
    for s, e in ivs:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    n = len(text)
    pieces = []
    pos = 0
    for s, e in merged:
        s, e = max(s, pos), max(e, pos)
        e = _HSPACE_RE.match(text, e).end()
        if e == n or text[e] == "\n":  # the span ends its line: take the spaces before it too
            while s > pos and text[s - 1] in " \t":
                s -= 1
            if s == 0 or text[s - 1] == "\n":  # ... and it was the whole line: take one newline
                if e < n:
                    e += 1
                elif s > pos:
                    s -= 1
        pieces.append(text[pos:s])
        pos = e
    pieces.append(text[pos:])
    out = "".join(pieces)
    out = _MANY_BLANK_LINES.sub("\n\n", out)
    out = _LEADING_BLANK_LINES.sub("", out)
    return _TRAILING_BLANK.sub("\n" if text.endswith("\n") else "", out)
