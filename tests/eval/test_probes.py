"""Probes: file formats and errors, log-probability and rank on a model with known probabilities,
paired comparisons, and the across-checkpoint table and plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from smelt.eval.probes import Probe, ProbeFormatError, load_probe_files, load_probes, run_probes, write_history
from smelt.eval.runner import flat_scalars, format_markdown

from .util import CharTokenizer, Fixed, Uniform, merging_bpe

TOK = CharTokenizer()


def test_default_set_loads_and_has_zh_en_and_comparisons() -> None:
    probes = load_probe_files(["default"])
    names = {p.name for p in probes}
    assert {"capital_zh", "capital_en"} <= names
    cap = next(p for p in probes if p.name == "capital_zh")
    assert (cap.prompt, cap.target) == ("中国的首都是", "北京")
    assert next(p for p in probes if p.name == "capital_en").target == " Paris"
    assert any(p.kind == "compare" for p in probes)


def test_yaml_and_jsonl_formats_and_errors(tmp_path: Path) -> None:
    y = tmp_path / "p.yaml"
    y.write_text("- {name: a, prompt: x, target: y}\n- {name: b, a: one, b: two, expect: b}\n", encoding="utf-8")
    ps = load_probes(y)
    assert [(p.name, p.kind, p.expect) for p in ps] == [("a", "target", "a"), ("b", "compare", "b")]
    j = tmp_path / "p.jsonl"
    j.write_text('{"name": "a", "prompt": "x", "target": "y"}\n\n{"name": "c", "prompt": 3, "target": "y"}\n')
    with pytest.raises(ProbeFormatError, match=rf"{j}:3: 'prompt' must be a string"):
        load_probes(j)
    j.write_text('{"name": "a", "prompt": "x", "target": "y"}\n{"name": "a", "prompt": "z", "target": "w"}\n')
    with pytest.raises(ProbeFormatError, match=r"p.jsonl:2: duplicate probe name 'a'"):
        load_probes(j)
    j.write_text('{"name": "a", "prompt": "x", "tgt": "y"}\n')
    with pytest.raises(ProbeFormatError, match=r"p.jsonl:1: unknown key\(s\) \['tgt'\]"):
        load_probes(j)
    y.write_text("probes:\n  - {name: a, a: x, b: y, expect: c}\n")
    with pytest.raises(ProbeFormatError, match=r"probes\[0\] \(a\): expect must be 'a' or 'b'"):
        load_probes(y)
    y.write_text("probes: [\n")
    with pytest.raises(ProbeFormatError, match=rf"{y}:\d+: not valid YAML"):
        load_probes(y)
    with pytest.raises(ProbeFormatError, match="not found"):
        load_probe_files([str(tmp_path / "missing.yaml")])


def _unigram() -> tuple[torch.Tensor, Fixed]:
    """Bytes of 'P' and 'a' likely, 'r' less, everything else equal."""
    logits = torch.zeros(TOK.vocab)
    for ch, v in (("P", 6.0), ("a", 5.0), ("r", 3.0), (" ", 4.0)):
        logits[TOK.encode(ch).ids[0]] = v
    return logits, Fixed(logits)


def test_target_probe_logprob_and_rank(tmp_path: Path) -> None:
    logits, model = _unigram()
    lse = float(torch.logsumexp(logits, 0))
    y = tmp_path / "p.yaml"
    y.write_text("- {name: paris, prompt: 'The capital is', target: ' Par'}\n"
                 "- {name: rome, prompt: 'The capital is ', target: 'R', pass_rank: 5}\n"
                 "- {name: a_first, prompt: 'x', target: 'ab', pass_rank: 2}\n")
    res = run_probes(model, TOK, load_probes(y), prefix_id=2, max_len=32)
    paris, rome, a_first = res
    want = sum(float(logits[TOK.encode(c).ids[0]]) - lse for c in " Par")
    assert paris["logprob"] == pytest.approx(want, abs=1e-5) and paris["score"] == paris["logprob"]
    # the first target token is " " (trailing space of the prompt moves to the target): rank 3 after P, a
    assert paris["rank"] == 3 and paris["passed"] is False and paris["tokens"] == 4
    assert rome["rank"] == 3 and rome["passed"] is True  # ' ' again leads the target; pass_rank 5
    assert a_first["rank"] == 2 and a_first["passed"] is True and a_first["greedy"] is False
    assert set(paris) >= {"name", "kind", "prompt", "target", "logprob", "rank", "passed"}


def test_compare_probe_uses_per_token_perplexity(tmp_path: Path) -> None:
    logits, model = _unigram()
    y = tmp_path / "p.yaml"
    y.write_text("- {name: good, a: 'Pa', b: 'xyzw'}\n- {name: flipped, a: 'Pa', b: 'xyzw', expect: b}\n")
    good, flipped = run_probes(model, TOK, load_probes(y), prefix_id=2, max_len=32)
    lp = torch.log_softmax(logits, 0)
    nll_a = -float(lp[TOK.encode("P").ids[0]] + lp[TOK.encode("a").ids[0]]) / 2
    nll_b = -float(sum(lp[TOK.encode(c).ids[0]] for c in "xyzw")) / 4
    assert good["ppl_a"] == pytest.approx(math.exp(nll_a), rel=1e-5)
    assert good["ppl_b"] == pytest.approx(math.exp(nll_b), rel=1e-5)
    assert good["passed"] and good["margin"] == pytest.approx(nll_b - nll_a, rel=1e-5)
    assert not flipped["passed"] and flipped["margin"] == pytest.approx(-good["margin"])
    assert good["logprob"] is None and good["rank"] is None


def test_history_csv_and_plot(tmp_path: Path) -> None:
    rows = []
    for step, scale in ((10, 1.0), (20, 2.0), (5, 0.5)):
        logits, _ = _unigram()
        model = Fixed(logits * scale)
        res = run_probes(model, TOK, load_probe_files(["default"])[:3] + load_probe_files(["default"])[-1:],
                         prefix_id=2, max_len=64)
        rows.append({"step": step, "tokens_seen": step * 1000, "probes": res})
    csv_path, png = write_history(rows, tmp_path)
    with open(csv_path, encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * 4
    assert [r["step"] for r in table[::4]] == ["5", "10", "20"]  # sorted by step
    assert {r["probe"] for r in table} >= {"capital_zh", "fact_zh"}
    assert png is not None and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_merged_and_unscorable_probes_never_fail_the_run(tmp_path: Path) -> None:
    """A real tokenizer merges "万里长城位于" + "中国" into fewer tokens than the prompt: scored with
    the target encoded alone. An empty text cannot be scored: counted, reported, no exception."""
    tok = merging_bpe()
    V = tok.get_vocab_size()
    probes = [Probe("great_wall", "target", "万里长城位于", target="中国"),
              Probe("empty", "target", "x", target=""),
              Probe("cmp_empty", "compare", "", a="中国", b=""),
              Probe("capital", "target", "The capital of France is", target=" Paris")]
    res = run_probes(Uniform(V), tok, probes, prefix_id=1, max_len=32)
    wall, empty, cmp_empty, capital = res
    n = len(tok.encode("中国").ids)
    assert wall["alone"] and wall["tokens"] == n and wall["logprob"] == pytest.approx(-n * math.log(V), rel=1e-5)
    assert not capital["alone"] and capital["score"] is not None
    for r in (empty, cmp_empty):
        assert "no tokens" in r["unscored"] and r["score"] is None and r["passed"] is False
    assert "unscored" not in wall and "unscored" not in capital

    results = {"checkpoint": "c", "step": 3, "tokens_seen": 30, "perplexity": {}, "probes": res, "tasks": {}}
    scalars = flat_scalars(results)
    assert "eval/probe/empty" not in scalars and "eval/probe/great_wall" in scalars
    assert scalars["eval/probes_passed"] == sum(r["passed"] for r in (wall, capital)) / 2  # of the scored ones
    md = format_markdown(results)
    assert "| empty | target |" in md and "not scored |" in md
    assert "## Not scored" in md and "2 item(s) could not be scored" in md and "| probes | cmp_empty |" in md
    csv_path, png = write_history([{"step": 3, "tokens_seen": 30, "probes": res}], tmp_path)
    rows = {r["probe"]: r for r in csv.DictReader(open(csv_path, encoding="utf-8"))}
    assert rows["empty"]["score"] == "" and rows["great_wall"]["score"] != ""
