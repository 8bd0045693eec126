from __future__ import annotations

from pathlib import Path

import pytest

from smelt.config import RecipeError, apply_override, config_hash, load_recipe, parse_recipe

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


def test_config_hash_is_stable_and_sensitive():
    a = parse_recipe(BASE).data
    b = parse_recipe(BASE).data
    c = parse_recipe(BASE, ["data.dedup.minhash.bands=20"]).data
    assert config_hash(a) == config_hash(b) != config_hash(c)
