"""Measure a tokenizer on curated documents: compression, vocabulary use, lossless round trip.

`evaluate_tokenizer` encodes the first `docs_per_domain` documents of every domain (shard files
in the order given, so the same call always sees the same documents) exactly as the packer
does: special-token strings inside the text are ordinary text (``encode_special_tokens``), and
no special tokens are added. For each tokenizer (and the optional `compare` one, on the same
documents) it reports, per domain, per language and overall:

- ``docs``, ``bytes`` (UTF-8), ``chars`` (code points), ``tokens``;
- ``bytes_per_token`` and ``chars_per_token`` (higher = better compression; for Chinese, the
  rule of thumb is ~1.5 characters per token at 32k-64k vocabularies);
- ``tokens_per_doc`` and ``roundtrip_failures``;

plus ``vocab_used`` / ``vocab_used_share`` (distinct ids seen over the vocabulary size) and the
round trip of EVERY document: ``decode(encode(text)) == text``, with the first few mismatches
(document id, first differing character offset, both sides around it).

Language is ``doc.meta["language"]`` (set by the curation stage's language step) when present,
else ``"cjk"`` / ``"other"`` by the share of Han/kana characters (`smelt.data.text.is_cjk_text`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smelt.data.io import read_shard
from smelt.data.text import is_cjk_text
from smelt.tokenizer.train import load_tokenizer, replace_surrogates, tokenizer_sha256

log = logging.getLogger(__name__)

MAX_MISMATCHES = 5  # mismatches kept in the result (all are counted)
_CONTEXT = 24  # characters shown on each side of a round-trip mismatch
_BATCH = 256  # documents per encode_batch call


@dataclass(frozen=True)
class _EvalDoc:
    id: str
    domain: str
    language: str
    text: str
    n_bytes: int  # UTF-8 bytes; lone surrogates (not UTF-8 at all) count as U+FFFD's 3 bytes
    encodable: bool  # False: lone surrogates, encoded as U+FFFD, so the round trip fails


def _language(meta: dict[str, Any], text: str) -> str:
    lang = meta.get("language") if meta else None
    if isinstance(lang, str) and lang:
        return lang
    return "cjk" if is_cjk_text(text) else "other"


def _read_docs(shard_files: dict[str, list[Path]], docs_per_domain: int) -> list[_EvalDoc]:
    out: list[_EvalDoc] = []
    for domain in sorted(shard_files):
        n = 0
        for path in shard_files[domain]:
            if n >= docs_per_domain:
                break
            for doc in read_shard(path):
                if not doc.text:
                    continue
                safe = replace_surrogates(doc.text)
                out.append(_EvalDoc(doc.id, domain, _language(doc.meta, doc.text), doc.text,
                                    len(safe.encode("utf-8")), safe is doc.text))
                n += 1
                if n >= docs_per_domain:
                    break
        if n == 0:
            log.warning("tokenizer eval: domain %s has no documents", domain)
    return out


class _Group:
    """Running totals for one row of the table (a domain, a language, or everything)."""

    __slots__ = ("docs", "bytes", "chars", "tokens", "failures")

    def __init__(self) -> None:
        self.docs = self.bytes = self.chars = self.tokens = self.failures = 0

    def add(self, d: _EvalDoc, n_tokens: int, ok: bool) -> None:
        self.docs += 1
        self.bytes += d.n_bytes
        self.chars += len(d.text)
        self.tokens += n_tokens
        self.failures += not ok

    def as_dict(self) -> dict[str, Any]:
        t = self.tokens
        return {"docs": self.docs, "bytes": self.bytes, "chars": self.chars, "tokens": t,
                "bytes_per_token": self.bytes / t if t else None,
                "chars_per_token": self.chars / t if t else None,
                "tokens_per_doc": t / self.docs if self.docs else None,
                "roundtrip_failures": self.failures}


def _mismatch(d: _EvalDoc, got: str) -> dict[str, Any]:
    i = next((k for k, (a, b) in enumerate(zip(d.text, got, strict=False)) if a != b), min(len(d.text), len(got)))
    lo = max(0, i - _CONTEXT)
    return {"id": d.id, "domain": d.domain, "offset": i, "expected_chars": len(d.text), "got_chars": len(got),
            "expected": d.text[lo:i + _CONTEXT], "got": got[lo:i + _CONTEXT]}


def _evaluate_one(path: Path, docs: list[_EvalDoc]) -> dict[str, Any]:
    tok = load_tokenizer(path, encode_special_tokens=True)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    overall, domains, languages = _Group(), {}, {}
    used = np.zeros(vocab, dtype=bool)
    mismatches: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in range(0, len(docs), _BATCH):
        batch = docs[start:start + _BATCH]
        encs = tok.encode_batch([d.text if d.encodable else replace_surrogates(d.text) for d in batch],
                                add_special_tokens=False)
        ids = [e.ids for e in encs]
        decoded = tok.decode_batch(ids, skip_special_tokens=False)
        for d, e_ids, got in zip(batch, ids, decoded, strict=True):
            ok = got == d.text
            if not ok and len(mismatches) < MAX_MISMATCHES:
                mismatches.append(_mismatch(d, got))
            if e_ids:
                used[np.asarray(e_ids, dtype=np.int64)] = True
            for g in (overall, domains.setdefault(d.domain, _Group()), languages.setdefault(d.language, _Group())):
                g.add(d, len(e_ids), ok)
    seconds = time.perf_counter() - t0
    n_used = int(used.sum())
    return {
        "path": str(path),
        "sha256": tokenizer_sha256(path),
        "vocab_size": vocab,
        "overall": overall.as_dict(),
        "domains": {k: v.as_dict() for k, v in sorted(domains.items())},
        "languages": {k: v.as_dict() for k, v in sorted(languages.items())},
        "vocab_used": n_used,
        "vocab_used_share": n_used / vocab if vocab else 0.0,
        "roundtrip": {"checked": overall.docs, "failures": overall.failures, "mismatches": mismatches},
        "seconds": round(seconds, 3),
    }


def evaluate_tokenizer(tokenizer: Path, shard_files: dict[str, list[Path]], docs_per_domain: int,
                       compare: Path | None = None) -> dict:
    """Evaluate `tokenizer` (and `compare`, side by side) on `docs_per_domain` documents per domain.

    Returns ``{"docs_per_domain", "docs", "tokenizer": {...}, "compare": {...} | None}`` where each
    tokenizer entry holds ``overall``, ``domains``, ``languages`` (rows as described in the module
    docstring), ``vocab_used[_share]`` and ``roundtrip``.
    """
    if docs_per_domain < 1:
        raise ValueError(f"docs_per_domain must be >= 1, got {docs_per_domain}")
    docs = _read_docs(shard_files, docs_per_domain)
    if not docs:
        raise ValueError("tokenizer eval: no documents to evaluate")
    result: dict[str, Any] = {"docs_per_domain": docs_per_domain, "docs": len(docs),
                              "tokenizer": _evaluate_one(Path(tokenizer), docs), "compare": None}
    if compare is not None:
        result["compare"] = _evaluate_one(Path(compare), docs)
    for key in ("tokenizer", "compare"):
        r = result[key]
        if r and r["roundtrip"]["failures"]:
            first = r["roundtrip"]["mismatches"][0]
            log.warning("tokenizer eval: %s fails the round trip on %d of %d documents (first: %s at char %d)",
                        r["path"], r["roundtrip"]["failures"], r["roundtrip"]["checked"], first["id"], first["offset"])
    return result


# --------------------------------------------------------------------------------------------
# text table


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _rows(result: dict[str, Any]) -> Iterable[tuple[str, str]]:
    main = result["tokenizer"]
    for d in main["domains"]:
        yield "domain", d
    for lang in main["languages"]:
        yield "language", lang
    yield "all", ""


def _row(r: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    if kind == "all":
        return r["overall"]
    return r["domains" if kind == "domain" else "languages"].get(name)


def format_eval_table(result: dict) -> str:
    """A plain-text table of `evaluate_tokenizer`'s result (compare columns when present)."""
    main, cmp_ = result["tokenizer"], result.get("compare")
    head = ["group", "docs", "MB", "chars", "tokens", "bytes/tok", "chars/tok", "fail"]
    if cmp_:
        head += ["cmp tokens", "cmp bytes/tok", "cmp chars/tok", "cmp fail", "tokens ratio"]
    lines = [head]
    for kind, name in _rows(result):
        a = _row(main, kind, name)
        label = "all" if kind == "all" else f"{kind}:{name}"
        row = [label, str(a["docs"]), f"{a['bytes'] / 1e6:.2f}", f"{a['chars']:,}", f"{a['tokens']:,}",
               _fmt(a["bytes_per_token"]), _fmt(a["chars_per_token"]), str(a["roundtrip_failures"])]
        if cmp_:
            b = _row(cmp_, kind, name)
            ratio = a["tokens"] / b["tokens"] if b and b["tokens"] else None
            row += [f"{b['tokens']:,}", _fmt(b["bytes_per_token"]), _fmt(b["chars_per_token"]),
                    str(b["roundtrip_failures"]), _fmt(ratio)] if b else ["-"] * 5
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
           for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))

    def summary(tag: str, r: dict[str, Any]) -> list[str]:
        rt = r["roundtrip"]
        s = [f"{tag}: {r['path']}  vocab {r['vocab_size']:,}, used {r['vocab_used']:,} "
             f"({100 * r['vocab_used_share']:.1f}%), round trip {rt['checked'] - rt['failures']}/{rt['checked']} exact"]
        for m in rt["mismatches"]:
            s.append(f"    mismatch {m['domain']}/{m['id']} at char {m['offset']}: "
                     f"expected {m['expected']!r} got {m['got']!r}")
        return s

    out += [""] + summary("tokenizer", main)
    if cmp_:
        out += summary("compare  ", cmp_)
        out.append("tokens ratio = tokenizer tokens / compare tokens (below 1: the tokenizer compresses better)")
    return "\n".join(out)
