"""biometry: image-based deep regression on whole-body MRI.

Thin library under parameterised notebooks, in rooms by lifecycle (``docs/architecture.md``):
``config`` (studies, fields, formats, paths) → ``data`` (stations → fused volumes → 2D formats →
store) and ``phantom`` → ``learn`` (splits, models, training) and ``analysis`` (metrics,
agreement, evaluation) → ``inference`` and ``report`` (plots, explorer) → ``runs`` (notebooks,
batches, demo, figures) → ``cli``. ``biometry.formats`` and ``biometry.stats`` are the contract
names of DESIGN.md.
"""

from __future__ import annotations

__version__ = "0.1.0"
