"""Multi-process training: process group, DeviceMesh, and the parallel wrappers of the model.

Launch with ``torchrun --nproc_per_node=N -m smelt train RECIPE``: `distributed()` initializes the
process group from torchrun's environment (gloo on CPU, NCCL on CUDA, device ``cuda:LOCAL_RANK``)
and destroys it at exit. The model (`smelt.model.llama.Transformer`) stays plain PyTorch; this
module applies, in torchtitan's order (``torchtitan/models/llama3/infra/parallelize.py``, STYLE.md 2):

1. pipeline split (``pp``): `torch.distributed.pipelining` stages built by deleting the layers a
   stage does not own (kept under their global index, so parameter names, hence checkpoints, are
   those of the whole model) and the embedding / final norm / output where they are not needed;
2. tensor parallel (``tp``): DTensor `parallelize_module` with Megatron's layout (Shoeybi et al.
   2019): wq/wk/wv and w1/w3 column-parallel, wo and w2 row-parallel (one all-reduce, or with
   sequence parallel a reduce-scatter, per sublayer), the embedding row-parallel over the
   vocabulary and the output projection column-parallel over it; optional sequence parallel
   (Korthikanti et al. 2022) shards the norms and the residual stream over the sequence;
3. activation checkpointing, 4. `torch.compile` per block (smelt.train.trainer);
5. data parallel over the ``dp`` mesh dims: ``zero: 0`` DDP, ``zero: 1`` DDP with
   `ZeroRedundancyOptimizer` (Rajbhandari et al. 2020, stage 1: optimizer state sharded), ``zero:
   2`` FSDP2 `fully_shard(reshard_after_forward=False)` (gradients and optimizer state sharded,
   parameters kept gathered between forward and backward), ``zero: 3`` FSDP2 full sharding
   (optional `CPUOffloadPolicy`); ``dp_replicate`` x ``dp_shard`` with zero 2/3 is HSDP (shard
   inside a group, replicate across groups) through a 2-D mesh; bf16 uses `MixedPrecisionPolicy`
   (bf16 compute, fp32 gradient reduction).

Mesh: ``(pp, dp_replicate, dp_shard, tp)``, tp innermost so tensor-parallel peers are neighbours
(same node, fastest links), pp outermost (its point-to-point traffic is the lightest).

Every rank builds the full model from the same seed before sharding, so a parallel run starts
from exactly the weights of a single-process run (the tests compare their losses). For models
too large for one host's memory, build on the meta device and call ``init_weights`` after
sharding (torchtitan); that gives different (equally distributed) initial values.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smelt.config import ParallelConfig, RecipeError

log = logging.getLogger(__name__)

__all__ = ["ParallelDims", "DistEnv", "distributed", "dist_env", "parallelize", "ParallelModel", "StageLayers",
           "split_layers", "grad_norm", "clip_grads", "all_reduce_sum", "CRASH_ENV"]

# Test-only fault injection (see `maybe_crash`): never set it in a real run.
CRASH_ENV = "SMELT_CRASH_AT_STEP"
PP_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


# --------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: global rank and world, local rank, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world > 1


def dist_env(device: str | torch.device | None = None) -> DistEnv:
    """The current process group's view (1 process when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    if device is None:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, local, torch.device(device))


