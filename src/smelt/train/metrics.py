"""Training metrics: `train/metrics.jsonl`, TensorBoard, throughput, MFU and memory.

`train/metrics.jsonl` (format version 1) holds one JSON object per line, flushed per line:

    kind "train"  one per logged optimizer step:
        step            optimizer updates done so far (1 after the first step)
        tokens          training tokens consumed (input positions, padding included)
        loss            mean cross entropy over the step's target tokens (nats/token)
        loss_by_domain  {domain: mean cross entropy} for the domains present in the step's batch
        z_loss, aux_loss  the auxiliary terms (unweighted), when enabled
        lr, grad_norm   learning rate used and global gradient norm before clipping
        batch_size      sequences in the step (the batch ramp changes it)
        tokens_per_s, tflops, mfu   throughput since the previous logged step (eval and
                        checkpoint time excluded); mfu = achieved FLOP/s / peak FLOP/s
        memory_gb       resident set size (CPU) or max_memory_allocated (CUDA), GiB
        skipped, rolled_back   stability counters so far
        time            Unix time of the line
    kind "val"    {"step", "val_loss", "val_loss_by_domain", "val_tokens", "time"}
    kind "event"  one stability event: {"step", "event" (nan_loss | nan_grad | spike), "action"
                  (skip | rollback), "loss", "grad_norm", "threshold", "reason", "time"}

The same scalars go to TensorBoard under ``train/...``, ``val/...`` (nested dicts flattened with
``/``). On resume from step s, lines with ``step > s`` (written after the last checkpoint by the
run that died) are dropped, and TensorBoard is told to purge them (``purge_step``), so the log
reads as one uninterrupted run.

MFU follows PaLM (Chowdhery et al. 2022, Appendix B): model FLOPs per token (forward + backward,
no recomputation) times tokens/s over the peak. The peak is ``train.peak_tflops`` when set; on
CPU otherwise the matmul throughput measured here for the precision in use (the best of several
short probes); on CUDA the datasheet dense figure (H100/H200 SXM: 989 TFLOP/s bf16/fp16, 495
TF32), else measured. A measurement taken while other processes share the cores is too low, so
`MfuMeter` re-measures (and raises the peak to what was observed) when a step runs faster than the
peak allows, and never reports MFU above 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from smelt.fsutil import atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1

__all__ = [
    "MetricsWriter",
    "MfuMeter",
    "Throughput",
    "measure_matmul_tflops",
    "peak_flops",
    "memory_gb",
    "read_metrics",
]

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from NVIDIA datasheets (SXM parts).
_CUDA_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_measured: dict[tuple[str, str, int], float] = {}


# --------------------------------------------------------------------------------------------
# peak FLOP/s, memory


def measure_matmul_tflops(precision: str = "fp32", device: str | torch.device = "cpu", n: int = 1024,
                          min_seconds: float = 0.3, probes: int = 5, refresh: bool = False) -> float:
    """Best observed square-matmul throughput (TFLOP/s) for this device, precision and thread
    count; cached per process. ``2 n^3`` FLOPs per ``n x n @ n x n`` product.

    The time is spread over ``probes`` short probes, 20 ms apart, and the fastest product of any
    of them counts: a burst of load from another process then slows some probes, not the figure.
    ``refresh`` measures again and keeps the larger of the two figures (a peak never goes down).
    """
    dev = torch.device(device)
    key = (dev.type, precision, torch.get_num_threads())
    if key in _measured and not refresh:
        return _measured[key]
    dtype = _DTYPES[precision]
    g = torch.Generator(device="cpu").manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: oneDNN/AMX kernel selection, cuBLAS handles
        torch.mm(a, b)
    sync()
    best = math.inf
    for p in range(max(1, probes)):
        if p:
            time.sleep(0.02)
        spent, reps = 0.0, 0
        while spent < min_seconds / max(1, probes) or reps < 2:
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            dt = time.perf_counter() - t0
            best = min(best, dt)
            spent += dt
            reps += 1
    tflops = max(2 * n**3 / best / 1e12, _measured.get(key, 0.0))
    _measured[key] = tflops
    log.info("measured %s matmul peak on %s (%d threads): %.3f TFLOP/s", precision, dev.type,
             torch.get_num_threads(), tflops)
    return tflops


def peak_flops(precision: str, device: torch.device, peak_tflops: float | None = None) -> float:
    """Peak FLOP/s for MFU: the configured figure, a CUDA datasheet figure, or a measurement."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, table in _CUDA_PEAK_TFLOPS.items():
            if part in name:
                return table[precision] * 1e12
        log.warning("no datasheet peak for %r; measuring the matmul peak (set train.peak_tflops)", name)
    return measure_matmul_tflops(precision, device) * 1e12


