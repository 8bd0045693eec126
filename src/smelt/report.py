"""The run report: one self-contained HTML file (`smelt report RUN_DIR`, and the last stage of
`smelt run`).

`write_report(run_dir)` reads what each stage wrote and renders ``run_dir/report.html``: inline
CSS, figures as base64 PNG (matplotlib, Agg backend), no script and no external resource, so the
file can be mailed or attached to an issue. Sections, each with its source:

    Overview             run.json, recipe.yaml
    Data funnel          data/stats.json (documents per step, rejects by reason, per domain,
                         bytes in/kept), data/planted.json via smelt.demo.outcomes (demo labels)
    Deduplication        data/stats.json minhash_cluster_sizes, dedup steps
    PII                  data/stats.json pii step counters
    Model-based scores   data/stats.json steps[].info.scores (score keys, cutoffs per group) and the
                         scores in ``meta`` of the first documents of data/clean and data/rejects;
                         present only when a curation step scored documents
    Tokenizer            tokenizer/stats.json, tokenizer/eval.json (compression per domain)
    Tokens and mixture   tokens/manifest.json, the loader weights of recipe.yaml
    Training             train/metrics.jsonl (loss overall and per domain, validation loss, LR,
                         grad norm, events, tokens/s, MFU), train/manifest.json
    Evaluation           eval/results.json (perplexity, bits per byte, probes, benchmarks)
    Samples              report_samples.json (written by `generate_samples`)
    Recipe               recipe.yaml (resolved)
    Timings              run.json per-stage durations

Every section whose input is missing says "stage not run" with the file it looked for; a
malformed input file gives a note naming it, never a failed report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smelt.fsutil import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

SAMPLES_FILE = "report_samples.json"
MAX_METRIC_LINES = 200_000  # a report never needs more points than this per curve
# Model-based scores: the documents read for the histograms are the first in shard order, at most
# SCORE_DOCS with a score per domain and outcome (kept / rejected) and SCORE_SCAN per outcome in all,
# so that the section costs seconds whatever the size of the corpus.
SCORE_DOCS = 20_000
SCORE_SCAN = 200_000
SCORE_EXAMPLES = 3  # documents shown on each side of a domain's first cutoff
SCORE_SNIPPET = 200  # characters of each example shown

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:8px 0}h2{font-size:20px;margin:0 0 12px;border-bottom:1px solid #dde1e7;padding-bottom:6px}
h3{font-size:15px;margin:16px 0 6px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:16px 20px;margin:16px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border-bottom:1px solid #eceef2;padding:4px 10px;text-align:right;vertical-align:top}
th{background:#f1f3f6;font-weight:600}td:first-child,th:first-child{text-align:left}
.note{color:#6b7280;font-style:italic}.bad{color:#b42318;font-weight:600}.good{color:#067647;font-weight:600}
.fig{max-width:100%;height:auto;margin:6px 0}
pre{background:#f3f4f6;padding:10px;border-radius:6px;font-size:12px;overflow-x:auto;white-space:pre-wrap}
nav a{margin-right:12px;font-size:13px;color:#2451a6;text-decoration:none}
.kpi{display:inline-block;margin:4px 18px 4px 0}.kpi b{display:block;font-size:20px}
.sample{border-left:3px solid #c7d2fe;padding:4px 10px;margin:8px 0;white-space:pre-wrap;font-family:monospace;
font-size:12px}
"""

SECTIONS = [("overview", "Overview"), ("data", "Data funnel"), ("dedup", "Deduplication"), ("pii", "PII"),
            ("tokenizer", "Tokenizer"), ("tokens", "Tokens and mixture"), ("training", "Training"),
            ("evaluation", "Evaluation"), ("samples", "Samples"), ("recipe", "Recipe"), ("timings", "Timings"),
            ("scaling", "Scaling laws")]
SCORES_SECTION = ("scores", "Model-based scores")  # only when a curation step scored documents


# --------------------------------------------------------------------------------------------
# small HTML helpers


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, spec: str = ",") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if spec == ",":
            spec = ".4g" if abs(x) < 1000 else ",.0f"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    m = len(ys) // 2
    return ys[m] if len(ys) % 2 else (ys[m - 1] + ys[m]) / 2


def _table(header: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _not_run(stage: str, path: Path) -> str:
    return _note(f"stage not run: {stage} (no {path.name} in {path.parent})")


def _fig(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3})
    # CJK glyphs in labels (domain names, prompts) when a CJK font is installed; else boxes.
    from matplotlib import font_manager

    cjk = [f.name for f in font_manager.fontManager.ttflist
           if any(k in f.name for k in ("Noto Sans CJK", "WenQuanYi", "Source Han", "SimHei"))]
    if cjk:
        plt.rcParams["font.sans-serif"] = [cjk[0], *plt.rcParams["font.sans-serif"]]
    return plt


def _load_json(path: Path, notes: list[str]) -> Any | None:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (ValueError, OSError) as e:
        notes.append(f"{path}: unreadable ({e})")
        return None


# --------------------------------------------------------------------------------------------
# model-based scores: what the scoring steps declared, and the scores on the documents


