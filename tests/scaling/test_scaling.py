"""smelt.scaling against published figures (LLaMA-1 sizes, ZeRO's memory table, GPT-3's compute,
Korthikanti et al.'s activation formulas), fits that recover known laws, and a tiny sweep end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from smelt.config import RecipeError, parse_recipe
from smelt.model.config import ModelConfig, preset
from smelt.model.flops import ModelMemory, activation_memory, model_memory, param_count
from smelt.scaling.fit import fit_isoflop, fit_points, format_fit, plot_fit
from smelt.scaling.plan import (
    GB,
    PlanInputs,
    activation_bytes_per_gpu,
    compute_optimal,
    format_plan,
    make_plan,
    parse_count,
    shard_model_states,
)
from smelt.scaling.points import Point, PointsError, read_points, write_points

# --------------------------------------------------------------------------------------------
# plan: published figures


@pytest.mark.parametrize("name, params", [
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320),   # Touvron et al. 2023; HF checkpoints
    ("llama-33b", 32_528_943_616), ("llama-65b", 65_285_660_672),
])
def test_plan_llama_parameter_counts_exact(name: str, params: int) -> None:
    plan = make_plan(preset(name), PlanInputs(tokens=1e12, gpus=64))
    assert plan.params["total"] == params
    assert plan.params["embedding"] == 32000 * preset(name).dim  # untied: the output head is not embedding
    assert plan.params["non_embedding"] == params - plan.params["embedding"]


def test_zero_paper_memory_table() -> None:
    """Rajbhandari et al. 2020, Figure 1: Psi = 7.5B, N_d = 64, K = 12 (mixed-precision Adam)."""
    psi = 7.5e9
    mem = ModelMemory(params=round(2 * psi), grads=round(2 * psi), optimizer=round(12 * psi))
    expect = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for zero, gb in expect.items():
        assert shard_model_states(mem, zero, dp=64).total / GB == pytest.approx(gb, abs=0.05)
    # model_memory gives the same 2 + 2 + 12 bytes per parameter for bf16 parameters with AdamW
    cfg = preset("llama-7b")
    m = model_memory(cfg, "adamw", "bf16")
    n = param_count(cfg)
    assert (m.params, m.grads, m.optimizer) == (2 * n, 2 * n, 12 * n)


def _gpt3() -> ModelConfig:
    # Brown et al. 2020, Table 2.1: 96 layers, d 12288, 96 heads, context 2048, vocab 50257 (GPT-2 BPE).
    return ModelConfig(vocab_size=50257, dim=12288, n_layers=96, n_heads=96, max_seq_len=2048, mlp="gelu",
                       norm="layernorm", bias=True, pos_emb="learned", tie_embeddings=True)


def test_gpt3_training_compute() -> None:
    """Brown et al. 2020, Table D.1: 3.14e23 FLOPs for 175B parameters on 300B tokens (6ND)."""
    plan = make_plan(_gpt3(), PlanInputs(tokens=300e9, gpus=1024, tp=8, pp=8, seq_len=2048))
    assert plan.params["total"] == pytest.approx(175e9, rel=0.005)
    assert plan.compute["total_flops_6nd"] == pytest.approx(3.14e23, rel=0.005)
    # PaLM's count adds attention: 12 L H Q T = 2.9e10 per token, +2.8%
    assert plan.compute["total_flops"] / plan.compute["total_flops_6nd"] == pytest.approx(1.028, abs=0.003)


def test_korthikanti_activation_formulas_gpt3_config() -> None:
    """Korthikanti et al. 2022, Table 2 (per-layer bytes) at their Table 3 GPT-3 175B config:
    a 96, h 12288, s 2048, b 1, t 8 (GPT block: LayerNorm, GELU 4h MLP, dropout, scores materialized)."""
    cfg = _gpt3()
    s, b, h, a, t, L = 2048, 1, 12288, 96, 8, 96
    sbh = s * b * h
    kw = dict(fused_attention=False, dropout=True)
    assert activation_memory(cfg, b, s, "fp16", **kw) - activation_memory(
        cfg.model_copy(update={"n_layers": 95}), b, s, "fp16", **kw) == sbh * (34 + 5 * a * s / h)

    def per_layer(**k: object) -> float:
        full = activation_bytes_per_gpu(cfg, b, s, "fp16", tp=t, **kw, **k)  # type: ignore[arg-type]
        one = activation_bytes_per_gpu(cfg.model_copy(update={"n_layers": 95}), b, s, "fp16", tp=t, **kw, **k)  # type: ignore[arg-type]
        return full - one

    assert per_layer(sequence_parallel=False) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-9)
    assert per_layer(sequence_parallel=True) == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)), rel=1e-9)
    # full recomputation keeps each layer's input, sbh/t of fp16 under sequence parallelism (2 sbh / t bytes)
    assert per_layer(checkpointing="full") == pytest.approx(2 * sbh / t, rel=1e-9)
    # the whole model, TP 8 + SP, no recomputation: 96 x 14.25 sbh = 34.4 GB; 1F1B over 8 stages keeps the same
    total = activation_bytes_per_gpu(cfg, b, s, "fp16", tp=t, pp=8, **kw)
    assert total == pytest.approx(L * sbh * (34 / t + 5 * a * s / (h * t)), rel=0.01)


def test_plan_llama7b_on_64_h100() -> None:
    inp = PlanInputs(tokens=parse_count("1T"), gpus=64, device="h100", mfu=0.4, price_per_gpu_hour=2.0)
    plan = make_plan(preset("llama-7b"), inp)
    assert plan.compute["total_flops"] == pytest.approx(4.286e22, rel=1e-3)
    assert plan.time["gpu_hours"] == pytest.approx(4.286e22 / (989e12 * 0.4) / 3600, rel=1e-3)
    assert plan.time["cost"] == pytest.approx(2.0 * plan.time["gpu_hours"])
    assert not plan.memory["fits"] and plan.advice  # ZeRO-0 bf16 AdamW: 108 GB of states
    assert any("ZeRO-1" in a for a in plan.advice)
    assert plan.data["tokens_per_param"] == pytest.approx(148.4, abs=0.1)
    z3 = make_plan(preset("llama-7b"), PlanInputs(tokens=1e12, gpus=64, zero=3))
    assert z3.memory["fits"]
    text = format_plan(plan)
    assert "6,738,415,616" in text and "DOES NOT FIT" in text


def test_plan_kv_cache_and_law() -> None:
    cfg = preset("llama-7b")
    plan = make_plan(cfg, PlanInputs(tokens=1e12, kv_batch=8, kv_len=4096, zero=3, gpus=8,
                                     law={"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}))
    assert plan.memory["kv_cache"]["bytes"] == 2 * 32 * 32 * 128 * 8 * 4096 * 2  # K, V x layers x heads x dims
    assert plan.law is not None
    n, d = plan.law["n_opt"], plan.law["d_opt"]
    assert 6 * n * d == pytest.approx(plan.law["flops_6nd"])
    assert plan.law["loss_at_opt"] <= plan.law["loss"]


def test_plan_errors() -> None:
    with pytest.raises(ValueError, match="multiple of tp"):
        make_plan(preset("llama-7b"), PlanInputs(tokens=1e9, gpus=6, tp=4))
    with pytest.raises(ValueError, match="unknown device"):
        make_plan(preset("llama-7b"), PlanInputs(tokens=1e9, device="tpu"))
    with pytest.raises(ValueError, match="vocab_size"):
        make_plan(preset("debug"), PlanInputs(tokens=1e9))
    assert parse_count("300B") == 3e11 and parse_count("2.5M") == 2.5e6 and parse_count("1e21") == 1e21


# --------------------------------------------------------------------------------------------
# fits

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, Eq. 10


def _law(n: float, d: float, law: dict[str, float] = CHINCHILLA) -> float:
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def _synthetic(noise: float, seed: int = 0) -> list[Point]:
    rng = np.random.default_rng(seed)
    pts = []
    for c in np.geomspace(1e18, 1e22, 5):
        for n in np.geomspace(1e7, 1e10, 9):
            d = c / (6 * n)
            pts.append(Point(params=n, tokens=d, loss=_law(n, d) * math.exp(rng.normal(0, noise)), budget=c))
    return pts


def test_approach3_recovers_chinchilla_law() -> None:
    res = fit_points(_synthetic(noise=0.01), bootstrap=8, seed=0)
    assert res["E"] == pytest.approx(1.69, abs=0.03)
    assert res["alpha"] == pytest.approx(0.34, abs=0.03)
    assert res["beta"] == pytest.approx(0.28, abs=0.02)
    assert res["A"] == pytest.approx(406.4, rel=0.3) and res["B"] == pytest.approx(410.7, rel=0.2)
    assert res["a"] == pytest.approx(0.28 / 0.62, abs=0.02)
    assert res["bootstrap"] == 8
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        lo, hi = res["ci"][k]
        assert lo < hi and hi - lo < abs(res[k]), k  # A is the least determined (Besiroglu et al. 2024)
    exact = fit_points(_synthetic(noise=0.0), bootstrap=0)
    for k, v in CHINCHILLA.items():
        assert exact[k] == pytest.approx(v, rel=1e-3), k
    assert "approach 3" in format_fit(res)


def test_fit_is_deterministic() -> None:
    pts = _synthetic(noise=0.02, seed=3)
    a = fit_points(pts, bootstrap=5, seed=7)
    b = fit_points(pts, bootstrap=5, seed=7)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_approach2_recovers_exponent() -> None:
    """IsoFLOP parabolas on points around each budget's true optimum: N_opt ~ C^(beta/(alpha+beta))."""
    pts = []
    for c in np.geomspace(1e18, 1e22, 5):
        n_opt, _ = compute_optimal(CHINCHILLA, c)
        for n in n_opt * np.geomspace(1 / 4, 4, 7):
            pts.append(Point(params=n, tokens=c / (6 * n), loss=_law(n, c / (6 * n))))  # no budget column
    a2 = fit_isoflop(pts)
    assert len([p for p in a2["profiles"] if p.get("n_opt")]) == 5
    assert a2["a"] == pytest.approx(0.28 / 0.62, abs=0.01)
    assert a2["b"] == pytest.approx(0.34 / 0.62, abs=0.01)


