from __future__ import annotations

import bz2
import json
from pathlib import Path

import numpy as np
import pytest

from smelt.config import DecontamConfig, DecontamSource
from smelt.data.document import Document
from smelt.data.steps.decontam import (
    DecontamFilter,
    DecontamIndex,
    EvalFormatError,
    EvalItem,
    detect_format,
    load_eval_items,
    text_token_hashes,
    window_hashes,
)
from smelt.data.text import ngram_hashes

HS_CTX = "Roof shingle removal: A man is sitting on a roof with a hammer and a bucket of nails. he"
HS_ENDINGS = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
              "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
CEVAL_Q = "下列关于我国古代科技成就的表述，正确的是哪一项？____"
CEVAL_ROWS = [
    ["0", CEVAL_Q, "《九章算术》最早记载了勾股定理的完整证明", "张衡发明了用于预测地震的地动仪",
     "祖冲之把圆周率精确到小数点后第七位", "沈括在梦溪笔谈中记载了活字印刷术的发明", "C"],
    ["1", "某市今年的人均可支配收入比去年增长了百分之八，以下哪项最能解释这一变化？",
     "物价下降", "就业增加", "税率提高", "人口减少", "B"],
]


def write_hellaswag(path: Path, n: int = 2, compress: bool = False) -> Path:
    lines = []
    for i in range(n):
        ctx = HS_CTX if i == 0 else f"Item {i}: another context about a dog running in the park near the river"
        lines += [ctx, str(3 - i % 4), *HS_ENDINGS]
    data = "\n".join(lines) + "\n"
    if compress:
        path.write_bytes(bz2.compress(data.encode()))
    else:
        path.write_text(data, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_ceval(dirpath: Path, rows=CEVAL_ROWS, header=("id", "question", "A", "B", "C", "D", "answer")) -> Path:
    import csv

    dirpath.mkdir(parents=True, exist_ok=True)
    with (dirpath / "history_val.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return dirpath


def items(path: Path, fmt: str = "auto") -> list[EvalItem]:
    return list(load_eval_items(path, fmt))


# ---------------------------------------------------------------------------------------------
# loaders


@pytest.mark.parametrize("compress", [False, True])
def test_hellaswag(tmp_path, compress):
    p = write_hellaswag(tmp_path / ("hellaswag_val.txt" + (".bz2" if compress else "")), compress=compress)
    assert detect_format(p) == "hellaswag"
    got = items(p)
    assert len(got) == 2
    assert got[0] == EvalItem("0", f"{HS_CTX} {HS_ENDINGS[3]}", HS_CTX)
    assert got[1].text.endswith(HS_ENDINGS[2])


def test_hellaswag_bad_label_names_line(tmp_path):
    p = tmp_path / "hellaswag.txt"
    write_hellaswag(p, n=2)
    lines = p.read_text().splitlines()
    lines[7] = "seven"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalFormatError, match=r"hellaswag.txt:8: HellaSwag gold label must be 0-3, got 'seven'"):
        items(p)


def test_hellaswag_incomplete_item(tmp_path):
    p = tmp_path / "hellaswag.txt"
    p.write_text("ctx\n1\na\nb\nc\nd\nctx2\n2\n")
    with pytest.raises(EvalFormatError, match=r"hellaswag.txt:7: incomplete HellaSwag item \(2 of 6 lines\)"):
        items(p)


def test_piqa(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [
        {"goal": "How do I ready a guinea pig cage for its new occupants?", "sol1": "Use paper bedding.",
         "sol2": "Use jeans."},
        {"goal": "dresser", "sol1": "replace drawer with bobby pin", "sol2": "finish with bobby pin"},
    ])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    for path in (tmp_path / "valid.jsonl", tmp_path):
        assert detect_format(path) == "piqa"
        got = items(path)
        assert got == [
            EvalItem("0", "How do I ready a guinea pig cage for its new occupants? Use paper bedding.",
                     "How do I ready a guinea pig cage for its new occupants?"),
            EvalItem("1", "dresser finish with bobby pin", "dresser"),
        ]


def test_piqa_label_mismatch(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n0\n")
    with pytest.raises(EvalFormatError, match=r"valid-labels.lst:3: 3 labels for 2 items"):
        items(tmp_path / "valid.jsonl")
    (tmp_path / "valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(EvalFormatError, match=r"valid-labels.lst:2: PIQA label must be 0 or 1"):
        items(tmp_path / "valid.jsonl")


def test_arc(tmp_path):
    rec = {"id": "Mercury_1", "question": {"stem": "Which gas do plants absorb?", "choices": [
        {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"}]}, "answerKey": "B"}
    p = write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", [rec, {**rec, "id": "Mercury_2", "answerKey": "E"}])
    assert detect_format(p) == "arc"
    with pytest.raises(EvalFormatError, match=r"ARC-Easy-Test.jsonl:2: answerKey 'E' is not among the choice labels"):
        items(p)
    write_jsonl(p, [rec])
    assert items(p) == [EvalItem("Mercury_1", "Which gas do plants absorb? carbon dioxide",
                                 "Which gas do plants absorb?")]


def test_lambada(tmp_path):
    p = write_jsonl(tmp_path / "lambada_test.jsonl", [{"text": "He opened the door and saw his dog"}])
    assert detect_format(p) == "lambada"
    assert items(p) == [EvalItem("1", "He opened the door and saw his dog", "")]


def test_ceval(tmp_path):
    d = write_ceval(tmp_path / "ceval" / "val")
    assert detect_format(d) == "ceval"
    got = items(d)
    assert got[0] == EvalItem("history_val:0", f"{CEVAL_Q} 祖冲之把圆周率精确到小数点后第七位", CEVAL_Q)
    assert got[1].text.endswith("就业增加")
    # dev files carry an explanation column (quoted, multi-line)
    d2 = write_ceval(tmp_path / "dev", rows=[[*CEVAL_ROWS[0], "1. 第一步\n2. 第二步"]],
                     header=("id", "question", "A", "B", "C", "D", "answer", "explanation"))
    assert len(items(d2)) == 1
    assert detect_format(d2 / "history_val.csv") == "ceval"


def test_ceval_errors(tmp_path):
    d = write_ceval(tmp_path / "bad", rows=[CEVAL_ROWS[0], [*CEVAL_ROWS[1][:6], "E"]])
    with pytest.raises(EvalFormatError, match=r"history_val.csv:3: C-Eval answer must be A-D, got 'E'"):
        items(d)
    d = write_ceval(tmp_path / "nohead", rows=[], header=("id", "question", "A", "B"))
    with pytest.raises(EvalFormatError, match=r"history_val.csv:1: C-Eval header lacks \['C', 'D'\]"):
        items(d)


def test_generic_jsonl_and_text(tmp_path):
    p = write_jsonl(tmp_path / "my_eval.jsonl", [
        {"context": "The capital of France is", "choices": ["Berlin", "Paris"], "gold": 1},
        {"context": "Two plus two is", "gold": "four"},
    ])
    assert detect_format(p) == "jsonl"
    assert [i.text for i in items(p)] == ["The capital of France is Paris", "Two plus two is four"]
    p2 = write_jsonl(tmp_path / "texts.jsonl", [{"text": "just a passage"}])
    assert detect_format(p2) == "jsonl" and items(p2) == [EvalItem("1", "just a passage", "")]
    p3 = tmp_path / "lines.txt"
    p3.write_text("first item\n\nsecond item\n")
    assert detect_format(p3) == "text"
    assert items(p3) == [EvalItem("1", "first item", ""), EvalItem("3", "second item", "")]


def test_generic_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(EvalFormatError, match=r"bad.jsonl:3: invalid JSON"):
        items(p, "jsonl")
    write_jsonl(p, [{"context": "c", "choices": ["a"], "gold": 3}])
    with pytest.raises(EvalFormatError, match=r"bad.jsonl:1: 'gold' must index 'choices'"):
        items(p, "jsonl")
    write_jsonl(p, [{"question": "q"}])
    with pytest.raises(EvalFormatError, match=r"bad.jsonl:1: expected"):
        items(p, "jsonl")


def test_corrupt_compressed_file(tmp_path):
    p = tmp_path / "hellaswag_val.txt.bz2"
    p.write_bytes(b"BZh9 definitely not bzip2")
    with pytest.raises(EvalFormatError, match=r"hellaswag_val.txt.bz2:1: cannot read"):
        items(p)


def test_missing_path_and_unknown_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation set not found"):
        items(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalFormatError, match="cannot guess the format"):
        items(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# hashing and the index


def test_window_hashes_equal_ngram_hashes():
    th = text_token_hashes("the quick brown fox jumps over the lazy dog " * 3 + "北京是中国的首都")
    for lengths in [(13,), (8, 9, 10, 11, 12, 13), (1, 2, 3), (5, 40), (20, 13, 8)]:
        ref = [ngram_hashes(th, n) for n in sorted(set(lengths)) if n <= len(th)]
        assert np.array_equal(window_hashes(th, lengths), np.concatenate(ref))
    assert len(window_hashes(th[:3], (8,))) == 0


@pytest.fixture
def small_sources(tmp_path) -> list[DecontamSource]:
    hs = write_hellaswag(tmp_path / "hellaswag_val.txt", n=3)
    ce = write_ceval(tmp_path / "ceval")
    piqa = write_jsonl(tmp_path / "valid.jsonl", [
        {"goal": "How can I keep my paint brush from drying out overnight?", "sol1": "Wrap it in plastic.",
         "sol2": "Leave it."},
        {"goal": "dresser", "sol1": "a b c", "sol2": "d e f"},  # 4 tokens: too short to index
    ])
    (tmp_path / "valid-labels.lst").write_text("0\n0\n")
    return [DecontamSource(name="hellaswag", path=str(hs)), DecontamSource(name="ceval", path=str(ce)),
            DecontamSource(name="piqa", path=str(piqa))]


def test_build_stats_and_roundtrip(tmp_path, small_sources):
    idx = DecontamIndex.build(small_sources, ngram=13)
    assert idx.names == ["hellaswag", "ceval", "piqa"]
    assert np.all(np.diff(idx.hashes.astype(np.float64)) >= 0) and len(np.unique(idx.hashes)) == len(idx)
    assert idx.stats["hellaswag"]["items"] == 3
    # PIQA: goal (11 tokens) + answer -> n-grams, goal alone -> one short shingle; "dresser a b c" skipped
    assert idx.stats["piqa"] == {"items": 2, "ngrams": idx.stats["piqa"]["ngrams"], "short_items": 1,
                                 "skipped_items": 1}
    assert idx.lengths == (11, 13)
    path = idx.save(tmp_path / "out" / "decontam.npz")
    back = DecontamIndex.load(path)
    assert back.names == idx.names and back.lengths == idx.lengths and back.stats == idx.stats
    assert np.array_equal(back.hashes, idx.hashes) and np.array_equal(back.bench, idx.bench)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"x.npz: not a readable smelt-decontam-index file"):
        DecontamIndex.load(bad)
    np.savez(tmp_path / "y.npz", format=np.array("something-else"), version=np.array(1))
    with pytest.raises(ValueError, match=r"y.npz: something-else v1, expected smelt-decontam-index v1"):
        DecontamIndex.load(tmp_path / "y.npz")


def test_duplicate_source_names(small_sources):
    with pytest.raises(ValueError, match=r"duplicate benchmark name\(s\) \['ceval'\]"):
        DecontamIndex.build(small_sources + [small_sources[1]], ngram=13)


# ---------------------------------------------------------------------------------------------
# the filter


@pytest.fixture
def step(small_sources) -> DecontamFilter:
    return DecontamFilter(DecontamConfig(sources=small_sources))


def test_hellaswag_context_removed(step):
    doc = Document("w", "Blog post. " + HS_CTX.split(": ", 1)[1] + " Then the storm came and everyone went home.")
    assert step(doc) == "decontam_hellaswag"
    assert doc.meta["decontam"]["benchmark"] == "hellaswag"
    assert doc.meta["decontam"]["matches"] >= 1


def test_clean_document_kept(step):
    doc = Document("c", "A man is sitting on a bench in the park, reading a newspaper about the weather.")
    assert step(doc) is None
    assert "decontam" not in doc.meta
    assert step.stats.total().kept == 1


def test_chinese_ceval_question_removed(step):
    doc = Document("z", "今天复习历史。" + CEVAL_Q.replace("____", "") + "大家讨论了很久。", domain="zh-web")
    assert step(doc) == "decontam_ceval"
    assert doc.meta["decontam"]["benchmark"] == "ceval"
    assert step.stats.domain("zh-web").dropped == {"decontam_ceval": 1}
    # 12 consecutive characters of the question are not enough
    doc = Document("z2", "今天复习历史。" + CEVAL_Q[2:14])
    assert step(doc) is None


def test_short_question_alone_matches(step):
    # The PIQA goal has 11 tokens (< 13): indexed as one whole-goal shingle.
    doc = Document("p", "Forum: how can i keep my paint brush from drying out overnight? Any tips?")
    assert step(doc) == "decontam_piqa"
    doc = Document("p2", "how can i keep my paint brush from drying")  # part of it only
    assert step(doc) is None


def test_case_punctuation_and_fullwidth_do_not_hide_a_match(step):
    text = HS_CTX.upper().replace(" ", "  ,").replace("A MAN", "Ａ ＭＡＮ")
    assert step(Document("f", text)) == "decontam_hellaswag"


def test_pickled_step_still_matches(step):
    import pickle

    clone = pickle.loads(pickle.dumps(step))
    assert "_bits" not in step.index.__getstate__()
    assert clone(Document("w", HS_CTX)) == "decontam_hellaswag"
    assert clone(Document("c", "nothing to see here at all")) is None


def test_min_matches(small_sources):
    strict = DecontamFilter(DecontamConfig(sources=small_sources, min_matches=1000))
    doc = Document("w", HS_CTX)
    assert strict(doc) is None
    assert doc.meta["decontam"]["benchmark"] == "hellaswag"  # recorded even when kept


def test_from_config(small_sources):
    cfg = DecontamConfig(sources=small_sources)
    idx = DecontamIndex.from_config(cfg)
    assert (idx.ngram, idx.cjk_ngram, idx.names) == (13, 20, ["hellaswag", "ceval", "piqa"])
    cfg13 = DecontamConfig(sources=small_sources, cjk_ngram=None)
    assert DecontamIndex.from_config(cfg13).cjk_ngram == 13
    assert DecontamFilter(cfg, idx).index is idx


def test_prebuilt_index_must_match_config(tmp_path, small_sources):
    idx = DecontamIndex.build(small_sources, ngram=8)
    with pytest.raises(ValueError, match="built with ngram=8"):
        DecontamFilter(DecontamConfig(sources=small_sources, ngram=13, cjk_ngram=None), idx)
    loaded = DecontamIndex.load(idx.save(tmp_path / "i.npz"))
    step = DecontamFilter(DecontamConfig(sources=small_sources, ngram=8, cjk_ngram=None), loaded)
    assert step(Document("w", HS_CTX)) == "decontam_hellaswag"


def test_cjk_window(small_sources):
    idx = DecontamIndex.build(small_sources, ngram=13, cjk_ngram=20)
    assert idx.cjk_ngram == 20 and 20 in idx.lengths
    sixteen = CEVAL_Q[:17]  # 16 Han characters (and a comma): four 13-grams, no 20-gram
    assert idx.matches(sixteen) == {}
    assert DecontamIndex.build(small_sources, ngram=13).matches(sixteen) == {"ceval": 4}


# ---------------------------------------------------------------------------------------------
# the real evaluation sets in ../shared/data


@pytest.fixture(scope="module")
def shared_sources() -> list[DecontamSource]:
    from tests.conftest import shared_data_dir

    root = shared_data_dir()
    if root is None:
        pytest.skip("../shared/data is absent (set SMELT_SHARED_DATA to point at it)")
    return [
        DecontamSource(name="hellaswag", path=str(root / "hellaswag/hellaswag_val_full.txt.bz2")),
        DecontamSource(name="piqa", path=str(root / "piqa/valid.jsonl")),
        DecontamSource(name="arc_easy", path=str(root / "arc_easy/ARC-Easy-Test.jsonl")),
        DecontamSource(name="lambada", path=str(root / "lambada/lambada_test.jsonl")),
        DecontamSource(name="ceval", path=str(root / "ceval/val")),
    ]


@pytest.fixture(scope="module")
def shared_index(shared_sources) -> DecontamIndex:
    return DecontamIndex.from_config(DecontamConfig(sources=shared_sources))


def test_shared_item_counts(shared_index):
    expected = {"hellaswag": 10042, "piqa": 1838, "arc_easy": 2376, "lambada": 5153, "ceval": 1346}
    assert {k: v["items"] for k, v in shared_index.stats.items()} == expected


def test_shared_formats_detected(shared_sources):
    assert [detect_format(s.path) for s in shared_sources] == ["hellaswag", "piqa", "arc", "lambada", "ceval"]


def test_shared_contaminated_and_clean(shared_sources, shared_index, shared_data):
    step = DecontamFilter(DecontamConfig(sources=shared_sources), shared_index)
    hs = next(iter(load_eval_items(shared_sources[0])))
    doc = Document("a", f"Found this on a forum. {hs.question} What do you think happens next?")
    assert step(doc) == "decontam_hellaswag"
    ce = next(iter(load_eval_items(shared_sources[4])))
    doc = Document("b", f"今天的练习题：{ce.question}大家一起想一想。")
    assert step(doc) == "decontam_ceval"
    shakespeare = (shared_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")[:200_000]
    kept = sum(step(Document(f"s{i}", shakespeare[i:i + 2000])) is None for i in range(0, len(shakespeare), 2000))
    assert kept == 100  # no false positives on 100 clean 2 KB documents
