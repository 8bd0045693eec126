"""The training loop on the real model and loader: learning, overfitting, exact resume, token-weighted
accumulation, spike/NaN skip and rollback, corrupt-checkpoint fallback, Ctrl-C, metrics, golden losses."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smelt.config import Recipe, RecipeError
from smelt.eval.runner import InTrainingEvaluator
from smelt.model.config import ModelConfig, preset
from smelt.model.llama import Transformer
from smelt.tokens.loader import MixtureLoader
from smelt.tokens.shards import write_shard
from smelt.train import checkpoint as ck
from smelt.train.metrics import read_metrics
from smelt.train.trainer import Trainer, train

VOCAB = 128
EOS = 2
FIRST_WORD_ID = 40  # above the special ids and the 32 default sentinels (smelt.tokens.objectives)
MARK_SPIKE, MARK_NAN = 38, 37  # sentinel ids never present in the corpus: they tag poisoned batches


class TrainRecipe(Recipe):
    """Recipe with the `model:` section (to be added to smelt.config.Recipe)."""

    model: ModelConfig | None = None


# --------------------------------------------------------------------------------------------
# a tiny learnable corpus: words (fixed token strings) chained by a sparse Markov matrix


def _corpus(n_docs: int, seed: int) -> list[np.ndarray]:
    """Python's `random()` only: its stream is guaranteed across Python versions (golden test)."""
    lex = random.Random(0)
    words = [[FIRST_WORD_ID + int(lex.random() * (VOCAB - FIRST_WORD_ID)) for _ in range(2 + int(lex.random() * 3))]
             for _ in range(16)]
    succ = [[int(lex.random() * 16) for _ in range(3)] for _ in range(16)]  # 3 possible next words
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        w, toks = int(rng.random() * 16), []
        for _ in range(5 + int(rng.random() * 30)):
            toks.extend(words[w])
            w = succ[w][int(rng.random() * 3)]
        docs.append(np.array(toks + [EOS], dtype=np.int64))
    return docs


def _write_tokens(root: Path) -> Path:
    """Shards and manifest in the layout `smelt pack` writes (see tests/tokens/test_loader.py)."""
    manifest: dict[str, Any] = {"format_version": 1, "tokenizer_sha256": "0" * 64, "vocab_size": VOCAB,
                                "dtype": "uint16", "eos_id": EOS, "bos_id": 1, "pad_id": 0, "domains": {},
                                "complete": True}
    for i, domain in enumerate(["en", "zh"]):
        entry = {}
        for split, docs in (("train", _corpus(300, 1 + i)), ("val", _corpus(12, 100 + i))):
            write_shard(root / domain / f"{split}-00000", docs, dtype=np.uint16)
            entry[split] = {"tokens": int(sum(len(d) for d in docs)), "docs": len(docs), "shards": [f"{split}-00000"]}
        manifest["domains"][domain] = entry
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokens(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run_dir(tmp_path: Path, tokens: Path, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "tokens").symlink_to(tokens)
    return run


def _recipe(**train: Any) -> TrainRecipe:
    model = train.pop("model", {"preset": "debug"})
    loader = train.pop("loader", {"seq_len": 32})
    base: dict[str, Any] = {
        "max_steps": 12, "threads": 1, "log_every": 1, "eval_every": 0, "eval_batches": 2, "tensorboard": False,
        "batch": {"global_batch": 8, "micro_batch": 4},
        "optim": {"lr": 3e-3}, "schedule": {"kind": "cosine", "warmup_steps": 3},
        "checkpoint": {"every": 4, "keep": 3},
        "stability": {"spike_window": 5},
    }
    for k, v in train.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return TrainRecipe.model_validate({"seed": 1234, "model": model, "loader": loader, "train": base})


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "train")]


# --------------------------------------------------------------------------------------------
# learning


def test_loss_decreases_with_metrics_validation_and_checkpoints(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    recipe = _recipe(max_steps=40, eval_every=20, tensorboard=True, checkpoint={"every": 20})
    summary = Trainer(recipe, run, progress=False).run()
    losses = [loss for _, loss in _losses(run)]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.1)  # uniform prediction at init
    assert np.mean(losses[-5:]) < losses[0] - 1.5
    assert summary["complete"] and summary["steps"] == 40 and summary["tokens"] == 40 * 8 * 32
    assert json.loads((run / "train" / "manifest.json").read_text())["final_loss"] == pytest.approx(losses[-1])

    rec = read_metrics(run / "train")[-1]
    assert {"kind", "step", "tokens", "loss", "loss_by_domain", "lr", "grad_norm", "batch_size", "tokens_per_s",
            "tflops", "mfu", "memory_gb", "skipped", "rolled_back", "time"} <= set(rec)
    assert set(rec["loss_by_domain"]) <= {"en", "zh"} and rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1
    assert rec["skipped"] == 0 and rec["batch_size"] == 8
    val = read_metrics(run / "train", kind="val")
    assert [v["step"] for v in val] == [20, 40]
    assert set(val[-1]["val_loss_by_domain"]) == {"en", "zh"} and val[-1]["val_loss"] < val[0]["val_loss"]
    assert summary["val_loss"] == pytest.approx(val[-1]["val_loss"])
    assert [p.name for _, p in ck.list_checkpoints(run / "train" / "checkpoints")] == ["step-0000020", "step-0000040"]
    assert (run / "train" / "checkpoints" / "latest").read_text().strip() == "step-0000040"
    assert any((run / "train" / "tensorboard").iterdir())


