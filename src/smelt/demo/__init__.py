"""The built-in demo: a small multi-domain corpus assembled offline (`smelt.demo.corpus`) and the
check of every planted problem against what curation did with it (`smelt.demo.outcomes`)."""
