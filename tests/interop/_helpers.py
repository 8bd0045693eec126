"""Tiny runs for the interop, load and generation tests: a byte-level BPE tokenizer with smelt's
special-token layout, a resolved recipe, a tokens manifest and one DCP checkpoint of a random
model, laid out exactly as `smelt train` leaves a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smelt.model.config import ModelConfig
from smelt.model.llama import Transformer
from smelt.train.checkpoint import save_checkpoint

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "中国的首都是北京。北京是一座历史悠久的城市。",
    "def add(a, b):\n    return a + b\n",
    "Language models predict the next token from the previous ones.",
    "Numbers like 12345 and 3.14159 appear in text too.",
] * 20


def make_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def make_run(root: Path, *, model: dict[str, Any] | None = None, step: int = 7, seed: int = 0,
             name: str = "run") -> tuple[Path, Transformer]:
    """A run directory with one checkpoint at ``step`` holding a random model; returns (run, model)."""
    run = root / name
    (run / "tokenizer").mkdir(parents=True)
    tok = make_tokenizer()
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    (run / "tokens").mkdir()
    (run / "tokens" / "manifest.json").write_text(json.dumps(
        {"vocab_size": vocab, "eos_id": 2, "bos_id": 1, "pad_id": 0, "add_bos": False}))
    model_section = {"preset": "debug", **(model or {})}
    recipe = {"name": name, "seed": seed, "model": model_section}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = ModelConfig.model_validate(model_section).with_vocab(vocab)
    torch.manual_seed(seed)
    m = Transformer(cfg)
    # Non-trivial norm gains, so a wrong norm mapping cannot hide behind all-ones weights.
    with torch.no_grad():
        for name_, p in m.named_parameters():
            if name_.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    save_checkpoint(run / "train" / "checkpoints", step, m, opt,
                    {"step": step, "tokens_seen": step * 1000, "samples_seen": step * 4})
    return run, m.eval()
