"""DCP checkpoints: round trip, RNG, atomicity, `latest`, retention, corruption fallback."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from smelt.config import OptimConfig
from smelt.train import checkpoint as ck
from smelt.train.optim import build_optimizer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(13, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norm = nn.LayerNorm(8)
        self.output = nn.Linear(8, 13, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.output(self.norm(h))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 13, (4, 6), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fresh(name: str = "adamw") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Tiny()
    return model, build_optimizer(model, OptimConfig(name=name, lr=1e-2))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_round_trip_model_optimizer_and_continuation(tmp_path: Path, name: str) -> None:
    model, opt = _fresh(name)
    _train(model, opt, 3)
    path = ck.save_checkpoint(tmp_path, 3, model, opt, {"tokens_seen": 72, "loader": {"next_sample": 12}})
    assert path.name == "step-0000003" and (path / ".metadata").is_file()
    after_a = _train(model, opt, 3, seed=1)

    model2, opt2 = _fresh(name)
    _train(model2, opt2, 1, seed=7)  # a different state, to be overwritten
    state = ck.load_checkpoint(path, model2, opt2)
    assert state["step"] == 3 and state["tokens_seen"] == 72 and state["loader"] == {"next_sample": 12}
    after_b = _train(model2, opt2, 3, seed=1)
    assert after_a == after_b  # bit-identical continuation: model and optimizer state restored
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n


def test_only_tensors_go_through_dcp(tmp_path: Path) -> None:
    """Optimizer hyperparameters live in the JSON; DCP holds tensors only (no unpickling on load)."""
    model, opt = _fresh()
    _train(model, opt, 1)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    groups = ck.read_trainer_state(path)["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and groups[0]["betas"] == [0.9, 0.95]
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    assert all(isinstance(m, TensorStorageMetadata) for m in md.state_dict_metadata.values())
    with pytest.raises(ck.CheckpointError, match="not a tensor"):
        ck._only_tensors({"a": {"b": 1.0}}, "state")


def test_hyperparameters_restored_except_lr(tmp_path: Path) -> None:
    model, opt = _fresh()
    _train(model, opt, 1)
    for g in opt.param_groups:
        g["lr"] = 0.5
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    model2 = Tiny()
    opt2 = build_optimizer(model2, OptimConfig(lr=1e-3, betas=(0.8, 0.9)))
    ck.load_checkpoint(path, model2, opt2)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt2.param_groups[0]["lr"] == 1e-3  # the schedule owns the LR


def test_save_before_first_update_has_no_side_effect(tmp_path: Path) -> None:
    model, opt = _fresh()
    path = ck.save_checkpoint(tmp_path, 0, model, opt, {})
    assert not opt.state  # get_state_dict would have initialized Adam's state (step=1)
    model2, opt2 = _fresh()
    _train(model2, opt2, 2)
    ck.load_checkpoint(path, model2, opt2)
    assert not opt2.state
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ck.CheckpointError, match="Adafactor"):
        ck.load_checkpoint(path, *(_fresh("adafactor")))


def test_rng_state_json_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = json.loads(json.dumps(ck.capture_rng_state()))
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    ck.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_latest_retention_and_tmp_never_chosen(tmp_path: Path) -> None:
    model, opt = _fresh()
    _train(model, opt, 1)
    for step in (2, 4, 6, 8):
        ck.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [6, 8]
    assert (tmp_path / "latest").read_text().strip() == "step-0000008"
    # A half-written checkpoint (the process died inside save) is ignored.
    tmp = tmp_path / "step-0000010.tmp"
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(b"partial")
    assert ck.find_latest(tmp_path).name == "step-0000008"
    # The next save cleans it up.
    ck.save_checkpoint(tmp_path, 10, model, opt, {}, keep=2)
    assert not tmp.exists() and ck.find_latest(tmp_path).name == "step-0000010"


def test_resave_same_step_and_newer_timeline_removed(tmp_path: Path) -> None:
    model, opt = _fresh()
    _train(model, opt, 1)
    ck.save_checkpoint(tmp_path, 4, model, opt, {"tag": "old"})
    ck.save_checkpoint(tmp_path, 8, model, opt, {"tag": "abandoned"})
    ck.save_checkpoint(tmp_path, 4, model, opt, {"tag": "new"})  # after a rollback to an older one
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4]
    assert ck.read_trainer_state(tmp_path / "step-0000004")["tag"] == "new"


@pytest.mark.parametrize("damage", ["truncate", "drop_state", "drop_metadata", "bad_json", "extend"])
def test_corrupt_newest_falls_back(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = _fresh()
    _train(model, opt, 1)
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    good = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1)
    newest = ck.save_checkpoint(tmp_path, 2, model, opt, {})
    data = next(newest.glob("*.distcp"))
    if damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif damage == "extend":
        with open(data, "ab") as f:
            f.write(b"\0" * 16)
    elif damage == "drop_state":
        (newest / ck.STATE_FILE).unlink()
    elif damage == "drop_metadata":
        (newest / ".metadata").unlink()
    else:
        (newest / ck.STATE_FILE).write_text("{not json")
    assert ck.verify_checkpoint(newest) is not None
    with caplog.at_level(logging.WARNING, logger="smelt.train.checkpoint"):
        found = ck.find_latest(tmp_path)
    assert found is not None and found.name == "step-0000001"
    assert "step-0000002" in caplog.text and "falling back" in caplog.text
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(newest, *(_fresh()))
    model2, opt2 = _fresh()
    ck.load_checkpoint(found, model2, opt2)
    for p, q in zip(good, model2.parameters()):
        assert torch.equal(p, q)


def test_dcp_metadata_cross_check(tmp_path: Path) -> None:
    """A data file shortened *and* re-listed in the JSON still fails: DCP's byte ranges disagree."""
    model, opt = _fresh()
    _train(model, opt, 1)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    data = next(path.glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(100)
    state = json.loads((path / ck.STATE_FILE).read_text())
    state["files"][data.name] = 100
    (path / ck.STATE_FILE).write_text(json.dumps(state))
    problem = ck.verify_checkpoint(path, content=False)
    assert problem is not None and "DCP metadata expects" in problem
    assert "checksum" in (ck.verify_checkpoint(path) or "")  # the content check sees it first
    assert ck.find_latest(tmp_path) is None


def test_no_checkpoint(tmp_path: Path) -> None:
    assert ck.find_latest(tmp_path / "absent") is None
    assert ck.find_latest(tmp_path) is None


def test_same_size_corruption_is_caught_and_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """200 KB of 0xff over a data file (same size): the checksum fails, the previous checkpoint is used,
    and loading the bad one is a CheckpointError naming the file, never an unpickling traceback."""
    model, opt = _fresh()
    _train(model, opt, 1)
    good = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    _train(model, opt, 1)
    bad = ck.save_checkpoint(tmp_path, 2, model, opt, {})
    data = max(bad.glob("*.distcp"), key=lambda f: f.stat().st_size)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.write(b"\xff" * min(size, 200_000))
    assert data.stat().st_size == size
    problem = ck.verify_checkpoint(bad)
    assert problem is not None and data.name in problem and "checksum" in problem
    assert ck.verify_checkpoint(bad, content=False) is None  # sizes alone cannot see it
    with caplog.at_level("WARNING"):
        assert ck.find_latest(tmp_path) == good
    assert "falling back" in caplog.text
    with pytest.raises(ck.CheckpointError, match="checksum"):
        ck.load_checkpoint(bad, *_fresh())


def test_checkpoint_without_checksums_verifies_by_size(tmp_path: Path) -> None:
    """Checkpoints written before checksums were recorded still load."""
    model, opt = _fresh()
    _train(model, opt, 1)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    state = json.loads((path / ck.STATE_FILE).read_text())
    del state["checksums"]
    (path / ck.STATE_FILE).write_text(json.dumps(state))
    assert ck.verify_checkpoint(path) is None
    ck.load_checkpoint(path, *_fresh())


class _Payload:
    """Unpickling this runs code: it creates the file named by ``flag``."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.flag}",))


def _plant_malicious_metadata(path: Path, flag: Path, *, fix_json: bool) -> None:
    import pickle

    (path / ".metadata").write_bytes(pickle.dumps(_Payload(str(flag))))
    if fix_json:  # an attacker can rewrite the JSON's sizes and checksums too
        state = json.loads((path / ck.STATE_FILE).read_text())
        state["files"][".metadata"] = (path / ".metadata").stat().st_size
        state["checksums"][".metadata"] = ck.file_checksum(path / ".metadata")
        (path / ck.STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("fix_json", [False, True])
def test_malicious_metadata_never_runs(tmp_path: Path, fix_json: bool) -> None:
    model, opt = _fresh()
    _train(model, opt, 1)
    path = ck.save_checkpoint(tmp_path / "ck", 1, model, opt, {})
    flag = tmp_path / "pwned"
    _plant_malicious_metadata(path, flag, fix_json=fix_json)
    assert ck.verify_checkpoint(path) is not None
    assert ck.find_latest(tmp_path / "ck") is None
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(path, *_fresh())
    with pytest.raises(ck.CheckpointError, match="refusing|checksum|bytes"):
        ck.read_metadata(path) if fix_json else ck.load_checkpoint(path, *_fresh())
    assert not flag.exists()


def test_metadata_with_non_tensor_entries_is_refused(tmp_path: Path) -> None:
    """DCP reads "bytes" entries back with torch.load(weights_only=False): never load one."""
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "raw"
    with ck._quiet_single_process():
        dcp.save({"model": {"w": torch.ones(2)}, "extra": {"obj": io.BytesIO(b"x")}}, checkpoint_id=str(d),
                 no_dist=True)
    with pytest.raises(ck.CheckpointError, match="non-tensor"):
        ck.read_metadata(d)


def test_real_metadata_reads_with_the_safe_unpickler(tmp_path: Path) -> None:
    model, opt = _fresh()
    _train(model, opt, 1)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    md = ck.read_metadata(path)
    assert any(k.startswith("model.") for k in md.state_dict_metadata)


class _EnumByGetattr:
    """Pickles like an enum member on Python versions that write ``getattr(EnumClass, "NAME")``."""

    def __init__(self, cls: object, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self) -> tuple:
        return (getattr, (self.cls, self.name))


def test_metadata_enum_members_by_getattr_load_and_nothing_else_does(tmp_path: Path) -> None:
    import pickle

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    member = ck._MetadataUnpickler(io.BytesIO(pickle.dumps(
        _EnumByGetattr(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT")))).load()
    assert member is _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    # the first step of an escape (getattr -> type -> __subclasses__ -> ... -> os.system) is refused
    for cls, name in ((torch.Size, "__class__"), (_MEM_FORMAT_ENCODING, "__init__"),
                      (_MEM_FORMAT_ENCODING, "_member_map_")):
        with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
            ck._MetadataUnpickler(io.BytesIO(pickle.dumps(_EnumByGetattr(cls, name)))).load()
