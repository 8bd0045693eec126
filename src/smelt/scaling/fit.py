"""Scaling-law fits (`smelt scaling fit POINTS.csv`): Chinchilla's approaches 2 and 3.

Approach 3 (Hoffmann et al. 2022, Section 3.3 and Appendix D.2), with the corrections of
Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"):

    L(N, D) = E + A / N^alpha + B / D^beta

fitted in log space, ``log L = LSE(a - alpha log N, b - beta log D, e)`` with ``A = exp a``,
``B = exp b``, ``E = exp e``, minimizing the Huber loss (delta = 1e-3) of the log-loss residuals
with L-BFGS-B from a grid of starting points (Chinchilla's grid: alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1.5}, a, b in {0, 5, ..., 25}). Two details matter and are Besiroglu et
al.'s point: the objective is *summed* over points, and the optimizer must not stop early. scipy's
L-BFGS-B stops when the objective falls by less than ``ftol * max(|f|, 1)``, and a Huber objective
with delta 1e-3 is ~1e-6 per point, so it would stop at the first iterations; we divide the
objective by delta (a residual of delta then costs ~0.5) and give an exact gradient and tight
tolerances. Running L-BFGS from all 5,400 grid points costs seconds per fit; the objective is
evaluated on the whole grid at once (numpy) and L-BFGS starts from the best `n_starts` of them,
which found the same minimum as the full grid on Chinchilla-like data in our tests.
Confidence intervals: a seeded bootstrap over points (resampled with replacement, each refit
started from the full fit and the best grid points), percentile intervals.

The compute-optimal allocation under C = 6 N D follows from the law (Appendix D.2):
N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, a = beta / (alpha + beta), b = alpha / (alpha + beta),
G = (alpha A / (beta B))^(1 / (alpha + beta)).

Approach 2 (Section 3.2): for each IsoFLOP profile (runs of one budget C), a parabola of loss in
log N; its vertex is N_opt(C), D_opt = C / 6 N_opt; then least-squares power laws
N_opt = k_N C^a, D_opt = k_D C^b over the profiles.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smelt.scaling.plan import compute_optimal
from smelt.scaling.points import Point

log = logging.getLogger(__name__)

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, Appendix D.2; Besiroglu et al. 2024
# Chinchilla's initialization grid (Appendix D.2): 5 x 5 x 6 x 6 x 6 = 5,400 starting points.
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.51, 0.5),
        "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
PARAMS = ("E", "A", "B", "alpha", "beta", "a", "b")


@dataclass
class LawFit:
    """One approach-3 fit: log-space parameters (a, b, e) and exponents."""

    log_a: float
    log_b: float
    log_e: float
    alpha: float
    beta: float
    objective: float

    def law(self) -> dict[str, float]:
        a_exp, b_exp = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        return {"E": math.exp(self.log_e), "A": math.exp(self.log_a), "B": math.exp(self.log_b),
                "alpha": self.alpha, "beta": self.beta, "a": a_exp, "b": b_exp}


def _theta_pred(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted log-loss and the softmax weights of the three terms. theta: (..., 5) as a, b, e, alpha, beta."""
    a, b, e, al, be = (theta[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - al * log_n, b - be * log_d, e + 0 * log_n), axis=-1)  # (..., n, 3)
    m = terms.max(axis=-1, keepdims=True)
    ex = np.exp(terms - m)
    s = ex.sum(axis=-1, keepdims=True)
    return (m + np.log(s))[..., 0], ex / s


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of the log-loss residuals, divided by delta (see the module doc), and its gradient."""
    pred, w = _theta_pred(theta, log_n, log_d)
    r = pred - log_l
    f = float(_huber(r, delta).sum()) / delta
    dr = np.clip(r, -delta, delta) / delta  # d huber / d r, scaled
    grad = np.array([(dr * w[:, 0]).sum(), (dr * w[:, 1]).sum(), (dr * w[:, 2]).sum(),
                     -(dr * w[:, 0] * log_n).sum(), -(dr * w[:, 1] * log_d).sum()])
    return f, grad


def _grid() -> np.ndarray:
    g = GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))


def _grid_objective(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float) -> np.ndarray:
    pred, _ = _theta_pred(grid, log_n, log_d)
    return _huber(pred - log_l, delta).sum(axis=-1) / delta


def _minimize() -> Any:
    """`scipy.optimize.minimize`, with scipy's own OpenBLAS loaded single-threaded when this is the
    first import of scipy: L-BFGS-B's few tiny BLAS calls per iteration otherwise wake a thread
    pool, which took 8x longer (2.5 ms per iteration, 3 s per fit) on a busy 2-core machine. The
    variable is read once, when the library loads, and restored at once (numpy's and torch's BLAS
    are other libraries, already loaded)."""
    import os
    import sys

    if "scipy.optimize" not in sys.modules and "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        try:
            from scipy.optimize import minimize
        finally:
            del os.environ["OPENBLAS_NUM_THREADS"]
    from scipy.optimize import minimize

    return minimize


def fit_law(points: list[Point], *, delta: float = HUBER_DELTA, n_starts: int = 16,
            extra_starts: list[np.ndarray] | None = None) -> LawFit:
    """Approach 3 on ``points``: the best L-BFGS-B result over the best grid starts."""
    minimize = _minimize()
    if len(points) < 5:
        raise ValueError(f"approach 3 needs at least 5 points (5 parameters), got {len(points)}")
    log_n = np.log([p.params for p in points])
    log_d = np.log([p.tokens for p in points])
    log_l = np.log([p.loss for p in points])
    grid = _grid()
    scores = _grid_objective(grid, log_n, log_d, log_l, delta)
    starts = [grid[i] for i in np.argsort(scores, kind="stable")[:n_starts]] + list(extra_starts or [])
    # exponents kept non-negative (a negative one would make loss grow with size or data)
    bounds = [(None, None), (None, None), (None, None), (0.0, 10.0), (0.0, 10.0)]
    best = None
    for x0 in starts:
        res = minimize(_objective, np.asarray(x0, dtype=float), args=(log_n, log_d, log_l, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if best is None or res.fun < best.fun - 1e-12:
            best = res
    assert best is not None
    a, b, e, al, be = (float(v) for v in best.x)
    return LawFit(log_a=a, log_b=b, log_e=e, alpha=al, beta=be, objective=float(best.fun) * delta)


# --------------------------------------------------------------------------------------------
# approach 2: IsoFLOP profiles


def isoflop_groups(points: list[Point], rel_tol: float = 0.05) -> dict[float, list[Point]]:
    """Points by budget: the ``budget`` column when given, else 6ND within ``rel_tol`` of each other."""
    groups: dict[float, list[Point]] = {}
    loose = []
    for p in points:
        if p.budget:
            groups.setdefault(p.budget, []).append(p)
        else:
            loose.append(p)
    loose.sort(key=lambda p: p.flops)
    cur: list[Point] = []
    for p in loose:
        if cur and math.log(p.flops / cur[0].flops) > math.log1p(rel_tol):
            groups.setdefault(float(np.exp(np.mean([math.log(q.flops) for q in cur]))), []).extend(cur)
            cur = []
        cur.append(p)
    if cur:
        groups.setdefault(float(np.exp(np.mean([math.log(q.flops) for q in cur]))), []).extend(cur)
    return dict(sorted(groups.items()))


def fit_isoflop(points: list[Point]) -> dict[str, Any]:
    """Approach 2: the parabola vertex of each profile with 3+ sizes, then the power laws over profiles."""
    profiles = []
    for budget, pts in isoflop_groups(points).items():
        sizes = sorted({p.params for p in pts})
        if len(sizes) < 3:
            continue
        x = np.log([p.params for p in pts])
        y = np.array([p.loss for p in pts])
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            profiles.append({"flops": budget, "points": len(pts), "n_opt": None, "note": "no minimum (concave)"})
            continue
        x_opt = -c1 / (2 * c2)
        n_opt = float(math.exp(x_opt))
        profiles.append({"flops": budget, "points": len(pts), "n_opt": n_opt, "d_opt": budget / (6.0 * n_opt),
                         "loss_opt": float(c0 + c1 * x_opt + c2 * x_opt * x_opt),
                         "inside": bool(min(x) <= x_opt <= max(x)), "parabola": [float(c2), float(c1), float(c0)]})
    ok = [p for p in profiles if p.get("n_opt")]
    out: dict[str, Any] = {"profiles": profiles, "a": None, "b": None}
    if len(ok) >= 2:
        lc = np.log([p["flops"] for p in ok])
        a, ka = np.polyfit(lc, np.log([p["n_opt"] for p in ok]), 1)
        b, kb = np.polyfit(lc, np.log([p["d_opt"] for p in ok]), 1)
        out.update({"a": float(a), "b": float(b), "k_n": float(math.exp(ka)), "k_d": float(math.exp(kb))})
    return out


# --------------------------------------------------------------------------------------------
# the whole fit


def fit_points(points: list[Point], *, bootstrap: int = 100, seed: int = 0, budgets: list[float] | None = None,
               n_starts: int = 16, delta: float = HUBER_DELTA) -> dict[str, Any]:
    """Approach 3 with bootstrap intervals, approach 2, and the optimal N, D for ``budgets``.

    The result is what `smelt scaling fit --json` prints: ``E, A, B, alpha, beta, a, b`` (approach
    3), ``ci`` (95% bootstrap percentile intervals of each), ``approach2``, ``optimal``.
    """
    best = fit_law(points, delta=delta, n_starts=n_starts)
    law = best.law()
    x_best = np.array([best.log_a, best.log_b, best.log_e, best.alpha, best.beta])
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in PARAMS}
    for _ in range(bootstrap):
        idx = rng.integers(0, len(points), size=len(points))
        sub = [points[i] for i in idx]
        if len({(p.params, p.tokens) for p in sub}) < 5:
            continue
        fit = fit_law(sub, delta=delta, n_starts=4, extra_starts=[x_best]).law()
        for k in PARAMS:
            samples[k].append(fit[k])
    # the bootstrap laws themselves: `predict` takes a prediction's interval from them
    law_samples = [[samples[k][i] for k in ("E", "A", "B", "alpha", "beta")] for i in range(len(samples["E"]))]
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items() if v}
    if budgets is None:
        c = sorted(p.flops for p in points)
        budgets = [c[-1] * 10.0 ** k for k in (0, 1, 2)] if c else []
    optimal = []
    for c in budgets:
        n, d = compute_optimal(law, c)
        optimal.append({"flops": c, "n_opt": n, "d_opt": d, "tokens_per_param": d / n,
                        "loss": law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]})
    residuals = [math.log(p.loss) - math.log(law["E"] + law["A"] / p.params ** law["alpha"]
                                               + law["B"] / p.tokens ** law["beta"]) for p in points]
    return {**law, "log_a": best.log_a, "log_b": best.log_b, "log_e": best.log_e, "ci": ci,
            "bootstrap": len(samples["E"]), "seed": seed, "huber_delta": delta, "objective": best.objective,
            "n_points": len(points), "rms_log_residual": float(np.sqrt(np.mean(np.square(residuals)))),
            "approach2": fit_isoflop(points), "optimal": optimal, "samples": law_samples}


def law_loss(law: dict[str, float], n: float, d: float) -> float:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def predict(result: dict[str, Any], n: float, d: float, *, level: float = 95.0) -> dict[str, Any]:
    """The fitted law's loss at (N, D), with a `level`% interval over the bootstrap laws (the
    fit's own uncertainty; a run's noise comes on top, see ``rms_log_residual``)."""
    law = {k: float(result[k]) for k in ("E", "A", "B", "alpha", "beta")}
    out: dict[str, Any] = {"params": n, "tokens": d, "flops": 6.0 * n * d, "loss": law_loss(law, n, d)}
    samples = result.get("samples") or []
    if samples:
        preds = np.array([law_loss(dict(zip(("E", "A", "B", "alpha", "beta"), s)), n, d) for s in samples])
        preds = preds[np.isfinite(preds)]
        half = (100.0 - level) / 2.0
        out["interval"] = [float(np.percentile(preds, half)), float(np.percentile(preds, 100.0 - half))]
        out["level"] = level
    r = result.get("rms_log_residual")
    if r is not None:  # the typical scatter of a single run around the law, from the fit's residuals
        out["residual_band"] = [out["loss"] * math.exp(-2.0 * r), out["loss"] * math.exp(2.0 * r)]
    return out


def format_fit(result: dict[str, Any]) -> str:
    """The fit as text (what `smelt scaling fit` prints without --json)."""
    ci = result.get("ci", {})

    def v(k: str, spec: str) -> str:
        s = format(result[k], spec)
        return s + (f" [{format(ci[k][0], spec)}, {format(ci[k][1], spec)}]" if k in ci else "")

    lines = [f"approach 3 (Huber delta {result['huber_delta']:g} on log-loss, L-BFGS-B, {result['n_points']} points, "
             f"{result['bootstrap']} bootstrap fits, 95% intervals):",
             "  L(N, D) = E + A/N^alpha + B/D^beta",
             f"  E = {v('E', '.4f')}   A = {v('A', '.4g')}   B = {v('B', '.4g')}",
             f"  alpha = {v('alpha', '.4f')}   beta = {v('beta', '.4f')}",
             f"  N_opt ~ C^{v('a', '.3f')}   D_opt ~ C^{v('b', '.3f')}   (rms log residual "
             f"{result['rms_log_residual']:.4f})"]
    a2 = result["approach2"]
    lines.append("approach 2 (IsoFLOP parabolas):")
    for p in a2["profiles"]:
        if p.get("n_opt"):
            lines.append(f"  C = {p['flops']:.3e}: N_opt {p['n_opt']:.4g}, D_opt {p['d_opt']:.4g}, loss "
                         f"{p['loss_opt']:.4f}" + ("" if p["inside"] else " (vertex outside the sizes run)"))
        else:
            lines.append(f"  C = {p['flops']:.3e}: {p.get('note')}")
    if a2["a"] is not None:
        lines.append(f"  N_opt ~ C^{a2['a']:.3f}   D_opt ~ C^{a2['b']:.3f}")
    else:
        lines.append("  needs 2+ profiles of 3+ sizes each")
    lines.append("compute-optimal (approach 3):")
    for o in result["optimal"]:
        lines.append(f"  C = {o['flops']:.3e}: N {o['n_opt']:.4g}, D {o['d_opt']:.4g} ({o['tokens_per_param']:.1f} "
                     f"tokens/param), loss {o['loss']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plots


def plot_fit(points: list[Point], result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Three PNGs in ``out_dir``: loss vs N per D (with the law), IsoFLOP profiles, the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    law = {k: result[k] for k in ("E", "A", "B", "alpha", "beta")}
    paths = []
    cmap = plt.get_cmap("viridis")
    n_all = np.array([p.params for p in points])
    n_grid = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 100)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ds = sorted({p.tokens for p in points})
    log_d = np.log(ds)
    span = (log_d.max() - log_d.min()) or 1.0
    for d in ds:
        col = cmap((math.log(d) - log_d.min()) / span)
        pts = [p for p in points if p.tokens == d]
        ax.scatter([p.params for p in pts], [p.loss for p in pts], color=col, s=18)
    for d in np.geomspace(min(ds), max(ds), 5):
        col = cmap((math.log(d) - log_d.min()) / span)
        ax.plot(n_grid, law["E"] + law["A"] / n_grid ** law["alpha"] + law["B"] / d ** law["beta"], color=col,
                lw=1, label=f"D = {d:.3g}")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="loss vs N (points; law at 5 D)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "fit_loss_vs_params.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups = isoflop_groups(points)
    lc = np.log(list(groups) or [1.0])
    lspan = (lc.max() - lc.min()) or 1.0
    by_flops = {p["flops"]: p for p in result["approach2"]["profiles"]}
    for c, pts in groups.items():
        col = cmap((math.log(c) - lc.min()) / lspan)
        ax.scatter([p.params for p in pts], [p.loss for p in pts], color=col, s=18, label=f"C = {c:.2e}")
        prof = by_flops.get(c)
        if prof and prof.get("parabola"):
            xs = np.linspace(math.log(min(p.params for p in pts)), math.log(max(p.params for p in pts)), 50)
            c2, c1, c0 = prof["parabola"]
            ax.plot(np.exp(xs), c0 + c1 * xs + c2 * xs * xs, color=col, lw=1)
            ax.plot([prof["n_opt"]], [prof["loss_opt"]], marker="*", color=col, ms=10)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles (approach 2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "isoflop.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    c_all = [p.flops for p in points]
    cs = np.geomspace(min(c_all) / 3, max(max(c_all), *(o["flops"] for o in result["optimal"])) * 3, 50)
    ax.plot(cs, [compute_optimal(law, c)[0] for c in cs], label="approach 3 (law)")
    a2 = result["approach2"]
    ok = [p for p in a2["profiles"] if p.get("n_opt")]
    if ok:
        ax.scatter([p["flops"] for p in ok], [p["n_opt"] for p in ok], color="C1", zorder=3,
                   label="approach 2 (IsoFLOP vertices)")
        if a2["a"] is not None:
            ax.plot(cs, a2["k_n"] * cs ** a2["a"], color="C1", ls="--", lw=1)
    ax.scatter(c_all, [p.params for p in points], color="0.7", s=8, label="runs")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="N_opt",
           title="compute-optimal frontier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "frontier.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
