"""Heuristic quality rules: Gopher quality, Gopher repetition, C4 and FineWeb, CJK-aware.

The four filters follow datatrove's ``GopherQualityFilter``, ``GopherRepetitionFilter``,
``C4QualityFilter`` and ``FineWebQualityFilter``: the published default thresholds (from the
recipe, `smelt.config`), the same order of checks and so the same first failing reason.
Instead of a word tokenizer they use one vectorized pass over the text's code points (the
token stream, with per-token lengths and hashes), numpy for the n-gram statistics and ``str``
methods for the line rules: about 0.2 ms for the chain on a 2 KB English document, where
datatrove's Gopher quality filter alone takes ~5 ms. `build_heuristic_steps` assembles them in
the FineWeb pipeline's order.

Tokens. Latin-script text is tokenized like the spaCy tokenizer datatrove counts with
(punctuation marks are tokens, "3.5" and "U.S" are one, "don't" is two), because the Gopher
ratios are calibrated on those counts; see `_latin_tokens`. A document is CJK when
``doc.meta["language"]`` is a CJK language or at least ``zh_min_cjk_ratio`` of its characters
are Han or kana (`smelt.data.text.is_cjk_text`); its words are `smelt.data.text.tokens` (one
per Han character) and its punctuation is counted separately.

Chinese-aware variants (CJK documents), each measured on CMRC 2018 / DRCD passages (kept) and
synthetic spam (rejected), see tests/data/test_heuristics.py:

* Gopher quality: length in non-space characters (``zh_min_doc_chars``/``zh_max_doc_chars``);
  no mean-word-length rule; stop words are Chinese function characters (`ZH_STOP_WORDS`, at
  least ``zh_min_stop_words`` distinct); the alphabetic-token share ignores ordinary Chinese
  sentence punctuation (`ZH_PROSE_PUNCTUATION`) but counts other symbols; ``……`` and ``。。。``
  are one ellipsis each.
* Gopher repetition: n-grams of character tokens with ``zh_top_n_grams``/``zh_dup_n_grams``;
  an n-gram's length is the sum of its characters (no separator).
* C4: 。！？ and closing quotes end a line, ``……`` is an ellipsis, a line's word count is
  ``CJK characters / 2 + other words``, 。！？ end a sentence without a following space, Chinese
  policy phrases (隐私政策, 使用条款, ...) and citation marks ([编辑]) are rules too.
* C4 and FineWeb: the unterminated tail after a line's last 。！？ is a line of its own
  (`_cjk_units`): extraction glues headings onto Chinese paragraphs.
* FineWeb: a short line has at most ``short_line_length // 2`` characters; the list ratio
  counts words as ``CJK characters / 2 + other tokens``.

Deliberate differences from datatrove, all languages: a line ending in terminal punctuation
followed by closing quotes or brackets (``."``, ``?”``, ``。」``) is punctuated for FineWeb,
and C4 also accepts the curly end quotes (the C4 paper keeps lines ending in "an end quotation
mark"); FineWeb ignores trailing spaces; Gopher repetition splits lines of the stripped text.
datatrove drops dialogue this way (1,422 of 5,153 LAMBADA passages for FineWeb alone).

Reject reasons (stable identifiers):

================================  ==========================================================
``gopher_short_doc``              fewer than ``min_doc_words`` words (CJK: ``zh_min_doc_chars``)
``gopher_long_doc``               more than ``max_doc_words`` words (CJK: ``zh_max_doc_chars``)
``gopher_below_avg_threshold``    mean word length < ``min_avg_word_length`` (not CJK)
``gopher_above_avg_threshold``    mean word length > ``max_avg_word_length`` (not CJK)
``gopher_too_many_hashes``        ``#`` per token > ``max_symbol_word_ratio``
``gopher_too_many_ellipsis``      ellipses per token > ``max_symbol_word_ratio``
``gopher_too_many_bullets``       share of lines starting with a bullet > ``max_bullet_lines_ratio``
``gopher_too_many_end_ellipsis``  share of lines ending in an ellipsis > ``max_ellipsis_lines_ratio``
``gopher_below_alpha_threshold``  share of tokens with a letter < ``max_non_alpha_words_ratio``
``gopher_too_few_stop_words``     fewer distinct stop words than ``min_stop_words`` (CJK:
                                  ``zh_min_stop_words``); datatrove: ``gopher_enough_stop_words``
``gopher_empty``                  whitespace only (repetition filter)
``gopher_dup_para_frac``          share of repeated paragraphs > ``dup_para_frac``
``gopher_dup_para_char_frac``     characters in repeated paragraphs > ``dup_para_char_frac``
``gopher_dup_line_frac``          share of repeated lines > ``dup_line_frac``
``gopher_dup_line_char_frac``     characters in repeated lines > ``dup_line_char_frac``
``gopher_top_{n}_gram``           characters of the most frequent n-gram > its threshold
``gopher_duplicated_{n}_n_grams`` characters in repeated n-grams > its threshold
``c4_lorem_ipsum``                a kept line contains "lorem ipsum"
``c4_curly_bracket``              a kept line contains ``{``
``c4_too_few_sentences``          fewer than ``min_num_sentences`` sentences in the kept lines
``fineweb_empty``                 no non-blank line
``fineweb_line_punct_ratio``      share of lines ending in terminal punctuation < ``line_punct_thr``
``fineweb_short_line_ratio``      share of short lines > ``short_line_thr``
``fineweb_char_dup_ratio``        characters in repeated lines > ``char_duplicates_ratio``
``fineweb_list_ratio``            newlines per word > ``new_line_ratio``
================================  ==========================================================

Memory. A document is never held as one Python object per word, line or n-gram: tokens are
numpy arrays (14 bytes per token), built in passes of `_TOKEN_CHUNK` characters cut after a
whitespace character (exact: no token or URL crosses whitespace); lines and paragraphs are
visited one at a time and counted as (hash, length) pairs. A step's peak stays within a few
times the document's size (tests/data/test_heuristics.py checks it); a run of more than
`_TOKEN_CHUNK` characters without whitespace is tokenized in one pass (~60 bytes per character).

Counters: C4 counts the lines it removes per rule (``lines_removed_too_long_word``,
``lines_removed_no_terminal_punct``, ``lines_removed_too_few_words``,
``lines_removed_javascript``, ``lines_removed_policy``; blank lines are not counted) and
``citations_removed``. Every step counts ``skipped_domain`` for documents of domains its config
excludes (kept untouched).
"""

