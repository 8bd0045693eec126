"""nanoGPT's "baby GPT on CPU" budget on tinyshakespeare, through smelt's whole pipeline.

nanoGPT (Karpathy, README, "I only have a macbook") trains a character-level GPT on a CPU with::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

which, run on these machines, reached 1.886 nats per character on the held-out text in 3 min 04 s
(characters are its tokens, so its val loss is nats/char). This script spends the same budget
through smelt, one run per `Setting`:

1. text: the first 90% of the characters train, the last 10% are held out (nanoGPT's
   ``data/shakespeare_char/prepare.py`` split);
2. the training part is written as curated documents of 200 lines (``data/clean/<domain>/``
   through `smelt.data.io.ShardWriter`, the format `smelt data` writes). Curation's filters are
   bypassed: the text is clean, and play dialogue (short lines, names in capitals) is what
   Gopher/C4/FineWeb rules are built to reject;
3. a byte-level BPE is trained on the training part only (`smelt.tokenizer.train`);
4. the training part is packed into token shards (`smelt.tokens.pack`), all in the train split;
5. smelt's trainer (`smelt.train.trainer.Trainer`, recipe from `build_recipe`) trains the
   ``cpu-1m`` preset (4 layers, 4 heads, 128 wide: nanoGPT's shape, LLaMA-style) for 2000 steps
   of 12 sequences;
6. the held-out text, tokenized whole, is scored in fp32 by `score_text`: nats per character is
   the sum of the tokens' negative log-likelihoods over the number of held-out characters, a
   figure that does not depend on the tokenizer. The headline uses consecutive windows of the
   training length, so each token is predicted from 1..seq_len tokens of context, as nanoGPT's
   estimator does with 1..64 characters; a sliding-window score (stride seq_len / 4) is printed
   beside it.

Kept equal to nanoGPT's budget in every setting: the model's shape (~0.8M non-embedding
parameters), at most 2000 optimizer steps, 12 sequences per step, the split, the held-out text.
What the settings change: the tokenizer (the default's 64 tokens cover ~180 characters, nanoGPT's
64 characters; the ``*-seq24/32`` settings cover ~64), the architecture family, the schedule,
precision and kernels. bench/README.md has the figures and the discussion of fairness.

    python bench/shakespeare.py                         # the default setting, ~2-2.5 minutes
    python bench/shakespeare.py --vocab 263 --lr 1e-3   # any field of Setting can be overridden
    python bench/shakespeare.py --sweep                 # every setting of SWEEP, ~35 minutes
    python bench/shakespeare.py --sweep bytes bpe-512-seq32 --threads 2    # some, with an override
    python bench/shakespeare.py --workdir /tmp/shk --json /tmp/shk.json   # keep run dirs and figures

Printed: one line per run, then a table (tokenizer, vocabulary, characters per token and per
sequence, characters seen, parameters, steps, trainer and total wall time, held-out nats/char,
ratios to nanoGPT's 1.886 / 184 s, load average before and after: other jobs on the 2 cores slow
every run down), then one JSON object with every figure (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# nanoGPT's figures for this budget, measured on these machines (issue 4, "Benchmark").
NANOGPT_NATS_PER_CHAR = 1.886
NANOGPT_SECONDS = 184.0
# nanoGPT's data/shakespeare_char/prepare.py: train = data[:int(n * 0.9)], val = the rest.
TRAIN_FRACTION = 0.9
DOMAIN = "shakespeare"


def default_input() -> Path:
    env = os.environ.get("SMELT_SHARED_DATA")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    return base / "tinyshakespeare" / "input.txt"


# --------------------------------------------------------------------------------------------
# settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of spending the budget. The fields nanoGPT's budget fixes (steps, batch, model
    shape) keep its values in every setting of SWEEP."""

    name: str = "default"
    vocab: int = 2048              # tokenizer.vocab_size (263 = 7 specials + 256 bytes: no merges, i.e. characters)
    seq_len: int = 64              # tokens per training sequence (nanoGPT: block_size=64 characters)
    steps: int = 2000              # optimizer steps (nanoGPT: max_iters=2000)
    batch: int = 12                # sequences per step (nanoGPT: batch_size=12)
    lr: float = 2e-3               # peak learning rate (nanoGPT's shakespeare_char config: 1e-3)
    schedule: str = "linear"       # LR after warmup: linear | cosine | wsd | constant (nanoGPT: cosine)
    min_lr_ratio: float = 0.0      # final LR / peak (nanoGPT: min_lr = lr / 10)
    warmup: int = 100              # warmup steps (nanoGPT: warmup_iters=100)
    beta2: float = 0.99            # AdamW beta2 (nanoGPT's shakespeare_char: 0.99, for few tokens per step)
    weight_decay: float = 0.1      # nanoGPT: 0.1
    precision: str = "bf16"        # fp32 | bf16 (autocast; fp32 master weights)
    tie: bool = True               # tied input/output embeddings (nanoGPT ties them too)
    mlp: str = "swiglu"            # swiglu | gelu (nanoGPT: gelu, 4x wide)
    threads: int = 1               # torch CPU threads (see "Threads" in bench/README.md)
    compile: bool = False          # torch.compile each block
    sdpa: str = "default"          # default | math: attention kernel (torch's choice, or the composite one)
    shifts: int = 1                # 1 + shifted copies of the training text (write_shifted_copies)
    lines_per_doc: int = 200       # lines per training document (the packer puts EOS between documents)
    seed: int = 1234               # recipe seed: tokenizer sample, initialization, data order


