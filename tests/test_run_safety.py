"""`smelt run` never loses work: extending a finished run, a changed recipe, `--from train`, a
second writer, a corrupted final checkpoint, a full disk, Ctrl-C, and orphaned pool workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smelt.cli import main
from smelt.fsutil import LOCK_FILE, RunDirLocked, move_aside, run_lock

TINY = ["--set", "run.demo=tiny", "-q"]
KEEP = ["--set", "train.checkpoint.keep=10"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny demo (40 steps, checkpoints at 20 and 40), kept pristine beside it."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "--set", f"runs_dir={root}", *TINY, *KEEP]) == 0
    shutil.copytree(root / "demo", root / "pristine", symlinks=True)
    return root / "demo"


def _copy(finished: Path, tmp_path: Path) -> Path:
    """The finished run restored at its own path (stage keys name input paths and mtimes; copy2
    keeps the mtimes), so each test starts from the same state."""
    if finished.exists():
        shutil.rmtree(finished)
    shutil.copytree(finished.parent / "pristine", finished, symlinks=True)
    return finished


def _run(run_dir: Path, *extra: str) -> int:
    return main(["run", "--set", f"runs_dir={run_dir.parent}", *TINY, *extra])


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _smelt(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smelt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


# --------------------------------------------------------------------------------------------
# extending, changing, starting over


def test_extending_max_steps_resumes_and_keeps_what_was_there(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    ckpts = run / "train" / "checkpoints"
    kept = {n: _digest(ckpts / n) for n in ("step-0000020", "step-0000040")}
    lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
    assert _run(run, *KEEP, "--set", "train.max_steps=46", "--set", "train.log_every=3") == 0
    state = _state(run)
    assert state["stages"]["train"]["action"] == "ran" and state["stages"]["train"]["status"] == "complete"
    assert not {"data", "tokenizer", "pack"} & set(state["last_invocation"]["ran"])
    tm = json.loads((run / "train" / "manifest.json").read_text())
    assert tm["resumed_from"] == "step-0000040" and tm["steps"] == 46 and tm["checkpoint"].endswith("step-0000046")
    assert {n: _digest(ckpts / n) for n in kept} == kept
    assert (run / "train" / "metrics.jsonl").read_text().splitlines()[:len(lines)] == lines
    # training continued in place; the step-40 evaluation and export were kept, not overwritten
    assert state["set_aside"] == ["eval.prev-1", "export.prev-1"]
    assert json.loads((run / "eval.prev-1" / "results.json").read_text())["checkpoint"].endswith("step-0000040")


def test_a_changed_computation_key_stops_naming_it_and_from_train_moves_aside(finished: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    run = _copy(finished, tmp_path)
    before = _digest(run / "train")
    assert _run(run, *KEEP, "--set", "train.optim.lr=0.01", "--set", "model.dim=96") == 2
    err = capsys.readouterr().err
    assert "train.optim.lr" in err and "model.dim" in err and "--from train" in err
    assert _digest(run / "train") == before
    assert _state(run)["stages"]["train"]["status"] == "failed"

    assert _run(run, *KEEP, "--set", "train.optim.lr=0.01", "--from", "train") == 0
    assert _digest(run / "train.prev-1") == before
    state = _state(run)
    assert state["set_aside"] == ["eval.prev-1", "export.prev-1", "train.prev-1"]
    assert json.loads((run / "train" / "manifest.json").read_text())["resumed_from"] is None


def test_a_corrupt_final_checkpoint_is_not_complete(finished: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Same-size corruption of the final checkpoint: `smelt eval` refuses to evaluate an older one,
    and `smelt run` resumes from step 20 and redoes the steps (bit-exact, so eval is unchanged)."""
    run = _copy(finished, tmp_path)
    final = run / "train" / "checkpoints" / "step-0000040"
    data = max(final.glob("*.distcp"), key=lambda f: f.stat().st_size)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.write(b"\xff" * min(size, 200_000))
    results = (run / "eval" / "results.json").read_bytes()
    assert main(["eval", str(run / "recipe.yaml"), "-q"]) == 2
    assert "does not verify" in capsys.readouterr().err
    assert (run / "eval" / "results.json").read_bytes() == results  # not overwritten

    assert _run(run, *KEEP) == 0
    state = _state(run)
    assert state["stages"]["train"]["action"] == "ran"
    tm = json.loads((run / "train" / "manifest.json").read_text())
    assert tm["resumed_from"] == "step-0000020" and tm["complete"]
    from smelt.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(final) is None


# --------------------------------------------------------------------------------------------
# one writer


def test_run_lock_is_exclusive_reentrant_and_released_on_kill(tmp_path: Path) -> None:
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from smelt.fsutil import run_lock
        with run_lock({str(d)!r}, "smelt run recipes/x.yaml"):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"PID {holder.pid}: smelt run recipes/x.yaml"):
            with run_lock(d, "test"):
                pass
    finally:
        holder.kill()  # SIGKILL: the OS drops the flock
        holder.wait()
    with run_lock(d, "test"):
        with run_lock(d, "nested"):  # the same process may nest
            pass
    assert (d / LOCK_FILE).is_file()


