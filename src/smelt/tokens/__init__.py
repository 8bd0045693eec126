"""Token shards, packing (text -> tokens), the training data loader and objectives."""