from __future__ import annotations

import logging
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from smelt.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, HeuristicsConfig
from smelt.data.document import Document
from smelt.data.pipeline import Step
from smelt.data.text import CJK_CHARS, CJK_RE, is_cjk_text, tokens

log = logging.getLogger(__name__)

__all__ = [
    "C4Filter",
    "FineWebFilter",
    "GopherQualityFilter",
    "GopherRepetitionFilter",
    "ZH_STOP_WORDS",
    "build_heuristic_steps",
    "doc_is_cjk",
]

# --------------------------------------------------------------------------------------------
# shared vocabulary

# Gopher, Rae et al. 2021, Appendix A.1.1: "the, be, to, of, and, that, have, with". Matched
# case-sensitively, as datatrove does.
EN_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

# The Chinese counterpart of Gopher's list: Gopher's eight words are the most frequent English
# function words, so these are the function characters among the ~40 most frequent characters
# of Modern Chinese (Jun Da, "Modern Chinese character frequency list", 2004): particles,
# copula, pronouns, prepositions, conjunctions and adverbs that glue a sentence together.
# Frequent *content* characters of the same list (一 人 上 中 大 国 年) are left out on purpose:
# they fill keyword spam and title lists ("中国人", "上一页"), which this rule must not pass.
ZH_STOP_WORDS = frozenset("的了是在和有我这也就不都为们他她它你个与及而之以被把对从着过"
                          "吗呢吧啊所其于将并又很还要会能可那得地")

# Languages (as written by the language-ID step) that get the CJK rules whatever their ratio.
CJK_LANGUAGES = frozenset({"zh", "ja", "yue", "wuu", "lzh"})

# A CJK character carries about as much as two characters of space-delimited text in the
# word-count based rules (C4 words per line, FineWeb newlines per word), matching the recipe's
# documentation of those fields: segmented Modern Chinese averages ~1.5-2 characters per word.
ZH_CHARS_PER_WORD = 2

# Gopher bullet lines: datatrove checks "•" and "-"; the other common list markers (Markdown
# "*", CJK "·●■◆★" lists) are added so that Chinese and Markdown lists count too.
BULLETS = ("•", "-", "*", "‣", "◦", "●", "○", "▪", "■", "□", "◆", "◇", "★", "☆", "►", "▶", "·", "⁃")
# Ellipses: "..." and "…" (datatrove), plus the Chinese "……" (two "…", counted once) and the
# "。。。" that Chinese web text uses.
ELLIPSES = ("...", "…", "。。。")
_ELLIPSIS_RE = re.compile(r"\.\.\.|…+|。。。")

# Terminal punctuation of a line (C4, FineWeb). C4 keeps lines ending in . ? ! " ' (Raffel et
# al. 2020, Section 2.2); FineWeb uses datatrove's TERMINAL_PUNCTUATION (the Unicode
# sentence-final marks, of which these are the ones used by living scripts with real web text).
_TERMINAL = ".!?。！？｡．‼⁇⁈⁉؟۔।॥።፧၊။។៕﹒﹖﹗꓿"
# Closing quotes and brackets allowed after the terminal mark (."  。”  ！」  ?) ).
_CLOSERS = "\"'”’」』）)]】》〉»›"
C4_END_PUNCTUATION = tuple(".?!\"'") + tuple("。！？｡”’」』")
FINEWEB_STOP_CHARS = tuple(_TERMINAL)

# C4 line rules (TFDS c4_utils, as in datatrove), with Chinese equivalents of the policy phrases
# and of Wikipedia's citation marks.
CITATION_RE = re.compile(
    r"\[\d*\]|\[edit\]|\[citation needed\]|\[编辑\]|\[編輯\]|\[来源请求\]|\[來源請求\]|\[需要引用\]")
POLICY_SUBSTRINGS = (
    "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies",
    "隐私政策", "隱私政策", "隐私权政策", "使用条款", "使用條款", "服务条款", "服務條款", "用户协议", "使用cookie",
)

# Sentence ends for the C4 sentence count. datatrove counts spaCy sentencizer sentences; this
# matches its behaviour on the cases that matter: "..." and ". . ." do not end a sentence, nor a
# period after a single letter (H. sapiens, U.S., e.g., p.m.; not the s of a possessive: James's.)
# or a title (Mr., Dr.); closing
# quotes stay with their sentence; 。！？ end a sentence without a following space.
# The pattern starts with the terminal mark and looks behind from there, so the regex engine
# only examines candidate positions (leading lookbehinds made it 10x slower).
_SENT_END_RE = re.compile(
    r"[。！？｡]+[" + re.escape(_CLOSERS) + r"]*"
    r"|(?:\.(?!\.)|[!?])(?<!\..)(?<!\. .)(?<!(?<![’'])\b[A-Za-z].)(?<!\bM[rst].)(?<!\b[DS][rt].)(?<![JS]r.)(?<!\bvs.)"
    r"(?<!\bMrs.)(?<!\bProf.)[.!?]*[" + re.escape(_CLOSERS) + r"]*(?=\s|$)(?!\s\.)"
)

# Ordinary sentence punctuation of Chinese text (full-width and the half-width forms that
# Chinese web text mixes in). Chinese punctuates about every 5-7 characters, so counting these
# as non-alphabetic "words" would put clean encyclopedic prose at the 0.8 Gopher limit (65 of
# 1,848 CMRC/DRCD passages below it); only other symbols (★ ▶ 【】 # @ | ...) count.
ZH_PROSE_PUNCTUATION = "，。、；：？！“”‘’（）《》〈〉「」『』—…·～,.;:?!()\"'-"
_ZH_SYMBOL_RE = re.compile("[^\\w\\s" + re.escape(ZH_PROSE_PUNCTUATION) + "]")
# Sentence-final marks after which the rest of a CJK line is a separate unit (see _cjk_units).
_ZH_FINAL = "。！？｡!?"

