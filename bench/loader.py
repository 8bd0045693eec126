"""Training data loader throughput: `MixtureLoader.batch()` against what a training step consumes.

Builds a token corpus (three domains, `zh:en:code = 4:4:2`, document lengths log-normal around
a few hundred tokens as in web text and source files) with `smelt.tokens.shards.write_shard`
into a temporary directory, or reads a real `smelt pack` output with ``--tokens-dir``. For
seq_len 256 / 1024 / 2048 and each objective it times ``batch(start, global_batch)`` over
consecutive batches (fresh sample indices every call: no cache helps) and reports samples/s
and tokens/s (input tokens: global_batch x seq_len per batch), in one process, and the ratio
to the consumption of a 2-core CPU training step: a 7M-parameter LLaMA at seq 256, batch 8 ran
at ~2.7k tokens/s fp32 eager (DESIGN.md, "Facts measured on these machines"). Goal (issue 3):
>= 100x.

    python bench/loader.py                          # ~1 minute
    python bench/loader.py --seconds 1 --objectives causal fim
    python bench/loader.py --tokens-dir runs/demo/tokens --weights zh=4,en=4,code=2

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from smelt.config import LoaderConfig, ObjectiveConfig
from smelt.tokens.loader import MixtureLoader
from smelt.tokens.shards import write_shard

TRAIN_STEP_TOKENS_PER_S = 2700.0  # DESIGN.md: 7M LLaMA, seq 256, batch 8, fp32 eager, 2 cores
TARGET_RATIO = 100.0
EOS = 2


def build_corpus(root: Path, tokens_per_domain: dict[str, int], seed: int = 0) -> Path:
    """Token shards + manifest.json like `smelt pack` writes them (ids drawn uniformly above the
    special tokens; the loader's speed does not depend on their values)."""
    rng = np.random.default_rng(seed)
    # Median document length in tokens: web/wiki prose a few hundred, code files longer.
    median = {"zh": 350, "en": 450, "code": 900}
    manifest: dict[str, Any] = {"format_version": 1, "tokenizer_sha256": "bench", "vocab_size": 32_000,
                                "dtype": "uint16", "eos_id": EOS, "bos_id": 1, "pad_id": 0, "domains": {},
                                "complete": True}
    for domain, n_tok in tokens_per_domain.items():
        lens = np.maximum(1, rng.lognormal(np.log(median.get(domain, 400)), 1.0, size=n_tok // 100)).astype(np.int64)
        lens = lens[: int(np.searchsorted(np.cumsum(lens + 1), n_tok)) + 1]
        flat = rng.integers(64, 32_000, size=int((lens + 1).sum()), dtype=np.uint16)
        ends = np.cumsum(lens + 1)
        flat[ends - 1] = EOS
        shards, half = [], len(ends) // 2
        for i, (a, b) in enumerate(((0, half), (half, len(ends)))):  # two shards: windows cross them
            lo = int(ends[a - 1]) if a else 0
            write_shard(root / domain / f"train-{i:05d}", flat[lo: int(ends[b - 1])], ends=ends[a:b] - lo)
            shards.append(f"train-{i:05d}")
        manifest["domains"][domain] = {"train": {"tokens": int(ends[-1]), "docs": len(ends), "shards": shards},
                                       "val": {"tokens": 0, "docs": 0, "shards": []}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def bench_one(tokens_dir: Path, seq_len: int, kind: str, weights: dict[str, float] | None, global_batch: int,
              seconds: float, document_mask: bool) -> dict[str, Any]:
    cfg = LoaderConfig(seq_len=seq_len, weights=weights, document_mask=document_mask,
                       objective=ObjectiveConfig(kind=kind))
    t0 = time.perf_counter()
    loader = MixtureLoader(tokens_dir, cfg, seed=1234)
    init_s = time.perf_counter() - t0
    loader.batch(0, global_batch)  # warm: page cache, permutation keys
    start, n_batches = global_batch, 0
    t0 = time.perf_counter()
    while True:
        loader.batch(start, global_batch)
        start += global_batch
        n_batches += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    samples = n_batches * global_batch
    tok_s = samples * seq_len / dt
    return {"seq_len": seq_len, "objective": kind, "global_batch": global_batch, "batches": n_batches,
            "init_s": round(init_s, 4), "samples_per_s": round(samples / dt, 1), "tokens_per_s": round(tok_s),
            "ms_per_batch": round(1000 * dt / n_batches, 2),
            "ratio_vs_train_step": round(tok_s / TRAIN_STEP_TOKENS_PER_S, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens-dir", type=Path, help="a `smelt pack` output (default: build a synthetic corpus)")
    ap.add_argument("--weights", default="zh=4,en=4,code=2", help="domain=weight,... ('' = by token count)")
    ap.add_argument("--tokens", type=int, default=20_000_000, help="synthetic corpus: tokens per domain")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--objectives", nargs="+", default=["causal", "fim", "prefix_lm", "ul2"],
                    choices=["causal", "fim", "prefix_lm", "ul2"])
    ap.add_argument("--batch-tokens", type=int, default=131_072, help="global batch size in tokens (per seq_len)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per configuration")
    ap.add_argument("--no-document-mask", action="store_true", help="skip position/segment ids from the .idx")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    weights = None
    if args.weights:
        weights = dict((kv.split("=")[0], float(kv.split("=")[1])) for kv in args.weights.split(","))
    with tempfile.TemporaryDirectory(prefix="smelt-bench-loader-") as tmp:
        if args.tokens_dir is None:
            t0 = time.perf_counter()
            tokens_dir = build_corpus(Path(tmp), {d: args.tokens for d in (weights or {"zh": 1, "en": 1, "code": 1})})
            print(f"corpus: {len(weights or 'abc')} domains x {args.tokens:,} tokens, built in "
                  f"{time.perf_counter() - t0:.1f} s ({tokens_dir})")
        else:
            tokens_dir = args.tokens_dir
        rows = []
        for seq_len in args.seq_lens:
            for kind in args.objectives:
                rows.append(bench_one(tokens_dir, seq_len, kind, weights, max(1, args.batch_tokens // seq_len),
                                      args.seconds, not args.no_document_mask))
                r = rows[-1]
                print(f"seq {seq_len:>5}  {kind:<10} batch {r['global_batch']:>4}: "
                      f"{r['samples_per_s']:>10,.0f} samples/s {r['tokens_per_s']:>13,.0f} tokens/s  "
                      f"{r['ms_per_batch']:>8.2f} ms/batch  "
                      f"{r['ratio_vs_train_step']:>8,.0f}x a 2-core step ({TRAIN_STEP_TOKENS_PER_S:,.0f} tok/s)",
                      flush=True)
    worst = min(rows, key=lambda r: r["ratio_vs_train_step"])
    result = {"rows": rows, "train_step_tokens_per_s": TRAIN_STEP_TOKENS_PER_S, "target_ratio": TARGET_RATIO,
              "min_ratio": worst["ratio_vs_train_step"], "meets_target": worst["ratio_vs_train_step"] >= TARGET_RATIO,
              "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0], "numpy": np.__version__}
    print(f"\nslowest: seq {worst['seq_len']} {worst['objective']}: {worst['ratio_vs_train_step']:,.0f}x "
          f"(target >= {TARGET_RATIO:.0f}x): {'met' if result['meets_target'] else 'NOT met'}")
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
