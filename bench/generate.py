"""Generation speed: smelt with KV cache vs without, and vs transformers' `generate`, same model.

A random LLaMA of `--preset` shape (default cpu-8m: 10 layers, d 256, 8 heads; vocab 8192) is
exported with `smelt.interop.hf.export_hf` (which runs the logits parity check) and loaded back
with `LlamaForCausalLM.from_pretrained`, so both libraries decode the very same weights. Greedy
decoding, `--new` tokens after a `--prompt`-token random prompt, batch `--batch`, no EOS (every
run produces exactly `--new` tokens). The script checks that all three produce identical tokens.

    smelt cache      `smelt.eval.generate.generate(use_cache=True)`: prefill + one token per step
    smelt no-cache   `generate(use_cache=False)`: the whole sequence again every step (quadratic)
    HF generate      `model.generate(do_sample=False)` with its default DynamicCache, SDPA attention

Timing: one warm-up of each, then `--rounds` interleaved rounds (each times every configuration
once), so load from other processes hits all alike; tokens/s uses the fastest round (the estimate
least disturbed by neighbours), the median is printed beside it. tokens/s counts generated tokens
(batch x new) over the wall time of the whole call, prefill included. The load average is
printed with the figures: on a shared machine, treat them as indicative.

    python bench/generate.py                          # cpu-8m, batch 1, prompt 128, 128 new tokens
    python bench/generate.py --batch 4 --new 64
    python bench/generate.py --preset cpu-1m --rounds 5

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from smelt.eval.generate import generate
from smelt.interop.hf import export_hf
from smelt.model.config import preset
from smelt.model.llama import Transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-8m")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="generated tokens per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-nocache", action="store_true", help="skip the (slow) no-cache configuration")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cfg = preset(args.preset, vocab_size=args.vocab, max_seq_len=max(1024, args.prompt + args.new))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        export = export_hf(model, None, Path(tmp) / "export")
        hf = LlamaForCausalLM.from_pretrained(str(export), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def hf_generate() -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)

    configs: dict[str, Callable[[], torch.Tensor]] = {
        "smelt cache": lambda: generate(model, ids, max_new_tokens=args.new, use_cache=True),
        "HF generate": hf_generate,
    }
    if not args.no_nocache:
        configs["smelt no-cache"] = lambda: generate(model, ids, max_new_tokens=args.new, use_cache=False)

    outputs = {name: fn() for name, fn in configs.items()}  # warm-up, and the tokens to compare
    ref = outputs["smelt cache"]
    same = {name: bool(torch.equal(out, ref)) for name, out in outputs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, fn in configs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    load = os.getloadavg()

    generated = args.batch * args.new
    tps = {name: generated / min(ts) for name, ts in times.items()}
    tps_median = {name: generated / statistics.median(ts) for name, ts in times.items()}
    print(f"model: {args.preset} shape, vocab {args.vocab}, {n_params / 1e6:.1f}M parameters, fp32; "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; threads {torch.get_num_threads()}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}")
    print(f"{'configuration':<16}{'tokens/s':>10}{'median':>10}{'same tokens':>13}")
    for name in configs:
        print(f"{name:<16}{tps[name]:>10.1f}{tps_median[name]:>10.1f}{str(same[name]):>13}")
    ratios = {"cache_vs_hf": tps["smelt cache"] / tps["HF generate"]}
    if "smelt no-cache" in tps:
        ratios["cache_vs_nocache"] = tps["smelt cache"] / tps["smelt no-cache"]
    print("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if not all(same.values()):
        print("WARNING: the configurations produced different tokens")
    print(json.dumps({"bench": "generate", "preset": args.preset, "vocab": args.vocab, "params": n_params,
                      "batch": args.batch, "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
                      "threads": torch.get_num_threads(), "tokens_per_s": tps, "tokens_per_s_median": tps_median,
                      "ratios": ratios, "same_tokens": same, "loadavg": load, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