# --------------------------------------------------------------------------------------------
# tokens

# Latin-script text is tokenized like the spaCy tokenizer that datatrove counts with, because
# the Gopher ratios are calibrated on its tokens, punctuation included:
#   * a run of word characters (letters, digits, _; not CJK) is a token; single . , : between
#     word characters and / between digits join runs, so 3.5, 1,000, 10:30, 9/11, U.S are
#     one token;
#   * an apostrophe between word characters starts a token: do|n't -> don|'t, I|'m;
#   * each CJK character is a token;
#   * each other non-space character is a punctuation token, except that runs of one of
#     . - ~ … form one token (..., --);
#   * http(s):// up to the next whitespace is one token.
# The stream is computed with numpy from a per-character flag table (about twice as fast as the
# equivalent regex, and it yields the lengths and hashes the n-gram rules need); the test suite
# checks it against that regex.
_F_WORD, _F_LETTER, _F_DIGIT, _F_CJK, _F_SPACE, _F_JOIN, _F_SLASH, _F_APOS, _F_RUN = (1 << i for i in range(9))
_URL_RE = re.compile(rf"(?<![^\W{CJK_CHARS}])https?://\S+")
_TABLE: np.ndarray | None = None  # flags of the Basic Multilingual Plane, built on first use
_M64 = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_POW = np.ones(1, dtype=np.uint64)  # _BASE ** i, grown on demand
_IPOW = np.ones(1, dtype=np.uint64)  # _BASE_INV ** i


def _char_flags(ch: str) -> int:
    if CJK_RE.match(ch):
        f = _F_CJK | _F_LETTER
    elif ch.isspace():
        f = _F_SPACE
    elif ch.isalnum() or ch == "_":
        f = _F_WORD | (_F_LETTER if ch.isalpha() else 0) | (_F_DIGIT if ch.isdecimal() else 0)
    else:
        f = 0  # punctuation or symbol
    if ch in ".,:":
        f |= _F_JOIN
    elif ch == "/":
        f |= _F_SLASH
    elif ch in "'’":
        f |= _F_APOS
    if ch in ".-~…":
        f |= _F_RUN
    return f


def _flags(cp: np.ndarray) -> np.ndarray:
    global _TABLE
    if _TABLE is None:
        _TABLE = np.array([_char_flags(chr(c)) for c in range(0x10000)], dtype=np.uint16)
        log.debug("built the character flag table (%d entries)", len(_TABLE))
    if cp.max() < 0x10000:
        return _TABLE[cp]
    f = _TABLE[np.minimum(cp, 0xFFFF)]
    for i in np.flatnonzero(cp > 0xFFFF).tolist():  # emoji, rare Han: few per document
        f[i] = _char_flags(chr(cp[i]))
    return f


# Characters per tokenizing pass: bounds `_latin_tokens`' per-character arrays (~60 bytes per
# character) to ~4 MB whatever the document's size; a pass costs ~30 numpy calls, so the
# per-call overhead stays under 5% of the work.
_TOKEN_CHUNK = 1 << 16
_WS_RE = re.compile(r"\s")  # str.isspace's characters, as _F_SPACE


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """_BASE**i and _BASE_INV**i (mod 2**64) for i < n, by doubling. Tables up to twice
    `_TOKEN_CHUNK` are kept for the next call; longer ones (a long run without whitespace) not."""
    global _POW, _IPOW
    if len(_POW) >= n:
        return _POW, _IPOW
    size = max(n, 2 * len(_POW), 4096)
    tables = []
    for base in (_BASE, _BASE_INV):
        p = np.empty(size, dtype=np.uint64)
        p[0] = 1
        k = 1
        while k < size:
            m = min(k, size - k)
            np.multiply(p[:m], np.uint64(pow(base, k, 1 << 64)), out=p[k : k + m])
            k += m
        tables.append(p)
    if size <= 2 * _TOKEN_CHUNK:
        _POW, _IPOW = tables
    return tables[0], tables[1]


def _str_hash(s: str) -> int:
    """The token hash of `s` (as `_latin_tokens` computes it), for looking words up."""
    return sum(ord(c) * pow(_BASE, i, 1 << 64) for i, c in enumerate(s)) & _M64


@dataclass(slots=True)
class _Tokens:
    """The token stream of one text, as arrays (one entry per token)."""

    hashes: np.ndarray  # uint64, equal for equal tokens (within one text)
    lens: np.ndarray  # int32 characters
    is_word: np.ndarray  # bool: word token (else punctuation)
    has_letter: np.ndarray  # bool: contains a letter (Han characters are letters)
    n_symbols: int = 0  # CJK: symbol characters outside the stream (see ZH_PROSE_PUNCTUATION)

    def __len__(self) -> int:
        return len(self.hashes)


