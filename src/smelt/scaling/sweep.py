"""`smelt scaling sweep RECIPE`: a ladder of small training runs for a scaling-law fit.

The ladder (recipe section `scaling:`, `smelt.config.ScalingConfig`):

* **Sizes** from one rule, so that only scale changes along the ladder: a size is a depth L, with
  d_model = ``aspect_ratio`` x L rounded to a multiple of ``head_dim``, n_heads = d_model /
  ``head_dim`` (fixed head width), multi-head attention, and the recipe's other model choices
  (SwiGLU width rule, norm, RoPE, vocabulary). A fixed aspect ratio is what Kaplan et al. 2020
  (Section 3.1, Fig. 5) found to matter little over a wide range, and keeps depth and width growing
  together as in Chinchilla's ladder (Hoffmann et al. 2022, Table A9).
* **Budgets**: for each compute budget C, every size trains D = C / 6N tokens (N: all parameters,
  embeddings included), rounded to whole optimizer steps of the recipe's batch: IsoFLOP profiles
  (Chinchilla approach 2) whose points also feed approach 3. A (size, budget) with fewer than
  ``min_steps`` steps is left out.

Two ways to run it:

* ``mode: isoflop``: one run per (size, budget), in ``<run>/scaling/C<budget>-<size>/``, with the
  recipe's LR schedule stretched to the run's length (Chinchilla's finding: a cosine longer than
  the run overestimates its loss, Hoffmann et al. 2022, Section 3.1 / Fig. A1).
* ``mode: wsd`` (default, cheaper): one run per size, in ``<run>/scaling/<size>/``, with a
  warmup-stable-decay schedule (Hagele et al. 2024). The budgets of a size are taken shortest
  first: the run trains to D_1 (decay included), its loss is recorded, then ``train.max_steps``
  is raised to D_2's steps and the trainer itself branches from the checkpoint it kept at the old
  decay start, continues the stable phase and decays again (`Trainer._schedule_change`; the
  decayed branch is moved to ``train/branches/``, nothing is deleted). A size costs
  D_max + ``decay_fraction`` x (D_1 + ... + D_{k-1}) tokens instead of D_1 + ... + D_k.
  Why this and not ``train.init_from`` from a stable checkpoint: init_from loads weights only, so
  each decay would restart AdamW's moments and the step count (warmup again), which changes the
  decayed loss in a way that depends on D; branching inside the run keeps the optimizer state,
  the data position and the RNG, so each point is exactly the run that would have been trained
  to that length with that schedule.

All runs are ordinary `smelt.train.trainer.train` runs on the recipe's packed tokens (each run
dir's ``tokens`` links to ``<run>/tokens``) with the recipe's loader, batch, optimizer and
precision; each has its own ``recipe.yaml``. The validation loss at the end of each run is its
point. Resume: an interrupted run resumes from its checkpoint (the trainer's own resume), a
finished (size, budget) already in ``points.csv`` is skipped, so the sweep can be re-run until
done. Results: ``<run>/scaling/points.csv`` (`smelt.scaling.points`) and ``sweep.json``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smelt.config import Recipe, RecipeError, ScalingConfig, parse_recipe, recipe_to_dict, write_resolved_recipe
from smelt.fsutil import atomic_write_json, read_json
from smelt.model.config import ModelConfig
from smelt.model.flops import flops_per_token, param_count
from smelt.scaling.points import Point, read_points, write_points
from smelt.train.optim import wsd_decay_start

log = logging.getLogger(__name__)


@dataclass
class SweepRun:
    """One (size, budget) point of the ladder."""

    size: str
    n_layers: int
    dim: int
    n_heads: int
    budget: float
    steps: int
    tokens: int           # steps x global batch x seq_len
    params: int
    params_nonembed: int
    flops_per_token: float
    name: str             # run directory under <run>/scaling/
    warmup: int
    trained_tokens: int   # tokens this point costs (wsd: what the branch adds)


def size_model(base: ModelConfig, depth: int, cfg: ScalingConfig) -> ModelConfig:
    """The ladder's model of ``depth`` layers: ``base`` with width and heads from the rule."""
    dim = max(cfg.head_dim, cfg.head_dim * round(cfg.aspect_ratio * depth / cfg.head_dim))
    fields = {**base.model_dump(), "preset": None, "n_layers": depth, "dim": dim, "n_heads": dim // cfg.head_dim,
              "n_kv_heads": None, "ffn_hidden": None, "moe_experts": 0}
    return ModelConfig.model_validate(fields)


