"""What a person watching a training run sees, and how they stop it.

`progress_bar`: a live rich bar where a person watches a terminal; elsewhere (torchrun, SLURM,
``| tee``, a file) the trainer prints one plain line per ``train.log_every`` instead, since a bar
would show its last frame only. `StopFlag`: the first Ctrl-C asks the loop to finish its step,
save and return; a second one aborts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["StopFlag", "progress_bar", "is_terminal", "duration"]


class StopFlag:
    """Ctrl-C once: finish the step, checkpoint, exit cleanly. Twice: raise KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            log.warning("interrupt: finishing this step, saving a checkpoint and exiting (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def progress_bar(total: int, completed: int, *, live: bool) -> Iterator[Callable[[int, float | None, float], None]]:
    """``update(step, loss, tokens_per_s)`` for a live bar (``live``), else a function that does nothing."""
    if not live:
        yield lambda step, loss, rate: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()) as progress:
        task = progress.add_task("train", total=total, completed=completed, loss="-", rate="-")

        def update(step: int, loss: float | None, rate: float) -> None:
            fields = {"rate": f"{rate:,.0f}"} if rate else {}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            progress.update(task, completed=step, **fields)

        yield update


def is_terminal() -> bool:
    """Whether log output (stderr) is a terminal a person watches."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
