"""The dedup phase as tasks (`data.executor.sharded_dedup`): hash-partitioned exact dedup, one
task per LSH band, Jaccard verification by pair shard and repeated-line counts by hash partition
make the same duplicate decisions, and write the same bytes, as the single-process phase."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from smelt.config import RecipeError, parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.dedup.minhash import SENTINEL, band_keys
from tests.data import write_synth_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The demo generator's pages (exact and near duplicates planted), in five files."""
    return write_synth_corpus(tmp_path_factory.mktemp("corpus"), 300, seed=11, files=5)


def _run(root: Path, inp: Path, sharded: bool, verify: float | None, workers: int = 2,
         lsh_splits: int = 1, family: str = "mersenne") -> tuple[dict, dict]:
    r = parse_recipe({"name": "d", "runs_dir": str(root), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": workers,
        "executor": {"sharded_dedup": sharded, "lsh_splits": lsh_splits}, "language": {"allowed": ["en", "zh"]},
        "dedup": {"minhash": {"enabled": True, "verify_jaccard": verify, "hash_family": family},
                  "lines": {"enabled": True}}}})
    stats = run_data_stage(r.data, r.run_dir)
    data = r.run_dir / "data"
    digest = {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(data.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    return stats, digest


@pytest.mark.parametrize(("verify", "lsh_splits"), [(None, 1), (0.5, 1), (0.5, 3)])
def test_sharded_dedup_makes_the_same_decisions(tmp_path: Path, corpus: Path, verify: float | None,
                                                lsh_splits: int) -> None:
    one_stats, one = _run(tmp_path / "one", corpus, sharded=False, verify=verify)
    tasks_stats, tasks = _run(tmp_path / "tasks", corpus, sharded=True, verify=verify, lsh_splits=lsh_splits)
    d = one_stats["documents"]
    steps = {s["name"]: s["total"] for s in one_stats["steps"]}
    assert steps["exact_dedup"]["dropped"] and steps["minhash_dedup"]["dropped"]  # both kinds were found
    assert d["duplicates"] > 0
    assert tasks == one  # every shard, duplicates/ (with duplicate_of) included, and stats.json
    assert tasks_stats == one_stats
    assert steps["line_dedup"]["counters"]["units_removed"] > 0  # repeated lines were removed
    timings = json.loads((tmp_path / "tasks" / "d" / "data" / "manifest.json").read_text())["timings_s"]
    # the components too run as tasks (Jaccard verification, when set, inside the edges tasks)
    assert {"exact", "lsh", "edges", "cc-large", "cc-small", "count"} <= set(timings)


def test_sharded_dedup_resumes_from_its_markers(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    """Killed in the middle of the LSH band tasks, the stage resumes with the finished bands kept."""
    from smelt.data import curate

    real = curate.band_task
    calls: list[int] = []

    def dies_at_band_5(b: int, **kw):
        calls.append(b)
        if b == 5:
            raise KeyboardInterrupt("killed")
        return real(b, **kw)

    monkeypatch.setattr(curate, "band_task", dies_at_band_5)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "r", corpus, sharded=True, verify=0.5, workers=1)
    done = tmp_path / "r" / "d" / "data" / "_work" / "lsh-1.done"
    assert sorted(p.name for p in done.iterdir()) == [f"{b:05d}.json" for b in range(5)]
    calls.clear()
    monkeypatch.setattr(curate, "band_task", real)
    _, resumed = _run(tmp_path / "r", corpus, sharded=True, verify=0.5, workers=1)
    _, straight = _run(tmp_path / "s", corpus, sharded=False, verify=0.5, workers=1)
    assert resumed == straight


def test_components_resume_from_the_step_where_they_were_killed(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    """Killed in the second components step (a small-star), the stage resumes there: the edges
    and the first step are not redone, and the decisions are the single-process ones."""
    from smelt.data import curate

    real = curate.cc_task
    calls: list[tuple[int, int]] = []
    kill = [True]

    def dies_in_step_2(p: int, **kw):
        calls.append((kw["step"], p))
        if kill[0] and kw["step"] == 2 and p == 3:
            raise KeyboardInterrupt("killed")
        return real(p, **kw)

    monkeypatch.setattr(curate, "cc_task", dies_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "r", corpus, sharded=True, verify=None, workers=1)
    calls.clear()
    kill[0] = False
    _, resumed = _run(tmp_path / "r", corpus, sharded=True, verify=None, workers=1)
    assert calls[0] == (2, 3) and all(step >= 2 for step, _ in calls)  # from the killed task on
    _, straight = _run(tmp_path / "s", corpus, sharded=False, verify=None, workers=1)
    assert resumed == straight


@pytest.mark.parametrize("family", ["multiply_shift", "rensa"])
def test_other_hash_families_find_the_planted_duplicates_sharded_or_not(tmp_path: Path, corpus: Path,
                                                                          family: str) -> None:
    if family == "rensa":
        pytest.importorskip("rensa")
    one_stats, one = _run(tmp_path / "one", corpus, sharded=False, verify=0.5, family=family)
    _, tasks = _run(tmp_path / "tasks", corpus, sharded=True, verify=0.5, family=family)
    assert tasks == one
    steps = {s["name"]: s["total"] for s in one_stats["steps"]}
    assert steps["minhash_dedup"]["dropped"]["near_duplicate"] > 0


def test_rensa_family_without_rensa_is_a_recipe_error(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_rensa(name, *args, **kwargs):
        if name == "rensa":
            raise ImportError("No module named 'rensa'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rensa)
    with pytest.raises(RecipeError, match=r"data\.dedup\.minhash\.hash_family: rensa needs the rensa package "
                                          r"\(pip install 'smelt\[rensa\]'\)"):
        _run(tmp_path / "r", corpus, sharded=False, verify=None, family="rensa")
    assert not (tmp_path / "r" / "d" / "data").exists()


def test_one_band_equals_its_column() -> None:
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(50, 14 * 8), dtype=np.uint64)
    sigs[3] = SENTINEL  # a document without shingles
    full = band_keys(sigs, 14, 8)
    for b in range(14):
        assert np.array_equal(band_keys(sigs, 14, 8, band=b), full[:, b])
    with pytest.raises(ValueError):
        band_keys(sigs, 14, 8, band=14)
