"""Speed of the `quality` step's scorers through the step itself: a fastText model (``--fasttext``,
e.g. the ablation's runs/models/wiki-vs-web/model.bin) in batches of 256, and a BERT-base-sized
Hugging Face regressor (110M parameters, random weights: the speed does not depend on them; a
WordPiece tokenizer trained here on the same text, saved to ``--hf-dir``), fp32 on CPU, batch 32,
512 tokens. Input: WikiText-2 validation paragraphs of more than 200 characters. Prints docs/s of
each and their ratio (the fastText model is the baseline).

    python bench/quality_step.py --fasttext runs/models/wiki-vs-web/model.bin
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fasttext", required=True, help="a supervised fastText .bin with __label__hq")
    ap.add_argument("--hf-dir", default="/tmp/smelt-bench-bert", help="where the random BERT-base regressor is saved")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("SMELT_SHARED_DATA", REPO.parent / "shared" / "data")))
    args = ap.parse_args()
    text = (args.data_dir / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in text.splitlines() if len(p.strip()) > 200]
    docs_text = (paras * 4)[:1024]
    print("paragraphs", len(docs_text), "mean chars", int(np.mean([len(p) for p in docs_text])))
    import smelt.quality  # noqa
    from smelt.data.document import Document
    from smelt.data.steps.registry import StepContext, build_step, step_options
    from smelt.config import DataConfig
    docs = [Document(id=f"d{i}", text=t, domain="wiki", meta={"language": "en"}) for i, t in enumerate(docs_text)]
    ctx = StepContext(data=DataConfig(inputs=[{"path": str(args.data_dir), "domain": "wiki"}]), work_dir=None)
    # fastText
    ft = {"models": [{"name": "w", "path": args.fasttext, "keep": {}}]}
    step = build_step("quality", step_options("quality", ft), ctx)
    spec = step.specs[0]
    spec.score(docs[:256])
    t = time.perf_counter()
    for i in range(0, len(docs), 256):
        spec.score(docs[i:i+256])
    dt = time.perf_counter() - t
    ft_rate = len(docs) / dt
    print(f"fastText ({args.fasttext}): {ft_rate:,.0f} docs/s")
    # HF BERT-base regressor, random init
    out = Path(args.hf_dir)
    if not (out / "config.json").is_file():
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
        from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(paras, trainers.WordPieceTrainer(vocab_size=30522, special_tokens=specials))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
        fast.save_pretrained(out)
        cfg = BertConfig(num_labels=1, vocab_size=tok.get_vocab_size())
        BertForSequenceClassification(cfg).save_pretrained(out)
    opts = {"models": [{"name": "edu", "kind": "hf", "path": str(out), "output": "regressor", "keep": {}}]}
    step = build_step("quality", step_options("quality", opts), ctx)
    spec = step.specs[0]
    small = docs[:256]
    spec.score(small[:32])
    t = time.perf_counter()
    spec.score(small)
    dt = time.perf_counter() - t
    hf_rate = len(small) / dt
    print(f"HF BERT-base regressor (110M, fp32, batch 32, max_length 512): {hf_rate:,.1f} docs/s")
    print(f"ratio: fastText is {ft_rate / hf_rate:,.0f}x the HF regressor's throughput")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
