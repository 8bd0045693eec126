"""Without a terminal (torchrun, SLURM, `| tee`, a file) training prints one plain line per
log_every instead of a progress bar that would only show its last frame."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from smelt.train.trainer import Trainer
from tests.train.test_trainer import _recipe, _run_dir, _write_tokens


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokens(tmp_path_factory.mktemp("tokens"))


def test_one_plain_line_per_log_every_without_a_terminal(tmp_path: Path, tokens: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run = _run_dir(tmp_path, tokens)
    with caplog.at_level(logging.INFO, logger="smelt.train"):
        Trainer(_recipe(max_steps=6, log_every=2), run, progress=True).run()  # stderr is captured: no tty
    lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+/\d+ ", r.getMessage())]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    for field in ("loss", "lr", "grad_norm", "tok/s", "MFU", "ETA"):
        assert field in lines[0], lines[0]
    assert lines[-1].endswith("ETA 0:00:00")
