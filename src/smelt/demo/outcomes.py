"""What curation did with each planted problem: ``meta["planted"]`` against the outcome.

`planted_outcomes(data_dir)` reads the curated shards (``clean/``, ``rejects/``,
``duplicates/``) of a run whose inputs carry ``meta.planted`` labels (the demo's web domain,
`smelt.data.synth`) and cross-tabulates label x outcome, where the outcome is ``kept``,
``kept, PII redacted``, ``kept, boilerplate removed``, ``kept, encoding fixed`` (planted mojibake
whose kept text no longer has any, see `_still_garbled`), ``duplicate`` or the reject
reason ``step/reason``. Each label has an expected outcome; ``caught`` counts the documents that
got it, so the report can show, per planted problem, "n planted, m caught, by which rule".
The result is cached in ``data/planted.json`` keyed by the data stage's manifest key.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from smelt.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)

# What "caught" means for each label (synth.py's kinds).
EXPECTED: dict[str, str] = {
    "clean": "kept",
    "exact_dup": "duplicate",
    "near_dup": "duplicate",
    "pii": "redacted",
    "boilerplate": "redacted",
    "spam": "rejected",
    "mojibake": "repaired or rejected",
    "short": "rejected",
    "contaminated": "rejected",
}


# Cache format of data/planted.json; bump when outcomes or EXPECTED change meaning, so a report
# regenerated for an already curated run does not show the old classification.
_CACHE_VERSION = 2

# synth._mojibake reads UTF-8 as Latin-1: every non-ASCII character becomes a lead byte's
# character (U+00C2-U+00F4) followed by continuation bytes' (U+0080-U+00BF). The C1 ones
# (U+0080-U+009F) are deleted by normalize.strip_control when the text is not repaired, but each
# page keeps some pair with a U+00A0-U+00BF continuation ("Ã©" of café, "ä¸" of 中): so this pair
# is the planted damage, checked independently of the ftfy repair it is meant to verify.
_LATIN1_MOJIBAKE_RE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf]")


def _still_garbled(text: str) -> bool:
    """Does a kept page that was planted as mojibake still hold mojibake?"""
    from smelt.data.steps.normalize import has_mojibake

    return _LATIN1_MOJIBAKE_RE.search(text) is not None or has_mojibake(text)


def _outcome(kind: str, doc: Any) -> str:
    if kind == "duplicates":
        return "duplicate"
    if kind == "rejects":
        return f"{doc.meta.get('rejected_by', '?')}/{doc.meta.get('reason', '?')}"
    if doc.meta.get("planted") == "mojibake":
        return "kept" if _still_garbled(doc.text) else "kept, encoding fixed"
    found = doc.meta.get("pii")
    found = found if isinstance(found, dict) else {}
    if any(v for k, v in found.items() if k != "boilerplate"):
        return "kept, PII redacted"
    planted = doc.meta.get("boilerplate_lines")
    if isinstance(planted, list) and planted:
        # Removed by any step (repost-line rule, C4 line rules, repeated-line dedup): what counts
        # is whether the planted lines are still in the kept text.
        left = sum(1 for line in planted if isinstance(line, str) and line in doc.text)
        if left == 0:
            return "kept, boilerplate removed"
        return "kept, boilerplate partly removed" if left < len(planted) else "kept"
    return "kept, boilerplate removed" if found.get("boilerplate") else "kept"


def _is_caught(label: str, outcome: str) -> bool:
    want = EXPECTED.get(label)
    if want == "kept":
        return outcome.startswith("kept")
    if want == "duplicate":
        return not outcome.startswith("kept")  # removed, as a duplicate or by an earlier rule
    if want == "redacted":
        if label == "pii":
            return outcome == "kept, PII redacted"
        # "partly": repeated-line dedup keeps a footer in its first page (keep_first) by design
        return outcome in ("kept, boilerplate removed", "kept, boilerplate partly removed")
    if want == "rejected":
        return not outcome.startswith("kept") and outcome != "duplicate"
    if want == "repaired or rejected":
        return outcome == "kept, encoding fixed" or (not outcome.startswith("kept") and outcome != "duplicate")
    return False


def planted_outcomes(data_dir: Path, use_cache: bool = True) -> dict[str, Any] | None:
    """{label: {"planted", "caught", "expected", "outcomes": {outcome: n}}} or None when no
    document carries a planted label (or curation has not completed)."""
    from smelt.data.io import read_shard

    data_dir = Path(data_dir)
    mpath = data_dir / "manifest.json"
    if not mpath.is_file():
        return None
    key = read_json(mpath).get("key")
    cache = data_dir / "planted.json"
    if use_cache and cache.is_file():
        c = read_json(cache)
        if c.get("key") == key and c.get("version") == _CACHE_VERSION:
            return c["labels"] or None
    table: dict[str, Counter] = {}
    for kind in ("clean", "rejects", "duplicates"):
        root = data_dir / kind
        for f in sorted(root.rglob("*")) if root.is_dir() else []:
            if not f.is_file() or f.name.startswith("."):
                continue
            for doc in read_shard(f):
                label = doc.meta.get("planted")
                if label is None:
                    continue
                table.setdefault(str(label), Counter())[_outcome(kind, doc)] += 1
    labels = {}
    for label in sorted(table, key=lambda k: (k != "clean", k)):
        outs = table[label]
        labels[label] = {"planted": sum(outs.values()), "expected": EXPECTED.get(label, "?"),
                         "caught": sum(n for o, n in outs.items() if _is_caught(label, o)),
                         "outcomes": dict(outs.most_common())}
    atomic_write_json(cache, {"key": key, "version": _CACHE_VERSION, "labels": labels})
    return labels or None