def _score_specs(stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The scores the curation steps declared in ``stats.json`` (``steps[].info.scores``), each
    with its ``step``; the first step wins a key declared twice."""
    out: list[dict[str, Any]] = []
    for st in (stats or {}).get("steps") or []:
        info = st.get("info") if isinstance(st, dict) else None
        for sc in (info.get("scores") or []) if isinstance(info, dict) else []:
            if isinstance(sc, dict) and isinstance(sc.get("key"), str) and all(o["key"] != sc["key"] for o in out):
                cut = sc.get("cutoffs")
                out.append({**sc, "step": st.get("name"), "cutoffs": cut if isinstance(cut, dict) else {}})
    return out


def _meta_score(meta: dict[str, Any], key: str) -> float | None:
    """The finite number at dotted path ``key`` in ``meta``, else None (not scored)."""
    cur: Any = meta
    for part in key.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    if isinstance(cur, bool) or not isinstance(cur, (int, float)) or not math.isfinite(cur):
        return None
    return float(cur)


def _domain_cutoffs(cutoffs: dict[str, Any], domain: str) -> list[tuple[str | None, str, float]]:
    """(language or None, cutoff name, value) of the groups that cover ``domain``: ``*`` (every
    group), the domain itself and its ``domain/lang`` groups, in the order of ``cutoffs``."""
    out = []
    for group, cut in cutoffs.items():
        dom, _, lang = group.partition("/")
        if (group == "*" or dom == domain) and isinstance(cut, dict):
            out += [(lang or None, str(name), float(v)) for name, v in cut.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return out


class _Nearest:
    """The ``k`` documents closest to ``threshold`` on each side, in one pass; ties go to the
    document met first."""

    def __init__(self, threshold: float, lang: str | None, k: int) -> None:
        self.threshold, self.lang, self.k = threshold, lang, k
        self.above: list[tuple[float, int, tuple]] = []  # heap: the farthest above on top
        self.below: list[tuple[float, int, tuple]] = []  # heap: the farthest below on top

    def add(self, value: float, order: int, make: Callable[[], tuple]) -> None:
        import heapq

        heap, key = (self.above, -value) if value >= self.threshold else (self.below, value)
        if len(heap) < self.k:
            heapq.heappush(heap, (key, -order, make()))
        elif (key, -order) > heap[0][:2]:
            heapq.heapreplace(heap, (key, -order, make()))

    def rows(self) -> list[tuple]:
        above = sorted(self.above, key=lambda t: (-t[0], -t[1]))
        below = sorted(self.below, key=lambda t: (-t[0], -t[1]))
        return [("above", *t[2]) for t in above] + [("below", *t[2]) for t in below]


def _example(doc: Any, outcome: str, value: float) -> tuple[str, float, str, str]:
    """(id, score, outcome, first characters) of an example document."""
    if outcome != "kept":
        outcome = f"rejected: {doc.meta.get('rejected_by')}/{doc.meta.get('reason')}"
    text = " ".join(doc.text[:SCORE_SNIPPET].split()) + ("…" if len(doc.text) > SCORE_SNIPPET else "")
    return doc.id, value, outcome, text


def _read_scores(data_dir: Path, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass over the first documents of ``clean/`` (kept) and ``rejects/`` (rejected): per score
    key and domain, the values of each outcome and the documents nearest the domain's first cutoff;
    shards that could not be read under ``problems``."""
    from smelt.data.io import read_shard

    values: dict[str, dict[str, dict[str, list[float]]]] = {sp["key"]: {} for sp in specs}
    nearest: dict[str, dict[str, _Nearest | None]] = {sp["key"]: {} for sp in specs}
    scanned: dict[str, int] = {}
    capped: set[str] = set()
    problems: list[str] = []
    order = 0
    for kind, outcome in (("clean", "kept"), ("rejects", "rejected")):
        root = data_dir / kind
        files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and f.name.endswith((".jsonl", ".jsonl.zst", ".parquet"))) if root.is_dir() else []
        taken: Counter = Counter()  # documents with a score, per domain
        n = 0
        for f in files:
            try:
                for doc in read_shard(f):
                    n += 1
                    if n > SCORE_SCAN:
                        capped.add(outcome)
                        break
                    if taken[doc.domain] >= SCORE_DOCS:
                        capped.add(outcome)
                        if kind == "clean":
                            break  # clean/<domain>/ holds one domain
                        continue
                    order += 1
                    scored = False
                    for sp in specs:
                        v = _meta_score(doc.meta, sp["key"])
                        if v is None:
                            continue
                        scored = True
                        per = values[sp["key"]].setdefault(doc.domain, {"kept": [], "rejected": []})
                        per[outcome].append(v)
                        if doc.domain not in nearest[sp["key"]]:
                            cuts = _domain_cutoffs(sp["cutoffs"], doc.domain)
                            first = next((c for c in cuts if c[1] == "threshold"), cuts[0] if cuts else None)
                            nearest[sp["key"]][doc.domain] = (
                                None if first is None else _Nearest(first[2], first[0], SCORE_EXAMPLES))
                        near = nearest[sp["key"]][doc.domain]
                        if near is not None and near.lang in (None, doc.meta.get("language") or "unknown"):
                            near.add(v, order, lambda d=doc, o=outcome, x=v: _example(d, o, x))
                    taken[doc.domain] += scored
            except (ValueError, OSError) as e:  # a damaged shard: say so, show the rest
                problems.append(f"{f}: unreadable ({e})")
            if n > SCORE_SCAN:
                break
        scanned[outcome] = min(n, SCORE_SCAN)
    return {"values": values, "nearest": nearest, "scanned": scanned, "capped": capped, "problems": problems}


# --------------------------------------------------------------------------------------------
# sections


