"""The training loop (`smelt train`): one process; multi-process parallelism is applied outside.

`train(recipe, run_dir)` reads ``run_dir/tokens/`` through `MixtureLoader`, builds the model from
``recipe.model`` (vocabulary from ``tokens/manifest.json`` when not given), and writes
``run_dir/train/``::

    checkpoints/     DCP checkpoints + trainer_state.json (smelt.train.checkpoint)
    metrics.jsonl    one JSON object per logged step (smelt.train.metrics)
    tensorboard/     TensorBoard events
    manifest.json    complete, steps, tokens, final loss, validation, timings, config hash

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
newest that verifies); ``resume=False`` starts over, ``resume=True`` requires a checkpoint. The
first Ctrl-C finishes the current step, saves and returns (manifest ``complete: false``,
``stopped: "interrupted"``); a second one aborts. Running out of data (`DataExhausted`) saves,
writes the manifest with the reason and re-raises. A crash leaves the last periodic checkpoint.

`apply_activation_checkpointing` and `apply_compile` are the two model transforms of a single
process; issue 6's `parallel.py` applies them between tensor parallel and FSDP (STYLE.md 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
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

from smelt.config import LoaderConfig, Recipe, RecipeError, TrainConfig, config_hash, recipe_to_dict
from smelt.fsutil import atomic_write_json, read_json
from smelt.model.flops import flops_per_token
from smelt.tokens.loader import DataExhausted
from smelt.train import checkpoint as ckpt
from smelt.train.metrics import MetricsWriter, Throughput, memory_gb, peak_flops
from smelt.train.optim import batch_size_at, build_optimizer, grad_accum_steps, lr_at, set_lr
from smelt.train.stability import StabilityGuard

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
IGNORE_INDEX = -100

__all__ = ["train", "Trainer", "apply_activation_checkpointing", "apply_compile", "StepResult",
           "resolve_model_config", "run_config_hash"]


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
        if (i + 1) % k == 0:
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


def resolve_model_config(recipe: Recipe, tokens_manifest: dict[str, Any]) -> Any:
    """``recipe.model`` (default: ModelConfig()) with the vocabulary of ``tokens/manifest.json``
    filled in, checked against the tokenizer and the loader's sequence length."""
    from smelt.model.config import ModelConfig

    mcfg = getattr(recipe, "model", None)
    if mcfg is None:
        mcfg = ModelConfig()
    elif isinstance(mcfg, dict):
        mcfg = ModelConfig.model_validate(mcfg)
    vocab = tokens_manifest.get("vocab_size")
    if mcfg.vocab_size is None:
        if vocab is None:
            raise RecipeError("invalid recipe:\n  model.vocab_size: not set, and tokens/manifest.json has no "
                              "vocab_size to take it from")
        mcfg = mcfg.with_vocab(int(vocab))
    elif vocab is not None and mcfg.vocab_size < int(vocab):
        raise RecipeError(f"invalid recipe:\n  model.vocab_size: {mcfg.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({vocab})")
    seq_len = recipe.loader.seq_len if recipe.loader is not None else 0
    if seq_len > mcfg.max_seq_len:
        raise RecipeError(f"invalid recipe:\n  loader.seq_len: {seq_len} exceeds model.max_seq_len "
                          f"({mcfg.max_seq_len})")
    return mcfg