def test_a_second_smelt_run_is_refused_at_once(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    with run_lock(run, "smelt run (the first one)"):
        t0 = time.monotonic()
        p = _smelt("run", "--set", f"runs_dir={run.parent}", *TINY)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1, err
        assert f"PID {os.getpid()}: smelt run (the first one)" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 60


def test_move_aside_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train.prev-1").mkdir()
    assert move_aside(tmp_path / "train") == tmp_path / "train.prev-2"
    assert move_aside(tmp_path / "absent") is None


# --------------------------------------------------------------------------------------------
# Ctrl-C, full disk, orphans


def test_ctrl_c_saves_exits_130_and_records_interrupted(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    metrics = run / "train" / "metrics.jsonl"
    n0 = len(metrics.read_text().splitlines())
    p = _smelt("run", "--set", f"runs_dir={run.parent}", *TINY, *KEEP, "--set", "train.max_steps=100000")
    try:
        deadline = time.monotonic() + 120
        while len(metrics.read_text().splitlines()) < n0 + 2:  # training has started again
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rec = _state(run)["stages"]["train"]
    assert rec["status"] == "interrupted"
    tm = json.loads((run / "train" / "manifest.json").read_text())
    assert tm["interrupted"] and (run / "train" / "checkpoints" / f"step-{tm['steps']:07d}").is_dir()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a private tmpfs mount (unshare -rm)")
def test_disk_full_is_one_sentence_then_recovers(tmp_path: Path) -> None:
    """The tiny demo on a 3 MB tmpfs (it needs ~9 MB): one sentence naming the path, status failed,
    no temp files left behind; after the disk grows the same command completes."""
    script = textwrap.dedent(f"""
        set -u
        mnt={tmp_path / "mnt"}
        mkdir -p "$mnt"
        mount -t tmpfs -o size=3m tmpfs "$mnt"
        cd {tmp_path}
        {sys.executable} -m smelt run --set runs_dir="$mnt" --set run.demo=tiny -q 2> err1.txt
        echo $? > rc1.txt
        find "$mnt" -name '*.tmp*' > tmp_left.txt
        cp "$mnt/demo/run.json" run1.json
        mount -o remount,size=64m "$mnt"
        {sys.executable} -m smelt run --set runs_dir="$mnt" --set run.demo=tiny -q 2> err2.txt
        echo $? > rc2.txt
        cp "$mnt/demo/run.json" run2.json
        """)
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=600)
    err1 = (tmp_path / "err1.txt").read_text()
    assert (tmp_path / "rc1.txt").read_text().strip() == "1", err1
    assert "disk is full" in err1 and "Traceback" not in err1 and len(err1.strip().splitlines()) == 1, err1
    assert (tmp_path / "tmp_left.txt").read_text().strip() == ""
    first = json.loads((tmp_path / "run1.json").read_text())["stages"]
    failed = [s for s, r in first.items() if r.get("status") == "failed"]
    assert len(failed) == 1 and "disk is full" in first[failed[0]]["error"]
    assert (tmp_path / "rc2.txt").read_text().strip() == "0", (tmp_path / "err2.txt").read_text()
    second = json.loads((tmp_path / "run2.json").read_text())["stages"]
    assert all(r["status"] == "complete" for r in second.values())
    assert second[failed[0]]["action"] in ("resumed", "ran")


def test_pool_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from smelt.data.executor.local import make_pool
        pool = make_pool(2)
        futs = [pool.submit(time.sleep, 0) for _ in range(4)]
        [f.result() for f in futs]
        print(" ".join(str(p) for p in pool._processes), flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    workers = [int(x) for x in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("err,words", [
    (OSError(28, "No space left on device", "/r/train/x"), "disk is full"),
    (PermissionError(13, "Permission denied", "/r/data"), "permission denied"),
    (OSError(30, "Read-only file system", "/r/data"), "read-only"),
    (OSError(122, "Disk quota exceeded", "/r/x"), "quota"),
])
def test_disk_and_permission_errors_are_one_sentence_with_the_path(err: OSError, words: str) -> None:
    from smelt.fsutil import describe_os_error

    msg = describe_os_error(err)
    assert msg is not None and err.filename in msg and words in msg and "\n" not in msg
    assert describe_os_error(FileNotFoundError(2, "No such file", "/x")) is None
    assert describe_os_error(ValueError("x")) is None


def test_an_input_that_cannot_be_opened_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nruns_dir: {tmp_path / 'runs'}\n"
                      f"data:\n  inputs:\n    - {{path: {tmp_path / 'absent.jsonl'}, domain: en}}\n")
    assert main(["run", str(recipe), "-q"]) == 2
    err = capsys.readouterr().err
    assert "absent.jsonl" in err and "Traceback" not in err and err.startswith("smelt: error:")
