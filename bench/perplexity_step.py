"""Throughput of the ``perplexity`` curation step (`smelt.quality.perplexity`): documents per second,
batched and sorted by length vs one document per forward, in bf16 and fp32.

Corpus: the first ``--docs`` WikiText-2 paragraphs of ``wikitext2/valid.txt`` in ``../shared/data``
(headings dropped; `_corpus._wiki`). Reference model: a random model of ``--preset`` (debug: 2
layers, dim 64, 256-token context) with a byte-level BPE tokenizer trained on those paragraphs
(``--vocab``), saved as a smelt run directory and loaded by the step from its path, as a recipe
names it. Throughput is independent of the weights, so they are not trained.

The step runs as curation runs it: `Step.batch` on 256 documents at a time
(`smelt.data.curate.BATCH_DOCS`), scores only (no keep rule). Per dtype two configurations:

    batched     ``batch_tokens`` (default 8192): windows sorted by length, packed into forwards of
                at most that many tokens, right-padded
    one/fwd     ``batch_tokens: 1``: every window in its own forward (the baseline)

Each configuration scores every document once after a warm-up of 32 documents (model load
excluded), in interleaved rounds (``--rounds``) so that other processes on the machine hit all
of them alike; the best round counts. It prints docs/s, tokens/s, the batched / one-per-forward
ratio per dtype, and the largest |Δ bpb| between the two on the first 256 documents (they must
agree: 1e-4 in fp32, 1e-2 in bf16). The last line is one JSON object with every figure (also written to ``--json``).

    python bench/perplexity_step.py                      # 1000 paragraphs, debug model, CPU
    python bench/perplexity_step.py --docs 200 --rounds 1     # quick look
    python bench/perplexity_step.py --preset cpu-8m --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import _wiki  # noqa: E402

from smelt.data.curate import BATCH_DOCS  # noqa: E402
from smelt.data.document import Document  # noqa: E402
from smelt.data.steps.registry import StepContext  # noqa: E402
from smelt.model.config import ModelConfig  # noqa: E402
from smelt.model.llama import Transformer  # noqa: E402
from smelt.quality.perplexity import PerplexityOptions, build  # noqa: E402
from smelt.train.checkpoint import save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def _default_data_dir() -> Path:
    env = os.environ.get("SMELT_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def make_run(root: Path, texts: list[str], preset: str, vocab: int) -> Path:
    """A smelt run directory (recipe, tokens manifest, tokenizer, one checkpoint) of a random model."""
    run = root / "ref"
    (run / "tokenizer").mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    (run / "tokens").mkdir()
    (run / "tokens" / "manifest.json").write_text(json.dumps(
        {"vocab_size": n, "eos_id": 2, "bos_id": 1, "pad_id": 0, "add_bos": False}))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "ref", "model": {"preset": preset}}))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.model_validate({"preset": preset}).with_vocab(n))
    save_checkpoint(run / "train" / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()),
                    {"step": 1, "tokens_seen": 0, "samples_seen": 0})
    return run


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def score_all(step, texts: list[str]) -> np.ndarray:
    out = []
    for b in range(0, len(texts), BATCH_DOCS):
        docs = [Document(id=str(b + i), text=t) for i, t in enumerate(texts[b:b + BATCH_DOCS])]
        step.batch(docs)
        out += [d.meta["perplexity"]["bpb"] for d in docs]
    return np.array([np.nan if s is None else s for s in out], dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=_default_data_dir(), help="../shared/data")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if not (args.data_dir / "wikitext2" / "valid.txt").is_file():
        print(f"skipped: {args.data_dir / 'wikitext2' / 'valid.txt'} not found (set SMELT_SHARED_DATA or --data-dir)")
        return
    texts = _wiki(args.data_dir)[: args.docs]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), texts, args.preset, args.vocab)
        configs = {}
        for dtype in ("bf16", "fp32"):
            for name, budget in (("batched", args.batch_tokens), ("one/fwd", 1)):
                opts = PerplexityOptions(model=str(run), keep={}, dtype=dtype, device=args.device,
                                         batch_tokens=budget, max_tokens=args.max_tokens)
                step = build(opts, StepContext(data=None, work_dir=None))  # type: ignore[arg-type]
                score_all(step, texts[:32])  # loads the model, warms up
                configs[(dtype, name)] = step
        scorer = next(iter(configs.values())).specs[0].score.fn  # type: ignore[attr-defined]
        n_tokens = sum(len(ids) for ids, _ in scorer.encode(texts))
        n_windows = sum(-(-len(ids) // scorer.window) for ids, _ in scorer.encode(texts) if ids)

        times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for key, step in configs.items():
                t0 = time.perf_counter()
                score_all(step, texts)
                times[key].append(time.perf_counter() - t0)
        # unrounded scores (meta keeps 4 decimals) of the first batch, for the agreement figures
        first = [Document(id=str(i), text=t) for i, t in enumerate(texts[:BATCH_DOCS])]
        raw = {key: np.asarray(step.specs[0].score(first)) for key, step in configs.items()}

    print(f"corpus: {len(texts)} WikiText-2 paragraphs, {n_bytes / 1e6:.2f} MB, {n_tokens:,} scored tokens "
          f"({n_windows} windows of <= {scorer.window}); model {args.preset}, vocab {args.vocab}; "
          f"device {scorer.device}, {torch.get_num_threads()} threads; {cpu_name()}")
    print(f"{'dtype':6} {'config':8} {'best s':>8} {'docs/s':>9} {'tokens/s':>10}")
    out: dict[str, object] = {"docs": len(texts), "bytes": n_bytes, "tokens": n_tokens, "windows": n_windows,
                              "preset": args.preset, "vocab": args.vocab, "batch_tokens": args.batch_tokens,
                              "device": scorer.device, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                              "configs": {}}
    for (dtype, name), ts in times.items():
        best = min(ts)
        print(f"{dtype:6} {name:8} {best:8.2f} {len(texts) / best:9.1f} {n_tokens / best:10.0f}")
        out["configs"][f"{dtype} {name}"] = {"seconds": ts, "docs_per_s": len(texts) / best,  # type: ignore[index]
                                             "tokens_per_s": n_tokens / best}
    for dtype in ("bf16", "fp32"):
        ratio = min(times[(dtype, "one/fwd")]) / min(times[(dtype, "batched")])
        delta = float(np.nanmax(np.abs(raw[(dtype, "batched")] - raw[(dtype, "one/fwd")])))
        print(f"{dtype}: batched is {ratio:.1f}x one document per forward; max |Δ bpb| batched vs one/fwd "
              f"{delta:.1e}")
        out[f"{dtype}_speedup"] = ratio
        out[f"{dtype}_max_abs_diff"] = delta
    bf, fp = raw[("bf16", "batched")], raw[("fp32", "batched")]
    out["bf16_vs_fp32_max_abs_diff"] = float(np.nanmax(np.abs(bf - fp)))
    out["bf16_over_fp32_time"] = min(times[("bf16", "batched")]) / min(times[("fp32", "batched")])
    print(f"bf16 / fp32 time (batched): {out['bf16_over_fp32_time']:.2f}; max |Δ bpb| bf16 vs fp32 "
          f"{out['bf16_vs_fp32_max_abs_diff']:.1e}; mean bpb {np.nanmean(fp):.3f} (random model)")
    line = json.dumps(out)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
