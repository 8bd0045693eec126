"""`LoadedModel`: a trained model in eval mode with what is needed to use it.

Made by the loaders above this layer: `smelt.train.load` (a run or checkpoint directory),
`smelt.interop.hf` (a Hugging Face directory) and `smelt.interop.load.load_model` (either);
read by `smelt.eval` and the exporters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smelt.model.config import ModelConfig

__all__ = ["LoadedModel", "LoadError", "ModelLoader", "cast_parameters"]


class LoadError(FileNotFoundError):
    """The path holds no loadable model (message names the path and what is missing or broken)."""


@dataclass
class LoadedModel:
    """A model in eval mode plus what is needed to use it (tokenizer, provenance)."""

    model: nn.Module
    cfg: ModelConfig
    tokenizer: Any | None  # tokenizers.Tokenizer, or None when the run has none
    tokenizer_path: Path | None
    step: int | None  # optimizer steps done (None for an HF directory without smelt metadata)
    tokens_seen: int | None
    checkpoint: Path  # the checkpoint directory (or the HF directory) the weights came from
    run_dir: Path | None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/pad ids when known
    add_bos: bool = False  # the packer put BOS before every document (tokens/manifest.json add_bos)

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.get("eos")

    @property
    def bos_id(self) -> int | None:
        return self.special_ids.get("bos")

    @property
    def pad_id(self) -> int | None:
        return self.special_ids.get("pad")


# ``loader(path, dtype=..., device=...)``: what a layer below the loaders takes as an argument
# (`smelt.eval.runner.run_eval`), e.g. `smelt.interop.load.load_model`.
ModelLoader = Callable[..., LoadedModel]


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only: buffers (RoPE inverse frequencies) stay fp32, as the model computes
    its rotation angles in fp32 (bf16 frequencies would shift positions beyond ~256)."""
    for p in model.parameters():  # a tied weight is one Parameter: cast once, stays tied
        p.data = p.data.to(dtype)
