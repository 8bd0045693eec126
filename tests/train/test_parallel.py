"""Distributed training on CPU/gloo with 2 processes against a 1-process reference.

One torchrun launch runs every 2-process mode (DDP, ZeRO-1/2/3, ZeRO-3 with CPU offload, TP with
and without sequence parallel, PP 1F1B, GPipe and interleaved 1F1B, FSDP with a bf16
MixedPrecisionPolicy, a 1 -> 2 resume and an invalid config) in one process group
(tests/train/_parallel_worker.py); a second launch runs `python -m smelt train` under
``torchrun --max-restarts=1`` with a deliberately crashing rank. The first losses and gradient
norms of each mode must match the 1-process run of the same global batch (fp32: rtol 1e-4; bf16:
see BF16_RTOL); 2-process checkpoints must resume in 1 process with the same next losses.

4-process modes (FSDP x TP, HSDP 2 x 2) run in a third launch. On the 2-core machine one launch
with one job takes ~10-15 s, so FSDP x TP (the composition most likely to break: DTensor TP
shards further sharded by FSDP) runs by default and HSDP joins it under ``SMELT_SLOW=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from smelt.config import ParallelConfig, Recipe, RecipeError
from smelt.model.config import ModelConfig
from smelt.train.metrics import read_metrics
from smelt.train.parallel import ParallelDims, split_layers
from smelt.train.trainer import Trainer, train
from tests.train.test_trainer import _write_tokens

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_parallel_worker.py")
STEPS = 4
RTOL = 1e-4  # fp32: different reduction orders give ~1e-7 relative; a wrong reduction moves losses by > 1e-2
# bf16 FSDP against 1-process bf16 autocast. Not the same arithmetic: MixedPrecisionPolicy casts
# every parameter to bf16 (embedding and norm weights too), so the embedding output and the
# residual stream are bf16, while autocast keeps the weights, the residual stream and the norms in
# fp32 and only runs matmuls in bf16. bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3
# per value); over the 256 target tokens of a step the loss difference averages down to a few
# 1e-4 (measured <= 2.3e-4 in 4 steps), the gradient norm to <= 1.7e-3. Tolerances leave ~4-6x
# headroom; a missing or doubled gradient reduction still moves the gradient norm by >= 50%.
BF16_RTOL = {"loss": 1e-3, "grad_norm": 1e-2}
SLOW = os.environ.get("SMELT_SLOW") == "1"

MODES: dict[str, dict[str, Any]] = {
    "ddp": {"zero": 0},
    "zero1": {"zero": 1},
    "zero2": {"zero": 2},
    "zero3": {"zero": 3},
    "tp": {"tp": 2},
    "tp_nosp": {"tp": 2, "sequence_parallel": False},
    "pp_1f1b": {"pp": 2, "pp_schedule": "1f1b"},
    "pp_gpipe": {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 2},
    # On a CPU run the parameters are on the host already: this checks that the offload code path
    # (FSDP2 CPUOffloadPolicy, unpinned without an accelerator) composes with the rest.
    "zero3_offload": {"zero": 3, "cpu_offload": True},
    "pp_interleaved": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2},
    "bf16_fsdp": {"zero": 3},
}
# Modes whose 1-process reference is a different run: (model overrides, train overrides).
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # Interleaved 1F1B needs >= 2 stages per rank: 4 layers -> 4 one-block stages, rank 0 holds
    # stages 0 and 2, rank 1 stages 1 and 3 (looped placement); micro_batch 4 leaves the default
    # pipeline micro-batch count (= number of stages, 4) one row each.
    "pp_interleaved": ({"n_layers": 4}, {"batch": {"global_batch": 8, "micro_batch": 4}}),
    "bf16_fsdp": ({}, {"precision": "bf16"}),
}
# 4-process modes, one torchrun launch; (parallel, runs by default).
MODES4: dict[str, tuple[dict[str, Any], bool]] = {
    "fsdp_tp": ({"tp": 2, "zero": 3}, True),
    "hsdp": ({"dp_replicate": 2, "dp_shard": 2, "zero": 3}, False),
}
# The layout the trainer reports (ParallelDims.describe, saved in trainer_state.json) for modes
# where a silent fallback to a simpler layout would still match the reference.
LAYOUT = {
    "pp_interleaved": "pp 2 interleaved_1f1b x4 mb",
    "fsdp_tp": "dp 2 (FSDP(ZeRO-3); replicate 1 x shard 2), tp 2",
    "hsdp": "dp 4 (HSDP(ZeRO-3); replicate 2 x shard 2)",
}


def _recipe(parallel: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    base = {"max_steps": STEPS, "threads": 1, "log_every": 1, "eval_every": 0, "eval_batches": 2,
            "tensorboard": False, "batch": {"global_batch": 8, "micro_batch": 2}, "optim": {"lr": 3e-3},
            "schedule": {"kind": "cosine", "warmup_steps": 2}, "checkpoint": {"every": 2, "keep": 3},
            "stability": {"spike_window": 5}, "parallel": parallel or {}}
    base.update(train)
    return {"seed": 1234, "model": {"preset": "debug"}, "loader": {"seq_len": 32}, "train": base}


def _mode_recipe(mode: str, parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe of ``mode`` (its parallel section unless ``parallel`` is given; {} = 1 process)."""
    model, train_over = VARIANTS.get(mode, ({}, {}))
    recipe = _recipe(MODES.get(mode, {}) if parallel is None else parallel, **train_over)
    recipe["model"].update(model)
    return recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2, extra: list[str] | None = None, env: dict[str, str] | None = None,
              timeout: float = 240, dynamic: bool = False) -> subprocess.CompletedProcess:
    # dynamic: the c10d rendezvous (a fresh round per restart). Restarts under the static
    # rendezvous (--master_addr/--master_port) reuse one store prefix, and a restarted gloo group
    # was seen (1 run in 2 on a loaded machine) to hang connecting to the dead worker's address.
    where = (["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"] if dynamic
             else ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where, *(extra or []), *args]
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    # A session of its own, so that a timeout kills torchrun's workers too (they outlive it otherwise).
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=full_env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"torchrun timed out after {timeout:.0f} s: {' '.join(args)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run_dir(root: Path, tokens: Path, name: str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "tokens").symlink_to(tokens)
    return run


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run / "train") if r.get("kind", "train") == "train" and "loss" in r]