class Report:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.problems: list[str] = []
        self.run = _load_json(run_dir / "run.json", self.problems) or {}
        self.recipe: dict[str, Any] = {}
        rp = run_dir / "recipe.yaml"
        if rp.is_file():
            import yaml

            from smelt.config import load_yaml

            try:
                self.recipe = load_yaml(rp.read_text(encoding="utf-8"), str(rp)) or {}
            except yaml.YAMLError as e:
                self.problems.append(f"{rp}: not valid YAML ({e})")
        self.stats = _load_json(run_dir / "data" / "stats.json", self.problems)
        self.train_manifest = _load_json(run_dir / "train" / "manifest.json", self.problems)
        self.tokens = _load_json(run_dir / "tokens" / "manifest.json", self.problems)
        self.results = _load_json(run_dir / "eval" / "results.json", self.problems)
        self.plt = _plt()

    # -- overview ---------------------------------------------------------------------------
    def overview(self) -> str:
        kpis = []
        if self.stats:
            d = self.stats["documents"]
            kpis.append(("documents kept", f"{d['kept']:,} / {d['input']:,}"))
        if self.tokens:
            kpis.append(("training tokens available", f"{self.tokens['totals']['tokens']:,}"))
        if self.train_manifest:
            tm = self.train_manifest
            kpis.append(("steps", f"{tm.get('steps', 0):,}"))
            kpis.append(("final train loss", _num(tm.get("final_loss"), ".3f")))
            if tm.get("val_loss") is not None:
                kpis.append(("validation loss", _num(tm.get("val_loss"), ".3f")))
            kpis.append(("parameters", f"{tm.get('params', 0) / 1e6:.2f} M"))
        if self.results and self.results.get("perplexity"):
            bpb = [v.get("bits_per_byte") for v in self.results["perplexity"].values() if isinstance(v, dict)]
            bpb = [b for b in bpb if b is not None]
            if bpb:
                kpis.append(("bits/byte (mean of domains)", f"{sum(bpb) / len(bpb):.3f}"))
        out = "".join(f'<span class="kpi"><b>{_e(v)}</b>{_e(k)}</span>' for k, v in kpis)
        stages = self.run.get("stages", {})
        if stages:
            rows = [[n, r.get("status", ""), r.get("action", ""), _num(r.get("duration_s"), ".1f"),
                     r.get("reason") or r.get("error") or ""] for n, r in stages.items()]
            out += _table(["stage", "status", "last action", "seconds", "note"], rows)
        else:
            out += _note("no run.json: stages were run one by one (smelt data / tokenizer / pack / train)")
        if self.problems:
            out += "".join(f'<p class="bad">{_e(p)}</p>' for p in self.problems)
        return out

    # -- data -------------------------------------------------------------------------------
    def data(self) -> str:
        p = self.run_dir / "data" / "stats.json"
        s = self.stats
        if not s:
            return _not_run("data", p)
        d = s["documents"]
        ok = d["input"] == d["kept"] + d["rejected"] + d["duplicates"]
        out = (f'<p>Accounting: input {d["input"]:,} = kept {d["kept"]:,} + rejected {d["rejected"]:,} + '
               f'duplicates {d["duplicates"]:,} <span class="{"good" if ok else "bad"}">'
               f'{"holds" if ok else "DOES NOT HOLD"}</span>. Bytes: {s["bytes"]["input"]:,} in, '
               f'{s["bytes"]["kept"]:,} kept ({s["bytes"]["kept"] / max(1, s["bytes"]["input"]):.0%}).</p>')
        # documents remaining after each step (steps apply to some domains; drops are cumulative)
        names, remain, dropped = ["input"], [d["input"]], [0]
        cur = d["input"]
        for st in s["steps"]:
            n = st["total"].get("dropped_total", sum(st["total"].get("dropped", {}).values()))
            if st["name"] == "read" and n == 0:
                continue
            cur -= n
            names.append(st["name"])
            remain.append(cur)
            dropped.append(n)
        plt = self.plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 2]})
        ax = axes[0]
        ax.bar(range(len(names)), remain, color="#4c78a8")
        ax.bar(range(len(names)), dropped, bottom=remain, color="#e45756", alpha=0.7, label="dropped here")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylabel("documents")
        ax.set_title("documents remaining after each step")
        ax.legend(loc="lower left")
        ax = axes[1]
        doms = list(s["by_domain"])
        x = range(len(doms))
        bi = [s["by_domain"][k]["bytes_in"] / 1e6 for k in doms]
        bk = [s["by_domain"][k]["bytes_kept"] / 1e6 for k in doms]
        ax.bar([i - 0.2 for i in x], bi, width=0.4, label="bytes in", color="#9ecae9")
        ax.bar([i + 0.2 for i in x], bk, width=0.4, label="bytes kept", color="#4c78a8")
        ax.set_xticks(list(x), doms)
        ax.set_ylabel("MB")
        ax.set_title("bytes per domain")
        ax.legend()
        out += _fig(fig, "curation funnel")
        rows = [[k, v["input"], v["kept"], v["rejected"], v["duplicates"], _num(v["bytes_in"] / 1e6, ".2f"),
                 _num(v["bytes_kept"] / 1e6, ".2f")] for k, v in s["by_domain"].items()]
        out += "<h3>Per domain</h3>" + _table(["domain", "input", "kept", "rejected", "duplicates", "MB in", "MB kept"],
                                              rows)
        rows = [[st["name"], st["total"]["seen"], st["total"]["kept"],
                 ", ".join(f"{r} {n:,}" for r, n in st["total"].get("dropped", {}).items()) or "–",
                 ", ".join(f"{c} {n:,}" for c, n in st["total"].get("counters", {}).items()) or "–"]
                for st in s["steps"]]
        out += "<h3>Steps</h3>" + _table(["step", "seen", "passed", "dropped (reason)", "counters"], rows)
        reasons = dict(s.get("rejects_by_reason", {}))
        for st in s["steps"]:
            if st["name"] in ("exact_dedup", "minhash_dedup"):
                for r, n in st["total"].get("dropped", {}).items():
                    reasons[f"{st['name']}/{r}"] = n
        if reasons:
            items = sorted(reasons.items(), key=lambda kv: -kv[1])[:20]
            fig, ax = plt.subplots(figsize=(8, 0.3 * len(items) + 0.8))
            ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#e45756")
            ax.set_xlabel("documents")
            ax.set_title("rejects and duplicates by reason")
            out += _fig(fig, "rejects by reason")
        if s.get("read_errors"):
            out += "<h3>Unreadable records</h3>" + _table(
                ["source", "reason", "error"], [[e.get("source"), e.get("reason"), e.get("error")]
                                                 for e in s["read_errors"][:10]])
        out += self._planted()
        return out

    def _planted(self) -> str:
        try:
            from smelt.demo.outcomes import planted_outcomes

            labels = planted_outcomes(self.run_dir / "data")
        except Exception as e:  # a damaged shard must not break the whole report
            return _note(f"planted-problem check unavailable: {type(e).__name__}: {e}")
        if not labels:
            return ""
        rows = []
        for label, v in labels.items():
            frac = v["caught"] / max(1, v["planted"])
            cls = "good" if frac >= 0.95 else "bad"
            outcomes = "; ".join(f"{o} {n}" for o, n in v["outcomes"].items())
            rows.append([_e(label), v["planted"], _e(v["expected"]),
                         f'<span class="{cls}">{v["caught"]} ({frac:.0%})</span>', _e(outcomes)])
        names = list(labels)[::-1]
        fig, ax = self.plt.subplots(figsize=(7, 0.32 * len(names) + 1.0))
        ax.barh(names, [labels[n]["planted"] for n in names], color="#d0d5dd", label="planted")
        ax.barh(names, [labels[n]["caught"] for n in names], color="#54a24b", label="caught (expected outcome)")
        ax.set_xlabel("documents")
        ax.set_title("planted problems caught by curation")
        ax.legend(fontsize=7)
        return ("<h3>Planted problems: caught?</h3><p>Each synthetic web page carries the problem planted in it "
                "(<code>meta.planted</code>); this is what curation did with each.</p>"
                + _table(["planted", "documents", "expected", "caught", "outcomes"], rows, raw=True)
                + _fig(fig, "planted problems caught"))

    # -- dedup ------------------------------------------------------------------------------
    def dedup(self) -> str:
        s = self.stats
        if not s:
            return _not_run("data", self.run_dir / "data" / "stats.json")
        out = ""
        rows = []
        for st in s["steps"]:
            if st["name"] in ("exact_dedup", "minhash_dedup", "line_dedup"):
                rows.append([st["name"], st["total"]["seen"], sum(st["total"].get("dropped", {}).values()),
                             ", ".join(f"{c} {n:,}" for c, n in st["total"].get("counters", {}).items()) or "–"])
        if rows:
            out += _table(["step", "seen", "removed", "counters"], rows)
        sizes = {int(k): v for k, v in (s.get("minhash_cluster_sizes") or {}).items()}
        if sizes:
            fig, ax = self.plt.subplots(figsize=(6, 2.8))
            ks = sorted(sizes)
            ax.bar([str(k) for k in ks], [sizes[k] for k in ks], color="#72b7b2")
            ax.set_yscale("log")
            ax.set_xlabel("documents in the cluster")
            ax.set_ylabel("clusters")
            ax.set_title("MinHash near-duplicate cluster sizes")
            out += _fig(fig, "dedup cluster sizes")
            out += _table(["cluster size", "clusters"], [[k, sizes[k]] for k in ks])
        else:
            out += _note("no near-duplicate clusters (or MinHash dedup disabled)")
        return out

    # -- pii --------------------------------------------------------------------------------
    def pii(self) -> str:
        s = self.stats
        if not s:
            return _not_run("data", self.run_dir / "data" / "stats.json")
        st = next((x for x in s["steps"] if x["name"] == "pii"), None)
        if st is None:
            return _note("PII redaction was not enabled in this run")
        types = ("email", "phone", "id_card", "bank_card", "ip", "ssn", "iban", "boilerplate")
        doms = list(st["by_domain"])
        rows = [[t, *[st["by_domain"][d].get("counters", {}).get(t, 0) for d in doms],
                 st["total"].get("counters", {}).get(t, 0)] for t in types]
        rows.append(["documents redacted", *[st["by_domain"][d].get("counters", {}).get("docs_redacted", 0)
                                             for d in doms], st["total"].get("counters", {}).get("docs_redacted", 0)])
        out = _table(["type", *doms, "all"], rows)
        tot = st["total"].get("counters", {})
        vals = [tot.get(t, 0) for t in types]
        if any(vals):
            fig, ax = self.plt.subplots(figsize=(6, 2.6))
            ax.bar(types, vals, color="#b279a2")
            ax.set_title("PII replaced, by type")
            ax.set_ylabel("occurrences")
            out += _fig(fig, "pii counts")
        return out

    # -- model-based scores -----------------------------------------------------------------
    def scores(self) -> str:
        specs = _score_specs(self.stats)
        read = _read_scores(self.run_dir / "data", specs)
        capped = " and ".join(sorted(read["capped"]))
        out = (f"<p>Scores written to <code>meta</code> by the curation steps, read from the first documents "
               f"of <code>data/clean</code> (kept: {read['scanned'].get('kept', 0):,} read) and "
               f"<code>data/rejects</code> (rejected: {read['scanned'].get('rejected', 0):,} read), at most "
               f"{SCORE_DOCS:,} scored documents per domain and outcome"
               f"{f' (the limit was reached for {capped} documents)' if capped else ''}. Rejected documents "
               f"include those rejected by later steps; those rejected before a step carry no score of it.</p>")
        out += "".join(f'<p class="bad">{_e(p)}</p>' for p in read["problems"])
        plt = self.plt
        for sp in specs:
            key, better = sp["key"], "higher" if sp.get("higher_is_better", True) else "lower"
            rule = f", rule {sp['rule']}" if sp.get("rule") else ""
            out += (f"<h3>{_e(sp.get('label') or key)}</h3><p><code>meta.{_e(key)}</code>, step "
                    f"{_e(sp['step'])}{_e(rule)}; {better} is better.</p>")
            cut_rows = [[g, name, _num(v, ".4g")] for g, cut in sp["cutoffs"].items() if isinstance(cut, dict)
                        for name, v in cut.items()]
            out += _table(["group", "cutoff", "value"], cut_rows) if cut_rows else _note(
                "no cutoffs (the step scores only, or keeps by a random draw)")
            per = read["values"][key]
            doms = [d for d in sorted(per) if per[d]["kept"] or per[d]["rejected"]]
            if not doms:
                out += _note(f"no document read carries meta.{key}")
                continue
            cols = min(3, len(doms))
            rows_n = -(-len(doms) // cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.9 * rows_n), squeeze=False)
            for ax in axes.flat[len(doms):]:
                ax.axis("off")
            for ax, d in zip(axes.flat, doms):
                self._score_hist(ax, per[d], _domain_cutoffs(sp["cutoffs"], d), f"{d}")
                ax.set_xlabel(f"{key} ({better} is better)")
            fig.tight_layout()
            out += _fig(fig, f"{key} per domain")
            out += _table(["domain", "kept, scored", "rejected, scored", "median kept", "median rejected"],
                          [[d, len(per[d]["kept"]), len(per[d]["rejected"]), _num(_median(per[d]["kept"]), ".4g"),
                            _num(_median(per[d]["rejected"]), ".4g")] for d in doms])
            for d in doms:
                near = read["nearest"][key].get(d)
                if near is None or not (near.above or near.below):
                    continue
                lang = f", language {near.lang}" if near.lang else ""
                out += (f"<h4>{_e(d)}: the documents nearest the cutoff {_num(near.threshold, '.4g')}{_e(lang)}</h4>"
                        + _table(["side", "id", "score", "outcome", f"first {SCORE_SNIPPET} characters"],
                                 [[side, i, _num(v, ".4g"), o, text] for side, i, v, o, text in near.rows()]))
        return out

    @staticmethod
    def _score_hist(ax: Any, values: dict[str, list[float]], cuts: list[tuple[str | None, str, float]],
                    title: str) -> None:
        """Kept and rejected stacked on the same bins, each cutoff a labelled vertical line. The bins
        span the 0.5th to 99.5th percentile (and every cutoff); values outside fall in the end bins."""
        import numpy as np

        allv = np.asarray(values["kept"] + values["rejected"], dtype=np.float64)
        lo, hi = (float(x) for x in np.percentile(allv, [0.5, 99.5]))
        lo, hi = min([lo, *(c[2] for c in cuts)]), max([hi, *(c[2] for c in cuts)])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        data = [np.clip(np.asarray(values[k], dtype=np.float64), lo, hi) for k in ("kept", "rejected")]
        ax.hist(data, bins=bins, stacked=True, color=["#4c78a8", "#e45756"],
                label=[f"kept ({len(values['kept']):,})", f"rejected ({len(values['rejected']):,})"])
        colors = ["#111827", "#f58518", "#54a24b", "#b279a2", "#9d755d"]
        for j, (lang, name, v) in enumerate(cuts):
            ax.axvline(v, color=colors[j % len(colors)], ls="--", lw=1.1,
                       label=f"{name}{f' ({lang})' if lang else ''} = {v:.3g}")
        ax.set_title(title)
        ax.set_ylabel("documents")
        ax.legend(fontsize=6)

    # -- tokenizer --------------------------------------------------------------------------
    def tokenizer(self) -> str:
        p = self.run_dir / "tokenizer" / "stats.json"
        st = _load_json(p, self.problems)
        if not st:
            return _not_run("tokenizer", p)
        out = (f"<p>{_e(st.get('kind', 'bpe'))} vocabulary {st['vocab_size']:,} ({st.get('learned_tokens', 0):,} "
               f"learned, {st.get('special_tokens', 0)} special), trained on {st.get('train_chars', 0):,} "
               f"characters from {st.get('train_docs', 0):,} documents in {st.get('train_seconds', 0):.1f}s.</p>")
        ev = _load_json(self.run_dir / "tokenizer" / "eval.json", self.problems)
        if not ev:
            return out + _note("no tokenizer/eval.json (run `smelt tokenizer eval`)")
        t = ev["tokenizer"]
        rows = [[k, v["docs"], v["tokens"], _num(v["bytes_per_token"], ".2f"), _num(v["chars_per_token"], ".2f"),
                 v.get("roundtrip_failures", 0)] for k, v in [*t["domains"].items(), *t["languages"].items(),
                                                               ("all", t["overall"])]]
        out += _table(["domain / language", "docs", "tokens", "bytes/token", "chars/token", "round-trip failures"],
                      rows)
        out += (f"<p>Vocabulary used on these documents: {t['vocab_used']:,} ids "
                f"({t['vocab_used_share']:.0%}). Round trip: {t['roundtrip']['failures']} failures in "
                f"{t['roundtrip']['checked']:,} documents.</p>")
        doms = list(t["domains"])
        fig, ax = self.plt.subplots(figsize=(6, 2.6))
        ax.bar(doms, [t["domains"][d]["bytes_per_token"] or 0 for d in doms], color="#54a24b")
        ax.set_ylabel("bytes per token")
        ax.set_title("tokenizer compression per domain (higher is better)")
        return out + _fig(fig, "tokenizer compression")

    # -- tokens -----------------------------------------------------------------------------
    def tokens_section(self) -> str:
        p = self.run_dir / "tokens" / "manifest.json"
        m = self.tokens
        if not m:
            return _not_run("pack", p)
        doms = list(m["domains"])
        tr = {d: m["domains"][d]["train"]["tokens"] for d in doms}
        total = sum(tr.values()) or 1
        weights = ((self.recipe.get("loader") or {}).get("weights")) or None
        wsum = sum(weights.values()) if weights else 0
        rows = []
        for d in doms:
            dd = m["domains"][d]
            mix = weights.get(d, 0) / wsum if weights and wsum else tr[d] / total
            rows.append([d, dd["train"]["docs"], dd["train"]["tokens"], dd["val"]["docs"], dd["val"]["tokens"],
                         f"{tr[d] / total:.1%}", f"{mix:.1%}"])
        out = _table(["domain", "train docs", "train tokens", "val docs", "val tokens", "share of tokens",
                      "training mixture"], rows)
        out += (f"<p>{m['totals']['tokens']:,} tokens, dtype {_e(m['dtype'])}, vocabulary {m['vocab_size']:,}; "
                f"mixture {'from loader.weights' if weights else 'by token count'}.</p>")
        fig, axes = self.plt.subplots(1, 2, figsize=(9, 3))
        axes[0].pie([tr[d] for d in doms], labels=doms, autopct="%1.0f%%")
        axes[0].set_title("tokens available")
        mix = [weights.get(d, 0) for d in doms] if weights else [tr[d] for d in doms]
        axes[1].pie(mix, labels=doms, autopct="%1.0f%%")
        axes[1].set_title("training mixture")
        return out + _fig(fig, "token mixture")

    # -- training ---------------------------------------------------------------------------
    def _metrics(self) -> tuple[list[dict], list[dict], list[dict]]:
        p = self.run_dir / "train" / "metrics.jsonl"
        train, val, events = [], [], []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= MAX_METRIC_LINES:
                    break
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; the trainer truncates such tails on resume
                kind = r.get("kind", "train")
                (val if kind == "val" else events if kind == "event" else train).append(r)
        return train, val, events

    def training(self) -> str:
        p = self.run_dir / "train" / "metrics.jsonl"
        if not p.is_file():
            return _not_run("train", p)
        train, val, events = self._metrics()
        if not train:
            return _note(f"{p} holds no training steps yet")
        tm = self.train_manifest or {}
        out = ""
        if tm:
            out += (f"<p>{tm.get('steps', 0):,} steps, {tm.get('tokens', 0):,} tokens, "
                    f"{tm.get('params', 0):,} parameters, {_e(tm.get('precision', ''))} on {_e(tm.get('device', ''))}"
                    f"; {'complete' if tm.get('complete') else 'not complete'}"
                    f"{', resumed from ' + _e(tm['resumed_from']) if tm.get('resumed_from') else ''}.</p>")
        plt = self.plt
        steps = [r["step"] for r in train]
        fig, axes = plt.subplots(2, 2, figsize=(11, 6.4))
        ax = axes[0][0]
        ax.plot(steps, [r.get("loss") for r in train], label="train", color="#4c78a8")
        if val:
            ax.plot([r["step"] for r in val], [r.get("val_loss") for r in val], "o-", label="validation",
                    color="#f58518")
        for ev in events:
            ax.axvline(ev.get("step", 0), color="#e45756", ls="--", lw=0.8)
        ax.set_title("loss (nats/token)")
        ax.set_xlabel("step")
        ax.legend()
        ax = axes[0][1]
        doms = sorted({d for r in train for d in (r.get("loss_by_domain") or {})})
        for d in doms:
            pts = [(r["step"], r["loss_by_domain"][d]) for r in train if d in (r.get("loss_by_domain") or {})]
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=f"{d} (train)", lw=1)
        vdoms = sorted({d for r in val for d in (r.get("val_loss_by_domain") or {})})
        for d in vdoms:
            pts = [(r["step"], r["val_loss_by_domain"][d]) for r in val if d in (r.get("val_loss_by_domain") or {})]
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o--", label=f"{d} (val)", ms=3)
        ax.set_title("loss per domain")
        ax.set_xlabel("step")
        if doms or vdoms:
            ax.legend(fontsize=7)
        ax = axes[1][0]
        ax.plot(steps, [r.get("lr") for r in train], color="#54a24b", label="learning rate")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("grad_norm") for r in train], color="#b279a2", lw=0.8, label="grad norm")
        ax2.set_ylabel("grad norm (before clipping)")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7)
        ax.set_title("learning rate and gradient norm")
        ax = axes[1][1]
        ax.plot(steps, [r.get("tokens_per_s") for r in train], color="#4c78a8")
        ax.set_ylabel("tokens/s")
        ax.set_xlabel("step")
        ax3 = ax.twinx()
        ax3.plot(steps, [100 * (r.get("mfu") or 0) for r in train], color="#f58518", lw=0.8)
        ax3.set_ylabel("MFU %")
        ax.set_title("throughput and MFU")
        fig.tight_layout()
        out += _fig(fig, "training curves")
        first, last = train[0], train[-1]
        fell = (last.get("loss") or 0) < (first.get("loss") or 0)
        out += (f'<p>Loss {first.get("loss", 0):.3f} at step {first["step"]} → {last.get("loss", 0):.3f} at step '
                f'{last["step"]} <span class="{"good" if fell else "bad"}">{"fell" if fell else "did not fall"}'
                f'</span>. Throughput (last logged): {_num(last.get("tokens_per_s"), ",.0f")} tokens/s, MFU '
                f'{100 * (last.get("mfu") or 0):.2f}%, {_num(last.get("tflops"), ".3f")} TFLOP/s.</p>')
        if events:
            out += "<h3>Stability events (spikes, NaN, rollbacks)</h3>" + _table(
                ["step", "event", "action", "loss", "grad norm", "reason"],
                [[e.get("step"), e.get("event"), e.get("action"), _num(e.get("loss"), ".4g"),
                  _num(e.get("grad_norm"), ".4g"), e.get("reason", "")] for e in events[:50]])
        else:
            out += "<p>Stability events: none (no NaN, spike, skip or rollback).</p>"
        if tm.get("timings"):
            out += "<h3>Trainer time</h3>" + _table(["part", "seconds"], [[k, _num(v, ".1f")]
                                                                        for k, v in tm["timings"].items()])
        return out

    # -- evaluation -------------------------------------------------------------------------
    def evaluation(self) -> str:
        p = self.run_dir / "eval" / "results.json"
        r = self.results
        if not r:
            st = self.run.get("stages", {}).get("eval", {})
            extra = f" ({st['reason']})" if st.get("reason") else ""
            return _note(f"stage not run: eval{extra} (no results.json in {p.parent})")
        out = (f"<p>Checkpoint {_e(r.get('checkpoint'))}, step {_e(r.get('step'))}, "
               f"{_num(r.get('tokens_seen'))} training tokens seen.</p>")
        ppl = r.get("perplexity") or {}
        if ppl:
            rows = [[d, _num(v.get("loss"), ".4f"), _num(v.get("ppl"), ".2f"), _num(v.get("bits_per_byte"), ".4f"),
                     _num(v.get("word_ppl"), ".2f"), _num(v.get("tokens")), _num(v.get("docs"))]
                    for d, v in ppl.items() if isinstance(v, dict)]
            out += "<h3>Held-out perplexity</h3>" + _table(
                ["domain", "loss", "perplexity", "bits/byte", "word perplexity", "tokens", "docs"], rows)
        tasks = r.get("tasks") or {}
        if tasks:
            rows = []
            for t, v in tasks.items():
                acc, rnd = v.get("acc"), v.get("random")
                better = acc is not None and rnd is not None and acc > rnd
                vs_random = f'<span class="{"good" if better else "note"}">{"above" if better else "not above"}</span>'
                rows.append([_e(t), _num(acc, ".3f"), _num(v.get("acc_norm"), ".3f"), _num(rnd, ".3f"), vs_random,
                             _num(v.get("n")), _num(v.get("skipped", 0)), _num(v.get("shots"))])
            out += "<h3>Benchmarks (log-likelihood multiple choice)</h3>" + _table(
                ["task", "acc", "acc_norm", "random baseline", "vs random", "items", "not scored", "shots"], rows,
                raw=True)
        probes = r.get("probes") or []
        if probes:
            rows = [[pr.get("name"), pr.get("kind"), pr.get("prompt", ""), pr.get("target", ""),
                     _num(pr.get("logprob"), ".3f"), _num(pr.get("rank")),
                     "not scored" if pr.get("unscored") else "yes" if pr.get("passed") else "no"]
                    for pr in probes[:40]]
            out += "<h3>Probability probes</h3>" + _table(
                ["probe", "kind", "prompt", "target", "log p", "rank", "passed"], rows)
        png = self.run_dir / "eval" / "probes.png"
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            out += f'<img class="fig" alt="probes across checkpoints" src="data:image/png;base64,{data}">'
        return out

    # -- samples ----------------------------------------------------------------------------
    def samples(self) -> str:
        p = self.run_dir / SAMPLES_FILE
        s = _load_json(p, self.problems)
        if not s:
            return _note(f"no samples ({p.name} not written: training not run, or generation not available)")
        if s.get("error"):
            return _note(f"samples not generated: {s['error']}")
        out = (f"<p>Checkpoint {_e(s.get('checkpoint'))}; {s.get('max_new_tokens')} new tokens, temperature "
               f"{s.get('temperature')}, seed {s.get('seed')}.</p>")
        for it in s.get("samples", []):
            out += f'<div class="sample"><b>{_e(it["prompt"])}</b>{_e(it["completion"])}</div>'
        return out

    # -- recipe / timings -------------------------------------------------------------------
    def recipe_section(self) -> str:
        p = self.run_dir / "recipe.yaml"
        if not p.is_file():
            return _note(f"no resolved recipe ({p})")
        return f"<pre>{_e(p.read_text(encoding='utf-8'))}</pre>"

    def timings(self) -> str:
        stages = self.run.get("stages", {})
        rows = [(n, r.get("duration_s")) for n, r in stages.items() if r.get("duration_s") is not None]
        if not rows:
            return _note("no run.json with stage timings (stages run one by one)")
        out = _table(["stage", "seconds", "started", "ended"],
                     [[n, _num(d, ".1f"), stages[n].get("started_at", ""), stages[n].get("ended_at", "")]
                      for n, d in rows])
        fig, ax = self.plt.subplots(figsize=(7, 0.35 * len(rows) + 0.8))
        ax.barh([n for n, _ in rows][::-1], [d for _, d in rows][::-1], color="#4c78a8")
        ax.set_xlabel("seconds (last execution that did work)")
        out += _fig(fig, "stage timings")
        inv = self.run.get("last_invocation") or {}
        if inv.get("duration_s") is not None:
            out += (f"<p>Last <code>smelt run</code>: {inv['duration_s']:.1f}s, ran "
                    f"{_e(', '.join(inv.get('ran') or []) or 'nothing (all up to date)')}.</p>")
        return out

    # -- scaling (smelt scaling sweep / fit) -------------------------------------------------
    def scaling(self) -> str:
        from smelt.scaling.points import read_points

        d = self.run_dir / "scaling"
        if not (d / "points.csv").is_file():
            return _not_run("scaling sweep", d / "points.csv")
        points = read_points(d / "points.csv")
        out = f"<p>{len(points)} runs (<code>scaling/points.csv</code>).</p>"
        out += _table(["run", "params N", "tokens D", "D/N", "6ND FLOPs", "loss"],
                      [[p.run_dir, _num(p.params), _num(p.tokens), _num(p.tokens / p.params, ".1f"),
                        _num(p.flops, ".2e"), _num(p.loss, ".4f")] for p in points])
        fit = _load_json(d / "fit.json", [])
        if fit is None:
            return out + _note(f"no fit yet: smelt scaling fit {d / 'points.csv'}")
        ci = fit.get("ci", {})
        out += _table(["", "E", "A", "B", "alpha", "beta", "N_opt ~ C^a", "D_opt ~ C^b"],
                      [["approach 3"] + [_num(fit[k], ".4g") for k in ("E", "A", "B", "alpha", "beta", "a", "b")],
                       ["95% interval"] + [f"{ci[k][0]:.4g}–{ci[k][1]:.4g}" if k in ci else ""
                                           for k in ("E", "A", "B", "alpha", "beta", "a", "b")]])
        a2 = fit.get("approach2") or {}
        if a2.get("a") is not None:
            out += f"<p>Approach 2 (IsoFLOP parabolas): N_opt ~ C^{a2['a']:.3f}, D_opt ~ C^{a2['b']:.3f}.</p>"
        out += _table(["budget C", "N_opt", "D_opt", "tokens/param", "predicted loss"],
                      [[_num(o["flops"], ".2e"), _num(o["n_opt"], ".3g"), _num(o["d_opt"], ".3g"),
                        _num(o["tokens_per_param"], ".1f"), _num(o["loss"], ".4f")] for o in fit.get("optimal", [])])
        for name in ("fit_loss_vs_params.png", "isoflop.png", "frontier.png"):
            if (d / name).is_file():
                data = base64.b64encode((d / name).read_bytes()).decode("ascii")
                out += f'<img class="fig" alt="{_e(name)}" src="data:image/png;base64,{data}">'
        return out

    # -- page -------------------------------------------------------------------------------
    def sections(self) -> list[tuple[str, str]]:
        """`SECTIONS`, with the optional ones this run has inputs for: model-based scores after PII
        when a curation step declared scores."""
        out = list(SECTIONS)
        if _score_specs(self.stats):
            out.insert(out.index(("pii", "PII")) + 1, SCORES_SECTION)
        return out

    def render(self) -> str:
        makers: dict[str, Callable[[], str]] = {
            "overview": self.overview, "data": self.data, "dedup": self.dedup, "pii": self.pii,
            "scores": self.scores, "tokenizer": self.tokenizer, "tokens": self.tokens_section,
            "training": self.training, "evaluation": self.evaluation, "samples": self.samples,
            "recipe": self.recipe_section, "timings": self.timings, "scaling": self.scaling}
        sections = self.sections()
        body = []
        for sid, title in sections:
            try:
                content = makers[sid]()
            except Exception as e:  # one broken input must not cost the whole report
                log.warning("report: section %s failed: %s: %s", sid, type(e).__name__, e, exc_info=True)
                content = f'<p class="bad">section failed: {_e(type(e).__name__)}: {_e(e)}</p>'
            body.append(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>')
        name = self.recipe.get("name") or self.run_dir.name
        nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t in sections)
        now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>smelt report: {_e(name)}</title><style>{_CSS}</style></head><body><main>"
                f"<h1>smelt run report: {_e(name)}</h1><p class=\"note\">{_e(self.run_dir)} — written {now}</p>"
                f"<nav>{nav}</nav>{''.join(body)}</main></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``run_dir``'s report to ``out`` (default ``run_dir/report.html``); returns the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    page = Report(run_dir).render()
    path = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(path, page)
    log.info("report: %s (%.0f kB)", path, len(page) / 1e3)
    return path


