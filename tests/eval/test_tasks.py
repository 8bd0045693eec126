"""Multiple choice: the preferred choice wins, acc vs acc_norm, few-shot prompts, malformed files
name file and line, and the loaders on the real benchmark files in ../shared/data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from smelt.config import EvalConfig
from smelt.eval.runner import flat_scalars, format_markdown
from smelt.eval.tasks import (
    BenchmarkFormatError,
    FewshotPool,
    MCItem,
    build_context,
    evaluate_task,
    fewshot_pool,
    load_items,
    score_items,
)

from .util import CharTokenizer, Fixed, Uniform, merging_bpe

TOK = CharTokenizer()


def _items(*specs: tuple[str, list[str], int]) -> list[MCItem]:
    return [MCItem(c, tuple(ch), g, f"mem:{i + 1}") for i, (c, ch, g) in enumerate(specs)]


def _score(model, items, delimiter=" ") -> dict:
    return score_items(model, TOK, items, [it.context for it in items], prefix_id=2, max_len=64, batch_size=3,
                       delimiter=delimiter)


def test_model_biased_toward_a_token_picks_the_choice_made_of_it() -> None:
    logits = torch.zeros(TOK.vocab)
    z = TOK.encode("z").ids[0]
    logits[z] = 8.0
    items = _items(("Q1", ["ab", "zz", "cd"], 1), ("Q2", ["zzz", "xyz", "abc"], 0), ("Q3", ["qq", "rr", "zq"], 2))
    r = _score(Fixed(logits), items)
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0
    assert r["random"] == pytest.approx(1 / 3) and r["n"] == 3
    wrong = _items(("Q", ["zz", "ab"], 1))
    assert _score(Fixed(logits), wrong)["acc"] == 0.0


def test_acc_norm_differs_from_acc_where_lengths_differ() -> None:
    """Uniform model: ll = -(len + 1) ln V (the delimiter is scored too), so acc picks the shortest
    choice while ll / len(choice) favours the longest (lm-eval normalises by characters)."""
    items = _items(("ctx", ["a", "abcdef", "abc"], 1), ("ctx", ["abcd", "ab"], 1))
    r = _score(Uniform(TOK.vocab), items)
    assert r["acc"] == 0.5  # item 1: picks "a" (wrong); item 2: picks "ab" (right)
    assert r["acc_norm"] == 0.5  # item 1: "abcdef" (right); item 2: "abcd" (wrong)
    only_long = _items(("c", ["x", "xxxxxxxx"], 1))
    r = _score(Uniform(TOK.vocab), only_long)
    assert (r["acc"], r["acc_norm"]) == (0.0, 1.0)
    assert r["random"] == 0.5


def test_mixed_choice_counts_random_baseline() -> None:
    items = _items(("c", ["a", "b"], 0), ("c", ["a", "b", "c", "d"], 0))
    assert _score(Uniform(TOK.vocab), items)["random"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_items_that_cannot_be_scored_are_counted_not_fatal() -> None:
    """A choice that merges into the context is scored (encoded alone); an item with an empty
    choice is left out of acc and counted, by file:line, in the result and in results.md."""
    tok = merging_bpe()
    V = tok.get_vocab_size()
    items = _items(("万里长城位于", ["中国", "北方"], 0), ("x", ["", "a"], 1),
                   ("长城位于", ["北方", "中国"], 0))
    r = score_items(Uniform(V), tok, items, [it.context for it in items], prefix_id=1, max_len=64, delimiter="")
    assert r["n"] == 2 and r["skipped"] == 1 and r["random"] == 0.5
    assert r["unscored"] == [{"item": "mem:2", "reason": "continuation '' encodes to no tokens"}]
    assert r["alone"] == 2  # "万里长城位于中国" and "长城位于北方" are one token each
    none = score_items(Uniform(V), tok, items[1:2], ["x"], prefix_id=1, max_len=64, delimiter="")
    assert (none["n"], none["skipped"], none["acc"], none["acc_norm"]) == (0, 1, None, None)
    results = {"checkpoint": "c", "step": 1, "perplexity": {}, "probes": [],
               "tasks": {"toy": {**r, "shots": 0}, "empty": {**none, "shots": 0}}}
    assert set(flat_scalars(results)) == {"eval/task/toy/acc", "eval/task/toy/acc_norm"}
    md = format_markdown(results)
    assert "| toy | 0 | 2 |" in md and "| empty | 0 | 0 | – | – | – | 1 |" in md
    assert "## Not scored" in md and "| task toy | mem:2 | continuation '' encodes to no tokens |" in md


def test_fewshot_prompts_are_seeded_and_never_include_the_item() -> None:
    items = _items(*[(f"question {i}", [f"wrong {i}", f"right {i}"], 1) for i in range(10)])
    for i in range(10):
        ctx = build_context(items, i, 3, FewshotPool(), random.Random(f"1:t:{i}"))
        parts = ctx.split("\n\n")
        assert len(parts) == 4 and parts[-1] == f"question {i}"
        assert all(p.endswith(f"right {p.split()[1]}") and p.split()[1] != str(i) for p in parts[:3])
        assert ctx == build_context(items, i, 3, FewshotPool(), random.Random(f"1:t:{i}"))
    assert build_context(items, 0, 0, FewshotPool(), random.Random(0)) == "question 0"
    pool = FewshotPool(items=_items(("d1", ["x", "y"], 0), ("d2", ["x", "y"], 1)), first_n=True)
    assert build_context(items, 4, 1, pool, random.Random(0), delimiter="") == "d1x\n\nquestion 4"


# --------------------------------------------------------------------------------------------
# malformed files name the file and the line


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bench.jsonl"
    good = json.dumps({"context": "c", "choices": ["a", "b"], "gold": 0})
    p.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{p}:4: not valid JSON"):
        load_items(p, "jsonl")
    p.write_text(good + "\n" + json.dumps({"context": "c", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{p}:2: 'gold' must be an integer index"):
        load_items(p, "jsonl")
    p.write_text(json.dumps({"context": "c", "choices": "ab", "gold": 0}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{p}:1: 'choices'"):
        load_items(p, "jsonl")


def test_malformed_hellaswag_piqa_arc_ceval_name_file_and_line(tmp_path: Path) -> None:
    h = tmp_path / "hs.txt"
    h.write_text("ctx one\n2\na\nb\nc\nd\nctx two\nx\na\nb\nc\nd\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{h}:8: expected the gold label"):
        load_items(h, "hellaswag")
    h.write_text("ctx one\n2\na\nb\nc\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{h}:5: .*not a multiple of 6"):
        load_items(h, "hellaswag")

    p = tmp_path / "valid.jsonl"
    p.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n"
                 + json.dumps({"goal": "g", "sol1": "a"}) + "\n")
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{p}:2: missing or non-string field 'sol2'"):
        load_items(p, "piqa")
    p.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    (tmp_path / "valid-labels.lst").write_text("2\n")
    with pytest.raises(BenchmarkFormatError, match=r"valid-labels.lst:1: expected 0 or 1"):
        load_items(p, "piqa")

    a = tmp_path / "ARC-Easy-Test.jsonl"
    q = {"question": {"stem": "s", "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}}
    a.write_text(json.dumps({**q, "answerKey": "A"}) + "\n" + json.dumps({**q, "answerKey": "E"}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=rf"{a}:2: answerKey 'E'"):
        load_items(a, "arc")

    c = tmp_path / "val" / "law_val.csv"
    c.parent.mkdir()
    c.write_text('id,question,A,B,C,D,answer\n0,"multi\nline",1,2,3,4,B\n1,q,1,2,3,4,E\n', encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=rf"{c}:4: answer must be one of A-D"):
        load_items(c, "ceval")
    c.write_text("id,question,A,B,answer\n0,q,1,2,A\n", encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=rf"{c}:1: header lacks"):
        load_items(c, "ceval")
    with pytest.raises(BenchmarkFormatError, match="not found"):
        load_items(tmp_path / "nope.jsonl", "jsonl")


def test_evaluate_task_end_to_end_on_generic_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "mine.jsonl"
    rows = [{"context": f"c{i}", "choices": ["ab", "zz"], "gold": 1, "id": i} for i in range(6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logits = torch.zeros(TOK.vocab)
    logits[TOK.encode("z").ids[0]] = 6.0
    task = EvalConfig.Task(name="mine", path=str(p), format="jsonl", shots=2, limit=4)
    r = evaluate_task(Fixed(logits), TOK, task, seed=3, prefix_id=2, max_len=128, batch_size=4)
    assert (r["acc"], r["acc_norm"], r["n"], r["shots"], r["random"]) == (1.0, 1.0, 4, 2, 0.5)


# --------------------------------------------------------------------------------------------
# the real files (skipped without ../shared/data)


def test_loaders_on_shared_benchmarks(shared_data: Path) -> None:
    hs = load_items(shared_data / "hellaswag" / "hellaswag_val_full.txt.bz2", "hellaswag")
    assert len(hs) == 10042 and all(len(it.choices) == 4 for it in hs)
    assert hs[0].context.startswith("Roof shingle removal: A man is sitting on a roof.") and hs[0].gold == 3
    pq = load_items(shared_data / "piqa" / "valid.jsonl", "piqa")
    assert len(pq) == 1838 and pq[0].context.startswith("Question: How do I ready a guinea pig cage")
    assert pq[0].context.endswith("\nAnswer:") and {it.gold for it in pq} == {0, 1}
    arc = load_items(shared_data / "arc_easy" / "ARC-Easy-Test.jsonl", "arc")
    assert len(arc) == 2376 and {len(it.choices) for it in arc} <= {3, 4, 5}
    ce = load_items(shared_data / "ceval" / "val", "ceval")
    assert len(ce) == 1346  # C-Eval's published val size (52 subjects)
    assert ce[0].choices == ("A", "B", "C", "D") and ce[0].context.endswith("\n答案：")
    # few-shot sources: ARC's Train file, C-Eval's dev rows of the same subject (first n)
    pool = fewshot_pool(shared_data / "arc_easy" / "ARC-Easy-Test.jsonl", "arc")
    assert pool.items is not None and len(pool.items) == 2251
    cpool = fewshot_pool(shared_data / "ceval" / "val", "ceval")
    assert cpool.by_group is not None and len(cpool.by_group) == 52 and cpool.first_n
    ctx = build_context(ce, 0, 2, cpool, random.Random(0))
    dev = cpool.by_group[ce[0].group]
    assert ctx.startswith(dev[0].context + " " + dev[0].choices[dev[0].gold] + "\n\n" + dev[1].context)
    assert ctx.endswith(ce[0].context)
