"""Probability probes ("概率探针"): what a checkpoint believes about a few chosen facts.

A probe file is YAML (a list, or a mapping with a ``probes:`` list) or JSONL (one probe per
line). Two kinds:

``target``   ``{name, prompt: "", target, pass_rank: 1}``: ``logprob`` = log P(target | prompt) of the
             whole target (nats, summed over its tokens), ``rank`` = 1-based rank of the target's
             first token among the whole vocabulary at the position after the prompt (1 = the
             model's top choice), ``greedy`` = every target token is the argmax. Passed when
             ``rank <= pass_rank``.
``compare``  ``{name, a, b, prompt: "", expect: a}``: perplexity of text A and of text B (each
             after the optional shared prompt, per token of A resp. B); passed when the expected
             one (``expect``, default ``a``) has the lower perplexity. ``margin`` =
             ln PPL(other) - ln PPL(expected): positive when the expectation holds.

Each result's ``score`` is the number tracked across checkpoints: ``logprob`` for target probes,
``margin`` for comparisons (`write_history` writes eval/probes.csv and eval/probes.png).

Prompts are encoded as lm-eval encodes a (context, continuation) pair (`encode_pair`) after the
document-start token, so ``"The capital of France is"`` + ``" Paris"`` scores the ids the model
sees in running text. A probe that cannot be scored (an empty text, or one longer than the
window) is reported with ``unscored`` (the reason) and fails no run. The packaged default set is
``smelt/resources/probes/default.yaml``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from smelt.eval.perplexity import Request, Unscorable, encode_pair, score_requests
from smelt.fsutil import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["Probe", "ProbeFormatError", "load_probes", "load_probe_files", "run_probes", "write_history",
           "DEFAULT_PROBES"]

DEFAULT_PROBES = "default"
_TARGET_KEYS = {"name", "kind", "prompt", "target", "pass_rank"}
_COMPARE_KEYS = {"name", "kind", "prompt", "a", "b", "expect"}


class ProbeFormatError(ValueError):
    """A probe file that cannot be read; the message names the file and the line or entry."""


@dataclass(frozen=True)
class Probe:
    name: str
    kind: str  # "target" | "compare"
    prompt: str = ""
    target: str | None = None
    a: str | None = None
    b: str | None = None
    expect: str = "a"
    pass_rank: int = 1
    source: str = ""  # file:line or file[entry], for messages


def _probe(obj: Any, where: str) -> Probe:
    if not isinstance(obj, dict):
        raise ProbeFormatError(f"{where}: a probe must be a mapping, got {type(obj).__name__}")
    kind = obj.get("kind") or ("compare" if "a" in obj or "b" in obj else "target")
    if kind not in ("target", "compare"):
        raise ProbeFormatError(f"{where}: kind must be 'target' or 'compare', got {kind!r}")
    allowed = _TARGET_KEYS if kind == "target" else _COMPARE_KEYS
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProbeFormatError(f"{where}: unknown key(s) {unknown} for a {kind} probe; allowed: {sorted(allowed)}")
    for k in ("name", "target") if kind == "target" else ("name", "a", "b"):
        if not isinstance(obj.get(k), str) or not obj[k]:
            raise ProbeFormatError(f"{where}: {kind} probe needs a non-empty string {k!r}")
    if not isinstance(obj.get("prompt", ""), str):
        raise ProbeFormatError(f"{where}: 'prompt' must be a string")
    if kind == "target":
        pr = obj.get("pass_rank", 1)
        if not isinstance(pr, int) or isinstance(pr, bool) or pr < 1:
            raise ProbeFormatError(f"{where}: pass_rank must be an integer >= 1, got {pr!r}")
        return Probe(obj["name"], "target", obj.get("prompt", ""), target=obj["target"], pass_rank=pr, source=where)
    expect = obj.get("expect", "a")
    if expect not in ("a", "b"):
        raise ProbeFormatError(f"{where}: expect must be 'a' or 'b' (the text expected to have the lower "
                               f"perplexity), got {expect!r}")
    return Probe(obj["name"], "compare", obj.get("prompt", ""), a=obj["a"], b=obj["b"], expect=expect, source=where)


def load_probes(path: str | Path, text: str | None = None) -> list[Probe]:
    """Probes of one YAML or JSONL file (``text``: its content, when already read)."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProbeFormatError(f"{path}: probe file not found") from None
        except UnicodeDecodeError as e:
            raise ProbeFormatError(f"{path}: not UTF-8 ({e})") from None
    probes: list[Probe] = []
    if path.suffix in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbeFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            probes.append(_probe(obj, f"{path}:{lineno}"))
    else:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            raise ProbeFormatError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if isinstance(doc, dict):
            doc = doc.get("probes")
        if not isinstance(doc, list):
            raise ProbeFormatError(f"{path}: expected a list of probes or a mapping with a `probes:` list")
        for i, obj in enumerate(doc):
            name = obj.get("name") if isinstance(obj, dict) else None
            probes.append(_probe(obj, f"{path}: probes[{i}]" + (f" ({name})" if name else "")))
    seen: dict[str, str] = {}
    for p in probes:
        if p.name in seen:
            raise ProbeFormatError(f"{p.source}: duplicate probe name {p.name!r} (first at {seen[p.name]})")
        seen[p.name] = p.source
    return probes


