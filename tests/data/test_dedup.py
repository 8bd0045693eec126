"""Dedup primitives: exact keys, MinHash LSH (recall on planted pairs), clusters, line/sentence units."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from smelt.config import MinHashConfig
from smelt.data.dedup.exact import exact_key, exact_keys, first_occurrence, normalize_for_exact
from smelt.data.dedup.lines import removal_mask, remove_spans, sentence_spans, spans_to_remove, units
from smelt.data.dedup.minhash import (
    EMPTY_BAND_KEY,
    MERSENNE_PRIME,
    SENTINEL,
    MinHasher,
    UnionFind,
    band_keys,
    bucket_pairs,
    clusters,
    connected_components,
    estimate_jaccard,
    jaccard,
    large_star,
    lsh_probability,
    node_partition,
    small_star,
)

CFG = MinHashConfig()  # FineWeb defaults: 5-grams, 14 bands x 8 rows


@pytest.fixture(scope="module")
def hasher() -> MinHasher:
    return MinHasher(CFG)


# ------------------------------------------------------------------------------- exact


def test_normalize_for_exact_folds_case_and_whitespace_only():
    assert normalize_for_exact("  Hello\tWORLD \n\n foo\u3000bar\xa0baz ") == "hello world foo bar baz"
    assert normalize_for_exact("") == ""
    assert exact_key("Hello  World\n") == exact_key("hello world") == xxhash.xxh3_64_intdigest(b"hello world")
    assert exact_key("hello world") != exact_key("hello, world")  # punctuation is content
    k = exact_key("你好 世界")
    assert isinstance(k, int) and 0 <= k < 2**64
    assert exact_key("bad \udcff byte") == exact_key("BAD \udcff BYTE")  # lone surrogate does not crash
    ks = exact_keys(["A b", "a  B", "c"])
    assert ks.dtype == np.uint64 and ks[0] == ks[1] != ks[2]


def test_first_occurrence_picks_smallest_order_per_key():
    keys = np.array([5, 3, 5, 3, 7, 5], dtype=np.uint64)
    orders = np.array([10, 4, 2, 8, 1, 6], dtype=np.int64)
    np.testing.assert_array_equal(first_occurrence(keys, orders), [2, 4, 2, 4, 1, 2])
    assert first_occurrence(np.empty(0, np.uint64), np.empty(0, np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="equal length"):
        first_occurrence(keys, orders[:-1])


def test_first_occurrence_matches_brute_force():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 50, size=2000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # large uint64s
    orders = rng.permutation(10**6)[:2000].astype(np.int64)
    ref: dict[int, int] = {}
    for k, o in zip(keys.tolist(), orders.tolist(), strict=True):
        ref[k] = min(ref.get(k, o), o)
    np.testing.assert_array_equal(first_occurrence(keys, orders), [ref[k] for k in keys.tolist()])


# ----------------------------------------------------------------------------- minhash


def test_signature_matches_exact_modular_reference(hasher):
    """(a*x + b) mod (2^61 - 1) in Python big ints, min over shingles, low 32 bits."""
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 3
    x = [int(v) & 0xFFFFFFFF for v in hasher.shingles(text)]
    ref = [min((a * xi + b) % MERSENNE_PRIME for xi in x) & 0xFFFFFFFF
           for a, b in zip(hasher.a.tolist(), hasher.b.tolist(), strict=True)]
    sig = hasher.signature(text)
    assert sig.dtype == np.uint32 and sig.shape == (CFG.bands * CFG.rows,)
    assert sig.tolist() == ref


def test_multiply_shift_matches_its_wraparound_reference():
    """((a*x + b) mod 2^64) >> 32 in Python big ints, min over shingles: the shift taken after the
    minimum (it is monotone) gives the same rows."""
    h = MinHasher(MinHashConfig(hash_family="multiply_shift"))
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 3
    x = [int(v) & 0xFFFFFFFF for v in h.shingles(text)]
    ref = [min(((a * xi + b) % 2**64) >> 32 for xi in x) for a, b in zip(h.a.tolist(), h.b.tolist(), strict=True)]
    sig = h.signature(text)
    assert sig.dtype == np.uint32 and sig.tolist() == ref
    assert h.signature("").tolist() == [int(SENTINEL)] * CFG.bands * CFG.rows
    assert h.params_digest.startswith("minhash-ms-14x8-") and h.params_digest != MinHasher(CFG).params_digest


def test_rensa_family_is_rensa_over_smelts_shingle_hashes():
    """hash_family rensa: rensa's RMinHash of smelt's own (CJK-aware) shingle hashes, batched; the
    same rows as rensa's per-set API gives, and SENTINEL rows for documents without shingles."""
    rensa = pytest.importorskip("rensa")
    h = MinHasher(MinHashConfig(hash_family="rensa"))
    texts = ["the quick brown fox jumps over the lazy dog while the cat sleeps", "", "我们今天去北京的天安门广场看升旗"]
    sigs = h.signatures(texts)
    ref = rensa.RMinHash.digest_matrix_from_token_hash_sets(
        [[int(x) for x in h._shingle_hashes(t)] for t in texts[::2]], CFG.bands * CFG.rows, CFG.seed).to_rows()
    assert sigs.dtype == np.uint32 and sigs[0].tolist() == ref[0] and sigs[2].tolist() == ref[1]
    assert (sigs[1] == SENTINEL).all() and (h.signature(texts[0]) == sigs[0]).all()
    assert h.params_digest.startswith("minhash-rensa")


