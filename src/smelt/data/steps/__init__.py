"""Curation steps, one module per family. Each step is a `smelt.data.pipeline.Step`;
`registry` maps step names to the factories that build them (built-in and registered from above)."""