def _latin_tokens(text: str) -> _Tokens:
    """The token stream of `text`, in passes of about `_TOKEN_CHUNK` characters, each cut just
    after a whitespace character. The cut is exact: every rule looks one character to each
    side, and a whitespace neighbour acts as the text's edge (not a word, joiner or run
    character; a URL ends before it), so a token's hash does not depend on where it sits."""
    if len(text) <= _TOKEN_CHUNK:
        return _latin_piece(text)
    parts: list[_Tokens] = []
    a = 0
    while a < len(text):
        m = _WS_RE.search(text, a + _TOKEN_CHUNK) if a + _TOKEN_CHUNK < len(text) else None
        b = m.end() if m else len(text)
        parts.append(_latin_piece(text[a:b]))
        a = b
    fields = ("hashes", "lens", "is_word", "has_letter")
    return _Tokens(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _latin_piece(text: str) -> _Tokens:
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n = len(cp)
    if n == 0:
        return _Tokens(np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, bool), np.empty(0, bool))
    f = _flags(cp)
    word = (f & _F_WORD) != 0
    cjk = (f & _F_CJK) != 0
    space = (f & _F_SPACE) != 0
    # joiners and apostrophes need word characters on both sides
    between = np.zeros(n, dtype=bool)
    between[1:-1] = word[:-2] & word[2:]
    digit = (f & _F_DIGIT) != 0
    between_digits = np.zeros(n, dtype=bool)
    between_digits[1:-1] = digit[:-2] & digit[2:]
    joined = (between & ((f & _F_JOIN) != 0)) | (between_digits & ((f & _F_SLASH) != 0))
    apos = np.zeros(n, dtype=bool)
    apos[1:-1] = (word | cjk)[:-2] & word[2:]
    apos &= (f & _F_APOS) != 0
    w = word | joined | apos
    punct = ~(w | cjk | space)
    prev_w = np.zeros(n, dtype=bool)
    prev_w[1:] = w[:-1]
    same_run = np.zeros(n, dtype=bool)
    same_run[1:] = (cp[1:] == cp[:-1]) & ((f[1:] & _F_RUN) != 0)
    start = (w & ~prev_w) | apos | cjk | (punct & ~same_run)
    if "://" in text:
        for m in _URL_RE.finditer(text):
            a, b = m.span()
            start[a + 1 : b] = False
            start[a] = w[a : b] = True
            cjk[a:b] = False
    brk = np.ones(n, dtype=bool)  # the next character starts a token or is a space
    brk[:-1] = start[1:] | space[1:]
    starts = np.flatnonzero(start)
    ends = np.flatnonzero(brk & ~space) + 1
    letters = np.zeros(n + 1, dtype=np.int32)
    np.cumsum((f & _F_LETTER) != 0, out=letters[1:])
    pw, ipw = _powers(n)
    # polynomial hash of each token: prefix sums of c_i * B**i, shifted back by B**-start
    # (mod 2**64; colliding natural tokens is ~2**-64 likely, adversarial ones need thousands
    # of characters)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(cp * pw[:n], out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * ipw[starts]
    return _Tokens(hashes, (ends - starts).astype(np.int32), w[starts] | cjk[starts], letters[ends] > letters[starts])


def _cjk_tokens(text: str) -> _Tokens:
    toks = tokens(text)
    m = len(toks)
    first_seen: dict[str, int] = {}
    # a token's id (its first position) stands in for its hash
    ids = np.fromiter(map(first_seen.setdefault, toks, range(m)), dtype=np.uint64, count=m)
    lens = np.fromiter(map(len, toks), dtype=np.int32, count=m)
    numeric = np.fromiter(map(str.isdigit, toks), dtype=bool, count=m)
    return _Tokens(ids, lens, np.ones(m, dtype=bool), ~numeric, len(_ZH_SYMBOL_RE.findall(text)))


# The steps of a chain see the same ``str`` object one after another (until C4 rewrites it), so
# the last result is kept by identity. The cache holds a reference to the text, so its id
# cannot be reused while it is cached; each tuple is replaced atomically.
_last_cjk: tuple[str, float, bool] = ("", 0.0, False)
_last_tokens: tuple[str, bool, _Tokens | None] = ("", False, None)


def doc_is_cjk(doc: Document, min_ratio: float = 0.3) -> bool:
    """Whether `doc` gets the Chinese-aware rules: language tag zh/ja/... or CJK-rich text."""
    global _last_cjk
    if doc.meta.get("language") in CJK_LANGUAGES:
        return True
    text = doc.text
    last = _last_cjk
    if last[0] is text and last[1] == min_ratio:
        return last[2]
    res = is_cjk_text(text, min_ratio)
    _last_cjk = (text, min_ratio, res)
    return res


def _token_stats(text: str, cjk: bool) -> _Tokens:
    """CJK: `smelt.data.text.tokens` (words only). Otherwise words and punctuation."""
    global _last_tokens
    last = _last_tokens
    if last[0] is text and last[1] == cjk and last[2] is not None:
        return last[2]
    tk = _cjk_tokens(text) if cjk else _latin_tokens(text)
    _last_tokens = (text, cjk, tk)
    return tk


_EN_STOP_HASHES = [np.uint64(_str_hash(w)) for w in sorted(EN_STOP_WORDS)]


def _non_space_len(text: str) -> int:
    return len(text) - sum(map(text.count, " \n\t\r\u3000"))


def _dup_stats(items: Iterable[str]) -> tuple[int, int, int]:
    """(items, repeated items, characters in them): every occurrence after the first counts.

    Items are kept as (64-bit hash, length) pairs, 16 bytes each whatever their size, so the
    items can be produced one at a time (`_split_iter`, `_lines_iter`) and dropped.
    """
    hashes, lens = array("q"), array("q")
    for item in items:
        hashes.append(hash(item))
        lens.append(len(item))
    n = len(hashes)
    if n < 2:
        return n, 0, 0
    h = np.frombuffer(hashes, dtype=np.int64)
    _, first = np.unique(h, return_index=True)
    n_dup = n - len(first)
    if n_dup == 0:
        return n, 0, 0
    ln = np.frombuffer(lens, dtype=np.int64)
    return n, n_dup, int(ln.sum()) - int(ln[first].sum())


def _split_iter(pattern: re.Pattern[str], text: str) -> Iterator[str]:
    """``pattern.split(text)`` one piece at a time (no capturing groups in `pattern`)."""
    pos = 0
    for m in pattern.finditer(text):
        yield text[pos : m.start()]
        pos = m.end()
    yield text[pos:]


def _lines_iter(text: str, chunk: int = _TOKEN_CHUNK) -> Iterator[str]:
    """``text.splitlines()`` one line at a time: chunks cut just after a newline split exactly as
    the whole text does ("\r\n" ends at its "\n")."""
    a = 0
    while a < len(text):
        b = text.find("\n", a + chunk) + 1 if a + chunk < len(text) else 0
        b = b or len(text)
        yield from text[a:b].splitlines()
        a = b