def test_permutation_is_exact_at_the_extremes():
    """x = 2^32 - 1 with a close to p overflows uint64 in the naive formula (datatrove's bug)."""
    h = MinHasher(MinHashConfig(bands=1, rows=4))
    h.a[:] = np.array([MERSENNE_PRIME - 1, 1, 2**32 + 7, 2**60 + 12345], dtype=np.uint64)
    h.b[:] = np.array([MERSENNE_PRIME - 1, 0, 5, 2**61 - 3], dtype=np.uint64)
    h._a_hi, h._a_lo, h._b = (h.a >> np.uint64(32))[None], (h.a & np.uint64(0xFFFFFFFF))[None], h.b[None]
    xs = np.array([0, 1, 2**31, 2**32 - 1, 123456789], dtype=np.uint64)
    out, t1, t2 = (np.empty((5, 4), np.uint64) for _ in range(3))
    got = h._permute(xs[:, None], out, t1, t2)
    ref = [[(a * x + b) % MERSENNE_PRIME for a, b in zip(h.a.tolist(), h.b.tolist(), strict=True)] for x in xs.tolist()]
    assert got.tolist() == ref
    # results 0..3 are where Mersenne folding can leave p..p+3: pick b so that a*x + b = t (mod p)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, t = int(rng.integers(0, 2**32)), int(rng.integers(0, 4))
        h.a[:] = rng.integers(1, MERSENNE_PRIME, size=4, dtype=np.uint64)
        h.b[:] = [(t - a * x) % MERSENNE_PRIME for a in h.a.tolist()]
        h._a_hi, h._a_lo, h._b = (h.a >> np.uint64(32))[None], (h.a & np.uint64(0xFFFFFFFF))[None], h.b[None]
        assert h._permute(np.array([[x]], np.uint64), out[:1], t1[:1], t2[:1]).tolist() == [[t] * 4]


def test_shingles_words_and_cjk_characters():
    h = MinHasher(MinHashConfig(ngram=5, cjk_ngram=2))
    sh = h.shingles("One two three four five six seven")  # 7 words, 5-grams -> 3
    assert sh.dtype == np.uint64 and sh.size == 3 and np.all(np.diff(sh.astype(np.float64)) > 0)
    assert h.shingles("one, TWO three four five six seven!").tolist() == sh.tolist()  # case/punct
    assert h.shingles("我爱北京天安门").size == 6  # 7 Han characters, character bigrams
    assert h.ngram_for("我爱北京天安门") == 2 and h.ngram_for("plain English") == 5
    assert h.shingles("tiny text").size == 1  # fewer tokens than n: one shingle of all of them
    assert h.shingles("").size == 0 and h.shingles(" ... !!! ").size == 0


def test_identical_docs_share_all_bands(hasher):
    a = "Breaking news: the river flooded the lower town overnight and roads are closed. " * 4
    b = a.upper().replace(" ", "  ")
    sigs = hasher.signatures([a, b, "something else entirely, with other words and topics here"])
    assert sigs.shape == (3, CFG.bands * CFG.rows) and sigs.dtype == np.uint32
    keys = band_keys(sigs, CFG.bands, CFG.rows)
    assert keys.shape == (3, CFG.bands) and keys.dtype == np.uint64
    assert np.array_equal(keys[0], keys[1]) and not np.any(keys[0] == keys[2])
    assert np.array_equal(hasher.signature(a), sigs[0])  # batched == single
    assert estimate_jaccard(sigs[0], sigs[1]) == 1.0


