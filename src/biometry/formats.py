"""The 2D formats by their contract names (DESIGN.md): ``biometry.formats.projection(vol)`` etc.

The implementation lives in :mod:`biometry.data.formats`; this module only names its public API
under the path that users and the design document rely on.
"""

from __future__ import annotations

from biometry.data.formats import (
    FORMATS,
    compute,
    fat_fraction_slices,
    mimir,
    projection,
    thigh_slices,
)

__all__ = ["FORMATS", "compute", "fat_fraction_slices", "mimir", "projection", "thigh_slices"]
