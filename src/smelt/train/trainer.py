"""The training loop (`smelt train`): one process; multi-process parallelism is applied outside.

`train(recipe, run_dir)` reads ``run_dir/tokens/`` through `MixtureLoader`, builds the model from
``recipe.model`` (vocabulary from ``tokens/manifest.json`` when not given), and writes
``run_dir/train/``::

    checkpoints/     DCP checkpoints + trainer_state.json (smelt.train.checkpoint)
    metrics.jsonl    one JSON object per logged step, validation, evaluation or stability
                     event (smelt.train.metrics; ``kind: eval`` lines hold `evaluate_in_training`'s
                     scalars without their ``eval/`` prefix: ``ppl/<domain>``, ``bpb/<domain>``,
                     ``probe/<name>``, ``probes_passed``, ...)
    tensorboard/     TensorBoard events
    manifest.json    complete, steps, tokens, final loss, validation, the last in-training
                     evaluation (in_training_eval), init_from, timings, config hash

One optimizer step, for a global batch of B sequences of T tokens (B may ramp up):

1. the loader gives this rank its rows of samples ``[samples_seen, samples_seen + B)``;
2. the rows run as micro-batches (gradient accumulation); each micro-batch's backward is
   ``(sum of its per-token losses + z-loss) / (target tokens in the whole global batch)`` plus its
   token share of the MoE aux loss, so the accumulated gradient is that of the token-weighted mean
   over the global batch, not a mean of micro-batch means (which over-weights short micro-batches
   when the objective masks targets);
3. the global gradient norm is measured, the stability guard decides ok / skip / rollback, the
   gradient is clipped and the optimizer steps with the scheduled LR.

Exact resume: every input to a step is a function of state saved in the checkpoint (step,
samples_seen, model, optimizer, RNG, guard state), so N straight steps and k steps + kill + resume
to N give bit-identical losses on CPU.

Precision: fp32; bf16 autocast with fp32 master weights (CPU and CUDA); fp16 autocast with dynamic
loss scaling (`torch.amp.GradScaler`, CUDA only: CPU has no fast fp16 matmul and no scaler need).
The loss is always computed in fp32 from the logits.

Run control: with a complete checkpoint in ``train/checkpoints`` the run resumes from it (the
newest that verifies) when the recipe differs from the checkpoint's only in keys that do not
change the steps already taken (`RESUMABLE_TRAIN_KEYS`: a longer ``max_steps``, logging, eval and
checkpoint cadence, threads, compile, ...; `Trainer._schedule_change` says how a new ``max_steps``
continues the LR schedule) and stops with a RecipeError naming every other differing key;
``resume=False`` starts over after moving ``train/`` aside to ``train.prev-N/`` (nothing is ever
deleted), ``resume=True`` requires a checkpoint. The
run with no checkpoint of its own and ``train.init_from`` set loads only the model weights of that
checkpoint (a run dir: its newest complete one; e.g. a ``smelt import`` of a Hugging Face model)
after checking it fits ``recipe.model`` (`check_init_compatible`); optimizer, step, RNG and data
position start fresh, and once the run has a checkpoint of its own, resuming ignores init_from. The
first Ctrl-C finishes the current step, saves and returns (manifest ``complete: false``,
``stopped: "interrupted"``); a second one aborts. Running out of data (`DataExhausted`) saves,
writes the manifest with the reason and re-raises. A crash leaves the last periodic checkpoint.

Evaluation during training: the validation loss per domain every ``train.eval_every`` steps
(`Trainer.evaluate`, ``kind: val`` lines), and with an ``eval:`` section whose ``every_steps`` is
set, `smelt.eval.runner.evaluate_in_training` (held-out perplexity, bits per byte and probes on a
small budget) every that many steps and at the end (`Trainer.evaluate_in_training`, ``kind:
eval`` lines, TensorBoard ``eval/...``). Neither changes the training computation (no RNG draws
survive them), so exact resume holds with both on.

Several processes (``torchrun --nproc_per_node=N -m smelt train RECIPE``): `train` initializes the
process group (smelt.train.parallel.distributed), `ParallelDims.build` validates
``train.parallel`` against the world size before any work, and `parallel.parallelize` applies
pipeline split, tensor parallel, `apply_activation_checkpointing`, `apply_compile` and FSDP/DDP
in that order (STYLE.md 2). Each data-parallel rank reads its slice of every global batch; the
loss is reduced as described in `Trainer.train_step`; only rank 0 writes logs, metrics and
manifests, and every rank takes part in checkpoint saves (DCP writes one file per rank).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smelt.config import (LoaderConfig, Recipe, RecipeError, TrainConfig, config_hash, recipe_to_dict,
                          resolve_model_config)
from smelt.fsutil import atomic_write_json, locked, move_aside, read_json
from smelt.model.flops import flops_per_token
from smelt.tokens.loader import DataExhausted
from smelt.train import checkpoint as ckpt
from smelt.train import parallel as par
from smelt.train.metrics import MetricsWriter, MfuMeter, Throughput, memory_gb
from smelt.train.optim import batch_size_at, build_optimizer, grad_accum_steps, lr_at, set_lr, wsd_decay_start
from smelt.train.stability import StabilityGuard

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
IGNORE_INDEX = -100

__all__ = ["train", "Trainer", "apply_activation_checkpointing", "apply_compile", "StepResult",
           "resolve_model_config", "run_config_hash", "check_init_compatible"]


# --------------------------------------------------------------------------------------------
# model transforms (single process; issue 6 calls them from parallel.py in torchtitan's order)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """Wrap blocks of ``model.layers`` so their activations are recomputed in backward.

    ``full``: every block; ``every_k``: every ``every``-th block (blocks every-1, 2*every-1, ...,
    as torchtitan's selective layer AC). The wrapper (torch's `checkpoint_wrapper`, non-reentrant
    `torch.utils.checkpoint`) hides itself from ``state_dict`` keys, so checkpoints do not depend
    on it. Returns the number of wrapped blocks.
    """
    if mode == "none":
        return 0
    if mode not in ("full", "every_k"):
        raise ValueError(f"train.activation_checkpointing: unknown mode {mode!r} (none, full, every_k)")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    k = 1 if mode == "full" else max(1, every)
    wrapped = 0
    for i, block in enumerate(model.layers):
        layer_id = getattr(block, "layer_id", i)  # global index: a pipeline stage holds a subset
        if (layer_id + 1) % k == 0:
            # preserve_rng_state: recomputation sees the same random numbers (dropout, router noise).
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)
            wrapped += 1
    return wrapped


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` each block in place (``Module.compile``): blocks share one graph, so the
    cold compile is one block's, and state_dict keys are unchanged (torchtitan does the same)."""
    for block in model.layers:
        block.compile()


# --------------------------------------------------------------------------------------------
# helpers


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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

    src_cfg = None
    if source_run is not None:
        from smelt.train.load import run_model_config

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
# schedule is handled on its own: `Trainer._schedule_change`).
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


