"""The recipe: one YAML file, validated by pydantic before any work starts.

Every field carries its default, unit and one line of documentation where it is declared.
`load_recipe(path, overrides)` reads YAML with `RecipeLoader` (``safe_load`` that refuses a key
given twice in one mapping; errors name the file and line), applies ``--set a.b=c``
overrides (values parsed as YAML scalars/lists; list items addressed by index, e.g.
``data.inputs.0.domain=wiki``), and validates. A wrong key, type or value raises
`RecipeError` naming the key path and, where they are known, the allowed keys or values.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smelt.config.model import ModelConfig


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key path and what is allowed."""


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# data: inputs and outputs


class InputSource(Strict):
    """One input: a file, a directory, a glob or an fsspec URL, all with one domain label."""

    path: str = Field(description="File, directory, glob pattern or fsspec URL (s3://, gs://, ...).")
    domain: str = Field(description="Domain label carried by every document (web, books, wiki, code, zh-wiki, ...).")
    format: Literal["auto", "txt", "jsonl", "parquet", "warc", "html", "json-squad"] = Field(
        "auto", description="File format; auto picks by extension: .txt/.md, .jsonl/.ndjson[.gz|.zst], .json (SQuAD "
        "layout or JSON lines, sniffed), .parquet, .warc[.gz]/.warc.wet.gz, .html/.htm.")
    glob: str = Field("**/*", description="Pattern for files inside a directory path.")
    text_field: str = Field("text", description="Field holding the text; `content` is tried when it is missing.")
    id_field: str = Field("id", description="Field holding the document id; absent ids become `<name>/<path relative to the input>:<n>`.")
    txt_split: Literal["file", "paragraph"] = Field(
        "file", description="Plain text: one document per file, or one per blank-line-separated block.")
    name: str | None = Field(None, description="Source name used in generated ids; defaults to the file stem.")
    limit: int | None = Field(None, ge=1, description="Read at most this many documents per file (demos, smoke tests).")


class StepConfig(Strict):
    """Fields shared by every step: on/off and which domains it applies to."""

    enabled: bool = Field(True, description="Run this step.")
    domains: list[str] | None = Field(None, description="Apply only to these domains (None: all).")
    skip_domains: list[str] = Field(default_factory=list, description="Never apply to these domains.")

    def applies_to(self, domain: str) -> bool:
        if not self.enabled or domain in self.skip_domains:
            return False
        return self.domains is None or domain in self.domains


class NormalizeConfig(StepConfig):
    fix_encoding: bool = Field(
        True, description="Repair mojibake (UTF-8 read as Latin-1/Windows-1252/..., 'cafÃ©' -> 'café') with ftfy's "
        "encoding fixes, before the other normalization; as FineWeb (datatrove FTFYFormatter) and RedPajama "
        "(ftfy.fix_encoding).")
    form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalization; NFKC also folds full-width ASCII (ＡＢＣ１２３) to ASCII.")
    strip_control: bool = Field(True, description="Remove C0/C1 control and zero-width characters (keeps \\n and \\t).")
    whitespace: bool = Field(True, description="Trim line ends, collapse runs of spaces and of more than 2 blank lines.")
    zh_convert: Literal["none", "t2s"] = Field(
        "none", description="Convert Traditional to Simplified Chinese (OpenCC t2s).")


class LanguageConfig(StepConfig):
    allowed: list[str] = Field(default_factory=lambda: ["en", "zh"],
                               description="ISO 639-1 codes to keep; others are rejected as `lang_<code>`; an empty list keeps every "
                               "language (the step only labels).")
    threshold: float = Field(0.5, ge=0.0, le=1.0,
                             description="Minimum normalized probability of the top language.")
    candidates: list[str] | None = Field(
        None, description="Restrict the identifier to these languages (more accurate on short text); None: all 97.")
    max_chars: int = Field(2000, ge=100, description="Classify this many leading characters (speed).")


class GopherQualityConfig(StepConfig):
    # Thresholds: Gopher, Rae et al. 2021, Appendix A.1.1 (as implemented in datatrove).
    min_doc_words: int = Field(50, description="Fewer words: reject `gopher_short_doc`.")
    max_doc_words: int = Field(100_000, description="More words: reject `gopher_long_doc`.")
    min_avg_word_length: float = Field(3, description="Mean word length below this (characters): reject.")
    max_avg_word_length: float = Field(10, description="Mean word length above this (characters): reject.")
    max_symbol_word_ratio: float = Field(0.1, description="'#' and '...' per word above this: reject.")
    max_bullet_lines_ratio: float = Field(0.9, description="Share of lines starting with a bullet above this: reject.")
    max_ellipsis_lines_ratio: float = Field(0.3, description="Share of lines ending with an ellipsis above this: reject.")
    max_non_alpha_words_ratio: float = Field(
        0.8, description="Share of words with at least one letter below this: reject (Gopher: 80%).")
    alpha_share_of: Literal["words", "tokens"] = Field(
        "words", description="Denominator of the alphabetic-word rule: `words` as in Gopher (punctuation is not a "
        "word), or `tokens` as datatrove (punctuation tokens count, which rejects dialogue-heavy prose: 1,644 of "
        "5,153 LAMBADA passages).")
    min_stop_words: int = Field(2, description="Fewer distinct stop words (the, be, to, of, and, that, have, with): reject.")
    # Chinese-aware variant (text without spaces): characters stand in for words.
    zh_min_doc_chars: int = Field(100, description="CJK documents: fewer non-space characters: reject `gopher_short_doc`.")
    zh_max_doc_chars: int = Field(200_000, description="CJK documents: more non-space characters: reject `gopher_long_doc`.")
    zh_min_stop_words: int = Field(2, description="CJK documents: fewer distinct Chinese function words (的 了 是 在 和 ...): reject.")
    zh_min_cjk_ratio: float = Field(0.3, description="A document with at least this share of CJK characters gets the CJK rules.")


