"""A LLaMA-style decoder-only transformer in one file.

Touvron et al. 2023 (LLaMA): pre-norm RMSNorm, rotary positions, SwiGLU MLP, no biases; plus the
usual alternatives behind a few branches (`ModelConfig`): grouped-query attention (Ainslie et al.
2023), ALiBi or learned absolute positions, LayerNorm, post-norm, GELU, tied embeddings and a
top-k mixture-of-experts MLP (Shazeer et al. 2017; Fedus et al. 2021; Jiang et al. 2024).

The model is plain PyTorch: tensor/pipeline parallelism, FSDP, activation checkpointing and
torch.compile are applied from outside (smelt.train.parallel) to `model.layers[i]`, the unit of
every wrapper. Parameter names follow Meta's and torchtitan's (wq, wk, wv, wo, w1, w2, w3);
`to_hf_state_dict` maps them to Hugging Face `LlamaForCausalLM` names without touching a value.

Attention is `F.scaled_dot_product_attention`: the `is_causal` fast path when nothing else
constrains attention, otherwise a boolean (B, 1, T, S) mask built from segment ids (document
masking), prefix lengths (prefix LM) and the KV cache offset. flex_attention would avoid the
mask, but has no CPU backward in torch 2.x. On CPU with short key spans (<= 256 keys, <= 512
under torch.compile) attention is instead the explicit softmax(q k^T / sqrt(d) + bias) v
(`explicit_attention`): there torch's CPU flash kernel, mostly its backward, is 1.1-4x slower than
two batched GEMMs (measured, see `EXPLICIT_ATTENTION_MAX_KEYS`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smelt.model.config import ModelConfig

# --------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019), computed in fp32 like LLaMA and HF."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32, cast back, then scale: HF LlamaRMSNorm's order, so bf16 runs match it.
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2 (Su et al. 2021), fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, (B, T, 1, head_dim) fp32, in the rotate-half layout.

    Layout: frequency i rotates channels (i, i + head_dim/2), the GPT-NeoX / Hugging Face layout,
    not Meta's interleaved pairs (2i, 2i+1). Both span the same function class (they differ by a
    fixed permutation of wq/wk rows); using HF's makes export and import a pure renaming.
    """
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, heads, head_dim) by the angles in cos/sin (B, T, 1, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): 2^(-8i/n) for n a power of two; otherwise those
    of the nearest lower power of two plus every other slope of the next one (their reference code)."""

    def power_of_2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    low = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_2(low) + power_of_2(2 * low)[0::2][: n_heads - low]
    return torch.tensor(slopes, dtype=torch.float32)


# Longest key span for which CPU attention takes the explicit path. Measured on a 2-core AMD
# EPYC (AVX512-BF16), torch 2.13, forward + backward per layer, B*H = 32-64, head_dim 32-64:
# T = 64: flash 3.4 ms vs explicit 0.9 ms (bf16), 1.4 vs 0.8 (fp32); T = 128: 11 vs 4.3 (bf16),
# 5.4 vs 3.2 (fp32); T = 256: 17 vs 12-15 (bf16), 16 vs 14 (fp32); T = 384: 17 vs 20; T = 512 and
# up: flash wins by 2-7x, since it skips the masked half of the causal square and never
# materializes the (T, S) scores. GPUs always take the SDPA path (flash / memory-efficient).
EXPLICIT_ATTENTION_MAX_KEYS = 256
# The same cut-off when the attention is traced by torch.compile: inductor fuses the bias, scale,
# fp32 softmax and casts around the two GEMMs (forward and backward), which SDPA's opaque kernel
# cannot get. Same machine, B*T = 2048, 8 heads of 32, bf16, forward + backward of the attention
# alone, compiled: T = 256: flash 17 ms vs explicit 7; T = 512: 26 vs 12-22; T = 1024: 29 vs 51.
# In the whole cpu-8m step at T = 256 (bench/train_step.py) explicit attention takes the compiled
# step from 352 to 250 ms. 0 in either switch sends every span of that mode to SDPA.
EXPLICIT_ATTENTION_MAX_KEYS_COMPILED = 512


def use_explicit_attention(device: torch.device, n_keys: int) -> bool:
    """Whether attention over `n_keys` keys takes `explicit_attention` rather than SDPA: on CPU
    for spans up to the eager or compiled cut-off (torch.compile guards on the value read)."""
    compiled = torch.compiler.is_compiling()
    max_keys = EXPLICIT_ATTENTION_MAX_KEYS_COMPILED if compiled else EXPLICIT_ATTENTION_MAX_KEYS
    return device.type == "cpu" and n_keys <= max_keys


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v, the softmax in fp32: SDPA's math, HF's "eager"
    attention numerics. q (B, H, T, hd); k, v (B, H_kv, S, hd); mask as for SDPA (boolean
    "may attend" or an additive float bias, broadcastable to (B, H, T, S)). Materializes the
    (B, H, T, S) scores: only for short spans (`EXPLICIT_ATTENTION_MAX_KEYS`)."""
    B, H, T, hd = q.shape
    S = k.size(2)
    if k.size(1) != H:  # grouped-query attention: each KV head serves H / H_kv query heads
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    bias: Tensor | None = None
    if is_causal:  # query i (of the last T positions) sees keys 0..S-T+i
        bias = torch.full((T, S), float("-inf"), device=q.device, dtype=q.dtype).triu(S - T + 1)
    elif mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    elif mask is not None:
        bias = mask.to(q.dtype)
    # One baddbmm computes bias + scale * q k^T in a single GEMM pass (fastest of the variants
    # measured: matmul then scale, scaling q first, masked_fill after the GEMM).
    qf, kf = q.reshape(B * H, T, hd), k.reshape(B * H, S, hd)
    if bias is None:
        scores = torch.bmm(qf, kf.transpose(1, 2)).mul_(hd**-0.5)
    else:
        bias = bias.expand(B, H, T, S).reshape(B * H, T, S)
        scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), alpha=hd**-0.5)  # (B*H, T, S)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, v.reshape(B * H, S, hd)).view(B, H, T, hd)


