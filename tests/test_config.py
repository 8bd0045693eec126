from __future__ import annotations

from pathlib import Path

import pytest

from smelt.config import RecipeError, apply_override, config_hash, load_recipe, parse_recipe, read_recipe_tree

BASE = {"name": "t", "data": {"inputs": [{"path": "x.jsonl", "domain": "web"}]}}


def test_defaults_follow_published_values():
    r = parse_recipe(BASE)
    mh = r.data.dedup.minhash
    assert (mh.ngram, mh.bands, mh.rows) == (5, 14, 8)  # FineWeb
    g = r.data.heuristics.gopher_quality
    assert (g.min_doc_words, g.max_doc_words, g.max_symbol_word_ratio) == (50, 100_000, 0.1)
    assert r.data.decontam.ngram == 13
    assert r.run_dir == Path("runs/t")


def test_unknown_key_names_path_and_allowed_keys():
    bad = {"name": "t", "data": {"inputs": [{"path": "x", "domain": "web"}], "heuristics": {"gopher": {}}}}
    with pytest.raises(RecipeError) as e:
        parse_recipe(bad)
    msg = str(e.value)
    assert "data.heuristics.gopher" in msg
    assert "gopher_quality" in msg and "fineweb" in msg  # the allowed keys


def test_wrong_type_and_bad_value():
    with pytest.raises(RecipeError, match=r"data\.workers"):
        parse_recipe(BASE, ["data.workers=many"])
    with pytest.raises(RecipeError, match=r"data\.normalize\.form.*'NFC', 'NFKC' or 'none'"):
        parse_recipe(BASE, ["data.normalize.form=NFD"])
    with pytest.raises(RecipeError, match=r"data\.inputs\.0\.domain: required"):
        parse_recipe({"data": {"inputs": [{"path": "x"}]}})


def test_overrides_parse_yaml_values_and_list_indices():
    r = parse_recipe(BASE, ["data.workers=3", "data.inputs.0.domain=wiki", "data.language.allowed=[en, zh, fr]",
                            "data.dedup.minhash.verify_jaccard=0.5", "data.pii.enabled=false"])
    assert r.data.workers == 3
    assert r.data.inputs[0].domain == "wiki"
    assert r.data.language.allowed == ["en", "zh", "fr"]
    assert r.data.dedup.minhash.verify_jaccard == 0.5
    assert r.data.pii.enabled is False


def test_override_errors():
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        parse_recipe(BASE, ["data.workers"])
    with pytest.raises(RecipeError, match="list index"):
        parse_recipe(BASE, ["data.inputs.5.domain=x"])
    tree: dict = {}
    apply_override(tree, "a.b.c=1")
    assert tree == {"a": {"b": {"c": 1}}}


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("name: 'has space'\n")
    with pytest.raises(RecipeError, match="name"):
        load_recipe(p)
    # safe_load: python tags are refused, not executed
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError):
        load_recipe(p)