def test_points_csv_round_trip_and_user_files(tmp_path: Path) -> None:
    pts = _synthetic(noise=0.0)[:6]
    write_points(tmp_path / "p.csv", pts)
    back = read_points(tmp_path / "p.csv")
    assert [round(p.params) for p in back] == [round(p.params) for p in pts]
    assert back[0].budget == pytest.approx(pts[0].budget)
    # published-style file: params, flops, loss only (D = C / 6N), with a comment line
    (tmp_path / "pub.csv").write_text("# from a paper\nparams,flops,loss\n1e8,6e18,3.0\n")
    (p,) = read_points(tmp_path / "pub.csv")
    assert p.tokens == pytest.approx(1e10)
    (tmp_path / "bad.csv").write_text("params,loss\n1,2\n")
    with pytest.raises(PointsError, match="tokens or flops"):
        read_points(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("params,tokens,loss\n1e6,-5,3\n")
    with pytest.raises(PointsError, match="row 2"):
        read_points(tmp_path / "bad2.csv")


def test_plots(tmp_path: Path) -> None:
    pts = _synthetic(noise=0.01)
    paths = plot_fit(pts, fit_points(pts, bootstrap=0), tmp_path)
    assert [p.name for p in paths] == ["fit_loss_vs_params.png", "isoflop.png", "frontier.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------------------------
# sweep, end to end on a tiny ladder


def _tiny_recipe(root: Path, mode: str) -> object:
    return parse_recipe({
        "name": "t", "runs_dir": str(root / "runs"), "loader": {"seq_len": 32}, "model": {"preset": "debug"},
        "train": {"threads": 1, "log_every": 5, "eval_batches": 2, "tensorboard": False,
                  "batch": {"global_batch": 8, "micro_batch": 8}, "optim": {"lr": 3e-3},
                  "schedule": {"warmup_steps": 5}, "checkpoint": {"every": 1000, "keep": 2}},
        "scaling": {"budgets": [1e9, 2e9], "depths": [1, 2], "head_dim": 16, "min_steps": 4, "mode": mode}})


@pytest.mark.parametrize("mode", ["wsd", "isoflop"])
def test_sweep_end_to_end(tmp_path: Path, mode: str) -> None:
    from smelt.scaling.sweep import format_sweep, plan_sweep, run_sweep

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.train.test_trainer import _write_tokens

    run = tmp_path / "runs" / "t"
    (run / "tokens").mkdir(parents=True)
    _write_tokens(run / "tokens")
    recipe = _tiny_recipe(tmp_path, mode)
    runs = plan_sweep(recipe, run)  # type: ignore[arg-type]
    assert [(r.size, r.steps) for r in runs] == [("L1-d32", 30), ("L1-d32", 60), ("L2-d64", 5), ("L2-d64", 11)]
    assert "total training tokens" in format_sweep(runs)
    pts = run_sweep(recipe, run)  # type: ignore[arg-type]
    assert len(pts) == 4
    back = read_points(run / "scaling" / "points.csv")
    assert [(p.size, p.tokens) for p in back] == [("L1-d32", 30 * 256), ("L1-d32", 60 * 256),
                                                  ("L2-d64", 5 * 256), ("L2-d64", 11 * 256)]
    assert all(0 < p.loss < math.log(128) + 1 for p in back)
    assert all(math.isclose(p.flops, 6 * p.params * p.tokens) for p in back)
    dirs = {p.run_dir for p in back}
    assert all((run / "scaling" / d / "recipe.yaml").is_file() for d in dirs)
    if mode == "wsd":
        assert dirs == {"L1-d32", "L2-d64"}
        assert (run / "scaling" / "L1-d32" / "train" / "branches" / "max_steps-30" / "manifest.json").is_file()
        # longer training at the same size: lower loss
        assert back[1].loss < back[0].loss
    else:
        assert len(dirs) == 4
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "scaling").rglob("manifest.json")}
    again = run_sweep(recipe, run)  # type: ignore[arg-type]
    assert len(again) == 4
    assert {p: p.stat().st_mtime_ns for p in (run / "scaling").rglob("manifest.json")} == mtimes
    if mode == "wsd":  # the report's section: points, then the fit and its plots once fitted
        from smelt.report import write_report

        assert "smelt scaling fit" in write_report(run).read_text()
        pts = _synthetic(noise=0.01)  # 4 tiny points are too few for 5 parameters: fit published-like ones
        res = fit_points(pts, bootstrap=6)  # the bootstrap laws give the check's interval
        (run / "scaling" / "fit.json").write_text(json.dumps(res))
        plot_fit(pts, res, run / "scaling")
        html = write_report(run).read_text()
        assert "Scaling laws" in html and "approach 3" in html and html.count("data:image/png") >= 3
        _check_run(recipe, run)


