"""Model-based curation: a quality classifier, reference-model perplexity and toxicity, as curation
steps registered in `smelt.data.steps.registry` (importing this package registers them), and the
command that trains the quality classifier (`smelt quality train`).

`smelt.quality.scored` holds what the three steps share: batched scoring, scores in ``meta``, and
the keep rules (threshold, top fraction, GPT-3's Pareto sampling, CCNet's buckets).
"""
