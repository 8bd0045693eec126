"""`smelt compare RUN_DIR...`: finished runs side by side (e.g. the same model trained on data
curated with and without a quality filter).

`compare_runs(run_dirs)` reads, from each run directory, only what its stages wrote:

    recipe.yaml           the run's name (else the directory's name)
    train/manifest.json   tokens trained, optimizer steps, final training loss (smelt.train.trainer)
    data/stats.json       kept documents and bytes (smelt.data.curate)
    eval/results.json     bits per byte per domain, multiple-choice accuracy and its standard error,
                          the evaluated step (smelt.eval.runner)

Any of them may be missing or unreadable: its cells show "—" and the run gets a footnote. A run
directory with none of them, or a set of runs of which none was evaluated, is a `CompareError`.

`write_comparison(cmp, out_dir)` writes, each atomically::

    compare.md     the table (markdown), footnotes, a link to compare.png
    compare.html   the same, self-contained (inline CSS, the plot embedded as base64 PNG)
    compare.json   format version 1: {"version", "name", "runs": [{"name", "path", "tokens", "steps",
                   "final_loss", "kept_docs", "kept_bytes", "eval_step", "tokens_seen",
                   "bits_per_byte": {domain: bpb}, "tasks": {task: {"acc", "stderr"}},
                   "mean_bits_per_byte", "notes": [...]}], "domains", "common_domains", "tasks",
                   "best": {column: [run name, ...]}}
    compare.png    grouped bars: bits per byte per domain and run; benchmark accuracy with
                   standard-error bars

An out directory that already holds a comparison is moved aside (`DIR.prev-N`), never overwritten.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smelt.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, move_aside, read_json

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "OUTPUT_FILES", "Column", "CompareError", "Comparison", "RunRow", "compare_runs",
           "default_out_dir", "format_markdown", "write_comparison"]

FORMAT_VERSION = 1
OUTPUT_FILES = ("compare.md", "compare.html", "compare.json", "compare.png")
MISSING = "—"
SOURCES = ("recipe.yaml", "train/manifest.json", "data/stats.json", "eval/results.json")


class CompareError(ValueError):
    """Runs that cannot be compared: the message names the directory and what it lacks."""


@dataclass
class RunRow:
    """What one run recorded; None where its file is missing or lacks the value."""

    path: Path
    name: str
    tokens: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    kept_docs: int | None = None
    kept_bytes: int | None = None
    eval_step: int | None = None
    tokens_seen: int | None = None
    bpb: dict[str, float] = field(default_factory=dict)  # domain -> bits per byte
    tasks: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # task -> (acc, stderr)
    evaluated: bool = False
    notes: list[str] = field(default_factory=list)  # the run's footnote


@dataclass
class Column:
    """One column of the table: a value (and an optional ± error) per run."""

    key: str
    header: str
    values: list[float | None]
    fmt: str
    better: Literal["lower", "higher"] | None = None  # None: context, never marked
    errors: list[float | None] | None = None

    def best(self) -> set[int]:
        """Indices of the runs with the best value (all of them on a tie); empty when fewer than
        two runs have a value or the column is not a score."""
        have = [(v, i) for i, v in enumerate(self.values) if v is not None]
        if self.better is None or len(have) < 2:
            return set()
        top = min(v for v, _ in have) if self.better == "lower" else max(v for v, _ in have)
        return {i for v, i in have if v == top}

    def cell(self, i: int) -> str:
        v = self.values[i]
        if v is None:
            return MISSING
        s = format(v, self.fmt)
        err = self.errors[i] if self.errors is not None else None
        return f"{s} ± {format(err, self.fmt)}" if err is not None else s


@dataclass
class Comparison:
    """Runs side by side (`compare_runs`); rendered by `format_markdown` and `write_comparison`."""

    runs: list[RunRow]
    domains: list[str]  # union over the runs' evaluated domains
    common_domains: list[str]  # evaluated in every evaluated run: the mean bits/byte is over these
    tasks: list[str]
    name: str | None = None

    def mean_bpb(self, row: RunRow) -> float | None:
        vals = [row.bpb.get(d) for d in self.common_domains]
        if not vals or any(v is None for v in vals):
            return None
        return sum(vals) / len(vals)  # type: ignore[arg-type]

    def columns(self) -> list[Column]:
        runs = self.runs
        cols = [Column("tokens", "tokens trained", [r.tokens for r in runs], ","),
                Column("steps", "steps", [r.steps for r in runs], ","),
                Column("final_loss", "final train loss", [r.final_loss for r in runs], ".4f"),
                Column("kept_docs", "kept documents", [r.kept_docs for r in runs], ","),
                Column("kept_bytes", "kept bytes", [r.kept_bytes for r in runs], ",")]
        cols += [Column(f"bpb/{d}", f"bits/byte {d}", [r.bpb.get(d) for r in runs], ".4f", "lower")
                 for d in self.domains]
        cols += [Column(f"acc/{t}", f"{t} acc", [r.tasks.get(t, (None, None))[0] for r in runs], ".3f", "higher",
                        [r.tasks.get(t, (None, None))[1] for r in runs]) for t in self.tasks]
        cols.append(Column("mean_bpb", "mean bits/byte", [self.mean_bpb(r) for r in runs], ".4f", "lower"))
        return cols

    def to_dict(self) -> dict[str, Any]:
        runs = [{"name": r.name, "path": str(r.path), "tokens": r.tokens, "steps": r.steps,
                 "final_loss": r.final_loss, "kept_docs": r.kept_docs, "kept_bytes": r.kept_bytes,
                 "eval_step": r.eval_step, "tokens_seen": r.tokens_seen, "bits_per_byte": r.bpb,
                 "tasks": {t: {"acc": a, "stderr": s} for t, (a, s) in r.tasks.items()},
                 "mean_bits_per_byte": self.mean_bpb(r), "notes": r.notes} for r in self.runs]
        best = {c.key: [self.runs[i].name for i in sorted(c.best())] for c in self.columns() if c.best()}
        return {"version": FORMAT_VERSION, "name": self.name, "runs": runs, "domains": self.domains,
                "common_domains": self.common_domains, "tasks": self.tasks, "best": best}


# --------------------------------------------------------------------------------------------
# reading


def _float(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _int(x: Any) -> int | None:
    v = _float(x)
    return int(v) if v is not None and v == int(v) else None


def _dig(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _load(path: Path, rel: str, notes: list[str]) -> Any | None:
    if not path.is_file():
        notes.append(f"no {rel}")
        return None
    try:
        if path.suffix == ".yaml":
            import yaml

            from smelt.config import load_yaml

            try:
                data = load_yaml(path.read_text(encoding="utf-8"), str(path))
            except yaml.YAMLError as e:
                raise ValueError(str(e).splitlines()[0]) from None
        else:
            data = read_json(path)
    except (ValueError, OSError) as e:
        notes.append(f"{rel} unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{rel} unreadable (not a mapping)")
        return None
    return data


def read_run(run_dir: Path) -> RunRow:
    """One run's row; raises `CompareError` when ``run_dir`` is not a directory or holds none of
    the files a comparison reads."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir}: no such run directory")
    if not any((run_dir / rel).is_file() for rel in SOURCES):
        raise CompareError(f"{run_dir}: not a finished run (none of {', '.join(SOURCES)} found)")
    row = RunRow(path=run_dir, name=run_dir.resolve().name)
    recipe = _load(run_dir / "recipe.yaml", "recipe.yaml", row.notes)
    if recipe and isinstance(recipe.get("name"), str):
        row.name = recipe["name"]
    manifest = _load(run_dir / "train" / "manifest.json", "train/manifest.json", row.notes)
    if manifest is not None:
        row.tokens, row.steps = _int(manifest.get("tokens")), _int(manifest.get("steps"))
        row.final_loss = _float(manifest.get("final_loss"))
        if manifest.get("complete") is False:
            row.notes.append(f"training not complete (stopped at step {manifest.get('steps')} of "
                             f"{manifest.get('max_steps')})")
    stats = _load(run_dir / "data" / "stats.json", "data/stats.json", row.notes)
    if stats is not None:
        row.kept_docs = _int(_dig(stats, "documents", "kept"))
        row.kept_bytes = _int(_dig(stats, "bytes", "kept"))
    results = _load(run_dir / "eval" / "results.json", "eval/results.json", row.notes)
    if results is not None:
        row.evaluated = True
        row.eval_step, row.tokens_seen = _int(results.get("step")), _int(results.get("tokens_seen"))
        ppl, tasks = results.get("perplexity"), results.get("tasks")
        for d in ppl if isinstance(ppl, dict) else {}:
            bpb = _float(_dig(ppl, d, "bits_per_byte"))
            if bpb is not None:
                row.bpb[str(d)] = bpb
        for t, v in (tasks if isinstance(tasks, dict) else {}).items():
            if isinstance(v, dict):
                row.tasks[str(t)] = (_float(v.get("acc")), _float(v.get("acc_stderr")))
        if manifest is None and row.tokens_seen is not None:
            row.tokens, row.steps = row.tokens_seen, row.eval_step
            row.notes.append("tokens and steps are those of the evaluated checkpoint")
        elif row.steps is not None and row.eval_step is not None and row.eval_step != row.steps:
            row.notes.append(f"evaluated at step {row.eval_step} of {row.steps}")
    return row


