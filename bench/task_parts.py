"""One big JSON-lines file, curated as one task vs as parts of `data.max_task_mb`.

Before `max_task_mb`, a task was a group of whole files, so a corpus that arrives as one big file
ran on one core whatever `workers` said. The file here is built from the shared samples
(WikiText-2 paragraphs, LAMBADA passages, the dolma Common Crawl pages, CMRC 2018 contexts),
repeated with fresh ids (and a counter appended, so that exact dedup does not remove the copies)
to `--mb`; the stage runs with the heuristics, language ID, exact and MinHash dedup, at
`--workers`, with `max_task_mb: null` (one task) and with `--part-mb`. Prints wall seconds, docs/s,
the number of tasks and the ratio, and checks that both runs wrote the same output bytes.

    python bench/task_parts.py [--mb 30] [--part-mb 8] [--workers 2] [--zstd]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from smelt.config import parse_recipe  # noqa: E402
from smelt.data.curate import run_data_stage  # noqa: E402


def samples(data: Path) -> list[str]:
    out = [p for p in (data / "wikitext2" / "valid.txt").read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    for line in (data / "lambada" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines():
        out.append(json.loads(line)["text"])
    for f in sorted((data / "web_cc_dolma_sample").glob("*.jsonl")):
        out += [json.loads(x)["text"] for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    for f in sorted((data / "cmrc2018").glob("*.json")):
        for art in json.loads(f.read_text(encoding="utf-8"))["data"]:
            out += [p["context"] for p in art["paragraphs"]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=30.0)
    ap.add_argument("--part-mb", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zstd", action="store_true", help="compress the file (.jsonl.zst): parts of decompressed bytes")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("SMELT_SHARED_DATA", REPO.parent / "shared" / "data")))
    args = ap.parse_args()
    texts = samples(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="smelt-parts-"))
    try:
        big = work / "big.jsonl"
        n = size = 0
        with open(big, "w", encoding="utf-8") as fh:
            while size < args.mb * 2**20:
                rec = {"id": f"d{n}", "text": f"{texts[n % len(texts)]}\n{n}"}
                line = json.dumps(rec, ensure_ascii=False) + "\n"
                fh.write(line)
                size += len(line.encode())
                n += 1
        if args.zstd:
            import zstandard

            packed = big.with_suffix(".jsonl.zst")
            packed.write_bytes(zstandard.ZstdCompressor(level=3).compress(big.read_bytes()))
            big.unlink()
            big = packed
        print(f"{big.name}: {big.stat().st_size / 2**20:.1f} MB on disk, {n:,} documents, {args.workers} workers",
              flush=True)
        res = {}
        for label, mb in (("one task", None), (f"parts of {args.part_mb:g} MB", args.part_mb)):
            r = parse_recipe({"name": "b", "runs_dir": str(work / label.replace(" ", "-")), "data": {
                "inputs": [{"path": str(big), "domain": "web"}], "workers": args.workers, "max_task_mb": mb,
                "language": {"allowed": ["en", "zh"]}, "dedup": {"minhash": {"enabled": True}}}})
            t0 = time.perf_counter()
            stats = run_data_stage(r.data, r.run_dir)
            sec = time.perf_counter() - t0
            tasks = json.loads((r.run_dir / "data" / "manifest.json").read_text())["tasks"]
            data = r.run_dir / "data"
            files = {str(p.relative_to(data)): p.read_bytes() for kind in ("clean", "rejects", "duplicates")
                     for p in sorted((data / kind).rglob("*")) if p.is_file()}
            res[label] = (sec, (stats["documents"], files))
            print(f"{label:>18}: {tasks:3d} tasks, {sec:7.1f} s, {n / sec:8,.0f} docs/s, kept "
                  f"{stats['documents']['kept']:,}", flush=True)
        (a, da), (b, db) = res.values()
        assert da[0] == db[0], (da[0], db[0])
        assert da[1] == db[1], "the shards differ"
        print(f"output: {len(da[1])} files, byte-identical")
        print(f"ratio (one task / parts): {a / b:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