def attention_mask(q_idx: Tensor, k_idx: Tensor, q_seg: Tensor | None, k_seg: Tensor | None,
                   prefix_len: Tensor | None) -> Tensor:
    """Boolean "may attend" mask (B or 1, 1, T, S) for queries at sequence indices q_idx (T,)
    over keys at k_idx (S,): causal, plus bidirectional inside each row's prefix, and only
    within the same segment (document) when segment ids are given."""
    allowed = (k_idx[None, :] <= q_idx[:, None])[None]  # (1, T, S)
    if prefix_len is not None:
        # A key inside the prefix is visible to every query of the row: prefix queries see the
        # whole prefix, later queries already see it causally.
        allowed = allowed | (k_idx[None, None, :] < prefix_len[:, None, None])  # (B, T, S)
    if q_seg is not None and k_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


# --------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    A forward with a cache appends its T tokens at `length` and attends to everything stored so
    far; positions continue from the cache unless `position_ids` are given. The cache also keeps
    each slot's position (for ALiBi) and segment id, so a left-padded batch prefilled with
    segment ids (padding in its own segment) keeps masking the padding while decoding; new tokens
    without segment ids continue their row's last segment. Make `dtype` the compute dtype (bf16
    under bf16 autocast): keys are stored as given and read back in the query's dtype.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, self.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, n_kv_heads, S_max, head_dim)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, self.max_seq_len, device=device, dtype=torch.long)
        self.segments = torch.zeros(batch_size, self.max_seq_len, device=device, dtype=torch.long)
        self.segmented = False  # whether segment ids were ever given (then masks use them)
        self.length = 0  # tokens stored

    def reset(self) -> None:
        self.length, self.segmented = 0, False

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.k[i], self.v[i]


# --------------------------------------------------------------------------------------------
# attention, MLP, MoE, block


