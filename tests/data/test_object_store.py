"""Run directories on object stores (`runs_dir` an fsspec URL): the data stage writes the same
bytes to ``memory://`` and ``file://`` stores as to a local run directory, a driver on a new
machine (an empty local stage) resumes from the store's markers, old outputs are moved aside on
the store, a lock object from another host refuses a second driver, and an upload is never seen
half-written."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

import smelt.data.curate as curate
from smelt.cli import main
from smelt.config import RecipeError, parse_recipe
from smelt.fsutil import LOCK_FILE, RunDirLocked, RunMirror, activate_mirror, run_lock
from smelt.run import use_store
from tests.data import write_synth_corpus


@pytest.fixture(autouse=True)
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh local stage per test, and no mirror left active after it."""
    monkeypatch.setenv("SMELT_STAGE_DIR", str(tmp_path / "stage"))
    yield tmp_path / "stage"
    activate_mirror(None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo generator's web pages (exact and near duplicates included) in four files."""
    return write_synth_corpus(tmp_path_factory.mktemp("corpus"), 240, seed=3, files=4)


def _recipe(runs_dir: str, inp: Path, workers: int = 1, **data: object):
    return parse_recipe({"name": "r", "runs_dir": runs_dir, "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": workers,
        "language": {"allowed": ["en", "zh"]},
        "dedup": {"minhash": {"enabled": True}, "lines": {"enabled": True}}, **data}})


def _digest(files: dict[str, bytes]) -> dict[str, str]:
    """sha256 per file; manifests without their timings, worker count and key."""
    out = {}
    for rel, b in sorted(files.items()):
        if rel.endswith("manifest.json"):
            m = json.loads(b)
            del m["timings_s"], m["workers"], m["key"]  # the key holds the config, workers included
            b = json.dumps(m, sort_keys=True).encode()
        out[rel] = hashlib.sha256(b).hexdigest()
    return out


def _local_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _store_files(m: RunMirror, d: Path) -> dict[str, bytes]:
    return {rel: m.fs.cat_file(f"{m.key(d)}/{rel}") for rel in m.files(d)}


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The data stage's output in a local run directory."""
    r = _recipe(str(tmp_path_factory.mktemp("local")), corpus)
    curate.run_data_stage(r.data, r.run_dir)
    return _digest(_local_files(r.run_dir / "data"))


@pytest.mark.parametrize("store", ["memory", "file"])
def test_data_stage_on_a_store_writes_the_local_bytes(store: str, corpus: Path, reference: dict[str, str],
                                                      tmp_path: Path) -> None:
    url = f"memory://b-{uuid.uuid4().hex[:8]}/runs" if store == "memory" else f"file://{tmp_path}/bucket/runs"
    # file://: two worker processes, each uploading its own task's outputs
    r = _recipe(url, corpus, workers=1 if store == "memory" else 2)
    m = use_store(r, ["data"])
    assert m is not None and r.run_dir.is_relative_to(tmp_path / "stage")
    curate.run_data_stage(r.data, r.run_dir)
    data = r.run_dir / "data"
    got = _store_files(m, data)
    assert _digest(got) == reference
    assert not any(k.startswith("_work") or "/." in f"/{k}" for k in got)  # intermediates gone, no temp names
    assert not m.fs.exists(m.key(r.run_dir / LOCK_FILE))  # the lease is released
    assert _digest(_local_files(data)) == reference  # and the local stage holds the same