def write_report_png(report_html: str | Path, out: str | Path, columns: int = 2) -> Path:
    """A one-picture summary of a report (e.g. for a README): its embedded figures in a grid."""
    import re

    plt = _plt()
    from matplotlib import image as mpimg

    page = Path(report_html).read_text(encoding="utf-8")
    pngs = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    if not pngs:
        raise ValueError(f"{report_html}: no figures to render")
    imgs = [mpimg.imread(io.BytesIO(b), format="png") for b in pngs]
    rows = -(-len(imgs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, imgs):
        ax.imshow(im)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    from smelt.fsutil import atomic_write_bytes

    atomic_write_bytes(out, buf.getvalue())
    return Path(out)


# --------------------------------------------------------------------------------------------
# samples


def generate_samples(run_dir: str | Path, recipe: Any | None = None, *, seed: int = 0) -> dict[str, Any] | None:
    """Generate the report's text samples from the run's newest checkpoint into
    ``run_dir/report_samples.json`` (reused when it names the same checkpoint and settings).

    Settings come from ``recipe.run`` (default: the run's recipe.yaml). Returns what was written,
    or None when there is no checkpoint; a missing generator or a failure is recorded, not raised.
    """
    from smelt.config import RunConfig

    run_dir = Path(run_dir)
    if recipe is None and (run_dir / "recipe.yaml").is_file():
        from smelt.config import RecipeError, load_recipe

        try:
            recipe = load_recipe(run_dir / "recipe.yaml")
        except RecipeError as e:
            log.warning("report: %s; samples use default settings", e)
    rc = recipe.run if recipe is not None else RunConfig()
    if rc.samples == 0:
        return None
    from smelt.train.checkpoint import find_latest

    latest = find_latest(run_dir / "train" / "checkpoints")
    if latest is None:
        return None
    prompts = [rc.sample_prompts[i % len(rc.sample_prompts)] for i in range(rc.samples)] if rc.sample_prompts else []
    settings = {"checkpoint": latest.name, "prompts": prompts, "max_new_tokens": rc.sample_tokens,
                "temperature": rc.sample_temperature, "top_k": 50, "seed": seed}
    path = run_dir / SAMPLES_FILE
    if path.is_file():
        try:
            old = read_json(path)
            if all(old.get(k) == v for k, v in settings.items()) and not old.get("error"):
                return old
        except ValueError:
            pass
    try:
        from smelt.eval.generate import generate_text
        from smelt.interop.load import load_model
    except ImportError as e:
        res = {**settings, "error": f"generation is not part of this build ({e})", "samples": []}
        atomic_write_json(path, res)
        return res
    try:
        loaded = load_model(latest)
        outs = generate_text(loaded, prompts, max_new_tokens=rc.sample_tokens, temperature=rc.sample_temperature,
                             top_k=50, seed=seed)
        res = {**settings, "samples": [{"prompt": p, "completion": o} for p, o in zip(prompts, outs, strict=True)]}
    except Exception as e:  # samples are decoration: record why, keep the report
        log.warning("report: samples failed: %s: %s", type(e).__name__, e)
        res = {**settings, "error": f"{type(e).__name__}: {e}", "samples": []}
    atomic_write_json(path, res)
    return res
