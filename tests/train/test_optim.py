"""Optimizer groups, AdamW against a reference implementation, LR schedules, batch ramp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smelt.config import BatchConfig, OptimConfig, ScheduleConfig
from smelt.train.optim import batch_size_at, build_optimizer, grad_accum_steps, lr_at, param_groups, set_lr


class Tiny(nn.Module):
    """Embedding, a biased linear, a norm and an (optionally tied) output head."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(11, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8, bias=True)])
        self.norm = nn.LayerNorm(8)
        self.output = nn.Linear(8, 11, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(self.layers[0](self.tok_embeddings(x))))


def _names(groups: list[dict]) -> dict[str, set[str]]:
    return {g["name"]: set(g["param_names"]) for g in groups}


def test_groups_decay_only_matrices() -> None:
    g = _names(param_groups(Tiny(), OptimConfig()))
    assert g["decay"] == {"layers.0.weight"}
    assert g["no_decay"] == {"tok_embeddings.weight", "layers.0.bias", "norm.weight", "norm.bias", "output.weight"}


def test_groups_decay_embeddings_and_tied_output() -> None:
    g = _names(param_groups(Tiny(), OptimConfig(decay_embeddings=True)))
    assert g["decay"] == {"layers.0.weight", "tok_embeddings.weight", "output.weight"}
    tied = Tiny(tied=True)
    groups = param_groups(tied, OptimConfig())
    all_params = [p for grp in groups for p in grp["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(tied.parameters()))
    assert "tok_embeddings.weight" in _names(groups)["no_decay"]


def test_optimizer_weight_decay_per_group() -> None:
    opt = build_optimizer(Tiny(), OptimConfig(weight_decay=0.1))
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def _reference_adamw(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor]], lrs: list[float],
                     wds: list[float], betas: tuple[float, float], eps: float) -> list[torch.Tensor]:
    """AdamW as written in Loshchilov & Hutter 2019, Algorithm 2 (decoupled decay scaled by lr)."""
    b1, b2 = betas
    ps = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, (p, g) in enumerate(zip(ps, grads)):
            g = g.double()
            p.mul_(1 - lr * wds[i])
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            p.sub_(lr * mhat / (vhat.sqrt() + eps))
    return ps


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_reference_trajectory(fused: bool) -> None:
    torch.manual_seed(0)
    model = Tiny()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused)
    opt = build_optimizer(model, cfg)
    named = dict(model.named_parameters())
    order = [n for g in opt.param_groups for n in g["param_names"]]
    wds = [g["weight_decay"] for g in opt.param_groups for _ in g["param_names"]]
    start = [named[n].detach().clone() for n in order]
    lrs = [1e-2 * (k + 1) / 5 for k in range(8)]  # a changing LR, as the schedule sets it
    grads_log = []
    for lr in lrs:
        x = torch.randint(0, 11, (4, 5))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        grads_log.append([named[n].grad.detach().clone() for n in order])
        set_lr(opt, lr)
        opt.step()
    ref = _reference_adamw(start, grads_log, lrs, wds, cfg.betas, cfg.eps)
    for n, r in zip(order, ref):
        torch.testing.assert_close(named[n].detach().double(), r, rtol=1e-5, atol=1e-6, msg=n)
    # The no-decay group really is not decayed: with zero gradients AdamW leaves it unchanged.
    norm_before = model.norm.weight.detach().clone()
    lin_before = model.layers[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.state.clear()
    opt.step()
    assert torch.equal(model.norm.weight, norm_before)
    assert not torch.equal(model.layers[0].weight, lin_before)


def test_adafactor_selectable_and_steps() -> None:
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(name="adafactor", lr=1e-2))
    assert type(opt).__name__ == "Adafactor"
    before = model.layers[0].weight.detach().clone()
    x = torch.randint(0, 11, (4, 5))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    assert not torch.equal(model.layers[0].weight, before)
    assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay"}


# --------------------------------------------------------------------------------------------
# schedules: warmup 10, 101 steps (last step 100, decay progress (s - 10) / 90), peak 1, min 0.1


def _s(kind: str, **kw) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, warmup_steps=kw.pop("warmup", 10), min_lr_ratio=0.1, **kw)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd", "inv_sqrt"])
def test_warmup_is_linear_to_peak(kind: str) -> None:
    cfg = _s(kind)
    assert lr_at(0, cfg, 101, 1.0) == pytest.approx(0.1)
    assert lr_at(4, cfg, 101, 1.0) == pytest.approx(0.5)
    assert lr_at(9, cfg, 101, 1.0) == pytest.approx(1.0)  # warmup end: the peak
    # First post-warmup step: the peak, except inverse square root, which decays from step W - 1.
    assert lr_at(10, cfg, 101, 1.0) == pytest.approx(math.sqrt(10 / 11) if kind == "inv_sqrt" else 1.0)