def _errors(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run.glob("error-rank*.txt")))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokens(tmp_path_factory.mktemp("ptokens"))


@pytest.fixture(scope="module")
def references(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict[str, Any]]]:
    """``references(mode)``: the 1-process metrics ``mode`` is compared with (computed once per
    variant); the last row carries the final validation loss under ``_val_loss``."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def get(mode: str) -> list[dict[str, Any]]:
        key = mode if mode in VARIANTS else ""
        if key not in cache:
            run = _run_dir(tmp_path_factory.mktemp("ref"), tokens, f"ref-{key or 'default'}")
            summary = train(Recipe.model_validate(_mode_recipe(key, {})), run, progress=False)
            cache[key] = _metrics(run)
            cache[key][-1]["_val_loss"] = summary["val_loss"]
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(references: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return references("")


@pytest.fixture(scope="module")
def dist_runs(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every 2-process job in one torchrun launch."""
    root = tmp_path_factory.mktemp("dist")
    runs = {name: _run_dir(root, tokens, name) for name in [*MODES, "resume_1to2", "invalid"]}
    # 1 -> 2: two steps in this process, the rest with FSDP in two.
    train(Recipe.model_validate(_recipe(max_steps=2)), runs["resume_1to2"], progress=False)
    jobs = [{"run": str(runs[n]), "recipe": _mode_recipe(n)} for n in MODES]
    jobs.append({"run": str(runs["resume_1to2"]), "recipe": _recipe({"zero": 3}), "resume": True})
    jobs.append({"run": str(runs["invalid"]), "recipe": _recipe({"zero": 1, "tp": 2})})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = _torchrun([str(WORKER), str(root / "jobs.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return runs


@pytest.fixture(scope="module")
def dist4_runs(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 4-process jobs that are enabled (all of them under SMELT_SLOW=1) in one launch."""
    root = tmp_path_factory.mktemp("dist4")
    enabled = [n for n, (_, default) in MODES4.items() if default or SLOW]
    runs = {n: _run_dir(root, tokens, n) for n in enabled}
    jobs = [{"run": str(runs[n]), "recipe": _recipe(MODES4[n][0])} for n in enabled]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = _torchrun([str(WORKER), str(root / "jobs.json")], nproc=4, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return runs


def _assert_match(got: list[dict[str, Any]], ref: list[dict[str, Any]], steps: list[int], what: str,
                  rtol: dict[str, float] | None = None) -> None:
    tol = rtol or {"loss": RTOL, "grad_norm": RTOL}
    by_step = {r["step"]: r for r in got}
    ref_by_step = {r["step"]: r for r in ref}
    assert set(steps) <= set(by_step), f"{what}: steps {sorted(by_step)}"
    for s in steps:
        assert by_step[s]["loss"] == pytest.approx(ref_by_step[s]["loss"], rel=tol["loss"]), (what, s)
        assert by_step[s]["grad_norm"] == pytest.approx(ref_by_step[s]["grad_norm"], rel=tol["grad_norm"]), (what, s)
        assert by_step[s]["loss_by_domain"] == pytest.approx(ref_by_step[s]["loss_by_domain"],
                                                             rel=tol["loss"]), (what, s)


# --------------------------------------------------------------------------------------------
# losses match one process


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_matches_single_process(mode: str, dist_runs: dict[str, Path],
                                     references: Callable[[str], list[dict]]) -> None:
    run = dist_runs[mode]
    assert not _errors(run), _errors(run)
    reference = references(mode)
    rtol = BF16_RTOL if mode == "bf16_fsdp" else None
    _assert_match(_metrics(run), reference, list(range(1, STEPS + 1)), mode, rtol)
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["steps"] == STEPS
    assert manifest["tokens"] == STEPS * 8 * 32  # the global batch, not one rank's slice
    # Only rank 0 writes metrics: one line per step, no duplicates.
    assert [r["step"] for r in _metrics(run)] == list(range(1, STEPS + 1))
    # Validation is split over the dp ranks and reduced: the same value as one process.
    assert manifest["val_loss"] == pytest.approx(reference[-1]["_val_loss"], rel=(rtol or {"loss": RTOL})["loss"])
    state = json.loads((run / "train" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world"] == 2 and LAYOUT.get(mode, "") in state["parallel"]


def test_bf16_mixed_precision_policy_is_in_effect(dist_runs: dict[str, Path],
                                                  references: Callable[[str], list[dict]]) -> None:
    """The loose bf16 tolerance must not hide a run without the policy. The trainer's autocast
    alone would reproduce the 1-process bf16 loss to reduction noise (DDP + bf16: identical);
    MixedPrecisionPolicy's bf16 parameters and residual stream move the first loss (before any
    update) by far more (measured 1.7e-5 relative, vs <= 3e-8 for the fp32 modes)."""
    first = _metrics(dist_runs["bf16_fsdp"])[0]
    ref = references("bf16_fsdp")[0]
    assert first["step"] == ref["step"] == 1
    assert abs(first["loss"] / ref["loss"] - 1) > 2e-6


# --------------------------------------------------------------------------------------------
# resharding resume


@pytest.mark.parametrize("mode", ["zero1", "zero3", "zero3_offload", "tp", "pp_1f1b", "pp_interleaved"])
def test_two_process_checkpoint_resumes_in_one(mode: str, dist_runs: dict[str, Path],
                                              references: Callable[[str], list[dict]], tmp_path: Path) -> None:
    src = dist_runs[mode]
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokens").symlink_to((src / "tokens").resolve())
    shutil.copytree(src / "train" / "checkpoints" / "step-0000002", run / "train" / "checkpoints" / "step-0000002")
    (run / "train" / "checkpoints" / "latest").write_text("step-0000002\n")
    state = json.loads((run / "train" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["world"] == 2 and len(state["rng_ranks"]) == 2
    Trainer(Recipe.model_validate(_mode_recipe(mode, {})), run, resume=True, progress=False).run()
    _assert_match(_metrics(run), references(mode), [3, 4], f"{mode} 2->1")


def test_one_process_checkpoint_resumes_in_two(dist_runs: dict[str, Path], reference: list[dict]) -> None:
    run = dist_runs["resume_1to2"]
    assert not _errors(run), _errors(run)
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    _assert_match(_metrics(run), reference, [1, 2, 3, 4], "1->2")


# --------------------------------------------------------------------------------------------
# validation


def test_invalid_config_fails_before_work_on_every_rank(dist_runs: dict[str, Path]) -> None:
    run = dist_runs["invalid"]
    for rank in (0, 1):
        err = (run / f"error-rank{rank}.txt").read_text()
        assert "RecipeError" in err and "train.parallel.zero: 1" in err
    assert not (run / "train" / "checkpoints").exists()


def _dims(world: int, model: dict[str, Any] | None = None, **cfg: Any) -> ParallelDims:
    mc = ModelConfig.model_validate({"preset": "debug", "vocab_size": 128, **(model or {})})
    return ParallelDims.build(ParallelConfig(**cfg), world, model_cfg=mc, micro_batch=2, seq_len=32)


@pytest.mark.parametrize("world, cfg, model, message", [
    (4, {"dp_replicate": 3, "dp_shard": 2}, None, "dp_replicate*dp_shard*tp*pp = 3*2*1*1 = 6 != world size 4"),
    (4, {"dp_replicate": 3}, None, "dp_replicate*tp*pp = 3*1*1 = 3 does not divide the world size 4"),
    (1, {"tp": 2, "dp_shard": 1}, None, "= 2 != world size 1 (launch with torchrun --nproc_per_node=2)"),
    (1, {"tp": 2}, None, "does not divide the world size 1 (dp_shard: -1 takes the rest); launch with torchrun"),
    (2, {"zero": 1, "tp": 2}, None, "train.parallel.zero: 1"),
    (4, {"zero": 0, "tp": 2}, None, "train.parallel.zero: 0 (DDP) does not compose with tp/pp"),
    (4, {"tp": 4, "zero": 3}, None, "model.n_kv_heads = 2 is not divisible by tp = 4"),
    (2, {"tp": 2, "zero": 3}, {"n_heads": 2, "n_kv_heads": 1}, "model.n_kv_heads = 1 is not divisible"),
    (4, {"pp": 4, "zero": 3}, None, "4 pipeline stages (pp 4 x 1 per rank) > model.n_layers 2"),
    (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}, None, "> model.n_layers 2"),
    (2, {"cpu_offload": True, "zero": 2}, None, "cpu_offload: needs zero: 3"),
    (2, {"pp": 2, "pp_microbatches": 4}, None, "micro_batch 2 is not divisible into 4"),
    (2, {"tp": 2}, {"tie_embeddings": True}, "tied embeddings"),
])
def test_invalid_parallel_configs(world: int, cfg: dict, model: dict | None, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        _dims(world, model, **cfg)
    assert message in str(e.value)


def test_valid_dims_and_coordinates() -> None:
    d = _dims(8, None, dp_replicate=2, tp=2, zero=3)
    assert (d.dp_replicate, d.dp_shard, d.tp, d.pp, d.dp) == (2, 2, 2, 1, 4)
    assert d.coords(5) == {"pp": 0, "dp_replicate": 1, "dp_shard": 0, "tp": 1, "dp": 2}
    assert "HSDP" in d.describe()
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]


def test_single_process_trainer_rejects_a_parallel_recipe_before_building(tokens: Path, tmp_path: Path) -> None:
    run = _run_dir(tmp_path, tokens, "one")
    with pytest.raises(RecipeError, match="launch with torchrun --nproc_per_node=2"):
        Trainer(Recipe.model_validate(_recipe({"tp": 2})), run, progress=False)
    assert not (run / "train").exists()


# --------------------------------------------------------------------------------------------
# crash and restart under torchrun, through the CLI


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-rendezvous", "c10d-rendezvous"])
def test_crashing_rank_restarts_and_resumes(tokens: Path, tmp_path: Path, reference: list[dict],
                                            dynamic: bool) -> None:
    run = _run_dir(tmp_path / "runs", tokens, "crash")
    recipe = {**_recipe({"zero": 0}), "name": "crash", "runs_dir": str(tmp_path / "runs")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = _torchrun(["-m", "smelt", "train", str(tmp_path / "recipe.yaml"), "--quiet"], extra=["--max-restarts=1"],
                     env={"SMELT_CRASH_AT_STEP": "3", "SMELT_CRASH_RANK": "1"}, dynamic=dynamic, timeout=180)
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln][-30:]
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stderr[-3000:]
    assert (run / "train" / ".crashed-at-3").is_file()  # it did crash once
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["resumed_from"] == "step-0000002"
    got = _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # the crashed run's step 3 line was dropped on resume
    _assert_match(got, reference, [1, 2, 3, 4], "crash-restart")


# --------------------------------------------------------------------------------------------
# 4 processes: FSDP x TP (dp_shard 2 x tp 2), HSDP (dp_replicate 2 x dp_shard 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    pytest.param(n, marks=[] if default else pytest.mark.skipif(not SLOW, reason="second 4-process mode: SMELT_SLOW=1"))
    for n, (_, default) in MODES4.items()])
def test_four_process_mode_matches_single_process(mode: str, dist4_runs: dict[str, Path],
                                                  reference: list[dict]) -> None:
    run = dist4_runs[mode]
    assert not _errors(run), _errors(run)
    _assert_match(_metrics(run), reference, list(range(1, STEPS + 1)), mode)
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens"] == STEPS * 8 * 32
    assert manifest["val_loss"] == pytest.approx(reference[-1]["_val_loss"], rel=RTOL)
    state = json.loads((run / "train" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world"] == 4 and LAYOUT[mode] in state["parallel"]
