"""Deduplication: exact (hash of normalized text), near (MinHash LSH) and line/sentence level."""
