"""`smelt compare`: the table's values come from each run's files, the best value per column is
marked, missing files are dashes and notes, bad input exits 2, an earlier comparison is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smelt.cli import main
from smelt.compare import CompareError, compare_runs, format_markdown, write_comparison
from smelt.eval.perplexity import HeldOutDoc, perplexity_by_domain
from smelt.eval.tasks import MCItem, score_items
from tests.demo.htmlcheck import check_html
from tests.eval.util import CharTokenizer, Fixed

TOK = CharTokenizer()
TEXTS = {"web": "aaaa abab aaaa", "code": "def a(): return a"}


def _results(bias: float, *, step: int = 10, tasks: bool = True) -> dict:
    """eval/results.json as `smelt.eval.runner.run_eval` writes it, from a unigram model that
    prefers the byte 'a' by ``bias`` nats: the larger the bias, the lower the bits per byte here."""
    logits = torch.zeros(TOK.vocab)
    logits[TOK.encode("a").ids[0]] = bias
    model = Fixed(logits)
    docs = {d: [HeldOutDoc(torch.tensor(TOK.encode(t).ids).numpy(), t)] for d, t in TEXTS.items()}
    out = {"version": 1, "checkpoint": f"train/checkpoints/step-{step:07d}", "step": step, "tokens_seen": 640 * step,
           "perplexity": perplexity_by_domain(model, docs, prefix_id=2, max_len=16), "probes": [], "tasks": {}}
    if tasks:
        items = [MCItem("Q", ("aa", "zz"), 0, "m:1"), MCItem("Q", ("zz", "ab"), 1, "m:2"),
                 MCItem("Q", ("zz", "yy"), 0, "m:3")]
        out["tasks"]["toy"] = {**score_items(model, TOK, items, [it.context for it in items], prefix_id=2,
                                             max_len=16), "shots": 0}
    return out


def _write(p: Path, obj: object) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


def make_run(root: Path, name: str, *, bias: float | None = 2.0, steps: int = 10, kept: int = 80,
             manifest: bool = True, stats: bool = True, recipe: bool = True, **kw) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if recipe:
        _write(run / "recipe.yaml", f"name: {name}\nseed: 0\n")
    if manifest:  # the keys `smelt.train.trainer.Trainer._summary` writes that compare reads
        _write(run / "train" / "manifest.json", {"version": 1, "complete": True, "steps": steps, "max_steps": steps,
                                                 "tokens": 640 * steps, "final_loss": 3.0 - bias / 10 if bias else 3.0})
    if stats:  # `smelt.data.curate.build_stats`' totals
        _write(run / "data" / "stats.json", {
            "documents": {"input": 100, "kept": kept, "rejected": 100 - kept, "duplicates": 0},
            "bytes": {"input": 10_000, "kept": 100 * kept},
            "by_domain": {"web": {"input": 100, "kept": kept, "rejected": 100 - kept, "duplicates": 0,
                                  "bytes_in": 10_000, "bytes_kept": 100 * kept}}, "steps": []})
    if bias is not None:
        _write(run / "eval" / "results.json", _results(bias, step=steps, **kw))
    return run


def _table(md: str) -> dict[str, dict[str, str]]:
    """run name -> header -> cell, from the markdown table."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_table_values_come_from_the_run_files_and_best_is_bold(tmp_path: Path) -> None:
    a = make_run(tmp_path, "filtered", bias=4.0, steps=20, kept=60)
    b = make_run(tmp_path, "baseline", bias=-1.0, steps=20, kept=90)
    cmp = compare_runs([a, b])
    assert cmp.domains == ["code", "web"] and cmp.common_domains == ["code", "web"] and cmp.tasks == ["toy"]
    rows = _table(format_markdown(cmp))
    ra, rb = _results(4.0, step=20), _results(-1.0, step=20)
    for row, res, kept in ((rows["filtered"], ra, 60), (rows["baseline"], rb, 90)):
        assert row["tokens trained"] == "12,800" and row["steps"] == "20"
        assert row["kept documents"] == f"{kept:,}" and row["kept bytes"] == f"{100 * kept:,}"
        for d in ("web", "code"):
            assert row[f"bits/byte {d}"].strip("*") == f"{res['perplexity'][d]['bits_per_byte']:.4f}"
        t = res["tasks"]["toy"]
        assert row["toy acc"].strip("*") == f"{t['acc']:.3f} ± {t['acc_stderr']:.3f}"
        mean = sum(res["perplexity"][d]["bits_per_byte"] for d in ("web", "code")) / 2
        assert row["mean bits/byte"].strip("*") == f"{mean:.4f}"
    # 'a' is the most frequent byte here: the run whose model prefers it more has the lower bits/byte
    assert ra["perplexity"]["web"]["bits_per_byte"] < rb["perplexity"]["web"]["bits_per_byte"]
    for col in ("bits/byte web", "bits/byte code", "mean bits/byte"):
        assert rows["filtered"][col].startswith("**") and not rows["baseline"][col].startswith("**"), col
    # counts are context, never marked
    assert not any(rows[r][c].startswith("**") for r in rows for c in ("kept documents", "tokens trained"))
    # a model that avoids 'a' picks "zz" where the answer holds an 'a'
    assert rows["filtered"]["toy acc"] == "**1.000 ± 0.000**" and rows["baseline"]["toy acc"] == "0.333 ± 0.333"


