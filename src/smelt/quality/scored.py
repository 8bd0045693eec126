"""Model-based curation steps: score every document, write the score to ``meta``, keep by a rule.

The three steps of this package (``quality``, ``perplexity``, ``toxicity``) share this module.
A step holds one or more `ScoreSpec` (a score function, where its value goes in ``meta``, which
direction is better and a `KeepRule`) and is a `ScoredFilter`: for each batch of documents it
runs every score function once (a model scores a batch in one call), writes each score into
``meta`` (on kept and rejected documents alike, so that a user can study them), then rejects a
document at the first spec whose rule it fails, with that spec's reason.

Keep rules (`KeepRule`, exactly one, or none to score only):

* ``threshold``: keep when the score is at least (higher is better) or at most (lower is better)
  the value.
* ``top_fraction``: keep the best fraction of each group (domain, or domain and language). The
  cutoff is a quantile of the scores of a sample, computed once before the filter phase.
* ``pareto_alpha``: GPT-3's sampling (Brown et al. 2020, Appendix A): keep when a
  Pareto(alpha) draw exceeds ``1 - score``, which keeps most high scores and some low ones; the
  draw is seeded by the document id, so a document's fate does not depend on its task or batch.
  GPT-3 used alpha = 9. Scores must be in [0, 1] (a classifier's probability).
* ``buckets``: CCNet's head/middle/tail (Wenzek et al. 2020, Section 3.3): percentile cutoffs of
  each group's sample split documents into ``head`` (best third by default), ``middle`` and
  ``tail``; the bucket is recorded in ``meta`` and ``keep_buckets`` says which stay.

Cutoffs from a sample (`prepare_cutoffs`): the parent process reads the inputs through the
steps before this one (`smelt.data.curate.steps_before`), takes from each group the
``sample_docs`` documents with the smallest id hash among the first ``scan_docs`` it sees (a
bottom-k sample: deterministic, and not biased to the start of a file), scores them and writes
``<stage _work>/<step>.cutoffs.json``. Every worker reads that file, so all tasks apply the same
cutoffs and a resumed stage reuses it. CCNet sets its perplexity cutoffs the same way, from a
sample per language. The cutoffs and rules are in ``stats.json`` (`ScoredFilter.info`) for the
report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from smelt.data.document import Document
from smelt.data.pipeline import Step
from smelt.data.steps.registry import StepContext
from smelt.fsutil import atomic_write_json, read_json, staged

log = logging.getLogger(__name__)

__all__ = ["KeepRule", "ScoreSpec", "ScoredFilter", "cutoffs_path", "doc_group", "load_cutoffs", "meta_get",
           "meta_set", "prepare_cutoffs"]

BUCKETS = ("head", "middle", "tail")


class KeepRule(BaseModel):
    """How a score decides: at most one of threshold, top_fraction, pareto_alpha, buckets."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, description="Keep when the score is at least this (at most, when lower "
                                    "is better).")
    top_fraction: float | None = Field(None, gt=0.0, le=1.0, description="Keep the best fraction of each group; "
                                       "the cutoff is a quantile of a sample's scores.")
    pareto_alpha: float | None = Field(None, gt=0.0, description="GPT-3 sampling: keep when pareto(alpha) > 1 - "
                                       "score (GPT-3: 9). Scores must be probabilities.")
    buckets: list[float] | None = Field(None, description="Percentiles splitting each group into head/middle/tail "
                                        "(CCNet: [33.3, 66.7]); the best scores are the head.")
    keep_buckets: list[Literal["head", "middle", "tail"]] = Field(
        default_factory=lambda: ["head", "middle"], description="With buckets: the buckets that stay.")
    group_by: Literal["domain", "domain_lang"] = Field(
        "domain", description="Groups for top_fraction and buckets: per domain, or per domain and language "
        "(meta.language, set by the language step).")
    sample_docs: int = Field(2000, ge=10, description="Documents scored per group to set top_fraction/bucket "
                             "cutoffs.")
    scan_docs: int = Field(200_000, ge=10, description="Documents read per group while drawing that sample.")

    @model_validator(mode="after")
    def _one_rule(self) -> KeepRule:
        set_ = [k for k in ("threshold", "top_fraction", "pareto_alpha", "buckets") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"give one of threshold, top_fraction, pareto_alpha, buckets (got {', '.join(set_)})")
        if self.buckets is not None:
            b = self.buckets
            if len(b) != 2 or not 0.0 < b[0] < b[1] < 100.0:
                raise ValueError("buckets: two increasing percentiles in (0, 100), e.g. [33.3, 66.7]")
        return self

    @property
    def needs_sample(self) -> bool:
        return self.top_fraction is not None or self.buckets is not None

    @property
    def kind(self) -> str:
        for k in ("threshold", "top_fraction", "pareto_alpha", "buckets"):
            if getattr(self, k) is not None:
                return k
        return "score_only"


