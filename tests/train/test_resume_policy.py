"""Never lose training work: which recipe changes resume a run, which stop it (naming the keys),
how a longer ``max_steps`` continues the LR schedule (cosine vs WSD), and fresh starts that move the
old run aside instead of deleting it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from smelt.config import RecipeError
from smelt.train import checkpoint as ck
from smelt.train.metrics import read_metrics
from smelt.train.optim import lr_at, wsd_decay_start
from smelt.train.trainer import RESUMABLE_TRAIN_KEYS, Trainer
from tests.train.test_trainer import _recipe, _run_dir, _write_tokens


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokens(tmp_path_factory.mktemp("tokens"))


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(run: Path) -> list[str]:
    return (run / "train" / "metrics.jsonl").read_text().splitlines()


def _train(run: Path, **kw: Any) -> dict[str, Any]:
    return Trainer(_recipe(**kw), run, progress=False).run()


def test_extending_a_finished_run_keeps_earlier_checkpoints_and_metrics(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=12, checkpoint={"every": 4, "keep": 10})
    ckpts = run / "train" / "checkpoints"
    before = {name: _tree_digest(ckpts / name) for name in ("step-0000004", "step-0000008", "step-0000012")}
    lines = _lines(run)

    summary = _train(run, max_steps=16, checkpoint={"every": 4, "keep": 10}, log_every=2)
    assert summary["complete"] and summary["steps"] == 16 and summary["resumed_from"] == "step-0000012"
    assert {name: _tree_digest(ckpts / name) for name in before} == before  # byte for byte
    after = _lines(run)
    assert after[:len(lines)] == lines  # the first run's metrics lines untouched
    assert [r["step"] for r in read_metrics(run / "train")][-2:] == [14, 16]
    assert not list(tmp_path.glob("run/train.prev-*"))
    # cosine: a new schedule length from step 12 on, recorded as an event
    ev = [e for e in read_metrics(run / "train", kind="event") if e.get("event") == "schedule_change"]
    assert len(ev) == 1 and ev[0]["how"] == "new_length" and ev[0]["max_steps_before"] == 12
    sched = _recipe().train.schedule
    lr14 = next(r["lr"] for r in read_metrics(run / "train") if r["step"] == 14)
    assert lr14 == pytest.approx(lr_at(13, sched, 16, 3e-3))


@pytest.mark.parametrize("change", [
    {"log_every": 3}, {"eval_every": 5}, {"checkpoint": {"every": 2, "keep": 7}}, {"threads": 2},
    {"tensorboard": True}, {"stability": {"spike_window": 9}}, {"activation_checkpointing": "full"},
])
def test_keys_that_do_not_change_the_steps_taken_resume(tmp_path: Path, tokens: Path,
                                                        change: dict[str, Any]) -> None:
    """An interrupted run resumes under a recipe that differs only in such keys, with the losses of
    an uninterrupted run."""
    straight = _run_dir(tmp_path, tokens, "straight")
    _train(straight, max_steps=8)
    run = _run_dir(tmp_path, tokens)

    def crash(trainer: Trainer, result: Any) -> None:
        if trainer.step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        Trainer(_recipe(max_steps=8), run, progress=False, on_step=crash).run()
    summary = _train(run, max_steps=8, **change)
    assert summary["resumed_from"] == "step-0000004" and summary["complete"]
    want = {r["step"]: r["loss"] for r in read_metrics(straight / "train")}
    got = {r["step"]: r["loss"] for r in read_metrics(run / "train")}
    after = [s for s in got if s > 4]  # log_every decides which steps have a line
    assert 8 in after
    assert {s: got[s] for s in after} == pytest.approx({s: want[s] for s in after}, rel=1e-5)


def test_the_resumable_keys_are_the_documented_ones() -> None:
    assert RESUMABLE_TRAIN_KEYS == {"max_steps", "log_every", "eval_every", "eval_batches", "checkpoint", "threads",
                                    "compile", "activation_checkpointing", "ac_every", "tensorboard", "peak_tflops",
                                    "parallel", "stability"}


def test_keys_that_change_the_computation_stop_naming_each_one(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=8)
    digest = _tree_digest(run / "train")
    recipe = _recipe(max_steps=8, optim={"lr": 1e-3}, batch={"global_batch": 16, "micro_batch": 4})
    recipe = recipe.model_copy(update={"seed": 7})
    with pytest.raises(RecipeError) as e:
        Trainer(recipe, run, progress=False)
    msg = str(e.value)
    for key in ("train.optim.lr: 0.003 in the checkpoint, 0.001 now", "train.batch.global_batch", "seed: 1234"):
        assert key in msg, msg
    assert "--from train" in msg and "moved aside" in msg
    with pytest.raises(RecipeError, match="model.dim"):
        Trainer(_recipe(max_steps=8, model={"preset": "debug", "dim": 96}), run, progress=False)
    with pytest.raises(RecipeError, match="loader.seq_len"):
        Trainer(_recipe(max_steps=8, loader={"seq_len": 16}), run, progress=False)
    assert _tree_digest(run / "train") == digest  # nothing touched


def test_max_steps_below_the_steps_taken_is_a_recipe_error(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=8)
    with pytest.raises(RecipeError, match="train.max_steps: 6 is below the 8 steps"):
        Trainer(_recipe(max_steps=6), run, progress=False)


def test_fresh_start_moves_the_old_run_aside(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=4)
    first = _tree_digest(run / "train")
    t = Trainer(_recipe(max_steps=4, optim={"lr": 1e-3}), run, progress=False, resume=False)
    t.run()
    assert t.moved_aside == run / "train.prev-1"
    assert _tree_digest(run / "train.prev-1") == first
    Trainer(_recipe(max_steps=4), run, progress=False, resume=False).run()
    assert (run / "train.prev-2").is_dir() and (run / "train" / "manifest.json").is_file()


def test_wsd_extension_continues_the_stable_phase_from_the_decay_start(tmp_path: Path, tokens: Path) -> None:
    """WSD, 12 steps (decay from step 9), extended to 16 (decay from 12): the run goes back to the
    checkpoint kept at step 9 and is then identical to a straight 16-step WSD run; the decayed
    branch is moved, not deleted."""
    wsd = {"kind": "wsd", "warmup_steps": 2, "decay_fraction": 0.25}
    assert wsd_decay_start(_recipe(schedule=wsd).train.schedule, 12) == 9
    straight = _run_dir(tmp_path, tokens, "straight")
    _train(straight, max_steps=16, schedule=wsd, checkpoint={"every": 4, "keep": 1})

    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=12, schedule=wsd, checkpoint={"every": 4, "keep": 1})
    ckpts = run / "train" / "checkpoints"
    # keep=1, but the decay-start checkpoint is a milestone
    assert [p.name for _, p in ck.list_checkpoints(ckpts)] == ["step-0000009", "step-0000012"]
    decayed = _tree_digest(ckpts / "step-0000012")
    old_lines = _lines(run)

    summary = _train(run, max_steps=16, schedule=wsd, checkpoint={"every": 4, "keep": 1})
    assert summary["complete"] and summary["resumed_from"] == "step-0000009"
    branch = run / "train" / "branches" / "max_steps-12"
    assert _tree_digest(branch / "checkpoints" / "step-0000012") == decayed
    assert (branch / "metrics.jsonl").read_text().splitlines() == old_lines
    ev = [e for e in read_metrics(run / "train", kind="event") if e.get("event") == "schedule_change"]
    assert ev[-1]["how"] == "wsd_branch" and ev[-1]["from_step"] == 9
    want = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(straight / "train")}
    got = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(run / "train")}
    assert sorted(got) == list(range(1, 17))
    for s in range(1, 17):
        assert got[s] == pytest.approx(want[s], rel=1e-5), s


def test_schedule_unchanged_for_steps_taken_continues_exactly(tmp_path: Path, tokens: Path) -> None:
    """A constant schedule: extending is identical to having asked for the longer run."""
    const = {"kind": "constant", "warmup_steps": 2}
    straight = _run_dir(tmp_path, tokens, "straight")
    _train(straight, max_steps=10, schedule=const)
    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=8, schedule=const)
    _train(run, max_steps=10, schedule=const)
    ev = [e for e in read_metrics(run / "train", kind="event") if e.get("event") == "schedule_change"]
    assert ev[-1]["how"] == "continued"
    want = {r["step"]: r["loss"] for r in read_metrics(straight / "train")}
    got = {r["step"]: r["loss"] for r in read_metrics(run / "train")}
    assert got == pytest.approx(want, rel=1e-5)


def test_old_checkpoints_without_the_computation_record_still_resume(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    _train(run, max_steps=4)
    path = run / "train" / "checkpoints" / "step-0000004"
    state = json.loads((path / ck.STATE_FILE).read_text())
    del state["computation"]
    (path / ck.STATE_FILE).write_text(json.dumps(state))
    # the checksums do not cover the JSON itself, so the checkpoint still verifies
    assert ck.verify_checkpoint(path) is None
    summary = _train(run, max_steps=6)
    assert summary["resumed_from"] == "step-0000004" and summary["complete"]
