"""Benchmark decontamination: drop training documents that share n-grams with evaluation sets.

Three parts:

1. **Loaders** turn an evaluation file into `EvalItem` records ``(item_id, text, question)``:
   ``text`` is the context/question joined with the gold answer, ``question`` the context/question
   alone ("" when the benchmark has no separate answer, e.g. LAMBADA). Formats (those of
   ../shared/data): HellaSwag six-line text (``.txt[.bz2]``), PIQA (``valid.jsonl`` +
   ``valid-labels.lst``), ARC jsonl, LAMBADA jsonl, C-Eval CSV files or directories, a generic
   jsonl (``{"context","choices","gold"}`` or ``{"text"}``) and plain text (one item per line).
   ``format: auto`` guesses from the path and the first record. A malformed file raises
   `EvalFormatError` naming the file and line.

2. `DecontamIndex` holds the sorted, unique uint64 hashes of every evaluation n-gram
   (`smelt.data.text`: CJK-aware tokens, one per Han character, lower-cased; full-width letters
   and digits are NFKC-folded first so that ＡＢＣ１２３ matches ABC123) and, aligned with them,
   the benchmark each came from. It is built once (`DecontamIndex.build`), written as one ``.npz``
   (`save`, atomic) and memory-loaded by every worker (`load`, no pickle).

   Items shorter than n tokens: an n-gram test can never fire on them, yet PIQA and ARC have many
   (``"dresser" + "replace drawer with bobby pin"``). Such a text becomes *one* shingle of all
   its tokens when it has at least `MIN_SHORT_TOKENS` = 8 of them (the smallest N of GPT-3's
   overlap analysis, Brown et al. 2020, Appendix C) and is skipped below that, where a match
   would mostly be a common phrase. The question alone is indexed the same way when it is a
   short text of its own, so a page quoting the question without the answer still matches.
   Both counts are kept per benchmark in `DecontamIndex.stats`.

   Chinese: a token is one Han character, so a 13-gram is ~7-8 words and whole entity names fit
   in it: on CMRC 2018 + DRCD (t2s) 4 of 3,104 clean Wikipedia passages shared a C-Eval 13-gram
   (全国人民代表大会常务委员会, 中国人民政治协商会议第一届), 1 at 16 and none at 20 characters.
   Items that are mostly CJK text therefore use their own window, ``cjk_ngram`` (`build`
   argument; `DecontamConfig.cjk_ngram` when the recipe has it, else ``ngram``).

3. `DecontamFilter` hashes every window of a document whose length occurs in the index (13,
   the CJK window, the short-shingle lengths: one pass, `window_hashes`), drops the ~95% that a
   bitmap proves absent, and finds the rest with `np.searchsorted`. It rejects with
   ``decontam_<benchmark>`` when at least ``min_matches`` distinct evaluation shingles occur,
   and records ``meta["decontam"] = {"benchmark": name, "matches": n}`` for any document with a
   match (the benchmark with the most matches; other matched benchmarks under ``"also"``).
   Counter: ``ngram_matches``.

13-grams: GPT-3, Brown et al. 2020, Section 4 and Appendix C (``DecontamConfig.ngram``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import os
import re
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import zstandard

from smelt.config import DecontamConfig, DecontamSource
from smelt.data.document import Document
from smelt.data.fs import local_copy
from smelt.data.pipeline import Filter

# _MULT/_finalize: the polynomial and finalizer of `ngram_hashes`, reused so that the one-pass
# `window_hashes` stays bit-identical to it (tests/data/test_decontam.py checks).
from smelt.data.text import _MULT, _finalize, is_cjk_text, ngram_hashes, token_hashes, tokens
from smelt.fsutil import committed

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

log = logging.getLogger(__name__)

MIN_SHORT_TOKENS = 8  # GPT-3, Brown et al. 2020, Appendix C: the minimum N of their n-gram test
INDEX_FORMAT = "smelt-decontam-index"
INDEX_VERSION = 1


class EvalFormatError(ValueError):
    """An evaluation file that cannot be read: the message names the file and line."""


class EvalItem(NamedTuple):
    """One evaluation item: its id, question+gold answer, and the question alone."""

    item_id: str
    text: str
    question: str = ""


# ------------------------------------------------------------------------------------------------
# reading files


def open_text(path: Path) -> IO[str]:
    """Open a (possibly .bz2/.gz/.xz/.zst compressed) UTF-8 text file."""
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open(encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline); decoding errors name the file."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise EvalFormatError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from None
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise EvalFormatError(f"{path}:{lineno + 1}: cannot read: {e}") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalFormatError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(rec, dict):
            raise EvalFormatError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def _field(rec: dict[str, Any], key: str, path: Path, lineno: int, kind: type = str) -> Any:
    v = rec.get(key)
    if not isinstance(v, kind):
        what = "missing" if v is None else f"a {type(v).__name__}, expected {kind.__name__}"
        raise EvalFormatError(f"{path}:{lineno}: field {key!r} is {what}")
    return v


def _join(question: str, answer: str) -> str:
    return f"{question.strip()} {answer.strip()}".strip()


# ------------------------------------------------------------------------------------------------
# loaders: path -> EvalItem records


def load_hellaswag(path: Path) -> Iterator[EvalItem]:
    """HellaSwag text format, 6 lines per item: ``activity: ctx`` / gold label 0-3 / 4 endings."""
    block: list[str] = []
    start = 1
    for lineno, line in _lines(path):
        if not block:
            start = lineno
        block.append(line)
        if len(block) < 6:
            continue
        ctx, label, endings = block[0], block[1].strip(), block[2:]
        if label not in ("0", "1", "2", "3"):
            raise EvalFormatError(f"{path}:{start + 1}: HellaSwag gold label must be 0-3, got {label[:40]!r} "
                                  f"(items are 6 lines: context, label, 4 endings)")
        if not ctx.strip():
            raise EvalFormatError(f"{path}:{start}: empty HellaSwag context")
        yield EvalItem(f"{(start - 1) // 6}", _join(ctx, endings[int(label)]), ctx.strip())
        block = []
    if block:
        raise EvalFormatError(f"{path}:{start}: incomplete HellaSwag item ({len(block)} of 6 lines)")


def load_piqa(path: Path) -> Iterator[EvalItem]:
    """PIQA: ``<split>.jsonl`` (goal, sol1, sol2) and ``<split>-labels.lst`` (0/1 per line)."""
    if path.is_dir():
        path = path / "valid.jsonl"
    labels_path = path.with_name(path.name.split(".")[0] + "-labels.lst")
    labels: list[str] | None = None
    if labels_path.is_file():
        labels = [ln.strip() for _, ln in _lines(labels_path)]
        while labels and not labels[-1]:
            labels.pop()
    else:
        log.warning("%s: no %s beside it; indexing the goals only", path, labels_path.name)
    n = 0
    for lineno, rec in _jsonl(path):
        goal = _field(rec, "goal", path, lineno)
        q = goal.strip()
        if labels is None:
            yield EvalItem(str(n), q, q)
        else:
            if n >= len(labels):
                raise EvalFormatError(f"{labels_path}:{n + 1}: missing label for {path.name} line {lineno}")
            lab = labels[n]
            if lab not in ("0", "1"):
                raise EvalFormatError(f"{labels_path}:{n + 1}: PIQA label must be 0 or 1, got {lab[:40]!r}")
            sol = _field(rec, f"sol{int(lab) + 1}", path, lineno)
            yield EvalItem(str(n), _join(goal, sol), q)
        n += 1
    if labels is not None and len(labels) != n:
        raise EvalFormatError(f"{labels_path}:{n + 1}: {len(labels)} labels for {n} items in {path.name}")


def load_arc(path: Path) -> Iterator[EvalItem]:
    """ARC (AI2) jsonl: ``question.stem``, ``question.choices[].{text,label}``, ``answerKey``."""
    for lineno, rec in _jsonl(path):
        q = _field(rec, "question", path, lineno, dict)
        stem = _field(q, "stem", path, lineno)
        choices = _field(q, "choices", path, lineno, list)
        key = str(rec.get("answerKey", "")).strip()
        gold = next((c.get("text", "") for c in choices if isinstance(c, dict) and str(c.get("label")) == key), None)
        if gold is None:
            raise EvalFormatError(f"{path}:{lineno}: answerKey {key!r} is not among the choice labels")
        yield EvalItem(str(rec.get("id", lineno)), _join(stem, gold), stem.strip())


def load_lambada(path: Path) -> Iterator[EvalItem]:
    """LAMBADA jsonl ``{"text": passage}``: the passage already ends with the target word."""
    for lineno, rec in _jsonl(path):
        yield EvalItem(str(lineno), _field(rec, "text", path, lineno).strip(), "")


_CEVAL_COLUMNS = ("question", "A", "B", "C", "D")


def load_ceval(path: Path) -> Iterator[EvalItem]:
    """C-Eval CSV (``id,question,A,B,C,D,answer[,explanation]``), one file or a directory of them."""
    files = sorted(path.rglob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise EvalFormatError(f"{path}: no .csv files (C-Eval layout: <subject>_<split>.csv)")
    for f in files:
        try:
            with open_text(f) as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames or []
                missing = [c for c in _CEVAL_COLUMNS if c not in header]
                if missing:
                    raise EvalFormatError(f"{f}:1: C-Eval header lacks {missing} (got {header})")
                has_answer = "answer" in header  # the test split ships without answers
                for row in reader:
                    line = reader.line_num
                    if None in row or any(row.get(c) is None for c in _CEVAL_COLUMNS):
                        raise EvalFormatError(f"{f}:{line}: expected {len(header)} columns")
                    question = row["question"].strip()
                    rid = f"{f.stem}:{row.get('id') or line}"
                    if not has_answer:
                        yield EvalItem(rid, question, question)
                        continue
                    ans = (row.get("answer") or "").strip().upper()
                    if ans not in ("A", "B", "C", "D"):
                        raise EvalFormatError(f"{f}:{line}: C-Eval answer must be A-D, got {ans[:40]!r}")
                    yield EvalItem(rid, _join(question, row[ans]), question)
        except UnicodeDecodeError as e:
            raise EvalFormatError(f"{f}: not valid UTF-8 ({e.reason})") from None
        except csv.Error as e:
            raise EvalFormatError(f"{f}:{reader.line_num}: malformed CSV: {e}") from None


def load_jsonl(path: Path) -> Iterator[EvalItem]:
    """Generic jsonl: ``{"context", "choices", "gold"}`` (gold = index or choice text) or ``{"text"}``."""
    for lineno, rec in _jsonl(path):
        rid = str(rec.get("id", lineno))
        if "context" in rec:
            ctx = _field(rec, "context", path, lineno)
            choices = rec.get("choices")
            gold = rec.get("gold")
            if choices is None and gold is None:
                yield EvalItem(rid, ctx.strip(), "")
                continue
            if isinstance(gold, str):
                answer = gold
            elif isinstance(gold, int) and isinstance(choices, list) and 0 <= gold < len(choices):
                answer = str(choices[gold])
            else:
                n_choices = len(choices) if isinstance(choices, list) else "no"
                raise EvalFormatError(f"{path}:{lineno}: 'gold' must index 'choices' (or be the answer text), "
                                      f"got gold={gold!r} with {n_choices} choices")
            yield EvalItem(rid, _join(ctx, answer), ctx.strip())
        elif "text" in rec:
            yield EvalItem(rid, _field(rec, "text", path, lineno).strip(), "")
        else:
            raise EvalFormatError(f"{path}:{lineno}: expected {{'context','choices','gold'}} or {{'text'}}, "
                                  f"got keys {sorted(rec)[:8]}")


def load_text(path: Path) -> Iterator[EvalItem]:
    """Plain text, one item per non-blank line."""
    for lineno, line in _lines(path):
        if line.strip():
            yield EvalItem(str(lineno), line.strip(), "")


LOADERS: dict[str, Callable[[Path], Iterator[EvalItem]]] = {
    "hellaswag": load_hellaswag,
    "piqa": load_piqa,
    "arc": load_arc,
    "lambada": load_lambada,
    "ceval": load_ceval,
    "jsonl": load_jsonl,
    "text": load_text,
}

_COMPRESSED = (".bz2", ".gz", ".xz", ".zst")


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def _first_record(path: Path) -> dict[str, Any] | None:
    for _, rec in _jsonl(path):
        return rec
    return None


def detect_format(path: str | Path) -> str:
    """Guess the evaluation format from the path (and, for jsonl, the first record's keys)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        if (p / "valid.jsonl").is_file() and (p / "valid-labels.lst").is_file():
            return "piqa"
        if any(p.rglob("*.csv")):
            return "ceval"
        raise EvalFormatError(f"{p}: cannot guess the format of this directory; set `format` "
                              f"(one of {', '.join(LOADERS)})")
    suffix = _base_suffix(p)
    if suffix == ".csv":
        return "ceval"
    if suffix in (".jsonl", ".json"):
        rec = _first_record(p) or {}
        if isinstance(rec.get("question"), dict) and "stem" in rec["question"]:
            return "arc"
        if "goal" in rec and "sol1" in rec:
            return "piqa"
        if "context" in rec:
            return "jsonl"
        if "text" in rec:
            return "lambada" if "lambada" in name else "jsonl"
        raise EvalFormatError(f"{p}:1: cannot guess the format from keys {sorted(rec)[:8]}; set `format`")
    if "hellaswag" in name:
        return "hellaswag"
    return "text"


def load_eval_items(source: DecontamSource | str | Path, fmt: str = "auto") -> Iterator[EvalItem]:
    """Items of one evaluation source (a `DecontamSource` or a path with an explicit format)."""
    raw = source.path if isinstance(source, DecontamSource) else str(source)
    if isinstance(source, DecontamSource):
        fmt = source.format
    path = local_copy(raw) if _URL_RE.match(raw) else Path(raw)  # the loaders read by path
    if not path.exists():
        raise FileNotFoundError(f"evaluation set not found: {path} (data.decontam.sources)")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in LOADERS:
        raise ValueError(f"unknown evaluation format {fmt!r}; allowed: {', '.join(LOADERS)}")
    if path.is_dir() and fmt not in ("ceval", "piqa"):
        raise EvalFormatError(f"{path}: is a directory; format {fmt!r} needs a file")
    return LOADERS[fmt](path)


# ------------------------------------------------------------------------------------------------
# the index


# Characters whose NFKC form tokenizes differently: full-width digits and letters (common in
# Chinese text) and CJK compatibility ideographs. Full-width punctuation is deliberately absent:
# it is not part of any token, and NFKC on every Chinese document would cost ~50 us per 2 KB.
_NFKC_NEEDED_RE = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\uf900-\ufaff\U0002f800-\U0002fa1f]")


