"""The fused-volume type and the UKB reference geometry (contract).

A fused volume is indexed ``(x, y, z)`` = (patient right→left, anterior→posterior,
inferior→superior), i.e. DICOM's LPS+ patient axes. Its ``affine`` maps voxel indices to NIfTI
world coordinates (RAS+, mm), so it can be written with nibabel unchanged: +x in RAS world points
to the patient's *right*, which is why the first two diagonal entries of an LPS-indexed affine are
negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: UKB neck-to-knee reference grid: in-plane spacing and fused slice thickness (mm).
UKB_SPACING: tuple[float, float, float] = (2.232142857, 2.232142857, 3.0)
#: In-plane voxel counts of a UKB station: 224 (L-R) x 174 (A-P).
UKB_INPLANE: tuple[int, int] = (224, 174)
#: Approximate number of fused slices at 3 mm.
UKB_FUSED_SLICES: int = 370
#: Posterior voxels of the A-P axis that hold the scanner bed (the papers crop 22 at 2.232 mm).
BED_VOXELS_AT_UKB: int = 22


def lps_index_affine(spacing: tuple[float, float, float],
                     origin_ras: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine for an array indexed (right→left, anterior→posterior, inferior→superior).

    Index +i moves to the patient's left (RAS x decreases), +j posterior (RAS y decreases),
    +k superior (RAS z increases). ``origin_ras`` is the world position of voxel (0, 0, 0).
    """
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin_ras
    return aff


def fat_fraction(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """F / (W + F) in [0, 1], float32 (two-point Dixon, no T2* correction).

    0 where W + F <= 0; NaN stays NaN, so that a corrupt voxel can be reported, not hidden.
    """
    total = water.astype(np.float32) + fat
    out = np.zeros_like(total)
    np.divide(fat, total, out=out, where=(total > 0) | ~np.isfinite(total))
    return np.where(np.isfinite(out), np.clip(out, 0.0, 1.0), out)


@dataclass
class Volume:
    """A fused water/fat volume of one subject.

    Attributes
    ----------
    water, fat : (X, Y, Z) float32 arrays in LPS index order (see module docstring).
    spacing : voxel size in mm along (x, y, z).
    affine : 4x4 voxel-index → RAS+ world (mm).
    eid : subject identifier, where known.
    meta : free-form provenance (station count, seam mismatch, ...).
    """

    water: np.ndarray
    fat: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    eid: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.water.shape != self.fat.shape:
            raise ValueError(
                f"subject {self.eid}: water {self.water.shape} and fat {self.fat.shape} differ in shape"
            )
        if self.water.ndim != 3:
            raise ValueError(f"subject {self.eid}: a volume is 3-D, got shape {self.water.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.water.shape)

    def fat_fraction(self) -> np.ndarray:
        """F / (W + F) of this volume (see :func:`fat_fraction`)."""
        return fat_fraction(self.water, self.fat)


@dataclass
class Station:
    """One acquired station (slab) of a subject, as stored in a NIfTI file or a DICOM series.

    Attributes
    ----------
    index : station number, 1 (neck) .. 6 (knees), as in UKB.
    water, fat : 3-D float32 arrays in the voxel order of ``affine`` (any axis order/direction).
    affine : 4x4 voxel-index → RAS+ world (mm), as in NIfTI.
    meta : free-form (series time, series number, ...).
    """

    index: int
    water: np.ndarray
    fat: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
