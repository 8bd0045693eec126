"""`ModelConfig` and its presets, for the model code: the schema itself is declared in the config
layer (`smelt.config.model`), since the recipe holds it; this module re-exports it."""

from __future__ import annotations

from smelt.config.model import PRESETS, ModelConfig, preset

__all__ = ["PRESETS", "ModelConfig", "preset"]