class GopherRepetitionConfig(StepConfig):
    # Gopher, Rae et al. 2021, Table A1.
    dup_line_frac: float = Field(0.3, description="Share of duplicated lines above this: reject.")
    dup_para_frac: float = Field(0.3, description="Share of duplicated paragraphs above this: reject.")
    dup_line_char_frac: float = Field(0.2, description="Share of characters in duplicated lines above this: reject.")
    dup_para_char_frac: float = Field(0.2, description="Share of characters in duplicated paragraphs above this: reject.")
    top_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)],
        description="(n, max share of characters covered by the most frequent n-gram).")
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="(n, max share of characters covered by duplicated n-grams).")
    zh_top_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)],
        description="CJK documents: as top_n_grams, over CJK-aware word tokens (one per Han character).")
    zh_dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(10, 0.15), (12, 0.14), (14, 0.13), (16, 0.12), (18, 0.11), (20, 0.10)],
        description="CJK documents: as dup_n_grams over character tokens; Gopher's 5..10 words at ~2 characters "
                    "per word (5..10 characters rejected 41 of 1,848 clean CMRC/DRCD passages that repeat names).")


class C4Config(StepConfig):
    # C4, Raffel et al. 2020, Section 2.2 (datatrove C4QualityFilter defaults).
    split_paragraph: bool = Field(True, description="Apply line rules per newline-separated line.")
    remove_citations: bool = Field(True, description="Remove Wikipedia-style citation marks like [1], [edit].")
    filter_no_terminal_punct: bool = Field(True, description="Drop lines that do not end in terminal punctuation (incl. 。！？).")
    min_num_sentences: int = Field(5, description="Fewer sentences left: reject `c4_too_few_sentences` (-1 disables).")
    min_words_per_line: int = Field(3, description="Drop lines with fewer words (CJK: characters / 2 count as words).")
    max_word_length: int = Field(1000, description="Drop lines with a longer word (characters).")
    filter_lorem_ipsum: bool = Field(True, description="Reject documents containing 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Drop lines mentioning 'javascript'.")
    filter_curly_bracket: bool = Field(True, description="Reject documents containing '{' (code-like).")
    filter_policy: bool = Field(True, description="Drop lines with cookie/terms-of-use/privacy-policy boilerplate.")


class FineWebConfig(StepConfig):
    # FineWeb, Penedo et al. 2024, Section 3.4 (datatrove FineWebQualityFilter defaults).
    line_punct_thr: float = Field(0.12, description="Share of lines ending in punctuation below this: reject.")
    line_punct_exclude_zero: bool = Field(False, description="Do not reject documents with no punctuated line at all.")
    short_line_thr: float = Field(0.67, description="Share of short lines above this: reject.")
    short_line_length: int = Field(30, description="A line shorter than this (characters) is short; CJK: 15.")
    char_duplicates_ratio: float = Field(0.01, description="Share of characters in duplicated lines above this: reject.")
    new_line_ratio: float = Field(0.3, description="Newlines per word above this: reject (CJK: per 2 characters).")


class HeuristicsConfig(Strict):
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)


class BlocklistConfig(StepConfig):
    words: list[str] = Field(default_factory=list, description="Blocked words/phrases (Latin: whole word, case-insensitive; CJK: substring).")
    files: list[str] = Field(default_factory=list, description="Files with one blocked word/phrase per line (# comments).")
    min_hits: int = Field(1, ge=1, description="Reject when at least this many blocked occurrences are found.")


class PIIConfig(StepConfig):
    types: list[Literal["email", "phone", "id_card", "bank_card", "ip", "ssn", "iban"]] = Field(
        default_factory=lambda: ["email", "phone", "id_card", "bank_card", "ip", "ssn", "iban"],
        description="PII kinds to replace by typed tokens (<EMAIL>, <PHONE>, <ID_NUM>, <BANK_CARD>, <IP>, <SSN>, "
        "<IBAN>).")
    boilerplate: bool = Field(True, description="Remove repost/source boilerplate lines (转载自…, 本文来源…, 'Originally published at').")


class DecontamSource(Strict):
    name: str = Field(description="Benchmark name reported for each removed document.")
    path: str = Field(description="File or directory of the evaluation set.")
    format: Literal["auto", "hellaswag", "piqa", "arc", "lambada", "ceval", "jsonl", "text"] = Field(
        "auto", description="Layout of the evaluation set; auto guesses from the file name.")


class DecontamConfig(StepConfig):
    ngram: int = Field(13, ge=3, description="n-gram length in words (CJK: characters); 13 as in GPT-3, Brown et al. 2020.")
    cjk_ngram: int | None = Field(
        20, ge=3, description="n-gram length in characters for evaluation items that are mostly CJK text (None: use "
        "ngram). 13 Han characters are ~7 words and match entity names; 20 had no false positives on CMRC/DRCD.")
    min_matches: int = Field(1, ge=1, description="Reject when at least this many distinct eval n-grams occur in the document.")
    sources: list[DecontamSource] = Field(default_factory=list, description="Evaluation sets to protect.")


class ExactDedupConfig(StepConfig):
    pass