def test_a_driver_on_a_new_machine_resumes_from_the_store(corpus: Path, reference: dict[str, str],
                                                          stage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://b-{uuid.uuid4().hex[:8]}/runs"
    r = _recipe(url, corpus)
    m = use_store(r, ["data"])
    write_task = curate.write_task

    def failing(ti: int, **kw: object) -> dict:
        if ti == 2:
            raise OSError("machine lost")
        return write_task(ti, **kw)

    monkeypatch.setattr(curate, "write_task", failing)
    with pytest.raises(OSError, match="machine lost"):
        curate.run_data_stage(r.data, r.run_dir)
    monkeypatch.setattr(curate, "write_task", write_task)
    work = m.files(r.run_dir / "data" / "_work")
    assert sum(k.startswith("filter.done/") for k in work) == 4
    assert sorted(k for k in work if k.startswith("write.done/")) == ["write.done/00000.json", "write.done/00001.json"]

    shutil.rmtree(stage)  # another machine: nothing local, everything on the store
    calls: list[str] = []
    for name in ("filter_task", "units_task", "write_task"):
        fn = getattr(curate, name)
        monkeypatch.setattr(curate, name, lambda i, _fn=fn, _n=name, **kw: (calls.append(f"{_n}:{i}"), _fn(i, **kw))[1])
    curate.run_data_stage(r.data, r.run_dir)
    assert calls == ["write_task:2", "write_task:3"]  # only the tasks without a marker on the store ran
    assert _digest(_store_files(m, r.run_dir / "data")) == reference


def test_new_inputs_move_the_store_output_aside(corpus: Path, tmp_path: Path) -> None:
    url = f"memory://b-{uuid.uuid4().hex[:8]}/runs"
    r = _recipe(url, corpus)
    m = use_store(r, ["data"])
    curate.run_data_stage(r.data, r.run_dir)
    before = _store_files(m, r.run_dir / "data")
    r2 = _recipe(url, corpus, min_doc_chars=500)
    curate.run_data_stage(r2.data, r2.run_dir)
    assert _store_files(m, r.run_dir / "data.prev-1") == before  # nothing lost
    assert json.loads(m.fs.cat_file(m.key(r.run_dir / "data" / "manifest.json")))["complete"]


def test_a_lock_object_from_another_host_refuses_a_second_driver(corpus: Path) -> None:
    r = _recipe(f"memory://b-{uuid.uuid4().hex[:8]}/runs", corpus)
    m = use_store(r, ["data"])
    key = m.key(r.run_dir / LOCK_FILE)
    m.fs.pipe_file(key, b"other-host 4242 smelt data recipe.yaml\n")
    with pytest.raises(RunDirLocked, match=r"in use by smelt on other-host \(PID 4242: smelt data recipe.yaml\).*"
                                           r"delete memory://.*/r/\.smelt\.lock"):
        curate.run_data_stage(r.data, r.run_dir)
    m.fs.rm(key)
    with run_lock(r.run_dir, "smelt data"):
        assert m.fs.cat_file(key).decode().split()[2:4] == ["smelt", "data"]
    assert not m.fs.exists(key)


def test_an_upload_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off object stores an upload goes to a temp name, then is renamed: a failed upload leaves
    neither a partial file nor the temp name."""
    m = RunMirror(f"file://{tmp_path}/bucket/run", tmp_path / "local")
    f = tmp_path / "local" / "a" / "x.bin"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x" * 1000)
    m.upload(f)
    assert (tmp_path / "bucket" / "run" / "a" / "x.bin").read_bytes() == b"x" * 1000
    uploaded_mtime = f.stat().st_mtime_ns  # the store's, given to the local copy too
    f.write_bytes(b"y" * 2000)

    def broken_put(src: str, dst: str, **kw: object) -> None:
        Path(dst).write_bytes(b"y" * 10)  # half of it arrived
        raise ConnectionError("reset")

    monkeypatch.setattr(m.fs, "put_file", broken_put)
    with pytest.raises(ConnectionError):
        m.upload(f)
    assert sorted(p.name for p in (tmp_path / "bucket" / "run" / "a").iterdir()) == ["x.bin"]
    assert (tmp_path / "bucket" / "run" / "a" / "x.bin").read_bytes() == b"x" * 1000
    # a download on another machine: the same bytes and modification time as the uploader's copy
    # (stage keys fingerprint files by size and mtime)
    g = tmp_path / "elsewhere"
    m2 = RunMirror(m.url, g)
    assert m2.fetch(g / "a" / "x.bin") and (g / "a" / "x.bin").read_bytes() == b"x" * 1000
    assert (g / "a" / "x.bin").stat().st_mtime_ns == uploaded_mtime
    assert not m2.fetch(g / "a" / "missing.bin")


def test_cli_pipeline_on_a_store_and_stages_that_need_a_local_run_dir(tmp_path: Path) -> None:
    """`smelt run` with data, tokenizer and pack on a file:// store: the same token shards as a
    local run, and a second machine finds every stage up to date; training is refused up front."""
    store = tmp_path / "bucket"
    args = ["run", "-q", "--set", "run.demo=tiny", "--set", "run.stages=[data,tokenizer,pack]"]
    assert main(args + ["--set", f"runs_dir=file://{store}"]) == 0
    assert main(args + ["--set", f"runs_dir={tmp_path / 'local'}"]) == 0

    def shards(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((root / "tokens").rglob("*")) if p.suffix in (".bin", ".idx")}

    got = shards(store / "demo")
    assert got and got == shards(tmp_path / "local" / "demo")
    state = json.loads((store / "demo" / "run.json").read_text())
    assert {k: v["status"] for k, v in state["stages"].items()} == dict.fromkeys(["data", "tokenizer", "pack"],
                                                                                  "complete")
    shutil.rmtree(tmp_path / "stage")  # a second machine
    assert main(args + ["--set", f"runs_dir=file://{store}"]) == 0
    state = json.loads((store / "demo" / "run.json").read_text())
    assert {v["action"] for v in state["stages"].values()} == {"up to date"}
    assert sorted(p.name for p in (store / "demo").iterdir()) == ["corpus", "data", "recipe.yaml", "run.json",
                                                                  "tokenizer", "tokens"]
    with pytest.raises(RecipeError, match=r"train need\(s\) a local or shared run directory"):
        use_store(parse_recipe({"runs_dir": f"file://{store}"}), ["data", "train"])


def test_leftovers_of_an_earlier_run_on_this_machine_are_not_trusted(corpus: Path) -> None:
    """A machine's stage may hold files of an earlier run that the store has since moved aside or
    replaced (another machine ran another config): reads take the store's version, and listings
    drop what the store no longer has."""
    from smelt.data.curate import clean_shard_files
    from smelt.fsutil import atomic_write_text, staged

    r = _recipe(f"memory://b-{uuid.uuid4().hex[:8]}/runs", corpus)
    m = use_store(r, ["data"])
    curate.run_data_stage(r.data, r.run_dir)
    data = r.run_dir / "data"
    shards = clean_shard_files(data)
    leftover = data / "clean" / "web" / "part-00009.jsonl.zst"
    leftover.write_bytes(b"an earlier run's shard")
    assert clean_shard_files(data) == shards and not leftover.exists()
    # a file another process rewrote on the store: this machine's older copy is replaced on read
    f = data / "_work" / "x.json"
    atomic_write_text(f, '"run X"')
    m.fs.pipe_file(m.key(f), b'"run Y, longer"')
    activate_mirror(None)
    use_store(r, ["data"])  # a new process: nothing remembered as verified
    assert staged(f).read_text() == '"run Y, longer"'
    m.fs.rm(m.key(f))
    activate_mirror(None)
    use_store(r, ["data"])
    assert not staged(f).exists()  # gone from the store: gone here


def test_a_store_that_cannot_answer_is_an_error_not_an_empty_store(tmp_path: Path, monkeypatch) -> None:
    m = RunMirror(f"memory://b-{uuid.uuid4().hex[:8]}/run", tmp_path / "local")

    def down(path: str, **kw: object) -> dict:
        raise ConnectionError("503 SlowDown")

    monkeypatch.setattr(m.fs, "info", down)
    with pytest.raises(ConnectionError, match="SlowDown"):
        m.fetch(tmp_path / "local" / "data" / "manifest.json")


def test_memory_store_refuses_worker_processes(corpus: Path) -> None:
    r = _recipe(f"memory://b-{uuid.uuid4().hex[:8]}/runs", corpus, workers=2)
    use_store(r, ["data"])
    with pytest.raises(RecipeError, match=r"memory:// store lives in this process only"):
        curate.run_data_stage(r.data, r.run_dir)