@contextlib.contextmanager
def distributed(timeout_s: float | None = None) -> Iterator[DistEnv]:
    """Initialize the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) when WORLD_SIZE > 1 and none exists yet; destroy it on exit if created here.

    Backend: NCCL when CUDA is available (device ``cuda:LOCAL_RANK``), else gloo. On ranks other
    than 0, smelt's log level is raised to WARNING: only rank 0 reports progress.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    smelt_log = logging.getLogger("smelt")
    old_level = smelt_log.level
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0:
            # After a torchrun restart the workers share the agent's store with the failed round,
            # whose keys are still there: gloo's full-mesh connect can read the dead workers'
            # addresses and fail ("Connection refused") or hang. A per-round prefix hides them.
            store, rank, size = next(dist.rendezvous("env://"))
            kwargs.update(store=dist.PrefixStore(f"smelt/restart-{restart}", store), rank=rank, world_size=size)
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local}"), **kwargs)
        else:
            dist.init_process_group("gloo", **kwargs)
        created = True
    env = dist_env()
    if env.rank != 0:
        smelt_log.setLevel(logging.WARNING)
    try:
        yield env
    finally:
        smelt_log.setLevel(old_level)
        if created and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place SUM over ``group`` (the world by default) when distributed; returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# --------------------------------------------------------------------------------------------
# dimensions and validation


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees (``dp_shard`` = -1 filled in) and what they imply, validated."""

    world: int
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    zero: int
    cfg: ParallelConfig

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many slices the global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        return self.zero >= 2 and self.dp > 1

    @property
    def ddp(self) -> bool:
        return self.zero <= 1 and self.dp > 1

    @property
    def stages_per_rank(self) -> int:
        return self.cfg.pp_stages_per_rank if self.pp > 1 and self.cfg.pp_schedule == "interleaved_1f1b" else 1

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def pp_microbatches(self) -> int:
        return self.cfg.pp_microbatches or self.n_stages

    @classmethod
    def build(cls, cfg: ParallelConfig, world: int, *, model_cfg: Any = None, micro_batch: int | None = None,
              seq_len: int | None = None, precision: str = "fp32", uses_masks: bool = False) -> ParallelDims:
        """Resolve ``dp_shard: -1`` and check every constraint before any work; errors name keys."""
        key = "train.parallel"
        errors: list[str] = []
        fixed = cfg.dp_replicate * cfg.tp * cfg.pp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world % fixed:
                raise RecipeError(f"invalid recipe:\n  {key}: dp_replicate*tp*pp = {cfg.dp_replicate}*{cfg.tp}*"
                                  f"{cfg.pp} = {fixed} does not divide the world size {world} (dp_shard: -1 takes "
                                  "the rest)" + (f"; launch with torchrun --nproc_per_node={fixed}" if world < fixed
                                                 else ""))
            dp_shard = world // fixed
        if dp_shard == 0:
            errors.append(f"{key}.dp_shard: 0 is not allowed (>= 1, or -1 for the rest of the world)")
        total = cfg.dp_replicate * dp_shard * cfg.tp * cfg.pp
        if not errors and total != world:
            launch = f" (launch with torchrun --nproc_per_node={total})" if world == 1 else ""
            errors.append(f"{key}: dp_replicate*dp_shard*tp*pp = {cfg.dp_replicate}*{dp_shard}*{cfg.tp}*{cfg.pp} "
                          f"= {total} != world size {world}{launch}")
        dims = cls(world, cfg.dp_replicate, max(dp_shard, 1), cfg.tp, cfg.pp, cfg.zero, cfg)
        dp = dims.dp
        if cfg.zero <= 1 and dp > 1 and (cfg.tp > 1 or cfg.pp > 1):
            what = "DDP + ZeroRedundancyOptimizer" if cfg.zero == 1 else "DDP"
            errors.append(f"{key}.zero: {cfg.zero} ({what}) does not compose with tp/pp (DDP has no DTensor or "
                          f"pipeline support; torchtitan has the same limit); use zero: 2 or 3 with tp={cfg.tp}, "
                          f"pp={cfg.pp}")
        if cfg.zero == 1 and (cfg.tp > 1 or cfg.pp > 1) and dp == 1:
            errors.append(f"{key}.zero: 1 (ZeroRedundancyOptimizer) needs plain data parallelism, not tp/pp")
        if cfg.cpu_offload and cfg.zero != 3:
            errors.append(f"{key}.cpu_offload: needs zero: 3 (FSDP2 CPUOffloadPolicy), got zero: {cfg.zero}")
        if cfg.cpu_offload and torch.cuda.is_available() is False:
            log.info("%s.cpu_offload on a CPU run: parameters already live on the CPU (no effect)", key)
        if model_cfg is not None:
            if cfg.tp > 1:
                for name, n in (("model.n_heads", model_cfg.n_heads), ("model.n_kv_heads", model_cfg.kv_heads),
                                ("model hidden_dim (ffn)", model_cfg.hidden_dim),
                                ("model.vocab_size", model_cfg.vocab_size or 0)):
                    if n % cfg.tp:
                        errors.append(f"{key}.tp: {name} = {n} is not divisible by tp = {cfg.tp}")
                if model_cfg.moe_experts:
                    errors.append(f"{key}.tp: mixture-of-experts layers have no tensor-parallel plan (use "
                                  "dp/pp, or model.moe_experts: 0)")
                if model_cfg.pos_emb == "alibi":
                    errors.append(f"{key}.tp: ALiBi biases are per head and not sharded; use rope with tp")
                if model_cfg.tie_embeddings:
                    errors.append(f"{key}.tp: tied embeddings would need one matrix sharded two ways; set "
                                  "model.tie_embeddings: false")
                if cfg.sequence_parallel and seq_len is not None and seq_len % cfg.tp:
                    errors.append(f"{key}.sequence_parallel: loader.seq_len {seq_len} is not divisible by tp "
                                  f"{cfg.tp}")
            if cfg.pp > 1:
                stages = dims.n_stages
                if stages > model_cfg.n_layers:
                    errors.append(f"{key}.pp: {stages} pipeline stages (pp {cfg.pp} x {dims.stages_per_rank} "
                                  f"per rank) > model.n_layers {model_cfg.n_layers}")
                if model_cfg.tie_embeddings:
                    errors.append(f"{key}.pp: tied embeddings span the first and last stage; set "
                                  "model.tie_embeddings: false")
                if model_cfg.moe_experts:
                    errors.append(f"{key}.pp: the MoE load-balancing loss does not cross pipeline stages; use "
                                  "model.moe_experts: 0 with pp")
        if cfg.pp > 1:
            if cfg.pp_schedule == "interleaved_1f1b" and cfg.pp_stages_per_rank < 2:
                errors.append(f"{key}.pp_stages_per_rank: interleaved_1f1b needs >= 2 (got "
                              f"{cfg.pp_stages_per_rank})")
            m = dims.pp_microbatches
            if cfg.pp_schedule == "interleaved_1f1b" and m % cfg.pp:
                errors.append(f"{key}.pp_microbatches: {m} is not a multiple of pp {cfg.pp} (interleaved_1f1b)")
            if micro_batch is not None and micro_batch % m:
                errors.append(f"{key}.pp_microbatches: train.batch.micro_batch {micro_batch} is not divisible into "
                              f"{m} pipeline micro-batches")
            if uses_masks:
                errors.append(f"{key}.pp: pipeline stages take token ids only; document masking "
                              "(loader.document_mask) and prefix-LM objectives need tp/dp instead")
        if precision == "fp16" and dims.fsdp:
            errors.append(f"{key}.zero: fp16 loss scaling with FSDP2 is not supported here; use bf16")
        if errors:
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))
        return dims

    def describe(self) -> str:
        mode = {0: "DDP", 1: "DDP+ZeRO-1", 2: "FSDP(ZeRO-2)", 3: "FSDP(ZeRO-3)"}[self.zero] if self.dp > 1 else "-"
        if self.fsdp and self.dp_replicate > 1 and self.dp_shard > 1:
            mode = f"HSDP(ZeRO-{self.zero})"
        pp = f" {self.cfg.pp_schedule} x{self.pp_microbatches} mb" if self.pp > 1 else ""
        return (f"world {self.world}: dp {self.dp} ({mode}; replicate {self.dp_replicate} x shard "
                f"{self.dp_shard}), tp {self.tp}{' +SP' if self.tp > 1 and self.cfg.sequence_parallel else ''}, "
                f"pp {self.pp}{pp}")

    # -------------------------------------------------------------------- mesh and coordinates

    def build_mesh(self, device_type: str) -> Any:
        """The world as a DeviceMesh ``(pp, dp_replicate, dp_shard, tp)``; None in one process."""
        if self.world == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (row-major over (pp, dp_replicate, dp_shard, tp))."""
        tp = rank % self.tp
        rest = rank // self.tp
        dp_shard = rest % self.dp_shard
        rest //= self.dp_shard
        dp_rep = rest % self.dp_replicate
        pp = rest // self.dp_replicate
        return {"pp": pp, "dp_replicate": dp_rep, "dp_shard": dp_shard, "tp": tp,
                "dp": dp_rep * self.dp_shard + dp_shard}


def _dp_mesh(mesh: Any, dims: ParallelDims) -> Any:
    """The data-parallel sub-mesh: 2-D (replicate, shard) for HSDP, else one flattened dim."""
    if dims.fsdp and dims.dp_replicate > 1 and dims.dp_shard > 1:
        return mesh["dp_replicate", "dp_shard"]
    if dims.dp_replicate > 1 and dims.dp_shard > 1:
        return mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh["dp_replicate"] if dims.dp_replicate > 1 else mesh["dp_shard"]


# --------------------------------------------------------------------------------------------
# pipeline stages


class StageLayers(nn.ModuleList):
    """The blocks one pipeline stage owns, registered under their global indices ("3", "4", ...)
    so ``state_dict`` names stay ``layers.3...`` (torchtitan keeps a ModuleDict for the same
    reason); iteration and positional indexing behave like the ModuleList the model expects."""

    def __init__(self, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        for i, block in sorted(blocks.items()):
            self.add_module(str(i), block)

    def _key(self, idx: int) -> str:
        keys = list(self._modules)
        return keys[idx]

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice):
            return [self._modules[k] for k in list(self._modules)[idx]]
        return self._modules[self._key(idx)]

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        self._modules[self._key(idx)] = module


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, as-even-as-possible layer ranges; earlier stages get the remainder, as the
    last stage also computes the output projection and loss."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def _stage_module(model: nn.Module, layers: range, first: bool, last: bool, *, copy_model: bool) -> nn.Module:
    m = copy.deepcopy(model) if copy_model else model
    m.layers = StageLayers({i: m.layers[i] for i in layers})
    if not first:
        m.tok_embeddings = None  # the model's forward then takes hidden states (B, T, dim)
        if getattr(m, "pos_embeddings", None) is not None:
            m.pos_embeddings = None
    if not last:
        m.norm = None
        m.output = None
    return m


class PartsView(nn.Module):
    """A Transformer-shaped view over several stage modules of one rank (interleaved schedules):
    the union of their parameters under the whole model's names, for the optimizer and DCP."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        blocks: dict[int, nn.Module] = {}
        for p in parts:
            for k, b in p.layers._modules.items():
                blocks[int(k)] = b
            for name in ("tok_embeddings", "pos_embeddings", "norm", "output"):
                if getattr(p, name, None) is not None:
                    setattr(self, name, getattr(p, name))
        self.layers = StageLayers(blocks)


