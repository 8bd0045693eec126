"""`model:` the architecture of a LLaMA-style decoder, and a registry of named presets.

A recipe names a preset and overrides single fields::

    model: {preset: debug, n_layers: 4}

The ``preset`` key fills every field the recipe does not give from `PRESETS[preset]`; fields a
preset does not set keep the defaults declared below. `preset(name)` returns one ready config.

The schema lives in the config layer because the recipe (`smelt.config.Recipe`) holds it;
`smelt.model.config` re-exports it for the model code. This module must stay importable without
torch: the planner and the FLOP/memory calculators (`smelt.model.flops`) only need the numbers.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Presets, smallest first. Each entry lists only the fields that differ from ModelConfig's defaults.
# The CPU demo sizes are named by their non-embedding parameter count, because their vocabulary is
# the trained tokenizer's (vocab_size None) and the embedding share therefore depends on the run.
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny, for tests: 2 layers, GQA (4 query heads over 2 KV heads) so the GQA path is exercised.
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256),
    # nanoGPT's CPU Shakespeare budget shape (4 layers, 4 heads, 128 wide; Karpathy, nanoGPT README):
    # 0.80M non-embedding parameters with SwiGLU.
    "cpu-1m": dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=256),
    # 8.0M non-embedding parameters: 10 x (4*256^2 attention + 3*256*704 SwiGLU).
    "cpu-8m": dict(dim=256, n_layers=10, n_heads=8, multiple_of=64, max_seq_len=1024),
    # 29.5M non-embedding parameters, GQA 8:4 as in LLaMA-2-70B / TinyLlama.
    "cpu-30m": dict(dim=512, n_layers=10, n_heads=8, n_kv_heads=4, multiple_of=64, max_seq_len=1024),
    # TinyLlama-1.1B's shape (Zhang et al. 2024, Table 1: d 2048, 22 layers, 32 heads, 4 KV groups,
    # intermediate 5632, vocab 32000): 1,100,048,384 parameters; the GPU benchmark model.
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632,
                     max_seq_len=2048, norm_eps=1e-5),
    # LLaMA-1 (Touvron et al. 2023, Table 2); FFN width from the multiple_of=256 rule (11008, 13824,
    # 17920, 22016), norm_eps 1e-6 as in Meta's params.json; 2048 context.
    "llama-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, max_seq_len=2048, norm_eps=1e-6),
    "llama-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, max_seq_len=2048, norm_eps=1e-6),
    "llama-33b": dict(vocab_size=32000, dim=6656, n_layers=60, n_heads=52, max_seq_len=2048, norm_eps=1e-6),
    "llama-65b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, max_seq_len=2048, norm_eps=1e-6),
}


class ModelConfig(BaseModel):
    """`model:` a decoder-only transformer. Defaults are LLaMA's choices at a small width."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(None, description="Named preset filling every field not given here (see PRESETS).")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size, in tokens; None: the trainer takes it from the tokenizer.")
    dim: int = Field(256, ge=1, description="Width of the residual stream (d_model), in channels.")
    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Query heads; head_dim = dim / n_heads.")
    n_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (GQA; 1 = MQA); None: n_heads (MHA).")
    ffn_hidden: int | None = Field(
        None, ge=1, description="MLP hidden width, in channels; None: LLaMA's rule for swiglu "
        "(multiple_of-rounded ffn_dim_multiplier * 8/3 * dim), 4 * dim for gelu.")
    multiple_of: int = Field(256, ge=1, description="LLaMA rule: round the SwiGLU hidden width up to a multiple of this.")
    ffn_dim_multiplier: float | None = Field(None, gt=0.0, description="LLaMA rule: scale 8/3 * dim by this before rounding (LLaMA-2 70B: 1.3).")
    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="MLP: SwiGLU (Shazeer 2020; LLaMA) or GELU (GPT-2).")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalization layer (RMSNorm: Zhang & Sennrich 2019; LLaMA).")
    norm_eps: float = Field(1e-5, gt=0.0, description="Epsilon added to the variance in the norms.")
    norm_position: Literal["pre", "post"] = Field(
        "pre", description="pre: x + f(norm(x)) (GPT-2, LLaMA); post: norm(x + f(x)) (Vaswani et al. 2017).")
    pos_emb: Literal["rope", "alibi", "learned"] = Field(
        "rope", description="Positions: rotary (Su et al. 2021), ALiBi biases (Press et al. 2022) or learned absolute.")
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency (LLaMA: 1e4; LLaMA-3: 5e5).")
    max_seq_len: int = Field(2048, ge=1, description="Longest sequence, in tokens: size of learned position tables and default KV cache.")
    tie_embeddings: bool = Field(False, description="Share the input embedding matrix with the output projection.")
    bias: bool = Field(False, description="Biases in linear layers and LayerNorm (LLaMA: none).")
    moe_experts: int = Field(0, ge=0, description="Experts per mixture-of-experts MLP; 0: dense MLP.")
    moe_top_k: int = Field(2, ge=1, description="Experts each token is routed to (Mixtral: 2 of 8).")
    init_std: float = Field(0.02, gt=0.0, description="Std of the normal init of weights and embeddings (GPT-2, OLMo 2: 0.02).")
    init: Literal["scaled", "normal", "depth"] = Field(
        "scaled", description="Init of residual output projections (wo, w2): scaled: init_std/sqrt(2*n_layers) "
        "(GPT-2); normal: init_std (OLMo 2); depth: init_std/sqrt(2*(layer+1)) (torchtitan).")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
            data = {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim (dim / n_heads = {self.head_dim})")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) exceeds moe_experts ({self.moe_experts})")
        return self

    # ---- derived sizes (shared by the model and the calculators) ----

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: explicit `ffn_hidden`, else LLaMA's rule (swiglu) or 4 * dim (gelu)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.dim
        # Meta's llama/model.py FeedForward: 2/3 of 4*dim keeps SwiGLU's three matrices at the
        # parameter count of a 4*dim two-matrix MLP, then round up (LLaMA-7B: 10922 -> 11008).
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        """This config with `vocab_size` set (validated), e.g. from the tokenizer's manifest."""
        return ModelConfig.model_validate({**self.model_dump(), "vocab_size": vocab_size})


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with optional field overrides: ``preset("debug", vocab_size=256)``."""
    return ModelConfig.model_validate({"preset": name, **overrides})
