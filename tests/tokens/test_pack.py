"""`pack_tokens`: shards equal HF's ids + EOS, deterministic split, resume, engines, errors."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from smelt.config import PackConfig, TokenizerConfig
from smelt.data.document import Document
from smelt.data.io import ShardWriter
from smelt.tokenizer.train import load_tokenizer, special_ids, tokenizer_sha256, train_tokenizer
from smelt.tokens import pack
from smelt.tokens.objectives import SpecialIds
from smelt.tokens.pack import PackError, pack_tokens, val_count, val_key
from smelt.tokens.shards import open_shard

FAST = "tiktoken" if importlib.util.find_spec("tiktoken") else "hf"  # what engine=auto picks
ZH = "我们使用分词器把中文文本切分成词元模型在训练时读取这些数据并学习语言的规律"
EN = "the model reads tokens while the loader packs documents into fixed length sequences".split()
CODE = "def f(x):\n    return x + 1\n\nfor i in range(3):\n\tprint(i)\n"


def _text(rng: random.Random, domain: str) -> str:
    if domain == "zh":
        return "".join(rng.choice(ZH) for _ in range(rng.randint(5, 200))) + "。"
    if domain == "code":
        return CODE * rng.randint(1, 4) + f"# {rng.randint(0, 99999)} <|eos|> 😀\n"
    return " ".join(rng.choice(EN) for _ in range(rng.randint(1, 120))) + f" {rng.randint(0, 10**6)}."


def _write(path: Path, docs: list[Document]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(path, "jsonl.zst") as w:
        for d in docs:
            w.write(d)
    return path


def make_corpus(root: Path, docs_per_domain: dict[str, int], files_per_domain: int = 2, seed: int = 0
                ) -> dict[str, list[Path]]:
    rng = random.Random(seed)
    files: dict[str, list[Path]] = {}
    for domain, n in docs_per_domain.items():
        docs = [Document(id=f"{domain}-{i}", text=_text(rng, domain), domain=domain, meta={}) for i in range(n)]
        if n > 3:
            docs[1] = Document(id=f"{domain}-1", text="", domain=domain, meta={})  # empty document
        per = max(1, -(-n // files_per_domain))
        files[domain] = [_write(root / domain / f"part-{k:05d}.jsonl.zst", docs[a: a + per])
                         for k, a in enumerate(range(0, n, per))]
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return make_corpus(tmp_path_factory.mktemp("clean"), {"en": 120, "zh": 90, "code": 40})


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, list[Path]]) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=700, num_sentinels=2, sample_chars_per_domain=100_000),
                    corpus, out, seed=1)
    return out


def read_docs(out: Path, manifest: dict[str, Any], domain: str, split: str) -> list[list[int]]:
    docs = []
    for name in manifest["domains"][domain][split]["shards"]:
        sh = open_shard(out / domain / name)
        docs += [sh.document(i).tolist() for i in range(sh.n_docs)]
    return docs


def source_docs(files: dict[str, list[Path]], domain: str) -> list[Document]:
    from smelt.data.io import read_shard

    return [d for f in files[domain] for d in read_shard(f)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".bin", ".idx")}


def test_shards_hold_hf_ids_plus_eos(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    cfg = PackConfig(val_fraction=0.1, shard_tokens=2000, engine="auto")
    m = pack_tokens(cfg, tok_dir, corpus, tmp_path / "tokens", seed=5, workers=1)
    tok = load_tokenizer(tok_dir, encode_special_tokens=True)
    eos = special_ids(tok)["eos"]
    assert m["engine"]["tasks"] == {FAST: 6}
    for domain in corpus:
        src = source_docs(corpus, domain)
        want = [e.ids + [eos] for e in tok.encode_batch([d.text for d in src], add_special_tokens=False)]
        train = read_docs(tmp_path / "tokens", m, domain, "train")
        val = read_docs(tmp_path / "tokens", m, domain, "val")
        # every document exactly once, corpus order within each split, routed by its key
        k = m["val_split"][domain]["val_docs"]
        keys = [(val_key(d.id, 5), i) for i, d in enumerate(src)]
        held = {i for _, i in sorted(keys)[:k]}
        assert train == [w for i, w in enumerate(want) if i not in held]
        assert val == [w for i, w in enumerate(want) if i in held]
        assert len(val) == k == val_count(len(src), cfg) >= 1
        assert eos not in [t for doc in want for t in doc[:-1]]  # "<|eos|>" in the text stays text


def test_manifest_contents(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    cfg = PackConfig(shard_tokens=1500, add_bos=True)
    out = tmp_path / "tokens"
    m = pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=1)
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["complete"] is True
    assert m["tokenizer_sha256"] == tokenizer_sha256(tok_dir)
    assert (m["eos_id"], m["bos_id"], m["pad_id"]) == (ids["eos"], ids["bos"], ids["pad"]) == (2, 1, 0)
    assert m["special_ids"] == ids and ids["sentinel_1"] == tok.token_to_id("<|sentinel_1|>")
    sp = SpecialIds.from_manifest(m)  # what the loader and the objectives use
    assert (sp.pad, sp.bos, sp.eos, sp.fim_prefix, sp.fim_middle, sp.fim_suffix, sp.fim_pad) == tuple(
        ids[k] for k in ("pad", "bos", "eos", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad"))
    assert sp.sentinels == (ids["sentinel_0"], ids["sentinel_1"])
    assert m["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) and m["vocab_size"] % 128 == 0
    assert m["dtype"] == "uint16"
    assert set(m["domains"]) == set(corpus)
    for domain, splits in m["domains"].items():
        n_src = len(source_docs(corpus, domain))
        assert splits["train"]["docs"] + splits["val"]["docs"] == n_src == m["val_split"][domain]["docs"]
        for split, e in splits.items():
            assert e["shards"] == [f"{split}-{j:05d}" for j in range(len(e["shards"]))]
            assert sum(e["shard_tokens"]) == e["tokens"] and sum(e["shard_docs"]) == e["docs"]
            for name, n_tok in zip(e["shards"], e["shard_tokens"], strict=True):
                sh = open_shard(out / domain / name)
                assert sh.n_tokens == n_tok and sh.tokens.dtype == np.uint16
                docs = [sh.document(i) for i in range(sh.n_docs)]
                assert all(d[0] == ids["bos"] and d[-1] == ids["eos"] for d in docs)  # add_bos
        assert len(splits["train"]["shards"]) >= 2  # shard_tokens=1500 cut the stream
        assert max(splits["train"]["shard_tokens"][:-1]) <= 1500 + 800  # ~shard_tokens (+ at most one doc)
    assert m["totals"]["docs"] == sum(len(source_docs(corpus, d)) for d in corpus)
    assert m["totals"]["bytes"] == sum(len(d.text.encode()) for dm in corpus for d in source_docs(corpus, dm))
    assert not (out / pack.WORK).exists()


def test_output_independent_of_workers_slicing_and_engine(tmp_path: Path, corpus: dict[str, list[Path]],
                                                          tok_dir: Path) -> None:
    cfg = PackConfig(shard_tokens=1200)
    a = pack_tokens(cfg, tok_dir, corpus, tmp_path / "a", seed=3, workers=1)
    b = pack_tokens(cfg, tok_dir, corpus, tmp_path / "b", seed=3, workers=2)  # threads (small input)
    c = pack_tokens(cfg.model_copy(update={"engine": "hf"}), tok_dir, corpus, tmp_path / "c", seed=3, workers=1)
    d = pack_tokens(cfg, tok_dir, corpus, tmp_path / "d", seed=3, workers=1, slice_bytes=2000)  # files cut in slices
    e = pack_tokens(cfg.model_copy(update={"parallelism": "processes"}), tok_dir, corpus, tmp_path / "e", seed=3,
                    workers=2, slice_bytes=3000)  # spawned pool, more tasks than workers
    f = pack_tokens(cfg.model_copy(update={"engine": "hf"}), tok_dir, corpus, tmp_path / "f", seed=3, workers=3,
                    slice_bytes=3000)  # HF from threads
    assert d["tasks"] > a["tasks"] == 6
    ref = shard_bytes(tmp_path / "a")
    assert ref and all(shard_bytes(tmp_path / x) == ref for x in "bcdef")
    assert c["engine"]["tasks"] == {"hf": 6} and f["engine"]["tasks"] == {"hf": f["tasks"]}
    assert e["engine"]["tasks"] == {FAST: e["tasks"]} and e["tasks"] > 6
    assert (a["parallelism"], b["parallelism"], e["parallelism"], f["parallelism"]) == (
        "inline", "threads", "processes", "threads")
    assert b["workers"] == e["workers"] == 2
    assert all(m["engine"]["fallback_docs"] == a["engine"]["fallback_docs"] for m in (b, d, e))
    assert a["domains"] == b["domains"] == c["domains"] == d["domains"] == e["domains"] == f["domains"]


def test_task_size_and_parallel_mode(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    mb = pack.MB
    assert pack.auto_slice_bytes(0) == pack.auto_slice_bytes(10 * mb) == pack.MIN_SLICE_BYTES
    assert pack.auto_slice_bytes(640 * mb) == 10 * mb and pack.auto_slice_bytes(10**12) == pack.SLICE_BYTES
    cfg = PackConfig()
    assert pack.parallel_mode(cfg, 1, 10**12) == "inline"
    assert pack.parallel_mode(cfg, 4, int(cfg.threads_below_mb * mb) - 1) == "threads"
    assert pack.parallel_mode(cfg, 4, int(cfg.threads_below_mb * mb)) == "processes"
    assert pack.parallel_mode(cfg.model_copy(update={"parallelism": "processes"}), 2, 10) == "processes"
    assert pack.parallel_mode(cfg.model_copy(update={"parallelism": "threads"}), 2, 10**12) == "threads"
    # pack.slice_mb sets the task size (and the key: a different cut is another run)
    kb = corpus["en"][0].stat().st_size / mb
    one = pack_tokens(PackConfig(), tok_dir, {"en": corpus["en"]}, tmp_path / "one", seed=1, workers=1)
    cut = pack_tokens(PackConfig(slice_mb=kb / 3), tok_dir, {"en": corpus["en"]}, tmp_path / "cut", seed=1, workers=1)
    assert one["tasks"] == 2 and cut["tasks"] >= 6 and one["key"] != cut["key"]
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "cut")


def test_schedule_starts_longest_tasks_first(tmp_path: Path) -> None:
    sizes = {"a": 100, "b": 900, "c": 300, "d": 300}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    tasks = [pack.PackTask("x", str(tmp_path / n)) for n in "abcd"]
    # "b" cut in 3 slices: 300 bytes each, ties broken by plan order
    tasks[1:2] = [pack.PackTask("x", str(tmp_path / "b"), a, b) for a, b in ((0, 5), (5, 10), (10, None))]
    order = pack.schedule(tasks)
    assert [tasks[i].path[-1] for i in order] == ["b", "b", "b", "c", "d", "a"] and order[:3] == [1, 2, 3]
    assert pack.schedule([]) == []


def test_resume_with_other_parallelism(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Killed while running in threads on the file-backed path (no worker files), resumed with
    # processes: the workers need the encoder's tables, written on resume.
    cfg = PackConfig(shard_tokens=1500, parallelism="threads")
    pack_tokens(cfg, tok_dir, corpus, tmp_path / "ref", seed=1, workers=1)
    monkeypatch.setattr(pack, "IN_MEMORY_MAX_BYTES", -1)  # threads on a "big" input: chunk files
    real = pack._tokenize_task

    def crash_on_task_3(i: int, **kw: Any) -> dict[str, Any]:
        if i == 3:
            raise KeyboardInterrupt("killed")
        return real(i, **kw)

    monkeypatch.setattr(pack, "_tokenize_task", crash_on_task_3)
    out = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=2)
    assert (out / pack.WORK / "plan.json").is_file() and not (out / pack.WORK / "fast_bpe.npz").exists()
    monkeypatch.setattr(pack, "_tokenize_task", real)
    m = pack_tokens(cfg.model_copy(update={"parallelism": "processes"}), tok_dir, corpus, out, seed=1, workers=2)
    assert m["parallelism"] == "processes" and shard_bytes(out) == shard_bytes(tmp_path / "ref")


@pytest.mark.parametrize("n, frac, floor, cap, want", [
    (1, 0.5, 1, 10, 0),  # a lone document is never held out
    (2, 0.0, 1, 10, 1),  # floor
    (10, 0.0, 0, 10, 0),
    (100, 0.01, 1, 10, 1),
    (100, 0.05, 1, 10, 5),
    (1000, 0.5, 1, 10, 10),  # cap
    (3, 0.9, 1, 10, 2),  # at least one training document
    (100, 0.025, 0, 10, 3),  # round half up
])
def test_val_count(n: int, frac: float, floor: int, cap: int, want: int) -> None:
    assert val_count(n, PackConfig(val_fraction=frac, min_val_docs=floor, max_val_docs=cap)) == want


def test_val_split_cap_floor_and_seed(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    def run(cfg: PackConfig, name: str, seed: int = 1) -> dict[str, Any]:
        return pack_tokens(cfg, tok_dir, corpus, tmp_path / name, seed=seed, workers=1)

    capped = run(PackConfig(val_fraction=0.5, max_val_docs=7), "cap")
    floored = run(PackConfig(val_fraction=0.0, min_val_docs=3), "floor")
    for domain in corpus:
        assert capped["domains"][domain]["val"]["docs"] == 7
        assert floored["domains"][domain]["val"]["docs"] == 3
    other = run(PackConfig(val_fraction=0.0, min_val_docs=3), "seed2", seed=2)
    # another seed holds out other documents, the same number of them
    assert read_docs(tmp_path / "floor", floored, "en", "val") != read_docs(tmp_path / "seed2", other, "en", "val")
    assert other["domains"]["en"]["val"]["docs"] == 3


def test_rerun_is_noop_and_repairs_lost_shard(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    out = tmp_path / "tokens"
    cfg = PackConfig(shard_tokens=1500)
    m1 = pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=1)
    ref = shard_bytes(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    m2 = pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=1)
    assert m2 == m1 and {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")} == mtimes  # no-op
    victim = out / "zh" / "train-00001.bin"
    victim.unlink()
    pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=1)
    assert shard_bytes(out) == ref
    # a config change repacks and leaves no stale shard behind
    m3 = pack_tokens(cfg.model_copy(update={"shard_tokens": 100_000}), tok_dir, corpus, out, seed=1, workers=1)
    assert m3["key"] != m1["key"]
    assert sorted(p.name for p in (out / "zh").iterdir()) == ["train-00000.bin", "train-00000.idx",
                                                              "val-00000.bin", "val-00000.idx"]


def test_resume_after_crash_redoes_lost_work(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PackConfig(shard_tokens=1500)
    ref_out = tmp_path / "ref"
    pack_tokens(cfg, tok_dir, corpus, ref_out, seed=1, workers=1)
    # The file-backed path (process pools, or any mode on a big input), run inline on an input
    # deemed big so that the test can kill it.
    monkeypatch.setattr(pack, "IN_MEMORY_MAX_BYTES", -1)
    out = tmp_path / "tokens"
    real = pack._tokenize_task

    started: list[int] = []

    def crash_on_task_4(i: int, **kw: Any) -> dict[str, Any]:
        started.append(i)
        if len(started) == 5:  # the 5th task started (tasks start longest first: `pack.schedule`)
            raise KeyboardInterrupt("killed")
        return real(i, **kw)

    monkeypatch.setattr(pack, "_tokenize_task", crash_on_task_4)
    with pytest.raises(KeyboardInterrupt):
        pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=1)
    work = out / pack.WORK
    markers = sorted((work / "tokenize.done").glob("*.json"))
    # completion markers are per start slot; the plan maps slots to tasks
    assert [p.stem for p in markers] == ["00000", "00001", "00002", "00003"]
    order = json.loads((work / "plan.json").read_text())["schedule"]
    assert order == pack.schedule(pack.plan_tasks(corpus, pack.auto_slice_bytes(0))) and order != sorted(order)
    assert started == order[:5]
    assert not (out / "manifest.json").exists()
    markers[0].unlink()  # lost marker: the first task runs again
    (work / "chunks" / f"{order[2]:05d}.bin").unlink()  # marker kept, chunk lost: detected, runs again
    monkeypatch.setattr(pack, "_tokenize_task", real)
    calls: list[int] = []
    monkeypatch.setattr(pack, "_tokenize_task", lambda i, **kw: calls.append(i) or real(i, **kw))
    m = pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=1)
    assert len(order) == 6 and sorted(calls) == sorted(order[k] for k in (0, 2, 4, 5))
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert m["complete"] and not work.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_in_memory_run_writes_no_work_files_and_restarts_after_a_kill(
        tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path, monkeypatch: pytest.MonkeyPatch,
        workers: int) -> None:
    # Inline (1 worker) and threads (2, small input): chunks stay in memory; only the final
    # shards and the manifest are written. A kill leaves no manifest; the next run starts over.
    cfg = PackConfig(shard_tokens=1500, parallelism="threads")
    ref_out = tmp_path / "ref"
    monkeypatch.setattr(pack, "IN_MEMORY_MAX_BYTES", -1)
    ref = pack_tokens(cfg, tok_dir, corpus, ref_out, seed=1, workers=workers)  # file-backed reference
    monkeypatch.undo()
    written: list[Path] = []
    real_write, real_json = pack.write_shard, pack.atomic_write_json
    monkeypatch.setattr(pack, "write_shard",
                        lambda path, *a, **kw: written.append(Path(path)) or real_write(path, *a, **kw))
    monkeypatch.setattr(pack, "atomic_write_json",
                        lambda path, *a, **kw: written.append(Path(path)) or real_json(path, *a, **kw))
    out = tmp_path / "tokens"
    real = pack._encode_task
    calls: list[int] = []

    def killed_on_assembly(state: Any, i: int) -> Any:
        calls.append(i)
        return real(state, i)

    def kill(*a: Any, **kw: Any) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pack, "_encode_task", killed_on_assembly)
    real_asm = pack._assemble_shard
    n_asm = 0

    def assemble_then_die(*a: Any, **kw: Any) -> Any:
        nonlocal n_asm
        n_asm += 1
        if n_asm == 3:  # some output shards written, no manifest
            kill()
        return real_asm(*a, **kw)

    monkeypatch.setattr(pack, "_assemble_shard", assemble_then_die)
    with pytest.raises(KeyboardInterrupt):
        pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=workers)
    assert sorted(calls) == list(range(ref["tasks"]))
    assert not (out / "manifest.json").exists() and not (out / pack.WORK).exists()
    assert any(out.rglob("*.bin"))  # the killed run's first shards
    monkeypatch.setattr(pack, "_assemble_shard", real_asm)
    calls.clear()
    written.clear()
    m = pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=workers)
    assert sorted(calls) == list(range(m["tasks"]))  # redone from scratch
    assert m["parallelism"] == ("inline" if workers == 1 else "threads") and m["complete"]
    assert shard_bytes(out) == shard_bytes(ref_out) and m["domains"] == ref["domains"]
    # nothing but the final shards and the manifest, and never anything under _work
    assert all(pack._SHARD_RE.match(p.name + ".bin") and p.parent.parent == out for p in written[:-1])
    assert written[-1] == out / "manifest.json" and not (out / pack.WORK).exists()
    calls.clear()
    assert pack_tokens(cfg, tok_dir, corpus, out, seed=1, workers=workers) == m and not calls  # no-op


def test_uint32_when_vocabulary_exceeds_uint16(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    n = 65_536 - tok.get_vocab_size(with_added_tokens=True) + 10
    tok.add_special_tokens([AddedToken(f"<|extra_{k}|>", special=True, normalized=False) for k in range(n)])
    big = tmp_path / "big" / "tokenizer.json"
    big.parent.mkdir()
    tok.save(str(big))
    small = {"en": corpus["en"]}
    m = pack_tokens(PackConfig(), big, small, tmp_path / "tokens", seed=1, workers=1)
    assert m["vocab_size"] > 65_536 and m["dtype"] == "uint32"
    sh = open_shard(tmp_path / "tokens" / "en" / "train-00000")
    assert sh.tokens.dtype == np.uint32
    assert (tmp_path / "tokens" / "en" / "train-00000.bin").stat().st_size == 64 + 4 * sh.n_tokens
    ref = pack_tokens(PackConfig(), tok_dir, small, tmp_path / "ref", seed=1, workers=1)
    assert read_docs(tmp_path / "tokens", m, "en", "train") == read_docs(tmp_path / "ref", ref, "en", "train")


def test_corrupt_or_missing_input_names_the_file(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path) -> None:
    bad = tmp_path / "bad" / "part-00000.jsonl.zst"
    bad.parent.mkdir()
    bad.write_bytes(corpus["en"][0].read_bytes()[:-40])  # truncated zstd frame
    with pytest.raises(PackError, match=str(bad)):
        pack_tokens(PackConfig(), tok_dir, {"en": [bad]}, tmp_path / "t1", seed=1, workers=1)
    junk = tmp_path / "bad" / "part-00001.jsonl"
    junk.write_text('{"id": "a", "text": "fine", "domain": "en", "meta": {}}\nnot json\n')
    with pytest.raises(PackError, match=f"{junk}"):
        pack_tokens(PackConfig(), tok_dir, {"en": [junk]}, tmp_path / "t2", seed=1, workers=1)
    with pytest.raises(PackError, match="does not exist"):
        pack_tokens(PackConfig(), tok_dir, {"en": [tmp_path / "nope.jsonl.zst"]}, tmp_path / "t3", seed=1, workers=1)
    with pytest.raises(PackError, match="directory name"):
        pack_tokens(PackConfig(), tok_dir, {"../x": corpus["en"]}, tmp_path / "t4", seed=1, workers=1)


def test_engine_choice_and_verification(tmp_path: Path, corpus: dict[str, list[Path]], tok_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A tokenizer tiktoken cannot reproduce: auto packs with HF, tiktoken refuses.
    tok = load_tokenizer(tok_dir)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    odd = tmp_path / "odd.json"
    tok.save(str(odd))
    small = {"code": corpus["code"]}
    m = pack_tokens(PackConfig(engine="auto"), odd, small, tmp_path / "auto", seed=1, workers=1)
    assert m["engine"]["tasks"] == {"hf": 2} and "more than one" in m["engine"]["reason"]
    with pytest.raises(PackError, match="no exact tiktoken equivalent"):
        pack_tokens(PackConfig(engine="tiktoken"), odd, small, tmp_path / "tt", seed=1, workers=1)

    # A verification mismatch: auto falls back to HF for the task (same output), tiktoken fails.
    if FAST != "tiktoken":
        pytest.skip("tiktoken is not installed")
    from smelt.tokens.fast_bpe import FastBPE

    ref = pack_tokens(PackConfig(engine="hf"), tok_dir, small, tmp_path / "ref", seed=1, workers=1)
    monkeypatch.setattr(FastBPE, "mismatches", lambda self, texts: [0])
    m = pack_tokens(PackConfig(engine="auto"), tok_dir, small, tmp_path / "mm", seed=1, workers=1)
    # once per run (one sample per domain), and the whole run falls back
    assert m["engine"]["tasks"] == {"hf": 2} and m["engine"]["verify_mismatches"] == ["code-0"]
    assert "verification failed" in m["engine"]["reason"]
    assert shard_bytes(tmp_path / "mm") == shard_bytes(tmp_path / "ref") and ref["domains"] == m["domains"]
    with pytest.raises(PackError, match="ids differ on document 'code-0'"):
        pack_tokens(PackConfig(engine="tiktoken"), tok_dir, small, tmp_path / "mm2", seed=1, workers=1)


def test_tokenizer_without_smelt_specials_is_refused(tmp_path: Path, corpus: dict[str, list[Path]]) -> None:
    tok = Tokenizer(models.BPE())
    path = tmp_path / "plain.json"
    tok.save(str(path))
    with pytest.raises(PackError, match="eos"):
        pack_tokens(PackConfig(), path, corpus, tmp_path / "t", seed=1, workers=1)


def test_curated_demo_from_shared_data(shared_data: Path, tmp_path: Path, tok_dir: Path) -> None:
    """Real Chinese and English text end to end (CMRC 2018 contexts, WikiText-2 paragraphs)."""
    zh = []
    for art in json.loads((shared_data / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))["data"][:60]:
        zh += [p["context"] for p in art["paragraphs"]]
    wiki = (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    en = [p for p in wiki.split("\n \n") if p.strip()][:300]
    files = {"zh-wiki": [_write(tmp_path / "c" / "zh" / "p.jsonl.zst",
                                [Document(id=f"z{i}", text=t, domain="zh-wiki", meta={}) for i, t in enumerate(zh)])],
             "wiki": [_write(tmp_path / "c" / "en" / "p.jsonl.zst",
                             [Document(id=f"w{i}", text=t, domain="wiki", meta={}) for i, t in enumerate(en)])]}
    m = pack_tokens(PackConfig(val_fraction=0.05), tok_dir, files, tmp_path / "tokens", seed=1, workers=1)
    tok = load_tokenizer(tok_dir, encode_special_tokens=True)
    for domain, texts in (("zh-wiki", zh), ("wiki", en)):
        want = sorted(e.ids + [2] for e in tok.encode_batch(texts, add_special_tokens=False))
        got = read_docs(tmp_path / "tokens", m, domain, "train") + read_docs(tmp_path / "tokens", m, domain, "val")
        assert sorted(got) == want


def test_unencodable_document_is_named(tmp_path: Path, tok_dir: Path) -> None:
    f = tmp_path / "clean" / "en" / "part-00000.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text('{"id": "ok", "text": "fine", "domain": "en", "meta": {}}\n'
                 '{"id": "lone-surrogate", "text": "a\\ud800b", "domain": "en", "meta": {}}\n')
    assert pack.find_shards(tmp_path / "clean") == {"en": [f]}
    for engine in sorted({"hf", FAST}):
        with pytest.raises(PackError, match="cannot encode document 'lone-surrogate'"):
            pack_tokens(PackConfig(engine=engine), tok_dir, pack.find_shards(tmp_path / "clean"),
                        tmp_path / engine, seed=1, workers=1)


def test_batched_reader_equals_read_shard(tmp_path: Path, corpus: dict[str, list[Path]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from smelt.data.io import read_shard

    monkeypatch.setattr(pack, "BATCH_CHARS", 700)  # many batches per file
    for f in corpus["en"] + corpus["code"]:
        want = [(d.id, d.text) for d in read_shard(f)]
        for start, stop in [(0, None), (0, 1), (3, 9), (5, None), (len(want) - 1, None), (len(want), None)]:
            got = [r for ids, texts in pack._read_batches(pack.PackTask("en", str(f), start, stop))
                   for r in zip(ids, texts, strict=True)]
            assert got == want[start:stop], (f, start, stop)


@pytest.mark.parametrize("bad, why", [
    ('{"id": "b", "text": "x"}, {"id": "c", "text": "y"}', "Extra data"),  # two records on one line
    ('{"id": "b", "text": ["x",', "Expecting"),  # a value spread over two lines...
    ('"y"]}', "Extra data"),
    ('{"id": "b", "text": ["x",\n"y"]}', "Expecting value"),  # ...which parses as one value with its neighbour
    ("", "Expecting value"),  # blank line
    ('["id", "text"]', "not a record"),
    ('{"id": "b"}', "not a record"),
    ('{"id": "b", "text": null}', "not a record"),
    ('{"text": "no id"}', "not a record"),
])
def test_batched_reader_names_the_bad_line(tmp_path: Path, bad: str, why: str) -> None:
    good = '{"id": "a", "text": "fine", "domain": "en", "meta": {}}'
    path = tmp_path / "part-00000.jsonl"
    path.write_text("\n".join([good, good, bad, good]) + "\n")
    with pytest.raises(PackError, match=f"{path}:3: damaged shard record: .*{why}"):
        list(pack._read_batches(pack.PackTask("en", str(path))))
    # a task that stops before the bad line reads fine
    assert len(list(pack._read_batches(pack.PackTask("en", str(path), 0, 2)))[0][0]) == 2
