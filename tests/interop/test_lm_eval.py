"""lm-eval on a smelt export, fully offline: a local task YAML over a local JSONL, and lm-eval's
acc / acc_norm equal to the ones computed from smelt's own log-likelihoods. Skipped when
lm-eval (and accelerate, which its `hf` model imports) is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smelt.interop.hf import export_hf
from smelt.interop.load import load_model
from tests.interop._helpers import make_run

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

ROWS = [
    {"context": "The capital of France is", "choices": [" Paris", " Berlin", " Tokyo"], "gold": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 5"], "gold": 1},
    {"context": "The quick brown fox", "choices": [" jumps", " sleeps", " sings", " flies"], "gold": 0},
    {"context": "中国的首都是", "choices": ["北京", "上海"], "gold": 0},
]

TASK = """\
task: smelt_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def _loglik(model: torch.nn.Module, tok, context: str, choice: str) -> float:
    ctx = tok.encode(context).ids
    cont = tok.encode(context + choice).ids[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).float().log_softmax(-1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.slow
def test_lm_eval_offline_on_an_export(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path, model={"init_std": 0.1})
    lm = load_model(run)
    export = export_hf(lm, None, tmp_path / "export")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "toy.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (tasks / "smelt_toy.yaml").write_text(TASK.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
           "--tasks", "smelt_toy", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["smelt_toy"]

    samples = [json.loads(line) for line in
               next((tmp_path / "out").rglob("samples_smelt_toy_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    acc = acc_norm = 0
    for r, sample in zip(ROWS, samples, strict=True):
        ll = [_loglik(lm.model, lm.tokenizer, r["context"], c) for c in r["choices"]]
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(ll, abs=1e-3)  # lm-eval's log-likelihoods are smelt's
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]  # lm-eval: length-normalized by characters
        acc += int(max(range(len(ll)), key=ll.__getitem__) == r["gold"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == r["gold"])
    assert results["acc,none"] == pytest.approx(acc / len(ROWS))
    assert results["acc_norm,none"] == pytest.approx(acc_norm / len(ROWS))