class _StopFlag:
    """Ctrl-C once: finish the step, checkpoint, exit cleanly. Twice: raise KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
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


class StepResult(dict):
    """What one optimizer step measured (a dict: JSON-ready)."""


# --------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Owns the model, optimizer, loader, guard and writers of one training run.

    ``model`` and ``loader`` may be injected (tests, benchmarks, issue 6's parallelized model);
    by default they are built from the recipe. ``on_step(trainer, result)`` runs after every
    optimizer step (tests use it to simulate a crash).
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, resume: bool | None = None, progress: bool = True,
                 model: nn.Module | None = None, loader: Any = None, device: str | torch.device | None = None,
                 on_step: Callable[[Trainer, StepResult], None] | None = None) -> None:
        self.recipe = recipe
        self.cfg: TrainConfig = recipe.train or TrainConfig()
        if recipe.loader is None:
            raise RecipeError("invalid recipe:\n  loader: required key is missing (smelt train reads tokens/ "
                              "through it)")
        self.loader_cfg: LoaderConfig = recipe.loader
        self.run_dir = Path(run_dir)
        self.tokens_dir = self.run_dir / "tokens"
        self.train_dir = self.run_dir / "train"
        self.ckpt_dir = self.train_dir / "checkpoints"
        self.progress = progress
        self.on_step = on_step
        # Global rank/world from the process group (1 process when none); the device is
        # cuda:LOCAL_RANK under torchrun on GPUs.
        self.env = par.dist_env(device)
        self.rank, self.world = self.env.rank, self.env.world
        self.device = self.env.device
        cfg = self.cfg

        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise RecipeError("invalid recipe:\n  train.precision: fp16 needs a CUDA device (loss scaling is a GPU "
                              "feature); use bf16 or fp32 on CPU")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.seq_len = self.loader_cfg.seq_len
        self.tokens_manifest = self._read_tokens_manifest()
        self.model_cfg = resolve_model_config(recipe, self.tokens_manifest)  # recipe errors before any work
        # Parallel layout, validated against the world size and the model before any work.
        uses_masks = self.loader_cfg.document_mask or self.loader_cfg.objective.kind in ("prefix_lm", "ul2")
        dims_args = dict(model_cfg=self.model_cfg, seq_len=self.seq_len, precision=cfg.precision,
                         uses_masks=uses_masks)
        dims = par.ParallelDims.build(cfg.parallel, self.world, **dims_args)
        # Data-parallel coordinates: the loader slices global batches by these (tp/pp peers of one
        # dp rank read the same rows).
        coords = dims.coords(self.rank)
        self.dp_rank, self.dp_world, self.pp_rank = coords["dp"], dims.dp, coords["pp"]
        self.micro_batch = min(cfg.batch.micro_batch, max(1, cfg.batch.global_batch // self.dp_world))
        if self.micro_batch != cfg.batch.micro_batch:
            log.info("train.batch.micro_batch %d > global_batch / dp: using %d", cfg.batch.micro_batch,
                     self.micro_batch)
        batch_size_at(0, cfg.batch, self.micro_batch, self.dp_world)  # validates global vs micro batch now
        self.dims = par.ParallelDims.build(cfg.parallel, self.world, micro_batch=self.micro_batch, **dims_args)
        if self.world > 1:
            log.info("parallel: %s", self.dims.describe())

        seed_everything(recipe.seed)
        self.loader = loader if loader is not None else self._build_loader()
        self.domains: list[str] = list(getattr(self.loader, "domains", []))
        model = model if model is not None else self._build_model()  # identical on every rank (same seed)
        model.to(self.device)
        model.train()
        self.n_params = sum(p.numel() for p in model.parameters())
        if self.world > 1:
            # Per-rank RNG streams after the shared initialization (dropout / router noise differ
            # across data-parallel ranks, as in any DP run); tp peers share one stream.
            seed_everything(recipe.seed + 1_000_003 * (self.dp_rank * self.dims.pp + self.pp_rank))
        self.mesh = self.dims.build_mesh(self.device.type)
        self.ac_blocks = 0

        def ac(m: nn.Module) -> None:
            self.ac_blocks += apply_activation_checkpointing(m, cfg.activation_checkpointing, cfg.ac_every)

        self.pm = par.parallelize(model, self.dims, self.mesh, self.device, precision=cfg.precision, ac=ac,
                                  compile_fn=apply_compile if cfg.compile else None,
                                  pp_loss=_PipelineLoss(cfg.z_loss) if self.dims.pp > 1 else None)
        self.model = self.pm.params_module  # parameters + state_dict under the whole model's names
        self.core = self.pm.core  # the unwrapped Transformer (aux_loss, output/embedding lookup)
        self._pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        if self.dims.zero == 1 and self.dims.dp > 1:
            from smelt.train.optim import param_groups

            self.optimizer = par.build_zero1_optimizer(param_groups(self.core, cfg.optim), cfg.optim,
                                                       par.dp_group(self.mesh, self.dims))
        else:
            self.optimizer = build_optimizer(self.core, cfg.optim)
            if self.dims.tp > 1 and not cfg.parallel.sequence_parallel:
                # Norm weights stay plain tensors without sequence parallel, the rest are DTensors:
                # foreach/fused kernels refuse the mix, so step parameter by parameter.
                for g in self.optimizer.param_groups:
                    g["foreach"] = False
                    g["fused"] = False
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.guard = StabilityGuard(cfg.stability)
        # Model FLOPs per token (6N + attention, PaLM Appendix B); recomputation is not counted.
        self.flops_per_token = flops_per_token(self.model_cfg, self.seq_len)

        # Run state (everything that a checkpoint must carry, besides tensors and RNG).
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        self.samples_skipped = 0
        self.fp16_overflows = 0
        self.last_loss: float | None = None
        self.last_val: dict[str, Any] | None = None
        self.resumed_from: str | None = None
        self.init_from: str | None = None  # the checkpoint the weights started from (train.init_from)
        self.last_eval: dict[str, float] | None = None  # the latest in-training evaluation's scalars
        self._eval_tokenizer: Any = None
        self.eval_every = self._in_training_eval_every()
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "startup_s": 0.0}
        self._saved_step: int | None = None
        self._plain_lines = False
        self._stop = _StopFlag()
        self.config_hash = self._config_hash()
        self.computation = computation_config(recipe, self.model_cfg, self.tokens_manifest.get("key"))
        self.moved_aside: Path | None = None
        self._decay_start = (wsd_decay_start(cfg.schedule, cfg.max_steps) if cfg.schedule.kind == "wsd" else None)
        self._prepare_run_dir(resume)

    # ------------------------------------------------------------------ construction

    def _read_tokens_manifest(self) -> dict[str, Any]:
        path = self.tokens_dir / "manifest.json"
        if not path.is_file():
            return {}
        return read_json(path)

    def _build_loader(self) -> Any:
        if not (self.tokens_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.tokens_dir}/manifest.json not found: run `smelt pack` first")
        from smelt.tokens.loader import MixtureLoader

        seed = self.loader_cfg.seed if self.loader_cfg.seed is not None else self.recipe.seed
        return MixtureLoader(self.tokens_dir, self.loader_cfg, seed, split="train")

    def _build_model(self) -> nn.Module:
        from smelt.model.llama import Transformer

        torch.manual_seed(self.recipe.seed)
        with torch.device(self.device):
            model = Transformer(self.model_cfg)
        torch.manual_seed(self.recipe.seed)
        model.init_weights()
        log.info("model: %s parameters (%s)", f"{sum(p.numel() for p in model.parameters()):,}",
                 self.model_cfg.preset or "custom")
        return model

    def _config_hash(self) -> str:
        return run_config_hash(self.recipe, self.model_cfg)

    def _prepare_run_dir(self, resume: bool | None) -> None:
        """Pick fresh start or resume; load the checkpoint; open the metrics writer.

        Rank 0 chooses the checkpoint and every rank loads that one (a shared filesystem is
        assumed, as for DCP itself)."""
        t0 = time.perf_counter()
        latest = ckpt.find_latest(self.ckpt_dir) if self.rank == 0 else None
        latest = _broadcast_object(latest)
        if resume is True and latest is None:
            raise FileNotFoundError(f"resume requested but {self.ckpt_dir} holds no complete checkpoint")
        if resume is False:
            latest = None
        init_path: Path | None = None
        if latest is None and self.cfg.init_from:
            # Resolved (and verified) before a fresh start deletes train/: the source must not be in it.
            found: Path | BaseException | None = None
            if self.rank == 0:
                try:
                    found = self._resolve_init_from(self.cfg.init_from)
                except Exception as e:  # noqa: BLE001 - re-raised on every rank below, none left waiting
                    found = e
            found = _broadcast_object(found)
            if isinstance(found, BaseException):
                raise found
            init_path = found
        if resume is False and self.train_dir.exists() and self.rank == 0:
            self.moved_aside = move_aside(self.train_dir, "fresh start requested")
        schedule_note: dict[str, Any] | None = None
        if latest is not None:
            # Decided on rank 0 from the JSON state alone (no tensors read yet), then shared, so
            # an incompatible recipe stops every rank before any work.
            decision: Any = None
            if self.rank == 0:
                try:
                    decision = self._resume_plan(latest)
                except RecipeError as e:
                    decision = e
            decision = _broadcast_object(decision)
            if isinstance(decision, BaseException):
                raise decision
            latest, schedule_note = Path(decision[0]), decision[1]
        if self.rank == 0:
            self.train_dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        if latest is not None:
            state = self._load(latest)
            self.resumed_from = latest.name
            self.init_from = state.get("init_from")
            if state.get("config_hash") != self.config_hash:
                log.info("resuming %s: the recipe differs only in keys that do not change the steps taken", latest.name)
            log.info("resuming from %s: step %d, %s tokens", latest, self.step, f"{self.tokens_seen:,}")
            if self.cfg.init_from:
                log.info("train.init_from (%s) ignored: resuming from this run's own checkpoint %s",
                         self.cfg.init_from, latest.name)
        elif init_path is not None:
            self._init_weights_from(init_path)
        self.metrics = MetricsWriter(self.train_dir, tensorboard=self.cfg.tensorboard, enabled=self.rank == 0,
                                     resume_step=self.step if latest is not None else None)
        if schedule_note is not None:
            self.metrics.write("event", self.step, {"event": "schedule_change", **schedule_note})
        self.timings["startup_s"] += time.perf_counter() - t0

    def _resume_plan(self, latest: Path) -> tuple[str, dict[str, Any] | None]:
        """Check that ``latest`` was made by the same computation as this recipe, and decide how a
        changed ``train.max_steps`` continues the LR schedule. Returns the checkpoint to resume
        from (a WSD extension may pick an earlier one) and the schedule change to record.

        RecipeError when a key that shaped the steps already taken differs (naming every one)."""
        state = ckpt.read_trainer_state(latest)
        saved = state.get("computation")
        if saved is None:  # written before this check existed: the hash is all there is
            if state.get("config_hash") != self.config_hash:
                log.warning("resuming %s, whose configuration differs from this recipe's (hash %s, checkpoint %s); "
                            "it predates per-key checks", latest.name, self.config_hash, state.get("config_hash"))
        else:
            diffs = config_differences(saved, _jsonable(self.computation))
            if diffs:
                raise RecipeError(
                    f"{self.train_dir} holds a run made with different settings (at {latest.name}):\n"
                    + "\n".join(f"  {d}" for d in diffs[:20])
                    + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
                    + "\nThese change the training already done, so it cannot continue. Restore them to resume, or "
                    "start over with `smelt run --from train` (or `smelt train --no-resume`): the existing "
                    f"{self.train_dir.name}/ is moved aside, not deleted.")
        step = int(state["step"])
        old_max = int((state.get("schedule") or {}).get("max_steps") or self.cfg.max_steps)
        new_max = self.cfg.max_steps
        if step > new_max:
            raise RecipeError(f"invalid recipe:\n  train.max_steps: {new_max} is below the {step} steps this run has "
                              f"already taken ({latest}); raise it, or start over with `smelt run --from train`")
        if old_max == new_max:
            return str(latest), None
        return self._schedule_change(latest, step, old_max, new_max)

    def _schedule_change(self, latest: Path, step: int, old_max: int,
                         new_max: int) -> tuple[str, dict[str, Any] | None]:
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
        sched, peak = self.cfg.schedule, self.cfg.optim.lr
        note: dict[str, Any] = {"max_steps_before": old_max, "max_steps": new_max, "step": step}
        same = all(math.isclose(lr_at(s, sched, old_max, peak), lr_at(s, sched, new_max, peak), rel_tol=1e-12)
                   for s in range(step))
        if same:
            log.info("train.max_steps %d -> %d: the steps taken had the same LR under the new schedule; continuing "
                     "from step %d exactly as a %d-step run", old_max, new_max, step, new_max)
            return str(latest), {**note, "how": "continued"}
        if sched.kind == "wsd":
            start = wsd_decay_start(sched, old_max)
            branch = [(s, p) for s, p in ckpt.list_checkpoints(self.ckpt_dir) if s <= start]
            if branch and all(math.isclose(lr_at(s, sched, old_max, peak), lr_at(s, sched, new_max, peak),
                                           rel_tol=1e-12) for s in range(branch[-1][0])):
                b_step, b_path = branch[-1]
                if ckpt.verify_checkpoint(b_path) is None:
                    moved = self._branch_aside(b_step, old_max)
                    log.warning("train.max_steps %d -> %d (WSD): continuing the stable phase from %s (the old decay "
                                "started at step %d); the decayed branch (%d checkpoints, its metrics) moved to %s",
                                old_max, new_max, b_path.name, start, len(moved), self._branch_dir(old_max))
                    return str(b_path), {**note, "how": "wsd_branch", "from_step": b_step,
                                         "branch": str(self._branch_dir(old_max).relative_to(self.run_dir))}
            log.warning("train.max_steps %d -> %d (WSD): no checkpoint from before the old decay start (step %d) to "
                        "branch from; continuing from step %d on the new schedule", old_max, new_max, start, step)
        lr_old, lr_new = lr_at(step, sched, old_max, peak), lr_at(step, sched, new_max, peak)
        log.warning("train.max_steps %d -> %d (%s schedule): the remaining steps follow a %d-step schedule; the LR "
                    "at step %d goes from %.3g (old schedule) to %.3g", old_max, new_max, sched.kind, new_max, step,
                    lr_old, lr_new)
        return str(latest), {**note, "how": "new_length", "lr_before": lr_old, "lr_after": lr_new}

    def _branch_dir(self, old_max: int) -> Path:
        return self.train_dir / "branches" / f"max_steps-{old_max}"

    def _branch_aside(self, from_step: int, old_max: int) -> list[Path]:
        """Move checkpoints after ``from_step`` and copies of the metrics and manifest into the
        branch directory (renames: nothing is deleted)."""
        dest = self._branch_dir(old_max)
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        (dest / "checkpoints").mkdir(parents=True)
        moved = []
        for s, p in ckpt.list_checkpoints(self.ckpt_dir):
            if s > from_step:
                os.replace(p, dest / "checkpoints" / p.name)
                moved.append(p)
        for name in ("metrics.jsonl", "manifest.json"):
            if (self.train_dir / name).is_file():
                shutil.copy2(self.train_dir / name, dest / name)
        return moved

    # ------------------------------------------------------------------ state

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "samples_seen": self.samples_seen,
            "samples_skipped": self.samples_skipped,
            "fp16_overflows": self.fp16_overflows,
            "loader": _jsonable(self.loader.state_dict()) if hasattr(self.loader, "state_dict") else None,
            "schedule": {"kind": self.cfg.schedule.kind, "step": self.step, "max_steps": self.cfg.max_steps,
                         "lr_scale_until": self.guard.lr_scale_until},
            "stability": self.guard.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "last_loss": self.last_loss,
            "init_from": self.init_from,
            "config_hash": self.config_hash,
            "computation": _jsonable(self.computation),
            "world": self.world,
            "parallel": self.dims.describe(),
        }

    def _load(self, path: Path, *, rollback: bool = False) -> dict[str, Any]:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.samples_seen = int(state["samples_seen"])
        self.fp16_overflows = int(state.get("fp16_overflows", 0))
        self.last_loss = state.get("last_loss")
        self.guard.load_state_dict(state.get("stability", {}), keep_history=rollback)
        if not rollback:
            self.samples_skipped = int(state.get("samples_skipped", 0))
            if state.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
                # Also checks that the data and loader config are those of the checkpoint.
                self.loader.load_state_dict(state["loader"])
            self._sync_loader()
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self._saved_step = self.step
        return state

    def _resolve_init_from(self, source: str) -> Path:
        """``train.init_from`` -> a verified checkpoint directory, checked against this run's model."""
        from smelt.train.load import resolve_checkpoint

        path, src_run = resolve_checkpoint(source)  # verifies it (CheckpointError naming the problem)
        path = path.resolve()
        if path.is_relative_to(self.train_dir.resolve()):
            raise RecipeError(f"invalid recipe:\n  train.init_from: {source} is inside this run's own "
                              f"{self.train_dir} (resume instead: drop init_from, or do not pass --no-resume)")
        check_init_compatible(path, src_run, self.model_cfg)
        return path

    def _init_weights_from(self, path: Path) -> None:
        """Load model tensors only (optimizer, step, RNG and data position stay fresh).

        Through DCP's `get_model_state_dict`/`set_model_state_dict` on the wrapped model, so a
        DDP, FSDP-sharded, tensor-parallel or pipeline-split model reads its own shards of the
        whole-model checkpoint, as a resume does."""
        t0 = time.perf_counter()
        state = ckpt.load_checkpoint(path, self.model, None, restore_rng=False)
        self.init_from = str(path)
        log.info("train.init_from: weights from %s (its step %s, %s tokens); optimizer, step, RNG and data "
                 "position start fresh", path, state.get("step"), f"{int(state.get('tokens_seen') or 0):,}")
        self.timings["startup_s"] += time.perf_counter() - t0

    def save(self) -> Path:
        t0 = time.perf_counter()
        # WSD's decay-start checkpoint is kept whatever checkpoint.keep says: a longer run
        # branches from it (`_schedule_change`).
        milestone = "wsd_decay_start" if self.step == self._decay_start else None
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                    {**self._trainer_state(), "milestone": milestone}, keep=self.cfg.checkpoint.keep)
        self._saved_step = self.step
        self.timings["checkpoint_s"] += time.perf_counter() - t0
        return path

    # ------------------------------------------------------------------ one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
                for k, v in batch.items()}

    def _forward_kwargs(self, batch: dict[str, np.ndarray]) -> dict[str, bool]:
        """Which optional inputs this batch needs: omitting trivial ones keeps the model on its
        fast path (plain causal SDPA, positions 0..T-1)."""
        T = batch["input_ids"].shape[1]
        pos = batch.get("position_ids")
        seg = batch.get("segment_ids")
        pre = batch.get("prefix_len")
        return {
            "position_ids": pos is not None and not np.array_equal(pos, np.broadcast_to(np.arange(T), pos.shape)),
            "segment_ids": seg is not None and self.loader_cfg.document_mask and bool(np.any(seg != seg[:, :1])),
            "prefix_len": pre is not None and bool(np.any(pre > 0)),
        }

    def _logits(self, mb: dict[str, torch.Tensor], use: dict[str, bool]) -> torch.Tensor:
        kwargs = {k: mb[k] for k, on in use.items() if on}
        with self._autocast():
            return self.pm.module(mb["input_ids"], **kwargs)  # (b, T, V)

    def _token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.recipe.train.compile:
            # The fp32 upcast + log-softmax over the vocabulary is ~10% of a small model's step on
            # CPU (bench/train_step.py profile); compiled, inductor fuses it without the fp32 copy.
            return _compiled_token_losses()(logits, targets)
        return token_losses(logits, targets)

    def _pipeline(self, mb: dict[str, torch.Tensor], scale: float, *, train: bool) -> tuple[torch.Tensor, ...]:
        """One pass of the pipeline schedule over a micro-batch (split into pp_microbatches).

        Returns per-row token-loss sums, per-row target counts and the z-loss sum; zeros except
        on the rank holding the last stage. ``scale`` multiplies the loss that is backpropagated.
        """
        sched, loss = self.pm.schedule, self.pm.loss
        loss.begin(scale)
        args = (mb["input_ids"],) if self.pm.first else ()
        target = mb["targets"] if self.pm.last else None
        with self._autocast():
            (sched.step if train else sched.eval)(*args, target=target)
        return loss.end(mb["input_ids"].shape[0], self.dims.pp_microbatches, self.device)

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP: all-reduce gradients only after the last micro-batch of the accumulation."""
        if self.pm.ddp and not last:
            return self.pm.module.no_sync()
        return contextlib.nullcontext()

    def _reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per-rank statistics over the data-parallel ranks. Reduced over the whole world and
        divided by tp: tensor-parallel peers hold identical copies (replicated logits), and under
        pipeline parallelism only the last stage holds non-zero values."""
        if self.world == 1:
            return t
        par.all_reduce_sum(t)
        return t / self.dims.tp if self.dims.tp > 1 else t

    def train_step(self, batch: dict[str, np.ndarray]) -> StepResult:
        """Forward and backward over the batch's micro-batches (this rank's rows of the global
        batch). Returns the mean loss over target tokens, per domain, and token counts; leaves
        the accumulated gradient in ``.grad`` and does not step the optimizer (benchmarks time
        this call)."""
        cfg = self.cfg
        rows = batch["input_ids"].shape[0]
        use = self._forward_kwargs(batch)
        pipelined = self.pm.schedule is not None
        if pipelined and any(use.values()):
            raise RuntimeError(f"pipeline parallelism takes token ids only, but this batch needs "
                               f"{[k for k, v in use.items() if v]}")
        n_micro = grad_accum_steps(rows * self.dp_world, self.micro_batch, self.dp_world)
        n_targets = int((batch["targets"] != IGNORE_INDEX).sum())
        n_domains = max(len(self.domains), int(batch["domain"].max()) + 1 if rows else 1)
        if self.world > 1:
            # Token-weighted mean over the GLOBAL batch: every rank divides its token-loss sum by
            # the target count of all ranks' rows together. A mean of per-rank (or per-micro-
            # batch) means would over-weight ranks whose rows hold fewer targets (padding, masked
            # objectives), so the loss and gradient would depend on the world size.
            counts = torch.tensor([n_targets, n_domains], dtype=torch.int64)
            par.all_reduce_sum(counts)  # gloo and NCCL both reduce int64 (CPU tensor: gloo only)
            n_targets = int(counts[0]) // (self.dims.tp * self.dims.pp)
            n_domains = max(len(self.domains), n_domains)
        denom = max(n_targets, 1)
        # DDP and FSDP average gradients over the dp ranks; multiplying by dp turns that average
        # into the sum over ranks of (rank's token-loss sum / global count) = the global mean.
        dp = self.dp_world
        dom_loss = torch.zeros(n_domains, dtype=torch.float64, device=self.device)
        dom_count = torch.zeros(n_domains, dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        z_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(n_micro):
            sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            mb = self._to_device({k: v[sl] for k, v in batch.items()})
            if pipelined:
                row_loss, row_count, z = self._pipeline(mb, dp / denom, train=True)
                loss_sum += row_loss.sum()
                z_sum += z
                dom_loss.index_add_(0, mb["domain"], row_loss)
                dom_count.index_add_(0, mb["domain"], row_count)
                continue
            with self._no_sync(i == n_micro - 1):
                self._micro_step(mb, use, dp, denom, dom_loss, dom_count, loss_sum, z_sum, aux_sum)
        if self.world > 1:
            stats = self._reduce_stats(torch.cat([torch.stack([loss_sum, z_sum, aux_sum]), dom_loss, dom_count]))
            loss_sum, z_sum, aux_sum = stats[0], stats[1], stats[2]
            dom_loss, dom_count = stats[3:3 + n_domains], stats[3 + n_domains:]
        loss = float(loss_sum) / denom
        by_domain = {}
        for d, (dl, dc) in enumerate(zip(dom_loss.tolist(), dom_count.tolist())):  # one device sync
            if dc > 0:
                by_domain[self.domains[d] if d < len(self.domains) else str(d)] = dl / dc
        res = StepResult(loss=loss, loss_by_domain=by_domain, target_tokens=n_targets,
                         tokens=rows * batch["input_ids"].shape[1] * self.dp_world)
        if cfg.z_loss > 0:
            res["z_loss"] = float(z_sum) / denom
        if float(aux_sum) != 0.0:
            res["aux_loss"] = float(aux_sum)
        return res

    def _micro_step(self, mb: dict[str, torch.Tensor], use: dict[str, bool], dp: int, denom: int,
                    dom_loss: torch.Tensor, dom_count: torch.Tensor, loss_sum: torch.Tensor, z_sum: torch.Tensor,
                    aux_sum: torch.Tensor) -> None:
        """Forward and backward of one micro-batch; accumulates the statistics in place."""
        cfg = self.cfg
        logits = self._logits(mb, use)  # (b, T, V)
        tok = self._token_losses(logits, mb["targets"])  # (b, T)
        mask = mb["targets"] != IGNORE_INDEX  # (b, T)
        micro_sum = tok.sum()
        objective = micro_sum
        if cfg.z_loss > 0:
            # z-loss (PaLM, Chowdhery et al. 2022, Section 5): pushes log Z toward 0.
            lse = torch.logsumexp(logits.float(), dim=-1)  # (b, T)
            z = (lse.square() * mask).sum()
            objective = objective + cfg.z_loss * z
            z_sum += z.detach()
        objective = objective * dp / denom  # dp: see train_step (1 in one process: unchanged)
        aux = getattr(self.core, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.requires_grad and cfg.moe_aux_weight > 0:
            share = float(mask.sum()) / denom  # token share of this micro-batch (of the global batch)
            objective = objective + cfg.moe_aux_weight * share * dp * aux
            aux_sum += aux.detach() * share
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
        else:
            objective.backward()
        loss_sum += micro_sum.detach()
        dom = mb["domain"]
        dom_loss.index_add_(0, dom, tok.detach().sum(1).double())
        dom_count.index_add_(0, dom, mask.sum(1).double())

    def _grad_norm(self) -> torch.Tensor:
        if self.world > 1:  # DTensor shards, pipeline stages: the norm of the whole gradient
            return par.grad_norm(list(self.model.parameters()), self.device, self._pp_group)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)

    def _clip(self, norm_t: torch.Tensor) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.world > 1:
            par.clip_grads(params, self.cfg.grad_clip, norm_t)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm_t, foreach=True)

    # ------------------------------------------------------------------ evaluation

    def _eval_sums(self, batch: dict[str, np.ndarray]) -> tuple[float, int]:
        """Summed token loss and target count of one validation batch (0, 0 off the last stage)."""
        mb = self._to_device(batch)
        if self.pm.schedule is not None:
            row_loss, row_count, _ = self._pipeline(mb, 1.0, train=False)
            return float(row_loss.sum()), int(row_count.sum())
        logits = self._logits(mb, self._forward_kwargs(batch))
        return (float(self._token_losses(logits, mb["targets"]).sum(dtype=torch.float64)),
                int((mb["targets"] != IGNORE_INDEX).sum()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Token-weighted validation loss per domain (``loader.val_batches``) and overall.

        With several data-parallel ranks, rank r takes batches r, r + dp, ...; every rank runs
        the same number of forwards (the last round is padded with a weight-0 repeat) because
        FSDP, TP and PP forwards are collective. Sums are then reduced over the ranks."""
        t0 = time.perf_counter()
        self.model.eval()
        sums: dict[str, list[float]] = {}
        try:
            for d in self.domains:
                d_loss, d_tok = 0.0, 0
                if self.world == 1:
                    for batch in self.loader.val_batches(d, self.micro_batch, self.cfg.eval_batches):
                        bl, bt = self._eval_sums(batch)
                        d_loss += bl
                        d_tok += bt
                else:
                    batches = list(self.loader.val_batches(d, self.micro_batch, self.cfg.eval_batches))
                    if self.pm.schedule is not None:  # the pipeline splits rows into equal chunks
                        batches = [b for b in batches if b["input_ids"].shape[0] % self.dims.pp_microbatches == 0]
                    rounds = -(-len(batches) // self.dp_world)
                    for j in range(rounds):
                        idx = j * self.dp_world + self.dp_rank
                        bl, bt = self._eval_sums(batches[min(idx, len(batches) - 1)])
                        if idx < len(batches):
                            d_loss += bl
                            d_tok += bt
                sums[d] = [d_loss, float(d_tok)]
            if self.world > 1 and sums:
                flat = self._reduce_stats(torch.tensor([v for pair in sums.values() for v in pair],
                                                       dtype=torch.float64, device=self.device)).tolist()
                sums = {d: [flat[2 * i], round(flat[2 * i + 1])] for i, d in enumerate(sums)}
        finally:
            self.model.train()
        by_domain: dict[str, float] = {}
        tot_loss, tot_tok = 0.0, 0
        for d, (d_loss, d_tok) in sums.items():
            if d_tok:
                by_domain[d] = d_loss / d_tok
                tot_loss += d_loss
                tot_tok += int(d_tok)
        out = {"val_loss": tot_loss / tot_tok if tot_tok else float("nan"), "val_loss_by_domain": by_domain,
               "val_tokens": tot_tok}
        self.timings["eval_s"] += time.perf_counter() - t0
        self.last_val = out
        self.metrics.write("val", self.step, out)
        log.info("step %d: val loss %.4f %s", self.step, out["val_loss"],
                 " ".join(f"{k}={v:.4f}" for k, v in by_domain.items()))
        return out

    def _in_training_eval_every(self) -> int:
        """``eval.every_steps`` when in-training evaluation can run here, else 0 (logged once).

        `evaluate_in_training` runs plain forwards of the whole model in one process (rank 0):
        with FSDP shards, tensor-parallel DTensors or pipeline stages no rank holds the whole
        model, and a forward would be a collective the other ranks are not taking part in.
        Replicated layouts (one process, DDP, ZeRO-1) evaluate rank 0's unwrapped copy while the
        other ranks wait at the next step's collective."""
        every = self.recipe.eval.every_steps if self.recipe.eval is not None else 0
        if not every:
            return 0
        if self.dims.fsdp or self.dims.tp > 1 or self.dims.pp > 1:
            if self.rank == 0:
                log.warning("eval.every_steps=%d: in-training evaluation is skipped for this layout (%s): it runs a "
                            "plain forward of the whole model on one process, and no rank holds the whole model "
                            "under FSDP/TP/PP; run `smelt eval` on the checkpoints instead", every,
                            self.dims.describe())
            return 0
        if self.rank == 0:
            from smelt.eval.probes import load_probe_files

            load_probe_files(self.recipe.eval.probes)  # a bad probe file is an error now, not at step N
        return every

    def _tokenizer_for_eval(self) -> Any:
        """The run's tokenizer (``tokenizer/tokenizer.json``, as `smelt.train.load` finds it)."""
        if self._eval_tokenizer is None:
            from tokenizers import Tokenizer

            path = self.run_dir / "tokenizer" / "tokenizer.json"
            if not path.is_file():
                log.warning("eval.every_steps: %s not found; in-training evaluation disabled for this run", path)
                self.eval_every = 0
                return None
            self._eval_tokenizer = Tokenizer.from_file(str(path))
        return self._eval_tokenizer

    @torch.no_grad()
    def evaluate_in_training(self) -> dict[str, float] | None:
        """`smelt.eval.runner.evaluate_in_training` (held-out perplexity + probes, small budget) on
        rank 0's unwrapped model; scalars to metrics.jsonl (``kind: eval``) and TensorBoard
        (``eval/...``). Other ranks return None at once.

        Exact resume: the global RNG states are captured before and restored after, and the
        model's train/eval mode is restored, so a run with evaluation takes the same steps, bit
        for bit, as one without. A failure is logged and disables further in-training
        evaluation; the training run goes on (``smelt eval`` can redo it from the checkpoints)."""
        if self.rank != 0 or not self.eval_every:
            return None
        tokenizer = self._tokenizer_for_eval()
        if tokenizer is None:
            return None
        from smelt.eval.runner import evaluate_in_training

        t0 = time.perf_counter()
        rng = ckpt.capture_rng_state()
        was_training = self.core.training
        self.core.eval()
        bf16 = self.recipe.eval is not None and self.recipe.eval.precision == "bf16"
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                scalars = evaluate_in_training(self.core, tokenizer, self.recipe, self.run_dir)
        except Exception:  # noqa: BLE001 - evaluation is auxiliary: never lose the training run to it
            log.exception("step %d: in-training evaluation failed; disabled for the rest of this run", self.step)
            self.eval_every = 0
            return None
        finally:
            self.core.train(was_training)
            ckpt.restore_rng_state(rng)
        self.last_eval = scalars
        self.metrics.write("eval", self.step, {k.removeprefix("eval/"): v for k, v in scalars.items()})
        self.timings["eval_s"] += time.perf_counter() - t0
        ppl = {k.removeprefix("eval/ppl/"): v for k, v in scalars.items() if k.startswith("eval/ppl/")}
        log.info("step %d: eval %s%s (%.1f s)", self.step, " ".join(f"ppl/{d}={v:.3f}" for d, v in ppl.items()),
                 f" probes passed {scalars['eval/probes_passed']:.0%}" if "eval/probes_passed" in scalars else "",
                 time.perf_counter() - t0)
        return scalars

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary also written to train/manifest.json."""
        cfg = self.cfg
        t_start = time.perf_counter()
        # Per-device peak times the processes (one device each): MFU of the whole job. A measured
        # CPU peak is re-measured when a step beats it (it was taken under load); MFU <= 1.
        mfu = MfuMeter(cfg.precision, self.device, cfg.peak_tflops, world=self.world)
        log.info("training %d steps from step %d on %s (%s); MFU peak %.1f TFLOP/s", cfg.max_steps, self.step,
                 self.device, cfg.precision, mfu.peak / 1e12)
        throughput = Throughput()
        interrupted = False
        last_rate, last_mfu = 0.0, 0.0
        if self.step >= cfg.max_steps:
            log.info("nothing to do: step %d >= train.max_steps %d", self.step, cfg.max_steps)
        try:
            with self._stop.installed(), self._progress_bar() as bar:
                while self.step < cfg.max_steps:
                    if self._stop.requested:
                        interrupted = True
                        break
                    throughput.start()
                    result = self._one_step()
                    if result["action"] == "rollback":
                        throughput.stop(0)
                        bar(self.step, None, 0.0)
                        continue
                    throughput.stop(result["tokens"])
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        rate, seconds = throughput.read()
                        self.timings["train_s"] += seconds
                        last_rate = rate
                        last_mfu = mfu(rate * self.flops_per_token)
                        self._log_step(result, rate, last_mfu)
                    bar(self.step, result["loss"], last_rate)
                    if self.on_step is not None:
                        self.on_step(self, result)
                    par.maybe_crash(self.step, self.train_dir, self.rank)  # test-only hook (env var)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                        self.evaluate()
                    if self.eval_every and self.step % self.eval_every == 0 and self.step < cfg.max_steps:
                        self.evaluate_in_training()
                    if (self.step % cfg.checkpoint.every == 0 or self.step == self._decay_start) \
                            and self.step < cfg.max_steps:
                        self.save()
            self.timings["train_s"] += throughput.read()[1]
            if self.step >= cfg.max_steps:
                self.evaluate()
                self.evaluate_in_training()
            if self._saved_step != self.step:
                self.save()
        except DataExhausted as e:
            # Not a crash: keep the progress, say why in the manifest, and fail loudly.
            log.error("step %d: %s; raise loader.max_epochs, add data, or lower train.max_steps", self.step, e)
            if self._saved_step != self.step:
                self.save()
            summary = self._summary(complete=False, interrupted=False, wall=time.perf_counter() - t_start,
                                    tokens_per_s=last_rate, mfu=last_mfu, stopped=f"data exhausted: {e}")
            if self.rank == 0:
                atomic_write_json(self.train_dir / "manifest.json", summary)
            self.metrics.close()
            raise
        except BaseException:
            self.metrics.close()  # a crash: leave the log as it is; the next run truncates it
            raise
        wall = time.perf_counter() - t_start
        summary = self._summary(complete=self.step >= cfg.max_steps, interrupted=interrupted, wall=wall,
                                tokens_per_s=last_rate, mfu=last_mfu, stopped="interrupted" if interrupted else None)
        if self.rank == 0:
            atomic_write_json(self.train_dir / "manifest.json", summary)
        self.metrics.close()
        log.info("training %s at step %d: loss %s", "complete" if summary["complete"] else "stopped", self.step,
                 f"{self.last_loss:.4f}" if self.last_loss is not None else "n/a")
        return summary

    def _one_step(self) -> StepResult:
        """Fetch, forward/backward, guard, update. Returns the step's measurements and action."""
        cfg = self.cfg
        batch_size = batch_size_at(self.tokens_seen, cfg.batch, self.micro_batch, self.dp_world)
        lr = lr_at(self.step, cfg.schedule, cfg.max_steps, cfg.optim.lr) * self.guard.lr_scale(self.step)
        set_lr(self.optimizer, lr)
        batch = self.loader.batch(self.samples_seen, batch_size, self.dp_rank, self.dp_world)
        result = self.train_step(batch)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm_t = self._grad_norm()
        grad_norm = float(norm_t)
        loss = result["loss"]
        result.update(lr=lr, grad_norm=grad_norm, batch_size=batch_size)

        if self.scaler is not None and not math.isfinite(grad_norm) and math.isfinite(loss):
            # fp16 overflow: the scaler skips this update and lowers its scale; routine, not an event.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.fp16_overflows += 1
            action = "skip"
        else:
            decision = self.guard.check(self.step + 1, loss, grad_norm, can_rollback=self._saved_step is not None)
            action = decision.action
            if decision.event is not None:
                rec = decision.event.to_json()
                rec["event"] = rec.pop("kind")
                self.metrics.write("event", rec.pop("step"), rec)
            if action == "ok":
                if cfg.grad_clip > 0:
                    self._clip(norm_t)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
            elif self.scaler is not None:
                self.scaler.update()  # unscale_ was called: close this iteration of the scaler
        self.optimizer.zero_grad(set_to_none=True)
        result["action"] = action

        if action == "rollback":
            self._rollback(batch_size)
            return result
        self.step += 1
        self.tokens_seen += result["tokens"]
        self.samples_seen += batch_size
        self._sync_loader()
        if math.isfinite(loss):
            self.last_loss = loss
        return result

    def _rollback(self, spike_batch: int) -> None:
        """Reload the newest good checkpoint; keep the data position past the spike batch."""
        resume_at = self.samples_seen + spike_batch  # the data after the batch that spiked
        path = ckpt.find_latest(self.ckpt_dir)
        if path is None:  # unreachable: the guard only asks for a rollback when a save happened
            raise RuntimeError("rollback requested but no checkpoint is available")
        spike_step = self.step
        self._load(path, rollback=True)
        self.samples_skipped += resume_at - self.samples_seen
        log.warning("rollback: step %d -> %s; skipping samples [%d, %d); LR x%g for %d steps", spike_step + 1,
                    path.name, self.samples_seen, resume_at, self.cfg.stability.rollback_lr_scale,
                    self.cfg.stability.rollback_lr_steps)
        self.samples_seen = resume_at
        self._sync_loader()
        self.guard.start_rollback_lr(self.step)

    def _sync_loader(self) -> None:
        """Keep the loader's own position (its whole state: the next global sample index) equal
        to ``samples_seen``: the trainer addresses batches by index, so a saved loader state then
        names the same position as the trainer state."""
        if hasattr(self.loader, "position"):
            self.loader.position = self.samples_seen

    def _log_step(self, r: StepResult, rate: float, mfu: float) -> None:
        counters = self.guard.summary()
        rec = {
            "tokens": self.tokens_seen,
            "loss": r["loss"],
            "loss_by_domain": r["loss_by_domain"],
            "lr": r["lr"],
            "grad_norm": r["grad_norm"],
            "batch_size": r["batch_size"],
            "tokens_per_s": rate,
            "tflops": rate * self.flops_per_token / 1e12,
            "mfu": mfu,
            "memory_gb": memory_gb(self.device),
            "skipped": counters["skipped"],
            "rolled_back": counters["rolled_back"],
        }
        for k in ("z_loss", "aux_loss"):
            if k in r:
                rec[k] = r[k]
        if self.scaler is not None:
            rec["loss_scale"] = float(self.scaler.get_scale())
            rec["fp16_overflows"] = self.fp16_overflows
        if r["action"] != "ok":
            rec["action"] = r["action"]
        self.metrics.write("train", self.step, rec)
        if self._plain_lines and self.rank == 0:
            left = (self.cfg.max_steps - self.step) * r["tokens"] / rate if rate > 0 else None
            log.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3f  %s tok/s  MFU %.1f%%  ETA %s", self.step,
                     self.cfg.max_steps, r["loss"], r["lr"], r["grad_norm"], f"{rate:,.0f}", 100 * mfu,
                     _duration(left))

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Callable[[int, float | None, float], None]]:
        # A live bar only where a person watches a terminal; under torchrun, SLURM, `| tee` or a
        # file it would show its last frame only, so `_log_step` prints one line per log_every.
        self._plain_lines = not (self.progress and self.rank == 0 and _is_terminal())
        if self._plain_lines:
            yield lambda step, loss, rate: None
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()) as progress:
            task = progress.add_task("train", total=self.cfg.max_steps, completed=self.step, loss="-", rate="-")

            def update(step: int, loss: float | None, rate: float) -> None:
                fields = {"rate": f"{rate:,.0f}"} if rate else {}
                if loss is not None:
                    fields["loss"] = f"{loss:.4f}"
                progress.update(task, completed=step, **fields)

            yield update

    def _summary(self, *, complete: bool, interrupted: bool, wall: float, tokens_per_s: float,
                 mfu: float, stopped: str | None = None) -> dict[str, Any]:
        val = {k: v for k, v in (self.last_val or {}).items() if not k.startswith("_")}
        latest = ckpt.find_latest(self.ckpt_dir) if self.rank == 0 else None
        return {
            "version": MANIFEST_VERSION,
            "complete": complete,
            "interrupted": interrupted,
            "stopped": stopped,
            "steps": self.step,
            "max_steps": self.cfg.max_steps,
            "tokens": self.tokens_seen,
            "samples": self.samples_seen,
            "samples_skipped": self.samples_skipped,
            "final_loss": self.last_loss,
            **val,
            "stability": self.guard.summary(),
            "fp16_overflows": self.fp16_overflows,
            "params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "precision": self.cfg.precision,
            "device": str(self.device),
            "resumed_from": self.resumed_from,
            "init_from": self.init_from,
            "in_training_eval": self.last_eval,
            "checkpoint": str(latest.relative_to(self.run_dir)) if latest is not None else None,
            "timings": {**{k: round(v, 3) for k, v in self.timings.items()}, "wall_s": round(wall, 3)},
            "config_hash": self.config_hash,
            "model": recipe_to_dict(self.model_cfg),
        }


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy in fp32, 0 where the target is ignored. (b, T)"""
    b, T, V = logits.shape
    return F.cross_entropy(logits.float().reshape(b * T, V), targets.reshape(b * T),
                           ignore_index=IGNORE_INDEX, reduction="none").view(b, T)


@functools.lru_cache(maxsize=1)
def _compiled_token_losses() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(token_losses, dynamic=False)


class _PipelineLoss:
    """The loss function of the last pipeline stage (called once per pipeline micro-batch).

    Returns ``scale * (sum of token losses + z_loss * z)`` for backward, and records per-row
    sums and target counts: the schedules call it in micro-batch order, so the last
    ``n_microbatches`` records line up with the micro-batch's rows (checked in `end`). On its
    first step a schedule also calls it once to infer gradient shapes; that call comes first and
    is dropped."""

    def __init__(self, z_loss: float) -> None:
        self.z_loss = z_loss
        self.scale = 1.0
        self.rows: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.z: list[torch.Tensor] = []

    def begin(self, scale: float) -> None:
        self.scale = scale
        self.rows, self.counts, self.z = [], [], []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tok = token_losses(logits, targets)  # (b, T)
        mask = targets != IGNORE_INDEX
        objective = tok.sum()
        z = torch.zeros((), dtype=torch.float64, device=tok.device)
        if self.z_loss > 0:
            lse = torch.logsumexp(logits.float(), dim=-1)  # (b, T)
            zl = (lse.square() * mask).sum()
            objective = objective + self.z_loss * zl
            z = zl.detach().double()
        if not logits.is_meta:
            self.rows.append(tok.detach().sum(1).double())
            self.counts.append(mask.sum(1).double())
            self.z.append(z)
        return objective * self.scale

    def end(self, rows: int, n_microbatches: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.rows:  # not the last stage
            zeros = torch.zeros(rows, dtype=torch.float64, device=device)
            return zeros, zeros.clone(), torch.zeros((), dtype=torch.float64, device=device)
        self.rows, self.counts, self.z = (x[-n_microbatches:] for x in (self.rows, self.counts, self.z))
        row_loss, row_count = torch.cat(self.rows), torch.cat(self.counts)
        if row_loss.numel() != rows:
            raise RuntimeError(f"pipeline loss saw {row_loss.numel()} rows, the micro-batch has {rows}")
        return row_loss, row_count, torch.stack(self.z).sum()


def _is_terminal() -> bool:
    """Whether log output (stderr) is a terminal a person watches."""
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@locked("smelt train", lambda a: a["run_dir"])
def train(recipe: Recipe, run_dir: Path, resume: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the summary written to train/manifest.json.

    ``resume``: None resumes when a complete checkpoint exists (and stops with a RecipeError
    naming the keys when the recipe changed one that shaped the steps already taken), True
    requires one, False starts over (moving ``run_dir/train`` aside to ``train.prev-N``). A run whose manifest is complete for the same
    configuration, with its final checkpoint in place, is not touched (DESIGN.md principle 1).

    Under torchrun (WORLD_SIZE > 1) the process group is created here (gloo on CPU, NCCL on
    GPU) and destroyed on return; every rank calls this function.
    """
    run_dir = Path(run_dir)
    with par.distributed():
        manifest = run_dir / "train" / "manifest.json"
        if resume is not False and manifest.is_file() and recipe.loader is not None:
            done = read_json(manifest)
            tokens = run_dir / "tokens" / "manifest.json"
            model_cfg = resolve_model_config(recipe, read_json(tokens) if tokens.is_file() else {})
            latest = ckpt.find_latest(run_dir / "train" / "checkpoints")
            if (done.get("complete") and done.get("config_hash") == run_config_hash(recipe, model_cfg)
                    and latest is not None and latest.name == ckpt.step_dir_name(int(done.get("steps", -1)))):
                log.info("train: %s is complete (step %d, same configuration); nothing to do", run_dir,
                         done["steps"])
                return done
        return Trainer(recipe, run_dir, resume=resume, progress=progress).run()
