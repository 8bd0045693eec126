"""`data.executor.kind: ray`: the curation stage on a two-node Ray test cluster writes the same
bytes as the local executor, survives a task that raises and a worker that dies (Ray retries
them), and a re-run after a failed run resumes from the completion markers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from smelt.config import RecipeError, parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.document import Document
from smelt.data.pipeline import Filter
from smelt.data.steps.registry import StepContext, register_step, unregister_step
from smelt.data.synth import generate
from tests.data import write_synth_corpus

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class FaultOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flag_dir: str
    doc_id: str
    mode: str  # raise | exit
    once: bool = True


class Fault(Filter):
    """Keeps every document; fails on `doc_id`: once (the first attempt, recorded by a flag
    file), or on every attempt while ``<flag_dir>/fail`` exists."""

    name = "fault"

    def __init__(self, o: FaultOptions) -> None:
        super().__init__()
        self.o = o

    def reject_reason(self, doc: Document) -> str | None:
        if doc.id != self.o.doc_id:
            return None
        flag = Path(self.o.flag_dir) / ("once" if self.o.once else "fail")
        if self.o.once and flag.exists() or not self.o.once and not flag.exists():
            return None
        if self.o.once:
            flag.touch()
        if self.o.mode == "exit":
            os._exit(1)  # the worker process dies mid-task, as a killed or OOM-killed one does
        raise ValueError(f"injected failure on {doc.id}")


def build_fault(options: FaultOptions, context: StepContext) -> Fault:
    return Fault(options)


@pytest.fixture(scope="module")
def cluster():
    """Two one-CPU "nodes" on this machine; PYTHONPATH lets Ray workers import this module."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}})
    register_step("fault", build_fault, options=FaultOptions)
    yield c
    unregister_step("fault")
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The demo generator's web pages (exact and near duplicates included) in four files."""
    return write_synth_corpus(tmp_path_factory.mktemp("corpus"), 240, seed=3, files=4)


def _recipe(root: Path, inp: Path, executor: dict, steps: list | None = None, name: str = "r"):
    return parse_recipe({"name": name, "runs_dir": str(root), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": 2,
        "executor": executor, "language": {"allowed": ["en", "zh"]},
        "dedup": {"minhash": {"enabled": True}, "lines": {"enabled": True}}, "steps": steps or []}})


def _digest(data: Path) -> dict[str, str]:
    """Every file of the stage's output; the manifest without its timings, executor and key."""
    out = {}
    for p in sorted(data.rglob("*")):
        if p.is_file():
            b = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(b)
                del m["timings_s"], m["executor"], m["key"]  # the key holds the fault step's flag_dir
                b = json.dumps(m, sort_keys=True).encode()
            out[str(p.relative_to(data))] = hashlib.sha256(b).hexdigest()
    return out


# a clean page (it reaches the registered steps), in the second file
CLEAN_ID = next(d.id for i, d in enumerate(generate(240, seed=3)) if d.meta["planted"] == "clean" and i % 4 == 1)


def _fault(tmp: Path, mode: str, once: bool = True) -> list[dict]:
    flags = tmp / "flags"
    flags.mkdir(exist_ok=True)
    return [{"name": "fault", "options": {"flag_dir": str(flags), "doc_id": CLEAN_ID, "mode": mode,
                                          "once": once}}]


@pytest.fixture(scope="module")
def local_digest(corpus, tmp_path_factory, cluster) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local")
    r = _recipe(root, corpus, {"kind": "local"}, _fault(root, "raise", once=False))  # never fails: no flag
    stats = run_data_stage(r.data, r.run_dir)
    assert stats["documents"]["duplicates"] > 0 and stats["documents"]["rejected"] > 0
    return _digest(r.run_dir / "data")


def test_ray_output_is_byte_identical_to_local(tmp_path, corpus, cluster, local_digest) -> None:
    r = _recipe(tmp_path, corpus, {"kind": "ray"}, _fault(tmp_path, "raise", once=False))
    run_data_stage(r.data, r.run_dir)
    manifest = json.loads((r.run_dir / "data" / "manifest.json").read_text())
    assert manifest["executor"] == "ray"
    assert {"exact", "lsh"} <= set(manifest["timings_s"])  # with Ray the dedup phase runs as tasks too
    assert _digest(r.run_dir / "data") == local_digest


