"""`smelt plan`: what a training run costs before it runs, from the model, data and layout alone.

`make_plan(model, PlanInputs(...))` returns a `Plan` (a plain dict tree under ``Plan.to_dict``):

* **parameters**: total, embedding, non-embedding, active per token (MoE), from
  `smelt.model.flops.param_count` (exact, checked against the model);
* **compute**: FLOPs per token (PaLM's 6N + 12 L H Q T, `flops_per_token`), total training FLOPs,
  and Kaplan/Chinchilla's 6 N D beside it (what published budgets quote);
* **memory per GPU**: weights, gradients and optimizer states under ZeRO 0/1/2/3 over the
  data-parallel ranks (Rajbhandari et al. 2020, Section 5 / Figure 1), divided by TP x PP;
  activations per micro-batch with and without recomputation (Korthikanti et al. 2022, through
  `activation_memory`; tensor/sequence parallel and the 1F1B pipeline as in their Section 4.2);
  the KV cache for inference at a batch and length; whether it fits the device, and what to
  change when it does not;
* **time and cost**: wall-clock and GPU-hours at a given MFU on a named accelerator, cost at a
  $/GPU-hour;
* **data**: tokens per parameter against Chinchilla's ~20 (Hoffmann et al. 2022, Table 3), and
  with a fitted law (`smelt scaling fit --json`), the predicted loss and the compute-optimal N, D
  for the same 6ND budget.

Nothing here imports torch: a 65B plan runs on a laptop in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from smelt.model.config import ModelConfig
from smelt.model.flops import BYTES, ModelMemory, activation_memory, flops_per_token, model_memory, param_count

GB = 1e9  # decimal gigabytes, as the ZeRO paper and datasheets quote memory
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, Table 3 (~20 tokens per parameter)


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_tflops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s
    memory_gb: float         # HBM, decimal GB
    source: str


# Peak dense bf16 FLOP/s per device, from the vendors' datasheets (the "with sparsity" figures are
# twice these). Memory is the datasheet HBM capacity.
ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense (624 sparse), 80 GB HBM2e.
    "a100": Accelerator("A100 80GB SXM", 312.0, 80.0, "NVIDIA A100 datasheet"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity -> 989 dense, 80 GB.
    "h100": Accelerator("H100 SXM", 989.0, 80.0, "NVIDIA H100 datasheet"),
    # NVIDIA H200 datasheet (SXM): same Hopper tensor cores as H100 (989 dense bf16), 141 GB HBM3e.
    "h200": Accelerator("H200 SXM", 989.0, 141.0, "NVIDIA H200 datasheet"),
    # NVIDIA HGX B200 spec: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs -> 2,250 dense per GPU;
    # 1,440 GB for 8 GPUs -> 180 GB each.
    "b200": Accelerator("B200 SXM", 2250.0, 180.0, "NVIDIA HGX B200 datasheet"),
    # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity), 192 GB HBM3.
    "mi300x": Accelerator("MI300X", 1307.4, 192.0, "AMD Instinct MI300X datasheet"),
}


def parse_count(text: str | int | float) -> float:
    """``"1T"`` -> 1e12, ``"300B"`` -> 3e11, ``"2.5M"`` -> 2.5e6, ``"1e21"`` -> 1e21."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().replace("_", "").replace(",", "")
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}
    if s and s[-1].lower() in mult:
        return float(s[:-1]) * mult[s[-1].lower()]
    return float(s)