def test_cosine_key_steps() -> None:
    cfg = _s("cosine")
    assert lr_at(55, cfg, 101, 1.0) == pytest.approx(0.55)  # middle: halfway between peak and min
    assert lr_at(100, cfg, 101, 1.0) == pytest.approx(0.1)  # last step: exactly min
    assert lr_at(32, cfg, 101, 1.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 90)))
    values = [lr_at(s, cfg, 101, 1.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant_key_steps() -> None:
    lin = _s("linear")
    assert lr_at(55, lin, 101, 2.0) == pytest.approx(1.1)
    assert lr_at(100, lin, 101, 2.0) == pytest.approx(0.2)
    const = _s("constant")
    assert [lr_at(s, const, 101, 3e-4) for s in (10, 55, 100)] == [3e-4] * 3


def test_wsd_plateau_then_decay() -> None:
    cfg = _s("wsd", decay_fraction=0.2)  # decay: the last round(0.2 * 101) = 20 steps, from step 81
    assert lr_at(50, cfg, 101, 1.0) == 1.0
    assert lr_at(80, cfg, 101, 1.0) == 1.0  # last plateau step
    assert lr_at(81, cfg, 101, 1.0) == pytest.approx(1.0)  # decay start
    assert lr_at(82, cfg, 101, 1.0) < 1.0
    assert lr_at(100, cfg, 101, 1.0) == pytest.approx(0.1)  # end: min
    assert lr_at(90, cfg, 101, 1.0) == pytest.approx(1.0 - 0.9 * 9 / 19)


def test_inverse_sqrt() -> None:
    cfg = _s("inv_sqrt")
    assert lr_at(39, cfg, 101, 1.0) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert lr_at(99, cfg, 101, 1.0) == pytest.approx(math.sqrt(0.1))
    assert lr_at(0, _s("inv_sqrt", warmup=0), 101, 1.0) == pytest.approx(1.0)


def test_no_warmup_and_tiny_runs() -> None:
    assert lr_at(0, _s("cosine", warmup=0), 101, 1.0) == pytest.approx(1.0)
    assert lr_at(0, _s("cosine", warmup=0), 1, 1.0) == pytest.approx(0.1)  # one step: it is the last
    assert lr_at(4, _s("cosine", warmup=100), 5, 1.0) == pytest.approx(1.0)  # warmup clipped to the run
    with pytest.raises(ValueError):
        lr_at(-1, _s("cosine"), 10, 1.0)


# --------------------------------------------------------------------------------------------
# batch ramp


def test_batch_without_ramp() -> None:
    cfg = BatchConfig(global_batch=32, micro_batch=4)
    assert batch_size_at(0, cfg, 4, 2) == 32
    assert grad_accum_steps(32, 4, 2) == 4
    with pytest.raises(ValueError, match="global_batch"):
        batch_size_at(0, BatchConfig(global_batch=30, micro_batch=4), 4, 2)


def test_batch_ramp_linear_in_tokens_rounded_to_micro_times_world() -> None:
    cfg = BatchConfig(global_batch=64, micro_batch=4, ramp_start=8, ramp_tokens=1000)
    assert batch_size_at(0, cfg, 4, 2) == 8
    assert batch_size_at(500, cfg, 4, 2) == 32  # 8 + 56 * 0.5 = 36 -> 32 (multiple of 8)
    assert batch_size_at(250, cfg, 4, 2) == 16  # 22 -> 16
    assert batch_size_at(1000, cfg, 4, 2) == 64
    assert batch_size_at(10**9, cfg, 4, 2) == 64
    sizes = [batch_size_at(t, cfg, 4, 2) for t in range(0, 1200, 50)]
    assert all(s % 8 == 0 and 8 <= s <= 64 for s in sizes)
    assert sizes == sorted(sizes)
    # A ramp start below one micro-batch per rank still gives one.
    low = BatchConfig(global_batch=64, micro_batch=4, ramp_start=1, ramp_tokens=1000)
    assert batch_size_at(0, low, 4, 2) == 8
    assert grad_accum_steps(16, 4, 2) == 2
