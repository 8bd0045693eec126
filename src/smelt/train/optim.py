"""Optimizer, learning-rate schedules and the batch-size ramp.

`build_optimizer` splits parameters into two groups, as in GPT-3/LLaMA/OLMo practice: weight decay
on the matrices of linear layers; none on norms, biases (every tensor with fewer than 2 dims) and,
unless `decay_embeddings`, on the token embedding and the untied output matrix (OLMo, Groeneveld
et al. 2024, Section 3.3: no decay on embeddings helped stability).

`lr_at` is a pure function of the step, so a resumed run needs no scheduler object: the step in
`trainer_state.json` is the schedule's whole state. Step convention: `step` is the number of
optimizer updates already applied, so `lr_at(step)` is the rate of update number `step + 1`.

    warmup   steps 0 .. W-1:   peak * (step + 1) / W        (reaches the peak at step W - 1)
    decay    steps W .. S-1:   progress p = (step - W) / (S - 1 - W), 0 at W, 1 at the last step
      cosine    min + (peak - min) * (1 + cos(pi p)) / 2          (Loshchilov & Hutter 2017)
      linear    peak - (peak - min) * p
      constant  peak
      wsd       peak until the last `decay_fraction` of the steps, then linear to min
                (warmup-stable-decay: Hu et al. 2024, MiniCPM; the linear decay shape follows
                Hägele et al. 2024, who find it matches cosine at the same length)
      inv_sqrt  peak * sqrt(W / (step + 1))                        (Vaswani et al. 2017)

`min` is `peak * min_lr_ratio`; the last update (step S - 1) runs at exactly `min`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from smelt.config import BatchConfig, OptimConfig, ScheduleConfig

log = logging.getLogger(__name__)

__all__ = [
    "param_groups",
    "build_optimizer",
    "set_lr",
    "lr_at",
    "batch_size_at",
    "grad_accum_steps",
]


# --------------------------------------------------------------------------------------------
# parameter groups and the optimizer


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """Ids of embedding-like matrices: every nn.Embedding weight and an untied `model.output`."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = getattr(model, "output", None)
    if isinstance(out, nn.Module) and isinstance(getattr(out, "weight", None), nn.Parameter):
        ids.add(id(out.weight))  # a tied output shares the embedding's Parameter: same id
    return ids


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups, ``decay`` and ``no_decay``, each with the parameter names it holds.

    Shared (tied) parameters appear once: `named_parameters` deduplicates them.
    """
    embeddings = _embedding_param_ids(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or (id(p) in embeddings and not cfg.decay_embeddings):
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    groups = [
        {"name": "decay", "params": [p for _, p in decay], "param_names": [n for n, _ in decay],
         "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]
    n_decay = sum(p.numel() for _, p in decay)
    n_no = sum(p.numel() for _, p in no_decay)
    log.info("optimizer groups: decay %d tensors / %s params, no_decay %d tensors / %s params",
             len(decay), f"{n_decay:,}", len(no_decay), f"{n_no:,}")
    return [g for g in groups if g["params"]]


def _fused_ok(params: Iterable[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel covers CPU and CUDA floating-point tensors (torch >= 2.4)."""
    return all(p.device.type in ("cpu", "cuda") and torch.is_floating_point(p) for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) or Adafactor (Shazeer & Stern
    2018) over `param_groups`. The learning rate starts at ``cfg.lr``; the trainer sets it every
    step from `lr_at`.

    ``fused`` picks torch's fused AdamW kernel (one kernel for all parameters); otherwise the
    foreach (multi-tensor) implementation. Both are deterministic for a fixed device and thread
    count, which is what exact resume needs.
    """
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    if cfg.name == "adamw":
        kernel: dict = {"foreach": True}
        if cfg.fused:
            if _fused_ok(params):
                kernel = {"fused": True}
            else:
                log.warning("optim.fused: the fused AdamW kernel does not cover these parameters; using foreach")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **kernel)
    if cfg.name == "adafactor":
        # torch's Adafactor: factored second moment for matrices, no first moment, relative step
        # size capped by lr; its weight decay is decoupled (param *= 1 - lr * wd) like AdamW's.
        return torch.optim.Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    raise ValueError(f"train.optim.name: unknown optimizer {cfg.name!r} (allowed: adamw, adafactor)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# --------------------------------------------------------------------------------------------
# learning-rate schedules


def lr_at(step: int, cfg: ScheduleConfig, max_steps: int, peak_lr: float) -> float:
    """Learning rate of optimizer update number ``step + 1`` (``step`` updates already done)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    warmup = min(cfg.warmup_steps, max_steps)
    min_lr = peak_lr * cfg.min_lr_ratio
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    last = max_steps - 1
    kind = cfg.kind
    if kind == "constant":
        return peak_lr
    if kind == "inv_sqrt":
        # Continuous with the warmup at step W - 1 (both give the peak); with no warmup, decays
        # from the peak at the first step.
        return peak_lr * math.sqrt(max(warmup, 1) / (step + 1))
    if kind == "wsd":
        decay_start = wsd_decay_start(cfg, max_steps)
        if step < decay_start:
            return peak_lr
        return _linear(step, decay_start, last, peak_lr, min_lr)
    if kind == "cosine":
        p = _progress(step, warmup, last)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return _linear(step, warmup, last, peak_lr, min_lr)
    raise ValueError(f"train.schedule.kind: unknown schedule {kind!r}")


