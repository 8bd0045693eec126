from __future__ import annotations

import functools
from pathlib import Path

import pytest

from smelt.data.executor.local import default_workers, marker_path, run_tasks
from smelt.fsutil import atomic_open, atomic_write_text


def _square(i: int, *, out: str) -> dict:
    atomic_write_text(Path(out) / f"{i}.txt", str(i * i))
    return {"i": i, "sq": i * i}


def _fail_on_two(i: int) -> dict:
    if i == 2:
        raise ValueError("task 2 failed")
    return {"i": i}


@pytest.mark.parametrize("workers", [1, 2])
def test_runs_all_tasks_in_order_and_marks_them(tmp_path, workers):
    fn = functools.partial(_square, out=str(tmp_path))
    res = run_tasks(fn, 5, tmp_path / "done", workers)
    assert [r["sq"] for r in res] == [0, 1, 4, 9, 16]
    assert all(marker_path(tmp_path / "done", i).is_file() for i in range(5))


def test_finished_tasks_are_skipped(tmp_path):
    calls = []

    def fn(i: int) -> dict:
        calls.append(i)
        return {"i": i}

    run_tasks(fn, 3, tmp_path, 1)
    marker_path(tmp_path, 1).unlink()  # as if the run had been killed before task 1 finished
    res = run_tasks(fn, 3, tmp_path, 1)
    assert calls == [0, 1, 2, 1]
    assert [r["i"] for r in res] == [0, 1, 2]


def test_worker_error_propagates_and_leaves_no_marker(tmp_path):
    with pytest.raises(ValueError, match="task 2 failed"):
        run_tasks(_fail_on_two, 4, tmp_path, 2)
    assert not marker_path(tmp_path, 2).exists()


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_default_workers():
    assert default_workers(3) == 3
    assert default_workers(0) >= 1