class MinHashConfig(StepConfig):
    # FineWeb: 5-gram word shingles, 112 hashes = 14 bands x 8 rows
    # (merge chance 50% at Jaccard 0.685, 92% at 0.8, 5% at 0.5).
    ngram: int = Field(5, ge=1, description="Shingle length in words.")
    cjk_ngram: int = Field(5, ge=1, description="Shingle length in characters for CJK text.")
    bands: int = Field(14, ge=1, description="LSH bands.")
    rows: int = Field(8, ge=1, description="Hashes per band.")
    seed: int = Field(1, description="Seed of the hash permutations.")
    hash_family: Literal["mersenne", "multiply_shift", "rensa"] = Field(
        "mersenne", description="The permutations: `mersenne`, (a*x + b) mod (2^61 - 1), datatrove's and datasketch's "
        "family, exact in 64-bit limbs (~14 array passes each); `multiply_shift`, ((a*x + b) mod 2^64) >> 32, "
        "Dietzfelbinger's strongly universal family, 2 passes and one shift per document (several times faster); "
        "`rensa`, the Rust rensa package's RMinHash over smelt's own shingle hashes (pip install 'smelt[rensa]'; "
        "faster still). Each family has its own signatures, so its own borderline decisions.")
    verify_jaccard: float | None = Field(
        None, ge=0.0, le=1.0, description="If set, only merge candidate pairs whose true shingle Jaccard is at least this "
        "(e.g. 0.5 guarantees no merge below it; 14x8 LSH alone merges ~5% of pairs at 0.5).")


class LineDedupConfig(StepConfig):
    mode: Literal["lines", "sentences"] = Field("lines", description="Unit: lines, or spans of 3 sentences (C4).")
    max_repeats: int = Field(1, ge=1, description="A unit seen in more than this many documents is repeated.")
    keep_first: bool = Field(True, description="Keep a repeated unit in its first document (corpus order), remove it elsewhere.")
    min_chars: int = Field(20, ge=1, description="Shorter units are never removed.")
    skip_domains: list[str] = Field(default_factory=lambda: ["code"], description="Never apply to these domains.")


