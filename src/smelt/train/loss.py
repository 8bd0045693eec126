"""The training loss: per-token cross entropy in fp32, and the last pipeline stage's loss function.

The trainer sums per-token losses over a whole global batch and divides by its target tokens
(`smelt.train.trainer.Trainer.train_step`); these are the pieces it sums.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from smelt.tokens.objectives import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "token_losses", "compiled_token_losses", "PipelineLoss"]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy in fp32, 0 where the target is ignored. (b, T)"""
    b, T, V = logits.shape
    return F.cross_entropy(logits.float().reshape(b * T, V), targets.reshape(b * T),
                           ignore_index=IGNORE_INDEX, reduction="none").view(b, T)


@functools.lru_cache(maxsize=1)
def compiled_token_losses() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(token_losses, dynamic=False)


class PipelineLoss:
    """The loss function of the last pipeline stage (called once per pipeline micro-batch).

    Returns ``scale * (sum of token losses + z_loss * z)`` for backward, and records per-row
    sums and target counts: the schedules call it in micro-batch order, so the last
    ``n_microbatches`` records line up with the micro-batch's rows (checked in `end`). On its
    first step a schedule also calls it once to infer gradient shapes; that call comes first and
    is dropped."""

    def __init__(self, z_loss: float) -> None:
        self.z_loss = z_loss
        self.scale = 1.0
        self.rows: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.z: list[torch.Tensor] = []

    def begin(self, scale: float) -> None:
        self.scale = scale
        self.rows, self.counts, self.z = [], [], []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tok = token_losses(logits, targets)  # (b, T)
        mask = targets != IGNORE_INDEX
        objective = tok.sum()
        z = torch.zeros((), dtype=torch.float64, device=tok.device)
        if self.z_loss > 0:
            lse = torch.logsumexp(logits.float(), dim=-1)  # (b, T)
            zl = (lse.square() * mask).sum()
            objective = objective + self.z_loss * zl
            z = zl.detach().double()
        if not logits.is_meta:
            self.rows.append(tok.detach().sum(1).double())
            self.counts.append(mask.sum(1).double())
            self.z.append(z)
        return objective * self.scale

    def end(self, rows: int, n_microbatches: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.rows:  # not the last stage
            zeros = torch.zeros(rows, dtype=torch.float64, device=device)
            return zeros, zeros.clone(), torch.zeros((), dtype=torch.float64, device=device)
        self.rows, self.counts, self.z = (x[-n_microbatches:] for x in (self.rows, self.counts, self.z))
        row_loss, row_count = torch.cat(self.rows), torch.cat(self.counts)
        if row_loss.numel() != rows:
            raise RuntimeError(f"pipeline loss saw {row_loss.numel()} rows, the micro-batch has {rows}")
        return row_loss, row_count, torch.stack(self.z).sum()
