"""How well each curation scorer separates planted junk from clean pages, and what it costs per document.

The documents are the demo generator's labelled web pages (`smelt.data.synth.generate`, English
and Chinese, ``meta.planted``): **junk** = spam, boilerplate and mojibake pages, **clean** = clean
pages; the other planted kinds (duplicates, PII, short pages, contaminated pages) are left out, as
other steps own them. Every page is NFKC-normalized first, as the pipeline's first step does, and
gets its generated language as ``meta.language``, as the language step would set it.

Scorers, each turned into "higher = cleaner":

* the heuristic chain of the recipe (language ID, Gopher quality and repetition, C4, FineWeb,
  blocklist): 1 when it keeps the page, 0 when it rejects it (a yes/no rule: its ROC-AUC is the
  mean of its true-positive and true-negative rates);
* the `quality` step's fastText classifier (P(high quality)), when ``--classifier`` is given;
* the `perplexity` step's bits per byte under a reference model (negated), when ``--ref``;
* the `toxicity` step's flagged-word ratio and classifier score (negated).

ROC-AUC is rank-based with ties counted half (the Mann-Whitney U statistic / (n_junk n_clean)),
overall, per junk kind and per language. Cost: microseconds per document of each scorer on the
same pages (batches of 256 as in curation, one untimed warm-up batch first), beside the heuristic
chain's; ratio = scorer / heuristic chain, measured in the same run.

    python bench/quality_auc.py --classifier runs/models/wiki-vs-web/model.bin --ref runs/ablation-ref
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import smelt.quality  # noqa: E402,F401  (registers the model-based steps)
from smelt.config import load_recipe  # noqa: E402
from smelt.data.curate import filter_documents, steps_before  # noqa: E402
from smelt.data.document import Document  # noqa: E402
from smelt.data.steps.registry import StepContext, build_step, step_options  # noqa: E402
from smelt.data.synth import generate  # noqa: E402
from smelt.demo.outcomes import _still_garbled as still_mojibake  # noqa: E402

JUNK = ("spam", "boilerplate", "mojibake")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    from scipy.stats import rankdata

    pos, neg = int(positive.sum()), int((~positive).sum())
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def timed(fn: Any, docs: list[Document], batch: int = 256) -> tuple[np.ndarray, float]:
    """Scores of `docs` (batches of `batch`) and microseconds per document (after one warm-up batch)."""
    fn(docs[:batch])
    t0 = time.perf_counter()
    out = np.concatenate([np.asarray(fn(docs[i:i + batch]), dtype=np.float64) for i in range(0, len(docs), batch)])
    return out, (time.perf_counter() - t0) / len(docs) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "ablation-heuristics.yaml"),
                    help="the heuristic chain to compare with (its data: section)")
    ap.add_argument("--classifier", default=None, help="fastText quality model (.bin)")
    ap.add_argument("--ref", default=None, help="reference model for the perplexity scorer (run dir, HF dir, KenLM)")
    ap.add_argument("--docs", type=int, default=2000, help="generated pages (before keeping junk and clean only)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--no-normalize", action="store_true",
                    help="score the raw pages (normalize repairs most planted mojibake before any scorer sees it)")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    cfg = recipe.data
    assert cfg is not None
    pages = [d for d in generate(args.docs, seed=args.seed) if d.meta["planted"] in JUNK + ("clean",)]
    ctx = StepContext(data=cfg, work_dir=None)
    norm = build_step("normalize", cfg.normalize, ctx)
    for d in pages:
        if not args.no_normalize:
            norm.process(d)
        d.meta["language"] = d.meta["lang"]  # what the language step sets; the model scorers read it
    label = np.array([d.meta["planted"] for d in pages])
    lang = np.array([d.meta["lang"] for d in pages])
    is_clean = label == "clean"
    moji = [d for d in pages if d.meta["planted"] == "mojibake"]
    print(f"mojibake pages still holding mojibake as scored: {sum(still_mojibake(d.text) for d in moji)}/{len(moji)}")
    print(f"{len(pages)} pages: " + ", ".join(f"{k} {int((label == k).sum())}" for k in ("clean",) + JUNK)
          + f"; en {int((lang == 'en').sum())}, zh {int((lang == 'zh').sum())}")

    # the heuristic chain: everything the recipe runs before its registered steps, minus normalize
    chain = steps_before(cfg, "pii", None)
    chain.steps = [(s, c) for s, c in chain.steps if s.name not in ("normalize", "quality", "perplexity", "toxicity")]

    def heuristic(docs: list[Document]) -> np.ndarray:
        copies = [Document(id=d.id, text=d.text, domain="web", meta=dict(d.meta)) for d in docs]
        kept = {id(d) for d in filter_documents(chain, copies)}
        return np.array([1.0 if id(d) in kept else 0.0 for d in copies])

    scorers: dict[str, tuple[Any, float]] = {"heuristic chain (kept = 1)": (heuristic, 1.0)}

    def step_scores(name: str, options: dict[str, Any]) -> list[tuple[str, Any, float]]:
        step = build_step(name, step_options(name, options), ctx)
        out = []
        for spec in step.specs:
            out.append((f"{name}: {spec.key}", spec.score, 1.0 if spec.higher_is_better else -1.0))
        return out

    if args.classifier:
        for k, fn, sign in step_scores("quality", {"models": [{"name": "clf", "kind": "fasttext",
                                                                "path": args.classifier, "keep": {}}]}):
            scorers[k] = (fn, sign)
    if args.ref:
        for k, fn, sign in step_scores("perplexity", {"model": args.ref, "keep": {}}):
            scorers[k] = (fn, sign)
    try:
        for k, fn, sign in step_scores("toxicity", {"classifier": {"keep": {}},
                                                    "flagged_words": {"keep": {}}}):
            scorers[k] = (fn, sign)
    except Exception as e:  # noqa: BLE001  (the classifier extra may be missing)
        print(f"toxicity classifier unavailable ({e}); flagged words only")
        for k, fn, sign in step_scores("toxicity", {"classifier": None, "flagged_words": {"keep": {}}}):
            scorers[k] = (fn, sign)

    base_us = None
    rows = []
    print(f"\n{'scorer':<34}{'AUC':>7}" + "".join(f"{k:>13}" for k in JUNK) + f"{'en':>7}{'zh':>7}"
          + f"{'us/doc':>10}{'x chain':>9}")
    for name, (fn, sign) in scorers.items():
        s, us = timed(fn, pages)
        s = sign * s
        ok = np.isfinite(s)
        fill = np.where(ok, s, np.nanmedian(s[ok]) if ok.any() else 0.0)  # unscored pages: the median
        auc = roc_auc(fill, is_clean)
        per_kind = {k: roc_auc(fill[(label == k) | is_clean], is_clean[(label == k) | is_clean]) for k in JUNK}
        per_lang = {g: roc_auc(fill[lang == g], is_clean[lang == g]) for g in ("en", "zh")}
        base_us = base_us or us
        rows.append({"scorer": name, "auc": auc, "auc_by_kind": per_kind, "auc_by_lang": per_lang,
                     "us_per_doc": us, "vs_chain": us / base_us, "unscored": int((~ok).sum())})
        print(f"{name:<34}{auc:>7.3f}" + "".join(f"{per_kind[k]:>13.3f}" for k in JUNK)
              + f"{per_lang['en']:>7.3f}{per_lang['zh']:>7.3f}{us:>10.1f}{us / base_us:>9.2f}"
              + (f"  ({int((~ok).sum())} unscored)" if (~ok).any() else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"pages": len(pages), "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
