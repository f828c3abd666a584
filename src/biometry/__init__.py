"""biometry: image-based deep regression on whole-body MRI.

Thin library under parameterised notebooks. See the README for the front door (``make demo``,
``make test``) and ``docs/`` for the design decisions.
"""

from __future__ import annotations

__version__ = "0.1.0"
