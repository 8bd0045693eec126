"""smelt: raw multilingual text to a trained, evaluated LLaMA-style base model."""

from __future__ import annotations

__version__ = "0.1.0"
