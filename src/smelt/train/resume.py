"""A training run's state across processes and restarts: checkpoints, resume, init_from, rollback.

What a checkpoint carries besides tensors and RNG (`trainer_state`): step, tokens, samples,
loader position, schedule, stability guard, grad scaler, provenance, and the configuration the
steps were computed with (`computation_config`).

**Resume policy.** With a complete checkpoint in ``train/checkpoints`` a run resumes from it (the
newest that verifies) when the recipe differs from the checkpoint's only in keys that do not
change the steps already taken (`RESUMABLE_TRAIN_KEYS`: a longer ``max_steps``, logging, eval and
checkpoint cadence, threads, compile, ...; `schedule_change` says how a new ``max_steps`` continues
the LR schedule) and stops with a RecipeError naming every other differing key (`resume_plan`).
``resume=False`` starts over after moving ``train/`` aside to ``train.prev-N/`` (nothing is ever
deleted), ``resume=True`` requires a checkpoint.

**init_from.** A run with no checkpoint of its own and ``train.init_from`` set loads only the model
weights of that checkpoint (a run dir: its newest complete one; e.g. a ``smelt import`` of a
Hugging Face model) after checking it fits ``recipe.model`` (`check_init_compatible`); optimizer,
step, RNG and data position start fresh, and once the run has a checkpoint of its own, resuming
ignores init_from.

**Rollback.** When the stability guard asks for it, the newest good checkpoint is reloaded and
the data position moves past the batch that spiked (`rollback`).

Rank 0 takes every decision from JSON state alone and shares it (`broadcast_object`), so an
incompatible recipe stops every rank before any tensor is read; every rank then loads the same
checkpoint (a shared filesystem is assumed, as for DCP itself).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from smelt.config import Recipe, RecipeError, TrainConfig, config_hash, recipe_to_dict
from smelt.config.model import ModelConfig
from smelt.fsutil import move_aside
from smelt.train import checkpoint as ckpt
from smelt.train.optim import lr_at, wsd_decay_start

if TYPE_CHECKING:
    from smelt.train.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["RESUMABLE_TRAIN_KEYS", "computation_config", "config_differences", "run_config_hash",
           "check_init_compatible", "resolve_init_from", "resume_plan", "schedule_change", "branch_dir",
           "branch_aside", "prepare_run_dir", "trainer_state", "restore", "init_weights_from", "save", "rollback",
           "sync_loader"]


# --------------------------------------------------------------------------------------------
# what the steps taken depend on


def run_config_hash(recipe: Recipe, model_cfg: Any) -> str:
    """Hash of everything that shapes the training computation: seed, train, loader, model."""
    return config_hash({
        "seed": recipe.seed,
        "train": recipe_to_dict(recipe.train or TrainConfig()),
        "loader": recipe_to_dict(recipe.loader) if recipe.loader is not None else None,
        "model": recipe_to_dict(model_cfg),
    })


# `train:` keys that do not change the steps already taken: a run whose checkpoint differs from
# the recipe only in these resumes and continues. Logging and evaluation cadence, checkpointing,
# threads, compile and activation checkpointing never change the mathematics of a step (compile
# and recomputation agree to rounding); the parallel layout is resharded by DCP on load; the
# stability guard and max_steps only act on steps still to come (max_steps' effect on the LR
# schedule is handled on its own: `schedule_change`).
RESUMABLE_TRAIN_KEYS = frozenset({"max_steps", "log_every", "eval_every", "eval_batches", "checkpoint", "threads",
                                  "compile", "activation_checkpointing", "ac_every", "tensorboard", "peak_tflops",
                                  "parallel", "stability"})


def computation_config(recipe: Recipe, model_cfg: Any, tokens_key: str | None) -> dict[str, Any]:
    """What the steps already taken depend on: seed, model, loader, token shards and the `train:`
    keys outside `RESUMABLE_TRAIN_KEYS` (optimizer, schedule shape, batch, precision, ...)."""
    train = recipe_to_dict(recipe.train or TrainConfig())
    return {
        "seed": recipe.seed,
        "model": recipe_to_dict(model_cfg),
        "loader": recipe_to_dict(recipe.loader) if recipe.loader is not None else None,
        "tokens": tokens_key,
        "train": {k: v for k, v in train.items() if k not in RESUMABLE_TRAIN_KEYS},
    }


def config_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """``key.path: saved -> now`` for every leaf that differs between two JSON trees."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(now), key=str):
            out += config_differences(saved.get(k), now.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if saved != now:
        name = {"tokens": "tokens/manifest.json key (the packed data)"}.get(prefix, prefix)
        return [f"{name}: {saved!r} in the checkpoint, {now!r} now"]
    return []


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------------------------------------------------------
# init_from: another run's weights

# Model fields a run may change when it starts from another run's weights: labels, the init
# (unused: the weights are loaded), the FFN width rules (the resulting width is compared), and
# the context length and RoPE base, which continued pretraining raises on purpose (Code Llama,
# Roziere et al. 2023, Section 2.4: theta 1e4 -> 1e6 for long-context fine-tuning). Any other
# difference (width, heads, norms, activation, tying, biases, experts, positions) changes what
# the loaded weights compute, so it is an error.
_INIT_FREE_FIELDS = frozenset({"preset", "init", "init_std", "multiple_of", "ffn_dim_multiplier", "ffn_hidden",
                               "n_kv_heads", "max_seq_len", "rope_theta"})


def _arch(cfg: Any) -> dict[str, Any]:
    d = {k: v for k, v in cfg.model_dump().items() if k not in _INIT_FREE_FIELDS}
    d["kv_heads"], d["hidden_dim"] = cfg.kv_heads, cfg.hidden_dim
    return d


def check_init_compatible(path: Path, source_run: Path | None, model_cfg: Any) -> None:
    """Raise RecipeError (naming both sides) unless checkpoint ``path`` fits a model of ``model_cfg``.

    Two checks: every tensor of the model is in the checkpoint with the same shape and nothing
    else is (DCP metadata against a meta-device model: exact whatever wrote the checkpoint), and,
    when the checkpoint belongs to a run directory, that run's model config agrees on every
    field outside `_INIT_FREE_FIELDS` (a tied vs untied output has the same tensors but not
    the same function)."""
    from smelt.model.llama import Transformer
    from smelt.train.load import run_model_config

    src_cfg = None
    if source_run is not None:
        try:
            src_cfg, _ = run_model_config(source_run)
        except (RecipeError, OSError, ValueError) as e:
            log.warning("train.init_from: cannot read the model config of %s (%s); checking tensor shapes only",
                        source_run, e)
    else:
        log.warning("train.init_from: %s is not inside a run directory; checking tensor shapes only", path)
    problems: list[str] = []
    if src_cfg is not None:
        mine, theirs = _arch(model_cfg), _arch(src_cfg)
        problems += [f"model.{k}: {theirs[k]!r} in {source_run / 'recipe.yaml'}, {mine[k]!r} in this recipe"
                     for k in mine if mine[k] != theirs.get(k)]
        free = [f"{k} {getattr(src_cfg, k)!r} -> {getattr(model_cfg, k)!r}" for k in ("max_seq_len", "rope_theta")
                if getattr(src_cfg, k) != getattr(model_cfg, k)]
        if free and not problems:
            log.info("train.init_from: continuing with %s", ", ".join(free))
    meta = ckpt.read_metadata(path).state_dict_metadata
    saved = {k.removeprefix("model."): tuple(v.size) for k, v in meta.items() if k.startswith("model.")}
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Transformer(model_cfg).state_dict().items()}
    for k, shape in want.items():
        if k not in saved:
            problems.append(f"{k}: missing from the checkpoint (this recipe's model has {list(shape)})")
        elif saved[k] != shape:
            problems.append(f"{k}: {list(saved[k])} in the checkpoint, {list(shape)} in this recipe's model")
    problems += [f"{k}: in the checkpoint ({list(saved[k])}), not in this recipe's model" for k in saved
                 if k not in want]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise RecipeError(f"invalid recipe:\n  train.init_from: {path} does not fit this recipe's model "
                          f"(copy the model: section of {source_run / 'recipe.yaml' if source_run else 'its run'}):\n"
                          + "\n".join(f"    {p}" for p in shown))