def _check_run(recipe: object, run: Path) -> None:
    """`smelt scaling check`: one run at a budget above the sweep's, its loss beside the prediction."""
    from smelt.scaling.sweep import format_check, plan_check, run_check

    fit = json.loads((run / "scaling" / "fit.json").read_text())
    auto = plan_check(recipe, run, 4e9, fit=fit)  # type: ignore[arg-type]
    assert auto.name.startswith("check-C4e09-L") and auto.steps >= 4
    assert plan_check(recipe, run, 4.5e9, depth=1).name == "check-C4.5e09-L1-d32"  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="epochs of the data"):  # more tokens than the data holds: before training
        plan_check(recipe, run, 1e12, depth=1)  # type: ignore[arg-type]
    rec = run_check(recipe, run, 4e9, depth=1)  # type: ignore[arg-type]
    assert rec["run_dir"] == "check-C4e09-L1-d32" and rec["tokens"] == rec["steps"] * 256 > 60 * 256
    assert 0 < rec["achieved"] < math.log(128) + 1
    lo, hi = rec["interval"]  # the synthetic law is far from these tiny runs: only the record's shape is checked
    assert lo < hi
    assert rec["within_interval"] == (lo <= rec["achieved"] <= hi)
    assert rec["largest_swept_budget"] == 2e9
    assert "achieved" in format_check(rec)
    manifest = run / "scaling" / rec["run_dir"] / "train" / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    again = run_check(recipe, run, 4e9, depth=1)  # type: ignore[arg-type]
    assert again["achieved"] == rec["achieved"] and manifest.stat().st_mtime_ns == mtime  # read back, not retrained
    assert len(json.loads((run / "scaling" / "checks.json").read_text())) == 1


