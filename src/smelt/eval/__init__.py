"""Evaluation (`smelt eval`): perplexity and bits per byte per domain, probability probes,
multiple-choice benchmarks. `smelt.eval.runner.run_eval` is the entry point; the trainer is given
`smelt.eval.runner.InTrainingEvaluator` and calls it every ``eval.every_steps`` steps."""
