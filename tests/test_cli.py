"""The `smelt` command: what goes to stdout (a command's output) and stderr (logs, progress,
errors), and options that do not apply."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smelt.cli import RichProgress, main
from tests.interop._helpers import make_run


def test_generate_prints_only_text_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = make_run(tmp_path)
    args = ["generate", str(run), "-p", "The quick", "-p", "def add", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) >= 3 and lines[0].startswith("The quick") and lines[1] == "-" * 40
    assert "generate:" not in out and "INFO" not in out  # the log line went to stderr
    assert "INFO" in err and "generate:" in err


def test_subprocess_stdout_is_the_generated_text(tmp_path: Path) -> None:
    """As a user runs it: ``smelt generate RUN > out.txt`` holds the text and nothing else."""
    run, _ = make_run(tmp_path)
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "smelt", "generate", str(run), "-p", "Hello", "--max-new-tokens", "4",
                        "--temperature", "0", "--verbose"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Hello") and len(p.stdout.splitlines()) == 1
    assert "generate:" in p.stderr


def test_progress_bars_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with RichProgress(True) as rp:
        rp.start("filter", 3)
        for _ in range(3):
            rp.advance("filter")
    out, err = capsys.readouterr()
    assert out == "" and "filter" in err


@pytest.mark.parametrize("verb", [["report", "{tmp}"], ["import", "{tmp}", "{tmp}/out"]])
def test_set_is_refused_where_there_is_no_recipe_to_override(
        verb: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(tmp=tmp_path) for a in verb] + ["--set", "train.max_steps=5"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"smelt {verb[0]} takes no --set" in err and "train.max_steps=5" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "report.html").exists()
