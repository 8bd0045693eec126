"""LLaMA-style decoder: config and presets, the model, parameter/FLOP/memory formulas."""