def test_band_keys_depend_on_band_index_and_only_their_rows():
    sig = np.arange(1, 113, dtype=np.uint32)[None].repeat(2, axis=0)
    sig[1, 3 * 8 + 5] += 1  # one row of band 3
    k = band_keys(sig, 14, 8)
    assert np.flatnonzero(k[0] != k[1]).tolist() == [3]
    same = np.full((1, 112), 7, dtype=np.uint32)  # equal rows in every band
    assert len(set(band_keys(same, 14, 8)[0].tolist())) == 14
    with pytest.raises(ValueError, match=r"shape \(N, 112\)"):
        band_keys(sig[:, :100], 14, 8)


def test_empty_texts_get_sentinel_and_never_pair(hasher):
    sigs = hasher.signatures(["", "real words in a real document of decent length", " !!! ", ""])
    assert np.all(sigs[[0, 2, 3]] == SENTINEL) and not np.all(sigs[1] == SENTINEL)
    keys = band_keys(sigs, CFG.bands, CFG.rows)
    assert np.all(keys[[0, 2, 3]] == EMPTY_BAND_KEY) and np.all(keys[1] != EMPTY_BAND_KEY)
    orders = np.arange(4, dtype=np.int64)
    for band in range(CFG.bands):
        assert bucket_pairs(keys[:, band], orders).shape == (0, 2)


def test_bucket_pairs_star_to_min_order():
    keys = np.array([7, 7, 9, 7, 9, 11, 0, 0], dtype=np.uint64)  # 0 = EMPTY_BAND_KEY
    orders = np.array([5, 2, 8, 9, 1, 3, 4, 6], dtype=np.int64)
    assert bucket_pairs(keys, orders).tolist() == [[2, 5], [2, 9], [1, 8]]
    assert bucket_pairs(keys[:1], orders[:1]).shape == (0, 2)
    # the same document listed twice does not pair with itself
    assert bucket_pairs(np.array([4, 4, 4], np.uint64), np.array([3, 3, 1])).tolist() == [[1, 3], [1, 3]]


def _random_words(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), size=n)]


def _planted_pairs(hasher: MinHasher, rng: np.random.Generator, vocab: list[str], n_pairs: int,
                   lo: float, hi: float, subs: tuple[int, int]) -> tuple[list[str], list[str], np.ndarray]:
    """Pairs made by substituting random words; kept when their measured Jaccard is in [lo, hi]."""
    left, right, js = [], [], []
    while len(js) < n_pairs:
        length = int(rng.integers(150, 300))
        w = _random_words(rng, vocab, length)
        v = list(w)
        k = int(rng.integers(subs[0], subs[1] + 1))
        for p in rng.choice(length, size=min(k, length), replace=False):
            v[p] = vocab[int(rng.integers(len(vocab)))]
        a, b = " ".join(w), " ".join(v)
        j = jaccard(hasher.shingles(a), hasher.shingles(b))
        if lo <= j <= hi:
            left.append(a)
            right.append(b)
            js.append(j)
    return left, right, np.array(js)


def _candidate(hasher: MinHasher, left: list[str], right: list[str]) -> np.ndarray:
    """Whether each (left[i], right[i]) shares at least one band (via bucket_pairs per band)."""
    n = len(left)
    keys = band_keys(hasher.signatures(left + right), CFG.bands, CFG.rows)
    orders = np.arange(2 * n, dtype=np.int64)
    found = np.zeros(n, dtype=bool)
    for band in range(CFG.bands):
        p = bucket_pairs(keys[:, band], orders)
        same = (p[:, 0] < n) & (p[:, 1] == p[:, 0] + n)
        found[p[same, 0]] = True
    return found