def test_predict_interval_covers_the_true_law() -> None:
    from smelt.scaling.fit import law_loss, predict

    pts = _synthetic(noise=0.005)
    res = fit_points(pts, bootstrap=30)
    assert len(res["samples"]) == res["bootstrap"] > 20
    n, d = max(p.params for p in pts) * 3, max(p.tokens for p in pts) * 3  # beyond every point
    pred = predict(res, n, d)
    lo, hi = pred["interval"]
    assert lo <= pred["loss"] <= hi
    truth = law_loss(CHINCHILLA, n, d)
    assert pred["loss"] == pytest.approx(truth, rel=0.01)  # 0.5% noise on the points; extrapolated 3x
    assert hi - lo < 0.02 * truth and lo - 0.01 * truth <= truth <= hi + 0.01 * truth
    assert pred["residual_band"][0] < pred["loss"] < pred["residual_band"][1]


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_plan_and_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from smelt.cli import main

    assert main(["plan", "--preset", "llama-7b", "--tokens", "1T", "--gpus", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["total"] == 6_738_415_616 and plan["inputs"]["dp"] == 64
    write_points(tmp_path / "points.csv", _synthetic(noise=0.01))
    assert main(["scaling", "fit", str(tmp_path / "points.csv"), "--json", "--bootstrap", "3", "--no-plots"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "ci"} <= set(fit)
    assert json.loads((tmp_path / "fit.json").read_text())["E"] == fit["E"]
    assert main(["plan", "--preset", "llama-7b", "--tokens", "1T", "--law", str(tmp_path / "fit.json")]) == 0
    assert "compute-optimal" in capsys.readouterr().out
    assert main(["plan"]) == 2
    assert main(["plan", "--preset", "llama-7b", "--tokens", "1T", "--gpus", "6", "--tp", "4"]) == 2
    assert "multiple of tp" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("params,loss\n1,2\n")
    assert main(["scaling", "fit", str(tmp_path / "bad.csv")]) == 2
