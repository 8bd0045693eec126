"""Worker for tests/train/test_parallel.py, launched with torchrun (not collected by pytest).

``python -m torch.distributed.run --nproc_per_node=N tests/train/_parallel_worker.py JOBS.json``:
one process group for all jobs (each a recipe dict + run dir), so the start-up cost (imports,
rendezvous) is paid once. A job's failure is written to ``<run>/error-rank<R>.txt`` and the
remaining jobs still run (every rank fails the same job: validation is deterministic).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch


def main() -> int:
    from smelt.config import Recipe
    from smelt.train.parallel import distributed
    from smelt.train.trainer import train

    jobs = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    with distributed() as env:
        for job in jobs:
            run = Path(job["run"])
            try:
                train(Recipe.model_validate(job["recipe"]), run, resume=job.get("resume"), progress=False)
            except Exception:  # noqa: BLE001 - reported to the test through the file
                run.mkdir(parents=True, exist_ok=True)
                (run / f"error-rank{env.rank}.txt").write_text(traceback.format_exc())
                if job.get("fatal", False):
                    raise
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
