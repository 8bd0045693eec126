"""Executors run curation tasks: a local process pool now, the same tasks on Ray later."""