_NANO = dict(vocab=263, lr=1e-3, schedule="cosine", min_lr_ratio=0.1, precision="fp32")
# Every setting tried, in the order of bench/README.md's table; the first is the default.
SWEEP: tuple[Setting, ...] = (
    Setting(),
    # The tokenizer, everything else as the default.
    Setting(name="bpe-1024", vocab=1024),
    Setting(name="bpe-512", vocab=512),
    Setting(name="bytes", vocab=263),
    # Sequences of about nanoGPT's 64 characters (the same characters per step and in total).
    Setting(name="bpe-2048-seq24", seq_len=24),
    Setting(name="bpe-512-seq32", vocab=512, seq_len=32),
    # nanoGPT's own hyper-parameters (characters, LR 1e-3, cosine to lr/10, fp32) on smelt's model.
    Setting(name="nanogpt-hparams", **_NANO),
    # One change at a time from the default.
    Setting(name="seed-2", seed=2),
    Setting(name="fp32", precision="fp32"),
    Setting(name="cosine", schedule="cosine", min_lr_ratio=0.1),
    Setting(name="lr-1e-3", lr=1e-3),
    Setting(name="lr-3e-3", lr=3e-3),
    Setting(name="untied", tie=False),
    Setting(name="gelu", mlp="gelu"),
    Setting(name="shifts-4", shifts=4),
    Setting(name="seq-128", seq_len=128),
    # Speed only (same numbers, other kernels or thread counts).
    Setting(name="sdpa-math", sdpa="math"),
    Setting(name="threads-2", threads=2),
    Setting(name="compile", compile=True),
)


# --------------------------------------------------------------------------------------------
# helpers


def tune_malloc() -> bool:
    """Fix glibc malloc's mmap threshold at 32 MiB and its trim threshold at 64 MiB; True if set.

    glibc serves blocks above the mmap threshold (128 KiB at start) with a fresh mmap, and
    returns them to the kernel on free, so each one costs page faults again. It raises the
    threshold only after a large mmapped block is freed (glibc malloc(3), M_MMAP_THRESHOLD). The
    trainer's per-step tensors of this model (0.1-6 MB) never trigger that, so the first run of a
    process trained at ~61 ms/step and every later one, after the scoring pass had freed a 33 MB
    logits tensor, at ~50 ms/step (measured, 1 thread). Fixing both thresholds at start makes
    every run of a sweep equal, and all of them fast. Process-wide, no effect off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 64 << 20) == 1)


def load_avg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


@contextlib.contextmanager
def timer(store: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def split_text(text: str) -> tuple[str, str]:
    """nanoGPT's split: the first int(0.9 n) characters train, the rest are held out."""
    n = int(len(text) * TRAIN_FRACTION)
    return text[:n], text[n:]


def line_chunks(text: str, lines_per_doc: int) -> list[str]:
    """Consecutive runs of ``lines_per_doc`` lines (newlines kept): ``"".join(chunks) == text``."""
    lines = text.splitlines(keepends=True)
    return ["".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]


def _write_domain(text: str, clean_dir: Path, domain: str, lines_per_doc: int) -> Path:
    from smelt.data.document import Document
    from smelt.data.io import ShardWriter

    path = clean_dir / domain / "part-00000.jsonl.zst"
    with ShardWriter(path, "jsonl.zst") as w:
        for i, chunk in enumerate(line_chunks(text, lines_per_doc)):
            w.write(Document(id=f"{domain}/{i:05d}", text=chunk, domain=domain))
    return path


