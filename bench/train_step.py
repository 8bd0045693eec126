"""smelt's training step vs Hugging Face `LlamaForCausalLM`: same config, batch, threads and run.

One step = forward + cross entropy (fp32 log-softmax, the same function for both) + backward +
`torch.optim.AdamW` step (same hyper-parameters) + zero_grad. The HF model gets smelt's initial
weights (`to_hf_state_dict`), so the first losses agree, which the script prints. Per precision
(fp32, bf16 autocast) the configurations form an ablation, each row adding one change:

    hf                 LlamaForCausalLM, attn_implementation="sdpa" (its default), foreach AdamW
    smelt sdpa         smelt with SDPA everywhere (as HF), foreach AdamW: like for like
    smelt              + explicit attention for short spans on CPU (llama.EXPLICIT_ATTENTION_MAX_KEYS,
                       and llama.EXPLICIT_ATTENTION_MAX_KEYS_COMPILED under torch.compile)
    smelt fused        + torch's fused AdamW (`fused=True`, smelt's train.optim.fused)
    smelt compiled sdpa  + torch.compile of forward + loss (inductor), SDPA attention
    smelt compiled     compiled with explicit attention: smelt's best configuration
    smelt compiled per-block  each block compiled + the loss compiled apart: what the trainer
                       does with train.compile (build.apply_compile + loss.compiled_token_losses)
    hf compiled        HF compiled the same way, foreach AdamW (only with --hf-compile)
    hf eager-attn      HF with attn_implementation="eager" (only with --hf-eager-attn)

Timing: after warm-up (compile included there, and reported), the configurations are measured in
interleaved rounds (each round times `--steps` steps of every configuration), so other processes
on the machine hit all of them alike. tokens/s, MFU and "vs HF" use the fastest step of each
configuration, the estimate least disturbed by neighbours (as `timeit` advises); the median is
printed beside it, and the load average at start and end. MFU = PaLM training FLOPs per token
(`smelt.model.flops.flops_per_token`, attention counted over the full T x T square) x tokens/s /
peak, where the peak is the best TFLOP/s of square 1024 and 2048 matmuls in fp32 and in bf16
with the same thread count, measured before and after. "vs HF" divides by `hf` (eager, SDPA) in
the same precision.

    python bench/train_step.py                         # cpu-8m shape, vocab 8192, seq 256, batch 8
    python bench/train_step.py --rounds 2 --steps 3 --no-compile    # quick look
    python bench/train_step.py --preset cpu-30m --vocab 16384

The last line printed is one JSON object with every figure (also written to `--json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from smelt.model import llama
from smelt.model.config import ModelConfig, preset
from smelt.model.flops import flops_per_token, param_count
from smelt.model.llama import Transformer, hf_config, to_hf_state_dict

# The explicit-attention cut-offs (eager, compiled), read once at import: steps switch the
# module-level values per configuration, so reading them later would pick up whatever the
# previous configuration set (an earlier version of this script did: every "explicit" row after
# the first SDPA row silently ran SDPA).
EXPLICIT_MAX_KEYS = (llama.EXPLICIT_ATTENTION_MAX_KEYS, llama.EXPLICIT_ATTENTION_MAX_KEYS_COMPILED)


def measure_matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), reps: int = 8) -> float:
    """Best observed TFLOP/s over square (n x n) @ (n x n) matmuls, 2 n^3 FLOPs each.

    Best of several sizes and repetitions: on a shared machine a single timing mostly measures
    the neighbours; the fastest run is the closest to what the cores can do.
    """
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up (AMX tile configuration, allocator)
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


@dataclass(frozen=True)
class Variant:
    """One row of the ablation."""

    name: str
    impl: str  # smelt | hf
    compiled: bool = False
    per_block: bool = False  # compile each block and the loss apart (the trainer's way), not one graph
    fused: bool = False  # torch's fused AdamW kernel instead of foreach
    explicit_attention: bool = True  # smelt: explicit attention for short spans on CPU
    hf_attn: str = "sdpa"  # hf: attn_implementation


VARIANTS = (
    Variant("hf", "hf", explicit_attention=False),
    Variant("smelt sdpa", "smelt", explicit_attention=False),
    Variant("smelt", "smelt"),
    Variant("smelt fused", "smelt", fused=True),
    Variant("smelt compiled sdpa", "smelt", compiled=True, fused=True, explicit_attention=False),
    Variant("smelt compiled", "smelt", compiled=True, fused=True),
    Variant("smelt compiled per-block", "smelt", compiled=True, per_block=True, fused=True),
)
HF_COMPILED = Variant("hf compiled", "hf", compiled=True, explicit_attention=False)
HF_EAGER_ATTN = Variant("hf eager-attn", "hf", explicit_attention=False, hf_attn="eager")


@dataclass
class Config:
    name: str
    variant: Variant
    precision: str  # fp32 | bf16
    step: Callable[[], float] = field(repr=False)
    warmup_s: float = 0.0
    first_loss: float = 0.0
    times: list[float] = field(default_factory=list)


def make_step(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, precision: str, vocab: int, v: Variant) -> Callable[[], float]:
    kernel = {"fused": True} if v.fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kernel)
    # A module-level switch read at call time (and guarded on by torch.compile): set before every
    # step, as configurations interleave.
    max_keys = EXPLICIT_MAX_KEYS if v.explicit_attention else (0, 0)

    def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(x)
        return ce(logits, y)

    ce = cross_entropy
    if v.per_block:  # the trainer's train.compile: blocks compiled in place, loss compiled apart
        for block in model.layers:
            block.compile()
        ce = torch.compile(cross_entropy, dynamic=False)
        loss_fn = loss_of
    elif v.compiled:
        # Forward and loss in one graph, so the fp32 upcast of the logits fuses into the
        # log-softmax and the embedding, final norm and output layer are compiled too.
        loss_fn = torch.compile(loss_of)
    else:
        loss_fn = loss_of

    def step() -> float:
        llama.EXPLICIT_ATTENTION_MAX_KEYS, llama.EXPLICIT_ATTENTION_MAX_KEYS_COMPILED = max_keys
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build(cfg: ModelConfig, v: Variant, precision: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> Config:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if v.impl == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(**hf_config(cfg), attn_implementation=v.hf_attn))
        hf.load_state_dict(to_hf_state_dict(model), strict=not cfg.tie_embeddings)
        model = hf.train()
        forward = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
    else:
        forward = model.train()
    return Config(f"{v.name} {precision}", v, precision, make_step(model, forward, x, y, precision, cfg.vocab_size, v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-8m", help="smelt model preset (shape); default cpu-8m")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size (a small BPE tokenizer's)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (compile: +2)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved measurement rounds")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    ap.add_argument("--hf-compile", action="store_true", help="also time HF compiled (reference for compile's share)")
    ap.add_argument("--hf-eager-attn", action="store_true", help="also time HF with attn_implementation='eager'")
    ap.add_argument("--precision", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run, e.g. 'smelt bf16' 'hf bf16'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    cfg = preset(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq, 256))
    tokens = args.batch * args.seq
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    peak = {"fp32": measure_matmul_peak(torch.float32), "bf16": measure_matmul_peak(torch.bfloat16)}
    fpt = flops_per_token(cfg, args.seq)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {threads} threads; "
          f"matmul peak fp32 {peak['fp32']:.3f} TFLOP/s, bf16 {peak['bf16']:.3f} TFLOP/s")
    print(f"model {args.preset} + vocab {args.vocab}: {param_count(cfg) / 1e6:.2f}M parameters "
          f"({param_count(cfg, embeddings=False) / 1e6:.2f}M non-embedding), dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads ({cfg.kv_heads} KV); batch {args.batch} x seq {args.seq} = {tokens} tokens/step; "
          f"{fpt / 1e6:.1f} MFLOP/token")

    variants = [v for v in VARIANTS if not (args.no_compile and v.compiled)]
    variants += [HF_COMPILED] if args.hf_compile else []
    variants += [HF_EAGER_ATTN] if args.hf_eager_attn else []
    load_start = os.getloadavg()
    configs = []
    for precision in args.precision:
        for v in variants:
            if args.only and f"{v.name} {precision}" not in args.only:
                continue
            c = build(cfg, v, precision, x, y, args.seed)
            t0 = time.perf_counter()
            c.first_loss = c.step()
            for _ in range(args.warmup - 1 + (2 if v.compiled else 0)):
                c.step()
            c.warmup_s = time.perf_counter() - t0
            configs.append(c)
            print(f"  warm-up {c.name:<22} {c.warmup_s:6.1f} s, first loss {c.first_loss:.5f}", flush=True)

    for r in range(args.rounds):
        for c in configs:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                c.step()
                c.times.append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    # Measure the peak again after the runs and keep the better figure (neighbours come and go).
    for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak[p] = max(peak[p], measure_matmul_peak(dt))
    print(f"matmul peak (best of start and end): fp32 {peak['fp32']:.3f} TFLOP/s, bf16 {peak['bf16']:.3f} TFLOP/s")

    load_end = os.getloadavg()
    rows = {}
    for c in configs:
        best = min(c.times)
        tps = tokens / best
        rows[c.name] = dict(impl=c.variant.impl, precision=c.precision, compiled=c.variant.compiled,
                            fused_adamw=c.variant.fused, explicit_attention=c.variant.explicit_attention,
                            step_ms=best * 1e3, step_ms_median=statistics.median(c.times) * 1e3,
                            tokens_per_s=tps, tflops=fpt * tps / 1e12, mfu=fpt * tps / 1e12 / peak[c.precision],
                            warmup_s=c.warmup_s, first_loss=c.first_loss)
    print(f"\n{'configuration':<22} {'best ms':>9} {'median':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'vs HF':>6}")
    for name, r in rows.items():
        hf = rows.get(f"hf {r['precision']}")
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        print(f"{name:<22} {r['step_ms']:9.1f} {r['step_ms_median']:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['tflops']:8.3f} {r['mfu']:6.1%} {ratio:>6}")
    # First-step losses must agree: same weights, same batch (bf16 differs by rounding).
    for p in args.precision:
        a, b = rows.get(f"smelt {p}"), rows.get(f"hf {p}")
        if a and b:
            print(f"first loss {p}: smelt {a['first_loss']:.6f}, HF {b['first_loss']:.6f}")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}; {os.cpu_count()} CPUs "
          f"(a shared machine: compare rows of one run, not runs)")

    result = dict(bench="train_step", torch=torch.__version__, threads=threads, preset=args.preset,
                  vocab=args.vocab, seq=args.seq, batch=args.batch, params=param_count(cfg),
                  flops_per_token=fpt, peak_tflops=peak, load_avg=dict(start=load_start, end=load_end), configs=rows)
    line = json.dumps(result)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