@pytest.mark.parametrize("family", ["mersenne", "multiply_shift", "rensa"])
def test_lsh_recall_and_false_merges_on_planted_pairs(family):
    if family == "rensa":
        pytest.importorskip("rensa")
    hasher = MinHasher(MinHashConfig(hash_family=family))
    rng = np.random.default_rng(2024)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(3, 9))))
             for _ in range(20000)]
    # near-duplicates: 1..5 substituted words in 150..300 -> J in [0.8, 0.97]
    hl, hr, hj = _planted_pairs(hasher, rng, vocab, 300, 0.8, 1.0, (1, 5))
    # distant: 10..60% of words substituted, kept when J <= 0.3
    ll, lr, lj = _planted_pairs(hasher, rng, vocab, 300, 0.0, 0.3, (30, 90))
    assert hj.min() >= 0.8 and lj.max() <= 0.3

    hit = _candidate(hasher, hl, hr)
    recall = hit.mean()
    expected = lsh_probability(hj, CFG.bands, CFG.rows).mean()  # 1 - (1 - s^r)^b per pair
    sigma = math.sqrt(expected * (1 - expected) / hj.size)
    assert recall >= 0.98, f"recall {recall:.3f} (theory {expected:.3f}) over J={hj.min():.2f}..{hj.max():.2f}"
    assert abs(recall - expected) <= 4 * sigma + 1e-9, (recall, expected)

    false = _candidate(hasher, ll, lr)
    expected_false = lsh_probability(lj, CFG.bands, CFG.rows).sum()
    assert expected_false < 0.1  # theory: ~0 expected false candidates among 300 pairs at J <= 0.3
    assert false.sum() == 0


@pytest.mark.parametrize("family", ["mersenne", "multiply_shift", "rensa"])
def test_mid_similarity_candidates_follow_theory_and_verify_blocks_them(family):
    if family == "rensa":
        pytest.importorskip("rensa")
    hasher = MinHasher(MinHashConfig(hash_family=family))
    """At 0.4 <= J < 0.5, 14x8 LSH still proposes ~2% of pairs; verification at J >= 0.5 rejects them."""
    rng = np.random.default_rng(7)
    vocab = [f"w{i}x" for i in range(20000)]
    ml, mr, mj = _planted_pairs(hasher, rng, vocab, 400, 0.4, 0.499, (12, 30))
    hit = _candidate(hasher, ml, mr)
    assert hit.sum() >= 3  # the seed plants some candidates for verification to reject
    expected = lsh_probability(mj, CFG.bands, CFG.rows).mean()
    sigma = math.sqrt(expected * (1 - expected) / mj.size)
    assert abs(hit.mean() - expected) <= 4 * sigma, (hit.mean(), expected)

    n = len(ml)
    texts = ml + mr
    shingles = [hasher.shingles(t) for t in texts]
    pairs = np.array([[i, i + n] for i in np.flatnonzero(hit)], dtype=np.int64).reshape(-1, 2)
    assert clusters(pairs, verify=lambda a, b: jaccard(shingles[a], shingles[b]) >= 0.5) == {}
    assert len(clusters(pairs)) == len(pairs)


def test_cjk_near_duplicates_found_with_character_shingles(hasher):
    rng = np.random.default_rng(11)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    left, right, js = [], [], []
    for _ in range(60):
        chars = [han[i] for i in rng.integers(0, len(han), size=400)]
        edited = list(chars)
        for p in rng.choice(400, size=3, replace=False):
            edited[p] = han[int(rng.integers(len(han)))]
        a, b = "".join(chars), "".join(edited)
        left.append(a)
        right.append(b)
        js.append(jaccard(hasher.shingles(a), hasher.shingles(b)))
    js = np.array(js)
    assert hasher.ngram_for(left[0]) == CFG.cjk_ngram
    assert js.min() >= 0.9  # 3 edits in 400 characters kill <= 15 of 396 character 5-grams
    assert _candidate(hasher, left, right).all()
    # a whitespace tokenizer would see each text as one word; ours sees ~400 shingles
    assert hasher.shingles(left[0]).size >= 390


def test_signatures_deterministic_across_processes(hasher):
    texts = ["Deterministic minhash across processes, seeds and machines. " * 5,
             "中文文本的签名在不同进程中必须一致。" * 4]
    code = ("import json,sys; from smelt.config import MinHashConfig; "
            "from smelt.data.dedup.minhash import MinHasher; m = MinHasher(MinHashConfig()); "
            "t = json.loads(sys.stdin.read()); print(json.dumps([m.signatures(t).tolist(), m.params_digest]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True,
                         text=True, env=env, check=True, timeout=60)
    sigs, digest = json.loads(res.stdout)
    assert sigs == hasher.signatures(texts).tolist()
    assert digest == hasher.params_digest
    assert MinHasher(MinHashConfig(seed=2)).params_digest != hasher.params_digest


