"""The training loop (`smelt train`): setup, then a loop you can see whole.

`train(recipe, run_dir)` reads ``run_dir/tokens/`` through `MixtureLoader`, builds the model from
``recipe.model`` (vocabulary from ``tokens/manifest.json`` when not given), and writes
``run_dir/train/``::

    checkpoints/     DCP checkpoints + trainer_state.json (smelt.train.checkpoint, smelt.train.resume)
    metrics.jsonl    one JSON object per logged step, validation, evaluation or stability
                     event (smelt.train.metrics; ``kind: eval`` lines hold the evaluator's
                     scalars without their ``eval/`` prefix: ``ppl/<domain>``, ``bpb/<domain>``,
                     ``probe/<name>``, ``probes_passed``, ...)
    tensorboard/     TensorBoard events
    manifest.json    complete, steps, tokens, final loss, validation, the last in-training
                     evaluation (in_training_eval), init_from, timings, config hash

This module is the loop; beside it: `smelt.train.build` (layout, loader, model, transforms,
optimizer), `smelt.train.resume` (checkpoint state, the resume policy, init_from, rollback),
`smelt.train.loss` (per-token loss, pipeline loss), `smelt.train.progress` (bar, Ctrl-C).

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
to N give bit-identical losses on CPU. Which checkpoint a changed recipe may continue, and how
(`RESUMABLE_TRAIN_KEYS`), is `smelt.train.resume`'s.

Precision: fp32; bf16 autocast with fp32 master weights (CPU and CUDA); fp16 autocast with dynamic
loss scaling (`torch.amp.GradScaler`, CUDA only: CPU has no fast fp16 matmul and no scaler need).
The loss is always computed in fp32 from the logits.

Run control: the first Ctrl-C finishes the current step, saves and returns (manifest ``complete:
false``, ``stopped: "interrupted"``); a second one aborts. Running out of data (`DataExhausted`)
saves, writes the manifest with the reason and re-raises. A crash leaves the last periodic
checkpoint.

Evaluation during training: the validation loss per domain every ``train.eval_every`` steps
(`Trainer.evaluate`, ``kind: val`` lines), and, when the trainer is given an ``evaluator`` (an
`Evaluator`: ``smelt train`` and ``smelt run`` pass `smelt.eval.runner.InTrainingEvaluator`, held-out
perplexity, bits per byte and probes on a small budget), that evaluation every ``evaluator.every``
steps and at the end (`Trainer.evaluate_in_training`, ``kind: eval`` lines, TensorBoard
``eval/...``). Neither changes the training computation (no RNG draws survive them), so exact
resume holds with both on. The training layer never imports `smelt.eval`: it is handed the hook.

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
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from smelt.config import LoaderConfig, Recipe, RecipeError, TrainConfig, recipe_to_dict, resolve_model_config
from smelt.fsutil import atomic_write_json, locked, read_json
from smelt.model.flops import flops_per_token
from smelt.tokens.loader import DataExhausted
from smelt.train import checkpoint as ckpt
from smelt.train import parallel as par
from smelt.train import resume as state
from smelt.train.build import (
    apply_activation_checkpointing,
    apply_compile,
    build_loader,
    build_model,
    build_train_optimizer,
    parallel_layout,
    read_tokens_manifest,
    seed_everything,
)
from smelt.train.loss import IGNORE_INDEX, PipelineLoss, compiled_token_losses, token_losses
from smelt.train.metrics import MetricsWriter, MfuMeter, Throughput, memory_gb
from smelt.train.optim import batch_size_at, grad_accum_steps, lr_at, set_lr, wsd_decay_start
from smelt.train.progress import StopFlag, duration, is_terminal, progress_bar
from smelt.train.resume import RESUMABLE_TRAIN_KEYS, check_init_compatible, run_config_hash
from smelt.train.stability import StabilityGuard

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1

# The names the trainer has always offered (tests and benchmarks import them from here).
__all__ = ["train", "Trainer", "Evaluator", "StepResult", "RESUMABLE_TRAIN_KEYS", "apply_activation_checkpointing",
           "apply_compile", "check_init_compatible", "resolve_model_config", "run_config_hash", "token_losses"]


class Evaluator(Protocol):
    """In-training evaluation, handed to the trainer (`smelt.eval.runner.InTrainingEvaluator`).

    ``every``: steps between evaluations (0: none). ``prepare()`` runs on rank 0 before the first
    step (a bad input is an error then, not at step N). ``evaluator(model)`` scores the unwrapped
    model (in eval mode, under no_grad; the trainer restores the RNG and the mode afterwards) and
    returns flat ``{"eval/...": value}`` scalars, or None when it cannot run in this run (it says
    why), which turns in-training evaluation off for the rest of the run."""

    every: int

    def prepare(self) -> None: ...

    def __call__(self, model: nn.Module) -> dict[str, float] | None: ...


class StepResult(dict):
    """What one optimizer step measured (a dict: JSON-ready)."""


# --------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Owns the model, optimizer, loader, guard and writers of one training run.

    ``model`` and ``loader`` may be injected (tests, benchmarks, issue 6's parallelized model);
    by default they are built from the recipe. ``evaluator``: in-training evaluation (`Evaluator`;
    None: none). ``on_step(trainer, result)`` runs after every optimizer step (tests use it to
    simulate a crash).
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, resume: bool | None = None, progress: bool = True,
                 model: nn.Module | None = None, loader: Any = None, device: str | torch.device | None = None,
                 on_step: Callable[[Trainer, StepResult], None] | None = None,
                 evaluator: Evaluator | None = None) -> None:
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
        self.evaluator = evaluator
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
        self.tokens_manifest = read_tokens_manifest(self.tokens_dir)
        self.model_cfg = resolve_model_config(recipe, self.tokens_manifest)  # recipe errors before any work
        # Parallel layout, validated against the world size and the model before any work.
        self.dims, self.micro_batch = parallel_layout(cfg, self.loader_cfg, self.model_cfg, self.world)
        # Data-parallel coordinates: the loader slices global batches by these (tp/pp peers of one
        # dp rank read the same rows).
        coords = self.dims.coords(self.rank)
        self.dp_rank, self.dp_world, self.pp_rank = coords["dp"], self.dims.dp, coords["pp"]
        if self.world > 1:
            log.info("parallel: %s", self.dims.describe())

        seed_everything(recipe.seed)
        self.loader = loader if loader is not None else build_loader(self.tokens_dir, self.loader_cfg, recipe.seed)
        self.domains: list[str] = list(getattr(self.loader, "domains", []))
        # identical on every rank (same seed)
        model = model if model is not None else build_model(self.model_cfg, recipe.seed, self.device)
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
                                  pp_loss=PipelineLoss(cfg.z_loss) if self.dims.pp > 1 else None)
        self.model = self.pm.params_module  # parameters + state_dict under the whole model's names
        self.core = self.pm.core  # the unwrapped Transformer (aux_loss, output/embedding lookup)
        self._pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        self.optimizer = build_train_optimizer(self.core, cfg, self.dims, self.mesh)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.guard = StabilityGuard(cfg.stability)
        # Model FLOPs per token (6N + attention, PaLM Appendix B); recomputation is not counted.
        self.flops_per_token = flops_per_token(self.model_cfg, self.seq_len)

        # Run state (everything that a checkpoint must carry, besides tensors and RNG:
        # smelt.train.resume.trainer_state).
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
        self.eval_every = self._in_training_eval_every()
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "startup_s": 0.0}
        self.saved_step: int | None = None  # the step of the newest checkpoint this process saved or loaded
        self._plain_lines = False
        self._stop = StopFlag()
        self.config_hash = run_config_hash(recipe, self.model_cfg)
        self.computation = state.computation_config(recipe, self.model_cfg, self.tokens_manifest.get("key"))
        self.moved_aside: Path | None = None
        self.decay_start = (wsd_decay_start(cfg.schedule, cfg.max_steps) if cfg.schedule.kind == "wsd" else None)

        # Fresh start, resume or init_from (smelt.train.resume), then the metrics writer.
        t0 = time.perf_counter()
        latest, schedule_note = state.prepare_run_dir(self, resume)
        self.metrics = MetricsWriter(self.train_dir, tensorboard=self.cfg.tensorboard, enabled=self.rank == 0,
                                     resume_step=self.step if latest is not None else None)
        if schedule_note is not None:
            self.metrics.write("event", self.step, {"event": "schedule_change", **schedule_note})
        self.timings["startup_s"] += time.perf_counter() - t0

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
            # A live bar only where a person watches a terminal; under torchrun, SLURM, `| tee` or
            # a file it would show its last frame only, so `_log_step` prints one line per log_every.
            self._plain_lines = not (self.progress and self.rank == 0 and is_terminal())
            with self._stop.installed(), progress_bar(cfg.max_steps, self.step, live=not self._plain_lines) as bar:
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
                    if (self.step % cfg.checkpoint.every == 0 or self.step == self.decay_start) \
                            and self.step < cfg.max_steps:
                        self.save()
            self.timings["train_s"] += throughput.read()[1]
            if self.step >= cfg.max_steps:
                self.evaluate()
                self.evaluate_in_training()
            if self.saved_step != self.step:
                self.save()
        except DataExhausted as e:
            # Not a crash: keep the progress, say why in the manifest, and fail loudly.
            log.error("step %d: %s; raise loader.max_epochs, add data, or lower train.max_steps", self.step, e)
            if self.saved_step != self.step:
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
            decision = self.guard.check(self.step + 1, loss, grad_norm, can_rollback=self.saved_step is not None)
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
            state.rollback(self, batch_size)
            return result
        self.step += 1
        self.tokens_seen += result["tokens"]
        self.samples_seen += batch_size
        state.sync_loader(self)
        if math.isfinite(loss):
            self.last_loss = loss
        return result


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
            return compiled_token_losses()(logits, targets)
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
        """The evaluator's ``every`` when in-training evaluation can run here, else 0 (logged once).

        The evaluator runs plain forwards of the whole model in one process (rank 0): with FSDP
        shards, tensor-parallel DTensors or pipeline stages no rank holds the whole model, and a
        forward would be a collective the other ranks are not taking part in. Replicated layouts
        (one process, DDP, ZeRO-1) evaluate rank 0's unwrapped copy while the other ranks wait at
        the next step's collective."""
        every = self.evaluator.every if self.evaluator is not None else 0
        if not every:
            asked = self.recipe.eval.every_steps if self.recipe.eval is not None else 0
            if asked and self.rank == 0:
                log.warning("eval.every_steps=%d: this trainer was given no evaluator, so there is no in-training "
                            "evaluation (`smelt train` and `smelt run` give it one)", asked)
            return 0
        if self.dims.fsdp or self.dims.tp > 1 or self.dims.pp > 1:
            if self.rank == 0:
                log.warning("eval.every_steps=%d: in-training evaluation is skipped for this layout (%s): it runs a "
                            "plain forward of the whole model on one process, and no rank holds the whole model "
                            "under FSDP/TP/PP; run `smelt eval` on the checkpoints instead", every,
                            self.dims.describe())
            return 0
        if self.rank == 0:
            self.evaluator.prepare()  # a bad probe file is an error now, not at step N
        return every

    @torch.no_grad()
    def evaluate_in_training(self) -> dict[str, float] | None:
        """The evaluator on rank 0's unwrapped model; scalars to metrics.jsonl (``kind: eval``) and
        TensorBoard (``eval/...``). Other ranks return None at once.

        Exact resume: the global RNG states are captured before and restored after, and the
        model's train/eval mode is restored, so a run with evaluation takes the same steps, bit
        for bit, as one without. A failure is logged and disables further in-training
        evaluation; the training run goes on (``smelt eval`` can redo it from the checkpoints)."""
        if self.rank != 0 or not self.eval_every or self.evaluator is None:
            return None
        t0 = time.perf_counter()
        rng = ckpt.capture_rng_state()
        was_training = self.core.training
        self.core.eval()
        try:
            scalars = self.evaluator(self.core)
        except Exception:  # noqa: BLE001 - evaluation is auxiliary: never lose the training run to it
            log.exception("step %d: in-training evaluation failed; disabled for the rest of this run", self.step)
            self.eval_every = 0
            return None
        finally:
            self.core.train(was_training)
            ckpt.restore_rng_state(rng)
        if scalars is None:  # the evaluator cannot run in this run (it said why)
            self.eval_every = 0
            return None
        self.last_eval = scalars
        self.metrics.write("eval", self.step, {k.removeprefix("eval/"): v for k, v in scalars.items()})
        self.timings["eval_s"] += time.perf_counter() - t0
        ppl = {k.removeprefix("eval/ppl/"): v for k, v in scalars.items() if k.startswith("eval/ppl/")}
        log.info("step %d: eval %s%s (%.1f s)", self.step, " ".join(f"ppl/{d}={v:.3f}" for d, v in ppl.items()),
                 f" probes passed {scalars['eval/probes_passed']:.0%}" if "eval/probes_passed" in scalars else "",
                 time.perf_counter() - t0)
        return scalars

    # ------------------------------------------------------------------ checkpoints and logs

    def save(self) -> Path:
        """Checkpoint now (every rank; `smelt.train.resume.save`)."""
        return state.save(self)

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
                     duration(left))

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


@locked("smelt train", lambda a: a["run_dir"])
def train(recipe: Recipe, run_dir: Path, resume: bool | None = None, progress: bool = True, *,
          evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the summary written to train/manifest.json.

    ``resume``: None resumes when a complete checkpoint exists (and stops with a RecipeError
    naming the keys when the recipe changed one that shaped the steps already taken), True
    requires one, False starts over (moving ``run_dir/train`` aside to ``train.prev-N``). A run whose
    manifest is complete for the same configuration, with its final checkpoint in place, is not
    touched (DESIGN.md principle 1). ``evaluator``: in-training evaluation (`Evaluator`).

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
        return Trainer(recipe, run_dir, resume=resume, progress=progress, evaluator=evaluator).run()