@dataclass
class PlanInputs:
    """Everything about a run besides its model. Units: tokens, sequences, GPUs, dollars."""

    tokens: float                      # training tokens D
    seq_len: int = 2048                # training context
    gpus: int = 1
    tp: int = 1                        # tensor parallel degree
    pp: int = 1                        # pipeline stages
    zero: Literal[0, 1, 2, 3] = 0      # ZeRO stage over the data-parallel ranks
    sequence_parallel: bool = True     # with tp > 1 (Korthikanti et al. 2022)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # stored parameter dtype (fp32: autocast)
    optimizer: Literal["adamw", "adafactor", "sgd", "none"] = "adamw"
    micro_batch: int = 1               # sequences per forward on one GPU
    pp_microbatches: int | None = None  # in flight on the first stage (1F1B); None: pp
    checkpointing: Literal["none", "full", "every_k"] = "none"
    ac_every: int = 2
    device: str = "h100"
    mfu: float = 0.4                   # model FLOPs utilization assumed for the time estimate
    price_per_gpu_hour: float | None = None
    kv_batch: int = 1                  # inference KV cache: sequences
    kv_len: int | None = None          # inference KV cache: tokens per sequence (None: seq_len)
    kv_precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    law: dict[str, float] | None = None  # {"E","A","B","alpha","beta"} from `smelt scaling fit --json`
    headroom: float = 0.9              # share of device memory the plan may use (allocator, buffers, comms)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def validate(self) -> None:
        if self.gpus < 1 or self.tp < 1 or self.pp < 1:
            raise ValueError("gpus, tp and pp must be at least 1")
        if self.gpus % (self.tp * self.pp):
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of tp x pp ({self.tp} x {self.pp})")
        if self.device.lower() not in ACCELERATORS:
            raise ValueError(f"unknown device {self.device!r}; known: {', '.join(ACCELERATORS)}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")


# --------------------------------------------------------------------------------------------
# memory


def shard_model_states(mem: ModelMemory, zero: int, dp: int, model_parallel: int = 1) -> ModelMemory:
    """Bytes of parameters, gradients and optimizer state held by one GPU.

    ZeRO (Rajbhandari et al. 2020, Section 5): stage 1 partitions the optimizer states over the
    ``dp`` data-parallel ranks (P_os), stage 2 also the gradients (P_os+g), stage 3 also the
    parameters (P_os+g+p). ``model_parallel`` = TP x PP divides everything first (each GPU holds
    its slice of the layers; embedding and norms are treated as evenly split, an approximation).
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    p, g, o = (x / model_parallel for x in (mem.params, mem.grads, mem.optimizer))
    o = o / dp if zero >= 1 else o
    g = g / dp if zero >= 2 else g
    p = p / dp if zero >= 3 else p
    return ModelMemory(params=round(p), grads=round(g), optimizer=round(o))


def _layer_and_head(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                    **kw: Any) -> tuple[int, int]:
    """(bytes one block keeps, bytes outside the blocks) from `activation_memory` at 1 and 2 layers."""
    one = activation_memory(cfg.model_copy(update={"n_layers": 1}), micro_batch, seq_len, precision, "none", **kw)
    two = activation_memory(cfg.model_copy(update={"n_layers": 2}), micro_batch, seq_len, precision, "none", **kw)
    return two - one, 2 * one - two


def _replicated_per_layer(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                          dropout: bool = False) -> int:
    """Bytes of one block that tensor parallelism without sequence parallelism does not split:
    the norms' tensors, the inputs of the QKV and first MLP projections, the residual dropout masks
    (Korthikanti et al. 2022, Section 4.2.1: 10 sbh for a GPT block, the rest divides by t)."""
    p, sbh = BYTES[precision], seq_len * micro_batch * cfg.dim
    norm = p * sbh * (2 if cfg.norm == "rmsnorm" else 1)
    return 2 * norm + 2 * p * sbh + (2 * sbh if dropout else 0)


def activation_bytes_per_gpu(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                             checkpointing: str = "none", *, tp: int = 1, sequence_parallel: bool = True,
                             pp: int = 1, in_flight: int | None = None, ac_every: int = 2,
                             fused_attention: bool = True, dropout: bool = False) -> int:
    """Activation bytes one GPU keeps, at the peak of a step.

    Per block: `activation_memory`'s block, divided by ``tp`` with sequence parallelism (their
    ``sbh (34/t + 5as/(ht))``), or with the replicated part left whole without it (``sbh (10 +
    24/t + 5as/(ht))``). Pipeline 1F1B: the first stage holds ``in_flight`` (= pp) micro-batches of
    its L/pp blocks (Korthikanti et al. 2022, Section 4.2.3: L blocks' worth whatever pp is). Full
    recomputation keeps each block's input (sbh/t with SP) and one block being recomputed. The
    output head and loss (vocabulary-parallel under TP) are counted once, on top (conservative:
    they live on the last stage, not the first).
    """
    kw = {"fused_attention": fused_attention, "dropout": dropout}
    layer, head = _layer_and_head(cfg, micro_batch, seq_len, precision, **kw)
    rep = _replicated_per_layer(cfg, micro_batch, seq_len, precision, dropout)
    layer_gpu = layer / tp if (sequence_parallel or tp == 1) else rep + (layer - rep) / tp
    p, sbh = BYTES[precision], seq_len * micro_batch * cfg.dim
    block_input = p * sbh / (tp if sequence_parallel else 1)
    n_stage = math.ceil(cfg.n_layers / pp)
    m = in_flight if in_flight is not None else pp
    if checkpointing == "none":
        per_mb = n_stage * layer_gpu
    elif checkpointing == "full":
        per_mb = n_stage * block_input
    elif checkpointing == "every_k":
        n_ck = n_stage // ac_every
        per_mb = n_ck * block_input + (n_stage - n_ck) * layer_gpu
    else:
        raise ValueError(f"checkpointing must be none, full or every_k, got {checkpointing!r}")
    recompute = layer_gpu if checkpointing != "none" else 0  # the block being recomputed in backward
    return round(m * per_mb + recompute + head / tp)


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int, precision: str = "bf16", tp: int = 1) -> int:
    """K and V of every layer for ``batch`` sequences of ``length`` tokens (GQA: kv heads only)."""
    return round(2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * batch * length * BYTES[precision] / tp)


# --------------------------------------------------------------------------------------------
# laws


def law_loss(law: dict[str, float], n: float, d: float) -> float:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Eq. 2)."""
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def compute_optimal(law: dict[str, float], flops: float) -> tuple[float, float]:
    """N_opt, D_opt minimizing L under C = 6 N D (Hoffmann et al. 2022, Eq. 4 / Appendix D.2):
    N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta))."""
    a, b = law["alpha"], law["beta"]
    g = (a * law["A"] / (b * law["B"])) ** (1.0 / (a + b))
    n = g * (flops / 6.0) ** (b / (a + b))
    return n, flops / (6.0 * n)


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    model: dict[str, Any]
    inputs: dict[str, Any]
    params: dict[str, int]
    compute: dict[str, float]
    memory: dict[str, Any]
    time: dict[str, Any]
    data: dict[str, Any]
    law: dict[str, Any] | None = None
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "inputs": self.inputs, "params": self.params, "compute": self.compute,
                "memory": self.memory, "time": self.time, "data": self.data, "law": self.law,
                "advice": self.advice}


