"""Helpers for the evaluation tests: toy models with hand-computable probabilities, a char-level
tokenizer, and a tiny real run (corpus -> tokenizer -> pack -> train) for end-to-end tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn


class Uniform(nn.Module):
    """Logits all zero: every token has probability 1/V, so the loss is ln V exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        return torch.zeros(B, T, self.vocab) + 0 * self.dummy


class Fixed(nn.Module):
    """The same logit vector at every position, whatever the input (a unigram model)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone().float(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        return self.logits.expand(B, T, -1).clone()


@dataclass
class _Enc:
    ids: list[int]


class CharTokenizer:
    """One token per UTF-8 byte, offset by 3 (0 pad, 1 bos, 2 eos): ids are trivial to predict."""

    OFFSET = 3
    vocab = 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = False) -> _Enc:
        return _Enc([b + self.OFFSET for b in text.encode("utf-8")])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", "replace")


def merging_bpe() -> Any:
    """A byte-level BPE (HF `tokenizers`, as `smelt.tokenizer.train` builds them) trained on text
    where the prompt/target boundary merges: ``"万里长城位于中国"`` is ONE token, fewer than the
    prompt ``"万里长城位于"`` alone. Ids 0-2 are <pad>, <bos>, <eos>; vocabulary under 400."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers import pre_tokenizers as pre

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["万里长城位于中国。"] * 50 + ["长城位于北方。"] * 10
                            + ["The capital of France is Paris."] * 20, trainer)
    return tok


# --------------------------------------------------------------------------------------------
# a tiny trained run

EN_WORDS = ("the cat sat on the mat while a dog ran in the park and the sun was warm over the quiet town "
            "paris is the capital of france and london is the capital of england").split()
ZH_CHARS = list("中国的首都是北京日本东京我们今天学习语言模型数据训练评估文本天气很好")


def _corpus(seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    en = [" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(60)]
    zh = ["".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(20, 150))) + "。" for _ in range(60)]
    return {"en": en, "zh": zh}


def build_run(root: Path, *, max_steps: int = 4, every: int = 2, eval_section: dict[str, Any] | None = None) -> Path:
    """runs/tiny with data shards, a BPE tokenizer, packed tokens and checkpoints; returns the recipe path."""
    from smelt.config import PackConfig, TokenizerConfig, load_recipe
    from smelt.data.document import Document
    from smelt.data.io import ShardWriter
    from smelt.tokenizer.train import train_tokenizer
    from smelt.tokens.pack import pack_tokens
    from smelt.train.trainer import train

    shards: dict[str, list[Path]] = {}
    for domain, texts in _corpus(0).items():
        path = root / "clean" / domain / "part-00000.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(path, "jsonl.zst") as w:
            for i, t in enumerate(texts):
                w.write(Document(id=f"{domain}-{i}", text=t, domain=domain, meta={}))
        shards[domain] = [path]
    recipe = {
        "name": "tiny", "runs_dir": str(root / "runs"), "seed": 7,
        "tokenizer": {"vocab_size": 384, "num_sentinels": 2, "sample_chars_per_domain": 100_000},
        "pack": {"val_fraction": 0.1, "workers": 1},
        "loader": {"seq_len": 32},
        "model": {"preset": "debug"},
        "train": {"max_steps": max_steps, "threads": 1, "log_every": 1, "eval_every": 0, "eval_batches": 1,
                  "tensorboard": False, "batch": {"global_batch": 4, "micro_batch": 4},
                  "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 1},
                  "checkpoint": {"every": every, "keep": 10}},
        "eval": {"max_docs": 4, "batch_size": 4, "tensorboard": True, **(eval_section or {})},
    }
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    r = load_recipe(recipe_path)
    run_dir = r.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe_path.read_text(encoding="utf-8"), encoding="utf-8")
    train_tokenizer(r.tokenizer or TokenizerConfig(), shards, run_dir / "tokenizer", seed=r.seed)
    pack_tokens(r.pack or PackConfig(), run_dir / "tokenizer" / "tokenizer.json", shards, run_dir / "tokens",
                seed=r.seed, workers=1)
    train(r, run_dir, progress=False)
    return recipe_path
