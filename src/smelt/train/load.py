"""Read a training run back as a model: `load_checkpoint_model(path)` from a run or a checkpoint.

``path`` may be:

- a **run directory** (``runs/<name>/``, holding ``recipe.yaml``): the newest checkpoint under
  ``train/checkpoints`` that verifies (`smelt.train.checkpoint.find_latest`; broken newer ones
  are skipped with a warning);
- a **checkpoint directory** (``.../train/checkpoints/step-NNNNNNN/``): that checkpoint; the run
  directory is three levels up (recipe, tokens manifest and tokenizer are read from there).

A Hugging Face directory is read by `smelt.interop.hf.load_hf_model`; `smelt.interop.load.load_model`
takes any of the three. For a run, the architecture is rebuilt exactly as the trainer built it: the
run's resolved ``recipe.yaml`` through `smelt.config.resolve_model_config`, with the vocabulary of
``tokens/manifest.json``. The checkpoint is verified before any tensor is read, so a truncated
or half-written checkpoint gives an error naming the file and what is wrong with it, never a
stack trace from inside DCP. Only the model's tensors are loaded (no optimizer, no RNG restore:
loading a model must not change the caller's random state). The trainer uses `resolve_checkpoint`
and `run_model_config` for ``train.init_from``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from smelt.config import load_recipe, resolve_model_config
from smelt.fsutil import read_json
from smelt.model.config import ModelConfig
from smelt.model.loaded import LoadedModel, LoadError, cast_parameters
from smelt.train.checkpoint import CheckpointError, find_latest, load_checkpoint, read_trainer_state, verify_checkpoint

log = logging.getLogger(__name__)

__all__ = ["load_checkpoint_model", "resolve_checkpoint", "run_model_config", "is_checkpoint", "LoadedModel",
           "LoadError"]


def is_checkpoint(p: Path) -> bool:
    """A DCP checkpoint directory (``.metadata``) or one with smelt's ``trainer_state.json``."""
    return (p / ".metadata").is_file() or (p / "trainer_state.json").is_file()


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint dir, run dir) for a run or checkpoint directory; LoadError when there is none."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if path.is_file() and path.name == "recipe.yaml":
        path = path.parent
    if is_checkpoint(path):
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


def load_checkpoint_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model of the run or checkpoint directory ``path`` (see the module docstring)."""
    from smelt.model.llama import Transformer

    path = Path(path)
    if (path / "config.json").is_file() and not (path / "recipe.yaml").is_file() and not is_checkpoint(path):
        raise LoadError(f"{path}: a Hugging Face directory, not a run or checkpoint (`smelt.interop.load.load_model` "
                        f"reads both)")
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
    cast_parameters(model, dtype)
    model.eval()
    log.info("load: %s (step %s, %s tokens) from %s", cfg.preset or "custom model", state.get("step"),
             f"{state.get('tokens_seen', 0):,}", ckpt)
    return LoadedModel(model=model, cfg=cfg, tokenizer=tokenizer, tokenizer_path=tok_path if tokenizer else None,
                       step=int(state["step"]), tokens_seen=int(state.get("tokens_seen", 0)), checkpoint=ckpt,
                       run_dir=run_dir, special_ids=_special_ids(manifest, tokenizer, tok_path),
                       add_bos=bool(manifest.get("add_bos", False)))
