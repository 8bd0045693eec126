"""PII redaction: recall on the generated evaluation set and cost per MB, old vs new, same run.

The baseline is the redactor of the last commit that did not use libphonenumber (``--baseline``,
default ``8094134~1``: the version before national phone formats, SSN and IBAN), read with
``git show`` into a temporary module, so both implementations run in this process on the same
text and the same machine.

1. **Evaluation set** (`tests/data/pii_evalset.py`, seeded): recall per PII type (the value's
   place holds its type's token) and decoys kept, for the baseline and the current redactor.
2. **Cost** on a realistic corpus: the per-domain sources of `bench/_corpus.py` (WikiText-2,
   the dolma Common Crawl sample, LAMBADA, CMRC 2018, DRCD, Python stdlib modules) from
   ``../shared/data``; without it, the demo corpus's pydoc topics (`smelt.demo.corpus`). ms per MB of UTF-8 text
   (1 MB = 10^6 bytes), best of ``--repeat`` passes after one untimed pass, with the ratio new / baseline per domain and
   overall. The machine may be shared: the two are timed alternately, pass by pass.

    python bench/redact.py                 # ~1 minute on 2 cores
    python bench/redact.py --eval-only     # evaluation figures only, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from smelt.data.steps.redact import ALL_TYPES, Redactor  # noqa: E402
from tests.data.pii_evalset import build, score  # noqa: E402


def load_baseline(rev: str):
    """The redact module at git revision `rev`, imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:src/smelt/data/steps/redact.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "redact_baseline.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("redact_baseline", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def corpus(data: Path) -> dict[str, list[str]]:
    if (data / "wikitext2").is_dir():
        from _corpus import load_sources

        return load_sources(data)
    print(f"(no shared data at {data}: timing the demo corpus's pydoc topics instead)")
    from smelt.demo.corpus import pydoc_topic_docs

    return {"pydoc": [d["text"] for d in pydoc_topic_docs()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="8094134~1", help="git revision of the old redactor")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("SMELT_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    old = load_baseline(args.baseline)
    new_r, old_r = Redactor(), old.Redactor()
    figures: dict = {"eval": {}, "cost": {}}

    examples = build(seed=args.seed)
    print(f"evaluation set: {len(examples)} sentences (seed {args.seed})")
    for name, fn in (("baseline", lambda t: old_r(t)[0]), ("new", lambda t: new_r(t)[0])):
        sc = score(fn, examples)
        per = {t: round(sc.caught[t] / sc.pii[t], 4) for t in ALL_TYPES if sc.pii[t]}
        figures["eval"][name] = {"recall": round(sc.recall, 4), "decoys_kept": round(sc.decoys_kept, 4),
                                 "pii": sum(sc.pii.values()), "decoys": sum(sc.decoys.values()), "recall_by_type": per}
        print(f"  {name:9s} recall {sc.recall:.4f} ({sum(sc.caught.values())}/{sum(sc.pii.values())})  "
              f"decoys kept {sc.decoys_kept:.4f} ({sum(sc.kept.values())}/{sum(sc.decoys.values())})")
        print("            by type: " + ", ".join(f"{t} {v:.3f}" for t, v in per.items()))
    if args.eval_only:
        print(json.dumps(figures))
        return

    src = corpus(args.data_dir)
    print(f"\ncost, ms per MB (best of {args.repeat}):")
    print(f"  {'domain':14s} {'MB':>6s} {'baseline':>9s} {'new':>9s} {'ratio':>6s}")
    tot = {"baseline": 0.0, "new": 0.0, "mb": 0.0}
    for dom, docs in src.items():
        mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
        best = {"baseline": float("inf"), "new": float("inf")}
        for r in (old_r, new_r):  # warm-up, untimed: libphonenumber loads a region's metadata on first use
            for t in docs:
                r(t)
        for _ in range(args.repeat):
            for name, r in (("baseline", old_r), ("new", new_r)):
                t0 = time.perf_counter()
                for t in docs:
                    r(t)
                best[name] = min(best[name], time.perf_counter() - t0)
        tot["baseline"] += best["baseline"]
        tot["new"] += best["new"]
        tot["mb"] += mb
        b, n = best["baseline"] / mb * 1e3, best["new"] / mb * 1e3
        figures["cost"][dom] = {"mb": round(mb, 3), "baseline_ms_per_mb": round(b, 2), "new_ms_per_mb": round(n, 2),
                                "ratio": round(n / b, 3)}
        print(f"  {dom:14s} {mb:6.2f} {b:9.2f} {n:9.2f} {n / b:6.2f}")
    b, n = tot["baseline"] / tot["mb"] * 1e3, tot["new"] / tot["mb"] * 1e3
    figures["cost"]["all"] = {"mb": round(tot["mb"], 3), "baseline_ms_per_mb": round(b, 2),
                              "new_ms_per_mb": round(n, 2), "ratio": round(n / b, 3)}
    print(f"  {'all':14s} {tot['mb']:6.2f} {b:9.2f} {n:9.2f} {n / b:6.2f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