def wsd_decay_start(cfg: ScheduleConfig, max_steps: int) -> int:
    """WSD: the number of updates done when the decay begins (the last stable-LR checkpoint)."""
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    return max(min(cfg.warmup_steps, max_steps), max_steps - decay_steps)


def _progress(step: int, start: int, end: int) -> float:
    """0 at ``start``, 1 at ``end`` (and after), clamped; a zero-length span is already done."""
    if end <= start:
        return 1.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def _linear(step: int, start: int, end: int, hi: float, lo: float) -> float:
    return hi - (hi - lo) * _progress(step, start, end)


# --------------------------------------------------------------------------------------------
# batch size ramp and gradient accumulation


def batch_size_at(tokens_seen: int, cfg: BatchConfig, micro_batch: int, world: int) -> int:
    """Global batch (sequences) for the next step, given the training tokens consumed so far.

    Without a ramp this is ``cfg.global_batch``. With ``ramp_start`` and ``ramp_tokens`` the batch
    grows linearly in tokens from ``ramp_start`` to ``global_batch`` (GPT-3, Brown et al. 2020,
    Table 2.1 note: batch ramped over the first 4-12B tokens), rounded down to a whole number of
    micro-batches on every rank (``micro_batch * world``), never below one of them.
    """
    unit = micro_batch * world
    if unit < 1:
        raise ValueError(f"micro_batch * world must be >= 1, got {micro_batch} * {world}")
    if cfg.global_batch % unit:
        raise ValueError(
            f"train.batch.global_batch ({cfg.global_batch}) must be a multiple of "
            f"micro_batch x world ({micro_batch} x {world} = {unit})")
    if cfg.ramp_start is None or cfg.ramp_tokens <= 0 or cfg.ramp_start >= cfg.global_batch:
        return cfg.global_batch
    frac = min(1.0, max(0, tokens_seen) / cfg.ramp_tokens)
    size = cfg.ramp_start + (cfg.global_batch - cfg.ramp_start) * frac
    return max(unit, min(cfg.global_batch, int(size) // unit * unit))


def grad_accum_steps(batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches each rank runs for one optimizer step of ``batch`` sequences."""
    unit = micro_batch * world
    if batch % unit:
        raise ValueError(f"batch {batch} is not a multiple of micro_batch x world = {unit}")
    return batch // unit