@dataclass
class ScoreSpec:
    """One score of a step: where it goes in ``meta``, which way is better, and how it decides.

    `score` maps a batch of documents to one float each (NaN: could not score, e.g. no text left
    after tokenization; such a document is kept and counted). It is built in each worker, once.
    """

    key: str                                      # dotted path into meta: "quality.fasttext"
    label: str                                    # for the report: "fastText quality classifier, P(hq)"
    higher_is_better: bool
    reason: str                                   # reject reason: "quality_low_fasttext"
    rule: KeepRule
    score: Callable[[list[Document]], np.ndarray]
    bucket_key: str | None = None                 # meta path for the CCNet bucket, e.g. "perplexity.bucket"
    digits: int = 4                               # rounding of the score in meta


def meta_get(meta: dict[str, Any], key: str) -> Any:
    """The value at dotted path `key` in `meta`, or None."""
    cur: Any = meta
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def meta_set(meta: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted path `key` in `meta`, creating dicts on the way."""
    parts = key.split(".")
    cur = meta
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[parts[-1]] = value


def doc_group(doc: Document, group_by: str) -> str:
    """The cutoff group of `doc`: its domain, or ``domain/lang``."""
    if group_by == "domain_lang":
        return f"{doc.domain}/{doc.meta.get('language') or 'unknown'}"
    return doc.domain


def _id_hash(doc_id: str) -> int:
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8", "surrogatepass"))


def pareto_keep(doc_id: str, score: float, alpha: float) -> bool:
    """GPT-3's rule with a draw seeded by the document id (xxh3-64), so it is the same in every run."""
    rng = np.random.default_rng(_id_hash(doc_id))
    return bool(rng.pareto(alpha) > 1.0 - score)


def _cutoffs_for(rule: KeepRule, scores: np.ndarray, higher_is_better: bool) -> dict[str, float]:
    """A group's cutoffs from its sample's scores (NaNs dropped)."""
    s = scores[np.isfinite(scores)]
    if s.size == 0:
        return {}
    # "best first" percentiles: for higher-is-better scores the head is the top of the range
    if rule.top_fraction is not None:
        q = 1.0 - rule.top_fraction if higher_is_better else rule.top_fraction
        return {"threshold": float(np.quantile(s, q))}
    assert rule.buckets is not None
    lo, hi = rule.buckets
    if higher_is_better:  # head = best lo% = above the (100 - lo) percentile
        return {"head": float(np.percentile(s, 100.0 - lo)), "tail": float(np.percentile(s, 100.0 - hi))}
    return {"head": float(np.percentile(s, lo)), "tail": float(np.percentile(s, hi))}


class ScoredFilter(Step):
    """A step that scores documents with its specs and keeps by their rules (see the module doc)."""

    def __init__(self, name: str, specs: list[ScoreSpec], cutoffs: dict[str, dict[str, dict[str, float]]]
                 | None = None) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]  # one class, three step names
        self.specs = specs
        self.cutoffs = cutoffs or {}  # spec key -> group -> {"threshold" | "head"/"tail": value}
        for spec in specs:
            if spec.rule.needs_sample and spec.key not in self.cutoffs:
                raise ValueError(f"step {name!r}: {spec.key} keeps by {spec.rule.kind} but has no cutoffs "
                                 "(prepare_cutoffs did not run)")

    def process(self, doc: Document) -> str | None:
        return self.process_batch([doc])[0]

    def process_batch(self, docs: list[Document]) -> list[str | None]:
        reasons: list[str | None] = [None] * len(docs)
        for spec in self.specs:
            scores = np.asarray(spec.score(docs), dtype=np.float64)
            if scores.shape != (len(docs),):
                raise RuntimeError(f"step {self.name!r}: {spec.key} gave {scores.shape} scores for {len(docs)} docs")
            for i, (doc, s) in enumerate(zip(docs, scores)):
                ok = math.isfinite(s)
                meta_set(doc.meta, spec.key, round(float(s), spec.digits) if ok else None)
                if not ok:
                    self.count(doc, f"unscored:{spec.key}")
                keep = True if not ok else self._keep(spec, doc, float(s))
                if not keep and reasons[i] is None:
                    reasons[i] = spec.reason
        return reasons

    def _keep(self, spec: ScoreSpec, doc: Document, s: float) -> bool:
        rule = spec.rule
        better = (lambda a, b: a >= b) if spec.higher_is_better else (lambda a, b: a <= b)
        if rule.threshold is not None:
            return better(s, rule.threshold)
        if rule.pareto_alpha is not None:
            return pareto_keep(doc.id, s, rule.pareto_alpha)
        if not rule.needs_sample:
            return True
        cut = self.cutoffs[spec.key].get(doc_group(doc, rule.group_by))
        if not cut:  # a group absent from the sample (too rare to cut): keep, and count it
            self.count(doc, f"no_cutoff:{spec.key}")
            if spec.bucket_key:
                meta_set(doc.meta, spec.bucket_key, None)
            return True
        if rule.top_fraction is not None:
            return better(s, cut["threshold"])
        bucket = "head" if better(s, cut["head"]) else ("middle" if better(s, cut["tail"]) else "tail")
        if spec.bucket_key:
            meta_set(doc.meta, spec.bucket_key, bucket)
        self.count(doc, f"bucket:{bucket}")
        return bucket in rule.keep_buckets

    def info(self) -> dict[str, Any]:
        out = []
        for spec in self.specs:
            rule = spec.rule
            if rule.threshold is not None:
                cut: dict[str, Any] = {"*": {"threshold": rule.threshold}}
            else:
                cut = self.cutoffs.get(spec.key, {})
            out.append({"key": spec.key, "label": spec.label, "higher_is_better": spec.higher_is_better,
                        "rule": rule.kind, "reason": spec.reason,
                        "rule_options": rule.model_dump(exclude_none=True), "cutoffs": cut,
                        **({"bucket_key": spec.bucket_key} if spec.bucket_key else {})})
        return {"scores": out}