def test_ray_on_a_store_writes_the_local_bytes(tmp_path, corpus, cluster, local_digest, monkeypatch) -> None:
    """runs_dir a file:// store: Ray tasks upload their own outputs, and the store holds the local bytes."""
    from smelt.fsutil import activate_mirror
    from smelt.run import use_store

    monkeypatch.setenv("SMELT_STAGE_DIR", str(tmp_path / "stage"))
    r = _recipe(tmp_path, corpus, {"kind": "ray"}, _fault(tmp_path, "raise", once=False))
    r = r.model_copy(update={"runs_dir": f"file://{tmp_path}/bucket"})
    try:
        use_store(r, ["data"])
        run_data_stage(r.data, r.run_dir)
    finally:
        activate_mirror(None)
    assert _digest(tmp_path / "bucket" / "r" / "data") == local_digest


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_failed_task_is_retried_and_output_unchanged(tmp_path, corpus, cluster, local_digest, mode) -> None:
    r = _recipe(tmp_path, corpus, {"kind": "ray", "max_retries": 2}, _fault(tmp_path, mode))
    run_data_stage(r.data, r.run_dir)
    assert (tmp_path / "flags" / "once").is_file()  # the first attempt did fail
    assert _digest(r.run_dir / "data") == local_digest


def test_rerun_after_a_failed_run_resumes_from_markers(tmp_path, corpus, cluster, local_digest) -> None:
    steps = _fault(tmp_path, "raise", once=False)
    (tmp_path / "flags" / "fail").touch()
    r = _recipe(tmp_path, corpus, {"kind": "ray", "max_retries": 1}, steps)
    with pytest.raises(ValueError, match="injected failure"):
        run_data_stage(r.data, r.run_dir)
    done = r.run_dir / "data" / "_work" / "filter.done"
    finished = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert 1 <= len(finished) == 3  # the other three tasks finished and kept their markers
    (tmp_path / "flags" / "fail").unlink()
    run_data_stage(r.data, r.run_dir)
    assert _digest(r.run_dir / "data") == local_digest
    assert not (r.run_dir / "data.prev-1").exists()  # resumed in place, not started over


def test_executor_is_not_part_of_the_stage_key(tmp_path, corpus, cluster) -> None:
    from smelt.data.curate import plan_tasks, stage_key

    a = _recipe(tmp_path, corpus, {"kind": "local"}).data
    b = _recipe(tmp_path, corpus, {"kind": "ray", "address": "auto", "max_retries": 7}).data
    assert stage_key(a, plan_tasks(a)) == stage_key(b, plan_tasks(b))


def test_missing_ray_is_a_recipe_error_before_work(tmp_path, corpus, monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    r = _recipe(tmp_path, corpus, {"kind": "ray"})
    with pytest.raises(RecipeError, match=r"smelt\[ray\]"):
        run_data_stage(r.data, r.run_dir)
    assert not (r.run_dir / "data").exists()


def test_pack_on_ray_writes_the_same_shards(tmp_path, cluster, monkeypatch) -> None:
    from smelt.config import ExecutorConfig, PackConfig, TokenizerConfig
    from smelt.tokenizer.train import train_tokenizer
    from smelt.tokens import pack
    from tests.tokens.test_pack import make_corpus, shard_bytes

    corpus = make_corpus(tmp_path / "clean", {"en": 60, "zh": 40, "code": 20})
    tok = tmp_path / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=700, num_sentinels=2, sample_chars_per_domain=100_000), corpus, tok,
                    seed=1)
    cfg = PackConfig(shard_tokens=1200)
    local = pack.pack_tokens(cfg, tok, corpus, tmp_path / "local", seed=3, workers=1, slice_bytes=3000)
    monkeypatch.setattr(pack, "INLINE_ASSEMBLE_TOKENS", 0)  # the assemble tasks on Ray too
    ray_cfg = cfg.model_copy(update={"executor": ExecutorConfig(kind="ray")})
    on_ray = pack.pack_tokens(ray_cfg, tok, corpus, tmp_path / "ray", seed=3, workers=2, slice_bytes=3000)
    assert on_ray["parallelism"] == "ray" and on_ray["tasks"] == local["tasks"] > 3
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local") != {}
    assert on_ray["domains"] == local["domains"]
    # and with the run directory on a (file://) store: assemble tasks upload, the driver checks them there
    from smelt.config import parse_recipe
    from smelt.fsutil import activate_mirror
    from smelt.run import use_store

    monkeypatch.setenv("SMELT_STAGE_DIR", str(tmp_path / "stage"))
    r = parse_recipe({"name": "p", "runs_dir": f"file://{tmp_path}/bucket"})
    use_store(r, ["pack"])
    try:
        pack.pack_tokens(ray_cfg, tok, corpus, r.run_dir / "tokens", seed=3, workers=2, slice_bytes=3000)
    finally:
        activate_mirror(None)
    assert shard_bytes(tmp_path / "bucket" / "p" / "tokens") == shard_bytes(tmp_path / "local")
    assert not (tmp_path / "bucket" / "p" / "tokens" / "_work").exists()


