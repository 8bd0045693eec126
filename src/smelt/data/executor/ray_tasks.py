"""Run the curation stage's tasks as Ray tasks, with the local executor's completion markers.

The contract is `smelt.data.executor.local.run_tasks`'s: a task is an integer index, ``fn(index)``
writes its outputs atomically and returns a JSON-able result, and the driver writes that result
to ``<done_dir>/<index>.json`` (the completion marker) when the task has finished. So the output
is the same bytes as with the local executor, a re-run skips tasks that have markers (a killed
driver resumes where it stopped), and Ray's own retries cover a task that raised or whose worker
process died: a retried task rewrites the same outputs, atomically, before any marker names it.

Where the bytes go: tasks write into the run directory by path. On a cluster of several machines
that is either storage every node sees at the same path (a shared filesystem), or a run directory
on an object store: then ``fn`` arrives wrapped in `smelt.fsutil.Mirrored`, and each task downloads
what its node lacks and uploads what it writes before it returns. ``fn`` is shipped once through
Ray's object store (``ray.put``), not once per task.

Ray is an optional dependency (``pip install 'smelt[ray]'``); `check_ray` fails a recipe that
asks for it, before any work, when it is not installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smelt.config import ExecutorConfig, RecipeError
from smelt.data.executor.local import ProgressFn, finished_tasks, marker_path
from smelt.fsutil import atomic_write_json

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'smelt[ray]'"


def check_ray() -> None:
    """RecipeError (with the install command) when Ray is not importable."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise RecipeError(f"data.executor.kind: ray needs the ray package ({INSTALL_HINT}): {e}") from None


def ensure_ray(cfg: ExecutorConfig, cpus: int | None = None) -> bool:
    """Initialize Ray for `cfg` unless this process already has; returns True when it started it
    (the caller then shuts it down). `cpus` caps a Ray instance started here."""
    check_ray()
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.address is not None:
        kwargs["address"] = cfg.address
    elif not os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`: ray.init() joins that cluster
        # a Ray instance of this process's own, even when another one runs on the machine (which
        # ray.init() without an address would join, refusing num_cpus)
        kwargs["address"] = "local"
        if cpus is not None:
            kwargs["num_cpus"] = cpus
    if cfg.runtime_env:
        kwargs["runtime_env"] = cfg.runtime_env
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RecipeError(f"data.executor: cannot start or join Ray (address {cfg.address!r}): {e}") from None
    log.info("ray: %s", ray.cluster_resources())
    return True


def _call(fn: Callable[[int], dict[str, Any]], index: int) -> dict[str, Any]:
    return fn(index)


def _call0(fn: Callable[[], Any]) -> Any:
    return fn()


def on_every_node(fn: Callable[[], Any]) -> int:
    """Run `fn()` once on every live node of the Ray cluster (pinned there, no CPU reserved, so it
    runs beside busy tasks); returns the number of nodes. What a run directory on a store needs at
    the end of a stage: each node's own copy of the intermediates is dropped (the store's copy is
    gone already), so that node disks do not fill up run after run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    remote = ray.remote(_call0)
    ray.get([remote.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nid, soft=False))
             .remote(fn) for nid in nodes])
    return len(nodes)


def drop_local(path: str) -> None:
    """Remove this machine's copy of `path` (a directory), if any: not the store's."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run_tasks_ray(fn: Callable[[int], dict[str, Any]], n_tasks: int, done_dir: Path, cfg: ExecutorConfig,
                  on_done: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Run `fn(i)` for every i in range(n_tasks) without a marker, as Ray tasks; return all results
    in order. Ray must be initialized (`ensure_ray`). A task that still fails after
    ``cfg.max_retries`` retries raises here, after the markers of the tasks that finished."""
    import ray

    results, todo = finished_tasks(done_dir, n_tasks, on_done)
    if todo:
        options: dict[str, Any] = {"num_cpus": cfg.cpus_per_task, "max_retries": cfg.max_retries,
                                   "retry_exceptions": True}
        if cfg.memory_gb_per_task:
            options["memory"] = int(cfg.memory_gb_per_task * 2**30)
        remote = ray.remote(_call).options(**options)
        fn_ref = ray.put(fn)
        pending = {remote.remote(fn_ref, i): i for i in todo}
        log.debug("%s: %d of %d tasks submitted to Ray", done_dir.name, len(todo), n_tasks)
        failure: BaseException | None = None
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        # Let the tasks in flight finish and keep their markers: a re-run redoes only the failed one.
                        failure = failure or e.as_instanceof_cause()
                        continue
                    except ray.exceptions.RayError as e:  # the worker died more often than max_retries
                        failure = failure or RuntimeError(f"task {i} of {done_dir.name}: {e}")
                        continue
                    atomic_write_json(marker_path(done_dir, i), res, indent=None)
                    results[i] = res
                    if on_done:
                        on_done(i)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failure is not None:
            raise failure
    return [results[i] for i in range(n_tasks)]