def _gpu_total(cfg: ModelConfig, inp: PlanInputs, *, zero: int, tp: int, pp: int, micro_batch: int,
               checkpointing: str) -> float:
    """Bytes per GPU (model states + activations) of one layout: used to test alternatives."""
    dp = max(1, inp.gpus // (tp * pp))
    states = shard_model_states(model_memory(cfg, inp.optimizer, inp.precision), zero, dp, tp * pp)
    act = activation_bytes_per_gpu(cfg, micro_batch, inp.seq_len, _act_precision(inp), checkpointing, tp=tp,
                                   sequence_parallel=inp.sequence_parallel, pp=pp,
                                   in_flight=inp.pp_microbatches if pp == inp.pp else None, ac_every=inp.ac_every)
    return states.total + act


def _act_precision(inp: PlanInputs) -> str:
    # bf16 autocast over fp32 parameters keeps 16-bit activations, like bf16 parameters do.
    return "bf16" if inp.precision == "fp32" else inp.precision


def _advice(cfg: ModelConfig, inp: PlanInputs, usable: float) -> list[str]:
    """Changes that make one GPU's share fit, each with the bytes it gives: the first five of
    ZeRO stages, recomputation, a smaller micro-batch, TP, then PP (roughly by their cost)."""
    base = dict(zero=inp.zero, tp=inp.tp, pp=inp.pp, micro_batch=inp.micro_batch, checkpointing=inp.checkpointing)
    options: list[tuple[str, dict[str, Any]]] = []
    for z in range(inp.zero + 1, 4):
        options.append((f"ZeRO-{z} (--zero {z})", {**base, "zero": z}))
    if inp.checkpointing != "full":
        options.append(("full activation recomputation (--checkpointing full)", {**base, "checkpointing": "full"}))
    if inp.micro_batch > 1:
        options.append(("micro-batch 1 (--micro-batch 1)", {**base, "micro_batch": 1}))
    options.append(("ZeRO-3 + full recomputation + micro-batch 1",
                    {**base, "zero": 3, "checkpointing": "full", "micro_batch": 1}))
    for tp in (2, 4, 8):
        if tp > inp.tp and inp.gpus % (tp * inp.pp) == 0 and cfg.n_heads % tp == 0:
            options.append((f"tensor parallel {tp} (--tp {tp})", {**base, "tp": tp}))
    for pp in (2, 4, 8, 16):
        if pp > inp.pp and inp.gpus % (inp.tp * pp) == 0 and cfg.n_layers >= pp:
            options.append((f"{pp} pipeline stages (--pp {pp})", {**base, "pp": pp}))
    out = []
    for text, lay in options:
        total = _gpu_total(cfg, inp, **lay)
        if total <= usable:
            out.append(f"{text}: {total / GB:.1f} GB per GPU")
    out = out[:5]
    if not out:
        out.append(f"no single change fits {usable / GB:.0f} GB: use more GPUs, a larger device, or combine TP, PP "
                   "and ZeRO-3")
    return out


def make_plan(cfg: ModelConfig, inp: PlanInputs) -> Plan:
    """The plan of training ``cfg`` on ``inp.tokens`` tokens with ``inp``'s layout and device."""
    inp.validate()
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is not set: give --vocab or a recipe whose tokenizer is trained")
    if cfg.n_heads % inp.tp:
        raise ValueError(f"tp ({inp.tp}) must divide n_heads ({cfg.n_heads})")
    if inp.pp > cfg.n_layers:
        raise ValueError(f"pp ({inp.pp}) exceeds n_layers ({cfg.n_layers})")
    dev = ACCELERATORS[inp.device.lower()]
    n_total = param_count(cfg)
    n_nonemb = param_count(cfg, embeddings=False)
    n_active = param_count(cfg, active=True)
    params = {"total": n_total, "embedding": n_total - n_nonemb, "non_embedding": n_nonemb, "active": n_active}

    fpt = flops_per_token(cfg, inp.seq_len)
    total_flops = fpt * inp.tokens
    attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * inp.seq_len
    # 6ND with N the (active) parameter count is the budget papers quote (Kaplan et al. 2020,
    # Hoffmann et al. 2022; GPT-3's 3.14e23); flops_per_token's 6N counts matmul weights only.
    compute = {"flops_per_token": fpt, "matmul_per_token": fpt - attention, "attention_per_token": attention,
               "total_flops": total_flops, "total_flops_6nd": 6.0 * n_active * inp.tokens}

    mem = model_memory(cfg, inp.optimizer, inp.precision)
    mp = inp.tp * inp.pp
    zero_rows = {}
    for z in (0, 1, 2, 3):
        s = shard_model_states(mem, z, inp.dp, mp)
        zero_rows[f"zero{z}"] = {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "total": s.total}
    act_prec = _act_precision(inp)
    act_kw = dict(tp=inp.tp, sequence_parallel=inp.sequence_parallel, pp=inp.pp, in_flight=inp.pp_microbatches,
                  ac_every=inp.ac_every)
    activations = {ck: activation_bytes_per_gpu(cfg, inp.micro_batch, inp.seq_len, act_prec, ck, **act_kw)
                   for ck in ("none", "full")}
    act_used = activation_bytes_per_gpu(cfg, inp.micro_batch, inp.seq_len, act_prec, inp.checkpointing, **act_kw)
    states = zero_rows[f"zero{inp.zero}"]["total"]
    total = states + act_used
    usable = dev.memory_gb * GB * inp.headroom
    kv_len = inp.kv_len or inp.seq_len
    kv = kv_cache_bytes(cfg, inp.kv_batch, kv_len, inp.kv_precision, inp.tp)
    weights_inf = round(n_total * BYTES[inp.kv_precision] / mp)
    memory = {
        "model_states": zero_rows, "zero": inp.zero,
        "activations": activations, "activations_used": act_used, "checkpointing": inp.checkpointing,
        "total_per_gpu": total, "device_memory": dev.memory_gb * GB, "usable": usable, "fits": total <= usable,
        "kv_cache": {"batch": inp.kv_batch, "length": kv_len, "bytes": kv, "weights": weights_inf,
                     "fits": kv + weights_inf <= usable},
    }
    advice = [] if total <= usable else _advice(cfg, inp, usable)

    peak = dev.peak_bf16_tflops * 1e12
    seconds = total_flops / (inp.gpus * peak * inp.mfu)
    gpu_hours = seconds * inp.gpus / 3600
    time = {"device": dev.name, "peak_tflops": dev.peak_bf16_tflops, "source": dev.source, "mfu": inp.mfu,
            "seconds": seconds, "days": seconds / 86400, "gpu_hours": gpu_hours,
            "tokens_per_s": inp.tokens / seconds,
            "cost": gpu_hours * inp.price_per_gpu_hour if inp.price_per_gpu_hour is not None else None}
    data = {"tokens": inp.tokens, "tokens_per_param": inp.tokens / n_total,
            "chinchilla_tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM,
            "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * n_total}
    law = None
    if inp.law is not None:
        c = compute["total_flops_6nd"]
        n_opt, d_opt = compute_optimal(inp.law, c)
        law = {"loss": law_loss(inp.law, n_total, inp.tokens), "flops_6nd": c, "n_opt": n_opt, "d_opt": d_opt,
               "loss_at_opt": law_loss(inp.law, n_opt, d_opt), "tokens_per_param_opt": d_opt / n_opt}
    model = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
             "hidden_dim": cfg.hidden_dim, "vocab_size": cfg.vocab_size, "moe_experts": cfg.moe_experts}
    inputs = {"tokens": inp.tokens, "seq_len": inp.seq_len, "gpus": inp.gpus, "tp": inp.tp, "pp": inp.pp,
              "dp": inp.dp, "zero": inp.zero, "precision": inp.precision, "optimizer": inp.optimizer,
              "micro_batch": inp.micro_batch, "checkpointing": inp.checkpointing, "device": inp.device.lower(),
              "mfu": inp.mfu, "price_per_gpu_hour": inp.price_per_gpu_hour}
    return Plan(model=model, inputs=inputs, params=params, compute=compute, memory=memory, time=time, data=data,
                law=law, advice=advice)


# --------------------------------------------------------------------------------------------
# text


def _si(x: float, unit: str = "") -> str:
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suf}{unit}"
    return f"{x:.0f}{unit}"