def size_label(m: ModelConfig) -> str:
    return f"L{m.n_layers}-d{m.dim}"


def _vocab(recipe: Recipe, run_dir: Path) -> int:
    manifest = run_dir / "tokens" / "manifest.json"
    if recipe.model is not None and recipe.model.vocab_size is not None:
        return recipe.model.vocab_size
    if manifest.is_file():
        return int(read_json(manifest)["vocab_size"])
    raise RecipeError(f"{manifest} not found (run `smelt pack` first): the vocabulary size sets the model sizes")


def _ladder(recipe: Recipe, run_dir: Path) -> tuple[ScalingConfig, ModelConfig, int, int]:
    """The ladder's settings, base model, sequence length and global batch (recipe checked)."""
    cfg = recipe.scaling or ScalingConfig()
    if recipe.train is None or recipe.loader is None:
        raise RecipeError("invalid recipe:\n  scaling: needs the `loader:` and `train:` sections (batch, optimizer)")
    if recipe.train.batch.ramp_start is not None:
        raise RecipeError("invalid recipe:\n  train.batch.ramp_start: a batch ramp makes D differ from steps x batch; "
                          "turn it off for a sweep")
    base = (recipe.model or ModelConfig()).with_vocab(_vocab(recipe, run_dir))
    return cfg, base, recipe.loader.seq_len, recipe.train.batch.global_batch


def plan_sweep(recipe: Recipe, run_dir: Path) -> list[SweepRun]:
    """Every (size, budget) of the ladder, in the order they run (size by size, shortest first)."""
    cfg, base, seq, batch = _ladder(recipe, run_dir)
    runs: list[SweepRun] = []
    for depth in sorted(set(cfg.depths)):
        m = _size(base, depth, cfg, seq)
        n = param_count(m)
        rows = []
        for c in sorted(set(cfg.budgets)):
            steps = round(c / (6.0 * n) / (batch * seq))
            if steps < cfg.min_steps:
                log.info("scaling: %s at C=%.2e would train %d steps (< scaling.min_steps %d); left out", size_label(m),
                         c, steps, cfg.min_steps)
                continue
            rows.append((c, steps))
        if not rows:
            continue
        warmup = min(recipe.train.schedule.warmup_steps, max(1, int(cfg.max_warmup_fraction * rows[0][1])))
        prev_decay = 0
        for c, steps in rows:
            if cfg.mode == "wsd":
                name = size_label(m)
                sched = recipe.train.schedule.model_copy(update={"warmup_steps": warmup,
                                                                 "decay_fraction": cfg.decay_fraction})
                trained = steps - prev_decay
                prev_decay = wsd_decay_start(sched, steps)
            else:
                name, trained = f"C{c:.0e}-{size_label(m)}".replace("+", ""), steps
            runs.append(_sweep_run(m, c, steps, batch, seq, name, warmup, trained))
    if not runs:
        raise RecipeError("invalid recipe:\n  scaling.budgets: every (size, budget) gives fewer than scaling.min_steps "
                          "steps; raise the budgets or lower the batch")
    _check_samples(recipe, run_dir, runs,
                   "scaling.budgets: lower the largest budget, add data or raise loader.max_epochs")
    return runs


def available_samples(recipe: Recipe, run_dir: Path) -> int | None:
    """Training samples the packed tokens hold under ``loader.max_epochs`` (what the trainer's
    loader will serve before `DataExhausted`); None before `smelt pack`."""
    from smelt.train.build import build_loader

    tokens = Path(run_dir) / "tokens"
    if recipe.loader is None or not (tokens / "manifest.json").is_file():
        return None
    return int(build_loader(tokens, recipe.loader, recipe.seed).total_samples)