class MfuMeter:
    """MFU of a job (PaLM's definition, see the module docstring), never above 1.

    ``meter(achieved_flops)`` takes the job's model FLOP/s (tokens/s x FLOPs per token) and
    returns it over the peak (`peak_flops` per device x ``world``). A step that implies more than
    a *measured* peak shows the measurement was taken under load: the matmul is measured again,
    at most ``max_remeasures`` times, and the peak raised to the larger of that and what the step
    achieved. A configured (``train.peak_tflops``) or datasheet peak is not changed; MFU is
    clamped to 1 and one warning says the peak is too low.
    """

    def __init__(self, precision: str, device: torch.device, peak_tflops: float | None = None, world: int = 1,
                 max_remeasures: int = 3) -> None:
        self.precision, self.device, self.world = precision, device, max(1, world)
        self.measured = peak_tflops is None and not (
            device.type == "cuda" and any(p in torch.cuda.get_device_name(device) for p in _CUDA_PEAK_TFLOPS))
        self.per_device = peak_flops(precision, device, peak_tflops)
        self.remeasures_left = max_remeasures
        self._told = False

    @property
    def peak(self) -> float:
        """The job's peak FLOP/s now."""
        return self.per_device * self.world

    def __call__(self, achieved_flops: float) -> float:
        per_device = achieved_flops / self.world
        if per_device > self.per_device and self.measured:
            before = self.per_device
            if self.remeasures_left > 0:
                self.remeasures_left -= 1
                self.per_device = max(self.per_device, measure_matmul_tflops(
                    self.precision, self.device, refresh=True) * 1e12)
            self.per_device = max(self.per_device, per_device)
            if not self._told:
                self._told = True
                log.info("a step ran at %.3f TFLOP/s per device, above the measured %s matmul peak %.3f (measured "
                         "under load): peak raised to %.3f TFLOP/s", per_device / 1e12, self.precision,
                         before / 1e12, self.per_device / 1e12)
        elif per_device > self.per_device and not self._told:
            self._told = True
            log.warning("a step ran at %.3f TFLOP/s per device, above the %s peak %.3f TFLOP/s: MFU is reported "
                        "as 100%% (set train.peak_tflops to this device's real peak)", per_device / 1e12,
                        self.precision, self.per_device / 1e12)
        return min(1.0, achieved_flops / self.peak) if self.peak > 0 else 0.0


def memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's current resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # not Linux: the peak RSS (KiB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**30 if os.uname().sysname == "Darwin" else rss / 2**20


# --------------------------------------------------------------------------------------------
# throughput


class Throughput:
    """Tokens and seconds of training work between two reads (`pause` excludes eval/saves)."""

    def __init__(self) -> None:
        self._tokens = 0
        self._seconds = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> None:
        if self._t0 is not None:
            self._seconds += time.perf_counter() - self._t0
            self._t0 = None
        self._tokens += tokens

    def read(self) -> tuple[float, float]:
        """(tokens/s, seconds) since the previous read; resets the window."""
        rate = self._tokens / self._seconds if self._seconds > 0 else 0.0
        seconds = self._seconds
        self._tokens, self._seconds = 0, 0.0
        return rate, seconds


# --------------------------------------------------------------------------------------------
# the writer


def _flatten(prefix: str, d: Mapping[str, Any], out: dict[str, float]) -> None:
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, Mapping):
            _flatten(key, v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class MetricsWriter:
    """Appends metric records to ``train_dir/metrics.jsonl`` and, optionally, TensorBoard.

    Only one process per run writes (the trainer passes ``enabled=False`` on other ranks).
    """

    def __init__(self, train_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.path = Path(train_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._f: IO[str] | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged at or after it by a run that died after its last
            # checkpoint (TensorBoard's own mechanism for exactly this).
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"), purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        kept = [line for line in lines if _line_step(line) <= step]
        if len(kept) == len(lines) and text.endswith("\n"):
            return
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, record: Mapping[str, Any]) -> None:
        """One line ``{"kind", "step", **record, "time"}``; numbers also to TensorBoard."""
        if not self.enabled or self._f is None:
            return
        line = {"kind": kind, "step": int(step)}
        line.update((k, v) for k, v in _jsonable(dict(record)).items() if k not in ("kind", "step", "time"))
        line["time"] = round(time.time(), 3)
        self._f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._tb is not None and kind != "event":
            scalars: dict[str, float] = {}
            _flatten(kind, {k: v for k, v in record.items() if k != "step"}, scalars)
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)

    def text(self, tag: str, step: int, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line (killed mid-write) is dropped with the rest


def read_metrics(train_dir: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of ``train_dir/metrics.jsonl`` (of one kind, or all with ``kind=None``)."""
    path = Path(train_dir) / "metrics.jsonl"
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out