class _OneBatch:
    """Loader wrapper that always serves the first global batch."""

    def __init__(self, loader: MixtureLoader) -> None:
        self.inner = loader
        self.domains = loader.domains

    def batch(self, start: int, global_batch: int, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        return self.inner.batch(0, global_batch, rank, world)

    def val_batches(self, domain: str, batch_size: int, max_batches: int | None = None):
        return self.inner.val_batches(domain, batch_size, max_batches)


def test_overfits_a_single_batch(tmp_path: Path, tokens: Path) -> None:
    """Capacity, not stability: the spike guard is off. On one repeated batch the loss sits near 0
    with a tiny variance, so Adam's ordinary bounces (0.03 -> 0.1 at a constant LR 1e-2) exceed
    mean + 6 sigma; a skipped update leaves the same batch at the same loss, so every later step
    is skipped too and the loss freezes wherever the bounce left it (0.0968 with torch's SDPA,
    0.1156 with the explicit CPU attention: both frozen after 70-90 skipped steps). The cosine
    decay to 0 then settles the loss (~0.0055 on both attention paths)."""
    run = _run_dir(tmp_path, tokens)
    recipe = _recipe(max_steps=120, log_every=10, optim={"lr": 1e-2, "weight_decay": 0.0},
                     schedule={"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.0}, checkpoint={"every": 1000},
                     model={"preset": "debug", "dim": 96}, stability={"spike_policy": "none"})
    loader = _OneBatch(MixtureLoader(tokens, recipe.loader, recipe.seed))
    summary = Trainer(recipe, run, progress=False, loader=loader).run()
    assert summary["stability"]["skipped"] == 0
    assert summary["final_loss"] < 0.05, _losses(run)  # ~9x margin over the measured 0.0055


# --------------------------------------------------------------------------------------------
# exact resume


class _Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def hook(trainer: Trainer, result: dict) -> None:
        if trainer.step == step:
            raise _Crash(f"simulated kill after step {step}")
    return hook


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical(tmp_path: Path, tokens: Path) -> None:
    recipe = _recipe(max_steps=12, z_loss=1e-4)
    straight_run = _run_dir(tmp_path, tokens, "straight")
    straight = Trainer(recipe, straight_run, progress=False)
    straight.run()
    want = read_metrics(straight_run / "train")

    run = _run_dir(tmp_path, tokens, "crashy")
    with pytest.raises(_Crash):
        Trainer(recipe, run, progress=False, on_step=_crash_at(6)).run()  # checkpoint at 4; 5, 6 are lost
    assert [r["step"] for r in read_metrics(run / "train")] == [1, 2, 3, 4, 5, 6]
    resumed = Trainer(recipe, run, progress=False)
    assert resumed.resumed_from == "step-0000004" and resumed.step == 4 and resumed.samples_seen == 32
    summary = resumed.run()
    got = read_metrics(run / "train")
    assert [r["step"] for r in got] == list(range(1, 13))  # steps 5, 6 of the dead run were dropped
    for a, b in zip(want, got):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"], a["z_loss"]) == \
            (b["step"], b["loss"], b["grad_norm"], b["lr"], b["z_loss"])
    assert summary["final_loss"] == want[-1]["loss"] and summary["resumed_from"] == "step-0000004"
    pa, pb = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_truncated_checkpoint_resumes_from_the_previous_one(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    Trainer(_recipe(max_steps=8), run, progress=False).run()  # checkpoints at 4 and 8
    data = next((run / "train" / "checkpoints" / "step-0000008").glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 7)
    trainer = Trainer(_recipe(max_steps=10), run, progress=False)
    assert trainer.resumed_from == "step-0000004" and trainer.step == 4
    summary = trainer.run()
    assert summary["complete"] and summary["steps"] == 10
    assert [r["step"] for r in read_metrics(run / "train")] == list(range(1, 11))
    assert ck.find_latest(run / "train" / "checkpoints").name == "step-0000010"


# --------------------------------------------------------------------------------------------
# gradient accumulation


def test_accumulation_is_token_weighted(tmp_path: Path, tokens: Path) -> None:
    """Micro-batches of 1 and one micro-batch of 8 give the gradient of the mean over all target
    tokens of the global batch, also when rows have very different numbers of targets."""
    grads, losses = [], []
    batch = MixtureLoader(tokens, _recipe().loader, 1234).batch(0, 8)
    batch["targets"][:3, 4:] = -100  # rows 0-2: 4 targets; others: 32
    for micro in (1, 8):
        trainer = Trainer(_recipe(batch={"global_batch": 8, "micro_batch": micro}),
                          _run_dir(tmp_path, tokens, f"m{micro}"), progress=False)
        res = trainer.train_step(batch)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        losses.append(res["loss"])
        model = trainer.model
    # Reference: one forward over the whole batch, mean over non-ignored targets.
    model.zero_grad()
    logits = model(torch.from_numpy(batch["input_ids"]))
    ref = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["targets"]).flatten(), ignore_index=-100)
    ref.backward()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[1] == pytest.approx(ref.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[0][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
        torch.testing.assert_close(grads[1][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------------
# stability: poisoned batches


class _PoisonLoader:
    """Tags the global batches starting at the given sample indices with a marker token."""

    def __init__(self, loader: MixtureLoader, poison: dict[int, int]) -> None:
        self.inner, self.poison, self.domains = loader, poison, loader.domains

    def batch(self, start: int, global_batch: int, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        b = self.inner.batch(start, global_batch, rank, world)
        if start in self.poison:
            b["input_ids"][:, 0] = self.poison[start]
        return b

    def val_batches(self, domain: str, batch_size: int, max_batches: int | None = None):
        return self.inner.val_batches(domain, batch_size, max_batches)


class _PoisonModel(Transformer):
    """A tagged batch gets a huge loss (~100 nats/token: every logit mass on the marker) or NaN."""

    def forward(self, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        logits = super().forward(input_ids, **kw)
        if (input_ids == MARK_NAN).any():
            logits = logits + float("nan")
        if (input_ids == MARK_SPIKE).any():
            logits = logits + 100.0 * F.one_hot(torch.tensor(MARK_SPIKE), logits.shape[-1]).to(logits.dtype)
        return logits


def _poisoned(recipe: TrainRecipe, tokens: Path, poison: dict[int, int]) -> dict[str, Any]:
    torch.manual_seed(recipe.seed)
    model = _PoisonModel(preset("debug", vocab_size=VOCAB))
    loader = _PoisonLoader(MixtureLoader(tokens, recipe.loader, recipe.seed), poison)
    return {"model": model, "loader": loader}


def test_spike_and_nan_are_skipped(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    recipe = _recipe(max_steps=16, stability={"spike_policy": "skip", "spike_window": 5})
    B = 8
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snap(trainer: Trainer, result: dict) -> None:
        snapshots[trainer.step] = _params(trainer.model)

    trainer = Trainer(recipe, run, progress=False, on_step=snap,
                      **_poisoned(recipe, tokens, {8 * B: MARK_SPIKE, 11 * B: MARK_NAN}))  # steps 9 and 12
    summary = trainer.run()
    assert summary["stability"] == {"nan_loss": 1, "nan_grad": 0, "spikes": 1, "skipped": 2, "rolled_back": 0,
                                    "level_shifts": 0}
    for step in (9, 12):  # the update was dropped: parameters unchanged over the step
        assert all(torch.equal(snapshots[step][k], snapshots[step - 1][k]) for k in snapshots[step])
    assert not all(torch.equal(snapshots[10][k], snapshots[9][k]) for k in snapshots[10])
    train_lines = {r["step"]: r for r in read_metrics(run / "train")}
    assert train_lines[9]["action"] == "skip" and train_lines[9]["loss"] > 50
    assert train_lines[12]["action"] == "skip" and train_lines[12]["loss"] == "nan"
    events = read_metrics(run / "train", kind="event")
    assert [(e["step"], e["event"], e["action"]) for e in events] == [(9, "spike", "skip"), (12, "nan_loss", "skip")]
    normal = [r["loss"] for s, r in sorted(train_lines.items()) if s not in (9, 12)]
    assert all(math.isfinite(x) for x in normal) and normal[-1] < normal[0] - 0.5  # training recovered
    assert train_lines[16]["skipped"] == 2 and summary["complete"]


def test_spike_and_nan_roll_back(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    recipe = _recipe(max_steps=16, schedule={"kind": "constant", "warmup_steps": 2},
                     stability={"spike_policy": "rollback", "spike_window": 5, "rollback_lr_scale": 0.5,
                                "rollback_lr_steps": 3})
    B, lr = 8, 3e-3
    # Spike at step 10 (samples 72..80): back to step 8 (samples seen 64), continue from sample 80.
    # Then steps 9, 10, 11 use samples 80..104; the NaN batch at 104 is step 12: back to step 8
    # again (step 12 was never saved), continue from 112.
    trainer = Trainer(recipe, run, progress=False, **_poisoned(recipe, tokens, {9 * B: MARK_SPIKE, 13 * B: MARK_NAN}))
    summary = trainer.run()
    assert summary["stability"] == {"nan_loss": 1, "nan_grad": 0, "spikes": 1, "skipped": 0, "rolled_back": 2,
                                    "level_shifts": 0}
    assert summary["samples_skipped"] == (80 - 64) + (112 - 64)
    assert summary["samples"] == 112 + 8 * 8 and summary["steps"] == 16 and summary["complete"]
    events = read_metrics(run / "train", kind="event")
    assert [(e["step"], e["event"], e["action"]) for e in events] == [(10, "spike", "rollback"),
                                                                      (12, "nan_loss", "rollback")]
    lines = read_metrics(run / "train")
    assert [r["step"] for r in lines] == list(range(1, 10)) + list(range(9, 12)) + list(range(9, 17))
    assert all(math.isfinite(r["loss"]) and r["loss"] < 20 for r in lines)  # spiked steps are never applied
    after = lines[-8:]  # steps 9..16 after the second rollback: LR x0.5 for 3 steps
    assert [r["lr"] for r in after[:4]] == pytest.approx([lr * 0.5] * 3 + [lr])
    assert after[-1]["rolled_back"] == 2 and after[-1]["loss"] < lines[0]["loss"] - 0.5


def test_rollback_limit(tmp_path: Path, tokens: Path) -> None:
    from smelt.train.stability import TrainingDiverged

    recipe = _recipe(max_steps=12, stability={"spike_policy": "rollback", "max_rollbacks": 0})
    trainer = Trainer(recipe, _run_dir(tmp_path, tokens), progress=False,
                      **_poisoned(recipe, tokens, {5 * 8: MARK_NAN}))
    with pytest.raises(TrainingDiverged, match="max_rollbacks"):
        trainer.run()


# --------------------------------------------------------------------------------------------
# precision, activation checkpointing


def test_activation_checkpointing_and_bf16(tmp_path: Path, tokens: Path) -> None:
    base = _recipe(max_steps=3, checkpoint={"every": 100})
    runs = {}
    for name, kw in {"none": {}, "full": {"activation_checkpointing": "full"},
                     "every_k": {"activation_checkpointing": "every_k", "ac_every": 2},
                     "bf16": {"precision": "bf16"}}.items():
        trainer = Trainer(_recipe(max_steps=3, checkpoint={"every": 100}, **kw), _run_dir(tmp_path, tokens, name),
                          progress=False)
        runs[name] = (trainer, trainer.run())
    assert runs["full"][0].ac_blocks == 2 and runs["every_k"][0].ac_blocks == 1 and runs["none"][0].ac_blocks == 0
    ref = _losses(runs["none"][0].run_dir)
    assert [step for step, _ in ref] == [1, 2, 3]
    for name in ("full", "every_k"):  # recomputation changes no number
        got = _losses(runs[name][0].run_dir)
        assert [step for step, _ in got] == [step for step, _ in ref]
        assert [loss for _, loss in got] == pytest.approx([loss for _, loss in ref], rel=1e-6)
    # AC wrappers are invisible in checkpoints: the files load into an unwrapped model.
    plain = Transformer(preset("debug", vocab_size=VOCAB))
    ck.load_checkpoint(ck.find_latest(runs["full"][0].ckpt_dir), plain)
    bf = _losses(runs["bf16"][0].run_dir)
    assert [step for step, _ in bf] == [step for step, _ in ref]
    assert all(abs(a[1] - b[1]) < 0.05 for a, b in zip(ref, bf))
    assert base.train.precision == "fp32"


def test_objectives_document_mask_moe_and_batch_ramp(tmp_path: Path, tokens: Path) -> None:
    """The optional model inputs (positions, segments, prefix) and the MoE aux loss reach the
    model; the batch ramps up in whole micro-batches."""
    recipe = _recipe(max_steps=6, model={"preset": "debug", "moe_experts": 4, "moe_top_k": 2},
                     loader={"seq_len": 32, "document_mask": True, "objective": {"kind": "prefix_lm"}},
                     batch={"global_batch": 16, "micro_batch": 4, "ramp_start": 4, "ramp_tokens": 1024})
    seen: list[set[str]] = []
    trainer = Trainer(recipe, _run_dir(tmp_path, tokens), progress=False)
    forward = trainer.model.forward

    def spy(input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append(set(kw))
        return forward(input_ids, **kw)

    trainer.model.forward = spy
    trainer.run()
    assert {"position_ids", "segment_ids", "prefix_len"} <= set().union(*seen)
    lines = read_metrics(trainer.train_dir)
    assert [r["batch_size"] for r in lines] == [4, 4, 4, 8, 8, 12]  # 4 + 12 * tokens / 1024, whole micro-batches
    assert all(r["aux_loss"] > 0.5 for r in lines)  # Switch-style balance loss: 1.0 when balanced
    assert all(math.isfinite(r["loss"]) for r in lines)


def test_fp16_on_cpu_is_a_clear_error(tmp_path: Path, tokens: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(RecipeError, match="train.precision: fp16 needs a CUDA device"):
        Trainer(_recipe(precision="fp16"), _run_dir(tmp_path, tokens), progress=False)


def test_recipe_errors(tmp_path: Path, tokens: Path) -> None:
    with pytest.raises(RecipeError, match="loader.seq_len: 512 exceeds model.max_seq_len"):
        Trainer(_recipe(loader={"seq_len": 512}), _run_dir(tmp_path, tokens, "a"), progress=False)
    with pytest.raises(RecipeError, match="model.vocab_size: 100 is smaller"):
        Trainer(_recipe(model={"preset": "debug", "vocab_size": 100}), _run_dir(tmp_path, tokens, "b"), progress=False)
    with pytest.raises(ValueError, match="global_batch"):
        Trainer(_recipe(batch={"global_batch": 12, "micro_batch": 8}), _run_dir(tmp_path, tokens, "c"), progress=False)


# --------------------------------------------------------------------------------------------
# run control: resume flags, completion, Ctrl-C


def test_resume_flags_and_completed_run(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(_recipe(max_steps=4), run, resume=True, progress=False)
    first = train(_recipe(max_steps=4), run, progress=False)
    mtime = (run / "train" / "metrics.jsonl").stat().st_mtime_ns
    again = train(_recipe(max_steps=4), run, progress=False)  # complete: nothing to do
    assert again == first and (run / "train" / "metrics.jsonl").stat().st_mtime_ns == mtime
    longer = train(_recipe(max_steps=6), run, progress=False)  # more steps: continues from step 4
    assert longer["resumed_from"] == "step-0000004" and longer["steps"] == 6
    fresh = train(_recipe(max_steps=2), run, resume=False, progress=False)
    assert fresh["resumed_from"] is None and [s for s, _ in _losses(run)] == [1, 2]
    assert [s for s, _ in ck.list_checkpoints(run / "train" / "checkpoints")] == [2]


def test_ctrl_c_finishes_the_step_saves_and_exits(tmp_path: Path, tokens: Path) -> None:
    run = _run_dir(tmp_path, tokens)

    def interrupt(trainer: Trainer, result: dict) -> None:
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background (nohup, &)
    summary = Trainer(_recipe(max_steps=10), run, progress=False, on_step=interrupt).run()
    assert summary["interrupted"] and not summary["complete"] and summary["steps"] == 3
    assert json.loads((run / "train" / "manifest.json").read_text())["complete"] is False
    assert ck.find_latest(run / "train" / "checkpoints").name == "step-0000003"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    done = train(_recipe(max_steps=10), run, progress=False)
    assert done["complete"] and done["resumed_from"] == "step-0000003"


def test_data_exhausted_saves_and_fails_loudly(tmp_path: Path, tokens: Path) -> None:
    from smelt.tokens.loader import DataExhausted

    run = _run_dir(tmp_path, tokens)
    recipe = _recipe(max_steps=40, loader={"seq_len": 32, "max_epochs": 0.05})  # ~30 windows per domain
    with pytest.raises(DataExhausted):
        Trainer(recipe, run, progress=False).run()
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["stopped"].startswith("data exhausted")
    assert 0 < manifest["steps"] < 40
    assert ck.find_latest(run / "train" / "checkpoints").name == ck.step_dir_name(manifest["steps"])


def test_progress_bar_runs(tmp_path: Path, tokens: Path) -> None:
    summary = Trainer(_recipe(max_steps=2), _run_dir(tmp_path, tokens), progress=True).run()
    assert summary["complete"]


# --------------------------------------------------------------------------------------------
# train.init_from


def _first_batch_loss(model: torch.nn.Module, recipe: TrainRecipe, tokens: Path) -> float:
    """Token-weighted mean cross entropy of the run's first global batch (what step 1 reports)."""
    batch = MixtureLoader(tokens, recipe.loader, recipe.seed).batch(0, recipe.train.batch.global_batch)
    with torch.no_grad():
        logits = model(torch.from_numpy(batch["input_ids"]))
    return F.cross_entropy(logits.flatten(0, 1).float(), torch.from_numpy(batch["targets"]).flatten(),
                           ignore_index=-100).item()


def _write_recipe(run: Path, recipe: TrainRecipe) -> None:
    import yaml

    from smelt.config import recipe_to_dict

    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe)))


def test_init_from_loads_weights_only(tmp_path: Path, tokens: Path, caplog: pytest.LogCaptureFixture) -> None:
    a_run = _run_dir(tmp_path, tokens, "a")
    a = Trainer(_recipe(max_steps=6), a_run, progress=False)
    a.run()
    _write_recipe(a_run, _recipe(max_steps=6))  # as `smelt train` leaves a run: its recipe beside train/
    a_params = _params(a.model)

    for source in (a_run, a_run / "train" / "checkpoints" / "step-0000006"):  # run dir or checkpoint dir
        b_run = _run_dir(tmp_path, tokens, f"b-{source.name}")
        recipe = _recipe(max_steps=2, init_from=str(source), schedule={"kind": "constant", "warmup_steps": 0})
        b = Trainer(recipe, b_run, progress=False)
        assert (b.step, b.samples_seen, b.resumed_from) == (0, 0, None)
        assert b.init_from == str((a_run / "train" / "checkpoints" / "step-0000006").resolve())
        assert not b.optimizer.state  # fresh optimizer
        got = _params(b.model)
        assert all(torch.equal(got[k], a_params[k]) for k in a_params)
        ref = _first_batch_loss(a.model, recipe, tokens)
        summary = b.run()
        assert _losses(b_run)[0][1] == pytest.approx(ref, rel=1e-6)
        assert summary["init_from"] == b.init_from and summary["steps"] == 2

    # A fresh B (random init, same seed) starts elsewhere: the loaded weights made the difference.
    fresh = Trainer(_recipe(max_steps=2), _run_dir(tmp_path, tokens, "fresh"), progress=False)
    assert not torch.equal(_params(fresh.model)["output.weight"], a_params["output.weight"])

    # Once B has its own checkpoint, resuming ignores init_from (and keeps its provenance).
    caplog.set_level("INFO", logger="smelt.train")
    longer = train(_recipe(max_steps=4, init_from=str(a_run), schedule={"kind": "constant", "warmup_steps": 0}),
                   tmp_path / "b-a", progress=False)
    assert longer["resumed_from"] == "step-0000002" and longer["init_from"] == b.init_from
    assert "init_from (" in caplog.text and "ignored: resuming from this run's own checkpoint" in caplog.text


def test_init_from_refuses_an_incompatible_checkpoint(tmp_path: Path, tokens: Path) -> None:
    a_run = _run_dir(tmp_path, tokens, "a")
    Trainer(_recipe(max_steps=1), a_run, progress=False).run()
    _write_recipe(a_run, _recipe(max_steps=1))
    with pytest.raises(RecipeError) as e:  # different width: config and tensor shapes both named
        Trainer(_recipe(init_from=str(a_run), model={"preset": "debug", "dim": 96}), _run_dir(tmp_path, tokens, "b"),
                progress=False)
    msg = str(e.value)
    assert "train.init_from" in msg and "model.dim: 64 in" in msg and "96 in this recipe" in msg
    assert "tok_embeddings.weight: [128, 64] in the checkpoint, [128, 96] in this recipe's model" in msg
    # Same tensors, different function: tying is a config difference the shapes cannot show.
    with pytest.raises(RecipeError, match="model.tie_embeddings: False in .*True in this recipe"):
        Trainer(_recipe(init_from=str(a_run), model={"preset": "debug", "tie_embeddings": True}),
                _run_dir(tmp_path, tokens, "c"), progress=False)
    # A context-length change is allowed (continued pretraining at a longer context).
    Trainer(_recipe(init_from=str(a_run), model={"preset": "debug", "max_seq_len": 512}),
            _run_dir(tmp_path, tokens, "d"), progress=False)
    # A fresh start (--no-resume) from this run's own checkpoint would delete it first: refused, kept.
    own = a_run / "train" / "checkpoints" / "step-0000001"
    with pytest.raises(RecipeError, match="inside this run's own"):
        Trainer(_recipe(init_from=str(own)), a_run, resume=False, progress=False)
    assert ck.verify_checkpoint(own) is None
    with pytest.raises(ck.CheckpointError, match="incomplete or corrupt"):
        broken = a_run / "train" / "checkpoints" / "step-0000001"
        (broken / ".metadata").unlink()
        Trainer(_recipe(init_from=str(broken)), _run_dir(tmp_path, tokens, "e"), progress=False)


def test_init_from_an_imported_hf_model(tmp_path: Path, tokens: Path) -> None:
    """HF directory -> `smelt import` -> train with init_from: step 1's loss is transformers' loss."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from smelt.interop.hf import import_hf

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    model = yaml.safe_load((imported / "recipe.yaml").read_text())["model"]
    recipe = _recipe(max_steps=2, model=model, init_from=str(imported))
    run = _run_dir(tmp_path, tokens, "continued")
    summary = Trainer(recipe, run, progress=False).run()
    batch = MixtureLoader(tokens, recipe.loader, recipe.seed).batch(0, 8)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(batch["input_ids"])).logits
    ref = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["targets"]).flatten(), ignore_index=-100)
    assert _losses(run)[0][1] == pytest.approx(ref.item(), rel=1e-5)
    assert summary["complete"] and summary["init_from"].endswith("step-0000000")


# --------------------------------------------------------------------------------------------
# in-training evaluation


def _add_tokenizer(run: Path) -> None:
    """A word-level tokenizer over the test corpus's ids ("w40" -> 40): held-out documents decode
    to text (bits per byte) and probes encode."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2})
    for i in range(3):
        vocab.pop(f"w{i}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (run / "tokenizer").mkdir()
    tok.save(str(run / "tokenizer" / "tokenizer.json"))


def _eval_recipe(probes: Path, **train: Any) -> TrainRecipe:
    r = _recipe(**train)
    return TrainRecipe.model_validate({**r.model_dump(), "eval": {
        "every_steps": 3, "in_training_docs": 3, "batch_size": 4, "run": ["perplexity", "probes"],
        "probes": [str(probes)]}})


def test_in_training_eval_keeps_resume_exact(tmp_path: Path, tokens: Path) -> None:
    probes = tmp_path / "probes.yaml"
    probes.write_text("- {name: next, prompt: 'w40 w41', target: ' w42'}\n"
                      "- {name: order, a: 'w40 w41', b: 'w41 w40'}\n")
    runs = {}
    for name in ("plain", "eval", "crashy"):
        runs[name] = _run_dir(tmp_path, tokens, name)
        _add_tokenizer(runs[name])
    plain = _recipe(max_steps=12, tensorboard=True)
    Trainer(plain, runs["plain"], progress=False).run()
    recipe = _eval_recipe(probes, max_steps=12, tensorboard=True)
    straight = Trainer(recipe, runs["eval"], progress=False, evaluator=InTrainingEvaluator(recipe, runs["eval"]))
    summary = straight.run()
    with pytest.raises(_Crash):  # evals at 3, 6; ckpt at 4
        Trainer(recipe, runs["crashy"], progress=False, on_step=_crash_at(7),
                evaluator=InTrainingEvaluator(recipe, runs["crashy"])).run()
    resumed = Trainer(recipe, runs["crashy"], progress=False, evaluator=InTrainingEvaluator(recipe, runs["crashy"]))
    assert resumed.resumed_from == "step-0000004"
    resumed.run()

    want = read_metrics(runs["plain"] / "train")
    for run in (runs["eval"], runs["crashy"]):  # evaluation changes no step, bit for bit
        got = read_metrics(run / "train")
        assert [(r["step"], r["loss"], r["grad_norm"]) for r in got] == \
            [(r["step"], r["loss"], r["grad_norm"]) for r in want]
    assert all(torch.equal(a, b) for a, b in zip(_params(straight.model).values(), _params(resumed.model).values()))

    evals = read_metrics(runs["eval"] / "train", kind="eval")
    assert [e["step"] for e in evals] == [3, 6, 9, 12]  # every 3 steps; 12 is the end of training
    assert {"ppl/en", "ppl/zh", "bpb/en", "loss/zh", "probe/next", "probe/order", "probes_passed"} <= set(evals[0])
    assert evals[-1]["ppl/en"] < evals[0]["ppl/en"] < VOCAB * 1.5  # learning shows in held-out perplexity
    drop_time = [{k: v for k, v in e.items() if k != "time"} for e in evals]
    assert [{k: v for k, v in e.items() if k != "time"}  # the resumed run logged the same evaluations
            for e in read_metrics(runs["crashy"] / "train", kind="eval")] == drop_time
    assert summary["in_training_eval"]["eval/ppl/en"] == evals[-1]["ppl/en"]
    # The logged numbers are those of the evaluator on the saved final weights.
    from tokenizers import Tokenizer

    from smelt.eval.runner import evaluate_in_training

    model = Transformer(preset("debug", vocab_size=VOCAB))
    ck.load_checkpoint(ck.find_latest(runs["eval"] / "train" / "checkpoints"), model, restore_rng=False)
    direct = evaluate_in_training(model, Tokenizer.from_file(str(runs["eval"] / "tokenizer" / "tokenizer.json")),
                                  recipe, runs["eval"])
    assert {k.removeprefix("eval/"): v for k, v in direct.items()} == pytest.approx(
        {k: v for k, v in drop_time[-1].items() if k not in ("kind", "step")}, rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["eval"] / "train" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/ppl/en")] == [3, 6, 9, 12]


def test_in_training_eval_restores_rng_and_mode(tmp_path: Path, tokens: Path) -> None:
    probes = tmp_path / "probes.yaml"
    probes.write_text("- {name: next, prompt: 'w40', target: ' w41'}\n")
    run = _run_dir(tmp_path, tokens)
    recipe = _eval_recipe(probes, max_steps=1)
    trainer = Trainer(recipe, run, progress=False, evaluator=InTrainingEvaluator(recipe, run))
    assert trainer.eval_every == 3
    _add_tokenizer(run)  # after construction: the tokenizer is read at the first evaluation
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert trainer.evaluate_in_training() is not None
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2] and trainer.model.training


@pytest.mark.parametrize("layout,runs", [({"dp_shard": 2, "zero": 3}, False), ({"tp": 2}, False), ({"pp": 2}, False),
                                         ({"dp_replicate": 2}, True), ({"dp_shard": 2, "zero": 1}, True)])
def test_in_training_eval_only_on_replicated_layouts(tmp_path: Path, layout: dict, runs: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """FSDP/TP/PP: no rank holds the whole model, so the evaluator's plain forward cannot run:
    one warning, no evaluation. DDP and ZeRO-1 replicate it: rank 0 evaluates."""
    from types import SimpleNamespace

    from smelt.config import ParallelConfig
    from smelt.train.parallel import ParallelDims

    probes = tmp_path / "probes.yaml"
    probes.write_text("- {name: next, prompt: 'w40', target: ' w41'}\n")
    dims = ParallelDims.build(ParallelConfig(**layout), 2, model_cfg=preset("debug", vocab_size=VOCAB), seq_len=32,
                              micro_batch=4)
    recipe = _eval_recipe(probes)
    fake = SimpleNamespace(recipe=recipe, dims=dims, rank=0, evaluator=InTrainingEvaluator(recipe, tmp_path))
    assert Trainer._in_training_eval_every(fake) == (3 if runs else 0)  # type: ignore[arg-type]
    warned = [r for r in caplog.records if "in-training evaluation is skipped" in r.getMessage()]
    assert len(warned) == (0 if runs else 1)


def test_in_training_eval_without_tokenizer_or_with_bad_probes(tmp_path: Path, tokens: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from smelt.eval.probes import ProbeFormatError

    probes = tmp_path / "probes.yaml"
    probes.write_text("- {name: next, prompt: 'w40', target: ' w41'}\n")
    run = _run_dir(tmp_path, tokens, "notok")
    recipe = _eval_recipe(probes, max_steps=3)
    summary = Trainer(recipe, run, progress=False, evaluator=InTrainingEvaluator(recipe, run)).run()
    assert summary["complete"] and summary["in_training_eval"] is None and not read_metrics(run / "train", kind="eval")
    assert "tokenizer.json not found; in-training evaluation disabled" in caplog.text
    probes.write_text("- {name: next, prompt: 'w40'}\n")  # no target: an error before any step
    run = _run_dir(tmp_path, tokens, "badprobe")
    with pytest.raises(ProbeFormatError, match="probes.yaml"):
        Trainer(recipe, run, progress=False, evaluator=InTrainingEvaluator(recipe, run))


def test_in_training_eval_is_a_hook_the_trainer_is_given(tmp_path: Path, tokens: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The training layer does not evaluate on its own: eval.every_steps without an evaluator is
    a warning and no evaluation; any object with ``every``, ``prepare`` and ``__call__`` will do."""
    probes = tmp_path / "probes.yaml"
    probes.write_text("- {name: next, prompt: 'w40', target: ' w41'}\n")
    run = _run_dir(tmp_path, tokens, "none")
    summary = Trainer(_eval_recipe(probes, max_steps=3), run, progress=False).run()
    assert summary["in_training_eval"] is None and not read_metrics(run / "train", kind="eval")
    assert "given no evaluator" in caplog.text

    class Counting:
        every = 2

        def __init__(self) -> None:
            self.calls: list[bool] = []

        def prepare(self) -> None:
            self.calls.append(False)

        def __call__(self, model: torch.nn.Module) -> dict[str, float]:
            self.calls.append(model.training)
            return {"eval/answer": 42.0}

    hook = Counting()
    summary = Trainer(_recipe(max_steps=5), _run_dir(tmp_path, tokens, "hook"), progress=False, evaluator=hook).run()
    assert hook.calls == [False, False, False, False]  # prepare, steps 2 and 4, the end; always in eval mode
    assert summary["in_training_eval"] == {"eval/answer": 42.0}


# --------------------------------------------------------------------------------------------
# golden losses

# First 5 losses of the seeded debug run below (fp32, CPU). They move when the model, its init,
# the loader's sampling, the optimizer or the loss change. If a change is intended, regenerate:
#   python -c "import tests.train.test_trainer as t; t.print_golden()"
GOLDEN = [4.868512392044067, 4.670147180557251, 4.327505588531494, 4.128810167312622, 3.9461809396743774]


def _golden_run(tmp_path: Path, tokens: Path) -> list[float]:
    recipe = _recipe(max_steps=5, schedule={"kind": "cosine", "warmup_steps": 2}, checkpoint={"every": 100})
    run = _run_dir(tmp_path, tokens, "golden")
    Trainer(recipe, run, progress=False).run()
    return [loss for _, loss in _losses(run)]


def test_golden_losses(tmp_path: Path, tokens: Path) -> None:
    got = _golden_run(tmp_path, tokens)
    # 2e-5 relative: float noise (thread count, BLAS kernel choice) stays ~1e-6; any change of the
    # computation moves the 3rd-5th losses by 1e-3 or more.
    assert got == pytest.approx(GOLDEN, rel=2e-5), got


def print_golden() -> None:  # pragma: no cover - maintenance helper
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokens_src").mkdir()
        tok = _write_tokens(Path(d) / "tokens_src")
        print(_golden_run(Path(d), tok))


def test_compiled_training_matches_eager(tmp_path: Path, tokens: Path) -> None:
    """`train.compile` (blocks and the loss through inductor) trains the same model as eager."""
    runs = {}
    for compiled in (False, True):
        run = _run_dir(tmp_path, tokens, name=f"compile-{compiled}")
        Trainer(_recipe(max_steps=3, compile=compiled, checkpoint={"every": 100}), run, progress=False).run()
        runs[compiled] = [loss for _, loss in _losses(run)]
    assert len(runs[True]) == 3
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4)
