"""The curation stage with its run directory on a store vs on local disk.

`runs_dir` as an fsspec URL mirrors the run directory file by file (`smelt.fsutil.RunMirror`):
every committed file is uploaded by the process that wrote it, markers last, and the store is
listed for markers. This measures what that costs on the bench corpus (`_corpus.build_corpus`:
real English, Chinese and code text from ``../shared/data``, with planted near-duplicates), with
heuristics, exact and MinHash dedup on, at `--workers`:

- ``local``: a plain run directory;
- ``file://``: a "store" that is another directory on the same disk, so the figure is smelt's own
  overhead (one more copy of every file, the listings, the lock object), not a network's;
- ``resume``: the same stage again on a machine with an empty stage directory, which finds the
  manifest on the store and skips.

Prints seconds, the ratio to local, and the files and bytes on the store; checks that the store
holds the local run's bytes. One JSON line at the end.

    python bench/object_store.py [--docs 4000] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _corpus import build_corpus  # noqa: E402

from smelt.config import parse_recipe  # noqa: E402
from smelt.data.curate import run_data_stage  # noqa: E402
from smelt.fsutil import activate_mirror  # noqa: E402
from smelt.run import use_store  # noqa: E402


def _recipe(corpus_root: Path, runs_dir: str, workers: int):
    return parse_recipe({"name": "b", "runs_dir": runs_dir, "data": {
        "inputs": [{"path": str(corpus_root / d), "glob": "*.jsonl", "domain": d}
                   for d in sorted(p.name for p in corpus_root.iterdir() if p.is_dir())],
        "workers": workers, "language": {"allowed": ["en", "zh"]},
        "dedup": {"minhash": {"enabled": True}}}})


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for kind in ("clean", "rejects", "duplicates") for p in sorted((root / kind).rglob("*")) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smelt-store-bench-"))
    os.environ["SMELT_STAGE_DIR"] = str(work / "stage")
    try:
        corpus = build_corpus(Path(args.data), work / "corpus", n_docs=args.docs)
        print(f"corpus: {corpus.n_docs:,} docs, {corpus.n_bytes / 1e6:.2f} MB, {args.workers} workers", flush=True)
        res: dict[str, dict[str, float]] = {}
        best = {"local": 1e9, "file": 1e9}
        for i in range(args.repeat):
            r = _recipe(work / "corpus", str(work / f"local-{i}"), args.workers)
            t0 = time.perf_counter()
            run_data_stage(r.data, r.run_dir)
            best["local"] = min(best["local"], time.perf_counter() - t0)
            local_dir = r.run_dir / "data"
            store = work / f"store-{i}"
            r = _recipe(work / "corpus", f"file://{store}", args.workers)
            use_store(r, ["data"])
            try:
                t0 = time.perf_counter()
                run_data_stage(r.data, r.run_dir)
                best["file"] = min(best["file"], time.perf_counter() - t0)
            finally:
                activate_mirror(None)
        assert _digest(store / "b" / "data") == _digest(local_dir), "the store differs from the local run"
        files = [p for p in (store / "b").rglob("*") if p.is_file()]
        shutil.rmtree(work / "stage")  # a new machine
        r = _recipe(work / "corpus", f"file://{store}", args.workers)
        use_store(r, ["data"])
        try:
            t0 = time.perf_counter()
            run_data_stage(r.data, r.run_dir)
            resume = time.perf_counter() - t0
        finally:
            activate_mirror(None)
        res = {"local_s": round(best["local"], 3), "file_store_s": round(best["file"], 3),
               "ratio": round(best["file"] / best["local"], 3), "store_files": len(files),
               "store_mb": round(sum(p.stat().st_size for p in files) / 1e6, 2),
               "resume_on_new_machine_s": round(resume, 3)}
        print(f"local {res['local_s']:.2f} s, file:// store {res['file_store_s']:.2f} s "
              f"({res['ratio']:.2f}x); {res['store_files']} files, {res['store_mb']} MB on the store, "
              f"byte-identical; complete stage found on the store from an empty stage in "
              f"{res['resume_on_new_machine_s']:.2f} s", flush=True)
        print(json.dumps({"bench": "object_store", "docs": corpus.n_docs, "workers": args.workers, **res}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