_DRIVER = '''
import json, os, sys, time
from pathlib import Path
from pydantic import BaseModel, ConfigDict
from smelt.config import parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.pipeline import Filter
from smelt.data.steps.registry import register_step
from smelt.data.synth import generate


class SlowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float


class Slow(Filter):
    """Keeps every document, slowly: time to kill the driver between tasks."""

    name = "slow"

    def __init__(self, o):
        super().__init__()
        self.o = o

    def reject_reason(self, doc):
        time.sleep(self.o.seconds)
        return None


def build(options, context):
    return Slow(options)


def main():
    root, kind = Path(sys.argv[1]), sys.argv[2]
    inp = root / "in"
    if not inp.exists():
        inp.mkdir(parents=True)
        docs = list(generate(320, seed=3))
        for f in range(8):
            with open(inp / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
                for d in docs[f::8]:
                    fh.write(json.dumps({"id": d.id, "text": d.text}) + "\\n")
    register_step("slow", build, options=SlowOptions)
    here = os.path.dirname(os.path.abspath(__file__))
    executor = {"kind": kind}
    if kind == "ray":
        executor["runtime_env"] = {"env_vars": {"PYTHONPATH": here}}
    r = parse_recipe({"name": "r", "runs_dir": str(root / kind), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": 2, "executor": executor,
        "language": {"allowed": ["en", "zh"]}, "dedup": {"minhash": {"enabled": True}, "lines": {"enabled": True}},
        "steps": [{"name": "slow", "options": {"seconds": 0.02}}]}})
    run_data_stage(r.data, r.run_dir)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import driver  # registered steps are named by module path: import this file as `driver`

    driver.main()
'''


def test_a_killed_driver_resumes_from_the_markers(tmp_path) -> None:
    """`kill -9` of the driver (and of the Ray instance it started: its process group) between
    filter tasks; the re-run runs the unfinished tasks only and writes the local executor's bytes."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "driver.py").write_text(_DRIVER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path)]
    done = tmp_path / "ray" / "r" / "data" / "_work" / "filter.done"
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 - closed below
    p = subprocess.Popen(cmd + ["ray"], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and len(list(done.glob("*.json"))) < 2:
            time.sleep(0.1)
        assert p.poll() is None, "the driver ended before it could be killed:\n" + \
            (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
    data = tmp_path / "ray" / "r" / "data"
    finished = sorted(m.stem for m in done.glob("*.json"))
    assert 2 <= len(finished) < 8 and not (data / "manifest.json").exists()
    # what the finished tasks wrote: the re-run must not write it again
    written = {f: f.stat().st_mtime_ns for t in finished for f in [data / "rejects" / f"filter-{t}.jsonl.zst"]}
    subprocess.run(cmd + ["ray"], env=env, check=True, start_new_session=True, capture_output=True)
    assert json.loads((data / "manifest.json").read_text())["complete"]
    assert {f: f.stat().st_mtime_ns for f in written} == written
    subprocess.run(cmd + ["local"], env=env, check=True, capture_output=True)
    assert _digest(tmp_path / "ray" / "r" / "data") == _digest(tmp_path / "local" / "r" / "data")
    assert not (tmp_path / "ray" / "r" / "data.prev-1").exists()  # resumed in place, not started over


def _record_node(out_dir: str) -> None:
    import ray

    node = ray.get_runtime_context().get_node_id()
    (Path(out_dir) / node).write_text(node, encoding="utf-8")


def test_on_every_node_runs_once_on_each_node(tmp_path, cluster) -> None:
    """What drops each node's stage copy of _work after a stage on a store: one pinned task per node."""
    import functools

    from smelt.data.executor.ray_tasks import drop_local, on_every_node

    assert on_every_node(functools.partial(_record_node, str(tmp_path))) == 2
    assert len(list(tmp_path.iterdir())) == 2  # both nodes of the test cluster, once each
    (tmp_path / "w" / "x").mkdir(parents=True)
    on_every_node(functools.partial(drop_local, str(tmp_path / "w")))
    assert not (tmp_path / "w").exists()
