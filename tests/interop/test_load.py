"""`smelt.interop.load.load_model`: run dir, checkpoint dir, newest-complete fallback, clear errors (HF
directories: tests/interop/test_hf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smelt.interop.load import LoadError, load_model
from smelt.train.checkpoint import CheckpointError
from tests.interop._helpers import make_run


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True])
def test_run_dir_and_checkpoint_dir_give_the_trained_weights(tmp_path: Path, tie: bool) -> None:
    run, ref = make_run(tmp_path, model={"tie_embeddings": tie})
    ids = _ids(ref.cfg.vocab_size)
    with torch.no_grad():
        want = ref(ids)
    for path in (run, run / "train" / "checkpoints" / "step-0000007", run / "recipe.yaml"):
        lm = load_model(path)
        assert not lm.model.training
        assert lm.step == 7 and lm.tokens_seen == 7000
        assert lm.checkpoint.name == "step-0000007" and lm.run_dir == run
        assert lm.cfg == ref.cfg
        assert lm.tokenizer is not None and lm.tokenizer.token_to_id("<|eos|>") == 2
        assert (lm.eos_id, lm.bos_id, lm.pad_id) == (2, 1, 0)
        with torch.no_grad():
            torch.testing.assert_close(lm.model(ids), want, rtol=0, atol=0)
        if tie:
            assert lm.model.output.weight is lm.model.tok_embeddings.weight


def test_bf16_keeps_rope_buffers_fp32(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    lm = load_model(run, dtype=torch.bfloat16)
    assert lm.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert lm.model.rope_inv_freq.dtype == torch.float32


def test_truncated_newest_checkpoint_falls_back_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run, ref = make_run(tmp_path)
    # A second, newer checkpoint, then truncate one of its DCP data files.
    from smelt.train.checkpoint import save_checkpoint

    opt = torch.optim.AdamW(ref.parameters())
    newest = save_checkpoint(run / "train" / "checkpoints", 9, ref, opt, {"step": 9, "tokens_seen": 9})
    data = next(newest.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])

    lm = load_model(run)  # the run falls back to the older complete checkpoint
    assert lm.step == 7
    assert "incomplete or corrupt" in caplog.text
    with pytest.raises(CheckpointError, match=r"step-0000009.*incomplete or corrupt.*distcp has 100 bytes"):
        load_model(newest)  # naming the broken checkpoint itself is an error, not a silent fallback


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="neither a run directory"):
        load_model(tmp_path / "empty")
    run, _ = make_run(tmp_path)
    import shutil

    shutil.rmtree(run / "train")
    with pytest.raises(LoadError, match="no complete checkpoint"):
        load_model(run)
