"""A phantom subject's truth labels in the geometry of the 2D projection format.

The projections of :func:`biometry.data.formats.projection` are made from the fused volume by
cropping the posterior bed, averaging along A-P (coronal) and R-L (sagittal), turning the views
head up (radiological convention), placing them side by side and resizing to 256 x 256. The same
steps (the same functions of :mod:`biometry.data.formats`) applied to a tissue's indicator volume
give where that tissue lies in the network's input: saliency maps can then be checked against the
anatomy (:func:`biometry.analysis.saliency.anatomy_metrics`).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from biometry.config.formats import SQUARE
from biometry.data.formats import bed_crop, mean_views, projection_split, resize
from biometry.phantom.anatomy import LABELS
from biometry.phantom.writer import label_path

#: named regions -> the label values they hold
REGIONS: dict[str, tuple[int, ...]] = {
    "body": tuple(v for v in LABELS.values() if v != 0),
    "thigh_anterior_left": (LABELS["thigh_anterior_left"],),
    "thigh_anterior_right": (LABELS["thigh_anterior_right"],),
    "thigh_posterior_left": (LABELS["thigh_posterior_left"],),
    "thigh_posterior_right": (LABELS["thigh_posterior_right"],),
    "liver": (LABELS["liver"],),
    "heart": (LABELS["heart"],),
    "vat": (LABELS["vat"],),
    "sat": (LABELS["sat"],),
}
#: the regions that the saliency check uses
SALIENCY_REGIONS = ("body", "thigh_anterior_left", "thigh_anterior_right", "liver")


def _region(name: str) -> tuple[int, ...]:
    if name not in REGIONS:
        raise KeyError(f"unknown region {name!r}; known: {', '.join(REGIONS)}")
    return REGIONS[name]


def label_projection(labels: np.ndarray, spacing_y: float, region: str,
                     shape: tuple[int, int] = (SQUARE, SQUARE)) -> np.ndarray:
    """Share of each projection ray that lies in ``region``, in the projection format's geometry.

    Parameters
    ----------
    labels : (X, Y, Z) uint8 labels, LPS index order (the phantom's fused grid).
    spacing_y : A-P voxel size (mm), for the bed crop.
    region : a key of :data:`REGIONS`.

    Returns
    -------
    (256, 256) float32 in [0, 1]: [coronal | sagittal], head up, patient left on the image right.
    """
    inside = bed_crop(np.isin(labels, _region(region)).astype(np.float32), spacing_y)
    coronal, sagittal = mean_views(inside)
    return resize(np.concatenate([coronal, sagittal], axis=1), shape)


def label_footprints(labels: np.ndarray, spacing_y: float,
                     regions: tuple[str, ...] = SALIENCY_REGIONS,
                     shape: tuple[int, int] = (SQUARE, SQUARE)) -> dict[str, np.ndarray]:
    """Where each region shows in the projection: rays that cross it (resized, >= half a pixel).

    Returns ``{region: (256, 256) bool}``.
    """
    out = {}
    for name in regions:
        inside = bed_crop(np.isin(labels, _region(name)).astype(np.float32), spacing_y)
        coronal, sagittal = mean_views(inside)  # a ray crosses the region where its mean > 0
        image = (np.concatenate([coronal, sagittal], axis=1) > 0).astype(np.float32)
        out[name] = resize(image, shape) >= 0.5
    return out


def labels_split(labels: np.ndarray, spacing_y: float, width: int = SQUARE) -> int:
    """First column of the sagittal view for this label grid (:func:`projection_split`)."""
    n_y = bed_crop(labels[:1, :, :1], spacing_y).shape[1]
    return projection_split(labels.shape[0], n_y, width)


def read_labels(cohort_root: str | os.PathLike, eid: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """A phantom subject's truth labels ``(X, Y, Z)`` uint8 (LPS order) and voxel spacing (mm)."""
    path = label_path(Path(cohort_root), str(eid))
    try:
        img = nib.load(path)
        labels = np.asanyarray(img.dataobj).astype(np.uint8)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"subject {eid}: cannot read truth labels {path} ({exc})") from None
    return labels, tuple(float(z) for z in img.header.get_zooms()[:3])


def subject_footprints(cohort_root: str | os.PathLike, eid: str,
                       regions: tuple[str, ...] = SALIENCY_REGIONS) -> tuple[dict[str, np.ndarray], int]:
    """:func:`label_footprints` of a subject of a phantom cohort on disk, and its view split."""
    labels, spacing = read_labels(cohort_root, eid)
    return label_footprints(labels, spacing[1], regions), labels_split(labels, spacing[1])