def test_long_document_spanning_many_blocks(hasher):
    """A document larger than one permutation block gives the same signature batched or alone."""
    rng = np.random.default_rng(5)
    words = [f"tok{i}" for i in rng.integers(0, 50000, size=5000)]
    big = " ".join(words)
    small = " ".join(words[:40])
    sigs = hasher.signatures([small, big, "", small])
    assert np.array_equal(sigs[1], hasher.signature(big))
    assert np.array_equal(sigs[0], sigs[3]) and np.all(sigs[2] == SENTINEL)
    assert estimate_jaccard(sigs[0], sigs[1]) < 0.1


# ---------------------------------------------------------------------------- clusters


def test_union_find_root_is_smallest_order():
    uf = UnionFind()
    assert uf.union(10, 20) == 10
    assert uf.union(30, 20) == 10
    assert uf.union(5, 30) == 5
    assert uf.find(20) == 5 and uf.find(99) == 99
    assert uf.mapping() == {10: 5, 20: 5, 30: 5}


def test_clusters_map_duplicates_to_smallest_order():
    pairs = np.array([[5, 9], [9, 3], [7, 8], [8, 7], [4, 4]], dtype=np.int64)
    assert clusters(pairs) == {5: 3, 9: 3, 8: 7}
    assert clusters(np.empty((0, 2), np.int64)) == {}


def test_connected_components_match_union_find_on_random_graphs():
    rng = np.random.default_rng(9)
    for n_nodes, n_edges in [(50, 30), (1000, 900), (5000, 8000)]:
        ids = rng.choice(10**12, size=n_nodes, replace=False).astype(np.int64)
        pairs = ids[rng.integers(0, n_nodes, size=(n_edges, 2))]
        uf = UnionFind()
        for a, b in pairs.tolist():
            uf.union(a, b)
        expected = uf.mapping()
        assert clusters(pairs) == expected
        assert clusters(pairs, verify=lambda a, b: True) == expected
        nodes, roots = connected_components(pairs)
        assert np.all(roots <= nodes)


def _star_contraction(pairs: np.ndarray, parts: int) -> tuple[np.ndarray, int]:
    """Large-star / small-star steps over `parts` node partitions, as the components tasks run
    them, until both change nothing; returns the final (node, root) edges and the rounds."""
    recs = np.concatenate([pairs, pairs[:, ::-1]])
    for rounds in range(1, 200):
        changed = 0
        for step in (large_star, small_star):
            q = node_partition(recs[:, 0], parts)
            outs = []
            for p in range(parts):
                out, c = step(recs[q == p])
                outs.append(out)
                changed += c
            edges = np.concatenate(outs)
            recs = edges if step is large_star else np.concatenate([edges, edges[:, ::-1]])
        if not changed:
            return np.unique(edges, axis=0), rounds
    raise AssertionError("no convergence")


def test_star_contraction_over_partitions_matches_connected_components():
    rng = np.random.default_rng(11)
    for _ in range(150):
        n, m = int(rng.integers(2, 300)), int(rng.integers(1, 400))
        pairs = rng.integers(0, n, size=(m, 2)) * 7 + 3  # sparse orders, self-loops and repeats included
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        if not len(pairs):
            continue
        edges, _ = _star_contraction(pairs, int(rng.integers(1, 6)))
        nodes, roots = connected_components(pairs)
        dup = nodes != roots
        assert np.array_equal(edges[:, 0], nodes[dup]) and np.array_equal(edges[:, 1], roots[dup])
    # a long path in shuffled labels: the slowest shape for star contraction
    labels = rng.permutation(2001)
    path = np.stack([labels[:-1], labels[1:]], axis=1)
    edges, rounds = _star_contraction(path, 4)
    assert np.array_equal(edges[:, 0], np.setdiff1d(labels, [0])) and (edges[:, 1] == 0).all()
    assert rounds < 40
    assert large_star(np.zeros((0, 2), np.int64))[0].shape == (0, 2) == small_star(np.zeros((0, 2), np.int64))[0].shape


def test_verify_blocks_pair_and_runs_once_per_distinct_pair():
    calls = []

    def verify(a: int, b: int) -> bool:
        calls.append((a, b))
        return (a, b) != (3, 4)

    pairs = np.array([[2, 1], [3, 4], [1, 2], [2, 6], [1, 6]], dtype=np.int64)
    assert clusters(pairs, verify=verify) == {2: 1, 6: 1}
    # sorted distinct pairs; (2, 6) is skipped: already joined through (1, 2) and (1, 6)
    assert calls == [(1, 2), (1, 6), (3, 4)]


