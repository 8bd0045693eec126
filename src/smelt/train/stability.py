"""Training stability: a NaN/Inf guard, a loss-spike detector and the skip / rollback policies.

Per optimizer step the trainer hands the step's loss and global gradient norm (after backward,
before the update) to `StabilityGuard.check`, which answers with an action:

- ``ok``        apply the update;
- ``skip``      drop the update: zero the gradients, do not step the optimizer (the step counter
                and the data still advance, as in OLMo's skip-step; Groeneveld et al. 2024);
- ``rollback``  reload the last good checkpoint and continue with the data *after* the batches
                that caused the spike, with the LR scaled by ``rollback_lr_scale`` for
                ``rollback_lr_steps`` steps (PaLM, Chowdhery et al. 2022, Section 5.1: restart
                ~100 steps before the spike and skip ~200-500 batches).

A non-finite loss or gradient norm is always a skip under policy ``skip`` or ``none`` (when
``nan_guard`` is on), and a rollback under policy ``rollback``. A spike is a finite loss above
``mean + spike_sigma * std`` of the trailing window of accepted losses, or above
``spike_ema_ratio`` times their exponential moving average. Detection waits until the window is
full (warm-up: the first losses fall fast and would otherwise look like noise of a huge
variance, or the first spikes would be judged against too few points). Rejected losses never
enter the statistics, so a spike cannot raise its own threshold.

Every decision other than ``ok`` is recorded as an `Event` (logged, counted, and written to the
metrics by the trainer). The whole guard state is JSON (`state_dict`), so a resumed run makes
the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from smelt.config import StabilityConfig

log = logging.getLogger(__name__)

Action = Literal["ok", "skip", "rollback"]

__all__ = ["Event", "SpikeDetector", "StabilityGuard", "TrainingDiverged", "Decision"]


class TrainingDiverged(RuntimeError):
    """More rollbacks than `max_rollbacks`, or more non-finite steps in a row than
    `max_consecutive_skips`: the run is not recovering on its own."""


@dataclass
class Event:
    """One stability event: which step, what was seen, what was done."""

    step: int
    kind: Literal["nan_loss", "nan_grad", "spike"]
    action: Action
    loss: float
    grad_norm: float
    threshold: float | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no NaN/Inf: keep them readable as strings.
        for k in ("loss", "grad_norm", "threshold"):
            v = d[k]
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


@dataclass
class Decision:
    action: Action
    event: Event | None = None


class SpikeDetector:
    """Loss spike test against a trailing window (mean + k sigma) and an EMA (ratio)."""

    def __init__(self, window: int, sigma: float, ema_ratio: float) -> None:
        self.window = window
        self.sigma = sigma
        self.ema_ratio = ema_ratio
        # EMA weight from the window as a span: alpha = 2 / (N + 1), the usual span convention.
        self.alpha = 2.0 / (window + 1)
        self.losses: deque[float] = deque(maxlen=window)
        self.ema: float | None = None

    @property
    def warmed_up(self) -> bool:
        return len(self.losses) >= self.window

    def check(self, loss: float) -> tuple[bool, float | None, str]:
        """(is_spike, threshold, reason) for a finite loss; never a spike before warm-up."""
        if not self.warmed_up:
            return False, None, ""
        n = len(self.losses)
        mean = sum(self.losses) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / max(n - 1, 1))
        sigma_thr = mean + self.sigma * std
        if loss > sigma_thr:
            return True, sigma_thr, (f"loss {loss:.4f} > mean {mean:.4f} + {self.sigma:g} sigma "
                                     f"({std:.4f}) of the last {n} steps")
        assert self.ema is not None
        ema_thr = self.ema_ratio * self.ema
        if loss > ema_thr:
            return True, ema_thr, f"loss {loss:.4f} > {self.ema_ratio:g} x EMA {self.ema:.4f}"
        return False, None, ""

    def update(self, loss: float) -> None:
        """Add an accepted loss to the statistics."""
        self.losses.append(loss)
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)

    def reset(self) -> None:
        """Forget the window and the EMA (warm up again from the next accepted loss)."""
        self.losses.clear()
        self.ema = None

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in state.get("losses", [])), maxlen=self.window)
        ema = state.get("ema")
        self.ema = None if ema is None else float(ema)


@dataclass
class _Counters:
    nan_loss: int = 0
    nan_grad: int = 0
    spikes: int = 0
    skipped: int = 0
    rolled_back: int = 0
    level_shifts: int = 0  # spike streaks accepted as a new loss level (max_consecutive_skips)


class StabilityGuard:
    """Decides ok / skip / rollback per step, counts events, and owns the post-rollback LR scale."""

    def __init__(self, cfg: StabilityConfig) -> None:
        self.cfg = cfg
        self.detector = SpikeDetector(cfg.spike_window, cfg.spike_sigma, cfg.spike_ema_ratio)
        self.counters = _Counters()
        self.events: list[Event] = []
        self.lr_scale_until: int = -1  # the rollback LR scale applies to steps < this
        self.consecutive_skips = 0

    # ------------------------------------------------------------------ decisions

    def check(self, step: int, loss: float, grad_norm: float, can_rollback: bool = True) -> Decision:
        """Judge the update numbered ``step`` (1-based, as in the metrics) from its loss and
        pre-clip gradient norm.

        ``can_rollback`` is False when no checkpoint exists yet: a rollback then degrades to a
        skip (logged), since there is nothing to roll back to.
        """
        cfg = self.cfg
        kind: Literal["nan_loss", "nan_grad", "spike"] | None = None
        threshold: float | None = None
        reason = ""
        if cfg.nan_guard and not math.isfinite(loss):
            kind, reason = "nan_loss", f"loss is {loss}"
        elif cfg.nan_guard and not math.isfinite(grad_norm):
            kind, reason = "nan_grad", f"gradient norm is {grad_norm}"
        elif cfg.spike_policy != "none" and math.isfinite(loss):
            spike, threshold, reason = self.detector.check(loss)
            if spike:
                kind = "spike"
        if kind is None:
            self.consecutive_skips = 0
            if math.isfinite(loss):
                self.detector.update(loss)
            return Decision("ok")

        action: Action = "rollback" if cfg.spike_policy == "rollback" else "skip"
        if action == "skip" and self.consecutive_skips >= cfg.max_consecutive_skips:
            # A skipped update leaves the model, and so the next losses, where they were: a lasting
            # shift of the loss level (a harder data phase, a repeated batch) would be skipped
            # forever, since rejected losses never enter the statistics.
            if kind != "spike":
                raise TrainingDiverged(
                    f"step {step}: {self.consecutive_skips + 1} updates in a row skipped "
                    f"(train.stability.max_consecutive_skips={cfg.max_consecutive_skips}); last: {reason}")
            log.warning("stability: step %d: %d spikes in a row, taking loss %.4f as the new level; "
                        "restarting the spike statistics", step, self.consecutive_skips + 1, loss)
            event = Event(step=step, kind="spike", action="ok", loss=float(loss), grad_norm=float(grad_norm),
                          threshold=threshold, reason=reason + "; accepted as a new loss level after "
                          f"{self.consecutive_skips} skips, statistics restarted")
            self.events.append(event)
            self.counters.level_shifts += 1
            self.consecutive_skips = 0
            self.detector.reset()
            self.detector.update(loss)
            return Decision("ok", event)
        if action == "rollback" and not can_rollback:
            reason += "; no checkpoint to roll back to yet, skipping the update instead"
            action = "skip"
        event = Event(step=step, kind=kind, action=action, loss=float(loss), grad_norm=float(grad_norm),
                      threshold=threshold, reason=reason)
        self._record(event)
        return Decision(action, event)

    def _record(self, event: Event) -> None:
        c = self.counters
        if event.kind == "nan_loss":
            c.nan_loss += 1
        elif event.kind == "nan_grad":
            c.nan_grad += 1
        else:
            c.spikes += 1
        if event.action == "skip":
            c.skipped += 1
            self.consecutive_skips += 1
        elif event.action == "rollback":
            c.rolled_back += 1
        self.events.append(event)
        log.warning("stability: step %d %s -> %s (%s)", event.step, event.kind, event.action, event.reason)
        if event.action == "rollback" and c.rolled_back > self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"step {event.step}: {c.rolled_back} rollbacks exceed train.stability.max_rollbacks="
                f"{self.cfg.max_rollbacks}; last: {event.reason}")

    # ------------------------------------------------------------------ rollback LR

    def start_rollback_lr(self, resume_step: int) -> None:
        """After rolling back to ``resume_step``, scale the LR for the next rollback_lr_steps steps."""
        self.lr_scale_until = resume_step + self.cfg.rollback_lr_steps

    def lr_scale(self, step: int) -> float:
        return self.cfg.rollback_lr_scale if step < self.lr_scale_until else 1.0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "counters": asdict(self.counters),
            "events": [e.to_json() for e in self.events],
            "lr_scale_until": self.lr_scale_until,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict[str, Any], *, keep_history: bool = False) -> None:
        """Restore the guard. ``keep_history`` keeps this process's counters and events (a
        rollback restores the statistics of the good checkpoint but must not forget that it
        happened)."""
        self.detector.load_state_dict(state.get("detector", {}))
        self.lr_scale_until = int(state.get("lr_scale_until", -1))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if keep_history:
            return
        self.counters = _Counters(**state.get("counters", {}))
        self.events = [Event(**{**e, **{k: float(e[k]) for k in ("loss", "grad_norm")
                                        if isinstance(e.get(k), str)}})
                       for e in state.get("events", [])]

    def summary(self) -> dict[str, int]:
        return asdict(self.counters)
