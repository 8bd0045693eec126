"""MixtureLoader / TokenStore: mixture, curriculum, epochs, resume, document boundaries, errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smelt.config import CurriculumStage, LoaderConfig, ObjectiveConfig
from smelt.tokens.loader import (
    DataExhausted,
    FeistelPermutation,
    LoaderStateError,
    MixtureLoader,
    MixtureSchedule,
    TokenStore,
    TokenStoreError,
)
from smelt.tokens.objectives import IGNORE_INDEX
from smelt.tokens.shards import ShardFormatError, write_shard

EOS = 2
REPO = Path(__file__).resolve().parents[2]


def make_docs(n_tokens: int, seed: int, min_len: int = 3, max_len: int = 60, lo: int = 100,
              hi: int = 5000) -> list[np.ndarray]:
    """Random documents (ids in [lo, hi), never a special id) each ending in EOS, ~n_tokens in all."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        doc = np.append(rng.integers(lo, hi, int(rng.integers(min_len, max_len))), EOS)
        docs.append(doc)
        total += len(doc)
    return docs


def write_tokens(root: Path, train: dict[str, list[np.ndarray]], val: dict[str, list[np.ndarray]] | None = None,
                 shard_docs: int = 10_000, dtype: type = np.uint16) -> Path:
    """Token shards + manifest.json laid out as `smelt pack` writes them."""
    manifest = {"format_version": 1, "tokenizer_sha256": "0" * 64, "vocab_size": 70_000 if dtype == np.uint32 else 6000,
                "dtype": np.dtype(dtype).name, "eos_id": EOS, "bos_id": 1, "pad_id": 0, "domains": {}, "complete": True}
    for domain in train:
        entry = {}
        for split, docs in (("train", train[domain]), ("val", (val or {}).get(domain, []))):
            stems = []
            for i in range(0, len(docs), shard_docs):
                stem = f"{split}-{i // shard_docs:05d}"
                write_shard(root / domain / stem, docs[i: i + shard_docs], dtype=dtype)
                stems.append(stem)
            entry[split] = {"tokens": int(sum(len(d) for d in docs)), "docs": len(docs), "shards": stems}
        manifest["domains"][domain] = entry
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def stream_of(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(docs).astype(np.int64)


@pytest.fixture(scope="module")
def three_domains(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok3")
    # 16-token sequences: 20k samples at 40% need ~136k tokens per domain; no domain repeats.
    docs = {"zh": make_docs(200_000, 1), "en": make_docs(200_000, 2), "code": make_docs(120_000, 3)}
    val = {d: make_docs(500, 10 + i) for i, d in enumerate(docs)}
    return write_tokens(root, docs, val, shard_docs=2000)


def cfg(**kw) -> LoaderConfig:
    kw.setdefault("seq_len", 16)
    return LoaderConfig(**kw)


# ------------------------------------------------------------------------------------------
# mixture


def test_mixture_proportions_4_4_2(three_domains: Path) -> None:
    loader = MixtureLoader(three_domains, cfg(weights={"zh": 4, "en": 4, "code": 2}), seed=7)
    n = 20_000
    dom = loader.batch(0, n)["domain"]
    share = np.bincount(dom, minlength=3) / n
    expect = {"zh": 0.4, "en": 0.4, "code": 0.2}
    for i, d in enumerate(loader.domains):
        assert abs(share[i] - expect[d]) < 0.01, (d, share[i])
    # Blocks of 1024 samples hold exact counts: over whole blocks the share is exact to one
    # sample, not just within sampling noise (only a partial last block is shuffled noise).
    whole = np.bincount(loader.batch(0, 20 * 1024)["domain"], minlength=3)
    for i, d in enumerate(loader.domains):
        assert abs(whole[i] - expect[d] * 20 * 1024) <= 1
    # ... and shuffled: not a fixed round robin.
    assert len({tuple(dom[i: i + 10]) for i in range(0, 1000, 10)}) > 50


def test_weights_default_to_token_counts(three_domains: Path) -> None:
    loader = MixtureLoader(three_domains, cfg(), seed=0)
    tok = np.array([loader.tokens_per_domain[d] for d in loader.domains], dtype=float)
    share = np.bincount(loader.batch(0, 5000)["domain"], minlength=3) / 5000
    np.testing.assert_allclose(share, tok / tok.sum(), atol=0.01)


def test_curriculum_switches_at_exact_token_count(three_domains: Path) -> None:
    stages = [CurriculumStage(until_tokens=1000, weights={"zh": 1}),   # 1000 / 16 -> switch at sample 63
              CurriculumStage(until_tokens=2048, weights={"code": 1}),  # 2048 / 16 = 128 exactly
              CurriculumStage(until_tokens=4000, weights={"en": 1, "zh": 1})]
    loader = MixtureLoader(three_domains, cfg(curriculum=stages), seed=3)
    names = [loader.domains[d] for d in loader.batch(0, 600)["domain"]]
    assert 62 * 16 < 1000 <= 63 * 16
    assert set(names[:63]) == {"zh"}
    assert set(names[63:128]) == {"code"}
    assert set(names[128:]) == {"en", "zh"}  # after the last stage its weights persist
    assert abs(names[128:].count("en") / len(names[128:]) - 0.5) < 0.02
    assert [r["stage"] for r in loader.describe()][:4] == [0, 1, 2, 3]


def test_unknown_domain_and_bad_weights(three_domains: Path) -> None:
    with pytest.raises(ValueError, match=r"loader.weights: unknown domains \['fr'\]"):
        MixtureLoader(three_domains, cfg(weights={"fr": 1, "en": 1}), seed=0)
    with pytest.raises(ValueError, match="positive sum"):
        MixtureLoader(three_domains, cfg(weights={"en": 0}), seed=0)
    # the recipe schema refuses a non-increasing curriculum before any loader is built
    with pytest.raises(ValueError, match=r"curriculum until_tokens must increase strictly, got \[100, 50\]"):
        MixtureLoader(three_domains, cfg(curriculum=[CurriculumStage(until_tokens=100, weights={"en": 1}),
                                                     CurriculumStage(until_tokens=50, weights={"zh": 1})]), seed=0)


# ------------------------------------------------------------------------------------------
# epochs: permutation per epoch, cap, redistribution, reuse decay


@pytest.fixture(scope="module")
def small_and_big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok_sb")
    # small: exactly 50 windows of 17 tokens (one 16-token document + EOS each).
    small = [np.append(np.arange(1000 + 16 * i, 1016 + 16 * i), EOS) for i in range(50)]
    return write_tokens(root, {"small": small, "big": make_docs(60_000, 5), "mid": make_docs(20_000, 6)})


def test_epochs_are_permutations_and_cap_holds(small_and_big: Path) -> None:
    loader = MixtureLoader(small_and_big, cfg(weights={"small": 1, "big": 1}, max_epochs=2), seed=11, reuse_decay=1.0)
    s = loader.domains.index("small")
    n = loader.windows_per_domain["small"]
    assert n == 50
    locs = [loader.locate(k) for k in range(400)]
    small_windows = [loc["window"] for loc in locs if loc["domain"] == s]
    assert len(small_windows) == 2 * n  # the cap: exactly max_epochs * n draws, then none
    first, second = small_windows[:n], small_windows[n:]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second  # a fresh shuffle each epoch
    last_small = max(k for k, loc in enumerate(locs) if loc["domain"] == s)
    assert all(loc["domain"] == loader.domains.index("big") for loc in locs[last_small + 1:])
    # Before the cap the 1:1 mixture holds.
    assert abs(sum(loc["domain"] == s for loc in locs[:100]) - 50) <= 2
    # Window contents follow the locate() offset.
    b = loader.batch(0, 64)
    for k in range(64):
        loc = locs[k]
        stream = loader.store[loader.domains[loc["domain"]]]
        np.testing.assert_array_equal(b["input_ids"][k], stream.read(loc["offset"], 16))
        np.testing.assert_array_equal(b["targets"][k], stream.read(loc["offset"] + 1, 16))


def test_cap_redistributes_in_proportion(small_and_big: Path) -> None:
    loader = MixtureLoader(small_and_big, cfg(weights={"small": 2, "big": 2, "mid": 1}, max_epochs=1.5),
                           seed=2, reuse_decay=1.0)
    assert loader.schedule.caps[loader.domains.index("small")] == 75  # floor(1.5 * 50)
    rows = loader.describe()
    assert rows[0]["probs"] == {"small": 0.4, "big": 0.4, "mid": 0.2}
    after = next(r for r in rows if "small" not in r["probs"])
    assert after["probs"] == pytest.approx({"big": 2 / 3, "mid": 1 / 3})
    draws = sum(loader.locate(k)["domain"] == loader.domains.index("small") for k in range(loader.total_samples))
    assert draws == 75


def test_reused_data_is_drawn_less(small_and_big: Path) -> None:
    loader = MixtureLoader(small_and_big, cfg(weights={"small": 1, "big": 1}, max_epochs=3), seed=4, reuse_decay=0.5)
    rows = loader.describe()
    second = next(r for r in rows if r["epochs"].get("small") == 1)
    assert second["probs"]["small"] == pytest.approx(0.5 / 1.5)
    third = next(r for r in rows if r["epochs"].get("small") == 2)
    assert third["probs"]["small"] == pytest.approx(0.25 / 1.25)
    # Empirically, over 8 seeds: the second epoch of `small` (50 draws) spans ~150 samples
    # (100 without the decay); one seed's spread is about +-17.
    spans = []
    for seed in range(8):
        ld = MixtureLoader(small_and_big, cfg(weights={"small": 1, "big": 1}, max_epochs=3), seed=seed, reuse_decay=0.5)
        ks = [k for k in range(600) if ld.locate(k)["domain"] == ld.domains.index("small")]
        spans.append(ks[99] - ks[49])
    assert 135 <= np.mean(spans) <= 165, spans


def test_exhaustion_is_a_clear_error(small_and_big: Path) -> None:
    loader = MixtureLoader(small_and_big, cfg(weights={"small": 1}, max_epochs=2), seed=0, global_batch=30)
    assert loader.total_samples == 100
    with pytest.raises(DataExhausted, match="max_epochs"):
        loader.batch(90, 20)
    assert len(list(loader)) == 3  # 3 full global batches of 30, the last 10 samples dropped
    assert loader.position == 90


@pytest.mark.parametrize("seed", range(8))
def test_schedule_matches_a_replay(seed: int) -> None:
    """Random domains, weights (some tiny), caps, decay and stages: locate(k) must agree with
    counting draws one sample at a time, and the caps must hold exactly."""
    rng = np.random.default_rng(seed)
    n_dom = int(rng.integers(2, 6))
    windows = rng.integers(1, 200, n_dom)
    max_epochs = float(rng.choice([1.0, 2.5, 4.0]))

    def weights() -> np.ndarray:
        w = rng.random(n_dom) * (rng.random(n_dom) < 0.8)
        w[int(rng.integers(n_dom))] += 0.01  # at least one positive; some close to zero
        return w / w.sum()

    stages = [(int(rng.integers(50, 400)), weights()), (None, weights())]
    sched = MixtureSchedule(windows, stages, max_epochs, seed=seed, reuse_decay=0.7, block=64)
    count = np.zeros(n_dom, dtype=np.int64)
    for k in range(sched.total):
        d, i = sched.locate(k)
        assert i == count[d]
        if k < stages[0][0]:
            assert stages[0][1][d] > 0
        else:
            assert stages[1][1][d] > 0
        count[d] += 1
    caps = np.floor(max_epochs * windows + 1e-9)
    assert (count <= caps).all()
    last = stages[0][1] if sched.total < stages[0][0] else stages[1][1]  # the stage active at `total`
    assert (count[last > 0] == caps[last > 0]).all()  # the end: every domain weighted then is capped
    with pytest.raises(DataExhausted):
        sched.locate(sched.total)


def test_feistel_is_a_permutation() -> None:
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        perm = FeistelPermutation(n, (1, 2, 3, 4, 5, 6))
        assert sorted(perm(i) for i in range(n)) == list(range(n))
    a = [FeistelPermutation(1000, (1, 2, 3, 4, 5, 6))(i) for i in range(1000)]
    b = [FeistelPermutation(1000, (9, 2, 3, 4, 5, 6))(i) for i in range(1000)]
    assert a != b and a != list(range(1000))


# ------------------------------------------------------------------------------------------
# batches, resume, determinism


def test_rank_slices_concatenate_to_the_global_batch(three_domains: Path) -> None:
    loader = MixtureLoader(three_domains, cfg(weights={"zh": 4, "en": 4, "code": 2}), seed=1)
    full = loader.batch(40, 12)
    for world in (2, 3, 4):
        parts = [loader.batch(40, 12, rank=r, world=world) for r in range(world)]
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 5"):
        loader.batch(0, 12, rank=0, world=5)
    with pytest.raises(ValueError, match="rank 2 outside"):
        loader.batch(0, 12, rank=2, world=2)


@pytest.mark.parametrize("kind", ["causal", "fim"])
def test_resume_identity_across_world_sizes(three_domains: Path, kind: str) -> None:
    c = cfg(weights={"zh": 4, "en": 4, "code": 2}, document_mask=True, objective=ObjectiveConfig(kind=kind))
    straight = MixtureLoader(three_domains, c, seed=5)
    ref = [straight.next_batch(8) for _ in range(6)]

    # 2 ranks for 2 steps, checkpoint, resume in 1 process for the remaining 4.
    ranks = [MixtureLoader(three_domains, c, seed=5, global_batch=8, rank=r, world=2) for r in range(2)]
    got = []
    for _ in range(2):
        parts = [ld.next_batch() for ld in ranks]
        got.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    state = json.loads(json.dumps(ranks[0].state_dict()))  # survives JSON (trainer_state.json)
    assert state["next_sample"] == 16 and ranks[1].state_dict()["next_sample"] == 16
    resumed = MixtureLoader(three_domains, c, seed=5)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(8) for _ in range(4)]
    for a, b in zip(ref, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_state_fingerprint_is_checked(three_domains: Path) -> None:
    a = MixtureLoader(three_domains, cfg(weights={"zh": 1, "en": 1}), seed=5)
    a.next_batch(4)
    state = a.state_dict()
    b = MixtureLoader(three_domains, cfg(weights={"zh": 1, "en": 1}), seed=6)
    with pytest.raises(LoaderStateError, match="different seed"):
        b.load_state_dict(state)
    c = MixtureLoader(three_domains, cfg(weights={"zh": 2, "en": 1}), seed=5)
    with pytest.raises(LoaderStateError, match="different loader"):
        c.load_state_dict(state)
    c.load_state_dict(state, strict=False)
    assert c.position == 4
    # cfg.seed overrides the recipe seed.
    d = MixtureLoader(three_domains, cfg(weights={"zh": 1, "en": 1}, seed=5), seed=999)
    d.load_state_dict(state)


_CHILD = """
import hashlib, sys
from smelt.config import LoaderConfig, ObjectiveConfig
from smelt.tokens.loader import MixtureLoader
c = LoaderConfig(seq_len=16, weights={"zh": 4, "en": 4, "code": 2}, document_mask=True,
                 objective=ObjectiveConfig(kind=sys.argv[2]))
b = MixtureLoader(sys.argv[1], c, seed=123).batch(1000, 64)
h = hashlib.sha256()
for k in sorted(b):
    h.update(k.encode()); h.update(b[k].tobytes())
print(h.hexdigest())
"""


def test_deterministic_across_processes(three_domains: Path) -> None:
    for kind in ("ul2", "fim"):
        c = cfg(weights={"zh": 4, "en": 4, "code": 2}, document_mask=True, objective=ObjectiveConfig(kind=kind))
        b = MixtureLoader(three_domains, c, seed=123).batch(1000, 64)
        h = hashlib.sha256()
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].tobytes())
        env = dict(os.environ, PYTHONHASHSEED="77")
        out = subprocess.run([sys.executable, "-c", _CHILD, str(three_domains), kind], capture_output=True,
                             text=True, env=env, cwd=REPO, check=True)
        assert out.stdout.strip() == h.hexdigest()


