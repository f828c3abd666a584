"""Images in, prepared arrays out: UKB zips and NIfTI stations → fused volumes → 2D formats → the
memory-mapped store, and the release's field table. May import ``config``; never ``learn``,
``analysis``, ``runs`` or ``cli``."""