def write_documents(text: str, clean_dir: Path, lines_per_doc: int) -> dict[str, list[Path]]:
    """The training text as one curated shard of documents of ``lines_per_doc`` lines each,
    ``{domain: [file]}``: the format `smelt data` writes, so tokenizer and pack read it as is.
    The packer ends every document with EOS: 200 lines (~7,600 characters) per document puts
    one EOS per ~3,800 BPE tokens, a negligible share of the stream."""
    return {DOMAIN: [_write_domain(text, clean_dir, DOMAIN, lines_per_doc)]}


def write_shifted_copies(text: str, clean_dir: Path, lines_per_doc: int, shifts: int,
                         window_chars: float) -> dict[str, list[Path]]:
    """Domains ``shakespeare-s1..s{shifts-1}``: copies of the text starting ``k / shifts`` of a
    training window (``window_chars`` characters) later.

    The loader cuts each domain's stream into fixed windows and reshuffles them every epoch;
    nanoGPT draws a random offset for every sample instead. Shifted copies put the window
    boundaries at ``shifts`` different places (tried; it did not help, see bench/README.md).
    """
    out = {}
    for k in range(1, shifts):
        domain = f"{DOMAIN}-s{k}"
        out[domain] = [_write_domain(text[round(k * window_chars / shifts):], clean_dir, domain, lines_per_doc)]
    return out


# --------------------------------------------------------------------------------------------
# evaluation: nats per character over the whole held-out text


def score_text(model: Any, ids: list[int], bos: int, seq_len: int, stride: int,
               batch_size: int = 64) -> tuple[float, int]:
    """Sum of token NLLs (nats, fp32) of ``ids`` under ``model``, and how many tokens were scored.

    The sequence is ``[bos] + ids`` so that the first token is scored too. Windows of ``seq_len``
    inputs start every ``stride`` tokens; the first window scores all its targets, every later one
    only its last ``stride`` (the earlier ones were scored by the previous window), so every token
    is scored exactly once. ``stride == seq_len``: consecutive windows, each token predicted from
    1..seq_len tokens of context (nanoGPT's estimator: 1..block_size characters). A smaller
    stride gives every token at least ``seq_len - stride`` tokens of context.
    """
    import torch
    import torch.nn.functional as F

    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len], got {stride}")
    seq = torch.tensor([bos, *ids], dtype=torch.long)  # (N + 1,)
    n = len(ids)
    # Window w covers inputs seq[s : s + m] and targets seq[s + 1 : s + m + 1], m = min(seq_len, n - s).
    starts = [0] + list(range(stride, max(n - seq_len + stride, 1), stride))
    total, scored = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, len(starts), batch_size):
                group = starts[b0:b0 + batch_size]
                x = torch.zeros(len(group), seq_len, dtype=torch.long)  # (b, T), right-padded
                y = torch.full((len(group), seq_len), -100, dtype=torch.long)  # (b, T), -100: not scored
                for i, s in enumerate(group):
                    m = min(seq_len, n - s)
                    first = 0 if s == 0 else seq_len - stride
                    x[i, :m] = seq[s:s + m]
                    y[i, first:m] = seq[s + 1 + first:s + m + 1]
                logits = model(x)  # (b, T, V); causal, so the right padding changes nothing scored
                total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                               reduction="sum"))
                scored += int((y != -100).sum())
    finally:
        model.train(was_training)
    if scored != n:
        raise RuntimeError(f"scored {scored} of {n} tokens: windowing bug")
    return total, scored


# --------------------------------------------------------------------------------------------
# one run


def build_recipe(s: Setting, windows: int) -> Any:
    """The recipe of one setting (``loader``, ``model``, ``train``), validated by smelt.config."""
    from smelt.config import parse_recipe

    samples = s.steps * s.batch
    return parse_recipe({
        "name": s.name,
        "seed": s.seed,
        # A vocabulary of V tokens packs the training text into fewer windows than characters:
        # allow as many epochs as the budget needs (the loader reshuffles windows every epoch).
        "loader": {"seq_len": s.seq_len, "max_epochs": max(4.0, 1.5 * samples / max(1, windows))},
        # cpu-1m: 4 layers, 4 heads, 128 wide, SwiGLU 352 hidden (nanoGPT's baby GPT shape).
        "model": {"preset": "cpu-1m", "tie_embeddings": s.tie, "mlp": s.mlp, "max_seq_len": max(256, s.seq_len)},
        "train": {
            "max_steps": s.steps,
            "precision": s.precision,
            "compile": s.compile,
            "threads": s.threads,
            "batch": {"global_batch": s.batch, "micro_batch": s.batch},
            "optim": {"lr": s.lr, "betas": [0.9, s.beta2], "weight_decay": s.weight_decay},
            "schedule": {"kind": s.schedule, "warmup_steps": s.warmup, "min_lr_ratio": s.min_lr_ratio},
            "log_every": 50,
            "eval_every": 0,  # the held-out text is scored below; the trainer's own val split is empty
            "checkpoint": {"every": s.steps, "keep": 1},  # one checkpoint, at the end
            "tensorboard": False,
            # MFU peak from DESIGN.md's measurement on these machines, instead of re-measuring it at start-up.
            "peak_tflops": 0.47 if s.precision == "bf16" else 0.16,
        },
    })