def _gb(b: float) -> str:
    return f"{b / GB:.2f} GB"


def format_plan(plan: Plan) -> str:
    """The plan as a few aligned text blocks (what `smelt plan` prints)."""
    p, c, m, t, d, i = plan.params, plan.compute, plan.memory, plan.time, plan.data, plan.inputs
    md = plan.model
    experts = f" experts={md['moe_experts']}" if md["moe_experts"] else ""
    lines = [
        f"model      d={md['dim']} L={md['n_layers']} heads={md['n_heads']} (kv {md['n_kv_heads']}) "
        f"ffn={md['hidden_dim']} vocab={md['vocab_size']}{experts}",
        f"layout     {i['gpus']} GPUs = dp {i['dp']} x tp {i['tp']} x pp {i['pp']}, ZeRO-{i['zero']}, "
        f"{i['precision']} params, {i['optimizer']}, micro-batch {i['micro_batch']} x {i['seq_len']} tokens",
        "",
        f"parameters total {p['total']:,}  embedding {p['embedding']:,}  non-embedding {p['non_embedding']:,}"
        + (f"  active {p['active']:,}" if p["active"] != p["total"] else ""),
        f"compute    {c['flops_per_token']:.3e} FLOPs/token (6N {c['matmul_per_token']:.3e} + attention "
        f"{c['attention_per_token']:.3e})",
        f"           {c['total_flops']:.3e} FLOPs for {_si(d['tokens'])} tokens (6ND: {c['total_flops_6nd']:.3e})",
        "",
        "memory per GPU (model states)   weights     grads  optimizer     total",
    ]
    for z in range(4):
        r = m["model_states"][f"zero{z}"]
        mark = " <-" if z == m["zero"] else ""
        lines.append(f"  ZeRO-{z}{'':24}{r['params'] / GB:8.2f}  {r['grads'] / GB:8.2f}  {r['optimizer'] / GB:9.2f}"
                     f"  {r['total'] / GB:8.2f} GB{mark}")
    a = m["activations"]
    lines += [
        f"activations per micro-batch     {_gb(a['none'])} stored, {_gb(a['full'])} with full recomputation "
        f"(using: {m['checkpointing']})",
        f"total per GPU                   {_gb(m['total_per_gpu'])} of {_gb(m['usable'])} usable on "
        f"{t['device']} ({_gb(m['device_memory'])}): " + ("fits" if m["fits"] else "DOES NOT FIT"),
    ]
    for a_line in plan.advice:
        lines.append(f"  try: {a_line}")
    kv = m["kv_cache"]
    lines += [
        f"inference  KV cache {_gb(kv['bytes'])} for {kv['batch']} x {kv['length']} tokens + weights "
        f"{_gb(kv['weights'])} per GPU: " + ("fits" if kv["fits"] else "does not fit"),
        "",
        f"time       {t['days']:.1f} days ({t['seconds'] / 3600:,.0f} h) on {i['gpus']} x {t['device']} "
        f"({t['peak_tflops']:g} TFLOP/s bf16 dense) at {t['mfu']:.0%} MFU: {t['gpu_hours']:,.0f} GPU-hours, "
        f"{_si(t['tokens_per_s'])} tokens/s"
        + (f", ${t['cost']:,.0f} at ${i['price_per_gpu_hour']:g}/GPU-hour" if t["cost"] is not None else ""),
        f"data       {d['tokens_per_param']:.1f} tokens per parameter (Chinchilla-optimal ~"
        f"{d['chinchilla_tokens_per_param']:.0f}: {_si(d['chinchilla_tokens'])} tokens for this model)",
    ]
    if plan.law is not None:
        lw = plan.law
        lines.append(f"law        predicted loss {lw['loss']:.4f}; compute-optimal for the same "
                     f"{lw['flops_6nd']:.3e} FLOPs: N {_si(lw['n_opt'])}, D {_si(lw['d_opt'])} "
                     f"({lw['tokens_per_param_opt']:.1f} tokens/param), loss {lw['loss_at_opt']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# from a recipe


def from_recipe(recipe: Any, run_dir: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """The model and `PlanInputs` fields a recipe implies: ``model:`` (vocabulary from the run's
    tokens/manifest.json, else the tokenizer's target size rounded up to its multiple), tokens =
    max_steps x global batch x seq_len, precision, ZeRO/TP/PP, micro-batch and recomputation."""
    import json
    from pathlib import Path

    cfg = recipe.model or ModelConfig()
    if cfg.vocab_size is None:
        manifest = Path(run_dir if run_dir is not None else recipe.run_dir) / "tokens" / "manifest.json"
        if manifest.is_file():
            cfg = cfg.with_vocab(int(json.loads(manifest.read_text())["vocab_size"]))
        elif recipe.tokenizer is not None:
            t = recipe.tokenizer
            cfg = cfg.with_vocab(t.vocab_multiple * math.ceil(t.vocab_size / t.vocab_multiple))
    fields: dict[str, Any] = {}
    seq = recipe.loader.seq_len if recipe.loader is not None else cfg.max_seq_len
    fields["seq_len"] = seq
    if recipe.train is not None:
        tr = recipe.train
        fields.update(tokens=float(tr.max_steps * tr.batch.global_batch * seq), precision=tr.precision,
                      optimizer=tr.optim.name, micro_batch=tr.batch.micro_batch, zero=tr.parallel.zero,
                      tp=tr.parallel.tp, pp=tr.parallel.pp, checkpointing=tr.activation_checkpointing,
                      ac_every=tr.ac_every, sequence_parallel=tr.parallel.sequence_parallel,
                      pp_microbatches=tr.parallel.pp_microbatches)
    return cfg, fields