def _init_linear(m: nn.Linear, std: float) -> None:
    # Truncated at 3 std (OLMo 2, torchtitan): no outlier weights; the sample std is 0.987 * std.
    nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads <= n_heads key/value heads (MHA, GQA, MQA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)

    def init_weights(self, std: float, out_std: float) -> None:
        for m in (self.wq, self.wk, self.wv):
            _init_linear(m, std)
        _init_linear(self.wo, out_std)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                kv_cache: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        B, T, _ = x.shape
        # Head counts are inferred (-1): under tensor parallelism each rank holds a slice of them.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            ck, cv = kv_cache  # (B, n_kv_heads, S_max, head_dim)
            ck[:, :, start:start + T] = k
            cv[:, :, start:start + T] = v
            k, v = ck[:, :, :start + T].to(q.dtype), cv[:, :, :start + T].to(q.dtype)  # (B, n_kv, S, hd)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # ALiBi biases, built in fp32
        # No mask: causal when queries and keys are the same span; a decode step (T=1 after the
        # cache) sees every stored key. The model builds a mask for every other case.
        is_causal = mask is None and q.size(2) == k.size(2)
        if use_explicit_attention(q.device, k.size(2)):
            y = explicit_attention(q, k, v, mask, is_causal)  # (B, n_heads, T, head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=q.size(1) != k.size(1))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020), or GELU: w2(gelu(w1 x)) (GPT-2)."""

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate (swiglu) / up (gelu)
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down
        self.w3 = nn.Linear(dim, hidden, bias=bias) if kind == "swiglu" else None  # up

    def init_weights(self, std: float, out_std: float) -> None:
        _init_linear(self.w1, std)
        if self.w3 is not None:
            _init_linear(self.w3, std)
        _init_linear(self.w2, out_std)

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden) inside
        return self.w2(F.gelu(self.w1(x)))


class MoE(nn.Module):
    """Top-k mixture of experts (Mixtral-style routing, Switch-style load balancing).

    The router's softmax over all experts picks k experts per token; their probabilities,
    renormalized to sum to 1 (Mixtral), weight the expert outputs. Dispatch is dropless and
    vectorized: the N*k (token, expert) assignments are sorted by expert, so each expert runs one
    matmul on a contiguous slice, and outputs are scattered back with index_add. The only loop is
    over experts. (torch's grouped_mm would fuse it, but has no fp32 CPU kernel in torch 2.x.)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(cfg.dim, cfg.hidden_dim, cfg.mlp, cfg.bias) for _ in range(cfg.moe_experts))
        self.aux_loss = torch.zeros(())

    def init_weights(self, std: float, out_std: float) -> None:
        _init_linear(self.router, std)
        for expert in self.experts:
            expert.init_weights(std, out_std)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        gate, expert = probs.topk(self.top_k, dim=-1)  # (N, k) each
        gate = gate / gate.sum(dim=-1, keepdim=True)
        flat_expert = expert.reshape(-1)  # (N*k,) expert of each assignment, token-major
        order = flat_expert.argsort(stable=True)  # assignments grouped by expert
        token = order // self.top_k  # (N*k,) source token of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.n_experts)  # (E,)
        chunks = x[token].split(counts.tolist())  # per expert: (n_e, D)
        y = torch.cat([ffn(chunk) for ffn, chunk in zip(self.experts, chunks)])  # (N*k, D)
        y = y * gate.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros(B * T, D, dtype=y.dtype, device=y.device).index_add_(0, token, y)  # (N, D)

        # Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): n_experts * sum_i f_i P_i,
        # f_i the share of assignments routed to expert i (not differentiable), P_i its mean router
        # probability. f_i counts top-k assignments over N*k, so a uniform router scores 1.0 for any k
        # (HF Mixtral divides by N instead and scores k).
        frac = counts.float() / flat_expert.numel()
        self.aux_loss = self.n_experts * (frac * probs.mean(dim=0)).sum()
        return out.view(B, T, D)


class Block(nn.Module):
    """One transformer layer: attention then MLP, each with a residual connection."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id  # global index, kept when pipeline stages hold a subset of layers
        self.pre_norm = cfg.norm_position == "pre"
        self.attention = Attention(cfg)
        self.attention_norm = make_norm(cfg)
        self.feed_forward: nn.Module = (MoE(cfg) if cfg.moe_experts
                                        else FeedForward(cfg.dim, cfg.hidden_dim, cfg.mlp, cfg.bias))
        self.ffn_norm = make_norm(cfg)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None,
                cache: KVCache | None = None, start: int = 0) -> Tensor:
        kv = cache.layer(self.layer_id) if cache is not None else None
        if self.pre_norm:  # x + f(norm(x)): GPT-2, LLaMA
            x = x + self.attention(self.attention_norm(x), rope, mask, kv, start)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(x + self.attention(x, rope, mask, kv, start))  # norm(x + f(x)): Vaswani et al.
        return self.ffn_norm(x + self.feed_forward(x))