# --------------------------------------------------------------------------------------------
# cutoffs from a sample, once, in the parent


def cutoffs_path(step: str, context: StepContext) -> Path | None:
    return None if context.work_dir is None else context.work_dir / f"{step}.cutoffs.json"


def load_cutoffs(step: str, context: StepContext) -> dict[str, dict[str, dict[str, float]]]:
    """The cutoffs `prepare_cutoffs` wrote for `step` ({} when there are none)."""
    path = cutoffs_path(step, context)
    if path is None or not staged(path).is_file():
        return {}
    return read_json(path)["cutoffs"]


def sample_groups(step: str, context: StepContext, rules: list[KeepRule]) -> dict[str, list[Document]]:
    """Per group, the bottom-k sample (smallest id hash) of the documents that reach `step`."""
    from smelt.data.curate import filter_documents, plan_tasks, steps_before
    from smelt.data.readers import read_documents

    cfg = context.data
    group_by = {r.group_by for r in rules}
    k = max(r.sample_docs for r in rules)
    scan = max(r.scan_docs for r in rules)
    section = next(s for s in cfg.steps if s.name == step)
    before = steps_before(cfg, step, context.work_dir)
    plan = plan_tasks(cfg)
    seen: dict[str, int] = {}
    pools: dict[str, list[tuple[int, Document]]] = {}
    batch: list[Document] = []

    def take(docs: list[Document]) -> None:
        for d in filter_documents(before, docs):
            for g in {doc_group(d, gb) for gb in group_by}:
                seen[g] = seen.get(g, 0) + 1
                if seen[g] > scan:
                    continue
                pool = pools.setdefault(g, [])
                pool.append((_id_hash(d.id), d))
                if len(pool) > 4 * k:  # keep memory bounded: trim to the k smallest hashes
                    pool.sort(key=lambda t: t[0])
                    del pool[k:]

    for si, path in plan.files:
        src = cfg.inputs[si]
        if not section.applies_to(src.domain):
            continue
        for doc in read_documents(path, src):
            if not section.applies_to(doc.domain):
                continue
            batch.append(doc)
            if len(batch) >= 256:
                take(batch)
                batch = []
    take(batch)
    return {g: [d for _, d in sorted(pool, key=lambda t: t[0])[:k]] for g, pool in sorted(pools.items())}


