"""Evaluation (`smelt eval`): perplexity and bits per byte per domain, probability probes,
multiple-choice benchmarks. `smelt.eval.runner.run_eval` is the entry point; the trainer calls
`smelt.eval.runner.evaluate_in_training` every ``eval.every_steps`` steps."""
