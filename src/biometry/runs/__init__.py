"""Orchestration: the papermill wrapper, run folders and provenance, batches on Dask, the demo and
the figure builder. May import every room below it; only ``cli`` imports ``runs``."""
