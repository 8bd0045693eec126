"""Tokenizer training (HF tokenizers: byte-level BPE, Unigram, WordPiece) and evaluation."""