def _count_words(text: str, chunk: int = _TOKEN_CHUNK) -> int:
    """``len(text.split())`` without the list: chunks cut just after whitespace."""
    n, a = 0, 0
    while a < len(text):
        m = _WS_RE.search(text, a + chunk) if a + chunk < len(text) else None
        b = m.end() if m else len(text)
        n += len(text[a:b].split())
        a = b
    return n


def _cjk_units(lines: Iterable[str]) -> Iterator[str]:
    """Lines of a CJK document, with the unterminated tail of a line as a unit of its own.

    Extracting Chinese HTML often glues a heading, caption or link text onto the end of the
    paragraph before it ("...同步播放。外部链接"), and Chinese has no space to show the seam.
    Splitting after the line's last 。！？ keeps the line rules (C4 terminal punctuation,
    FineWeb punctuated lines) from judging a whole paragraph by its glued-on tail.
    """
    for line in lines:
        end = max(map(line.rfind, _ZH_FINAL))
        if end >= 0:
            end += 1
            while end < len(line) and line[end] in _CLOSERS:
                end += 1
            tail = line[end:].strip()
            if tail:
                yield line[:end]
                yield tail
                continue
        yield line


# Share of CJK characters from which a document gets the CJK rules. It is declared once, on
# gopher_quality (`zh_min_cjk_ratio`); `build_heuristic_steps` hands it to every step.
DEFAULT_CJK_RATIO: float = GopherQualityConfig.model_fields["zh_min_cjk_ratio"].default


class _HeuristicStep(Step):
    """Base: domain gating and the CJK decision."""

    def __init__(self, cfg: GopherQualityConfig | GopherRepetitionConfig | C4Config | FineWebConfig,
                 cjk_ratio: float | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.cjk_ratio = DEFAULT_CJK_RATIO if cjk_ratio is None else cjk_ratio

    def process(self, doc: Document) -> str | None:
        if not self.cfg.applies_to(doc.domain):
            self.count(doc, "skipped_domain")
            return None
        return self.check(doc, doc_is_cjk(doc, self.cjk_ratio))

    def check(self, doc: Document, cjk: bool) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Gopher quality


class GopherQualityFilter(_HeuristicStep):
    """Gopher quality rules (Rae et al. 2021, Appendix A.1.1), datatrove order and defaults."""

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig | None = None, cjk_ratio: float | None = None) -> None:
        cfg = cfg or GopherQualityConfig()
        super().__init__(cfg, cfg.zh_min_cjk_ratio if cjk_ratio is None else cjk_ratio)

    def check(self, doc: Document, cjk: bool) -> str | None:
        cfg: GopherQualityConfig = self.cfg
        text = doc.text
        tk = _token_stats(text, cjk)
        if cjk:
            n_tokens = len(tk) + tk.n_symbols
            n_chars = _non_space_len(text)
            if cfg.zh_min_doc_chars and n_chars < cfg.zh_min_doc_chars:
                return "gopher_short_doc"
            if cfg.zh_max_doc_chars and n_chars > cfg.zh_max_doc_chars:
                return "gopher_long_doc"
            # no mean-word-length rule: with one character per word it is always 1
        else:
            n_tokens = len(tk)
            n_words = int(tk.is_word.sum())
            if cfg.min_doc_words and n_words < cfg.min_doc_words:
                return "gopher_short_doc"
            if cfg.max_doc_words and n_words > cfg.max_doc_words:
                return "gopher_long_doc"
            if n_words:
                mean_len = int(tk.lens[tk.is_word].sum()) / n_words
                if cfg.min_avg_word_length and mean_len < cfg.min_avg_word_length:
                    return "gopher_below_avg_threshold"
                if cfg.max_avg_word_length and mean_len > cfg.max_avg_word_length:
                    return "gopher_above_avg_threshold"
        if n_tokens == 0:
            return "gopher_short_doc"

        # '#' and ellipses per token (punctuation tokens included, as datatrove counts)
        if cfg.max_symbol_word_ratio:
            if text.count("#") / n_tokens > cfg.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if "…" in text or "..." in text or "。。。" in text:
                if len(_ELLIPSIS_RE.findall(text)) / n_tokens > cfg.max_symbol_word_ratio:
                    return "gopher_too_many_ellipsis"

        if cfg.max_bullet_lines_ratio or cfg.max_ellipsis_lines_ratio:
            n_lines = n_bullet = n_ell = 0
            for s in _lines_iter(text):
                n_lines += 1
                n_bullet += s.lstrip().startswith(BULLETS)
                n_ell += s.rstrip().endswith(ELLIPSES)
            if n_lines:
                if cfg.max_bullet_lines_ratio and n_bullet / n_lines > cfg.max_bullet_lines_ratio:
                    return "gopher_too_many_bullets"
                if cfg.max_ellipsis_lines_ratio and n_ell / n_lines > cfg.max_ellipsis_lines_ratio:
                    return "gopher_too_many_end_ellipsis"

        # Share of words with a letter. Gopher (Rae et al. 2021, A.1.1) counts words; datatrove counts
        # punctuation tokens too (alpha_share_of="tokens"), which puts ordinary dialogue (“So,” he
        # said, “how’s it going?”) under the 0.8 limit. CJK: the rest are symbols only.
        denom = n_tokens
        if not cjk and cfg.alpha_share_of == "words":
            denom = int(tk.is_word.sum())
        if cfg.max_non_alpha_words_ratio and denom and int(tk.has_letter.sum()) / denom < cfg.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"

        if cjk:
            need = cfg.zh_min_stop_words
            if need and _count_present(text, ZH_STOP_WORDS, need) < need:
                return "gopher_too_few_stop_words"
        elif cfg.min_stop_words:
            need = cfg.min_stop_words
            found = 0
            for h in _EN_STOP_HASHES:
                found += bool((tk.hashes == h).any())
                if found >= need:
                    break
            if found < need:
                return "gopher_too_few_stop_words"
        return None


