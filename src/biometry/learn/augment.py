"""Data order and augmentation: pure functions of (seed, iteration), applied to whole batches
on the training device (see :mod:`biometry.learn.trainer` for the decisions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def batch_positions(n_train: int, batch_size: int, iteration: int, seed: int) -> np.ndarray:
    """Positions (into the training subjects) of the batch of ``iteration``, shape (batch_size,).

    Subjects are visited epoch by epoch, each epoch in the permutation
    ``default_rng([seed, 0, epoch]).permutation(n_train)``; a batch may span two epochs.
    """
    if n_train < 1:
        raise ValueError("no training subjects")
    pos = np.arange(iteration * batch_size, (iteration + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(pos, n_train)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, 0, int(e)]).permutation(n_train)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def batch_shifts(batch_size: int, iteration: int, seed: int, translate_px: int) -> np.ndarray:
    """Integer translations (dy, dx) in [-translate_px, translate_px] per sample, (batch_size, 2)."""
    rng = np.random.default_rng([seed, 1, iteration])
    return rng.integers(-translate_px, translate_px + 1, size=(batch_size, 2), dtype=np.int64)


def translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image of a batch by its own integer shift, replicating the edges.

    Parameters
    ----------
    x : (B, C, H, W) tensor of any dtype (uint8 is cheapest).
    shifts : (B, 2) integer tensor (dy, dx) on the same device: content moves down by dy rows and
        right by dx columns; pixels shifted in from outside copy the nearest edge pixel.

    Returns
    -------
    (B, C, H, W) tensor, same dtype and device: ``out[b, c, i, j] = x[b, c, clip(i - dy), clip(j - dx)]``.
    """
    b, c, h, w = x.shape
    shifts = shifts.to(device=x.device, dtype=torch.long)
    rows = (torch.arange(h, device=x.device)[None, :] - shifts[:, :1]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None, :] - shifts[:, 1:]).clamp_(0, w - 1)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def to_input(x: torch.Tensor, input_size: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], resized (antialiased bilinear) to ``input_size``."""
    x = x.float().div_(255.0)
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x