def run_config_hash(recipe: Recipe, model_cfg: Any) -> str:
    """Hash of everything that shapes the training computation: seed, train, loader, model."""
    return config_hash({
        "seed": recipe.seed,
        "train": recipe_to_dict(recipe.train or TrainConfig()),
        "loader": recipe_to_dict(recipe.loader) if recipe.loader is not None else None,
        "model": recipe_to_dict(model_cfg),
    })


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
        self.rank, self.world = 0, 1  # issue 6 sets these from the process group
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        cfg = self.cfg

        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise RecipeError("invalid recipe:\n  train.precision: fp16 needs a CUDA device (loss scaling is a GPU "
                              "feature); use bf16 or fp32 on CPU")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.seq_len = self.loader_cfg.seq_len
        self.micro_batch = min(cfg.batch.micro_batch, max(1, cfg.batch.global_batch // self.world))
        if self.micro_batch != cfg.batch.micro_batch:
            log.info("train.batch.micro_batch %d > global_batch / world: using %d", cfg.batch.micro_batch,
                     self.micro_batch)
        batch_size_at(0, cfg.batch, self.micro_batch, self.world)  # validates global vs micro batch now
        self.tokens_manifest = self._read_tokens_manifest()
        self.model_cfg = resolve_model_config(recipe, self.tokens_manifest)  # recipe errors before any work

        seed_everything(recipe.seed)
        self.loader = loader if loader is not None else self._build_loader()
        self.domains: list[str] = list(getattr(self.loader, "domains", []))
        self.model = model if model is not None else self._build_model()
        self.model.to(self.device)
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.ac_blocks = apply_activation_checkpointing(self.model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
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
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "startup_s": 0.0}
        self._saved_step: int | None = None
        self._stop = _StopFlag()
        self.config_hash = self._config_hash()
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
        """Pick fresh start or resume; load the checkpoint; open the metrics writer."""
        t0 = time.perf_counter()
        latest = ckpt.find_latest(self.ckpt_dir)
        if resume is True and latest is None:
            raise FileNotFoundError(f"resume requested but {self.ckpt_dir} holds no complete checkpoint")
        if resume is False and self.train_dir.exists():
            log.warning("fresh start requested: removing %s", self.train_dir)
            shutil.rmtree(self.train_dir)
            latest = None
        self.train_dir.mkdir(parents=True, exist_ok=True)
        if latest is not None:
            state = self._load(latest)
            self.resumed_from = latest.name
            if state.get("config_hash") != self.config_hash:
                log.warning("resuming %s with a different configuration (hash %s, checkpoint %s)", latest.name,
                            self.config_hash, state.get("config_hash"))
            log.info("resuming from %s: step %d, %s tokens", latest, self.step, f"{self.tokens_seen:,}")
        self.metrics = MetricsWriter(self.train_dir, tensorboard=self.cfg.tensorboard, enabled=self.rank == 0,
                                     resume_step=self.step if latest is not None else None)
        self.timings["startup_s"] += time.perf_counter() - t0

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
            "config_hash": self.config_hash,
            "world": self.world,
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

    def save(self) -> Path:
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                                    keep=self.cfg.checkpoint.keep)
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
            return self.model(mb["input_ids"], **kwargs)  # (b, T, V)

    def _token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position cross entropy in fp32, 0 where the target is ignored. (b, T)"""
        b, T, V = logits.shape
        return F.cross_entropy(logits.float().reshape(b * T, V), targets.reshape(b * T),
                               ignore_index=IGNORE_INDEX, reduction="none").view(b, T)

    def train_step(self, batch: dict[str, np.ndarray]) -> StepResult:
        """Forward and backward over the batch's micro-batches (this rank's rows of the global
        batch). Returns the mean loss over target tokens, per domain, and token counts; leaves
        the accumulated gradient in ``.grad`` and does not step the optimizer (benchmarks time
        this call)."""
        cfg = self.cfg
        rows = batch["input_ids"].shape[0]
        use = self._forward_kwargs(batch)
        n_micro = grad_accum_steps(rows * self.world, self.micro_batch, self.world)
        n_targets = int((batch["targets"] != IGNORE_INDEX).sum())
        # Issue 6: all-reduce n_targets over data-parallel ranks here (token-weighted global mean).
        denom = max(n_targets, 1)
        n_domains = max(len(self.domains), int(batch["domain"].max()) + 1 if rows else 1)
        dom_loss = torch.zeros(n_domains, dtype=torch.float64, device=self.device)
        dom_count = torch.zeros(n_domains, dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        z_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(n_micro):
            sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            mb = self._to_device({k: v[sl] for k, v in batch.items()})
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
            objective = objective / denom
            aux = getattr(self.model, "aux_loss", None)
            if isinstance(aux, torch.Tensor) and aux.requires_grad and cfg.moe_aux_weight > 0:
                share = float(mask.sum()) / denom  # token share of this micro-batch
                objective = objective + cfg.moe_aux_weight * share * aux
                aux_sum += aux.detach() * share
            if self.scaler is not None:
                self.scaler.scale(objective).backward()
            else:
                objective.backward()
            loss_sum += micro_sum.detach()
            dom = mb["domain"]
            dom_loss.index_add_(0, dom, tok.detach().sum(1).double())
            dom_count.index_add_(0, dom, mask.sum(1).double())
        loss = float(loss_sum) / denom
        by_domain = {}
        for d, (dl, dc) in enumerate(zip(dom_loss.tolist(), dom_count.tolist())):  # one device sync
            if dc > 0:
                by_domain[self.domains[d] if d < len(self.domains) else str(d)] = dl / dc
        res = StepResult(loss=loss, loss_by_domain=by_domain, target_tokens=n_targets,
                         tokens=rows * batch["input_ids"].shape[1] * self.world)
        if cfg.z_loss > 0:
            res["z_loss"] = float(z_sum) / denom
        if float(aux_sum) != 0.0:
            res["aux_loss"] = float(aux_sum)
        return res

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        # Issue 6: DTensor grads make this a DTensor; .full_tensor() gives the global norm.
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Token-weighted validation loss per domain (``loader.val_batches``) and overall."""
        t0 = time.perf_counter()
        self.model.eval()
        by_domain: dict[str, float] = {}
        tot_loss, tot_tok = 0.0, 0
        try:
            for d in self.domains:
                d_loss, d_tok = 0.0, 0
                for batch in self.loader.val_batches(d, self.micro_batch, self.cfg.eval_batches):
                    mb = self._to_device(batch)
                    logits = self._logits(mb, self._forward_kwargs(batch))
                    d_loss += float(self._token_losses(logits, mb["targets"]).sum(dtype=torch.float64))
                    d_tok += int((mb["targets"] != IGNORE_INDEX).sum())
                if d_tok:
                    by_domain[d] = d_loss / d_tok
                    tot_loss += d_loss
                    tot_tok += d_tok
        finally:
            self.model.train()
        out = {"val_loss": tot_loss / tot_tok if tot_tok else float("nan"), "val_loss_by_domain": by_domain,
               "val_tokens": tot_tok}
        self.timings["eval_s"] += time.perf_counter() - t0
        self.last_val = out
        self.metrics.write("val", self.step, out)
        log.info("step %d: val loss %.4f %s", self.step, out["val_loss"],
                 " ".join(f"{k}={v:.4f}" for k, v in by_domain.items()))
        return out

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary also written to train/manifest.json."""
        cfg = self.cfg
        t_start = time.perf_counter()
        peak = peak_flops(cfg.precision, self.device, cfg.peak_tflops)
        log.info("training %d steps from step %d on %s (%s); MFU peak %.1f TFLOP/s", cfg.max_steps, self.step,
                 self.device, cfg.precision, peak / 1e12)
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
                        last_mfu = rate * self.flops_per_token / peak if peak > 0 else 0.0
                        self._log_step(result, rate, last_mfu)
                    bar(self.step, result["loss"], last_rate)
                    if self.on_step is not None:
                        self.on_step(self, result)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                        self.evaluate()
                    if self.step % cfg.checkpoint.every == 0 and self.step < cfg.max_steps:
                        self.save()
            self.timings["train_s"] += throughput.read()[1]
            if self.step >= cfg.max_steps:
                self.evaluate()
            if self._saved_step != self.step:
                self.save()
        except DataExhausted as e:
            # Not a crash: keep the progress, say why in the manifest, and fail loudly.
            log.error("step %d: %s; raise loader.max_epochs, add data, or lower train.max_steps", self.step, e)
            if self._saved_step != self.step:
                self.save()
            summary = self._summary(complete=False, interrupted=False, wall=time.perf_counter() - t_start,
                                    tokens_per_s=last_rate, mfu=last_mfu, stopped=f"data exhausted: {e}")
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
        batch_size = batch_size_at(self.tokens_seen, cfg.batch, self.micro_batch, self.world)
        lr = lr_at(self.step, cfg.schedule, cfg.max_steps, cfg.optim.lr) * self.guard.lr_scale(self.step)
        set_lr(self.optimizer, lr)
        batch = self.loader.batch(self.samples_seen, batch_size, self.rank, self.world)
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
                    torch.nn.utils.clip_grads_with_norm_(
                        [p for p in self.model.parameters() if p.grad is not None], cfg.grad_clip, norm_t, foreach=True)
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

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Callable[[int, float | None, float], None]]:
        if not self.progress or self.rank != 0:
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
            "checkpoint": str(latest.relative_to(self.run_dir)) if latest is not None else None,
            "timings": {**{k: round(v, 3) for k, v in self.timings.items()}, "wall_s": round(wall, 3)},
            "config_hash": self.config_hash,
            "model": recipe_to_dict(self.model_cfg),
        }


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


def train(recipe: Recipe, run_dir: Path, resume: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the summary written to train/manifest.json.

    ``resume``: None resumes when a complete checkpoint exists, True requires one, False starts
    over (removing ``run_dir/train``). A run whose manifest is complete for the same
    configuration, with its final checkpoint in place, is not touched (DESIGN.md principle 1).
    """
    run_dir = Path(run_dir)
    manifest = run_dir / "train" / "manifest.json"
    if resume is not False and manifest.is_file() and recipe.loader is not None:
        done = read_json(manifest)
        tokens = run_dir / "tokens" / "manifest.json"
        model_cfg = resolve_model_config(recipe, read_json(tokens) if tokens.is_file() else {})
        latest = ckpt.find_latest(run_dir / "train" / "checkpoints")
        if (done.get("complete") and done.get("config_hash") == run_config_hash(recipe, model_cfg)
                and latest is not None and latest.name == ckpt.step_dir_name(int(done.get("steps", -1)))):
            log.info("train: %s is complete (step %d, same configuration); nothing to do", run_dir, done["steps"])
            return done
    return Trainer(recipe, run_dir, resume=resume, progress=progress).run()