def _check_samples(recipe: Recipe, run_dir: Path, runs: list[SweepRun], fix: str) -> None:
    """A RecipeError before any training when a run needs more samples than the data holds: the
    loader would stop it part-way, with a point that is not the planned one."""
    have = available_samples(recipe, run_dir)
    if have is None:
        return
    seq = recipe.loader.seq_len  # type: ignore[union-attr]
    short = [r for r in runs if r.tokens // seq > have]
    if short:
        cap = recipe.loader.max_epochs  # type: ignore[union-attr]
        lines = [f"  {r.name} at C={r.budget:.3g}: {r.tokens // seq:,} samples, {r.tokens // seq / have * cap:.1f} "
                 f"epochs of the data" for r in short]
        raise RecipeError(f"the packed data holds {have:,} training samples of {seq} tokens under "
                          f"loader.max_epochs={cap}, fewer than these runs need:\n" + "\n".join(lines) + f"\n{fix}")


def _size(base: ModelConfig, depth: int, cfg: ScalingConfig, seq: int) -> ModelConfig:
    m = size_model(base, depth, cfg)
    return m.model_copy(update={"max_seq_len": seq}) if seq > m.max_seq_len else m


def _sweep_run(m: ModelConfig, budget: float, steps: int, batch: int, seq: int, name: str, warmup: int,
               trained: int) -> SweepRun:
    return SweepRun(size=size_label(m), n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, budget=budget,
                    steps=steps, tokens=steps * batch * seq, params=param_count(m),
                    params_nonembed=param_count(m, embeddings=False), flops_per_token=flops_per_token(m, seq),
                    name=name, warmup=warmup, trained_tokens=trained * batch * seq)


def run_recipe(recipe: Recipe, run: SweepRun, scaling_dir: Path) -> Recipe:
    """The recipe of one ladder run: the parent's loader, batch, optimizer and precision, the size's
    model, the run's length and schedule; no curation, evaluation or export sections."""
    cfg = recipe.scaling or ScalingConfig()
    tree = recipe_to_dict(recipe)
    base = (recipe.model or ModelConfig())
    model = size_model(base, run.n_layers, cfg)
    tree.update(name=run.name, runs_dir=str(scaling_dir), data=None, tokenizer=None, pack=None, eval=None,
                export=None, scaling=None)
    tree["model"] = {**recipe_to_dict(model), "vocab_size": base.vocab_size,
                     "max_seq_len": max(model.max_seq_len, recipe.loader.seq_len if recipe.loader else 0)}
    tr = tree["train"]
    tr.update(max_steps=run.steps, eval_every=0, init_from=None,
              eval_batches=cfg.eval_batches or tr["eval_batches"])
    tr["schedule"] = {**tr["schedule"], "warmup_steps": run.warmup}
    if cfg.mode == "wsd":
        tr["schedule"].update(kind="wsd", decay_fraction=cfg.decay_fraction)
    return parse_recipe(tree)


def _link_tokens(run_dir: Path, tokens: Path) -> None:
    link = run_dir / "tokens"
    if link.is_symlink() or link.exists():
        return
    link.symlink_to(os.path.relpath(tokens, run_dir), target_is_directory=True)


def _summary_loss(summary: dict[str, Any]) -> float:
    v = summary.get("val_loss")
    if v is not None and math.isfinite(float(v)):
        return float(v)
    return float(summary["final_loss"])


def _branch_summary(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """A wsd point's manifest after the run was extended past it (train/branches/max_steps-N)."""
    for d in sorted((run_dir / "train" / "branches").glob(f"max_steps-{steps}*")):
        m = d / "manifest.json"
        if m.is_file():
            s = read_json(m)
            if s.get("complete") and int(s.get("steps", -1)) == steps:
                return s
    return None


def run_sweep(recipe: Recipe, run_dir: Path, *, source: str | None = None) -> list[Point]:
    """Train every point of the ladder that is not yet in ``points.csv``; returns all points."""
    run_dir = Path(run_dir)
    tokens = run_dir / "tokens"
    if not (tokens / "manifest.json").is_file():
        raise RecipeError(f"{tokens} has no manifest (run `smelt pack` first)")
    cfg = recipe.scaling or ScalingConfig()
    runs = plan_sweep(recipe, run_dir)
    scaling_dir = run_dir / "scaling"
    scaling_dir.mkdir(parents=True, exist_ok=True)
    _warn_repetition(runs, read_json(tokens / "manifest.json"), recipe)
    points_path = scaling_dir / "points.csv"
    points = read_points(points_path) if points_path.is_file() else []
    t_start = time.perf_counter()
    for i, r in enumerate(runs):
        if any(p.run_dir == r.name and p.budget and math.isclose(p.budget, r.budget, rel_tol=1e-6) for p in points):
            log.info("scaling %d/%d: %s C=%.2e done, skipping", i + 1, len(runs), r.name, r.budget)
            continue
        log.info("scaling %d/%d: %s N=%s C=%.2e -> %d steps, %s tokens", i + 1, len(runs), r.name, f"{r.params:,}",
                 r.budget, r.steps, f"{r.tokens:,}")
        summary = _train_point(recipe, r, scaling_dir, tokens, source)
        d = float(summary["tokens"])
        points.append(Point(params=r.params, tokens=d, loss=_summary_loss(summary), budget=r.budget, size=r.size,
                            params_nonembed=r.params_nonembed, flops_actual=r.flops_per_token * d, run_dir=r.name,
                            mode=cfg.mode))
        write_points(points_path, points)
        log.info("scaling %d/%d: %s loss %.4f (%.0f tokens/s)", i + 1, len(runs), r.name, points[-1].loss,
                 float(summary.get("tokens_per_s") or 0.0))
    atomic_write_json(scaling_dir / "sweep.json", {
        "points_format": 1, "scaling": recipe_to_dict(cfg),
        "runs": [asdict(r) for r in runs], "wall_s": round(time.perf_counter() - t_start, 3)})
    return points


def _train_point(recipe: Recipe, r: SweepRun, scaling_dir: Path, tokens: Path, source: str | None) -> dict[str, Any]:
    """Train (or resume, or find finished) one ladder run; its trainer summary."""
    from smelt.train.trainer import train

    cfg = recipe.scaling or ScalingConfig()
    sub = run_recipe(recipe, r, scaling_dir)
    sub_dir = write_resolved_recipe(sub, source)
    _link_tokens(sub_dir, tokens)
    summary = _branch_summary(sub_dir, r.steps) if cfg.mode == "wsd" else None
    if summary is None:
        summary = train(sub, sub_dir, resume=None, progress=False)
    if not summary.get("complete"):
        raise RecipeError(f"scaling: run {sub_dir} stopped before its end ({summary.get('stopped')}); "
                          "run it again to resume it")
    return summary


# --------------------------------------------------------------------------------------------
# the check: one run at a larger budget against the fitted law's prediction


def plan_check(recipe: Recipe, run_dir: Path, budget: float, *, depth: int | None = None,
               fit: dict[str, Any] | None = None) -> SweepRun:
    """The check run at `budget`: the ladder size of `depth` layers, or (without it) the ladder size
    nearest in log N to the fitted law's compute-optimal N for `budget`."""
    from smelt.scaling.plan import compute_optimal

    cfg, base, seq, batch = _ladder(recipe, run_dir)
    if depth is None:
        if fit is None:
            raise RecipeError("scaling check: give --depth, or a fit to choose the compute-optimal size")
        n_opt, _ = compute_optimal({k: float(fit[k]) for k in ("E", "A", "B", "alpha", "beta")}, budget)
        depth = min(range(1, 4 * max(cfg.depths) + 1),
                    key=lambda L: abs(math.log(param_count(_size(base, L, cfg, seq)) / n_opt)))
    m = _size(base, depth, cfg, seq)
    steps = round(budget / (6.0 * param_count(m)) / (batch * seq))
    if steps < cfg.min_steps:
        raise RecipeError(f"scaling check: {size_label(m)} at C={budget:.2e} trains {steps} steps "
                          f"(< scaling.min_steps {cfg.min_steps})")
    warmup = min(recipe.train.schedule.warmup_steps, max(1, int(cfg.max_warmup_fraction * steps)))  # type: ignore[union-attr]
    # three significant digits: 1.5e13 and 2e13 must not share a run directory
    run = _sweep_run(m, budget, steps, batch, seq, f"check-C{budget:.3g}-{size_label(m)}".replace("+", ""),
                     warmup, steps)
    _check_samples(recipe, run_dir, [run],
                   "give a larger --depth (fewer tokens), a smaller --budget, add data or raise loader.max_epochs")
    return run


def run_check(recipe: Recipe, run_dir: Path, budget: float, *, depth: int | None = None,
              fit_path: Path | None = None, source: str | None = None) -> dict[str, Any]:
    """Train the check run (resumable; a finished one is read back) and compare its loss with the
    law's prediction and interval. Appends to ``scaling/checks.json`` and returns the record."""
    from smelt.scaling.fit import predict

    run_dir = Path(run_dir)
    scaling_dir = run_dir / "scaling"
    fit_path = fit_path or scaling_dir / "fit.json"
    if not fit_path.is_file():
        raise RecipeError(f"{fit_path} not found: fit the sweep first (smelt scaling fit {scaling_dir}/points.csv)")
    fit = read_json(fit_path)
    tokens = run_dir / "tokens"
    if not (tokens / "manifest.json").is_file():
        raise RecipeError(f"{tokens} has no manifest (run `smelt pack` first)")
    r = plan_check(recipe, run_dir, budget, depth=depth, fit=fit)
    swept = [p.budget for p in read_points(scaling_dir / "points.csv") if p.budget] \
        if (scaling_dir / "points.csv").is_file() else []
    if swept and budget <= max(swept):
        log.warning("scaling check: C=%.2e is not above the sweep's largest budget %.2e: this checks "
                    "interpolation, not a prediction", budget, max(swept))
    pred = predict(fit, r.params, r.tokens)
    log.info("scaling check: %s N=%s D=%s C=%.2e, predicted loss %.4f%s", r.name, f"{r.params:,}", f"{r.tokens:,}",
             budget, pred["loss"], f" [{pred['interval'][0]:.4f}, {pred['interval'][1]:.4f}]" if "interval" in pred
             else "")
    t0 = time.perf_counter()
    summary = _train_point(recipe, r, scaling_dir, tokens, source)
    achieved = _summary_loss(summary)
    lo, hi = pred.get("interval", [float("nan"), float("nan")])
    record = {"run_dir": r.name, "size": r.size, "budget": budget, "params": r.params, "tokens": r.tokens,
              "steps": r.steps, "predicted": pred["loss"], "interval": pred.get("interval"),
              "residual_band": pred.get("residual_band"), "achieved": achieved,
              "relative_error": achieved / pred["loss"] - 1.0, "within_interval": bool(lo <= achieved <= hi),
              "fit": str(fit_path), "largest_swept_budget": max(swept) if swept else None,
              "wall_s": round(time.perf_counter() - t0, 1)}
    checks_path = scaling_dir / "checks.json"
    checks = [c for c in (read_json(checks_path) if checks_path.is_file() else [])
              if not (c["run_dir"] == r.name and c["fit"] == record["fit"])]
    atomic_write_json(checks_path, checks + [record])
    return record


def format_check(rec: dict[str, Any]) -> str:
    iv = rec.get("interval")
    band = rec.get("residual_band")
    return "\n".join([
        f"check run      {rec['run_dir']}  (N={rec['params']:,}, D={rec['tokens']:,}, C={rec['budget']:.2e}, "
        f"{rec['steps']} steps)",
        f"predicted      {rec['predicted']:.4f}"
        + (f"  (95% bootstrap interval {iv[0]:.4f} - {iv[1]:.4f})" if iv else ""),
        *([f"run-noise band {band[0]:.4f} - {band[1]:.4f}  (law x exp(+-2 rms log residual))"] if band else []),
        f"achieved       {rec['achieved']:.4f}  ({100 * rec['relative_error']:+.2f}%, "
        f"{'inside' if rec['within_interval'] else 'outside'} the interval)"])


def _warn_repetition(runs: list[SweepRun], manifest: dict[str, Any], recipe: Recipe) -> None:
    have = sum(int(d["train"]["tokens"]) for d in manifest.get("domains", {}).values())
    need = max(r.tokens for r in runs)
    if have and need > have:
        log.warning("scaling: the longest run reads %s tokens, %.1f epochs of the %s packed training tokens: "
                    "repeated data bends the law (Muennighoff et al. 2023: up to ~4 epochs cost little)",
                    f"{need:,}", need / have, f"{have:,}")


def estimate_seconds(runs: list[SweepRun], tokens_per_s: dict[str, float]) -> float:
    """Wall time of the sweep from measured tokens/s per size (missing sizes: scaled by FLOPs/token
    from the nearest measured one)."""
    known = {s: v for s, v in tokens_per_s.items() if any(r.size == s for r in runs)}
    total = 0.0
    for r in runs:
        rate = known.get(r.size)
        if rate is None and known:
            ref = min(known, key=lambda s: abs(_fpt(runs, s) - r.flops_per_token))
            rate = known[ref] * _fpt(runs, ref) / r.flops_per_token
        total += r.trained_tokens / rate if rate else float("nan")
    return total


def _fpt(runs: list[SweepRun], size: str) -> float:
    return next(r.flops_per_token for r in runs if r.size == size)


def format_sweep(runs: list[SweepRun]) -> str:
    """The ladder as a table (`smelt scaling sweep --dry-run`)."""
    lines = [f"{'run':<22}{'params':>14}{'budget C':>11}{'steps':>9}{'tokens D':>17}{'D/N':>9}{'trains':>17}"]
    for r in runs:  # widths fit GPU ladders too (billions of tokens)
        lines.append(f"{r.name:<22}{r.params:>14,} {r.budget:>10.2e} {r.steps:>8} {r.tokens:>16,} "
                     f"{r.tokens / r.params:>8.1f} {r.trained_tokens:>16,}")
    lines.append(f"total training tokens: {sum(r.trained_tokens for r in runs):,} "
                 f"({sum(r.trained_tokens * r.flops_per_token for r in runs):.3e} FLOPs)")
    return "\n".join(lines)