def test_sample_is_independent_of_batch_position(three_domains: Path) -> None:
    c = cfg(weights={"zh": 1, "en": 1, "code": 1}, objective=ObjectiveConfig(kind="ul2"))
    loader = MixtureLoader(three_domains, c, seed=9)
    big = loader.batch(100, 16)
    one = loader.batch(107, 1)
    for key in big:
        np.testing.assert_array_equal(big[key][7], one[key][0])


# ------------------------------------------------------------------------------------------
# document boundaries, shards, validation


@pytest.fixture(scope="module")
def known_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("tok_docs")
    docs = make_docs(3000, 8, min_len=1, max_len=12)
    return write_tokens(root, {"a": docs}, {"a": make_docs(200, 9)}, shard_docs=37), docs  # many small shards


def test_position_and_segment_ids_at_document_boundaries(known_docs: tuple[Path, list[np.ndarray]]) -> None:
    root, docs = known_docs
    flat = stream_of(docs)
    starts = np.zeros(len(flat), dtype=bool)
    starts[np.cumsum([len(d) for d in docs])[:-1]] = True  # a document starts after every EOS
    loader = MixtureLoader(root, cfg(document_mask=True), seed=0)
    b = loader.batch(0, 50)
    assert b["input_ids"].shape == (50, 16) and b["input_ids"].dtype == np.int64
    for k in range(50):
        off = loader.locate(k)["offset"]
        np.testing.assert_array_equal(b["input_ids"][k], flat[off: off + 16])
        new = starts[off: off + 16].copy()
        new[0] = False
        np.testing.assert_array_equal(b["segment_ids"][k], np.cumsum(new))
        pos, p = [], 0
        for t in range(16):
            p = 0 if (t == 0 or new[t]) else p + 1
            pos.append(p)
        np.testing.assert_array_equal(b["position_ids"][k], pos)
        # The token before each new document is its predecessor's EOS.
        assert (b["input_ids"][k][np.flatnonzero(new) - 1] == EOS).all()
    plain = MixtureLoader(root, cfg(document_mask=False), seed=0).batch(0, 50)
    assert (plain["segment_ids"] == 0).all()
    assert (plain["position_ids"] == np.arange(16)).all()
    np.testing.assert_array_equal(plain["input_ids"], b["input_ids"])
    assert (plain["prefix_len"] == 0).all()


