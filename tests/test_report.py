"""The HTML report: renders from whatever stages ran, parses, embeds everything, degrades clearly."""

from __future__ import annotations

import json
from pathlib import Path

from smelt.cli import main
from smelt.report import SECTIONS, write_report
from tests.demo.htmlcheck import check_html


def _write(p: Path, obj: object) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj), encoding="utf-8")


def test_empty_run_dir_says_stage_not_run(tmp_path):
    page = write_report(tmp_path).read_text(encoding="utf-8")
    parsed = check_html(page)
    assert parsed.errors == []
    assert {sid for sid, _ in SECTIONS} <= parsed.ids
    text = " ".join(parsed.text)
    for stage in ("data", "tokenizer", "pack", "train", "eval"):
        assert f"stage not run: {stage}" in text, stage
    assert parsed.images == 0


def _stats() -> dict:
    step = lambda name, seen, dropped, counters=None: {  # noqa: E731
        "name": name, "total": {"seen": seen, "kept": seen - sum(dropped.values()), "dropped": dropped,
                                "dropped_total": sum(dropped.values()), "counters": counters or {}},
        "by_domain": {"web": {"seen": seen, "kept": seen - sum(dropped.values()), "dropped": dropped,
                              "dropped_total": sum(dropped.values()), "counters": counters or {}}}}
    return {
        "documents": {"input": 100, "kept": 80, "rejected": 12, "duplicates": 8},
        "bytes": {"input": 10_000, "kept": 7_000}, "chars": {"input": 9_000, "kept": 6_500},
        "by_domain": {"web": {"input": 100, "kept": 80, "rejected": 12, "duplicates": 8, "bytes_in": 10_000,
                              "bytes_kept": 7_000, "chars_in": 9000, "chars_kept": 6500}},
        "rejects_by_reason": {"gopher_quality/gopher_short_doc": 12},
        "steps": [step("read", 100, {}), step("gopher_quality", 100, {"gopher_short_doc": 12}),
                  step("pii", 88, {}, {"email": 5, "phone": 3, "docs_redacted": 6}),
                  step("exact_dedup", 88, {"exact_duplicate": 5}), step("minhash_dedup", 83, {"near_duplicate": 3})],
        "minhash_cluster_sizes": {"2": 3, "3": 1},
        "read_errors": [],
    }


def test_report_sections_from_stage_outputs(tmp_path):
    run = tmp_path
    _write(run / "data" / "stats.json", _stats())
    lines = [{"kind": "train", "step": s, "tokens": 512 * s, "loss": 7.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0,
              "tokens_per_s": 1000.0, "mfu": 0.01, "tflops": 0.001, "loss_by_domain": {"web": 7.0 - 0.1 * s}}
             for s in range(1, 11)]
    lines.insert(5, {"kind": "event", "step": 5, "event": "spike", "action": "skip", "loss": 12.0,
                     "grad_norm": 40.0, "reason": "loss above mean + 6 sigma"})
    lines.append({"kind": "val", "step": 10, "val_loss": 6.2, "val_loss_by_domain": {"web": 6.2}, "val_tokens": 99})
    (run / "train").mkdir()
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut', "utf-8")
    _write(run / "eval" / "results.json", {
        "checkpoint": "step-0000010", "step": 10, "tokens_seen": 5120,
        "perplexity": {"web": {"loss": 6.2, "ppl": 492.7, "bits_per_byte": 2.1, "word_ppl": 900.0, "tokens": 99,
                               "bytes": 400, "docs": 3}},
        "probes": [{"name": "capital", "kind": "logprob", "prompt": "中国的首都是", "target": "北京", "logprob": -3.2,
                    "rank": 7, "passed": False}],
        "tasks": {"toy_mc": {"acc": 0.5, "acc_norm": 0.25, "random": 0.25, "n": 4, "shots": 0}}})
    (run / "recipe.yaml").write_text("name: t\nloader: {weights: {web: 1}}\n# <tag> & 'quotes'\n", "utf-8")
    page = write_report(run).read_text(encoding="utf-8")
    parsed = check_html(page)
    assert parsed.errors == []
    text = "".join(parsed.text)
    assert "Accounting: input 100 = kept 80 + rejected 12 + duplicates 8 holds" in text
    assert "gopher_short_doc" in text and "near_duplicate" in text
    assert "spike" in text and "loss above mean + 6 sigma" in text  # the events table
    assert "fell" in text
    assert "bits/byte" in text and "random baseline" in text and "北京" in text
    assert "# <tag> & 'quotes'" in text  # recipe text escaped, then parsed back intact
    assert "stage not run: tokenizer" in text and "stage not run: pack" in text
    assert parsed.images >= 5  # funnel, reasons, clusters, pii, training


def test_cli_report_and_missing_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-q", "--no-samples"]) == 0
    assert (tmp_path / "report.html").is_file()
    assert main(["report", str(tmp_path / "nope"), "-q"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_malformed_input_is_named_not_fatal(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text("{not json", encoding="utf-8")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert check_html(page).errors == []
    assert "stats.json: unreadable" in page


def test_png_summary(tmp_path):
    _write(tmp_path / "data" / "stats.json", _stats())
    assert main(["report", str(tmp_path), "-q", "--no-samples", "--png", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