# --------------------------------------------------------------------------------------------
# tensor parallel


def apply_tp(model: nn.Module, tp_mesh: Any, sequence_parallel: bool) -> None:
    """Megatron column/row layout on every block; vocab-parallel embedding and output.

    With sequence parallel the residual stream between sublayers is sharded over the sequence
    (``Shard(1)``): norms run on 1/tp of the tokens, and the row-parallel outputs reduce-scatter
    instead of all-reduce (torchtitan's plan). The output projection gathers full logits
    (``Replicate``) so the trainer's loss code is unchanged.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, Any] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if getattr(model, "output", None) is not None:
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)
        if sequence_parallel and isinstance(getattr(model, "norm", None), nn.Module) and \
                not isinstance(model.norm, nn.Identity):
            top["norm"] = SequenceParallel()
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers:
        plan: dict[str, Any] = {
            # Attention.forward(x, rope, mask, kv_cache, start): only x is laid out.
            "attention": PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        }
        if getattr(block.feed_forward, "w3", None) is not None:
            plan["feed_forward.w3"] = ColwiseParallel()
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


# --------------------------------------------------------------------------------------------
# data parallel


def apply_fsdp(model: nn.Module, dp_mesh: Any, zero: int, precision: str, cpu_offload: bool) -> None:
    """FSDP2 per block, then the root (embedding, final norm, output) as torchtitan does."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    # Pinned host memory makes the H2D/D2H copies asynchronous; pinning needs an accelerator
    # (torch raises "Cannot access accelerator device" without one). On a CPU run the sharded
    # parameters, gradients and optimizer state live on the host anyway: the policy then runs the
    # offload code path without moving data.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    reshard = zero >= 3
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: never reshard them.
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard and i < n - 1, mp_policy=mp,
                    offload_policy=offload)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)