def run_setting(s: Setting, text: str, workdir: Path, progress: bool) -> dict[str, Any]:
    """Documents, tokenizer, pack, train and score one setting in ``workdir/<name>``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from smelt.config import PackConfig, TokenizerConfig
    from smelt.model.flops import param_count
    from smelt.tokenizer.train import load_tokenizer, special_ids, train_tokenizer
    from smelt.tokens.pack import pack_tokens
    from smelt.train.trainer import Trainer

    t_total = time.perf_counter()
    timings: dict[str, float] = {}
    load_before = load_avg()
    run_dir = workdir / s.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    torch.set_num_threads(s.threads)
    train_text, val_text = split_text(text)
    clean = run_dir / "data" / "clean"

    with timer(timings, "documents"):
        shards = write_documents(train_text, clean, s.lines_per_doc)
    with timer(timings, "tokenizer"):  # trained on the training text only
        tcfg = TokenizerConfig(kind="bpe", vocab_size=s.vocab, vocab_multiple=64, num_sentinels=0,
                               sample_chars_per_domain=2 * len(train_text), min_frequency=2)
        tstats = train_tokenizer(tcfg, shards, run_dir / "tokenizer", s.seed)
        tok = load_tokenizer(run_dir / "tokenizer" / "tokenizer.json")
    if s.shifts > 1:
        with timer(timings, "documents"):
            head = train_text[:100_000]
            window_chars = s.seq_len * len(head) / len(tok.encode(head, add_special_tokens=False).ids)
            shards.update(write_shifted_copies(train_text, clean, s.lines_per_doc, s.shifts, window_chars))
    with timer(timings, "pack"):  # everything in the train split: the held-out text is scored below
        pcfg = PackConfig(val_fraction=0.0, min_val_docs=0, workers=1)
        pman = pack_tokens(pcfg, run_dir / "tokenizer", shards, run_dir / "tokens", s.seed, workers=1)
    train_tokens = pman["domains"][DOMAIN]["train"]["tokens"]
    windows = sum(d["train"]["tokens"] for d in pman["domains"].values()) // (s.seq_len + 1)

    recipe = build_recipe(s, windows)
    # "math": SDPA's composite kernel, whose backward is ~4x faster than the CPU flash kernel's at
    # T=64, head_dim 32 (bench/README.md); "default" leaves torch's choice (flash on CPU).
    backend = sdpa_kernel([SDPBackend.MATH]) if s.sdpa == "math" else contextlib.nullcontext()
    with timer(timings, "train"), backend:
        trainer = Trainer(recipe, run_dir, resume=False, progress=progress)
        summary = trainer.run()

    with timer(timings, "score"):  # fp32, whatever the training precision: a measurement
        val_ids = tok.encode(val_text, add_special_tokens=False).ids
        eos = special_ids(tok)["eos"]  # in the packed stream every document follows an EOS
        nll, n_tok = score_text(trainer.model, val_ids, eos, s.seq_len, s.seq_len)
        nll_slide, _ = score_text(trainer.model, val_ids, eos, s.seq_len, max(1, s.seq_len // 4))
    total = time.perf_counter() - t_total

    mcfg = trainer.model_cfg
    n_chars = len(val_text)
    nats = nll / n_chars
    chars_per_token = n_chars / n_tok
    return {
        "setting": dataclasses.asdict(s),
        "tokenizer": "bytes" if tstats["learned_tokens"] <= 256 else "byte-BPE",
        "vocab_size": tstats["vocab_size"],
        "chars_per_token": chars_per_token,
        "chars_per_seq": s.seq_len * chars_per_token,
        "chars_seen": s.steps * s.batch * s.seq_len * chars_per_token,
        "params": summary["params"],
        "non_embedding_params": param_count(mcfg) - mcfg.vocab_size * mcfg.dim * (1 if mcfg.tie_embeddings else 2),
        "steps": summary["steps"],
        "train_tokens": train_tokens,
        "epochs": s.steps * s.batch * s.seq_len / train_tokens,
        "final_train_loss": summary["final_loss"],
        "stability": summary["stability"],
        "tokens_per_s_last": summary["tokens_per_s"],
        "val_chars": n_chars,
        "val_tokens": n_tok,
        "val_nats_per_token": nll / n_tok,
        "val_nats_per_char": nats,
        "val_nats_per_char_sliding": nll_slide / n_chars,
        "train_s": summary["timings"]["wall_s"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "total_s": total,
        "vs_nanogpt_loss": nats / NANOGPT_NATS_PER_CHAR,
        "vs_nanogpt_time": total / NANOGPT_SECONDS,
        "load_before": load_before,
        "load_after": load_avg(),
    }


# --------------------------------------------------------------------------------------------
# report


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'setting':<16} {'tokenizer':<9} {'vocab':>5} {'ch/tok':>6} {'ch/seq':>6} {'chars seen':>10} "
            f"{'params':>7} {'steps':>5} {'train s':>7} {'total s':>7} {'nats/ch':>7} {'sliding':>7} "
            f"{'loss x':>6} {'time x':>6}  load before -> after")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['setting']['name']:<16} {r['tokenizer']:<9} {r['vocab_size']:>5} {r['chars_per_token']:>6.2f} "
              f"{r['chars_per_seq']:>6.0f} {r['chars_seen'] / 1e6:>9.2f}M {r['params'] / 1e6:>6.2f}M {r['steps']:>5} "
              f"{r['train_s']:>7.1f} {r['total_s']:>7.1f} {r['val_nats_per_char']:>7.4f} "
              f"{r['val_nats_per_char_sliding']:>7.4f} {r['vs_nanogpt_loss']:>6.3f} {r['vs_nanogpt_time']:>6.3f}  "
              f"{r['load_before']} -> {r['load_after']}")
    print(f"nanoGPT, same budget, these machines: {NANOGPT_NATS_PER_CHAR} nats/char (characters, 1.54M seen) in "
          f"{NANOGPT_SECONDS:.0f} s. loss x, time x: smelt / nanoGPT (below 1: better). total s: documents + "
          "tokenizer + pack + train + scoring. nats/ch: consecutive windows of seq_len tokens (nanoGPT's estimator); "
          "sliding: stride seq_len/4.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=default_input(), help="tinyshakespeare input.txt")
    p.add_argument("--workdir", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--sweep", nargs="*", metavar="NAME", default=None,
                   help="run these settings of SWEEP (none named: all of them) instead of the default")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned: fixed glibc malloc thresholds (see tune_malloc); default: glibc's adaptive ones")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log smelt's INFO messages")
    g = p.add_argument_group("setting fields (override the default setting, or every --sweep setting)")
    for f in dataclasses.fields(Setting):
        kind = type(f.default)
        conv = (lambda x: x.lower() in ("1", "true", "yes", "on")) if kind is bool else kind
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=None,
                       help=f"default {f.default}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.input.is_file():
        sys.exit(f"{args.input}: not found (set SMELT_SHARED_DATA or --input)")
    text = args.input.read_text(encoding="utf-8")
    malloc_tuned = tune_malloc() if args.malloc == "tuned" else False
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Setting) if getattr(args, f.name) is not None}
    if args.sweep is None:
        settings = [dataclasses.replace(Setting(), **given)]
    else:
        by_name = {s.name: s for s in SWEEP}
        unknown = [n for n in args.sweep if n not in by_name]
        if unknown:
            sys.exit(f"unknown setting(s) {unknown}; SWEEP has {list(by_name)}")
        settings = [dataclasses.replace(by_name[n], **given) for n in (args.sweep or by_name)]
    import torch

    n_train = int(len(text) * TRAIN_FRACTION)
    print(f"tinyshakespeare: {len(text):,} characters, train {n_train:,}, held out {len(text) - n_train:,}; "
          f"torch {torch.__version__}, {os.cpu_count()} cores, malloc {'tuned' if malloc_tuned else 'default'}, "
          f"load {load_avg()}")
    rows = []
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smelt-shakespeare-")))
        for s in settings:
            r = run_setting(s, text, workdir, args.progress)
            rows.append(r)
            print(f"[{s.name}] {r['val_nats_per_char']:.4f} nats/char, train {r['train_s']:.1f} s, total "
                  f"{r['total_s']:.1f} s, load {r['load_before']} -> {r['load_after']}", flush=True)
    print()
    print_table(rows)
    out = {"bench": "shakespeare", "nanogpt": {"nats_per_char": NANOGPT_NATS_PER_CHAR, "seconds": NANOGPT_SECONDS},
           "python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
           "malloc_tuned": malloc_tuned, "runs": rows, "process_s": round(time.perf_counter() - t_start, 2)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