class RegisteredStepConfig(StepConfig):
    """A step from the curation step registry (`smelt.data.steps.registry`), e.g. a model-based filter."""

    name: str = Field(description="Registered step name; an unknown name fails before any work.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="The step's own settings, validated by the options model it registered.")


class DedupConfig(Strict):
    exact: ExactDedupConfig = Field(default_factory=ExactDedupConfig)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    lines: LineDedupConfig = Field(default_factory=LineDedupConfig)


class ExecutorConfig(Strict):
    """`data.executor`: where the curation stage's per-task phases run. The output does not depend
    on it (and it is not part of the stage's key): the same tasks, the same completion markers."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: this machine's process pool (`workers`); ray: one Ray task per curation task "
        "(`pip install 'smelt[ray]'`).")
    address: str | None = Field(
        None, description="ray: null starts a Ray instance on this machine (or, with RAY_ADDRESS set, as under "
        "`ray job submit`, joins that cluster); `auto` joins the cluster this machine belongs to (`ray start`); "
        "`ray://host:10001` connects a Ray client. An initialized Ray is used as it is.")
    cpus_per_task: float = Field(1.0, gt=0, description="ray: CPUs reserved per task (`num_cpus`).")
    memory_gb_per_task: float | None = Field(None, gt=0, description="ray: memory reserved per task (scheduling only).")
    max_retries: int = Field(3, ge=0, description="ray: times a task is retried after it raises or its worker dies.")
    runtime_env: dict[str, Any] | None = Field(
        None, description="ray: Ray's runtime_env for the job (env_vars, py_modules, pip, ...), when this process "
        "starts or joins Ray.")
    lsh_splits: int = Field(
        1, ge=1, description="sharded_dedup: tasks per LSH band, each holding the band keys with key % lsh_splits "
        "equal to its index (a bucket is never cut), so a task holds 1/lsh_splits of a band. Same decisions.")
    sharded_dedup: bool | None = Field(
        None, description="Run the dedup phase as tasks (exact dedup by hash partition, one task per LSH band, "
        "Jaccard verification by pair shard) so that no process holds every signature; null: on with Ray. Same "
        "decisions either way.")


class DataConfig(Strict):
    """`data:` the curation stage (`smelt data`)."""

    inputs: list[InputSource] = Field(description="Input sources, each with a domain label.")
    output_format: Literal["jsonl.zst", "parquet"] = Field("jsonl.zst", description="Format of kept/rejects/duplicates shards.")
    workers: int = Field(0, ge=0, description="Worker processes; 0 = number of CPU cores.")
    files_per_task: int = Field(1, ge=1, description="Input files grouped into one task (many small .txt files).")
    max_task_mb: float | None = Field(
        64.0, gt=0, description="Local JSON-lines files larger than this (decompressed, estimated for gzip/zstd) "
        "are split into line-aligned byte ranges and Parquet files into runs of row groups, one task each, so one "
        "huge file does not leave workers idle; the parts are written into the shards one task would have written (the "
        "same output bytes). null: "
        "one task per file.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    max_doc_chars: int = Field(1_000_000, ge=1, description="Longer documents are rejected at read time (`too_long`).")
    min_doc_chars: int = Field(1, ge=1, description="Shorter documents (after stripping) are rejected as `empty`.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    heuristics: HeuristicsConfig = Field(default_factory=HeuristicsConfig)
    blocklist: BlocklistConfig = Field(default_factory=lambda: BlocklistConfig(enabled=False))
    pii: PIIConfig = Field(default_factory=PIIConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    steps: list[RegisteredStepConfig] = Field(
        default_factory=list, description="Registered steps (quality classifier, reference-LM perplexity, ...), run in "
        "this order after blocklist and before pii.")

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: list[InputSource]) -> list[InputSource]:
        if not v:
            raise ValueError("at least one input source is required")
        return v


# --------------------------------------------------------------------------------------------
# tokenizer, pack, loader


class TokenizerConfig(Strict):
    """`tokenizer:` training a tokenizer on the curated shards (`smelt tokenizer`)."""

    kind: Literal["bpe", "unigram", "wordpiece"] = Field("bpe", description="Byte-level BPE (default), Unigram or WordPiece.")
    vocab_size: int = Field(32_000, ge=256, description="Target vocabulary size, special tokens included (before rounding).")
    vocab_multiple: int = Field(128, ge=1, description="Round the final vocabulary up to a multiple of this (embedding shards evenly).")
    min_frequency: int = Field(2, ge=1, description="Minimum pair/token frequency to be merged or kept.")
    sample_chars_per_domain: int = Field(
        20_000_000, ge=1000, description="Training text budget per domain in characters, so one domain cannot dominate.")
    domain_weights: dict[str, float] | None = Field(
        None, description="Scale each domain's budget (e.g. {zh: 1.5, code: 0.5}); None: equal budgets.")
    split_digits: bool = Field(True, description="Split numbers into single digits (LLaMA, DeepSeek).")
    num_sentinels: int = Field(32, ge=0, description="UL2/T5 denoising sentinel tokens <|sentinel_0|>... to reserve.")
    added_tokens: list[str] = Field(default_factory=list, description="User tokens added as special (never split) tokens.")
    max_doc_chars: int = Field(100_000, ge=100, description="Longer training documents are cut to this many characters.")
    eval_docs_per_domain: int = Field(500, ge=1, description="`smelt tokenizer eval`: documents per domain to evaluate.")
    inputs: list[str] | None = Field(
        None, description="Curated shard directories or files to train on; None: the run's data/clean/.")


class PackConfig(Strict):
    """`pack:` tokenizing curated shards into token shards (`smelt pack`)."""

    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="Share of each domain's documents held out for validation.")
    max_val_docs: int = Field(2000, ge=0, description="Cap on held-out documents per domain.")
    min_val_docs: int = Field(1, ge=0, description="Hold out at least this many documents per domain (when it has more than one).")
    shard_tokens: int = Field(50_000_000, ge=1000, description="Target tokens per .bin shard.")
    engine: Literal["auto", "hf", "tiktoken"] = Field(
        "auto", description="Encoder: auto uses tiktoken for byte-level BPE when it reproduces HF ids exactly, else HF.")
    workers: int = Field(0, ge=0, description="Parallel tasks (threads or processes); 0 = number of CPU cores.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="kind: ray runs the tokenize and "
                                     "assemble tasks as Ray tasks (same output; not part of the stage's key).")
    add_bos: bool = Field(False, description="Prepend BOS to every document (EOS always ends one).")
    slice_mb: float | None = Field(
        None, gt=0, description="Input files larger than this (MB on disk) are cut into several tasks; "
                                "unset: 1/64 of the input, between 1 and 32 MB.")
    parallelism: Literal["auto", "threads", "processes"] = Field(
        "auto", description="How workers run: threads in this process (no start-up cost; tiktoken and HF release "
                            "the GIL while encoding) or spawned processes (no GIL). auto: threads below "
                            "threads_below_mb of input.")
    threads_below_mb: float = Field(
        16.0, ge=0, description="parallelism=auto: inputs smaller than this (MB on disk, all files) use threads.")


class CurriculumStage(Strict):
    until_tokens: int = Field(ge=1, description="This stage lasts until this many training tokens have been consumed.")
    weights: dict[str, float] = Field(description="Domain mixture weights during this stage.")


class ObjectiveConfig(Strict):
    kind: Literal["causal", "fim", "prefix_lm", "ul2"] = Field("causal", description="Training objective.")
    fim_rate: float = Field(0.5, ge=0.0, le=1.0, description="FIM: share of documents transformed.")
    fim_spm_rate: float = Field(0.5, ge=0.0, le=1.0, description="FIM: share of transformed documents in SPM order (else PSM).")
    prefix_min: float = Field(0.1, gt=0.0, lt=1.0, description="Prefix LM: smallest prefix length as a share of the sequence.")
    prefix_max: float = Field(0.9, gt=0.0, lt=1.0, description="Prefix LM: largest prefix length as a share of the sequence.")
    ul2_mix: dict[str, float] = Field(default_factory=lambda: {"R": 0.5, "S": 0.25, "X": 0.25},
                                      description="UL2 denoiser mixture: R (short spans), S (prefix), X (extreme).")
    ul2_mode_tokens: bool = Field(
        True, description="UL2: start each example with a paradigm token ([NLU]/[NLG]/[S2S] = the last three sentinels).")

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.prefix_min > self.prefix_max:
            raise ValueError(f"prefix_min {self.prefix_min} > prefix_max {self.prefix_max}")
        bad = set(self.ul2_mix) - {"R", "S", "X"}
        if bad:
            raise ValueError(f"ul2_mix keys must be R, S or X, not {sorted(bad)}")
        if not any(v > 0 for v in self.ul2_mix.values()):
            raise ValueError("ul2_mix needs a positive weight")
        return self


class LoaderConfig(Strict):
    """`loader:` how training sequences are drawn from `tokens/`."""

    seq_len: int = Field(1024, ge=8, description="Tokens per training sequence (the loader reads seq_len + 1).")
    weights: dict[str, float] | None = Field(
        None, description="Domain mixture weights (normalized), e.g. {zh: 4, en: 4, code: 2}; None: by token count.")
    max_epochs: float = Field(4.0, gt=0.0, description="Cap on how many times a small domain is repeated (upsampling).")
    reuse_decay: float = Field(
        0.937, gt=0.0, le=1.0, description="Sampling-weight factor per completed epoch of a domain (reused data is "
        "drawn less); exp(-1/15.4) from the decay of repeated data's value, Muennighoff et al. 2023.")
    curriculum: list[CurriculumStage] = Field(
        default_factory=list, description="Stages overriding `weights` until a token count; the last stage's weights persist.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    document_mask: bool = Field(False, description="Emit segment ids so attention does not cross document boundaries.")
    seed: int | None = Field(None, description="Loader seed; None: the recipe seed.")

    @field_validator("curriculum")
    @classmethod
    def _increasing(cls, v: list[CurriculumStage]) -> list[CurriculumStage]:
        ends = [s.until_tokens for s in v]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"curriculum until_tokens must increase strictly, got {ends}")
        return v


# --------------------------------------------------------------------------------------------
# train


class OptimConfig(Strict):
    name: Literal["adamw", "adafactor"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (LLaMA: 0.9, 0.95).")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay (LLaMA: 0.1); never on norms and biases.")
    decay_embeddings: bool = Field(False, description="Apply weight decay to the embedding (and untied output) matrices.")
    fused: bool = Field(False, description="Use the fused/foreach AdamW kernel where available.")


class ScheduleConfig(Strict):
    kind: Literal["cosine", "linear", "constant", "wsd", "inv_sqrt"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup from 0 to the peak LR, in optimizer steps.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final LR as a share of the peak (cosine, linear, wsd).")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="WSD: share of the steps spent in the final decay.")


class BatchConfig(Strict):
    global_batch: int = Field(32, ge=1, description="Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch: int = Field(8, ge=1, description="Sequences per forward/backward on one rank (gradient accumulation "
                                                  "fills the rest); unset: 8, or global_batch when that is smaller.")
    ramp_start: int | None = Field(None, ge=1, description="Batch-size ramp: start at this global batch (sequences); None: no ramp.")
    ramp_tokens: int = Field(0, ge=0, description="Batch-size ramp: tokens over which the batch grows linearly to global_batch.")

    @model_validator(mode="before")
    @classmethod
    def _default_micro(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("micro_batch") is None and isinstance(data.get("global_batch"), int) \
                and 1 <= data["global_batch"] < 8:
            data = {**data, "micro_batch": data["global_batch"]}
        return data

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> BatchConfig:
        # Checked here, before any stage runs; the trainer checks micro_batch x data-parallel ranks
        # again once the world size is known.
        if self.global_batch % self.micro_batch:
            raise ValueError(f"train.batch.global_batch ({self.global_batch}) must be a multiple of "
                             f"train.batch.micro_batch ({self.micro_batch})")
        return self


class StabilityConfig(Strict):
    nan_guard: bool = Field(True, description="Skip the update when loss or grad norm is NaN/Inf.")
    spike_policy: Literal["none", "skip", "rollback"] = Field("skip", description="What to do on a loss spike.")
    spike_window: int = Field(50, ge=5, description="Trailing window (steps) for the spike statistics.")
    spike_sigma: float = Field(6.0, gt=0.0, description="Spike: loss above mean + this many standard deviations of the window.")
    spike_ema_ratio: float = Field(3.0, gt=1.0, description="Spike: loss above this multiple of its EMA.")
    rollback_lr_scale: float = Field(0.5, gt=0.0, le=1.0, description="After a rollback, scale the LR by this for rollback_lr_steps.")
    rollback_lr_steps: int = Field(100, ge=0, description="Steps during which the rollback LR scale applies.")
    max_rollbacks: int = Field(5, ge=0, description="Give up (error) after this many rollbacks.")
    max_consecutive_skips: int = Field(
        10, ge=1, description="After this many skipped updates in a row: a spike streak is a new loss level (accept "
        "the step and restart the spike statistics); a NaN/Inf streak stops training (error).")


class CheckpointConfig(Strict):
    every: int = Field(500, ge=1, description="Save every this many optimizer steps (and at the end).")
    keep: int = Field(3, ge=1, description="Keep the last this many checkpoints.")


class ParallelConfig(Strict):
    """`train.parallel:` how the model and data are split over processes (smelt.train.parallel).

    The world (torchrun's WORLD_SIZE) is a DeviceMesh ``pp x dp_replicate x dp_shard x tp``. Data
    parallel ranks (dp_replicate * dp_shard) each get their slice of the global batch; tp and pp
    ranks of one data-parallel rank see the same rows. Checked against the world size (and the
    model) before any work by `smelt.train.parallel.ParallelDims.build`.
    """

    dp_replicate: int = Field(1, ge=1, description="Data-parallel replicas (DDP, or the replicate dim of HSDP with zero 2/3).")
    dp_shard: int = Field(-1, ge=-1, description="Data-parallel shards (FSDP dim with zero 2/3, more DDP ranks with zero 0/1); -1: the rest of the world.")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (Megatron column/row sharding of attention and MLP).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel stages over ranks (layers split evenly).")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field("1f1b", description="Pipeline schedule (torch.distributed.pipelining).")
    pp_microbatches: int | None = Field(None, ge=1, description="Pipeline micro-batches per gradient-accumulation step; None: the number of stages.")
    pp_stages_per_rank: int = Field(2, ge=1, description="interleaved_1f1b: virtual stages per rank (ignored by the single-stage schedules).")
    zero: Literal[0, 1, 2, 3] = Field(0, description="0: DDP; 1: DDP + ZeroRedundancyOptimizer; 2: FSDP2 without resharding after forward; 3: FSDP2 full sharding.")
    cpu_offload: bool = Field(False, description="zero 3: keep sharded parameters, gradients and optimizer state on CPU (FSDP2 CPUOffloadPolicy).")
    sequence_parallel: bool = Field(True, description="tp > 1: also shard norms and residual activations over the sequence (Korthikanti et al. 2022).")


class TrainConfig(Strict):
    """`train:` the trainer (`smelt train`)."""

    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, bf16 autocast (CPU/GPU), fp16 with loss scaling (GPU).")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this (0: off).")
    z_loss: float = Field(0.0, ge=0.0, description="Weight of the z-loss on the log-partition (PaLM: 1e-4); 0: off.")
    moe_aux_weight: float = Field(0.01, ge=0.0, description="Weight of the MoE load-balancing loss (Switch: 0.01).")
    activation_checkpointing: Literal["none", "full", "every_k"] = Field("none", description="Recompute activations in backward.")
    ac_every: int = Field(2, ge=1, description="every_k: checkpoint every k-th block.")
    compile: bool = Field(False, description="torch.compile the model.")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log_every: int = Field(10, ge=1, description="Write metrics every this many steps.")
    eval_every: int = Field(200, ge=0, description="Validation loss per domain every this many steps (0: only at the end).")
    eval_batches: int = Field(10, ge=1, description="Validation batches per domain.")
    peak_tflops: float | None = Field(None, gt=0.0, description="Peak TFLOP/s for MFU; None: measured matmul peak on CPU, 989 (H100 bf16) on GPU.")
    tensorboard: bool = Field(True, description="Also write TensorBoard events.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Data/tensor/pipeline parallelism.")
    init_from: str | None = Field(
        None, description="Initialize model weights from this checkpoint (e.g. an imported run's "
        "train/checkpoints/step-0000000, or a run dir: its newest complete checkpoint) at step 0; optimizer, step, "
        "RNG and data position start fresh. Relative to the working directory. Ignored when the run resumes from "
        "its own checkpoint.")


class EvalConfig(Strict):
    """`eval:` evaluation of checkpoints (`smelt eval`; issue 5: owner of this block)."""

    class Task(Strict):
        """One multiple-choice benchmark scored by log-likelihood (`smelt.eval.tasks`)."""

        name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Name in results.json and TensorBoard.")
        path: str = Field(description="Benchmark file or directory (C-Eval: a subject CSV or the val/ directory).")
        format: Literal["hellaswag", "piqa", "arc", "ceval", "jsonl"] = Field(
            description="hellaswag: 6-line text items; piqa: X.jsonl + X-labels.lst; arc: official ARC jsonl; "
            "ceval: C-Eval CSV; jsonl: {\"context\", \"choices\", \"gold\"} per line.")
        shots: int = Field(0, ge=0, description="Few-shot examples before each item (drawn with eval.seed).")
        limit: int | None = Field(None, ge=1, description="Score only the first this many items; None: all.")
        fewshot_path: str | None = Field(
            None, description="File to draw few-shot examples from; None: the format's train/dev split when found "
            "beside `path`, else the same file without the current item.")
        delimiter: str = Field(" ", description="Between context and answer (lm-eval's target_delimiter).")

    run: list[Literal["perplexity", "probes", "tasks"]] = Field(
        default_factory=lambda: ["perplexity", "probes", "tasks"], description="Parts of `smelt eval` to run.")
    max_docs: int | None = Field(200, ge=1, description="Perplexity: held-out documents per domain, at most (None: all).")
    max_tokens: int | None = Field(
        200_000, ge=1, description="Perplexity: held-out tokens per domain, at most (whole documents; None: no cap).")
    max_len: int | None = Field(
        None, ge=2, description="Tokens per forward window; None: loader.seq_len, else the model's max_seq_len.")
    stride: int | None = Field(
        None, ge=1, description="Rolling window: new tokens scored per window after the first, each with up to "
        "max_len tokens of context; None: max_len (disjoint windows, lm-eval's loglikelihood_rolling).")
    word_ppl_max_cjk: float = Field(
        0.1, ge=0.0, le=1.0, description="Word perplexity only for domains whose share of CJK characters (of "
        "non-space characters) is at most this: words are whitespace-delimited, as in lm-eval.")
    probes: list[str] = Field(
        default_factory=lambda: ["default"], description="Probe files (YAML/JSONL); `default`: the packaged zh+en set.")
    tasks: list[Task] = Field(default_factory=list, description="Multiple-choice benchmarks.")
    texts: list[InputSource] = Field(
        default_factory=list, description="Fixed held-out texts scored for bits per byte beside the packed val "
        "split, each named by its `domain` (runs whose curation differs have different val splits; the same "
        "text makes them comparable). Read like data.inputs; at most max_docs documents and max_tokens tokens each.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Weights and activations during evaluation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    every_steps: int = Field(0, ge=0, description="In-training evaluation every this many optimizer steps (0: off).")
    in_training_docs: int = Field(
        16, ge=1, description="In-training evaluation: held-out documents per domain (small budget).")
    seed: int | None = Field(None, description="Few-shot sampling seed; None: the recipe seed.")
    tensorboard: bool = Field(True, description="Write scalars to eval/tb.")


class ExportConfig(Strict):
    """`export:` Hugging Face export (`smelt export`; issue 5: owner of this block)."""

    checkpoint: str | None = Field(None, description="Checkpoint directory to export; None: the run's newest complete one.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the exported weights.")
    max_shard_size: int | str = Field("5GB", description="Split model.safetensors above this size (bytes, or e.g. 500MB, 5GB; transformers' default 5GB).")
    parity_atol: float = Field(1e-4, gt=0.0, description="Max |Δ| of fp32 logits between smelt and transformers on the export (else an error).")


class RunConfig(Strict):
    """`run:` the whole pipeline (`smelt run`): which stages, the built-in demo corpus, the report."""

    stages: list[Literal["data", "tokenizer", "pack", "train", "eval", "export", "report"]] = Field(
        default_factory=lambda: ["data", "tokenizer", "pack", "train", "eval", "export", "report"],
        description="Stages `smelt run` runs, always in pipeline order.")
    demo: Literal["off", "full", "tiny"] = Field(
        "off", description="Assemble the built-in demo corpus into <run>/corpus before curation (full: ~3.5 MB; "
        "tiny: the tests' size, and the demo recipe's tiny overlay applies).")
    samples: int = Field(4, ge=0, description="Generated samples shown in the report (0: none).")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["The city council", "def read_config(path):", "市政府", "In Python, a list"],
        description="Prompts of the report's samples (cycled when `samples` is larger).")
    sample_tokens: int = Field(48, ge=1, description="New tokens per generated sample.")
    sample_temperature: float = Field(0.8, ge=0.0, description="Sampling temperature of the samples (0: greedy).")


class ScalingConfig(Strict):
    """`scaling:` a ladder of small training runs for a scaling-law fit (`smelt scaling sweep`;
    smelt.scaling.sweep). Each size n_layers = L gets dim = aspect_ratio * L (rounded to a multiple
    of head_dim), n_heads = dim / head_dim; each budget C gives every size D = C / 6N tokens."""

    budgets: list[float] = Field(
        default_factory=lambda: [5e11, 1.5e12, 5e12],
        description="Compute budgets C = 6ND, in FLOPs, one IsoFLOP profile each (default: ~30 min on 2 busy CPU "
        "cores with the default ladder, vocabulary 4096, seq 128, batch 16: 6.0M tokens in wsd mode).")
    depths: list[int] = Field(default_factory=lambda: [1, 2, 3, 4],
                              description="Model sizes, as numbers of layers (width from aspect_ratio).")
    aspect_ratio: int = Field(32, ge=1, description="d_model / n_layers (Kaplan et al. 2020, Fig. 5: loss is flat over "
                              "~20-200; GPU ladders: 64-128).")
    head_dim: int = Field(16, ge=2, description="Channels per attention head (GPU ladders: 64 or 128).")
    mode: Literal["isoflop", "wsd"] = Field(
        "wsd", description="isoflop: one run per (size, budget), the recipe's schedule fitted to its length "
        "(Chinchilla approach 2); wsd: one WSD run per size, extended budget by budget, each decay branched from "
        "the stable phase (Hagele et al. 2024), optimizer state kept.")
    decay_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="wsd: share of each run's steps in the final "
                                  "decay (Hagele et al. 2024: 20%).")
    max_warmup_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Warmup is the recipe's, capped at this share "
                                       "of the shortest run of a size.")
    min_steps: int = Field(20, ge=1, description="A (size, budget) giving fewer optimizer steps is skipped.")
    eval_batches: int | None = Field(None, ge=1, description="Validation batches per domain for each run's final "
                                     "loss; None: train.eval_batches.")


class Recipe(Strict):
    """A whole job. Stages read their own section."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="Run name: the run directory is <runs_dir>/<name>.")
    runs_dir: str = Field("runs", description="Parent directory of run directories (relative to the working directory), "
                          "or an fsspec URL (s3://bucket/runs, gs://..., file://...): the data, tokenizer and pack "
                          "stages then work through a local stage ($SMELT_STAGE_DIR) mirrored to the store.")
    seed: int = Field(1234, description="Global seed.")
    data: DataConfig | None = Field(None, description="Curation stage.")
    tokenizer: TokenizerConfig | None = Field(None, description="Tokenizer training stage.")
    pack: PackConfig | None = Field(None, description="Packing stage (text -> token shards).")
    loader: LoaderConfig | None = Field(None, description="Training data loader (mixture, curriculum, objective).")
    model: ModelConfig | None = Field(
        None, description="Model architecture (preset + overrides); vocab_size from tokens/manifest.json when None.")
    train: TrainConfig | None = Field(None, description="Training stage.")
    eval: EvalConfig | None = Field(None, description="Evaluation stage.")
    export: ExportConfig | None = Field(None, description="Hugging Face export stage.")
    scaling: ScalingConfig | None = Field(None, description="`smelt scaling sweep`: the ladder of small runs.")
    run: RunConfig = Field(default_factory=RunConfig, description="`smelt run`: stages, built-in demo, report.")

    @field_validator("runs_dir")
    @classmethod
    def _runs_dir_store(cls, v: str) -> str:
        if _URL_RE.match(v):
            check_filesystem(v)
        return v

    @model_validator(mode="after")
    def _sections_agree(self) -> Recipe:
        if self.loader is not None and self.loader.objective.kind == "ul2":
            obj = self.loader.objective
            have = (self.tokenizer or TokenizerConfig()).num_sentinels
            span = obj.ul2_mix.get("R", 0) > 0 or obj.ul2_mix.get("X", 0) > 0
            # Mode tokens take the last three sentinels; R and X spans need at least one more.
            need = (3 if obj.ul2_mode_tokens else 0) + (1 if span or obj.ul2_mode_tokens else 0)
            if have < need:
                why = " (3 paradigm tokens for loader.objective.ul2_mode_tokens, 1 for spans)" \
                    if obj.ul2_mode_tokens else ""
                raise ValueError(f"loader.objective.kind: ul2 needs tokenizer.num_sentinels >= {need}{why}, "
                                 f"the recipe has {have}")
        return self

    @property
    def run_url(self) -> str | None:
        """The run directory's URL when `runs_dir` is one (an object store); None when local."""
        return f"{self.runs_dir.rstrip('/')}/{self.name}" if _URL_RE.match(self.runs_dir) else None

    @property
    def run_dir(self) -> Path:
        """Where the stages read and write: ``<runs_dir>/<name>``, or for a `run_url` its local
        stage (`smelt.fsutil.RunMirror`)."""
        if _URL_RE.match(self.runs_dir):
            from smelt.fsutil import stage_root

            return stage_root(self.runs_dir) / self.name
        return Path(self.runs_dir) / self.name


# An fsspec-style URL (s3://, gs://, hf://, file://, ...): a scheme before "://".
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_filesystem(url: str) -> None:
    """ValueError naming what to install when `url`'s fsspec filesystem is unknown or its package
    (s3fs, gcsfs, adlfs, ...) is missing: before any work, not at the first write."""
    from fsspec.registry import get_filesystem_class

    proto = url.split("://", 1)[0].lower()
    try:
        get_filesystem_class(proto)
    except ImportError as e:
        raise ValueError(f"{url}: the {proto}:// filesystem needs its fsspec package, which is not installed "
                         f"({e})") from None
    except ValueError:
        raise ValueError(f"{url}: unknown filesystem protocol {proto}:// (fsspec knows s3, gs, az, hf, memory, "
                         "file, ...)") from None


def resolve_model_config(recipe: Recipe, tokens_manifest: dict[str, Any]) -> ModelConfig:
    """``recipe.model`` (default: ModelConfig()) with the vocabulary of ``tokens/manifest.json``
    filled in, checked against the tokenizer and the loader's sequence length: the model the
    trainer builds, and the one `smelt.train.load` rebuilds from a run directory."""
    mcfg = getattr(recipe, "model", None)
    if mcfg is None:
        mcfg = ModelConfig()
    elif isinstance(mcfg, dict):
        mcfg = ModelConfig.model_validate(mcfg)
    vocab = tokens_manifest.get("vocab_size")
    if mcfg.vocab_size is None:
        if vocab is None:
            raise RecipeError("invalid recipe:\n  model.vocab_size: not set, and tokens/manifest.json has no "
                              "vocab_size to take it from")
        mcfg = mcfg.with_vocab(int(vocab))
    elif vocab is not None and mcfg.vocab_size < int(vocab):
        raise RecipeError(f"invalid recipe:\n  model.vocab_size: {mcfg.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({vocab})")
    seq_len = recipe.loader.seq_len if recipe.loader is not None else 0
    if seq_len > mcfg.max_seq_len:
        raise RecipeError(f"invalid recipe:\n  loader.seq_len: {seq_len} exceeds model.max_seq_len "
                          f"({mcfg.max_seq_len})")
    return mcfg


# --------------------------------------------------------------------------------------------
# loading, overrides, errors


class RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error
    (YAML 1.2 says keys are unique; PyYAML would keep the last one silently). Used for every
    recipe read, through `load_yaml`."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given here may override it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeConstructor reports it below
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)



def load_yaml(text: str, name: str) -> Any:
    """Parse one YAML document with `RecipeLoader`; ``name`` (a file path) appears in error marks."""
    loader = RecipeLoader(text)
    loader.name = name  # marks say `in "<name>", line L, column C`, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {assignment!r}: empty key")
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_index(node, part, path)]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {path!r} is not a section")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {key}: parent is not a section")


