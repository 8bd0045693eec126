"""Load a trained model for inference: `load_model(path)` from a run, a checkpoint or an HF export.

``path`` may be:

- a **run directory** (``runs/<name>/``, holding ``recipe.yaml``): the newest checkpoint under
  ``train/checkpoints`` that verifies (`smelt.train.checkpoint.find_latest`; broken newer ones
  are skipped with a warning);
- a **checkpoint directory** (``.../train/checkpoints/step-NNNNNNN/``): that checkpoint; the run
  directory is three levels up (recipe, tokens manifest and tokenizer are read from there);
- a **Hugging Face directory** (``config.json`` + ``model.safetensors`` or its sharded index):
  an export of `smelt export`, or any Llama-architecture model (`smelt.interop.hf`).

For a run, the architecture is rebuilt exactly as the trainer built it: the run's resolved
``recipe.yaml`` through `smelt.train.trainer.resolve_model_config`, with the vocabulary of
``tokens/manifest.json``. The checkpoint is verified before any tensor is read, so a truncated
or half-written checkpoint gives an error naming the file and what is wrong with it, never a
stack trace from inside DCP. Only the model's tensors are loaded (no optimizer, no RNG restore:
loading a model must not change the caller's random state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smelt.fsutil import read_json
from smelt.model.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "LoadError", "load_model", "resolve_checkpoint", "run_model_config"]


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


def _is_checkpoint(p: Path) -> bool:
    return (p / ".metadata").is_file() or (p / "trainer_state.json").is_file()


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint dir, run dir) for a run or checkpoint directory; LoadError when there is none."""
    from smelt.train.checkpoint import CheckpointError, find_latest, verify_checkpoint

    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if path.is_file() and path.name == "recipe.yaml":
        path = path.parent
    if _is_checkpoint(path):
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"{path}: incomplete or corrupt checkpoint: {problem}")
        run_dir = path.parents[2] if path.parent.name == "checkpoints" and len(path.parents) > 2 else None
        if run_dir is not None and not (run_dir / "recipe.yaml").is_file():
            run_dir = None
        return path, run_dir
    ckpt_dir = path / "train" / "checkpoints"
    if not (path / "recipe.yaml").is_file():
        raise LoadError(f"{path}: neither a run directory (no recipe.yaml), a checkpoint (no .metadata) "
                        f"nor a Hugging Face directory (no config.json + model.safetensors)")
    latest = find_latest(ckpt_dir)
    if latest is None:
        raise LoadError(f"{ckpt_dir}: no complete checkpoint (run `smelt train` first; broken checkpoints are "
                        f"logged above)")
    return latest, path


def run_model_config(run_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The run's model config as the trainer resolved it, and its tokens manifest ({} if none)."""
    from smelt.config import load_recipe
    from smelt.train.trainer import resolve_model_config

    recipe = load_recipe(run_dir / "recipe.yaml")
    manifest_path = run_dir / "tokens" / "manifest.json"
    manifest: dict[str, Any] = read_json(manifest_path) if manifest_path.is_file() else {}
    return resolve_model_config(recipe, manifest), manifest


def _special_ids(manifest: dict[str, Any], tokenizer: Any | None, tokenizer_path: Path | None) -> dict[str, int]:
    """bos/eos/pad ids: the tokens manifest's (what the packer framed documents with), else the
    tokens named in tokenizer_config.json (imported HF tokenizers), else smelt's ``<|eos|>`` names."""
    hf_names: dict[str, Any] = {}
    if tokenizer_path is not None and (tokenizer_path.parent / "tokenizer_config.json").is_file():
        try:
            hf_names = read_json(tokenizer_path.parent / "tokenizer_config.json")
        except ValueError as e:
            log.warning("load: %s unreadable (%s); ignoring it", tokenizer_path.parent / "tokenizer_config.json", e)
    ids: dict[str, int] = {}
    for name in ("bos", "eos", "pad"):
        v = manifest.get(f"{name}_id")
        if v is None and tokenizer is not None:
            token = hf_names.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            v = tokenizer.token_to_id(token) if isinstance(token, str) else None
            if v is None:
                v = tokenizer.token_to_id(f"<|{name}|>")
        if v is not None:
            ids[name] = int(v)
    return ids


def _load_tokenizer(path: Path | None) -> Any | None:
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only: buffers (RoPE inverse frequencies) stay fp32, as the model computes
    its rotation angles in fp32 (bf16 frequencies would shift positions beyond ~256)."""
    for p in model.parameters():  # a tied weight is one Parameter: cast once, stays tied
        p.data = p.data.to(dtype)


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model at ``path`` (run dir, checkpoint dir or HF dir; see the module docstring)."""
    path = Path(path)
    if path.is_dir() and _is_hf_dir(path) and not _is_checkpoint(path):
        from smelt.interop.hf import load_hf_model

        return load_hf_model(path, dtype=dtype, device=device)

    from smelt.model.llama import Transformer
    from smelt.train.checkpoint import load_checkpoint, read_trainer_state

    ckpt, run_dir = resolve_checkpoint(path)
    if run_dir is None:
        raise LoadError(f"{ckpt}: checkpoint outside a run directory (expected <run>/train/checkpoints/"
                        f"{ckpt.name} with <run>/recipe.yaml): the model config cannot be rebuilt")
    cfg, manifest = run_model_config(run_dir)
    tok_path = run_dir / "tokenizer" / "tokenizer.json"
    tokenizer = _load_tokenizer(tok_path)
    if tokenizer is None:
        log.warning("load: %s not found; the model loads without a tokenizer", tok_path)
    elif tokenizer.get_vocab_size(with_added_tokens=True) > (cfg.vocab_size or 0):
        raise LoadError(f"{tok_path}: {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")

    # Build on the meta device and materialize on the target: no wasted random init of large models.
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # also re-ties a tied output and fills the RoPE buffers
    state = read_trainer_state(ckpt)
    load_checkpoint(ckpt, model, None, restore_rng=False)
    _cast_parameters(model, dtype)
    model.eval()
    log.info("load: %s (step %s, %s tokens) from %s", cfg.preset or "custom model", state.get("step"),
             f"{state.get('tokens_seen', 0):,}", ckpt)
    return LoadedModel(model=model, cfg=cfg, tokenizer=tokenizer, tokenizer_path=tok_path if tokenizer else None,
                       step=int(state["step"]), tokens_seen=int(state.get("tokens_seen", 0)), checkpoint=ckpt,
                       run_dir=run_dir, special_ids=_special_ids(manifest, tokenizer, tok_path),
                       add_bos=bool(manifest.get("add_bos", False)))
