"""Throughput (tokens/s) and MFU of each parallel mode, through smelt's own trainer.

CPU (default): 2 processes on gloo per mode (DDP, ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload,
TP, TP without SP, PP 1F1B, PP GPipe, PP interleaved 1F1B, FSDP with bf16 MixedPrecisionPolicy)
against 1 process (fp32 and bf16 autocast), and 4 processes for FSDP x TP and HSDP, on a
synthetic token stream and the ``cpu-1m`` preset (4 layers: interleaved 1F1B gets 2 stages per
rank). On a 2-core machine the figures show the overhead of each mode (collectives over loopback,
smaller per-process matmuls; 4 processes oversubscribe the cores), not a speed-up; MFU is against
the CPU matmul peak measured by each process (smelt.train.metrics). The machine may be shared:
the load average is printed with the figures. ``--modes`` picks a subset by name.

GPU (``--gpu``, when a GPU is lent): the ``llama-1b`` preset in bf16 with torch.compile and
selective activation checkpointing (every 2nd block), under torchrun with one process per GPU
(FSDP2 ZeRO-3 when there are several); tokens/s and MFU against 989 TFLOP/s (H100 SXM dense
bf16) and against the bf16 matmul peak measured on the device.

    python bench/parallel.py                  # CPU modes, 1, 2 and 4 processes
    python bench/parallel.py --modes "1 process,DDP,HSDP"
    python bench/parallel.py --gpu [--steps 30] [--seq-len 2048] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# name -> (processes, train.parallel, train.precision)
CPU_MODES: dict[str, tuple[int, dict[str, Any], str]] = {
    "1 process": (1, {}, "fp32"),
    "DDP": (2, {"zero": 0}, "fp32"),
    "ZeRO-1": (2, {"zero": 1}, "fp32"),
    "ZeRO-2 (FSDP2)": (2, {"zero": 2}, "fp32"),
    "ZeRO-3 (FSDP2)": (2, {"zero": 3}, "fp32"),
    "ZeRO-3 + offload": (2, {"zero": 3, "cpu_offload": True}, "fp32"),
    "TP + SP": (2, {"tp": 2}, "fp32"),
    "TP": (2, {"tp": 2, "sequence_parallel": False}, "fp32"),
    "PP 1F1B": (2, {"pp": 2, "pp_schedule": "1f1b"}, "fp32"),
    "PP GPipe": (2, {"pp": 2, "pp_schedule": "gpipe"}, "fp32"),
    "PP interleaved": (2, {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2}, "fp32"),
    "1 process bf16": (1, {}, "bf16"),
    "ZeRO-3 bf16 (MP)": (2, {"zero": 3}, "bf16"),
    "FSDP x TP": (4, {"zero": 3, "tp": 2}, "fp32"),
    "HSDP 2x2": (4, {"zero": 3, "dp_replicate": 2, "dp_shard": 2}, "fp32"),
}


def write_tokens(root: Path, vocab: int, n_tokens: int, seed: int = 0) -> Path:
    """A synthetic packed token directory (uniform random documents) in `smelt pack`'s layout."""
    from smelt.tokens.shards import write_shard

    rng = np.random.default_rng(seed)
    manifest: dict[str, Any] = {"format_version": 1, "tokenizer_sha256": "0" * 64, "vocab_size": vocab,
                                "dtype": "uint16", "eos_id": 2, "bos_id": 1, "pad_id": 0, "domains": {},
                                "complete": True}
    entry = {}
    for split, n in (("train", n_tokens), ("val", n_tokens // 50)):
        docs, left = [], n
        while left > 0:
            k = int(min(left, rng.integers(200, 2000)))
            docs.append(np.append(rng.integers(40, vocab, size=k - 1), 2).astype(np.int64))
            left -= k
        write_shard(root / "web" / f"{split}-00000", docs, dtype=np.uint16)
        entry[split] = {"tokens": int(sum(len(d) for d in docs)), "docs": len(docs), "shards": [f"{split}-00000"]}
    manifest["domains"]["web"] = entry
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _recipe(model: dict[str, Any], parallel: dict[str, Any], *, steps: int, seq_len: int, global_batch: int,
            micro_batch: int, precision: str, compile_: bool, ac: str) -> dict[str, Any]:
    return {"seed": 0, "model": model, "loader": {"seq_len": seq_len},
            "train": {"max_steps": steps, "log_every": steps, "eval_every": 0, "eval_batches": 1,
                      "tensorboard": False, "precision": precision, "compile": compile_,
                      "activation_checkpointing": ac, "ac_every": 2,
                      "batch": {"global_batch": global_batch, "micro_batch": micro_batch},
                      "schedule": {"kind": "constant", "warmup_steps": 0},
                      "checkpoint": {"every": 100000, "keep": 1}, "parallel": parallel}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(run: Path, tokens: Path, nproc: int, recipe: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Train ``recipe`` in ``run`` with ``nproc`` processes; the manifest's throughput figures."""
    run.mkdir(parents=True)
    (run / "tokens").symlink_to(tokens)
    job = run / "job.json"
    job.write_text(json.dumps([{"run": str(run), "recipe": recipe, "fatal": True}]))
    worker = REPO / "tests" / "train" / "_parallel_worker.py"
    if nproc == 1:
        cmd = [sys.executable, str(worker), str(job)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), str(job)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    m = json.loads((run / "train" / "manifest.json").read_text())
    return {"tokens_per_s": m["tokens_per_s"], "mfu": m["mfu"], "train_s": m["timings"]["train_s"], "wall_s": wall,
            "final_loss": m["final_loss"]}


def cpu(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tokens = write_tokens(root / "tokens", vocab=2048, n_tokens=400_000)
        print(f"# bench/parallel.py (CPU): preset {args.preset}, seq {args.seq_len}, global batch "
              f"{args.global_batch}, micro {args.micro_batch}, {args.steps} steps; load average before "
              f"{os.getloadavg()}")
        print(f"{'mode':18s} {'procs':>5s} {'tokens/s':>10s} {'MFU':>7s} {'wall s':>7s}  final loss")
        for name, (nproc, par, precision) in CPU_MODES.items():
            if args.modes and name not in args.modes:
                continue
            recipe = _recipe({"preset": args.preset}, par, steps=args.steps, seq_len=args.seq_len,
                             global_batch=args.global_batch, micro_batch=args.micro_batch, precision=precision,
                             compile_=False, ac="none")
            r = run_mode(root / name.replace(" ", "_"), tokens, nproc, recipe, timeout=600)
            if "error" in r:
                print(f"{name:18s} {nproc:5d}  failed: {r['error'][-300:]}")
                continue
            print(f"{name:18s} {nproc:5d} {r['tokens_per_s']:10,.0f} {r['mfu']:7.2%} {r['wall_s']:7.1f}  "
                  f"{r['final_loss']:.4f}", flush=True)
        print(f"# load average after {os.getloadavg()}")


def gpu(args: argparse.Namespace) -> None:
    import torch

    from smelt.train.metrics import measure_matmul_tflops

    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SystemExit(f"bench/parallel.py --gpu: no CUDA device visible (torch {torch.__version__}, {built}; "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run it on a "
                         "GPU machine, or without --gpu for the CPU modes.")
    n = torch.cuda.device_count()
    peak_meas = measure_matmul_tflops("bf16", "cuda", n=8192)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tokens = write_tokens(root / "tokens", vocab=32000, n_tokens=args.steps * args.global_batch * args.seq_len * 2)
        par = {"zero": 3} if n > 1 else {}
        recipe = _recipe({"preset": "llama-1b", "max_seq_len": args.seq_len}, par, steps=args.steps,
                         seq_len=args.seq_len, global_batch=args.global_batch, micro_batch=args.micro_batch,
                         precision="bf16", compile_=True, ac="every_k")
        recipe["train"]["log_every"] = max(1, args.steps // 3)
        recipe["train"]["peak_tflops"] = 989.0
        r = run_mode(root / "gpu", tokens, n, recipe, timeout=3000)
    if "error" in r:
        raise SystemExit(r["error"])
    # The manifest's rate is that of the last logged window (compile warm-up excluded).
    mfu_meas = r["mfu"] * 989.0 / peak_meas
    print(f"llama-1b bf16 compile + selective AC, {n} GPU(s) ({torch.cuda.get_device_name()}): "
          f"{r['tokens_per_s']:,.0f} tokens/s; MFU {r['mfu']:.1%} of 989 TFLOP/s, {mfu_meas:.1%} of the measured "
          f"bf16 matmul peak {peak_meas:.0f} TFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="llama-1b on the GPU(s) instead of the CPU modes")
    ap.add_argument("--preset", default="cpu-1m")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--modes", default="", help="CPU modes to run, comma-separated names from the table "
                    f"(default: all of {', '.join(CPU_MODES)})")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in CPU_MODES]
    if unknown:
        ap.error(f"--modes: unknown {unknown}; choose from {list(CPU_MODES)}")
    if args.gpu:
        args.steps, args.seq_len = args.steps or 30, args.seq_len or 2048
        args.micro_batch = args.micro_batch or 4
        args.global_batch = args.global_batch or args.micro_batch * 4
        gpu(args)
    else:
        args.steps, args.seq_len = args.steps or 8, args.seq_len or 128
        args.global_batch, args.micro_batch = args.global_batch or 16, args.micro_batch or 4
        cpu(args)


if __name__ == "__main__":
    main()