def resolve_init_from(source: str, train_dir: Path, model_cfg: ModelConfig) -> Path:
    """``train.init_from`` -> a verified checkpoint directory, checked against this run's model."""
    from smelt.train.load import resolve_checkpoint

    path, src_run = resolve_checkpoint(source)  # verifies it (CheckpointError naming the problem)
    path = path.resolve()
    if path.is_relative_to(train_dir.resolve()):
        raise RecipeError(f"invalid recipe:\n  train.init_from: {source} is inside this run's own "
                          f"{train_dir} (resume instead: drop init_from, or do not pass --no-resume)")
    check_init_compatible(path, src_run, model_cfg)
    return path


# --------------------------------------------------------------------------------------------
# resume: may this recipe continue that checkpoint, and how


def resume_plan(latest: Path, cfg: TrainConfig, run_dir: Path, config_hash: str,
                computation: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Check that ``latest`` was made by the same computation as this recipe, and decide how a
    changed ``train.max_steps`` continues the LR schedule. Returns the checkpoint to resume
    from (a WSD extension may pick an earlier one) and the schedule change to record.

    RecipeError when a key that shaped the steps already taken differs (naming every one)."""
    train_dir = run_dir / "train"
    state = ckpt.read_trainer_state(latest)
    saved = state.get("computation")
    if saved is None:  # written before this check existed: the hash is all there is
        if state.get("config_hash") != config_hash:
            log.warning("resuming %s, whose configuration differs from this recipe's (hash %s, checkpoint %s); "
                        "it predates per-key checks", latest.name, config_hash, state.get("config_hash"))
    else:
        diffs = config_differences(saved, jsonable(computation))
        if diffs:
            raise RecipeError(
                f"{train_dir} holds a run made with different settings (at {latest.name}):\n"
                + "\n".join(f"  {d}" for d in diffs[:20])
                + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
                + "\nThese change the training already done, so it cannot continue. Restore them to resume, or "
                "start over with `smelt run --from train` (or `smelt train --no-resume`): the existing "
                f"{train_dir.name}/ is moved aside, not deleted.")
    step = int(state["step"])
    old_max = int((state.get("schedule") or {}).get("max_steps") or cfg.max_steps)
    new_max = cfg.max_steps
    if step > new_max:
        raise RecipeError(f"invalid recipe:\n  train.max_steps: {new_max} is below the {step} steps this run has "
                          f"already taken ({latest}); raise it, or start over with `smelt run --from train`")
    if old_max == new_max:
        return str(latest), None
    return schedule_change(latest, step, old_max, new_max, cfg, run_dir)


def schedule_change(latest: Path, step: int, old_max: int, new_max: int, cfg: TrainConfig,
                    run_dir: Path) -> tuple[str, dict[str, Any] | None]:
    """How a run with a changed ``train.max_steps`` continues its LR schedule.

    - When the new schedule gives every step already taken the LR it had (constant and
      inverse-sqrt schedules, WSD still in its stable phase, warmup), the run continues exactly
      as if the new length had been asked for from the start.
    - WSD past its decay start: the point of WSD (Hagele et al. 2024) is to continue the stable
      phase and decay later. The run goes back to the checkpoint saved at the old decay start
      (kept for this purpose) and continues at the peak LR; the decayed checkpoints and the
      metrics of that branch move to ``train/branches/max_steps-<old>/``, nothing is deleted.
      Without that checkpoint it continues from the newest one on the new schedule.
    - Cosine and linear: a new schedule length. The remaining steps follow the schedule for
      ``new_max`` from the current step; the LR jumps from the old curve to the new one there
      (logged, and recorded as a ``schedule_change`` event), since the steps already taken
      cannot be redone on the new curve.
    """
    train_dir = run_dir / "train"
    sched, peak = cfg.schedule, cfg.optim.lr
    note: dict[str, Any] = {"max_steps_before": old_max, "max_steps": new_max, "step": step}
    same = all(math.isclose(lr_at(s, sched, old_max, peak), lr_at(s, sched, new_max, peak), rel_tol=1e-12)
               for s in range(step))
    if same:
        log.info("train.max_steps %d -> %d: the steps taken had the same LR under the new schedule; continuing "
                 "from step %d exactly as a %d-step run", old_max, new_max, step, new_max)
        return str(latest), {**note, "how": "continued"}
    if sched.kind == "wsd":
        start = wsd_decay_start(sched, old_max)
        branch = [(s, p) for s, p in ckpt.list_checkpoints(train_dir / "checkpoints") if s <= start]
        if branch and all(math.isclose(lr_at(s, sched, old_max, peak), lr_at(s, sched, new_max, peak),
                                       rel_tol=1e-12) for s in range(branch[-1][0])):
            b_step, b_path = branch[-1]
            if ckpt.verify_checkpoint(b_path) is None:
                moved = branch_aside(train_dir, b_step, old_max)
                log.warning("train.max_steps %d -> %d (WSD): continuing the stable phase from %s (the old decay "
                            "started at step %d); the decayed branch (%d checkpoints, its metrics) moved to %s",
                            old_max, new_max, b_path.name, start, len(moved), branch_dir(train_dir, old_max))
                return str(b_path), {**note, "how": "wsd_branch", "from_step": b_step,
                                     "branch": str(branch_dir(train_dir, old_max).relative_to(run_dir))}
        log.warning("train.max_steps %d -> %d (WSD): no checkpoint from before the old decay start (step %d) to "
                    "branch from; continuing from step %d on the new schedule", old_max, new_max, start, step)
    lr_old, lr_new = lr_at(step, sched, old_max, peak), lr_at(step, sched, new_max, peak)
    log.warning("train.max_steps %d -> %d (%s schedule): the remaining steps follow a %d-step schedule; the LR "
                "at step %d goes from %.3g (old schedule) to %.3g", old_max, new_max, sched.kind, new_max, step,
                lr_old, lr_new)
    return str(latest), {**note, "how": "new_length", "lr_before": lr_old, "lr_after": lr_new}


def branch_dir(train_dir: Path, old_max: int) -> Path:
    return train_dir / "branches" / f"max_steps-{old_max}"


def branch_aside(train_dir: Path, from_step: int, old_max: int) -> list[Path]:
    """Move checkpoints after ``from_step`` and copies of the metrics and manifest into the
    branch directory (renames: nothing is deleted)."""
    dest = branch_dir(train_dir, old_max)
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    (dest / "checkpoints").mkdir(parents=True)
    moved = []
    for s, p in ckpt.list_checkpoints(train_dir / "checkpoints"):
        if s > from_step:
            os.replace(p, dest / "checkpoints" / p.name)
            moved.append(p)
    for name in ("metrics.jsonl", "manifest.json"):
        if (train_dir / name).is_file():
            shutil.copy2(train_dir / name, dest / name)
    return moved


# --------------------------------------------------------------------------------------------
# the trainer's state: start, save, restore, roll back


def prepare_run_dir(t: Trainer, resume: bool | None) -> tuple[Path | None, dict[str, Any] | None]:
    """Pick fresh start or resume and load the checkpoint (or the init_from weights). Returns the
    checkpoint resumed from (None: a fresh start) and the schedule change to record, if any.

    Rank 0 chooses the checkpoint and every rank loads that one (a shared filesystem is
    assumed, as for DCP itself)."""
    latest = ckpt.find_latest(t.ckpt_dir) if t.rank == 0 else None
    latest = broadcast_object(latest)
    if resume is True and latest is None:
        raise FileNotFoundError(f"resume requested but {t.ckpt_dir} holds no complete checkpoint")
    if resume is False:
        latest = None
    init_path: Path | None = None
    if latest is None and t.cfg.init_from:
        # Resolved (and verified) before a fresh start deletes train/: the source must not be in it.
        found: Path | BaseException | None = None
        if t.rank == 0:
            try:
                found = resolve_init_from(t.cfg.init_from, t.train_dir, t.model_cfg)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below, none left waiting
                found = e
        found = broadcast_object(found)
        if isinstance(found, BaseException):
            raise found
        init_path = found
    if resume is False and t.train_dir.exists() and t.rank == 0:
        t.moved_aside = move_aside(t.train_dir, "fresh start requested")
    schedule_note: dict[str, Any] | None = None
    if latest is not None:
        # Decided on rank 0 from the JSON state alone (no tensors read yet), then shared, so
        # an incompatible recipe stops every rank before any work.
        decision: Any = None
        if t.rank == 0:
            try:
                decision = resume_plan(latest, t.cfg, t.run_dir, t.config_hash, t.computation)
            except RecipeError as e:
                decision = e
        decision = broadcast_object(decision)
        if isinstance(decision, BaseException):
            raise decision
        latest, schedule_note = Path(decision[0]), decision[1]
    if t.rank == 0:
        t.train_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if latest is not None:
        state = restore(t, latest)
        t.resumed_from = latest.name
        t.init_from = state.get("init_from")
        if state.get("config_hash") != t.config_hash:
            log.info("resuming %s: the recipe differs only in keys that do not change the steps taken", latest.name)
        log.info("resuming from %s: step %d, %s tokens", latest, t.step, f"{t.tokens_seen:,}")
        if t.cfg.init_from:
            log.info("train.init_from (%s) ignored: resuming from this run's own checkpoint %s",
                     t.cfg.init_from, latest.name)
    elif init_path is not None:
        init_weights_from(t, init_path)
    return latest, schedule_note


def trainer_state(t: Trainer) -> dict[str, Any]:
    """Everything a checkpoint carries besides tensors and RNG (``trainer_state.json``)."""
    return {
        "step": t.step,
        "tokens_seen": t.tokens_seen,
        "samples_seen": t.samples_seen,
        "samples_skipped": t.samples_skipped,
        "fp16_overflows": t.fp16_overflows,
        "loader": jsonable(t.loader.state_dict()) if hasattr(t.loader, "state_dict") else None,
        "schedule": {"kind": t.cfg.schedule.kind, "step": t.step, "max_steps": t.cfg.max_steps,
                     "lr_scale_until": t.guard.lr_scale_until},
        "stability": t.guard.state_dict(),
        "grad_scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "last_loss": t.last_loss,
        "init_from": t.init_from,
        "config_hash": t.config_hash,
        "computation": jsonable(t.computation),
        "world": t.world,
        "parallel": t.dims.describe(),
    }


def save(t: Trainer) -> Path:
    """Checkpoint the trainer (every rank takes part: DCP writes one file per rank)."""
    t0 = time.perf_counter()
    # WSD's decay-start checkpoint is kept whatever checkpoint.keep says: a longer run
    # branches from it (`schedule_change`).
    milestone = "wsd_decay_start" if t.step == t.decay_start else None
    path = ckpt.save_checkpoint(t.ckpt_dir, t.step, t.model, t.optimizer,
                                {**trainer_state(t), "milestone": milestone}, keep=t.cfg.checkpoint.keep)
    t.saved_step = t.step
    t.timings["checkpoint_s"] += time.perf_counter() - t0
    return path


def restore(t: Trainer, path: Path, *, rollback: bool = False) -> dict[str, Any]:
    """Load checkpoint ``path`` into the trainer; a rollback keeps the guard's history and the
    count of skipped samples, and leaves the data position to the caller."""
    state = ckpt.load_checkpoint(path, t.model, t.optimizer)
    t.step = int(state["step"])
    t.tokens_seen = int(state["tokens_seen"])
    t.samples_seen = int(state["samples_seen"])
    t.fp16_overflows = int(state.get("fp16_overflows", 0))
    t.last_loss = state.get("last_loss")
    t.guard.load_state_dict(state.get("stability", {}), keep_history=rollback)
    if not rollback:
        t.samples_skipped = int(state.get("samples_skipped", 0))
        if state.get("loader") is not None and hasattr(t.loader, "load_state_dict"):
            # Also checks that the data and loader config are those of the checkpoint.
            t.loader.load_state_dict(state["loader"])
        sync_loader(t)
    if t.scaler is not None and state.get("grad_scaler"):
        t.scaler.load_state_dict(state["grad_scaler"])
    t.saved_step = t.step
    return state


def init_weights_from(t: Trainer, path: Path) -> None:
    """Load model tensors only (optimizer, step, RNG and data position stay fresh).

    Through DCP's `get_model_state_dict`/`set_model_state_dict` on the wrapped model, so a
    DDP, FSDP-sharded, tensor-parallel or pipeline-split model reads its own shards of the
    whole-model checkpoint, as a resume does."""
    t0 = time.perf_counter()
    state = ckpt.load_checkpoint(path, t.model, None, restore_rng=False)
    t.init_from = str(path)
    log.info("train.init_from: weights from %s (its step %s, %s tokens); optimizer, step, RNG and data "
             "position start fresh", path, state.get("step"), f"{int(state.get('tokens_seen') or 0):,}")
    t.timings["startup_s"] += time.perf_counter() - t0


def rollback(t: Trainer, spike_batch: int) -> None:
    """Reload the newest good checkpoint; keep the data position past the spike batch."""
    resume_at = t.samples_seen + spike_batch  # the data after the batch that spiked
    path = ckpt.find_latest(t.ckpt_dir)
    if path is None:  # unreachable: the guard only asks for a rollback when a save happened
        raise RuntimeError("rollback requested but no checkpoint is available")
    spike_step = t.step
    restore(t, path, rollback=True)
    t.samples_skipped += resume_at - t.samples_seen
    log.warning("rollback: step %d -> %s; skipping samples [%d, %d); LR x%g for %d steps", spike_step + 1,
                path.name, t.samples_seen, resume_at, t.cfg.stability.rollback_lr_scale,
                t.cfg.stability.rollback_lr_steps)
    t.samples_seen = resume_at
    sync_loader(t)
    t.guard.start_rollback_lr(t.step)


def sync_loader(t: Trainer) -> None:
    """Keep the loader's own position (its whole state: the next global sample index) equal
    to ``samples_seen``: the trainer addresses batches by index, so a saved loader state then
    names the same position as the trainer state."""
    if hasattr(t.loader, "position"):
        t.loader.position = t.samples_seen


# --------------------------------------------------------------------------------------------
# rank 0 decides, every rank follows


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