@dataclass
class ParallelModel:
    """What the trainer drives.

    ``module``: call it for forward (DDP wrapper or the model); None under pipeline parallelism.
    ``params_module``: holds this rank's parameters under the whole model's names (optimizer,
    checkpoints, grad norm). ``schedule``: the pipelining schedule when pp > 1, with ``loss``
    its loss function object and ``first``/``last`` whether this rank holds those stages.
    """

    module: nn.Module | None
    params_module: nn.Module
    core: nn.Module
    schedule: Any = None
    loss: Any = None
    first: bool = True
    last: bool = True
    ddp: bool = False


def parallelize(model: nn.Module, dims: ParallelDims, mesh: Any, device: torch.device, *, precision: str,
                ac: Callable[[nn.Module], Any], compile_fn: Callable[[nn.Module], Any] | None,
                pp_loss: Any = None) -> ParallelModel:
    """Apply PP split → TP → activation checkpointing → compile → FSDP/DDP (STYLE.md 2)."""
    if mesh is None:  # one process: only the single-process transforms
        ac(model)
        if compile_fn is not None:
            compile_fn(model)
        return ParallelModel(module=model, params_module=model, core=model)

    coords = dims.coords(dist.get_rank())
    parts: list[nn.Module]
    stage_ids: list[int] = []
    if dims.pp > 1:
        ranges = split_layers(len(model.layers), dims.n_stages)
        # Looped assignment (Interleaved 1F1B, Narayanan et al. 2021): rank r owns r, r+pp, ...
        stage_ids = [coords["pp"] + k * dims.pp for k in range(dims.stages_per_rank)]
        parts = [_stage_module(model, ranges[s], s == 0, s == dims.n_stages - 1,
                               copy_model=len(stage_ids) > 1) for s in stage_ids]
        log.info("pipeline: rank %d holds stages %s (layers %s)", dist.get_rank(), stage_ids,
                 [list(ranges[s]) for s in stage_ids])
    else:
        parts = [model]

    for part in parts:
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], dims.cfg.sequence_parallel)
        ac(part)
        if compile_fn is not None:
            compile_fn(part)
        if dims.fsdp:
            apply_fsdp(part, _dp_mesh(mesh, dims), dims.zero, precision, dims.cfg.cpu_offload)

    if dims.pp > 1:
        from torch.distributed import pipelining

        pp_group = mesh["pp"].get_group()
        stages = [pipelining.PipelineStage(part, s, dims.n_stages, device, group=pp_group)
                  for part, s in zip(parts, stage_ids)]
        cls = getattr(pipelining, PP_SCHEDULES[dims.cfg.pp_schedule])
        # scale_grads=False: the loss function already divides by the global target count.
        if dims.stages_per_rank > 1:
            schedule = cls(stages, n_microbatches=dims.pp_microbatches, loss_fn=pp_loss, scale_grads=False)
        else:
            schedule = cls(stages[0], n_microbatches=dims.pp_microbatches, loss_fn=pp_loss, scale_grads=False)
        holder = parts[0] if len(parts) == 1 else PartsView(parts)
        return ParallelModel(module=None, params_module=holder, core=holder, schedule=schedule, loss=pp_loss,
                             first=0 in stage_ids, last=dims.n_stages - 1 in stage_ids)

    if dims.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dp_group = _dp_mesh(mesh, dims).get_group()
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids, process_group=dp_group)
        return ParallelModel(module=wrapped, params_module=wrapped, core=model, ddp=True)
    return ParallelModel(module=model, params_module=model, core=model)