def test_yaml_errors_name_the_file_and_refuse_duplicate_keys(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: t\ntrain:\n  max_steps: 3\n  lr_unused: 1\n  max_steps: 4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f'in "{p}", line 5' in msg and "duplicate key 'max_steps'" in msg and "line 3" in msg
    assert "<unicode string>" not in msg
    p.write_text("name: t\ntrain: [unclosed\n")
    with pytest.raises(RecipeError, match=f'in "{p}", line'):
        load_recipe(p)
    # a duplicate at the top level, and inside a list item
    p.write_text("name: a\nname: b\n")
    with pytest.raises(RecipeError, match="duplicate key 'name'"):
        load_recipe(p)
    p.write_text("data:\n  inputs:\n    - {path: x, domain: a, domain: b}\n")
    with pytest.raises(RecipeError, match="duplicate key 'domain'"):
        load_recipe(p)
    # a merge key is not a duplicate: keys given beside it override the merged ones (YAML 1.1)
    p.write_text("x-base: &b {path: x, domain: web}\ninputs:\n  - <<: *b\n    domain: wiki\n")
    assert read_recipe_tree(p)["inputs"] == [{"path": "x", "domain": "wiki"}]
    # --set values go through the same loader
    with pytest.raises(RecipeError, match="duplicate key"):
        parse_recipe(BASE, ["data.dedup={exact: {}, exact: {}}"])


def test_global_batch_must_be_whole_micro_batches():
    with pytest.raises(RecipeError) as e:
        parse_recipe(BASE, ["train.batch.global_batch=4", "train.batch.micro_batch=8"])
    assert "train.batch.global_batch (4) must be a multiple of train.batch.micro_batch (8)" in str(e.value)
    with pytest.raises(RecipeError, match=r"train\.batch\.global_batch \(12\).*micro_batch \(8\)"):
        parse_recipe(BASE, ["train.batch.global_batch=12"])  # the default micro batch
    assert parse_recipe(BASE, ["train.batch.global_batch=16", "train.batch.micro_batch=4"]).train.batch.micro_batch == 4
    # micro_batch unset: 8, or global_batch when smaller
    assert parse_recipe(BASE, ["train.batch.global_batch=4"]).train.batch.micro_batch == 4
    assert parse_recipe(BASE, ["train.batch.global_batch=32"]).train.batch.micro_batch == 8


def test_runs_dir_urls(tmp_path, monkeypatch):
    """A runs_dir URL names its filesystem's missing package, or an unknown protocol, at parse time;
    a known one gives a run URL and a local stage under $SMELT_STAGE_DIR."""
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(RecipeError, match=r"runs_dir: s3://bucket/runs: the s3:// filesystem needs its fsspec "
                                              r"package, which is not installed \(Install s3fs"):
            parse_recipe(BASE, ["runs_dir=s3://bucket/runs"])
    with pytest.raises(RecipeError, match=r"unknown filesystem protocol nope://"):
        parse_recipe(BASE, ["runs_dir=nope://b/r"])
    monkeypatch.setenv("SMELT_STAGE_DIR", str(tmp_path))
    r = parse_recipe(BASE, ["runs_dir=memory://bucket/runs/", "name=x"])
    assert r.run_url == "memory://bucket/runs/x"
    assert r.run_dir.name == "x" and r.run_dir.parent.parent == tmp_path
    assert parse_recipe(BASE, ["runs_dir=/tmp/my runs:2"]).runs_dir == "/tmp/my runs:2"
    assert parse_recipe(BASE, ["runs_dir=/tmp/my runs:2"]).run_url is None


def test_ul2_needs_sentinels_in_the_tokenizer():
    ul2 = ["loader.objective.kind=ul2"]
    for n in (0, 3):
        with pytest.raises(RecipeError) as e:
            parse_recipe(BASE, ul2 + [f"tokenizer.num_sentinels={n}"])
        assert "loader.objective.kind: ul2 needs tokenizer.num_sentinels >= 4" in str(e.value)
        assert f"the recipe has {n}" in str(e.value)
    assert parse_recipe(BASE, ul2 + ["tokenizer.num_sentinels=4"]).loader.objective.kind == "ul2"
    assert parse_recipe(BASE, ul2).tokenizer is None  # no tokenizer section: its default 32 sentinels
    no_modes = ul2 + ["loader.objective.ul2_mode_tokens=false", "tokenizer.num_sentinels=0"]
    with pytest.raises(RecipeError, match="num_sentinels >= 1"):
        parse_recipe(BASE, no_modes)
    assert parse_recipe(BASE, no_modes + ["loader.objective.ul2_mix={S: 1}"])  # prefix only: no spans
    # what the check prevents: the objective refusing the tokenizer's special ids at train time
    from smelt.tokens.objectives import UL2, SpecialIds

    for n, mode_tokens in ((3, True), (0, False)):
        with pytest.raises(ValueError):
            UL2(SpecialIds.conventions(n), {"R": 1.0}, mode_tokens=mode_tokens)
    UL2(SpecialIds.conventions(4), {"R": 1.0}, mode_tokens=True)


def test_config_hash_is_stable_and_sensitive():
    a = parse_recipe(BASE).data
    b = parse_recipe(BASE).data
    c = parse_recipe(BASE, ["data.dedup.minhash.bands=20"]).data
    assert config_hash(a) == config_hash(b) != config_hash(c)
