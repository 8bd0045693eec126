"""Model-based curation: a quality classifier, reference-model perplexity and toxicity, as curation
steps registered in `smelt.data.steps.registry` (importing this package registers them), and the
command that trains the quality classifier (`smelt quality train`).

`smelt.quality.scored` holds what the three steps share: batched scoring, scores in ``meta``, and
the keep rules (threshold, top fraction, GPT-3's Pareto sampling, CCNet's buckets).
"""

from smelt.data.steps.registry import register_step

# Entries are "module:attr" paths: a step's module (and its model library) is imported only when a
# recipe uses the step, in the parent when the recipe is checked and in each worker.
register_step("quality", "smelt.quality.classifier:build", options="smelt.quality.classifier:QualityOptions",
              prepare="smelt.quality.classifier:prepare")
register_step("perplexity", "smelt.quality.perplexity:build", options="smelt.quality.perplexity:PerplexityOptions",
              prepare="smelt.quality.perplexity:prepare")
register_step("toxicity", "smelt.quality.toxicity:build", options="smelt.quality.toxicity:ToxicityOptions",
              prepare="smelt.quality.toxicity:prepare")
