"""Text normalization: mojibake, Unicode form, invisible characters, whitespace, Traditional -> Simplified.

`Normalizer` rewrites ``doc.text`` in this order (each phase is a compiled regex or a C-level
`str` method, no per-character Python loop):

0. **Mojibake** (``fix_encoding``): text that was UTF-8 but got decoded as a single-byte
   encoding ("cafÃ©", "â€œquotedâ€\\x9d", "ç\\x9a\\x84" for 的, double encodings too) is repaired
   with ftfy's encoding fixes (`fix_mojibake`), as FineWeb does with datatrove's ``FTFYFormatter``
   and RedPajama with ``ftfy.fix_encoding``; a lone C1 control is read as its Windows-1252
   character, as browsers do ("\\x93quoted\\x94" -> "“quoted”", so a lone NEL becomes "…"). It
   runs first because phase 1 deletes the C1 controls (U+0080-U+009F) that Latin-1 mojibake of
   ``’“”`` consists of, after which the text can no longer be repaired. ftfy costs 100-300 us on a
   mojibake page and ~25 us just to rule one out, so a page only reaches it when it holds a
   character sequence that UTF-8 mis-decoded by one of ftfy's single-byte encodings produces
   (`_MojibakeTrigger`, a necessary condition for ftfy to change anything): ASCII text costs
   nothing, clean Chinese ~1 us per 200 characters.
1. **Line breaks and invisible characters** (``strip_control``): ``\\r\\n``/``\\r`` and the other
   line separators that `str.splitlines` honours (VT, FF, NEL, U+2028, U+2029) become ``\\n``;
   C0/C1 controls (except ``\\t`` and ``\\n``), zero-width space, word joiner, BOM, soft hyphen,
   bidi embedding/override/isolate controls and lone surrogates (which JSON ``\\ud800`` escapes
   can smuggle in and which would make the UTF-8 writer fail) are removed. ZWJ/ZWNJ are kept:
   they are spelling in Persian and Indic scripts and glue emoji sequences.
2. **Full-width indentation** (``whitespace``): ideographic spaces (U+3000) and NBSPs at the start
   of a line are paragraph indentation in Chinese text and HTML; they are dropped *before* the
   Unicode step because NFKC folds U+3000 into ASCII spaces that look like code indentation.
3. **Unicode form** (``form``): NFC, or NFKC, which also folds full-width ASCII (ＡＢＣ１２３) and
   full-width punctuation (，！？ -> ,!?) and the compatibility spaces into U+0020.
4. **Traditional -> Simplified** (``zh_convert: t2s``): OpenCC ``t2s`` (opencc-python-reimplemented).
   That converter is pure Python (~0.7 M chars/s), so a document is only sent through it when it
   contains a character that some OpenCC rule would change (an exact pre-check, see
   `_t2s_trigger`): Simplified and non-Chinese text skip it entirely.
5. **Whitespace** (``whitespace``): remaining Unicode spaces (NBSP, en/em/thin spaces, U+3000, ...)
   become U+0020; trailing spaces/tabs are stripped; runs of spaces after the first non-space
   character of a line collapse to one (leading indentation is kept, code relies on it); more than
   two consecutive blank lines collapse to two; leading blank lines and trailing whitespace of the
   document are removed.

A document with nothing but whitespace left is rejected as ``empty_after_normalize``.
Counters (per domain): ``fixed_encoding`` (documents whose mojibake ftfy repaired),
``control_chars_removed``, ``whitespace_chars_removed``, ``chars_removed`` (their sum),
``docs_changed``, ``unicode_changed`` (documents the NFC/NFKC step altered),
``t2s_docs`` and ``t2s_chars`` (documents and characters converted by OpenCC).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import unicodedata
from typing import Any

import numpy as np

from smelt.config import NormalizeConfig
from smelt.data.document import Document
from smelt.data.pipeline import Step

log = logging.getLogger(__name__)

# Line separators other than "\n" (the set `str.splitlines` recognises, minus the C0 information
# separators \x1c-\x1e, which are removed as controls instead of splitting lines).
_NEWLINE_RE = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")

# Invisible characters removed by `strip_control`:
#   C0 controls except \t (09) and \n (0a); \r (0d) is handled by _NEWLINE_RE first;
#   DEL (7f) and C1 controls (80-9f) except NEL (85, a line break, see above);
#   soft hyphen (ad), zero-width space (200b), LRM/RLM (200e/f), bidi embeddings/overrides
#   (202a-202e), word joiner and invisible math operators (2060-2064), bidi isolates (2066-2069),
#   BOM / zero-width no-break space (feff), interlinear annotation marks (fff9-fffb),
#   and lone UTF-16 surrogates (d800-dfff).
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]"
)

# Ideographic space / NBSP runs at the start of a line: CJK and HTML paragraph indentation.
_FULLWIDTH_INDENT_RE = re.compile("^[\u3000\u00a0]+", re.MULTILINE)
# Unicode space separators (category Zs) other than U+0020; NFKC maps all of them to U+0020.
_UNICODE_SPACE_RE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_WS_RE = re.compile("[ \t]+$", re.MULTILINE)
# Two or more spaces preceded by a non-whitespace character: interior runs only, so that the
# indentation at the start of a line (Python, YAML, Markdown lists) is left alone.
_SPACE_RUN_RE = re.compile(r"(?<=\S)  +")
# 4+ newlines = 3+ blank lines; keep at most 2 blank lines (paragraph and section breaks).
_BLANK_LINES_RE = re.compile("\n{4,}")


class Normalizer(Step):
    """Unicode form, invisible characters, whitespace and optional OpenCC t2s (see module doc)."""

    name = "normalize"

    def __init__(self, cfg: NormalizeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._t2s: Any = None  # opencc.OpenCC, created on first use (and again after unpickling)
        self._t2s_trigger: _Trigger | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The OpenCC dictionaries are ~5 MB of Python dicts: rebuild them in the worker instead
        # of pickling them into every task.
        state = self.__dict__.copy()
        state["_t2s"] = None
        state["_t2s_trigger"] = None
        return state

    def process(self, doc: Document) -> str | None:
        if not self.cfg.applies_to(doc.domain):
            return None
        before = doc.text
        text, counts = self.normalize(before)
        for key, n in counts.items():
            self.count(doc, key, n)
        if text != before:
            self.count(doc, "docs_changed")
            doc.text = text
        if not text.strip():
            return "empty_after_normalize"
        return None

    def normalize(self, text: str) -> tuple[str, dict[str, int]]:
        """Normalize one string; returns the new text and the counters it contributed."""
        cfg = self.cfg
        counts: dict[str, int] = {}

        # Each regex runs only when a cheap test (`str.isascii` is O(1), `in` is a C scan) says
        # it can change something: most documents need none of them.
        if cfg.fix_encoding and not text.isascii():
            fixed = fix_mojibake(text)
            if fixed != text:
                counts["fixed_encoding"] = 1
                text = fixed

        if cfg.strip_control:
            n0 = len(text)
            odd_breaks = "\r" in text or "\x0b" in text or "\x0c" in text or not text.isascii()
            if odd_breaks and _NEWLINE_RE.search(text):
                text = _NEWLINE_RE.sub("\n", text)
            if _CONTROL_RE.search(text):
                text = _CONTROL_RE.sub("", text)
            counts["control_chars_removed"] = n0 - len(text)

        ws_removed = 0
        if cfg.whitespace and ("\u3000" in text or "\u00a0" in text):
            n0 = len(text)
            text = _FULLWIDTH_INDENT_RE.sub("", text)
            ws_removed += n0 - len(text)

        if cfg.form != "none" and not unicodedata.is_normalized(cfg.form, text):
            text = unicodedata.normalize(cfg.form, text)
            counts["unicode_changed"] = 1

        if cfg.zh_convert == "t2s":
            converted = self._convert_t2s(text)
            if converted != text:
                counts["t2s_docs"] = 1
                counts["t2s_chars"] = _changed_chars(text, converted)
                text = converted

        if cfg.whitespace:
            n0 = len(text)
            if not text.isascii():
                text = _UNICODE_SPACE_RE.sub(" ", text)
            if " \n" in text or "\t\n" in text:
                text = _TRAILING_WS_RE.sub("", text)
            if "  " in text:
                text = _SPACE_RUN_RE.sub(" ", text)
            if "\n\n\n\n" in text:
                text = _BLANK_LINES_RE.sub("\n\n\n", text)
            text = text.lstrip("\n").rstrip()
            ws_removed += n0 - len(text)
            counts["whitespace_chars_removed"] = ws_removed

        counts["chars_removed"] = counts.get("control_chars_removed", 0) + ws_removed
        return text, counts

    # ---------------------------------------------------------------------------------------
    # Traditional -> Simplified

    def _convert_t2s(self, text: str) -> str:
        if self._t2s is None:
            self._t2s, self._t2s_trigger = _load_t2s()
        if self._t2s_trigger is not None and not self._t2s_trigger(text):
            return text
        return self._t2s.convert(text)


# ---------------------------------------------------------------------------------------------
# Mojibake

def fix_mojibake(text: str) -> str:
    """`text` with its mojibake repaired by ftfy's encoding fixes, or `text` itself.

    Only the encoding-related fixes run (see `_ftfy_config`): quotes, ligatures, full-width
    characters, line breaks and Unicode form are left to the rest of the normalizer and the
    recipe. ``fix_mojibake("cafÃ©") == "café"``; text without mojibake is returned unchanged.
    """
    if text.isascii() or not _mojibake_trigger()(text):
        return text
    import ftfy

    return ftfy.fix_text(text, _ftfy_config())


def has_mojibake(text: str) -> bool:
    """Would `fix_mojibake` change `text`? (Used to check that planted mojibake was repaired.)"""
    return fix_mojibake(text) != text


@functools.cache
def _ftfy_config() -> Any:
    """datatrove's ``FTFYFormatter`` configuration (the one FineWeb ran), minus the fixes that
    are not about encoding or that other phases own.

    On, as datatrove: ``fix_encoding`` (the mojibake repair proper), ``restore_byte_a0``
    (U+00A0 that became a space: "voilÃ le" -> "voilà le"), ``replace_lossy_sequences``,
    ``decode_inconsistent_utf8`` (mojibake mixed with correct text on one line),
    ``fix_c1_controls`` (a lone U+0080-U+009F is a Windows-1252 character mis-decoded as
    Latin-1, "\\x93quoted\\x94" -> "“quoted”": what browsers do, WHATWG Encoding maps the
    ISO-8859-1 label to windows-1252).
    Off, as datatrove: ligatures, character width (it would turn Chinese full-width punctuation
    half-width), curly quotes and line breaks: enforcing one format hides variants the model
    should see. Off, unlike datatrove: ``unescape_html`` (it would rewrite "&amp;" in code and
    in the HTML module's docs; HTML entities are the extractor's job), ``fix_surrogates`` (it
    turns a lone surrogate into U+FFFD; ``strip_control`` removes it, and the JSON reader already
    joins escaped surrogate pairs), ``remove_terminal_escapes`` and ``remove_control_chars``
    (``strip_control`` owns invisible characters, so turning it off keeps them) and
    ``normalization`` (``form`` owns it).
    """
    from ftfy import TextFixerConfig

    return TextFixerConfig(
        unescape_html=False, remove_terminal_escapes=False, fix_encoding=True, restore_byte_a0=True,
        replace_lossy_sequences=True, decode_inconsistent_utf8=True, fix_c1_controls=True,
        fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
        fix_surrogates=False, remove_control_chars=False, normalization=None, explain=False)


@functools.cache
def _mojibake_trigger() -> _MojibakeTrigger:
    import ftfy.chardata  # also registers the "sloppy-windows-125x" codecs

    return _MojibakeTrigger(ftfy.chardata.CHARMAP_ENCODINGS)


class _MojibakeTrigger:
    """`trigger(text)`: could ftfy's encoding fixes change `text`? False means they would not.

    ftfy repairs UTF-8 that was decoded with a single-byte encoding E (Latin-1, sloppy
    Windows-125x, ISO-8859-2, MacRoman, CP437: ``ftfy.chardata.CHARMAP_ENCODINGS``) by encoding
    back with E and decoding as UTF-8 (``decode_inconsistent_utf8`` does the same to substrings).
    That only succeeds on a complete multi-byte UTF-8 sequence: a lead byte C0-DF, E0-EF or F0-F4
    followed by 1, 2 or 3 continuation bytes 80-BF. So the text must hold E.decode(lead) followed
    by as many E.decode(continuation) characters, all in the same E. ftfy's relaxations add a
    space in place of a continuation byte (``restore_byte_a0``: leads C2 C3 C5 CE D0 D9 E0-E3 F0,
    ``chardata.ALTERED_UTF8_RE``) and "?" or U+001A (``replace_lossy_sequences``, after any lead,
    ``chardata.LOSSY_UTF8_RE``). Its remaining fixes need a C1 control (``fix_c1_controls`` and
    the Latin-1 -> Windows-1252 step), U+FFFD or U+001A, each a trigger on its own.

    Testing per encoding (bitmasks) and per sequence length keeps clean text out: "——" or "……"
    in Chinese (a MacRoman lead, then a Windows-1252 continuation), "café” " (é is a 3-byte
    lead in Latin-1 and needs two continuations) and " – " do not trigger. A text without C1
    controls, U+001A or U+FFFD costs two character-class scans (~1 us per 200 characters), plus
    a Python check for each lead followed by a possible continuation (rare in English and
    Chinese). Checked against ftfy on random strings in tests/data/test_normalize.py.
    """

    # restore_byte_a0 accepts a space after these leads (chardata.ALTERED_UTF8_RE).
    _A0_LEADS = (0xC2, 0xC3, 0xC5, 0xCE, 0xD0, 0xD9, 0xE0, 0xE1, 0xE2, 0xE3, 0xF0)
    # Characters that trigger on their own: C1 controls, SUB and U+FFFD.
    _SINGLES = "\x80-\x9f\x1a\ufffd"
    _SINGLES_RE = re.compile(f"[{_SINGLES}]")

    def __init__(self, encodings: list[str]) -> None:
        def table(byte_values: Any) -> dict[str, int]:
            """Character -> bitmask of the encodings that decode one of `byte_values` to it."""
            out: dict[str, int] = {}
            for i, enc in enumerate(encodings):
                for b in byte_values:
                    try:
                        c = bytes([b]).decode(enc)
                    except UnicodeDecodeError:  # undefined in this encoding
                        continue
                    out[c] = out.get(c, 0) | (1 << i)
            return out

        self._follow = table(range(0x80, 0xC0))
        # ftfy skips restore_byte_a0 for MacRoman, where it would match an en dash (D0) or "≈"
        # (C5) followed by a space; so must we, or every " – " would reach ftfy.
        no_a0 = (1 << encodings.index("macroman")) if "macroman" in encodings else 0
        # (sequence length, lead bytes' characters, leads that accept a space for a continuation);
        # C0 is in range for ftfy's "utf-8-variants" (C0 80, Java's encoded NUL).
        self._leads: list[tuple[int, dict[str, int], dict[str, int]]] = []
        for n, lo, hi in ((2, 0xC0, 0xDF), (3, 0xE0, 0xEF), (4, 0xF0, 0xF4)):
            a0 = table([b for b in self._A0_LEADS if lo <= b <= hi])
            a0 = {c: m & ~no_a0 for c, m in a0.items() if m & ~no_a0}
            self._leads.append((n, table(range(lo, hi + 1)), a0))
        leads = set().union(*(t for _, t, _ in self._leads))
        follow = set(self._follow) | {" ", "?"}
        # Candidate leads: a lead character followed by a possible continuation, in any of the
        # encodings; the lookahead keeps the curly quotes and dashes of English text (MacRoman
        # leads) out of the Python check unless a Latin-1 letter or symbol follows them.
        self._re = re.compile(f"[{_char_class(leads)}](?=[{_char_class(follow)}])")

    def __call__(self, text: str) -> bool:
        if self._SINGLES_RE.search(text):
            return True
        return any(self._sequence_at(text, m.start(), m.group()) for m in self._re.finditer(text))

    def _sequence_at(self, text: str, i: int, c0: str) -> bool:
        """Could text[i:] start with a (relaxed) UTF-8 sequence mis-decoded in one encoding?"""
        follow = self._follow
        for n, lead, a0 in self._leads:
            mask = lead.get(c0, 0)
            if not mask:
                continue
            if i + n > len(text):
                continue
            for x in text[i + 1:i + n]:
                if x == "?":  # replace_lossy_sequences ("\x1a" triggers on its own)
                    continue
                mask &= follow.get(x, 0) | (a0.get(c0, 0) if x == " " else 0)
                if not mask:
                    break
            if mask:
                return True
        return False


def _char_class(chars: set[str]) -> str:
    return "".join(re.escape(c) for c in sorted(chars))


def _changed_chars(a: str, b: str) -> int:
    """Characters that differ between two strings (OpenCC t2s maps 1:1, so lengths match)."""
    ua = np.frombuffer(a.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    ub = np.frombuffer(b.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    m = min(len(ua), len(ub))
    return int(np.count_nonzero(ua[:m] != ub[:m])) + abs(len(ua) - len(ub))


def _load_t2s() -> tuple[Any, _Trigger | None]:
    """The OpenCC t2s converter and a test for text it could change."""
    try:
        import opencc
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise RuntimeError("normalize.zh_convert=t2s needs the `opencc-python-reimplemented` package") from e
    converter = opencc.OpenCC("t2s")
    trigger = _t2s_trigger(os.path.join(os.path.dirname(opencc.__file__), "dictionary"))
    if trigger is None:
        log.warning("OpenCC dictionaries not found next to the module; converting every document")
    return converter, trigger


def _t2s_trigger(dict_dir: str) -> _Trigger | None:
    """A test for "contains a character that an OpenCC t2s rule rewrites".

    A text without any of them is provably unchanged by the conversion: a character rule only
    fires on its key, and a phrase rule (e.g. 覆蓋 -> 覆盖, 沈默 -> 沉默) only on a key that
    contains the character it rewrites. Returns None when the dictionaries cannot be read.
    """
    trigger: set[str] = set()
    try:
        for fname in ("TSCharacters.txt", "TSPhrases.txt"):
            with open(os.path.join(dict_dir, fname), encoding="utf-8") as f:
                for line in f:
                    key, _, values = line.rstrip("\n").partition("\t")
                    value = values.split(" ")[0]  # OpenCC uses the first of several candidates
                    if not key or key == value:
                        continue
                    if len(key) == len(value):
                        trigger.update(k for k, v in zip(key, value) if k != v)
                    else:
                        trigger.update(key)
    except OSError:
        return None
    return _Trigger(trigger)


_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")


class _Trigger:
    """`bool(trigger(text))`: does `text` contain one of `chars`?

    Python's regex engine tests a character class that holds any non-BMP character item by item
    (measured: 0.7 ms per 2 KB for the ~4,100 t2s characters, 354 of them in CJK Extension B+),
    but a BMP-only class with an O(1) bitmap (5 us). So the BMP characters form one class and the
    rare supplementary-plane ones are looked up in a set, only when the text has any such
    character at all.
    """

    def __init__(self, chars: set[str]) -> None:
        bmp = "".join(re.escape(c) for c in sorted(chars) if ord(c) <= 0xFFFF)
        self._bmp = re.compile(f"[{bmp}]") if bmp else None
        self._astral = frozenset(c for c in chars if ord(c) > 0xFFFF)

    def __call__(self, text: str) -> bool:
        if self._bmp is not None and self._bmp.search(text):
            return True
        return bool(self._astral) and _ASTRAL_RE.search(text) is not None and not self._astral.isdisjoint(text)
