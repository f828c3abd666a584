"""Networks and their training: subject-level splits, models and heads, augmentation, losses, the
training loop, model bundles and cross-validation glue. May import ``config`` and ``data``; never
``analysis``, ``runs`` or ``cli``."""