def _index(lst: list, part: str, path: str) -> int:
    try:
        i = int(part)
        lst[i]
        return i
    except (ValueError, IndexError):
        raise RecipeError(f"--set: {path!r} needs a list index 0..{len(lst) - 1}") from None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Walk the schema along an error location to the model that owns the failing key."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        field = cur.model_fields.get(part)
        if field is None:
            return cur
        cur = _unwrap(field.annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    for arg in (typing.get_args(tp) or ()):
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return tp


def format_validation_error(err: ValidationError, root: type[BaseModel] = Recipe) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<recipe>"
        msg = e["msg"]
        if e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our validators' own sentence, without pydantic's "Value error, "
            if not loc or msg.startswith(path):  # the message names its keys itself
                lines.append(f"  {msg}")
                continue
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            allowed = sorted(owner.model_fields) if owner else []
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {path}: {msg}" + (f" (got {e['input']!r})" if e["type"] not in ("missing", "extra_forbidden") and not isinstance(e.get("input"), dict) else ""))
    return "invalid recipe:\n" + "\n".join(lines)


def parse_recipe(tree: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    tree = copy.deepcopy(tree or {})
    if not isinstance(tree, dict):
        raise RecipeError("invalid recipe: the top level must be a mapping of sections")
    for ov in overrides or []:
        apply_override(tree, ov)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file (``None``: an empty recipe plus overrides)."""
    return parse_recipe(read_recipe_tree(path) if path is not None else {}, overrides)


def read_recipe_tree(path: str | Path) -> dict[str, Any]:
    """A recipe file as a plain mapping (`load_yaml`), before overrides and validation."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe not found: {p}")
    try:
        tree = load_yaml(p.read_text(encoding="utf-8"), str(p)) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not UTF-8 text") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{p}: the top level must be a mapping of sections")
    return tree


def write_resolved_recipe(recipe: Recipe, source: str | None) -> Path:
    """Create the run directory and write the resolved recipe (overrides applied) into it,
    atomically, with a header naming where it came from."""
    from smelt.fsutil import atomic_write_text

    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# resolved recipe (from {source or 'defaults'}, overrides applied)\n"
    atomic_write_text(run_dir / "recipe.yaml",
                      header + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True))
    return run_dir


def recipe_to_dict(recipe: BaseModel) -> dict[str, Any]:
    return json.loads(recipe.model_dump_json())


def config_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable short hash of a config section (manifests use it to decide whether to redo work)."""
    d = recipe_to_dict(section) if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