def test_windows_span_shards(known_docs: tuple[Path, list[np.ndarray]]) -> None:
    root, docs = known_docs
    store = TokenStore(root, "train")
    stream = store["a"]
    assert len(stream.shards) > 5 and len(stream) == sum(len(d) for d in docs)
    flat = stream_of(docs)
    for start, length in ((0, 17), (250, 400), (len(flat) - 33, 33)):
        np.testing.assert_array_equal(stream.read(start, length), flat[start: start + length])
    with pytest.raises(IndexError):
        stream.read(len(flat) - 5, 10)


def test_val_batches_cover_every_token_once(known_docs: tuple[Path, list[np.ndarray]]) -> None:
    root, _ = known_docs
    loader = MixtureLoader(root, cfg(document_mask=True), seed=0)
    val = stream_of(make_docs(200, 9))
    batches = list(loader.val_batches("a", batch_size=4))
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    np.testing.assert_array_equal(targets[targets != IGNORE_INDEX], val[1:])  # every token but the first, once
    inputs = np.concatenate([b["input_ids"].ravel() for b in batches])
    assert len(inputs) == 16 * -(-(len(val) - 1) // 16)
    assert list(loader.val_batches("a", batch_size=4, max_batches=2)).__len__() == 2
    with pytest.raises(KeyError, match="unknown domain"):
        next(loader.val_batches("nope", 4))


def test_uint32_shards(tmp_path: Path) -> None:
    docs = [np.append(np.arange(66_000 + 10 * i, 66_010 + 10 * i), EOS) for i in range(40)]
    root = write_tokens(tmp_path, {"x": docs}, dtype=np.uint32)
    loader = MixtureLoader(root, cfg(), seed=0)
    b = loader.batch(0, 4)
    assert b["input_ids"].max() > 65_536


def test_truncated_shard_is_a_clear_error(tmp_path: Path) -> None:
    root = write_tokens(tmp_path, {"x": make_docs(2000, 1)})
    bin_path = root / "x" / "train-00000.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-10])
    with pytest.raises(ShardFormatError, match=r"train-00000.bin.*truncated.*domain 'x'"):
        MixtureLoader(root, cfg(), seed=0)


def test_manifest_problems_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenStoreError, match="run `smelt pack` first"):
        TokenStore(tmp_path, "train")
    root = write_tokens(tmp_path, {"x": make_docs(2000, 1)})
    m = json.loads((root / "manifest.json").read_text())
    m["domains"]["x"]["train"]["tokens"] += 1
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenStoreError, match="manifest says"):
        TokenStore(root, "train")
    m["domains"]["x"]["train"]["tokens"] -= 1
    m["complete"] = False
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenStoreError, match="not complete"):
        TokenStore(root, "train")


def test_domain_shorter_than_a_window(tmp_path: Path) -> None:
    root = write_tokens(tmp_path, {"tiny": [np.array([5, 6, EOS])], "x": make_docs(2000, 1)})
    with pytest.raises(ValueError, match="'tiny' has 3 train tokens"):
        MixtureLoader(root, cfg(weights={"tiny": 1, "x": 1}), seed=0)
    loader = MixtureLoader(root, cfg(), seed=0)  # by token count: tiny gets no weight
    assert set(loader.batch(0, 100)["domain"]) == {loader.domains.index("x")}


def test_state_from_other_token_shards_is_refused(tmp_path: Path) -> None:
    a = write_tokens(tmp_path / "a", {"x": make_docs(3000, 1)})
    b = write_tokens(tmp_path / "b", {"x": make_docs(3000, 2)})
    state = MixtureLoader(a, cfg(), seed=0).state_dict()
    with pytest.raises(LoaderStateError, match="different tokens"):
        MixtureLoader(b, cfg(), seed=0).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="version"):
        MixtureLoader(a, cfg(), seed=0).load_state_dict({**state, "version": 99})
