"""Peak memory of the curation stage's dedup phase in the driver, single-process vs sharded.

The single-process phase gathers every document's MinHash signature in the driver; the sharded
one (`data.executor.sharded_dedup`) runs exact dedup by hash partition, one task per LSH band,
Jaccard verification by pair shard and the connected components by node partition in the worker
pool, and the driver holds only the duplicates (one row each). The corpus is the demo generator's
web pages (planted exact and near duplicates), 1x, 4x, 16x as many, each copy generated with its
own seed and ids, so documents, signatures and candidate pairs all grow with it. Peak =
tracemalloc's peak of Python and numpy allocations in the driver during the dedup phase (the
worker processes are not counted: a band task holds one band of keys).

    python bench/dedup_memory.py [--docs 1000] [--copies 1,4,16] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from smelt.config import parse_recipe  # noqa: E402
from smelt.data import curate  # noqa: E402
from smelt.data.synth import generate  # noqa: E402


def write_corpus(root: Path, docs: int, copies: int) -> int:
    root.mkdir(parents=True)
    n = 0
    for c in range(copies):
        with open(root / f"part-{c:03d}.jsonl", "w", encoding="utf-8") as fh:
            for d in generate(docs, seed=5 + c):
                fh.write(json.dumps({"id": f"c{c}-{d.id}", "text": d.text}, ensure_ascii=False) + "\n")
                n += 1
    return n


def measure(inp: Path, runs: Path, sharded: bool, workers: int) -> dict[str, float]:
    r = parse_recipe({"name": f"mem-{sharded}", "runs_dir": str(runs), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": workers,
        "executor": {"sharded_dedup": sharded}, "language": {"allowed": ["en", "zh"]},
        "dedup": {"minhash": {"enabled": True, "verify_jaccard": 0.5}, "lines": {"enabled": False}}}})
    real = curate.dedup_phase
    out: dict[str, float] = {}

    def traced(*a, **kw):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            out["seconds"] = time.perf_counter() - t0
            out["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()

    curate.dedup_phase = traced
    try:
        stats = curate.run_data_stage(r.data, r.run_dir)
    finally:
        curate.dedup_phase = real
    out["duplicates"] = stats["documents"]["duplicates"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1000, help="generated pages per copy")
    ap.add_argument("--copies", default="1,4,16")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smelt-dedup-mem-"))
    rows = []
    try:
        for c in [int(x) for x in args.copies.split(",")]:
            inp = work / f"in-{c}"
            n = write_corpus(inp, args.docs, c)
            one = measure(inp, work / f"runs-{c}", False, args.workers)
            sh = measure(inp, work / f"runs-{c}", True, args.workers)
            assert one["duplicates"] == sh["duplicates"]
            rows.append({"copies": c, "docs": n, "single": one, "sharded": sh})
            print(f"{c:>3}x {n:>7,} docs: single-process peak {one['peak_mb']:7.1f} MB in {one['seconds']:6.2f} s | "
                  f"sharded peak {sh['peak_mb']:7.1f} MB in {sh['seconds']:6.2f} s | ratio "
                  f"{one['peak_mb'] / sh['peak_mb']:.1f}x | duplicates {one['duplicates']:,}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
