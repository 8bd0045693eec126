"""Curation steps, one module per family. Each step is a `smelt.data.pipeline.Step`."""
