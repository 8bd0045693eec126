"""NaN/Inf guard, spike detector (window sigma and EMA ratio, warm-up), policies, state round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from smelt.config import StabilityConfig
from smelt.train.stability import SpikeDetector, StabilityGuard, TrainingDiverged


def _noisy(n: int, seed: int = 0, level: float = 3.0, noise: float = 0.02) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(level + noise * x) for x in rng.standard_normal(n)]


def test_no_spike_during_warmup() -> None:
    det = SpikeDetector(window=10, sigma=6.0, ema_ratio=3.0)
    for loss in _noisy(9):
        assert det.check(loss)[0] is False
        det.update(loss)
    assert not det.warmed_up
    assert det.check(1000.0)[0] is False  # 9 < window points: not judged yet
    det.update(3.0)
    assert det.warmed_up
    assert det.check(1000.0)[0] is True


def test_sigma_rule_and_ema_rule() -> None:
    det = SpikeDetector(window=20, sigma=6.0, ema_ratio=3.0)
    for loss in _noisy(20):
        det.update(loss)
    mean, std = np.mean(det.losses), np.std(det.losses, ddof=1)
    spike, thr, reason = det.check(mean + 7 * std)
    assert spike and thr == pytest.approx(mean + 6 * std) and "sigma" in reason
    assert det.check(mean + 5 * std)[0] is False
    # Large noise makes the sigma threshold loose; the EMA ratio still catches a big jump.
    wide = SpikeDetector(window=20, sigma=6.0, ema_ratio=3.0)
    for loss in _noisy(20, noise=2.0, level=5.0):
        wide.update(abs(loss))
    spike, thr, reason = wide.check(100.0)
    assert spike
    big = wide.check(4 * wide.ema)
    assert big[0] and (("EMA" in big[2]) or ("sigma" in big[2]))


def test_falling_loss_is_not_a_spike() -> None:
    # Early training: the loss falls fast; neither rule should fire on the way down.
    det = SpikeDetector(window=5, sigma=6.0, ema_ratio=3.0)
    for step in range(200):
        loss = 10.0 * math.exp(-step / 20) + 2.0
        assert det.check(loss)[0] is False, step
        det.update(loss)


def _guard(**kw) -> StabilityGuard:
    kw.setdefault("spike_window", 5)
    return StabilityGuard(StabilityConfig(**kw))


def _warm(g: StabilityGuard, n: int = 5) -> int:
    for step, loss in enumerate(_noisy(n)):
        assert g.check(step, loss, 1.0).action == "ok"
    return n


@pytest.mark.parametrize("loss,grad,kind", [(float("nan"), 1.0, "nan_loss"), (float("inf"), 1.0, "nan_loss"),
                                            (3.0, float("nan"), "nan_grad"), (3.0, float("inf"), "nan_grad")])
def test_non_finite_is_skipped_from_the_first_step(loss: float, grad: float, kind: str) -> None:
    g = _guard(spike_policy="skip")
    d = g.check(0, loss, grad)  # before warm-up: the NaN guard does not wait
    assert d.action == "skip" and d.event.kind == kind
    assert g.counters.skipped == 1 and getattr(g.counters, kind) == 1
    json.dumps(d.event.to_json())  # NaN/Inf encoded as strings: valid JSON


def test_nan_guard_off_lets_nan_through() -> None:
    g = _guard(nan_guard=False, spike_policy="none")
    assert g.check(0, float("nan"), float("nan")).action == "ok"


def test_spike_skip_and_statistics_untouched() -> None:
    g = _guard(spike_policy="skip")
    n = _warm(g)
    before = list(g.detector.losses)
    d = g.check(n, 50.0, 1.0)
    assert d.action == "skip" and d.event.kind == "spike" and d.event.threshold is not None
    assert list(g.detector.losses) == before  # a rejected loss never enters the window
    assert g.check(n + 1, 3.0, 1.0).action == "ok"
    assert g.summary() == {"nan_loss": 0, "nan_grad": 0, "spikes": 1, "skipped": 1, "rolled_back": 0, "level_shifts": 0}


def test_policy_none_ignores_spikes_but_not_nans() -> None:
    g = _guard(spike_policy="none")
    n = _warm(g)
    assert g.check(n, 50.0, 1.0).action == "ok"
    assert g.check(n + 1, float("nan"), 1.0).action == "skip"


def test_rollback_policy_and_fallback_without_checkpoint() -> None:
    g = _guard(spike_policy="rollback", max_rollbacks=1, rollback_lr_scale=0.25, rollback_lr_steps=10)
    n = _warm(g)
    d = g.check(n, 50.0, 1.0, can_rollback=False)
    assert d.action == "skip" and "no checkpoint" in d.event.reason
    assert g.check(n + 1, float("nan"), 1.0, can_rollback=True).action == "rollback"
    g.start_rollback_lr(resume_step=4)
    assert g.lr_scale(4) == 0.25 and g.lr_scale(13) == 0.25 and g.lr_scale(14) == 1.0
    with pytest.raises(TrainingDiverged, match="max_rollbacks"):
        g.check(n + 2, 50.0, 1.0, can_rollback=True)
    assert g.counters.rolled_back == 2 and g.counters.skipped == 1


def test_state_round_trip_gives_same_decisions() -> None:
    a = _guard(spike_policy="skip")
    losses = _noisy(30, seed=3)
    for s, loss in enumerate(losses[:15]):
        a.check(s, loss, 1.0)
    a.check(15, 99.0, 1.0)
    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as in trainer_state.json
    b = _guard(spike_policy="skip")
    b.load_state_dict(state)
    assert b.summary() == a.summary() and len(b.events) == 1
    for s, loss in enumerate(losses[15:] + [80.0], start=16):
        assert a.check(s, loss, 1.0).action == b.check(s, loss, 1.0).action
    assert a.detector.ema == b.detector.ema


def test_rollback_restore_keeps_history() -> None:
    g = _guard(spike_policy="rollback")
    _warm(g)
    saved = g.state_dict()
    g.check(10, 99.0, 1.0)
    g.load_state_dict(saved, keep_history=True)
    assert g.counters.rolled_back == 1 and len(g.events) == 1
    assert list(g.detector.losses) == saved["detector"]["losses"]


def test_a_spike_streak_becomes_the_new_loss_level() -> None:
    """A lasting jump of the loss is skipped max_consecutive_skips times, then accepted as the new
    level with fresh statistics: without the cap a skip never changes the model, so it would skip forever."""
    g = StabilityGuard(StabilityConfig(spike_window=5, max_consecutive_skips=3))
    rng = np.random.default_rng(0)
    for step in range(1, 11):
        assert g.check(step, 2.0 + 0.01 * rng.standard_normal(), 1.0).action == "ok"
    actions = [g.check(step, 3.0, 1.0).action for step in range(11, 20)]
    assert actions == ["skip", "skip", "skip", "ok", "ok", "ok", "ok", "ok", "ok"]
    assert g.summary()["skipped"] == 3 and g.summary()["level_shifts"] == 1
    shift = g.events[-1]
    assert shift.step == 14 and shift.action == "ok" and "new loss level" in shift.reason
    # The new level is the reference now: a real spike above it is caught again.
    assert g.check(20, 30.0, 1.0).action == "skip"
    # A single spike between good steps does not count towards the streak.
    g2 = StabilityGuard(StabilityConfig(spike_window=5, max_consecutive_skips=1))
    for step in range(1, 8):
        g2.check(step, 2.0 + 0.01 * (step % 2), 1.0)
    assert [g2.check(s, x, 1.0).action for s, x in ((8, 9.0), (9, 2.0), (10, 9.0))] == ["skip", "ok", "skip"]


def test_a_non_finite_streak_stops_training() -> None:
    g = StabilityGuard(StabilityConfig(max_consecutive_skips=2))
    assert [g.check(s, math.nan, 1.0).action for s in (1, 2)] == ["skip", "skip"]
    with pytest.raises(TrainingDiverged, match="3 updates in a row skipped"):
        g.check(3, math.nan, 1.0)


def test_streak_survives_a_state_round_trip() -> None:
    cfg = StabilityConfig(spike_window=5, max_consecutive_skips=2)
    g = StabilityGuard(cfg)
    for step in range(1, 8):
        g.check(step, 2.0 + 0.01 * (step % 2), 1.0)
    assert g.check(8, 9.0, 1.0).action == "skip"
    h = StabilityGuard(cfg)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert [h.check(s, 9.0, 1.0).action for s in (9, 10)] == ["skip", "ok"]
