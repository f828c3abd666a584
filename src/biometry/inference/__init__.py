"""Applying trained models to new data: calibrated uncertainty and the inference engine. May import
``config``, ``data``, ``learn`` and ``analysis``; never ``runs`` or ``cli``."""