def _canonical(text: str) -> str:
    """NFKC-fold text that has full-width letters/digits or compatibility ideographs."""
    return unicodedata.normalize("NFKC", text) if _NFKC_NEEDED_RE.search(text) else text


def text_token_hashes(text: str) -> np.ndarray:
    """Token hashes (lower-cased, CJK-aware) of NFKC-folded text: the unit both sides hash."""
    return token_hashes(tokens(_canonical(text)))


@dataclass
class SourceStats:
    """What one benchmark contributed to the index."""

    items: int = 0
    ngrams: int = 0  # distinct hashes (n-grams and short shingles) first seen in this benchmark
    short_items: int = 0  # items indexed (partly) through a whole-text shingle shorter than n
    skipped_items: int = 0  # items with no shingle at all (fewer than MIN_SHORT_TOKENS tokens)

    def to_dict(self) -> dict[str, int]:
        return {"items": self.items, "ngrams": self.ngrams, "short_items": self.short_items,
                "skipped_items": self.skipped_items}


@dataclass
class DecontamIndex:
    """Sorted unique n-gram hashes of evaluation sets, each tagged with its benchmark.

    ``hashes[i]`` (uint64, ascending) came from benchmark ``names[bench[i]]``; ``lengths`` are the
    shingle lengths in tokens that occur (``ngram``, ``cjk_ngram`` and any short-item lengths),
    which tells the filter which window sizes of a document to hash.
    """

    ngram: int
    cjk_ngram: int
    names: list[str]
    hashes: np.ndarray
    bench: np.ndarray
    lengths: tuple[int, ...]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    _bits: np.ndarray = field(init=False, repr=False, compare=False)
    _shift: np.uint64 = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Pre-filter: one bit per bucket of the top `b` hash bits, ~1/16 of the buckets set.
        # A binary search into the sorted array (7 MB for the five shared benchmarks) costs a
        # cache miss per level; the bitmap (2 MB there, at most 8 MB) answers "certainly absent"
        # for ~95% of a document's windows with one access. Measured on 2 KB documents (~2.7k
        # windows of lengths 8..13) against that 0.9 M-shingle index: searchsorted alone
        # 0.52 ms, bitmap first 0.05 ms.
        b = int(np.clip(np.ceil(np.log2(max(len(self.hashes), 1) * 16)), 16, 26))
        self._shift = np.uint64(64 - b)
        present = np.zeros(1 << b, dtype=bool)
        present[(self.hashes >> self._shift).astype(np.intp)] = True
        self._bits = np.packbits(present, bitorder="little")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_bits"], state["_shift"]  # derived: rebuilt in the worker (~10 ms)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __len__(self) -> int:
        return len(self.hashes)

    def _lookup(self, g: np.ndarray) -> np.ndarray:
        """Positions in `hashes` of the values of `g` that are present (may repeat)."""
        top = (g >> self._shift).astype(np.intp)
        maybe = (self._bits[top >> 3] >> (top & 7).astype(np.uint8)) & 1
        cand = g[maybe.astype(bool)]
        if not len(cand):
            return cand.astype(np.intp)
        idx = np.searchsorted(self.hashes, cand)
        idx[idx == len(self.hashes)] = 0
        return idx[self.hashes[idx] == cand]

    @classmethod
    def from_config(cls, cfg: DecontamConfig) -> DecontamIndex:
        """`build` with the recipe's sources and windows (what `DecontamFilter` expects)."""
        return cls.build(cfg.sources, cfg.ngram, configured_cjk_ngram(cfg))

    @classmethod
    def build(cls, sources: list[DecontamSource], ngram: int, cjk_ngram: int | None = None,
              min_short_tokens: int = MIN_SHORT_TOKENS) -> DecontamIndex:
        """Read every source and hash its items (see the module doc for short items).

        `cjk_ngram` (default: `ngram`) is the window for items that are mostly Han/kana text,
        where a token is one character: 13 characters are only ~7 words and cover entity names
        such as 全国人民代表大会常务委员会 (see the module doc).
        """
        cjk_ngram = cjk_ngram or ngram
        if ngram < 1 or cjk_ngram < 1:
            raise ValueError(f"ngram and cjk_ngram must be >= 1, got {ngram}, {cjk_ngram}")
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"decontam.sources: duplicate benchmark name(s) {dupes}")
        if len(names) > np.iinfo(np.uint16).max:
            raise ValueError("too many decontamination sources")
        all_hashes: list[np.ndarray] = []
        all_bench: list[np.ndarray] = []
        stats: dict[str, SourceStats] = {}
        lengths: set[int] = set()
        for b, src in enumerate(sources):
            st = stats[src.name] = SourceStats()
            chunks: list[np.ndarray] = []
            for item in load_eval_items(src):
                st.items += 1
                n = cjk_ngram if is_cjk_text(item.text) else ngram
                got, short = _item_shingles(item, n, min_short_tokens, chunks, lengths)
                st.short_items += short
                st.skipped_items += not got
            h = np.unique(np.concatenate(chunks)) if chunks else np.empty(0, np.uint64)
            all_hashes.append(h)
            all_bench.append(np.full(len(h), b, dtype=np.uint16))
            log.info("decontam: %s: %d items, %d shingles (%d short items, %d skipped)",
                     src.name, st.items, len(h), st.short_items, st.skipped_items)
        hashes = np.concatenate(all_hashes) if all_hashes else np.empty(0, np.uint64)
        bench = np.concatenate(all_bench) if all_bench else np.empty(0, np.uint16)
        # One entry per hash; a hash shared by two benchmarks is credited to the first source.
        order = np.argsort(hashes, kind="stable")
        hashes, bench = hashes[order], bench[order]
        keep = np.ones(len(hashes), dtype=bool)
        keep[1:] = hashes[1:] != hashes[:-1]
        hashes, bench = hashes[keep], bench[keep]
        for b, name in enumerate(names):
            stats[name].ngrams = int(np.count_nonzero(bench == b))
        return cls(ngram=ngram, cjk_ngram=cjk_ngram, names=names, hashes=hashes, bench=bench,
                   lengths=tuple(sorted(lengths)), stats={k: v.to_dict() for k, v in stats.items()})

    # -- file format ---------------------------------------------------------------------------
    # One .npz (numpy zip, no pickled objects), arrays:
    #   format  str    "smelt-decontam-index"      version  int64  INDEX_VERSION
    #   ngram   int64  n                           cjk_ngram int64 n for CJK items
    #   lengths int64[k] shingle lengths present
    #   names   str[B] benchmark names             stats    str    JSON {name: SourceStats}
    #   hashes  uint64[N] ascending, unique        bench    uint16[N] index into names

    def save(self, path: str | Path) -> Path:
        """Write the index atomically (temp file + rename); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                np.savez(f, format=np.array(INDEX_FORMAT), version=np.array(INDEX_VERSION, dtype=np.int64),
                         ngram=np.array(self.ngram, dtype=np.int64),
                         cjk_ngram=np.array(self.cjk_ngram, dtype=np.int64),
                         lengths=np.array(self.lengths, dtype=np.int64),
                         names=np.array(self.names, dtype=str),
                         stats=np.array(json.dumps(self.stats, sort_keys=True)),
                         hashes=self.hashes, bench=self.bench)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        committed(p)  # uploaded when the run directory is on a store
        return p

    @classmethod
    def load(cls, path: str | Path) -> DecontamIndex:
        """Read an index written by `save` (no pickle); a wrong or damaged file is a ValueError."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"decontamination index not found: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                fmt, version = str(z["format"]), int(z["version"])
                arrays = {k: z[k] for k in ("ngram", "cjk_ngram", "names", "hashes", "bench", "lengths", "stats")} \
                    if (fmt, version) == (INDEX_FORMAT, INDEX_VERSION) else None
        except (KeyError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{p}: not a readable {INDEX_FORMAT} file: {e}") from None
        if arrays is None:
            raise ValueError(f"{p}: {fmt} v{version}, expected {INDEX_FORMAT} v{INDEX_VERSION}: rebuild the index")
        return cls(ngram=int(arrays["ngram"]), cjk_ngram=int(arrays["cjk_ngram"]),
                   names=[str(x) for x in arrays["names"]],
                   hashes=arrays["hashes"].astype(np.uint64, copy=False),
                   bench=arrays["bench"].astype(np.uint16, copy=False),
                   lengths=tuple(int(x) for x in arrays["lengths"]), stats=json.loads(str(arrays["stats"])))

    # -- lookup --------------------------------------------------------------------------------

    def matches(self, text: str) -> dict[str, int]:
        """Distinct evaluation shingles found in `text`, counted per benchmark (empty if none)."""
        if not len(self.hashes):
            return {}
        g = window_hashes(text_token_hashes(text), self.lengths)
        if not len(g):
            return {}
        hit = np.unique(self._lookup(g))  # distinct index positions = distinct shingles
        if not len(hit):
            return {}
        counts = np.bincount(self.bench[hit], minlength=len(self.names))
        return {self.names[b]: int(counts[b]) for b in np.flatnonzero(counts)}


def window_hashes(th: np.ndarray, lengths: tuple[int, ...]) -> np.ndarray:
    """Hashes of every window of each length in `lengths` over token hashes `th`, concatenated.

    Equal to ``np.concatenate([ngram_hashes(th, n) for n in lengths if n <= len(th)])`` (a test
    holds the two together) but in one pass: the polynomial accumulator of `ngram_hashes` after
    j steps *is* the unfinalized (j+1)-gram hash, so the windows of lengths 8..13 cost what the
    13-grams alone cost (measured on 2 KB English documents: 0.10 ms -> 0.05 ms).
    """
    m = len(th)
    wanted = sorted(n for n in set(lengths) if 1 <= n <= m)
    if not wanted:
        return np.empty(0, dtype=np.uint64)
    wanted_set = set(wanted)
    out = [_finalize(th)] if 1 in wanted_set else []
    acc = th
    with np.errstate(over="ignore"):
        for n in range(2, wanted[-1] + 1):
            acc = acc[: m - n + 1] * _MULT + th[n - 1 :]  # acc[i] now covers th[i : i + n]
            if n in wanted_set:
                out.append(_finalize(acc))
    return np.concatenate(out) if len(out) > 1 else out[0]


def _item_shingles(item: EvalItem, ngram: int, min_short: int, out: list[np.ndarray],
                   lengths: set[int]) -> tuple[bool, bool]:
    """Append an item's shingle hashes to `out`; returns (anything indexed, used a short shingle)."""
    got = short = False
    th = text_token_hashes(item.text)
    if len(th) >= ngram:
        out.append(ngram_hashes(th, ngram))
        lengths.add(ngram)
        got = True
    elif len(th) >= min_short:
        out.append(ngram_hashes(th, ngram))  # shorter than n: one hash of the whole sequence
        lengths.add(len(th))
        got = short = True
    # The question alone adds something only when it is itself shorter than n (longer questions'
    # n-grams are a prefix of the text's) and different from the text.
    if item.question and item.question != item.text:
        qh = text_token_hashes(item.question)
        if min_short <= len(qh) < ngram:
            out.append(ngram_hashes(qh, ngram))
            lengths.add(len(qh))
            got = short = True
    return got, short


# ------------------------------------------------------------------------------------------------
# the step


def configured_cjk_ngram(cfg: DecontamConfig) -> int:
    """The CJK window of a recipe: `cjk_ngram` when the schema has it, else `ngram`."""
    return getattr(cfg, "cjk_ngram", None) or cfg.ngram  # field proposed for DecontamConfig


class DecontamFilter(Filter):
    """Reject documents that contain evaluation n-grams (see the module doc)."""

    name = "decontam"

    def __init__(self, cfg: DecontamConfig, index: DecontamIndex | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        cjk_ngram = configured_cjk_ngram(cfg)
        if index is None:
            index = DecontamIndex.from_config(cfg)
        elif (index.ngram, index.cjk_ngram) != (cfg.ngram, cjk_ngram):
            raise ValueError(f"decontam index was built with ngram={index.ngram}, cjk_ngram={index.cjk_ngram} "
                             f"but the recipe has ngram={cfg.ngram}, cjk_ngram={cjk_ngram}: rebuild it")
        self.index = index
        if not len(index):
            log.warning("decontam: the index is empty (no sources?): every document is kept")

    def reject_reason(self, doc: Document) -> str | None:
        if not self.cfg.applies_to(doc.domain):
            return None
        counts = self.index.matches(doc.text)
        if not counts:
            return None
        total = sum(counts.values())
        self.count(doc, "ngram_matches", total)
        # Most matches first; ties go to the earlier source in the recipe.
        order = sorted(counts, key=lambda k: (-counts[k], self.index.names.index(k)))
        info: dict[str, Any] = {"benchmark": order[0], "matches": counts[order[0]]}
        if len(order) > 1:
            info["also"] = {k: counts[k] for k in order[1:]}
        doc.meta["decontam"] = info
        if total < self.cfg.min_matches:
            return None
        return f"decontam_{order[0]}"