def test_jaccard_and_lsh_probability():
    a = np.array([1, 2, 3, 4], dtype=np.uint64)
    b = np.array([3, 4, 5], dtype=np.uint64)
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, a) == 1.0
    assert jaccard(np.empty(0, np.uint64), np.empty(0, np.uint64)) == 0.0
    assert float(lsh_probability(0.8, 14, 8)) == pytest.approx(0.92355, abs=1e-5)
    assert float(lsh_probability(0.3, 14, 8)) == pytest.approx(9.18e-4, rel=1e-2)


# ------------------------------------------------------------------------------- lines

BOILER = "Subscribe to our newsletter for weekly updates"
FOOTER = "Copyright 2024 Example Media Group. All rights reserved."


def test_line_units_hash_normalized_lines_and_skip_short_ones():
    text = f"  {BOILER}  \nHome\n\n{FOOTER.replace(' ', '   ')}\r"
    u = units(text, "lines", min_chars=20)
    assert [text[s:e] for s, e, _ in u] == [f"  {BOILER}  ", f"{FOOTER.replace(' ', '   ')}\r"]
    assert u[0][2] == xxhash.xxh3_64_intdigest(BOILER.encode())
    assert u[1][2] == units(FOOTER, "lines", 20)[0][2]
    assert units("Home\nNext", "lines", 20) == []
    with pytest.raises(ValueError, match="mode"):
        units("x", "words", 1)  # type: ignore[arg-type]


def test_repeated_boilerplate_lines_removed_across_docs():
    docs = [
        f"First story about the harbour and its ships.\n{BOILER}\nMore about the harbour.\n\n{FOOTER}",
        f"{BOILER}\nSecond story: a bakery opened on Main Street.\n\n{FOOTER}\n",
        f"Third story, on the weather this weekend.\n{BOILER}\n\n{FOOTER}",
    ]
    per_doc = [units(d, "lines", 20) for d in docs]
    rows = [(h, order) for order, u in enumerate(per_doc) for h in sorted({h for _, _, h in u})]
    hashes = np.array([h for h, _ in rows], dtype=np.uint64)
    orders = np.array([o for _, o in rows], dtype=np.int64)

    mask = removal_mask(hashes, orders, max_repeats=1, keep_first=True)
    remove = {o: set(hashes[mask & (orders == o)].tolist()) for o in range(3)}
    assert remove[0] == set()
    assert remove[1] == remove[2] == {xxhash.xxh3_64_intdigest(BOILER.encode()),
                                      xxhash.xxh3_64_intdigest(FOOTER.encode())}
    out = [remove_spans(d, spans_to_remove(u, remove[o])) for o, (d, u) in enumerate(zip(docs, per_doc, strict=True))]
    assert out[0] == docs[0]
    assert out[1] == "Second story: a bakery opened on Main Street.\n"
    assert out[2] == "Third story, on the weather this weekend."

    mask_all = removal_mask(hashes, orders, max_repeats=1, keep_first=False)
    arr = hashes[mask_all & (orders == 0)]
    assert remove_spans(docs[0], spans_to_remove(per_doc[0], arr)) == \
        "First story about the harbour and its ships.\nMore about the harbour."
    assert not removal_mask(hashes, orders, max_repeats=3).any()  # 3 documents is not > 3


def test_removal_mask_counts_distinct_documents():
    hashes = np.array([9, 9, 9, 8, 9], dtype=np.uint64)  # hash 9 twice in document 4
    orders = np.array([4, 4, 7, 4, 2], dtype=np.int64)
    assert removal_mask(hashes, orders, max_repeats=2).tolist() == [True, True, True, False, False]
    assert not removal_mask(hashes, orders, max_repeats=3).any()  # 9 is in 3 documents: not > 3
    assert removal_mask(hashes, orders, max_repeats=2, keep_first=False).tolist() == [True, True, True, False, True]


def test_sentence_split_is_cjk_aware():
    text = "他说：“你好。”然后走了！这是第三句？Yes. Pi is 3.14 here! See example.com now.\nA heading\n  last one.  "
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "他说：“你好。”", "然后走了！", "这是第三句？", "Yes.", "Pi is 3.14 here!", "See example.com now.",
        "A heading", "last one."]


