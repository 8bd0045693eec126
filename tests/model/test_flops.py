"""smelt.model.flops against real models: parameter counts, FLOPs (torch's FLOP counter), the
bytes autograd actually saves, and optimizer state sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from smelt.model.config import PRESETS, preset
from smelt.model.flops import activation_memory, flops_per_token, matmul_params, model_memory, param_count
from smelt.model.llama import Block, Transformer, alibi_slopes, rope_cos_sin, rope_inv_freq

CONFIGS = {
    "debug-gqa": {},
    "tied": {"tie_embeddings": True},
    "mha": {"n_kv_heads": 4},
    "mqa-bias-layernorm": {"n_kv_heads": 1, "bias": True, "norm": "layernorm"},
    "gelu-post-learned": {"mlp": "gelu", "norm_position": "post", "pos_emb": "learned"},
    "moe": {"moe_experts": 4, "moe_top_k": 2},
    "moe-gelu-bias-tied": {"moe_experts": 3, "moe_top_k": 1, "mlp": "gelu", "bias": True, "tie_embeddings": True},
    "llama2-multiplier": {"ffn_dim_multiplier": 1.3, "multiple_of": 64},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_param_count_equals_model(name: str) -> None:
    cfg = preset("debug", vocab_size=101, **CONFIGS[name])
    model = Transformer(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel() + (model.pos_embeddings.weight.numel() if model.pos_embeddings else 0)
    own_head = 0 if cfg.tie_embeddings else model.output.weight.numel()
    assert param_count(cfg, embeddings=False) == sum(p.numel() for p in model.parameters()) - emb
    assert param_count(cfg, embeddings=False) >= own_head


@pytest.mark.parametrize("name, params, hidden", [
    ("llama-7b", 6_738_415_616, 11008),  # Touvron et al. 2023; HF meta-llama/Llama-2-7b-hf
    ("llama-13b", 13_015_864_320, 13824),
    ("llama-33b", 32_528_943_616, 17920),
    ("llama-65b", 65_285_660_672, 22016),
    ("llama-1b", 1_100_048_384, 5632),   # TinyLlama-1.1B
])
def test_preset_param_counts(name: str, params: int, hidden: int) -> None:
    cfg = preset(name)
    assert cfg.hidden_dim == hidden
    assert param_count(cfg) == params


def test_every_preset_builds_small_ones_on_cpu() -> None:
    for name in PRESETS:
        cfg = preset(name)
        cfg = cfg if cfg.vocab_size else cfg.with_vocab(1000)
        if param_count(cfg) < 5_000_000:
            assert param_count(cfg) == sum(p.numel() for p in Transformer(cfg).parameters()), name


@pytest.mark.parametrize("name", ["debug-gqa", "tied", "moe", "gelu-post-learned", "mqa-bias-layernorm"])
def test_flops_per_token_equals_torch_flop_counter(name: str) -> None:
    """Forward + backward FLOPs counted by torch, with attention run by the math backend (plain
    matmuls over the full T x T square, PaLM's convention), equal the formula exactly."""
    cfg = preset("debug", vocab_size=101, **CONFIGS[name])
    model = Transformer(cfg)
    B, T = 2, 24
    x = torch.randint(0, 101, (B, T))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert counter.get_total_flops() == flops_per_token(cfg, T) * B * T


def test_flops_conventions() -> None:
    cfg = preset("llama-7b")
    V, d, L = 32000, 4096, 32
    norms = (2 * L + 1) * d
    assert matmul_params(cfg) == param_count(cfg) - V * d - norms  # input embedding, norms excluded
    assert flops_per_token(cfg, 2048) == 6 * matmul_params(cfg) + 12 * L * d * 2048
    tied = preset("debug", vocab_size=500, tie_embeddings=True)
    assert matmul_params(tied) == param_count(tied) - (2 * 2 + 1) * 64  # the shared matrix counts once
    moe = preset("debug", vocab_size=500, moe_experts=8, moe_top_k=2)
    dense = preset("debug", vocab_size=500)
    expert = 3 * 64 * dense.hidden_dim
    assert matmul_params(moe) == matmul_params(dense) + 2 * (expert + 8 * 64)  # 1 extra expert + router
    assert param_count(moe, active=True) == param_count(dense) + 2 * (expert + 8 * 64)


def test_activation_memory_reduces_to_korthikanti() -> None:
    """GPT block (GELU MLP 4h, MHA, dropout, scores materialized): s b h (34 + 5 a s / h) bytes."""
    cfg = preset("debug", vocab_size=1000, mlp="gelu", norm="layernorm", n_kv_heads=None, dim=128, n_heads=8,
                 n_layers=3)
    s, b, h, a, L, V = 512, 4, 128, 8, 3, 1000
    head = 2 * 2 * s * b * h + 4 * s * b * V  # final norm input, output head input, fp32 log-softmax
    per_layer = s * b * h * (34 + 5 * a * s / h)
    got = activation_memory(cfg, b, s, "bf16", fused_attention=False, dropout=True)
    assert got == L * per_layer + head
    # Full recomputation keeps each layer's 2 s b h input plus one layer being recomputed.
    full = activation_memory(cfg, b, s, "bf16", "full", fused_attention=False, dropout=True)
    assert full == L * 2 * s * b * h + per_layer + head
    every2 = activation_memory(cfg, b, s, "bf16", "every_k", ac_every=2, fused_attention=False, dropout=True)
    assert every2 == 1 * 2 * s * b * h + 2 * per_layer + per_layer + head


def _saved_bytes(fn, params: set[int]) -> int:
    """Bytes of distinct tensors autograd saves while running fn(), parameters (and their
    transposed views) excluded."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[(ptr, t.storage_offset())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4}, {"mlp": "gelu", "norm": "layernorm"}])
def test_activation_memory_matches_autograd_saved_tensors(kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One smelt block in fp32: the formula's per-layer bytes equal what autograd keeps, up to
    the s*b-sized norm statistics the formula (like the paper) leaves out.

    The formula models fused (flash) attention, which keeps no s*s scores: the block is forced
    onto SDPA, not the explicit softmax(QK^T)V that CPU uses for short key spans."""
    import smelt.model.llama as llama

    monkeypatch.setattr(llama, "EXPLICIT_ATTENTION_MAX_KEYS", 0)
    cfg = preset("debug", vocab_size=50, n_layers=1, **kw)
    block = Block(cfg, 0)
    B, T = 2, 64
    x = torch.randn(B, T, cfg.dim, requires_grad=True)
    rope = rope_cos_sin(torch.arange(T)[None], rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    saved = _saved_bytes(lambda: block(x, rope), {p.untyped_storage().data_ptr() for p in block.parameters()})
    # fp32 statistics per token and norm (RMSNorm: rstd; LayerNorm: mean, rstd), left out by the formula
    norm_stats = 2 * 4 * B * T * (2 if cfg.norm == "layernorm" else 1)
    rope_tables = 2 * 4 * T * cfg.head_dim  # cos and sin
    head = activation_memory(cfg.model_copy(update={"n_layers": 0}), B, T, "fp32")
    layer = activation_memory(cfg, B, T, "fp32") - head
    assert saved == layer + norm_stats + rope_tables


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_model_memory_matches_optimizer_state(optimizer: str) -> None:
    cfg = preset("debug", vocab_size=101, moe_experts=2, moe_top_k=1)
    model = Transformer(cfg)
    opt = {"adamw": lambda p: torch.optim.AdamW(p),
           "adafactor": lambda p: torch.optim.Adafactor(p),
           "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}[optimizer](model.parameters())
    model(torch.randint(0, 101, (1, 8))).sum().backward()
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and k != "step")
    mem = model_memory(cfg, optimizer, "fp32")
    assert mem.optimizer == state
    assert mem.params == mem.grads == 4 * param_count(cfg)


def test_model_memory_mixed_precision_is_16_bytes_per_parameter() -> None:
    cfg = preset("llama-7b")
    n = param_count(cfg)
    for precision in ("fp32", "bf16"):
        assert model_memory(cfg, "adamw", precision).total == 16 * n
    bf16 = model_memory(cfg, "adamw", "bf16")
    assert (bf16.params, bf16.grads, bf16.optimizer) == (2 * n, 2 * n, 12 * n)  # ZeRO, Section 3.1


def test_alibi_slopes_match_the_paper() -> None:
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]  # 1/2 ... 1/256
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence.
    assert alibi_slopes(12).tolist() == pytest.approx([2.0 ** -i for i in range(1, 9)]
                                                      + [2.0 ** -(i + 0.5) for i in range(0, 4)])
