"""Judging predictions: metrics (R², MAE, LoA, ICC, AUC), the linear baseline, agreement between
methods and sides, per-field evaluation, UMAP. Reads predictions, never models: may import
``config`` and ``data``; never ``learn``, ``runs`` or ``cli``."""