def build_zero1_optimizer(groups: list[dict], optim_cfg: Any, dp_group: Any) -> torch.optim.Optimizer:
    """ZeroRedundancyOptimizer over AdamW: each dp rank keeps the Adam moments of the parameters
    it owns, updates them and broadcasts the new values (ZeRO stage 1)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if optim_cfg.name != "adamw":
        raise RecipeError(f"invalid recipe:\n  train.parallel.zero: 1 supports optim.name adamw, not "
                          f"{optim_cfg.name!r}")
    # The names of a group describe all its parameters; ZeRO splits groups across ranks.
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return ZeroRedundancyOptimizer(clean, optimizer_class=torch.optim.AdamW, process_group=dp_group,
                                   lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                   weight_decay=optim_cfg.weight_decay, foreach=True)


def dp_group(mesh: Any, dims: ParallelDims) -> Any:
    return None if mesh is None else _dp_mesh(mesh, dims).get_group() if dims.dp > 1 else None


# --------------------------------------------------------------------------------------------
# gradient norm and clipping over plain and DTensor gradients


def _grad_groups(params: list[nn.Parameter]) -> dict[Any, list[torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    return groups


def grad_norm(params: list[nn.Parameter], device: torch.device, pp_group: Any = None) -> torch.Tensor:
    """L2 norm of the whole model's gradient (fp32 scalar, the same on every rank).

    DTensor gradients (FSDP shards, TP shards) are reduced per mesh/placement group with
    ``full_tensor()``; plain ones are local and complete (DDP has all-reduced them). Under pipeline
    parallelism each stage holds different parameters: the squares are summed over ``pp_group``.
    """
    from torch.distributed.tensor import DTensor

    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in _grad_groups(params).values():
        n = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        total_sq = total_sq + n.float().to(device) ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pp_group)
    return total_sq.sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)) (torch's
    ``clip_grads_with_norm_`` formula), one foreach call per gradient kind (plain tensors and each
    DTensor layout apart: foreach kernels do not mix them)."""
    from torch.distributed.tensor import DTensor

    coef = torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)
    for key, grads in _grad_groups(params).items():
        if key is None:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        else:
            for g in grads:  # DTensor: scale the local shard (the coefficient is the same everywhere)
                assert isinstance(g, DTensor)
                g._local_tensor.mul_(coef.to(g._local_tensor.device, g._local_tensor.dtype))


# --------------------------------------------------------------------------------------------
# test-only fault injection


def maybe_crash(step: int, marker_dir: Any, rank: int) -> None:
    """Test-only: with ``SMELT_CRASH_AT_STEP=N`` (and optionally ``SMELT_CRASH_RANK``, default 1
    or 0 in one process) the chosen rank raises once after optimizer step N. A marker file in
    ``marker_dir`` makes it fire only once, so torchrun's restart (``--max-restarts``) recovers.
    Never set these variables outside tests."""
    at = os.environ.get(CRASH_ENV)
    if not at or int(at) != step:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    who = int(os.environ.get("SMELT_CRASH_RANK", "1" if world > 1 else "0"))
    if rank != who:
        return
    from pathlib import Path

    marker = Path(marker_dir) / f".crashed-at-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} crashed at step {step}\n")
    raise RuntimeError(f"{CRASH_ENV}={at}: deliberate crash of rank {rank} after step {step} (test hook)")