def _count_present(text: str, vocab: frozenset[str], enough: int) -> int:
    """Distinct members of `vocab` found in `text`, stopping once `enough` are found."""
    found = 0
    for w in vocab:
        if w in text:
            found += 1
            if found >= enough:
                break
    return found


# --------------------------------------------------------------------------------------------
# Gopher repetition

_PARA_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")
_NEWLINE_RE = re.compile(r"\n")


class GopherRepetitionFilter(_HeuristicStep):
    """Gopher repetition rules (Rae et al. 2021, Table A1), datatrove order and defaults.

    Fractions are characters over ``len(text)``. The most frequent n-gram's length includes the
    spaces between its words (Latin text); repeated n-grams are counted as datatrove does: scan
    left to right, and each n-gram already seen adds its characters and skips n tokens.
    """

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig | None = None, cjk_ratio: float | None = None) -> None:
        super().__init__(cfg or GopherRepetitionConfig(), cjk_ratio)
        c: GopherRepetitionConfig = self.cfg
        self._top = {False: list(c.top_n_grams), True: list(c.zh_top_n_grams)}
        # increasing n, so that "no repeated n-gram" ends the scan for every larger n
        self._dup = {False: sorted(c.dup_n_grams), True: sorted(c.zh_dup_n_grams)}

    def check(self, doc: Document, cjk: bool) -> str | None:
        cfg: GopherRepetitionConfig = self.cfg
        text = doc.text
        stripped = text.strip()
        if not stripped:
            return "gopher_empty"
        n_chars = len(text)

        if "\n" in stripped:
            n_paras, n_dup, dup_chars = _dup_stats(_split_iter(_PARA_RE, stripped))
            if cfg.dup_para_frac and n_dup / n_paras > cfg.dup_para_frac:
                return "gopher_dup_para_frac"
            if cfg.dup_para_char_frac and dup_chars / n_chars > cfg.dup_para_char_frac:
                return "gopher_dup_para_char_frac"
            # datatrove splits the unstripped text, so a leading and a trailing newline make two
            # empty "lines" that count as one duplicate; the stripped text avoids that artefact
            n_lines, n_dup, dup_chars = _dup_stats(_split_iter(_LINES_RE, stripped))
            if cfg.dup_line_frac and n_dup / n_lines > cfg.dup_line_frac:
                return "gopher_dup_line_frac"
            if cfg.dup_line_char_frac and dup_chars / n_chars > cfg.dup_line_char_frac:
                return "gopher_dup_line_char_frac"

        tk = _token_stats(text, cjk)
        if not len(tk):
            return None
        return _ngram_reason(tk.hashes, tk.lens, n_chars, self._top[cjk], self._dup[cjk], sep=0 if cjk else 1)


_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)


class _Windows:
    """Per-window arrays of a token stream for growing n, each extended by one array operation.

    ``values(n)``: value_n = value_{n-1} * M + id (mod 2**64), equal for equal n-grams (the
    polynomial of `smelt.data.text.ngram_hashes` without its finalizer, a bijection that does
    not change which values are equal). ``rarest(n)``: the smallest document count of a token
    in the window, an upper bound on how often the window's n-gram occurs.
    """

    def __init__(self, ids: np.ndarray, count: np.ndarray) -> None:
        self.ids, self.count = ids, count
        self._v = (1, ids)
        self._r = (1, count)

    def values(self, n: int) -> np.ndarray:
        k, v = self._v if self._v[0] <= n else (1, self.ids)
        while k < n:
            v = v[: len(self.ids) - k] * _NGRAM_MULT + self.ids[k:]
            k += 1
        self._v = (k, v)
        return v

    def rarest(self, n: int) -> np.ndarray:
        k, r = self._r if self._r[0] <= n else (1, self.count)
        while k < n:
            r = np.minimum(r[: len(self.count) - k], self.count[k:])
            k += 1
        self._r = (k, r)
        return r


def _ngram_reason(ids: np.ndarray, lens: np.ndarray, n_chars: int, top: list[tuple[int, float]],
                  dup: list[tuple[int, float]], sep: int) -> str | None:
    """First failing n-gram rule for a token stream (`ids`: equal tokens, equal values)."""
    m = len(ids)
    csum = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lens, out=csum[1:])
    order, starts, sizes = _groups(ids)
    count = np.empty(m, dtype=np.int32)  # occurrences of each position's token
    count[order] = np.repeat(sizes.astype(np.int32), sizes)
    del order, starts, sizes
    win = _Windows(ids, count)

    for n, frac in top:
        if m < n:
            continue
        length = csum[n:] - csum[: m - n + 1] + (n - 1) * sep
        # Bound: count * length of each window's n-gram, with the count bounded by the window's
        # rarest token. Clean text stays far below the thresholds, so the sort is skipped.
        if int((win.rarest(n) * length).max()) <= frac * n_chars:
            continue
        order, starts, sizes = _groups(win.values(n))
        c = int(sizes.max())
        i = int(order[starts[sizes == c]].min())  # ties: the n-gram seen first (Counter order)
        del order, starts, sizes
        if c * int(length[i]) > frac * n_chars:
            return f"gopher_top_{n}_gram"
        del length

    for idx, (n, frac) in enumerate(dup):
        if m < n:
            continue
        if not (win.rarest(n) > 1).any():
            return None  # no repeated n-gram means none for any larger n either
        h = win.values(n)
        first = _first_occurrence(h)
        repeated = np.flatnonzero(first < np.arange(len(h), dtype=first.dtype))
        if len(repeated) == 0:
            return None
        # Characters covered by repeated n-grams (their union) bound datatrove's greedy count
        # from above and shrink as n grows: below every remaining threshold ends the scan.
        cover = np.zeros(m + 1, dtype=np.int32)  # +1 where a repeated window starts, -1 after it
        cover[repeated] += 1  # positions are distinct: fancy += adds once each
        cover[repeated + n] -= 1
        np.cumsum(cover, out=cover)
        covered = int(lens[cover[:m] > 0].sum())
        del cover
        if covered <= min(f for _, f in dup[idx:]) * n_chars:
            return None
        if covered <= frac * n_chars:
            continue
        if _greedy_dup_chars(h, first, repeated, csum, n) / n_chars > frac:
            return f"gopher_duplicated_{n}_n_grams"
    return None