def compare_runs(run_dirs: list[Path], *, name: str | None = None) -> Comparison:
    """Read every run (`read_run`) and line them up: domains and benchmarks are the union over
    the runs, the mean bits/byte is over the domains every evaluated run has."""
    if not run_dirs:
        raise CompareError("no run directories to compare")
    seen: dict[Path, Path] = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            raise CompareError(f"{d}: given twice (as {seen[key]} too)")
        seen[key] = Path(d)
    rows = [read_run(Path(d)) for d in run_dirs]
    if not any(r.evaluated for r in rows):
        raise CompareError(f"none of the runs has eval/results.json ({', '.join(str(r.path) for r in rows)}); "
                           "evaluate them first (smelt eval RECIPE)")
    names = [r.name for r in rows]
    for r in rows:  # two runs of the same recipe name: tell them apart by directory
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path})"
    domains = sorted({d for r in rows for d in r.bpb})
    evaluated = [r for r in rows if r.bpb]
    common = [d for d in domains if all(d in r.bpb for r in evaluated)]
    tasks = sorted({t for r in rows for t in r.tasks})
    return Comparison(runs=rows, domains=domains, common_domains=common, tasks=tasks, name=name)


# --------------------------------------------------------------------------------------------
# rendering


def _title(cmp: Comparison) -> str:
    return cmp.name or f"Comparison of {len(cmp.runs)} runs"


