"""metrics.jsonl writer (flush per line, resume truncation, torn lines), TensorBoard, MFU inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from smelt.train import metrics
from smelt.train.metrics import (
    MetricsWriter,
    MfuMeter,
    Throughput,
    measure_matmul_tflops,
    memory_gb,
    peak_flops,
    read_metrics,
)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_lines_are_flushed_and_nan_is_valid_json(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write("train", 1, {"loss": 2.5, "loss_by_domain": {"en": 2.4}, "grad_norm": float("nan")})
    w.write("event", 2, {"event": "spike", "loss": float("inf"), "kind": "ignored"})
    recs = _lines(tmp_path / "metrics.jsonl")  # readable before close: flushed per line
    assert recs[0]["kind"] == "train" and recs[0]["step"] == 1 and recs[0]["loss_by_domain"] == {"en": 2.4}
    assert recs[0]["grad_norm"] == "nan" and recs[1]["loss"] == "inf"
    assert recs[1]["kind"] == "event" and recs[1]["event"] == "spike"  # the line's kind cannot be overridden
    assert "time" in recs[0]
    w.close()


def test_fresh_start_replaces_and_resume_truncates(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for s in range(1, 7):
            w.write("train", s, {"loss": float(s)})
        w.write("val", 6, {"val_loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # torn line: killed mid-write
    # Resume from the checkpoint at step 4: lines of steps 5.. were written after it.
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=4) as w:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
        w.write("train", 5, {"loss": 50.0})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 3.0, 4.0, 50.0]
    assert read_metrics(tmp_path, kind="val") == []
    with MetricsWriter(tmp_path, tensorboard=False):  # no resume: a new log
        pass
    assert read_metrics(tmp_path, kind=None) == []


def test_tensorboard_scalars(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.write("train", 1, {"loss": 2.0, "loss_by_domain": {"en": 1.5}, "lr": 1e-3})
        w.write("val", 1, {"val_loss": 2.2})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_by_domain/en", "train/lr", "val/val_loss"} <= tags
    assert acc.Scalars("train/loss")[0].value == pytest.approx(2.0)


def test_disabled_writer_writes_nothing(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "x", enabled=False) as w:
        w.write("train", 1, {"loss": 1.0})
    assert not (tmp_path / "x").exists()


def test_throughput_excludes_paused_time() -> None:
    t = Throughput()
    t.start()
    time.sleep(0.02)
    t.stop(1000)
    time.sleep(0.05)  # eval / checkpoint: not counted
    rate, seconds = t.read()
    assert 0.015 < seconds < 0.05 and rate == pytest.approx(1000 / seconds)
    assert t.read() == (0.0, 0.0)


def test_peaks_and_memory() -> None:
    fp32 = measure_matmul_tflops("fp32", "cpu", n=256, min_seconds=0.02)
    assert 0 < fp32 < 100
    assert measure_matmul_tflops("fp32", "cpu", n=256) == fp32  # cached per process
    assert peak_flops("bf16", torch.device("cpu"), peak_tflops=2.5) == 2.5e12
    assert peak_flops("fp32", torch.device("cpu")) == pytest.approx(fp32 * 1e12)
    state = torch.get_rng_state()
    measure_matmul_tflops("bf16", "cpu", n=128, min_seconds=0.01)
    assert torch.equal(state, torch.get_rng_state())  # never perturbs the training RNG
    assert 0.001 < memory_gb(torch.device("cpu")) < 1024


def test_refresh_never_lowers_the_measured_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    key = ("cpu", "fp32", torch.get_num_threads())
    monkeypatch.setitem(metrics._measured, key, 1e-6)  # a measurement taken under heavy load
    assert measure_matmul_tflops("fp32", "cpu", n=128, min_seconds=0.01) == 1e-6  # cached
    fresh = measure_matmul_tflops("fp32", "cpu", n=128, min_seconds=0.01, refresh=True)
    assert fresh > 1e-6 and metrics._measured[key] == fresh
    monkeypatch.setitem(metrics._measured, key, 1e6)
    assert measure_matmul_tflops("fp32", "cpu", n=128, min_seconds=0.01, refresh=True) == 1e6


def test_mfu_is_never_above_one_and_a_low_measured_peak_is_raised(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The start-up probe ran while the cores were busy (1 TFLOP/s); re-measuring finds 1.5.
    calls: list[bool] = []

    def fake(precision: str, device: object, *a: object, refresh: bool = False, **kw: object) -> float:
        calls.append(refresh)
        return 1.5 if refresh else 1.0

    monkeypatch.setattr(metrics, "measure_matmul_tflops", fake)
    meter = MfuMeter("fp32", torch.device("cpu"), world=2)
    assert meter.measured and meter.peak == 2e12 and calls == [False]
    assert meter(1e12) == pytest.approx(0.5)
    with caplog.at_level("INFO", logger="smelt.train.metrics"):
        assert meter(2.4e12) == pytest.approx(2.4 / 3.0)  # above 2 TFLOP/s: re-measured, peak 2 x 1.5
        assert calls == [False, True] and meter.peak == pytest.approx(3e12)
        assert meter(5e12) == 1.0  # above the re-measured peak too: the peak becomes what was achieved
        assert meter.peak == pytest.approx(5e12) and meter(4e12) == pytest.approx(0.8)
        for _ in range(5):
            assert meter(1e13) == 1.0
    assert calls.count(True) == 3  # at most max_remeasures probes, then only raised
    assert sum("above the measured" in r.message for r in caplog.records) == 1  # logged once


def test_mfu_with_a_configured_peak_is_clamped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    meter = MfuMeter("bf16", torch.device("cpu"), peak_tflops=1.0)
    assert not meter.measured and meter.peak == 1e12
    with caplog.at_level("WARNING", logger="smelt.train.metrics"):
        assert meter(0.25e12) == pytest.approx(0.25)
        assert [meter(x) for x in (2e12, 3e12, 0.5e12)] == [1.0, 1.0, pytest.approx(0.5)]
    assert meter.peak == 1e12  # a configured peak is the user's: not changed
    warnings = [r for r in caplog.records if "train.peak_tflops" in r.message]
    assert len(warnings) == 1 and "100%" in warnings[0].message
