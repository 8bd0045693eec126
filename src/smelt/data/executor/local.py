"""Run independent tasks in a local process pool, with completion markers.

A task is an integer index. `fn(index)` does the work, writes its outputs atomically, and
returns a JSON-able result. The result is then written atomically to ``<done_dir>/<index>.json``:
that file is the completion marker, written only after every output of the task is in place.
Re-running skips tasks whose marker exists, so a run killed at any point (even ``kill -9``)
resumes where it stopped and produces the same bytes as an uninterrupted run (tasks are
deterministic functions of their index).

Workers are started with ``spawn`` so that no lock or thread of the parent (progress bars,
loggers) is inherited in a broken state, and exit when their parent dies (`_exit_with_parent`):
a ``kill -9`` of ``smelt data`` leaves no orphaned worker holding memory.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from smelt.fsutil import atomic_write_json, pull, read_json

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


def default_workers(requested: int) -> int:
    """0 means one worker per CPU core available to this process."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def marker_path(done_dir: Path, index: int) -> Path:
    return done_dir / f"{index:05d}.json"


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when ``parent`` dies.

    Linux's ``PR_SET_PDEATHSIG`` fires when the thread that forked the worker exits, which in a
    pool need not be the parent's main thread, so a watchdog thread polls the parent instead
    (reparenting changes ``getppid()``) and leaves at once with ``os._exit``: a dead parent
    wants no results."""
    import threading
    import time

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="smelt-parent-watchdog", daemon=True).start()


def new_pool(workers: int) -> ProcessPoolExecutor:
    """A spawned pool of ``workers`` processes that exit when this process dies."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


def make_pool(workers: int) -> ProcessPoolExecutor | None:
    """A spawned process pool to share between phases (starting workers costs ~0.3 s each time)."""
    workers = default_workers(workers)
    if workers <= 1:
        return None
    return new_pool(workers)


def finished_tasks(done_dir: Path, n_tasks: int, on_done: ProgressFn | None = None
                   ) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The results of tasks already marked done in `done_dir` (reported to `on_done`), and the
    indices still to run: what every executor does before running anything."""
    done_dir.mkdir(parents=True, exist_ok=True)
    pull(done_dir)  # a run directory on a store: its markers say what is done, not this machine's
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i in range(n_tasks):
        m = marker_path(done_dir, i)
        if m.is_file():
            results[i] = read_json(m)
            if on_done:
                on_done(i)
        else:
            todo.append(i)
    return results, todo


def run_tasks(fn: Callable[[int], dict[str, Any]], n_tasks: int, done_dir: Path, workers: int,
              on_done: ProgressFn | None = None, pool: ProcessPoolExecutor | None = None) -> list[dict[str, Any]]:
    """Run `fn(i)` for every i in range(n_tasks) not yet marked done; return all results in order.

    `fn` must be picklable (a module-level function or a `functools.partial` of one). With
    `pool`, tasks run there (and `workers` only decides whether one task runs in-process).
    """
    results, todo = finished_tasks(done_dir, n_tasks, on_done)
    if todo:
        log.debug("%s: %d of %d tasks to run", done_dir.name, len(todo), n_tasks)

    def finish(i: int, res: dict[str, Any]) -> None:
        atomic_write_json(marker_path(done_dir, i), res, indent=None)
        results[i] = res
        if on_done:
            on_done(i)

    workers = min(default_workers(workers), len(todo)) if todo else 0
    if workers <= 1:
        for i in todo:
            finish(i, fn(i))
    elif todo:
        own = pool is None
        ex = pool or new_pool(workers)
        try:
            pending = {ex.submit(fn, i): i for i in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    finish(i, fut.result())  # re-raises a worker's exception here
        finally:
            if own:
                ex.shutdown(cancel_futures=True)
    return [results[i] for i in range(n_tasks)]
