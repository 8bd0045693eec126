"""Setting up a training run: parallel layout, data loader, model, its transforms, the optimizer.

The trainer calls these in a fixed order (`smelt.train.trainer.Trainer.__init__`): layout
(validated against the world size and the model before any work), seed, loader, model (same
seed on every rank, so every rank starts from the same weights), then `smelt.train.parallel.
parallelize` with `apply_activation_checkpointing` and `apply_compile` (torchtitan's order,
STYLE.md 2), then the optimizer over the parallelized parameters.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smelt.config import LoaderConfig, TrainConfig
from smelt.config.model import ModelConfig
from smelt.fsutil import read_json
from smelt.train import parallel as par
from smelt.train.optim import batch_size_at, build_optimizer, param_groups

log = logging.getLogger(__name__)

__all__ = ["apply_activation_checkpointing", "apply_compile", "seed_everything", "read_tokens_manifest",
           "parallel_layout", "build_loader", "build_model", "build_train_optimizer"]


# --------------------------------------------------------------------------------------------
# model transforms (single process; parallel.parallelize calls them in torchtitan's order)


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
# setup


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def read_tokens_manifest(tokens_dir: Path) -> dict[str, Any]:
    """``tokens/manifest.json`` ({} when the run has none yet)."""
    path = tokens_dir / "manifest.json"
    if not path.is_file():
        return {}
    return read_json(path)


def parallel_layout(cfg: TrainConfig, loader_cfg: LoaderConfig, model_cfg: ModelConfig,
                    world: int) -> tuple[par.ParallelDims, int]:
    """(validated layout, micro-batch rows per data-parallel rank) for ``world`` processes.

    The micro-batch shrinks to global_batch / dp when it would not fit (logged); the layout is
    built twice because the pipeline's checks need the final micro-batch."""
    uses_masks = loader_cfg.document_mask or loader_cfg.objective.kind in ("prefix_lm", "ul2")
    dims_args = dict(model_cfg=model_cfg, seq_len=loader_cfg.seq_len, precision=cfg.precision, uses_masks=uses_masks)
    dims = par.ParallelDims.build(cfg.parallel, world, **dims_args)
    micro_batch = min(cfg.batch.micro_batch, max(1, cfg.batch.global_batch // dims.dp))
    if micro_batch != cfg.batch.micro_batch:
        log.info("train.batch.micro_batch %d > global_batch / dp: using %d", cfg.batch.micro_batch, micro_batch)
    batch_size_at(0, cfg.batch, micro_batch, dims.dp)  # validates global vs micro batch now
    return par.ParallelDims.build(cfg.parallel, world, micro_batch=micro_batch, **dims_args), micro_batch


def build_loader(tokens_dir: Path, loader_cfg: LoaderConfig, seed: int) -> Any:
    """The training split's `MixtureLoader` (``loader.seed``, else the recipe's ``seed``)."""
    if not (tokens_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{tokens_dir}/manifest.json not found: run `smelt pack` first")
    from smelt.tokens.loader import MixtureLoader

    return MixtureLoader(tokens_dir, loader_cfg, loader_cfg.seed if loader_cfg.seed is not None else seed,
                         split="train")


def build_model(model_cfg: ModelConfig, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialized `Transformer` (seeded: identical on every rank)."""
    from smelt.model.llama import Transformer

    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(model_cfg)
    torch.manual_seed(seed)
    model.init_weights()
    log.info("model: %s parameters (%s)", f"{sum(p.numel() for p in model.parameters()):,}",
             model_cfg.preset or "custom")
    return model


def build_train_optimizer(core: nn.Module, cfg: TrainConfig, dims: par.ParallelDims, mesh: Any) -> Any:
    """The optimizer over the parallelized model's parameters: ZeRO-1 over the data-parallel group
    (``zero: 1`` with dp > 1), else `build_optimizer` (per-parameter steps under TP without
    sequence parallel)."""
    if dims.zero == 1 and dims.dp > 1:
        return par.build_zero1_optimizer(param_groups(core, cfg.optim), cfg.optim, par.dp_group(mesh, dims))
    optimizer = build_optimizer(core, cfg.optim)
    if dims.tp > 1 and not cfg.parallel.sequence_parallel:
        # Norm weights stay plain tensors without sequence parallel, the rest are DTensors:
        # foreach/fused kernels refuse the mix, so step parameter by parameter.
        for g in optimizer.param_groups:
            g["foreach"] = False
            g["fused"] = False
    return optimizer