def test_missing_files_are_dashes_and_notes_not_errors(tmp_path: Path) -> None:
    full = make_run(tmp_path, "full", bias=2.0)
    no_eval = make_run(tmp_path, "no-eval", bias=None)
    no_train = make_run(tmp_path, "no-train", bias=3.0, manifest=False, stats=False, tasks=False)
    broken = make_run(tmp_path, "broken", bias=1.0)
    (broken / "data" / "stats.json").write_text("{not json", encoding="utf-8")
    out = write_comparison(compare_runs([full, no_eval, no_train, broken]), tmp_path / "cmp")
    md = out["md"].read_text(encoding="utf-8")
    rows = _table(md)
    assert rows["no-eval [1]"]["bits/byte web"] == "—" and rows["no-eval [1]"]["toy acc"] == "—"
    assert rows["no-eval [1]"]["kept documents"] == "80"
    assert "[1] no-eval: no eval/results.json." in md
    # without a training manifest, tokens and steps are the evaluated checkpoint's (and say so)
    assert rows["no-train [2]"]["tokens trained"] == "6,400" and rows["no-train [2]"]["kept documents"] == "—"
    assert rows["no-train [2]"]["toy acc"] == "—"
    assert "no train/manifest.json; no data/stats.json; tokens and steps are those of the evaluated checkpoint" in md
    assert rows["broken [3]"]["kept documents"] == "—" and "data/stats.json unreadable (JSONDecodeError" in md
    assert rows["full"]["kept documents"] == "80"
    page = check_html(out["html"].read_text(encoding="utf-8"))
    assert page.errors == [] and page.images == 1
    assert "no eval/results.json" in "".join(page.text)
    data = json.loads(out["json"].read_text(encoding="utf-8"))
    assert data["version"] == 1 and [r["name"] for r in data["runs"]] == ["full", "no-eval", "no-train", "broken"]
    assert data["runs"][1]["bits_per_byte"] == {} and data["runs"][1]["mean_bits_per_byte"] is None
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_name_without_recipe_and_domains_not_in_every_run(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", recipe=False)
    b = make_run(tmp_path, "b")
    res = json.loads((b / "eval" / "results.json").read_text())
    res["perplexity"]["zh"] = {**res["perplexity"]["web"], "bits_per_byte": 0.5}
    _write(b / "eval" / "results.json", res)
    cmp = compare_runs([a, b], name="with and without zh")
    assert cmp.domains == ["code", "web", "zh"] and cmp.common_domains == ["code", "web"]
    md = format_markdown(cmp)
    assert md.startswith("# with and without zh\n")
    rows = _table(md)
    assert rows["a [1]"]["bits/byte zh"] == "—" and rows["b"]["bits/byte zh"] == "0.5000"
    assert "no recipe.yaml" in md and "Mean bits/byte: over the domains every evaluated run has (code, web)" in md
    # the same model on the same documents: equal mean, both best
    assert rows["a [1]"]["mean bits/byte"] == rows["b"]["mean bits/byte"] and rows["b"]["mean bits/byte"][:2] == "**"


def test_bad_input_is_a_compare_error(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a")
    with pytest.raises(CompareError, match="no such run directory"):
        compare_runs([a, tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match=r"empty: not a finished run"):
        compare_runs([a, tmp_path / "empty"])
    with pytest.raises(CompareError, match="given twice"):
        compare_runs([a, tmp_path / "x" / ".." / "a"])
    b = make_run(tmp_path, "b", bias=None)
    with pytest.raises(CompareError, match="none of the runs has eval/results.json"):
        compare_runs([b])


def test_cli_writes_outputs_and_exits_2_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_run(tmp_path, "a", bias=3.0), make_run(tmp_path, "b", bias=1.0)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out), "--name", "ab", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json", "compare.md", "compare.png"]
    assert json.loads((out / "compare.json").read_text())["name"] == "ab"
    capsys.readouterr()
    assert main(["compare", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such run directory" in err
    assert not (tmp_path / "x").exists()
    assert main(["compare", str(make_run(tmp_path, "c", bias=None)), "-q"]) == 2
    assert "none of the runs has eval/results.json" in capsys.readouterr().err
    assert main(["compare", str(a), "--set", "x=1", "-q"]) == 2
    monkeypatch.chdir(tmp_path)  # default: ./compare-<timestamp>
    assert main(["compare", str(a), str(b), "-q"]) == 0
    (made,) = tmp_path.glob("compare-*")
    assert (made / "compare.md").is_file()


def test_an_earlier_comparison_is_moved_aside_not_overwritten(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a", bias=3.0), make_run(tmp_path, "b", bias=1.0)
    out = tmp_path / "cmp"
    write_comparison(compare_runs([a, b], name="first"), out)
    first = (out / "compare.md").read_bytes()
    write_comparison(compare_runs([a, b], name="second"), out)
    assert (tmp_path / "cmp.prev-1" / "compare.md").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "cmp.prev-1").iterdir()) == sorted(p.name for p in out.iterdir())
    assert (out / "compare.md").read_text().startswith("# second")
    # an out dir that also holds the user's own files keeps them: only the comparison moves aside
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    second = (out / "compare.html").read_bytes()
    write_comparison(compare_runs([a, b], name="third"), out)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "compare.html.prev-1").read_bytes() == second
    assert (out / "compare.md").read_text().startswith("# third")
    # a directory with no comparison in it is written into as it is
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x", encoding="utf-8")
    write_comparison(compare_runs([a, b]), other)
    assert (other / "keep.txt").is_file() and not list(tmp_path.glob("other.prev-*"))