def test_sentence_units_find_repeated_three_sentence_spans():
    boiler = "本站所有文章均来自网络。如有侵权请联系删除。感谢您的支持与理解！"
    a = f"今天我们讨论长江的历史。长江是中国最长的河流。{boiler}它流经多个省份。"
    b = f"黄河是中华文明的摇篮。{boiler}\n黄河的泥沙含量很高。"
    ua, ub = units(a, "sentences", 10), units(b, "sentences", 10)
    assert len(ua) == 4 and len(ub) == 3  # 6 and 5 sentences -> windows of 3
    common = {h for _, _, h in ua} & {h for _, _, h in ub}
    assert len(common) == 1
    assert remove_spans(b, spans_to_remove(ub, common)) == "黄河是中华文明的摇篮。\n黄河的泥沙含量很高。"
    assert (remove_spans(a, spans_to_remove(ua, common))
            == "今天我们讨论长江的历史。长江是中国最长的河流。它流经多个省份。")
    assert units("Only one. And two.", "sentences", 1) == []
    en = "Cookies help us. By using the site you agree. Read our policy. The match ended 2-1."
    ue = units(en, "sentences", 10)
    assert [en[s:e] for s, e, _ in ue] == [
        "Cookies help us. By using the site you agree. Read our policy.",
        "By using the site you agree. Read our policy. The match ended 2-1."]
    assert remove_spans(en, [ue[0][:2]]) == "The match ended 2-1."


@pytest.mark.parametrize(("text", "spans", "expected"), [
    ("A\nB\nC", [(2, 3)], "A\nC"),
    ("A\n\nB\n\nC", [(3, 4)], "A\n\nC"),
    ("A. B. C.", [(3, 5)], "A. C."),
    ("A. B. C.", [(6, 8)], "A. B."),
    ("A. B.\nC", [(3, 5)], "A.\nC"),
    ("A\nB\n", [(2, 3)], "A\n"),
    ("X\nA\nB", [(0, 1), (2, 3)], "B"),
    ("X\n\nY\n\nZ", [(0, 1)], "Y\n\nZ"),
    ("X\n\nY\n\nZ", [(6, 7)], "X\n\nY"),
    ("keep\nabcdef\nkeep", [(5, 8), (7, 11)], "keep\nkeep"),  # overlapping spans merge
    ("  indented\nx", [(11, 12)], "  indented"),
    ("untouched  \n\n\n text", [], "untouched  \n\n\n text"),
])
def test_remove_spans_tidies(text, spans, expected):
    assert remove_spans(text, spans) == expected


# -------------------------------------------------------------------------- real text


def _near_dup_end_to_end(hasher: MinHasher, texts: list[str]) -> dict[int, int]:
    """signatures -> band keys -> per-band bucket pairs -> clusters, as the executor stages do."""
    keys = band_keys(hasher.signatures(texts), CFG.bands, CFG.rows)
    orders = np.arange(len(texts), dtype=np.int64)
    pairs = np.concatenate([bucket_pairs(keys[:, b], orders) for b in range(CFG.bands)])
    return clusters(pairs)


def test_cmrc_passages_and_their_edited_copies(shared_data, hasher):
    """Real Chinese Wikipedia passages: edited copies join their original, originals stay apart."""
    data = json.loads((shared_data / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))
    originals = [p["context"] for a in data["data"] for p in a["paragraphs"]][:300]
    rng = np.random.default_rng(1)
    copies = []
    for t in originals:  # 1% of characters replaced by another character of the same passage
        chars = list(t)
        for p in rng.choice(len(chars), size=max(1, len(chars) // 100), replace=False):
            chars[p] = chars[int(rng.integers(len(chars)))]
        copies.append("".join(chars))
    n = len(originals)
    js = np.array([jaccard(hasher.shingles(a), hasher.shingles(b)) for a, b in zip(originals, copies, strict=True)])
    dup = _near_dup_end_to_end(hasher, originals + copies)
    near = js >= 0.8
    assert near.mean() > 0.9
    found = np.array([dup.get(i + n) == i for i in range(n)])
    assert found[near].mean() >= 0.98, (found[near].mean(), lsh_probability(js[near], CFG.bands, CFG.rows).mean())
    # no two originals merged unless they really are near-duplicates
    for o in (o for o in dup if o < n):
        assert jaccard(hasher.shingles(originals[o]), hasher.shingles(originals[dup[o]])) >= 0.5