def load_probe_files(paths: Sequence[str]) -> list[Probe]:
    """Probes of every file in order; ``default`` is the packaged set. Names must be unique overall."""
    out: list[Probe] = []
    seen: dict[str, str] = {}
    for p in paths:
        if p == DEFAULT_PROBES:
            res = resources.files("smelt") / "resources" / "probes" / "default.yaml"
            probes = load_probes(Path("smelt/resources/probes/default.yaml"), res.read_text(encoding="utf-8"))
        else:
            probes = load_probes(p)
        for pr in probes:
            if pr.name in seen:
                raise ProbeFormatError(f"{pr.source}: probe name {pr.name!r} also defined at {seen[pr.name]}")
            seen[pr.name] = pr.source
        out.extend(probes)
    return out


def run_probes(model: nn.Module, tokenizer: Any, probes: Sequence[Probe], *, prefix_id: int, max_len: int,
               batch_size: int = 8, pad_id: int = 0) -> list[dict[str, Any]]:
    """Score every probe (one batched pass); results in probe order (see the module docstring).

    A probe whose text cannot be scored (`Unscorable`: no tokens, or longer than the window) is
    not fatal: its result has ``"unscored": reason``, ``score`` None and ``passed`` False.
    ``"alone"``: a continuation merged into the prompt's tokens and was encoded on its own
    (`encode_pair`).
    """
    requests: list[Request] = []
    slots: list[tuple[int, ...] | str] = []
    for p in probes:
        texts = [p.target or ""] if p.kind == "target" else [p.a or "", p.b or ""]
        try:
            reqs = [encode_pair(tokenizer, p.prompt, t, prefix_id, max_len=max_len) for t in texts]
        except Unscorable as e:
            log.warning("probes: %s not scored: %s", p.name, e)
            slots.append(str(e))
            continue
        slots.append(tuple(range(len(requests), len(requests) + len(reqs))))
        requests.extend(reqs)
    scores = score_requests(model, requests, batch_size=batch_size, max_len=max_len, pad_id=pad_id, ranks=True)
    out: list[dict[str, Any]] = []
    for p, slot in zip(probes, slots):
        base: dict[str, Any] = {"name": p.name, "kind": p.kind, "prompt": p.prompt}
        base.update({"target": p.target} if p.kind == "target" else {"a": p.a, "b": p.b, "expect": p.expect})
        if isinstance(slot, str):
            out.append({**base, "logprob": None, "rank": None, "passed": False, "score": None, "unscored": slot})
            continue
        alone = any(requests[i].alone for i in slot)
        if p.kind == "target":
            s = scores[slot[0]]
            out.append({**base, "logprob": s.logprob, "rank": s.rank,
                        "passed": bool(s.rank is not None and s.rank <= p.pass_rank), "greedy": s.greedy,
                        "tokens": s.n_tokens, "pass_rank": p.pass_rank, "score": s.logprob, "alone": alone})
        else:
            sa, sb = scores[slot[0]], scores[slot[1]]
            nll_a, nll_b = -sa.logprob / sa.n_tokens, -sb.logprob / sb.n_tokens  # ln PPL
            margin = (nll_b - nll_a) if p.expect == "a" else (nll_a - nll_b)
            out.append({**base, "logprob": None, "rank": None, "passed": margin > 0,
                        "ppl_a": math.exp(nll_a), "ppl_b": math.exp(nll_b), "logprob_a": sa.logprob,
                        "logprob_b": sb.logprob, "tokens_a": sa.n_tokens, "tokens_b": sb.n_tokens,
                        "margin": margin, "score": margin, "alone": alone})
    return out


# --------------------------------------------------------------------------------------------
# across checkpoints

_CSV_COLUMNS = ["probe", "kind", "step", "tokens_seen", "score", "logprob", "rank", "passed", "ppl_a", "ppl_b"]


def write_history(rows: Sequence[dict[str, Any]], eval_dir: str | Path) -> tuple[Path, Path | None]:
    """eval/probes.csv (probe x checkpoint) and eval/probes.png (score vs training tokens).

    ``rows``: one ``{"step", "tokens_seen", "probes": [run_probes result, ...]}`` per checkpoint.
    The plot has one line per probe: log P(target | prompt) for target probes (top panel), the
    perplexity margin for comparisons (bottom panel; above 0 = expected order).
    """
    eval_dir = Path(eval_dir)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_CSV_COLUMNS)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in sorted(rows, key=lambda r: r["step"]):
        for r in row["probes"]:
            w.writerow([r["name"], r["kind"], row["step"], row["tokens_seen"], _fmt(r["score"]), _fmt(r.get("logprob")),
                        r.get("rank") if r.get("rank") is not None else "", int(bool(r["passed"])),
                        _fmt(r.get("ppl_a")), _fmt(r.get("ppl_b"))])
            if r["score"] is not None:  # an unscored probe has a CSV row but no point
                series.setdefault((r["kind"], r["name"]), []).append((row["tokens_seen"], r["score"]))
    csv_path = eval_dir / "probes.csv"
    atomic_write_text(csv_path, buf.getvalue())
    png_path = eval_dir / "probes.png"
    try:
        _plot(series, png_path)
    except ImportError:  # matplotlib is a dependency; a stripped install still gets the CSV
        log.warning("probes: matplotlib not available; %s not written", png_path)
        return csv_path, None
    return csv_path, png_path


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.6g}"


def _plot(series: dict[tuple[str, str], list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("target", "compare") if any(s[0] == k for s in series)]
    fig, axes = plt.subplots(max(1, len(kinds)), 1, figsize=(10, 3.6 * max(1, len(kinds))), squeeze=False)
    labels = {"target": "log P(target | prompt) (nats)", "compare": "ln PPL(other) - ln PPL(expected)"}
    for ax, kind in zip(axes[:, 0], kinds):
        for (k, name), pts in sorted(series.items()):
            if k != kind:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if kind == "compare":
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylabel(labels[kind])
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle("probes across checkpoints")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