def _legend(cmp: Comparison) -> list[str]:
    """The sentences under the table (plain text; the renderers escape them)."""
    mean = (f"over the domains every evaluated run has ({', '.join(cmp.common_domains)})" if cmp.common_domains
            else "not available: no domain was evaluated in every run")
    return ["Bold: the best run in that column (lower bits per byte, higher accuracy); counts and the training "
            "loss (on each run's own data) are context, not marked.",
            "Accuracy: lm-eval's acc ± its standard error. Mean bits/byte: " + mean + ".",
            f"{MISSING}: not available (see the run's note)."]


def _footnotes(cmp: Comparison) -> dict[int, int]:
    """run index -> footnote number, for the runs that have notes."""
    out: dict[int, int] = {}
    for i, r in enumerate(cmp.runs):
        if r.notes:
            out[i] = len(out) + 1
    return out


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def format_markdown(cmp: Comparison, image: str | None = None) -> str:
    """The comparison as markdown: table, legend, notes, runs, and ``image`` linked when given."""
    cols = cmp.columns()
    notes = _footnotes(cmp)
    lines = [f"# {_md(_title(cmp))}", "",
             "| run | " + " | ".join(_md(c.header) for c in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    best = [c.best() for c in cols]
    for i, r in enumerate(cmp.runs):
        name = _md(r.name) + (f" [{notes[i]}]" if i in notes else "")
        cells = [f"**{c.cell(i)}**" if i in b else c.cell(i) for c, b in zip(cols, best, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *[s + "  " for s in _legend(cmp)], ""]
    if notes:
        lines += [f"[{n}] {_md(cmp.runs[i].name)}: {'; '.join(cmp.runs[i].notes)}.  " for i, n in notes.items()]
        lines.append("")
    if image:
        lines += [f"![bits per byte per domain and benchmark accuracy]({image})", ""]
    lines += ["## Runs", ""]
    for r in cmp.runs:
        ev = (f"evaluated at step {r.eval_step}" + (f", {r.tokens_seen:,} tokens" if r.tokens_seen is not None else "")
              if r.evaluated else "not evaluated")
        lines.append(f"- {_md(r.name)}: `{r.path}` ({ev})")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:24px}h1{font-size:24px}h2{font-size:18px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px;background:#fff}
th,td{border-bottom:1px solid #eceef2;padding:4px 10px;text-align:right}
th{background:#f1f3f6;font-weight:600}td:first-child,th:first-child{text-align:left}
.note{color:#6b7280;font-size:13px}img{max-width:100%;height:auto}
"""


def format_html(cmp: Comparison, png: bytes | None) -> str:
    """The comparison as one self-contained HTML page (``png`` embedded)."""
    e = html.escape
    cols = cmp.columns()
    notes = _footnotes(cmp)
    best = [c.best() for c in cols]
    head = "<th>run</th>" + "".join(f"<th>{e(c.header)}</th>" for c in cols)
    body = ""
    for i, r in enumerate(cmp.runs):
        name = e(r.name) + (f"<sup>{notes[i]}</sup>" if i in notes else "")
        cells = "".join(f"<td><b>{e(c.cell(i))}</b></td>" if i in b else f"<td>{e(c.cell(i))}</td>"
                        for c, b in zip(cols, best, strict=True))
        body += f"<tr><td>{name}</td>{cells}</tr>"
    out = [f"<h1>{e(_title(cmp))}</h1>", f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"]
    out += [f'<p class="note">{e(s)}</p>' for s in _legend(cmp)]
    if notes:
        out.append('<ol class="note">' + "".join(
            f'<li value="{n}">{e(cmp.runs[i].name)}: {e("; ".join(cmp.runs[i].notes))}.</li>'
            for i, n in notes.items()) + "</ol>")
    if png:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<img alt="bits per byte per domain and benchmark accuracy" src="data:image/png;base64,{data}">')
    out.append("<h2>Runs</h2><ul>" + "".join(
        f"<li>{e(r.name)}: <code>{e(str(r.path))}</code> "
        f"({'evaluated at step ' + e(str(r.eval_step)) if r.evaluated else 'not evaluated'})</li>"
        for r in cmp.runs) + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(_title(cmp))}</title>'
            f"<style>{_CSS}</style></head><body><main>{''.join(out)}</main></body></html>\n")


def plot_png(cmp: Comparison) -> bytes:
    """Grouped bars: bits per byte per domain (one bar per run), and each benchmark's accuracy
    with standard-error bars when any run has benchmarks."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [p for p in ("bpb", "acc") if (cmp.domains if p == "bpb" else cmp.tasks)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 3.6), squeeze=False)
    n = len(cmp.runs)
    width = 0.8 / n
    for ax, panel in zip(axes[0], panels):
        groups = cmp.domains if panel == "bpb" else cmp.tasks
        for k, r in enumerate(cmp.runs):
            xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
            if panel == "bpb":
                ys = [r.bpb.get(d, math.nan) for d in groups]
                ax.bar(xs, ys, width=width, label=r.name)
            else:
                ys = [r.tasks.get(t, (None, None))[0] for t in groups]
                errs = [r.tasks.get(t, (None, None))[1] for t in groups]
                ax.bar(xs, [math.nan if y is None else y for y in ys], width=width, label=r.name,
                       yerr=[0.0 if s is None else s for s in errs], capsize=3)
        ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
        ax.set_title("bits per byte per domain (lower is better)" if panel == "bpb"
                     else "benchmark accuracy ± stderr (higher is better)")
        ax.set_ylabel("bits/byte" if panel == "bpb" else "acc")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no per-domain bits/byte or benchmarks to plot", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# writing


def default_out_dir() -> Path:
    """``./compare-<YYYYmmdd-HHMMSS>`` (local time)."""
    return Path(f"compare-{time.strftime('%Y%m%d-%H%M%S')}")


def _set_aside_earlier(out_dir: Path) -> list[Path]:
    """Move an earlier comparison in ``out_dir`` aside: the whole directory when it holds nothing
    else (so its files stay together), else each of its files."""
    if not out_dir.is_dir():
        return []
    ours = [out_dir / f for f in OUTPUT_FILES if (out_dir / f).exists()]
    if not ours:
        return []
    others = [p for p in out_dir.iterdir() if p.name not in OUTPUT_FILES and not p.name.startswith(".")]
    if not others and out_dir.resolve() != Path.cwd().resolve():
        moved = [move_aside(out_dir.resolve(), "smelt compare")]
    else:
        moved = [move_aside(p, "smelt compare") for p in ours]
    return [p for p in moved if p is not None]


def write_comparison(cmp: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write compare.{md,html,json,png} into ``out_dir`` (an earlier comparison there is moved
    aside first); returns {"md", "html", "json", "png"} -> path."""
    out_dir = Path(out_dir)
    _set_aside_earlier(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {f.split(".")[1]: out_dir / f for f in OUTPUT_FILES}
    png = plot_png(cmp)
    atomic_write_bytes(paths["png"], png)
    atomic_write_json(paths["json"], cmp.to_dict())
    atomic_write_text(paths["md"], format_markdown(cmp, image=paths["png"].name))
    atomic_write_text(paths["html"], format_html(cmp, png))
    log.info("compare: %s", ", ".join(str(p) for p in paths.values()))
    return paths
