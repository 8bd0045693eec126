"""Load a trained model for inference: `load_model(path)` from a run, a checkpoint or an HF directory.

``path`` may be:

- a **run directory** (``runs/<name>/``, holding ``recipe.yaml``): its newest checkpoint that
  verifies, rebuilt as the trainer built it (`smelt.train.load.load_checkpoint_model`);
- a **checkpoint directory** (``.../train/checkpoints/step-NNNNNNN/``): that checkpoint (same);
- a **Hugging Face directory** (``config.json`` + ``model.safetensors`` or its sharded index):
  an export of `smelt export`, or any Llama-architecture model (`smelt.interop.hf.load_hf_model`).

It lives in the interop layer, the lowest that knows both formats: the training layer reads its
own checkpoints, `smelt.interop.hf` reads HF directories, and this module only chooses. Layers
below take a loader as an argument where they need one (`smelt.eval.runner.run_eval`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from smelt.interop.hf import load_hf_model
from smelt.model.loaded import LoadedModel, LoadError
from smelt.train.load import is_checkpoint, load_checkpoint_model

__all__ = ["load_model", "is_hf_dir", "LoadedModel", "LoadError"]


def is_hf_dir(p: Path) -> bool:
    """A Hugging Face model directory: ``config.json`` and safetensors weights (one file or an index)."""
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model at ``path`` (run dir, checkpoint dir or HF dir; see the module docstring)."""
    path = Path(path)
    if path.is_dir() and is_hf_dir(path) and not is_checkpoint(path):
        return load_hf_model(path, dtype=dtype, device=device)
    return load_checkpoint_model(path, dtype=dtype, device=device)
