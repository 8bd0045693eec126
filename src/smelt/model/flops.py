"""Parameter counts, training FLOPs per token and memory, from a `ModelConfig` alone.

Nothing here builds a model or imports torch: the planner sizes 65B models on a laptop.
Every formula is checked against a real `smelt.model.llama.Transformer` in tests/model/test_flops.py.

Conventions
-----------
* `param_count` counts every trainable tensor once (a tied embedding/output matrix once).
* `flops_per_token` follows PaLM (Chowdhery et al. 2022, Appendix B): ``6 N + 12 L H Q T`` where
  ``N`` is the number of weights that take part in a matrix multiply per token - every linear
  layer, the output head (tied or not) and, for MoE, only the router plus the ``top_k`` experts a
  token visits - and the input embedding (a gather, no FLOPs), learned position table, norm gains
  and biases are excluded. ``12 L H Q T`` is the attention score and value products (QK^T and
  AV, 2 FLOPs per multiply-add, x3 for forward + backward) counted over the full T x T square as
  PaLM does, although a causal kernel skips about half of it; this keeps MFU comparable with the
  published figures (PaLM, Megatron-LM, nanoGPT, OLMo) and is what `smelt train` reports.
* `activation_memory` follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", Section 4.1): bytes of the tensors each layer keeps for its backward pass,
  no tensor/sequence parallelism. For a GPT block (GELU MLP of width 4h, multi-head attention,
  dropout, attention scores materialized) it reduces exactly to their ``s b h (34 + 5 a s / h)``;
  for smelt's block it counts SwiGLU's extra tensors, GQA's smaller K/V and, with a fused
  attention kernel (SDPA / FlashAttention), no ``s^2`` terms. RMSNorm is a composite op in eager
  PyTorch (as in HF) and keeps both its input and the normalized tensor before the gain, 2 tensors
  where LayerNorm's fused kernel keeps 1. Terms of size ``s b`` (norm statistics) are ignored, as
  in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smelt.model.config import ModelConfig

Precision = Literal["fp32", "bf16", "fp16"]
BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None: set it (cfg.with_vocab(n)) before counting parameters")
    return cfg.vocab_size


def _tensors(cfg: ModelConfig, *, active: bool = False) -> list[tuple[str, tuple[int, ...], int]]:
    """Every trainable tensor as (kind, shape, how many), in the model's layout.

    kind is one of: embedding, position, matmul, router, norm, bias. With ``active`` the MoE
    experts are counted ``moe_top_k`` times instead of ``moe_experts`` (weights a token uses).
    """
    d, L, V, f = cfg.dim, cfg.n_layers, _vocab(cfg), cfg.hidden_dim
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    n_mats = 3 if cfg.mlp == "swiglu" else 2                       # w1, (w3), w2
    experts = (cfg.moe_top_k if active else cfg.moe_experts) if cfg.moe_experts else 1
    norm_tensors = 2 if (cfg.norm == "layernorm" and cfg.bias) else 1  # gain (+ bias)
    n_norms = 2 * L + (1 if cfg.norm_position == "pre" else 0)      # post-norm has no final norm

    t: list[tuple[str, tuple[int, ...], int]] = [("embedding", (V, d), 1)]
    if cfg.pos_emb == "learned":
        t.append(("position", (cfg.max_seq_len, d), 1))
    t += [("matmul", (q_out, d), L), ("matmul", (kv_out, d), 2 * L), ("matmul", (d, q_out), L)]  # wq; wk, wv; wo
    t += [("matmul", (f, d), (n_mats - 1) * L * experts), ("matmul", (d, f), L * experts)]     # w1, w3; w2
    if cfg.moe_experts:
        t.append(("router", (cfg.moe_experts, d), L))
    if cfg.bias:
        t += [("bias", (q_out,), L), ("bias", (kv_out,), 2 * L), ("bias", (d,), L)]
        t += [("bias", (f,), (n_mats - 1) * L * experts), ("bias", (d,), L * experts)]
    t.append(("norm", (d,), n_norms * norm_tensors))
    if not cfg.tie_embeddings:
        t.append(("matmul", (V, d), 1))                                   # output head
    return t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def param_count(cfg: ModelConfig, *, embeddings: bool = True, active: bool = False) -> int:
    """Exact number of trainable parameters.

    embeddings=False drops the input embedding and learned position table (Kaplan et al. 2020's
    "non-embedding" N; an untied output head is kept, a tied one is dropped with the embedding).
    active=True counts only the `moe_top_k` experts a token is routed to.
    """
    total = 0
    for kind, shape, count in _tensors(cfg, active=active):
        if not embeddings and kind in ("embedding", "position"):
            continue
        total += _numel(shape) * count
    return total


def matmul_params(cfg: ModelConfig) -> int:
    """Weights multiplied per token (PaLM's N): linear layers, router, active experts, output head."""
    n = sum(_numel(s) * c for k, s, c in _tensors(cfg, active=True) if k in ("matmul", "router"))
    if cfg.tie_embeddings:
        n += _vocab(cfg) * cfg.dim  # the shared matrix is multiplied once, as the output head
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len`: 6 N + 12 L H Q T (PaLM)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)


def activation_memory(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: Precision = "bf16",
    checkpointing: Literal["none", "full", "every_k"] = "none",
    *,
    ac_every: int = 2,
    fused_attention: bool = True,
    dropout: bool = False,
) -> int:
    """Bytes of activations kept for backward in one forward of `micro_batch` x `seq_len` tokens.

    precision: bytes per stored activation (bf16/fp16: 2, as the paper assumes; fp32: 4).
    checkpointing: "full" keeps only each block's input plus one block being recomputed;
    "every_k" checkpoints blocks k, 2k, ... (L // ac_every of them), as torchtitan's ac_freq.
    fused_attention: SDPA/FlashAttention keep O and the log-sum-exp instead of the s x s scores.
    dropout: count dropout masks (1 byte each) as the paper does; smelt's model has no dropout.
    """
    p = BYTES[precision]
    s, b, h, a = seq_len, micro_batch, cfg.dim, cfg.n_heads
    sbh, kv = s * b * h, s * b * cfg.kv_heads * cfg.head_dim
    mask = 1 if dropout else 0
    norm = p * sbh * (2 if cfg.norm == "rmsnorm" else 1)  # input (+ RMSNorm's normalized tensor)

    # Attention sub-block (paper: 11 sbh + 5 a s^2 b).
    attn = norm                            # norm
    attn += p * sbh                        # QKV projection input (norm output)
    attn += p * (sbh + 2 * kv)             # Q, K (after RoPE) and V, kept by the attention kernel
    if fused_attention:
        # The kernel keeps its output O, written (B, T, heads, head_dim)-contiguous so that it is
        # also the output projection's input below, and one fp32 log-sum-exp per row.
        attn += 4 * b * a * s
    else:
        attn += p * a * s * s * b          # softmax output
        attn += mask * a * s * s * b + (p * a * s * s * b if dropout else 0)  # dropout mask and output
    attn += p * sbh                        # output projection input
    attn += mask * sbh                     # residual dropout mask

    # MLP sub-block (paper: 19 sbh for a 4h GELU MLP).
    f_tokens = s * b * cfg.hidden_dim * (cfg.moe_top_k if cfg.moe_experts else 1)
    mlp = norm                             # norm
    mlp += p * sbh                         # w1 (and w3) input
    if cfg.mlp == "swiglu":
        mlp += 4 * p * f_tokens            # gate, silu(gate), up, and their product (w2 input)
    else:
        mlp += 2 * p * f_tokens            # GELU input, w2 input
    if cfg.moe_experts:
        k = cfg.moe_top_k
        mlp += 4 * s * b * cfg.moe_experts # router probabilities (fp32 softmax output)
        mlp += 2 * p * sbh * k             # dispatched copies of the input; expert outputs (gate product)
    mlp += mask * sbh                      # residual dropout mask

    layer = attn + mlp
    # Outside the blocks: the final norm (pre-norm only), the output head's input and the fp32
    # log-softmax kept by cross entropy (4 s b V); the embedding lookup keeps only indices.
    head = (norm if cfg.norm_position == "pre" else 0) + p * sbh + 4 * s * b * _vocab(cfg)
    L = cfg.n_layers
    if checkpointing == "none":
        return L * layer + head
    if checkpointing == "full":
        return L * p * sbh + layer + head
    if checkpointing == "every_k":
        n_ck = L // ac_every
        return n_ck * p * sbh + (L - n_ck) * layer + (layer if n_ck else 0) + head
    raise ValueError(f"checkpointing must be none, full or every_k, got {checkpointing!r}")


@dataclass(frozen=True)
class ModelMemory:
    """Bytes held between steps for training, one replica (divide by the ZeRO/FSDP shard count)."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_memory(
    cfg: ModelConfig,
    optimizer: Literal["adamw", "adafactor", "sgd", "none"] = "adamw",
    precision: Precision = "fp32",
) -> ModelMemory:
    """Parameters, gradients and optimizer state, in bytes.

    precision is the dtype the parameters are stored in. fp32 also covers bf16 *autocast*, which
    keeps fp32 parameters (4 + 4 bytes, + 8 for AdamW = 16 per parameter). bf16/fp16 store 16-bit
    parameters and gradients with an fp32 master copy in the optimizer (Micikevicius et al. 2018;
    ZeRO, Rajbhandari et al. 2020 Section 3.1: 2 + 2 + 12 = 16 bytes per parameter with Adam).
    adafactor is torch.optim.Adafactor: factored second moments, one row and one column vector per
    matrix (Shazeer & Stern 2018), a full one per vector, no first moment.
    """
    n = param_count(cfg)
    p = BYTES[precision]
    master = 4 * n if p != 4 else 0
    if optimizer == "adamw":
        state = 8 * n                                    # exp_avg, exp_avg_sq in fp32
    elif optimizer == "sgd":
        state = 4 * n                                    # momentum buffer
    elif optimizer == "adafactor":
        state = 4 * sum((shape[0] + shape[1] if len(shape) == 2 else shape[0]) * count
                        for _, shape, count in _tensors(cfg))
    elif optimizer == "none":
        state, master = 0, 0
    else:
        raise ValueError(f"optimizer must be adamw, adafactor, sgd or none, got {optimizer!r}")
    return ModelMemory(params=p * n, grads=p * n, optimizer=state + master)
