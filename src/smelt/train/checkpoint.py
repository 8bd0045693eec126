"""Checkpoints: `torch.distributed.checkpoint` (DCP) for tensors, JSON for everything else.

Layout (format version 1) under ``train/checkpoints/``::

    step-0000500/             one complete checkpoint, named by optimizer steps done
        .metadata             DCP metadata (tensor shapes, which file holds which bytes)
        __0_0.distcp ...      DCP tensor data, one file per writing rank
        trainer_state.json    step, tokens, loader state, RNG, stability, config hash, the
                              optimizer's hyperparameters, and the size and xxh3-64 checksum
                              of every file above
    step-0000500.tmp/         a checkpoint being written (never read)
    latest                    text: the name of the newest complete checkpoint

The tensors go through DCP with `get_state_dict`/`set_state_dict`, so the same files load into a
different world size or parallel layout later (issue 6); DCP runs without a process group in a
single process (``no_dist``). Only tensors are stored through DCP: the optimizer's param-group
hyperparameters travel in the JSON, because DCP stores non-tensor values with `torch.save` and
reads them back with ``torch.load(weights_only=False)``, i.e. unpickling. DCP's own ``.metadata``
is a pickle too: smelt never hands it to `pickle.load`, but reads it with `SafeMetadataReader`,
whose unpickler resolves only the classes DCP's metadata is made of (its dataclasses, torch
dtypes/sizes/layouts, paths) and refuses any other global, so a crafted ``.metadata`` cannot run
code; an entry that is not a tensor (DCP's pickled "bytes" items) is refused as well. Tensor data
is read with ``weights_only=True``. A checkpoint directory therefore never runs code.

Atomicity: everything is written into ``step-NNNNNNN.tmp/``, files fsynced, the directory renamed
to ``step-NNNNNNN/`` (the commit point), then ``latest`` is rewritten atomically and checkpoints
beyond the newest ``keep`` are deleted, except a ``milestone`` (WSD's decay start). `find_latest`
never trusts a name alone: it verifies the newest checkpoint (state JSON parses, every recorded
file has its recorded size and xxh3-64 checksum, so same-size corruption is caught too, and every
byte range in the DCP metadata lies inside its file) and falls back to older ones, logging why.
Checkpoints written before checksums were recorded are verified by size alone.

RNG states (torch CPU and CUDA, numpy, Python) are stored as base64 / integer lists in JSON:
``rng`` is rank 0's, ``rng_ranks`` every rank's when the process group has several ranks. A
checkpoint loaded with the world size it was saved with restores each rank's own stream;
with another world size every rank takes rank 0's (per-rank streams cannot be resharded).

Parallel layouts (issue 6): DDP-wrapped, FSDP2-sharded and tensor-parallel (DTensor) models and
their optimizers go through `get_state_dict`/`set_state_dict`, which name every tensor by its
fully qualified parameter name and hand DCP the local shards; pipeline stages hold disjoint
parameters under the whole model's names, so each rank saves and loads its own keys. A
`ZeroRedundancyOptimizer` (ZeRO-1) has no DCP support: each rank contributes the Adam state of
the parameters it owns under the same FQN keys a plain AdamW would use, so ZeRO-1 checkpoints
load into any other layout and back.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from smelt.fsutil import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step-(\d{7,})$")

__all__ = [
    "CheckpointError",
    "step_dir_name",
    "list_checkpoints",
    "verify_checkpoint",
    "find_latest",
    "save_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
    "read_metadata",
    "SafeMetadataReader",
    "file_checksum",
    "capture_rng_state",
    "restore_rng_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every save/load without a process group, even when asked for ``no_dist``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# RNG state <-> JSON


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training step might draw from, as JSON-safe values (no pickle)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": {"kind": np_kind, "keys": [int(k) for k in np_keys], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii")
                         for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64, validate=True)), dtype=torch.uint8)


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], np.asarray(npst["keys"], dtype=np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d; restoring the "
                        "first ones", len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_bytes_tensor(s), device=i)


# --------------------------------------------------------------------------------------------
# DCP metadata without arbitrary unpickling

# Exactly the globals a DCP ``.metadata`` pickle refers to (checked on torch 2.4-2.13 saves):
# its metadata dataclasses, the filesystem writer's storage record, and torch's value types.
_SAFE_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePath", "PurePosixPath"}),
}


def _enum_member(cls: Any, name: Any) -> Any:
    """What ``builtins.getattr`` may do in metadata: some Python versions pickle an enum member
    as ``getattr(EnumClass, "NAME")``. Only members of an allowed enum; a general getattr would
    reach any attribute of any object (and from there ``os.system``)."""
    import enum

    allowed = (isinstance(cls, type) and issubclass(cls, enum.Enum)
               and cls.__name__ in _SAFE_GLOBALS.get(cls.__module__, ()))
    if allowed and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"refusing getattr({cls!r}, {name!r}): only members of DCP's metadata enums")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of DCP metadata")


def read_metadata(path: str | Path) -> Metadata:
    """A checkpoint's DCP metadata, unpickled with `_MetadataUnpickler` (no code can run) and
    checked to describe tensors only; CheckpointError otherwise."""
    f = Path(path) / ".metadata"
    try:
        md = _MetadataUnpickler(io.BytesIO(f.read_bytes())).load()
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt or hostile file
        raise CheckpointError(f"{f}: not valid DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{f}: not valid DCP metadata (a {type(md).__name__})")
    bad = [k for k, v in (md.state_dict_metadata or {}).items() if not isinstance(v, TensorStorageMetadata)]
    if bad:
        # Non-tensor entries are read back by DCP with torch.load(weights_only=False): refuse.
        raise CheckpointError(f"{f}: holds non-tensor entries ({', '.join(sorted(bad)[:3])}), which smelt never "
                              "writes and will not unpickle")
    return md


class SafeMetadataReader(dcp.FileSystemReader):
    """`dcp.FileSystemReader` whose metadata comes from `read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_metadata(self.path)
        if getattr(md, "storage_meta", None) is not None:
            md.storage_meta.load_id = self.load_id
        return md


def file_checksum(path: str | Path, chunk: int = 8 << 20) -> str:
    """xxh3-64 of a file's bytes, hex (~10 GB/s: reading the file costs more than hashing it)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# listing and verification


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoint directories (``step-NNNNNNN``, no ``.tmp``), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(s, p) for p in directory.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return sorted(found)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    p = Path(path) / STATE_FILE
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise CheckpointError(f"{p}: not a version-{VERSION} trainer state")
    return state


def verify_checkpoint(path: str | Path, *, content: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it.

    ``content``: also compare every file's xxh3-64 checksum with the one recorded at save (reads
    every byte; False checks sizes and the metadata only)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        return "DCP .metadata is missing"
    try:
        state = read_trainer_state(path)
    except CheckpointError as e:
        return str(e)
    step = _step_of(path)
    if step is not None and state.get("step") != step:
        return f"{STATE_FILE} says step {state.get('step')}, directory says {step}"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return f"{STATE_FILE} lists no files"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, expected {size}"
    sums = state.get("checksums")
    if content and isinstance(sums, dict):
        for name in files:
            if name not in sums:
                return f"{STATE_FILE} records no checksum for {name}"
            got = file_checksum(path / name)
            if got != sums[name]:
                return f"{name}: content checksum {got} differs from the {sums[name]} recorded at save (corrupt)"
    # Cross-check DCP's own map of byte ranges (catches a file rewritten after the JSON listed it).
    try:
        metadata = read_metadata(path)
    except CheckpointError as e:
        return str(e).removeprefix(f"{path / '.metadata'}: ")
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = info.relative_path
        if rel not in sizes:
            f = path / rel
            if not f.is_file():
                return f"{rel} (named by the DCP metadata) is missing"
            sizes[rel] = f.stat().st_size
        if info.offset + info.length > sizes[rel]:
            return f"{rel} has {sizes[rel]} bytes, DCP metadata expects at least {info.offset + info.length}"
    return None


def find_latest(directory: str | Path) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are skipped with a warning."""
    directory = Path(directory)
    pointer = None
    latest_file = directory / LATEST_FILE
    if latest_file.is_file():
        pointer = latest_file.read_text(encoding="utf-8").strip()
    for _, path in reversed(list_checkpoints(directory)):
        problem = verify_checkpoint(path)
        if problem is None:
            if pointer is not None and pointer != path.name:
                log.info("checkpoint: %s names %s; using the newest complete one, %s", LATEST_FILE, pointer,
                         path.name)
            return path
        log.warning("checkpoint %s is incomplete or corrupt (%s); falling back to an older one", path, problem)
    return None


# --------------------------------------------------------------------------------------------
# save


def _only_tensors(tree: Any, where: str) -> None:
    """DCP stores non-tensors with torch.save and reads them back by unpickling: refuse them."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _only_tensors(v, f"{where}.{k}")
    elif not isinstance(tree, torch.Tensor):
        raise CheckpointError(f"{where}: {type(tree).__name__} is not a tensor; store it in {STATE_FILE}")


def _jsonable_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        d = {}
        for k, v in g.items():
            if k in ("params", "param_names"):
                continue  # the parameter lists are rebuilt from the model, never loaded
            if isinstance(v, torch.Tensor):
                v = v.item()
            d[k] = list(v) if isinstance(v, tuple) else v
        out.append(d)
    return out


def _is_zero1(optimizer: Any) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _optim_class(optimizer: Any) -> str:
    """The update rule's class: ZeRO-1 wraps AdamW and stores the same state, so it is AdamW."""
    return type(optimizer.optim if _is_zero1(optimizer) else optimizer).__name__


def _param_fqns(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> name in the unwrapped model (DDP's ``module.`` and checkpoint wrappers'
    prefixes removed, as `get_state_dict` names them)."""
    inner = getattr(model, "module", model)
    out = {}
    for name, p in inner.named_parameters():
        out[id(p)] = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return out


def _zero1_state(model: nn.Module, optimizer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's shard of a ZeroRedundancyOptimizer's state, keyed like `get_state_dict`."""
    names = _param_fqns(model)
    local = optimizer.optim
    return {names[id(p)]: dict(st) for p, st in local.state.items()}


def _materialize_zero1(optimizer: Any) -> None:
    """Create the local optimizer's state tensors (to load into) with one zero-lr, zero-grad
    step, as `get_state_dict` does for plain optimizers; values are overwritten by the load."""
    local = optimizer.optim
    lrs = [g["lr"] for g in local.param_groups]
    made = []
    for g in local.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                made.append(p)
    local.step()
    for g, lr in zip(local.param_groups, lrs):
        g["lr"] = lr
    for p in made:
        p.grad = None


def _optim_initialized(optimizer: Any) -> bool:
    """Whether any update has been applied, agreed by all ranks (a ZeRO-1 or pipeline rank may
    own no parameter with state)."""
    local = optimizer.optim if _is_zero1(optimizer) else optimizer
    flag = torch.tensor([1 if local.state else 0], dtype=torch.int64)
    if _is_dist() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _gather_rng() -> list[dict[str, Any]] | None:
    if not _is_dist() or dist.get_world_size() == 1:
        return None
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, capture_rng_state())
    return states


def save_checkpoint(directory: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, keep: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune to ``keep``.

    ``trainer_state`` is the caller's JSON-safe state (step counters, loader state, ...); the RNG
    states, optimizer hyperparameters and the file sizes are added here. Collective when a process
    group is initialized (DCP writes one file per rank; rank 0 writes the JSON and renames).
    """
    directory = Path(directory)
    final = directory / step_dir_name(step)
    tmp = directory / (final.name + ".tmp")
    t0 = time.perf_counter()
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous attempt died mid-write
        tmp.mkdir()
    _barrier()

    try:
        optim_ready = _optim_initialized(optimizer)
        if optim_ready and _is_zero1(optimizer):
            tensors = {"model": get_model_state_dict(model), "optim": {"state": _zero1_state(model, optimizer)}}
            groups = _jsonable_groups(optimizer.param_groups)
        elif optim_ready:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            tensors = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
            groups = _jsonable_groups(optim_sd["param_groups"])
        else:
            # No update applied yet (every step so far was skipped): get_state_dict would initialize
            # the optimizer state as a side effect (a zero-lr step that sets Adam's step to 1) and so
            # change the run; save the model alone.
            tensors = {"model": get_model_state_dict(model)}
            groups = _jsonable_groups(optimizer.param_groups if _is_zero1(optimizer)
                                      else optimizer.state_dict()["param_groups"])
        _only_tensors(tensors, "state")
        rng_ranks = _gather_rng()
        try:
            with _quiet_single_process():
                dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _is_dist())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            raise _save_error(e, tmp, tensors) from e
        _barrier()

        if _rank() == 0:
            state = {
                "version": VERSION,
                **trainer_state,
                "step": step,
                "rng": capture_rng_state(),
                "rng_ranks": rng_ranks,
                "optimizer": {"class": _optim_class(optimizer), "initialized": optim_ready, "param_groups": groups},
                "saved_at": time.time(),
            }
            # Sizes of DCP's files, recorded after they are complete; the JSON itself is not listed.
            written = [f for f in sorted(tmp.iterdir()) if f.is_file()]
            state["files"] = {f.name: f.stat().st_size for f in written}
            state["checksums"] = {f.name: file_checksum(f) for f in written}
            atomic_write_json(tmp / STATE_FILE, state)
            for f in tmp.iterdir():  # DCP does not fsync on every filesystem; make the data durable
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (after a rollback): swap, then delete the old one
                old = directory / (final.name + f".old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(directory)
            atomic_write_text(directory / LATEST_FILE, final.name + "\n")
            _prune(directory, step, keep)
            log.info("checkpoint: saved %s in %.2f s", final, time.perf_counter() - t0)
    except BaseException:
        # Disk full, permissions, Ctrl-C mid-write: the half-written step is never committed;
        # remove it so that it does not hold the space (earlier checkpoints are untouched).
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    return tree.numel() * tree.element_size() if isinstance(tree, torch.Tensor) else 0


def _save_error(e: BaseException, tmp: Path, tensors: dict[str, Any]) -> BaseException:
    """DCP wraps write failures in a CheckpointException whose cause may be an OSError, or, for
    a full disk, the zip writer's "unexpected pos" RuntimeError. Return the OSError (ENOSPC when
    the free space is below what the tensors need) so callers can name the path and the fix."""
    import errno

    failures = getattr(e, "failures", None) or {}
    for f in [e, *(getattr(w, "exception", w) for w in failures.values())]:
        seen: BaseException | None = f if isinstance(f, BaseException) else None
        while seen is not None:
            if isinstance(seen, OSError) and seen.errno is not None:
                return seen
            seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(tmp).free
    except OSError:
        return e
    if free < _tensor_bytes(tensors):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    return e


def _milestone(path: Path) -> str | None:
    try:
        return read_trainer_state(path).get("milestone")
    except CheckpointError:
        return None


def _prune(directory: Path, newest: int, keep: int | None) -> None:
    """Delete checkpoints newer than the one just written (an abandoned timeline after a
    rollback, or broken leftovers) and all but the newest ``keep``; also stale temp dirs."""
    ckpts = list_checkpoints(directory)
    for step, path in ckpts:
        if step > newest:
            log.warning("checkpoint: removing %s (newer than the checkpoint just written, %s)", path.name,
                        step_dir_name(newest))
            shutil.rmtree(path, ignore_errors=True)
    if keep is not None:
        kept = [(s, p) for s, p in ckpts if s <= newest]
        for _, path in kept[:-keep] if keep > 0 else kept:
            if _milestone(path):
                continue  # e.g. WSD's decay start: a longer run branches from it
            shutil.rmtree(path, ignore_errors=True)
            log.info("checkpoint: removed %s (keep=%d)", path.name, keep)
    for p in directory.iterdir():
        if p.is_dir() and (p.name.endswith(".tmp") or ".old-" in p.name):  # never committed
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# load


def _apply_saved_groups(groups: list[dict[str, Any]], saved_opt: dict[str, Any], path: Path) -> None:
    """Saved hyperparameters (betas, eps, weight decay, ...) into ``groups``; ``lr`` is scheduled."""
    saved_groups = saved_opt.get("param_groups", [])
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{path}: {len(saved_groups)} optimizer param groups saved, model has {len(groups)}")
    for g, sg in zip(groups, saved_groups):
        for k, v in sg.items():
            if k in g and k != "lr":
                g[k] = tuple(v) if isinstance(g[k], tuple) else v


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> dict[str, Any]:
    """Load model (and optimizer) tensors from ``path`` in place; return its trainer state.

    The optimizer's hyperparameters come from the JSON, except ``lr`` (set by the schedule every
    step). An optimizer saved before its first update is reset to an empty state.
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    state = read_trainer_state(path)
    no_dist = not _is_dist()
    saved_opt = state.get("optimizer", {})
    if optimizer is not None and saved_opt.get("class") not in (None, _optim_class(optimizer)):
        raise CheckpointError(f"{path}: saved with {saved_opt.get('class')}, cannot load into "
                              f"{_optim_class(optimizer)} (train.optim.name changed?)")
    if optimizer is not None and _is_zero1(optimizer) and saved_opt.get("initialized", False):
        _materialize_zero1(optimizer)
        tensors = {"model": get_model_state_dict(model), "optim": {"state": _zero1_state(model, optimizer)}}
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=SafeMetadataReader(str(path)), no_dist=no_dist)  # this rank's keys
        set_model_state_dict(model, tensors["model"])
        _apply_saved_groups(optimizer.param_groups, saved_opt, path)
    elif optimizer is None or not saved_opt.get("initialized", False):
        tensors = {"model": get_model_state_dict(model)}
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=SafeMetadataReader(str(path)), no_dist=no_dist)
        set_model_state_dict(model, tensors["model"])
        if optimizer is not None:
            (optimizer.optim if _is_zero1(optimizer) else optimizer).state.clear()
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=SafeMetadataReader(str(path)), no_dist=no_dist)
        groups = optim_sd["param_groups"]
        _apply_saved_groups(groups, saved_opt, path)
        set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optim"]["state"], "param_groups": groups})
    if restore_rng and "rng" in state:
        ranks = state.get("rng_ranks")
        world = dist.get_world_size() if _is_dist() else 1
        if ranks and len(ranks) == world:
            restore_rng_state(ranks[_rank()])
        else:
            if world > 1 or ranks:
                log.info("checkpoint: saved with %d rank(s), loading with %d: every rank takes rank 0's RNG state",
                         len(ranks) if ranks else 1, world)
            restore_rng_state(state["rng"])
    log.info("checkpoint: loaded %s (step %d)", path, state["step"])
    return state