def prepare_cutoffs(step: str, specs: list[ScoreSpec], context: StepContext) -> None:
    """Score a sample of each group and write `step`'s cutoffs (only for rules that need them)."""
    path = cutoffs_path(step, context)
    need = [s for s in specs if s.rule.needs_sample]
    if path is None or not need or path.is_file():  # a resumed stage keeps the cutoffs it used
        return
    groups = sample_groups(step, context, [s.rule for s in need])
    cutoffs: dict[str, dict[str, dict[str, float]]] = {}
    sizes: dict[str, int] = {}
    for spec in need:
        per: dict[str, list[Document]] = {}
        seen_ids: set[str] = set()  # with two group_by rules a document sits in two groups
        for docs in groups.values():
            for d in docs:
                if d.id not in seen_ids:
                    seen_ids.add(d.id)
                    per.setdefault(doc_group(d, spec.rule.group_by), []).append(d)
        cutoffs[spec.key] = {}
        for g, docs in sorted(per.items()):
            docs = docs[:spec.rule.sample_docs]
            scores = np.concatenate([np.asarray(spec.score(docs[i:i + 64]), dtype=np.float64)
                                     for i in range(0, len(docs), 64)]) if docs else np.zeros(0)
            c = _cutoffs_for(spec.rule, scores, spec.higher_is_better)
            if c:
                cutoffs[spec.key][g] = c
                sizes[f"{spec.key}@{g}"] = int(np.isfinite(scores).sum())
        log.info("%s: cutoffs for %s from samples of %s documents: %s", step, spec.key,
                 "/".join(str(v) for k, v in sizes.items() if k.startswith(spec.key + "@")) or "0",
                 cutoffs[spec.key])
    atomic_write_json(path, {"step": step, "cutoffs": cutoffs, "sample_sizes": sizes})


@dataclass
class _Lazy:
    """A score function built on first use, so that a worker loads its model once and only when it
    scores (the parent's plan-time checks do not load it)."""

    make: Callable[[], Callable[[list[Document]], np.ndarray]]
    fn: Callable[[list[Document]], np.ndarray] | None = field(default=None, init=False)

    def __call__(self, docs: list[Document]) -> np.ndarray:
        if self.fn is None:
            self.fn = self.make()
        return self.fn(docs)


def lazy(make: Callable[[], Callable[[list[Document]], np.ndarray]]) -> Callable[[list[Document]], np.ndarray]:
    """`make()` called once, on the first batch."""
    return _Lazy(make)