def _groups(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable sort of `h`: (order, start of each run of equal values in sorted order, run sizes)."""
    order = np.argsort(h, kind="stable")
    hs = h[order]
    brk = np.empty(len(hs), dtype=bool)
    brk[0] = True
    np.not_equal(hs[1:], hs[:-1], out=brk[1:])
    del hs
    starts = np.flatnonzero(brk)
    del brk
    sizes = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=sizes[:-1])
    sizes[-1] = len(h) - starts[-1]
    return order, starts, sizes


def _first_occurrence(h: np.ndarray) -> np.ndarray:
    """For each position, the position where its value first occurs."""
    order, starts, sizes = _groups(h)
    first = np.empty(len(h), dtype=np.int32 if len(h) < 2**31 else np.int64)
    first[order] = np.repeat(order[starts].astype(first.dtype), sizes)
    return first


def _slices_zip(positions: np.ndarray, h: np.ndarray, first: np.ndarray,
                step: int = 1 << 15) -> Iterator[tuple[int, int, int]]:
    """(position, value, first occurrence) as Python ints, a slice at a time: whole-array
    ``tolist()`` would cost ~100 bytes per repeated position."""
    for a in range(0, len(positions), step):
        p = positions[a : a + step]
        yield from zip(p.tolist(), h[p].tolist(), first[p].tolist(), strict=True)


def _greedy_dup_chars(h: np.ndarray, first: np.ndarray, repeated: np.ndarray, csum: np.ndarray, n: int) -> int:
    """datatrove's `find_all_duplicate`, visiting only the positions whose n-gram occurred before.

    datatrove scans positions left to right with a set of seen n-grams; an n-gram already in
    the set adds its characters and jumps n positions ahead (the skipped positions do not enter
    the set), any other n-gram enters the set. A position's n-gram is in the set iff one of its
    earlier occurrences was visited: its first occurrence (unless inside a skipped window), or a
    later one that was visited while the n-gram was not yet in the set (`late`).
    """
    total = 0
    skip_end = 0
    windows: list[int] = []  # positions d of counted repeats: d+1 .. d+n-1 were skipped
    late: set[int] = set()
    for i, v, f in _slices_zip(repeated, h, first):
        if i < skip_end:
            continue
        j = bisect_left(windows, f) - 1
        first_skipped = j >= 0 and windows[j] + n > f
        if not first_skipped or v in late:
            total += int(csum[i + n] - csum[i])
            skip_end = i + n
            windows.append(i)
        else:
            late.add(v)
    return total


# --------------------------------------------------------------------------------------------
# C4


class C4Filter(_HeuristicStep):
    """C4 rules (Raffel et al. 2020, Section 2.2; TFDS c4_utils): rewrites text, may reject.

    Per line, in datatrove's order: drop a line with a word longer than ``max_word_length``;
    remove citation marks; drop a line without terminal punctuation (or ending in an ellipsis);
    drop a line with fewer than ``min_words_per_line`` words; reject the document on "lorem
    ipsum"; drop a line mentioning javascript; reject on ``{``; drop policy boilerplate. Kept
    lines are joined by newlines; fewer than ``min_num_sentences`` sentences rejects.
    """

    name = "c4"

    def __init__(self, cfg: C4Config | None = None, cjk_ratio: float | None = None) -> None:
        super().__init__(cfg or C4Config(), cjk_ratio)

    def check(self, doc: Document, cjk: bool) -> str | None:
        cfg: C4Config = self.cfg
        if not cfg.split_paragraph:
            # Per-sentence mode needs a sentence splitter in front of the line rules.
            lines: Iterable[str] = _split_sentences(doc.text)
        else:
            lines = _lines_iter(doc.text)
        if cjk:
            lines = _cjk_units(lines)
        max_wl = cfg.max_word_length
        min_words = cfg.min_words_per_line
        # Phrase rules scan a line only when the phrase occurs somewhere in the document.
        text = doc.text
        low_doc = text.lower()
        lorem = cfg.filter_lorem_ipsum and "lorem ipsum" in low_doc
        javascript = cfg.filter_javascript and "javascript" in low_doc
        policy = cfg.filter_policy and any(p in low_doc for p in POLICY_SUBSTRINGS)
        curly = cfg.filter_curly_bracket and "{" in text
        citations = cfg.remove_citations and "[" in text
        removed = {"too_long_word": 0, "no_terminal_punct": 0, "too_few_words": 0, "javascript": 0, "policy": 0}
        n_citations = 0
        n_sentences = 0
        kept: list[str] = []
        for line in lines:
            line = line.strip()
            if not line:
                continue  # blank lines carry no content; they are not counted as removed
            words = line  # split lazily: word counts are taken before citations are removed
            if max_wl != -1 and len(line) > max_wl and _longest_word(line, cjk) > max_wl:
                removed["too_long_word"] += 1
                continue
            if citations and "[" in line:
                line, k = CITATION_RE.subn("", line)
                n_citations += k
                if not line.strip():
                    continue  # nothing but citation marks
            if cfg.filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith(ELLIPSES)):
                removed["no_terminal_punct"] += 1
                continue
            if min_words != -1 and (_cjk_line_words(line, min_words) if cjk else len(words.split())) < min_words:
                removed["too_few_words"] += 1
                continue
            if lorem or javascript or policy:
                low = line.lower()
                if lorem and "lorem ipsum" in low:
                    return "c4_lorem_ipsum"
                if javascript and "javascript" in low:
                    removed["javascript"] += 1
                    continue
                if curly and "{" in line:
                    return "c4_curly_bracket"
                if policy and any(p in low for p in POLICY_SUBSTRINGS):
                    removed["policy"] += 1
                    continue
            elif curly and "{" in line:
                return "c4_curly_bracket"
            if n_sentences < cfg.min_num_sentences:  # only "enough or not" matters
                n_sentences += _count_sentences(line) if cfg.split_paragraph else 1
            kept.append(line)
        for rule, k in removed.items():
            self.count(doc, f"lines_removed_{rule}", k)
        self.count(doc, "citations_removed", n_citations)
        if n_sentences < cfg.min_num_sentences:
            return "c4_too_few_sentences"
        doc.text = ("\n" if cfg.split_paragraph else " ").join(kept)
        return None


def _longest_word(line: str, cjk: bool) -> int:
    # CJK characters are words of their own: only runs of other characters can be long
    words = CJK_RE.sub(" ", line).split() if cjk else line.split()
    return max(map(len, words), default=0)


_ENOUGH_CJK_RE = re.compile(rf"(?:[^{CJK_CHARS}]*[{CJK_CHARS}]){{6}}")  # 6 CJK characters = 3 words


def _cjk_line_words(line: str, enough: int = 3) -> float:
    """Words of a line: CJK characters / 2 plus the other words.

    Only "fewer than `enough` or not" matters: with `enough` <= 3, a line with 6 CJK characters
    returns 3 without counting the rest.
    """
    if enough <= 3 and _ENOUGH_CJK_RE.match(line):
        return 3.0
    n_cjk = len(CJK_RE.findall(line))
    if not n_cjk:
        return len(line.split())
    return n_cjk / ZH_CHARS_PER_WORD + len(CJK_RE.sub(" ", line).split())


def _count_sentences(line: str) -> int:
    n = len(_SENT_END_RE.findall(line))
    if not line.rstrip(_CLOSERS).endswith(tuple(".!?。！？｡")):
        n += 1  # a trailing fragment is a sentence too
    return max(n, 1)


_C = re.escape(_CLOSERS)
_SENT_SPLIT_RE = re.compile(  # split_paragraph=False: after 。！？ (and closing quotes), or . ! ? and a space
    rf"(?<=[。！？｡])(?![{_C}])|(?<=[。！？｡][{_C}])(?![{_C}])|(?<=[.!?][{_C}])\s+|(?<=[.!?])\s+")


def _split_sentences(text: str) -> list[str]:
    return [s for s in _SENT_SPLIT_RE.split(text) if s and not s.isspace()]


# --------------------------------------------------------------------------------------------
# FineWeb


class FineWebFilter(_HeuristicStep):
    """FineWeb's own rules (Penedo et al. 2024; datatrove FineWebQualityFilter defaults)."""

    name = "fineweb"

    def __init__(self, cfg: FineWebConfig | None = None, cjk_ratio: float | None = None) -> None:
        super().__init__(cfg or FineWebConfig(), cjk_ratio)

    def check(self, doc: Document, cjk: bool) -> str | None:
        cfg: FineWebConfig = self.cfg
        text = doc.text
        lines: Iterable[str] = filter(str.strip, _split_iter(_NEWLINE_RE, text))
        if cjk:
            lines = _cjk_units(lines)
        short = cfg.short_line_length // 2 if cjk else cfg.short_line_length
        n_punct = n_short = 0

        def counted(units: Iterable[str]) -> Iterator[str]:  # one pass: the lines are not kept
            nonlocal n_punct, n_short
            for s in units:
                n_punct += s.rstrip().rstrip(_CLOSERS).endswith(FINEWEB_STOP_CHARS)
                n_short += len(s) <= short
                yield s

        n_lines, _, dup_chars = _dup_stats(counted(lines))
        if not n_lines:
            return "fineweb_empty"
        ratio = n_punct / n_lines
        if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
            return "fineweb_line_punct_ratio"

        if n_short / n_lines > cfg.short_line_thr:
            return "fineweb_short_line_ratio"

        denom = len(text) - text.count("\n")
        if denom and dup_chars / denom > cfg.char_duplicates_ratio:
            return "fineweb_char_dup_ratio"

        n_newlines = text.count("\n")
        if n_newlines:
            if cjk:
                # words: CJK characters / 2 + other tokens, at least (tokens) / 2
                toks = _token_stats(text, cjk)
                if n_newlines <= cfg.new_line_ratio * len(toks) / ZH_CHARS_PER_WORD:
                    return None
                n_cjk = len(CJK_RE.findall(text))
                n_words = n_cjk / ZH_CHARS_PER_WORD + (len(toks) - n_cjk)
            else:
                # whitespace-separated chunks hold at least one token each: a lower bound on
                # the token count that lets most documents pass without tokenizing
                if n_newlines <= cfg.new_line_ratio * _count_words(text):
                    return None
                n_words = len(_token_stats(text, cjk))
            if n_words == 0 or n_newlines / n_words > cfg.new_line_ratio:
                return "fineweb_list_ratio"
        return None


# --------------------------------------------------------------------------------------------
# assembly


def build_heuristic_steps(cfg: HeuristicsConfig) -> list[Step]:
    """The enabled heuristic steps: Gopher quality, Gopher repetition, C4, FineWeb.

    Gopher quality and repetition judge the document as extracted (C4 would hide repeated and
    unpunctuated lines from them); C4 then rewrites it, and FineWeb's line rules judge the text
    that will be kept. The FineWeb pipeline (Penedo et al. 2024) runs repetition before quality;
    the set of rejected documents is the same either way, but quality first gives a tiny page
    the reason `gopher_short_doc` instead of a repetition reason, which is what a person reading
    the funnel expects. Every step gets gopher_quality's ``zh_min_cjk_ratio``.
    """
    ratio = cfg.gopher_quality.zh_min_cjk_ratio
    steps: list[Step] = []
    if cfg.gopher_quality.enabled:
        steps.append(GopherQualityFilter(cfg.gopher_quality, ratio))
    if cfg.gopher_repetition.enabled:
        steps.append(GopherRepetitionFilter(cfg.gopher_repetition, ratio))
    if cfg.c4.enabled:
        steps.append(C4Filter(cfg.c4, ratio))
    if cfg.fineweb.enabled:
        steps.append(FineWebFilter(cfg.fineweb, ratio))
    return steps