# --------------------------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is None: set it from the tokenizer (cfg.with_vocab(n))")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos_emb == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # Post-norm blocks already end in a norm, so only pre-norm needs a final one.
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one Parameter, counted and updated once
        if cfg.pos_emb == "rope":
            self.register_buffer("rope_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        if cfg.pos_emb == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.aux_loss = torch.zeros(())
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer; deterministic under torch.manual_seed.

        Weights and embeddings ~ N(0, init_std) truncated at 3 std: 0.02 as in GPT-2 and OLMo 2
        (Team OLMo 2024, "2 OLMo 2 Furious"); LLaMA does not state its init. The
        residual output projections (wo, w2) get init_std / sqrt(2 * n_layers) with init="scaled"
        (Radford et al. 2019, Section 2.3: keeps the residual stream's variance independent of
        depth), init_std with "normal" (OLMo 2), init_std / sqrt(2 * (layer + 1)) with "depth"
        (torchtitan's depth_init, which also scales w3; we scale only wo and w2). Norm gains are 1,
        biases 0. Also the way to materialize a model built on the meta device:
        ``model.to_empty(device=...); model.init_weights()`` (re-ties a tied output).
        """
        cfg, std = self.cfg, self.cfg.init_std
        with torch.no_grad():
            nn.init.trunc_normal_(self.tok_embeddings.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            if self.pos_embeddings is not None:
                nn.init.trunc_normal_(self.pos_embeddings.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            for layer in self.layers:
                depth = {"scaled": 2 * cfg.n_layers, "depth": 2 * (layer.layer_id + 1), "normal": 1}[cfg.init]
                layer.init_weights(std, out_std=std / math.sqrt(depth))
            if isinstance(self.norm, (RMSNorm, nn.LayerNorm)):
                self.norm.reset_parameters()
            if self.output is not None and cfg.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight  # `to_empty()` unties shared parameters
            elif self.output is not None:
                _init_linear(self.output, std)
            if cfg.pos_emb == "rope":
                self.rope_inv_freq.copy_(rope_inv_freq(cfg.head_dim, cfg.rope_theta))
            if cfg.pos_emb == "alibi":
                self.alibi_slopes.copy_(alibi_slopes(cfg.n_heads))

    def forward(self, input_ids: Tensor, *, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None, prefix_len: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, vocab) in the autocast dtype; `self.aux_loss` holds the MoE loss after.

        input_ids (B, T) int64. position_ids (B, T): positions for RoPE/ALiBi/learned tables
        (document-masked packing restarts them per document); default: 0..T-1, or continuing
        from the cache. segment_ids (B, T): attend only within equal ids (document masking).
        prefix_len (B,): bidirectional attention among the first prefix_len tokens (prefix LM).
        cache: append this step's keys/values and attend to all stored ones. Pass None rather
        than all-zero segment ids or prefix lengths: any of them costs an explicit mask.

        Pipeline stages may set tok_embeddings (input is then hidden states (B, T, dim)), norm
        or output to None; a stage without output returns hidden states.
        """
        B, T = input_ids.shape[:2]
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_seq_len:
            raise ValueError(f"KV cache holds {cache.max_seq_len} tokens; {start} stored + {T} new do not fit")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=device)[None]  # (1, T), broadcast over rows

        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids  # (B, T, dim)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(position_ids)
        rope = rope_cos_sin(position_ids, self.rope_inv_freq) if self.cfg.pos_emb == "rope" else None

        # Keys are this step's tokens, or everything in the cache after this step is appended.
        k_pos, k_seg = position_ids, segment_ids
        if cache is not None:
            if segment_ids is None and cache.segmented:
                segment_ids = cache.segments[:, start - 1:start].expand(B, T)  # continue the row's segment
            cache.positions[:, start:start + T] = position_ids
            if segment_ids is not None:
                cache.segments[:, start:start + T] = segment_ids
                cache.segmented = True
            k_pos = cache.positions[:, :start + T]
            k_seg = cache.segments[:, :start + T] if cache.segmented else None

        mask: Tensor | None = None
        alibi = self.cfg.pos_emb == "alibi"
        if alibi or segment_ids is not None or prefix_len is not None or (start > 0 and T > 1):
            q_idx = torch.arange(start, start + T, device=device)
            mask = attention_mask(q_idx, torch.arange(start + T, device=device), segment_ids, k_seg, prefix_len)
            if alibi:  # bias -slope * |distance| (symmetric, so prefix tokens see later prefix tokens too)
                dist = (position_ids[:, None, :, None] - k_pos[:, None, None, :]).abs()  # (B, 1, T, S)
                bias = -self.alibi_slopes[None, :, None, None] * dist  # (B, n_heads, T, S)
                mask = bias.masked_fill(~mask, float("-inf"))

        for layer in self.layers:
            h = layer(h, rope, mask, cache, start)
        if cache is not None:
            cache.length = start + T

        moe_losses = [layer.feed_forward.aux_loss for layer in self.layers if isinstance(layer.feed_forward, MoE)]
        # Mean over MoE layers, so one weight (train.moe_aux_weight) suits any depth; 1.0 = balanced.
        self.aux_loss = torch.stack(moe_losses).mean() if moe_losses else torch.zeros((), device=device)

        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h  # (B, T, vocab)


# --------------------------------------------------------------------------------------------
# Hugging Face names (smelt.interop.hf writes the files; here only the mapping)

_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def check_hf_compatible(cfg: ModelConfig) -> None:
    """Raise ValueError unless `cfg` is expressible as a transformers LlamaConfig."""
    llama = {"norm": "rmsnorm", "norm_position": "pre", "pos_emb": "rope", "mlp": "swiglu", "moe_experts": 0}
    wrong = {key: getattr(cfg, key) for key, want in llama.items() if getattr(cfg, key) != want}
    if wrong:
        raise ValueError(f"not a Llama architecture (needs {llama}); this config has {wrong}")


def hf_name_map(cfg: ModelConfig) -> dict[str, str]:
    """smelt parameter name -> LlamaForCausalLM name. RoPE layouts agree: no permutation."""
    check_hf_compatible(cfg)
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in _HF_LAYER_NAMES.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
            if cfg.bias and not ours.endswith("norm"):
                names[f"layers.{i}.{ours}.bias"] = f"model.layers.{i}.{theirs}.bias"
    return names


def hf_config(cfg: ModelConfig) -> dict:
    """Keyword arguments of transformers.LlamaConfig (also the body of its config.json)."""
    check_hf_compatible(cfg)
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # transformers < 5; 5.x reads it into rope_parameters
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias, mlp_bias=cfg.bias,
        initializer_range=cfg.init_std,
    )


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under LlamaForCausalLM names (shared storage; tied: no lm_head)."""
    sd = model.state_dict()
    return {theirs: sd[ours] for ours, theirs in hf_name_map(model.cfg).items()}


def from_hf_state_dict(hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A LlamaForCausalLM state dict under smelt names, ready for `Transformer.load_state_dict`."""
    names = hf_name_map(cfg)
    missing = [theirs for theirs in names.values() if theirs not in hf_sd]
    if missing:
        raise KeyError(f"Hugging Face state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    sd = {ours: hf_sd[theirs] for ours, theirs in names.items()}
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd
