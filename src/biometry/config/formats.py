"""The registry of 2D formats: name -> shape and dtype of one subject's image in the prepared store.

The one place where a format's shape is written down. :mod:`biometry.data.formats` computes the
images (and checks them against these shapes); a study (:mod:`biometry.config.study`) checks its
``format`` and channel count against them; the store allocates its arrays from them.
"""

from __future__ import annotations

import numpy as np

#: Output side of the square formats (pixels).
SQUARE: int = 256
#: Fat-fraction slice format: rows (upper part of the body) and columns (224 + 174 - 22).
FF_SHAPE: tuple[int, int] = (176, 376)
#: Thigh slices: default number and output size (rows = A-P, columns = R-L at the UKB grid).
THIGH_SLICES: int = 15
THIGH_SIZE: tuple[int, int] = (152, 224)

#: format name -> ((channels, height, width), dtype)
FORMAT_SPECS: dict[str, tuple[tuple[int, int, int], np.dtype]] = {
    "projection": ((2, SQUARE, SQUARE), np.dtype(np.uint8)),
    "fat_fraction_slices": ((1, *FF_SHAPE), np.dtype(np.uint8)),
    "mimir": ((3, SQUARE, SQUARE), np.dtype(np.uint8)),
    "thigh": ((THIGH_SLICES, *THIGH_SIZE), np.dtype(np.uint8)),
    # the original MIMIR images, for original modules (biometry.data.formats.mimir_original)
    "mimir_original": ((3, SQUARE, SQUARE), np.dtype(np.uint8)),
}


def format_shape(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of format ``name``; ``KeyError`` naming the known formats."""
    try:
        return FORMAT_SPECS[name][0]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known: {', '.join(FORMAT_SPECS)}") from None
