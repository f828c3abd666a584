"""The 2D network inputs made from a fused volume (contract).

Every function takes a :class:`biometry.data.types.Volume` indexed ``(x, y, z)`` = (patient
right→left, anterior→posterior, inferior→superior) and returns a ``uint8`` array ``(C, H, W)``.

Image conventions, shared by all formats (as in the papers):

- head up: image row 0 is the most superior slice;
- radiological convention in coronal and axial views: image column 0 is the patient's *right*,
  so the patient's left appears on the image right;
- sagittal views: column 0 is anterior;
- coronal | sagittal side by side;
- the posterior scanner bed is cropped: 22 voxels at 2.232 mm (49.1 mm), converted by the
  volume's A-P spacing so that the crop is the same in millimetres at any resolution.

Departures from the original code (``REFERENCE_METHODS.md`` §2.5-2.7), each deliberate:

- views are normalised and resized in floating point and rounded once at the end (the original
  truncated to uint8 before a bilinear ``cv2.resize``); the resize is an exactly defined separable
  linear interpolation with half-pixel centres (the ``cv2.INTER_LINEAR`` sampling grid) done by
  elementwise gathers, so no OpenCV is needed and the result is identical on every machine;
- the fat fraction is computed only on the two slices that are kept, not on the whole volume;
- the centre-of-mass slices come from cumulative sums of per-slice mask counts (O(volume), the
  original re-counted a growing sub-volume for each index) and name the slice that *contains* the
  half-mass point (the original took the slice after it);
- fat fraction is rounded (0.25 → 127.5 → 128), not truncated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from biometry.config.formats import FF_SHAPE, FORMAT_SPECS, SQUARE, THIGH_SIZE, THIGH_SLICES
from biometry.data.types import BED_VOXELS_AT_UKB, UKB_SPACING, Volume, fat_fraction
from biometry.data.volumes import body_mask

#: Fat fraction that maps to 255 (the scale saturates above it).
FF_FULL_SCALE: float = 0.5
#: Physical bed crop (mm): 22 voxels at the UKB in-plane spacing.
BED_MM: float = BED_VOXELS_AT_UKB * UKB_SPACING[1]
#: Physical height kept by the fat-fraction slices (mm): 176 slices at 3 mm, neck downwards.
FF_HEIGHT_MM: float = FF_SHAPE[0] * UKB_SPACING[2]


# --------------------------------------------------------------------------------------------
# helpers


def bed_voxels(spacing_y: float) -> int:
    """Number of posterior A-P voxels that hold the scanner bed at A-P spacing ``spacing_y`` (mm)."""
    return int(round(BED_MM / float(spacing_y)))


def bed_crop(array_xyz: np.ndarray, spacing_y: float, eid: str | None = None) -> np.ndarray:
    """``array_xyz`` (X, Y, Z) without the posterior A-P voxels of the scanner bed
    (:func:`bed_voxels`); used for the images and for anything projected like them (labels)."""
    n = bed_voxels(spacing_y)
    if array_xyz.shape[1] <= n:
        raise ValueError(f"subject {eid}: the A-P axis has {array_xyz.shape[1]} voxels, fewer than "
                         f"the {n} of the bed crop")
    return array_xyz[:, : array_xyz.shape[1] - n, :]


def _bed_cropped(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    return bed_crop(vol.water, vol.spacing[1], vol.eid), bed_crop(vol.fat, vol.spacing[1], vol.eid)


def interpolation_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation taps for resizing ``n_in`` samples to ``n_out``.

    Output sample ``i`` lies at input coordinate ``(i + 0.5) * n_in / n_out - 0.5`` (the sampling
    grid of ``cv2.INTER_LINEAR``), clamped to the edges; it is
    ``(1 - frac[i]) * x[lo[i]] + frac[i] * x[hi[i]]``. With ``n_in == n_out`` it is the identity.

    Returns
    -------
    lo, hi : (n_out,) int64 indices; frac : (n_out,) float32 weights in [0, 1).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resize {n_in} samples to {n_out}")
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2D image ``(H, W)`` (or a stack ``(C, H, W)``) to ``shape`` by separable linear
    interpolation (see :func:`interpolation_weights`). Returns float32.

    Elementwise gathers rather than a matrix product: exactly the same result on every machine
    and free of BLAS threading (which stalls on a busy 2-core machine).
    """
    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape[-2:]
    if (h, w) != tuple(shape):
        lo, hi, frac = interpolation_weights(h, shape[0])
        image = image[..., lo, :] * (1.0 - frac)[:, None] + image[..., hi, :] * frac[:, None]
        lo, hi, frac = interpolation_weights(w, shape[1])
        image = image[..., lo] * (1.0 - frac) + image[..., hi] * frac
    return np.array(image, dtype=np.float32)


def _minmax(image: np.ndarray, what: str, eid: str | None) -> np.ndarray:
    """Scale to [0, 1] by the image's own minimum and maximum."""
    lo, hi = float(image.min()), float(image.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"subject {eid}: the {what} holds NaN or infinite values")
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) * (1.0 / (hi - lo))).astype(np.float32)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats → rounded uint8 0..255 (saturating)."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _head_up(plane_xz: np.ndarray) -> np.ndarray:
    """A plane indexed (first axis, z inferior→superior) → image (rows: head first, cols: first axis).

    For a coronal plane (x, z) the columns stay in x order, so column 0 is the patient's right
    (radiological convention); for a sagittal plane (y, z) column 0 is anterior.
    """
    return plane_xz.T[::-1]


def mean_views(volume_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-intensity coronal (Z, X) and sagittal (Z, Y) images, head up (float32)."""
    coronal = volume_xyz.mean(axis=1, dtype=np.float32)
    sagittal = volume_xyz.mean(axis=0, dtype=np.float32)
    return _head_up(coronal), _head_up(sagittal)


def _dual_projection(volume_xyz: np.ndarray, what: str, eid: str | None) -> np.ndarray:
    """[coronal | sagittal] mean projections, each min-max normalised, at 256 x 256, in [0, 1]."""
    coronal, sagittal = mean_views(volume_xyz)
    side_by_side = np.concatenate([_minmax(coronal, f"{what} coronal projection", eid),
                                   _minmax(sagittal, f"{what} sagittal projection", eid)], axis=1)
    return resize(side_by_side, (SQUARE, SQUARE))


# --------------------------------------------------------------------------------------------
# centre-of-mass slices


def half_mass_index(counts: np.ndarray) -> int:
    """Index of the slice that holds the half-mass point of the per-slice masses ``counts``.

    The smallest ``i`` with ``counts[: i + 1].sum() >= counts.sum() / 2`` (cumulative sum, O(n)).
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("the body mask is empty")
    return int(np.searchsorted(np.cumsum(counts), total / 2.0, side="left"))


def centre_of_mass_slices(mask: np.ndarray) -> tuple[int, int]:
    """Slice positions of the fat-fraction format, from a body mask ``(X, Y, Z)`` (bed cropped).

    Returns
    -------
    (y_coronal, x_sagittal) :
        ``y_coronal``: A-P index of the centre of body mass; ``x_sagittal``: R-L index of the centre
        of mass of the patient's right half (``x < X // 2``; the liver's side).
    """
    mask = np.asarray(mask, dtype=bool)
    per_y = np.count_nonzero(mask, axis=(0, 2))
    right = mask[: mask.shape[0] // 2]
    per_x = np.count_nonzero(right, axis=(1, 2))
    return half_mass_index(per_y), half_mass_index(per_x)


#: in-plane resolution of the body mask used for the centre-of-mass slices and the thigh level
MASK_INPLANE_MM = 4.5


def _body_mask(vol: Volume, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        # slice positions only count voxels: a 4.5 mm in-plane mask is enough and 4x cheaper
        mask = body_mask(vol, max_inplane_mm=MASK_INPLANE_MM)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != vol.shape:
        raise ValueError(f"subject {vol.eid}: body mask {mask.shape} and volume {vol.shape} differ")
    return mask


def _ff_slices(vol: Volume, mask: np.ndarray | None) -> np.ndarray:
    """Full-height [coronal | sagittal] fat-fraction image (Z, X + Y') in [0, 1] of full scale."""
    water, fat = _bed_cropped(vol)
    mask = _body_mask(vol, mask)[:, : water.shape[1], :]
    try:
        y_c, x_s = centre_of_mass_slices(mask)
    except ValueError as exc:
        raise ValueError(f"subject {vol.eid}: {exc}") from None
    coronal = fat_fraction(water[:, y_c, :], fat[:, y_c, :])
    sagittal = fat_fraction(water[x_s], fat[x_s])
    image = np.concatenate([_head_up(coronal), _head_up(sagittal)], axis=1)
    if not np.isfinite(image).all():
        raise ValueError(f"subject {vol.eid}: the fat-fraction slices hold NaN or infinite values")
    return np.clip(image * (1.0 / FF_FULL_SCALE), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# the formats


def projection(vol: Volume) -> np.ndarray:
    """Sci Rep 2020 dual projection: water and fat, coronal | sagittal, at 256 x 256.

    Mean-intensity projections over the bed-cropped volume (coronal: mean over A-P; sagittal: mean
    over R-L), head up, radiological convention, each of the four views min-max normalised per
    subject, then [coronal | sagittal] resized to 256 x 256 (aspect not kept, as in the papers).

    Returns
    -------
    (2, 256, 256) uint8 : channel 0 water, channel 1 fat.
    """
    water, fat = _bed_cropped(vol)
    return _to_uint8(np.stack([_dual_projection(water, "water", vol.eid),
                               _dual_projection(fat, "fat", vol.eid)]))


def fat_fraction_slices(vol: Volume, mask: np.ndarray | None = None) -> np.ndarray:
    """MICCAI 2020 liver-fat format: fat-fraction coronal | sagittal slices, upper body.

    Coronal slice at the A-P centre of body mass, sagittal slice at the centre of mass of the
    patient's right half (both from the body mask of the bed-cropped volume). Fat fraction
    0-50 % → 0-255, saturating above. Keeps the upper 528 mm (176 slices at 3 mm); at other z
    spacings that height is taken and the image resized to (176, 376), and a shorter volume is
    padded with zeros below.

    Parameters
    ----------
    vol : the fused volume.
    mask : optional body mask ``vol.shape`` bool; by default :func:`biometry.data.volumes.body_mask`.

    Returns
    -------
    (1, 176, 376) uint8
    """
    image = _ff_slices(vol, mask)
    rows = int(round(FF_HEIGHT_MM / vol.spacing[2]))
    top = image[:rows]
    if top.shape[0] < rows:
        top = np.concatenate([top, np.zeros((rows - top.shape[0], top.shape[1]), np.float32)])
    return _to_uint8(resize(top, FF_SHAPE))[None]


def mimir(vol: Volume, mask: np.ndarray | None = None) -> np.ndarray:
    """MIMIR 3-channel format: water and fat projections plus the full-height fat-fraction slices.

    Returns
    -------
    (3, 256, 256) uint8 : water projection, fat projection, fat-fraction slices (all rows,
    resized to 256 x 256).
    """
    ff = resize(_ff_slices(vol, mask), (SQUARE, SQUARE))
    return np.concatenate([projection(vol), _to_uint8(ff)[None]])


def projection_and_mimir(vol: Volume, mask: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(projection, fat_fraction_slices, mimir)`` sharing the projections and the mask (faster)."""
    proj = projection(vol)
    image = _ff_slices(vol, mask)
    rows = int(round(FF_HEIGHT_MM / vol.spacing[2]))
    top = image[:rows]
    if top.shape[0] < rows:
        top = np.concatenate([top, np.zeros((rows - top.shape[0], top.shape[1]), np.float32)])
    ff = _to_uint8(resize(top, FF_SHAPE))[None]
    mim = np.concatenate([proj, _to_uint8(resize(image, (SQUARE, SQUARE)))[None]])
    return proj, ff, mim


def crotch_index(mask: np.ndarray, min_run: int = 3) -> tuple[int, int]:
    """Lowest body slice and the groin (crotch) slice from a body mask ``(X, Y, Z)``.

    Below the crotch the legs are separate: the coronal silhouette (mask projected over A-P) has,
    in the central half of the R-L axis, an empty column with body on both sides of it. Scanning
    up from the lowest body slice, the crotch is the first slice at which this gap has vanished
    for ``min_run`` consecutive slices.

    Returns
    -------
    (z_low, z_crotch) : z indices (inferior→superior).
    """
    silhouette = np.asarray(mask, dtype=bool).any(axis=1)  # (X, Z)
    x = silhouette.shape[0]
    central = silhouette[x // 4: x - x // 4]
    has_body = np.flatnonzero(silhouette.any(axis=0))
    if has_body.size == 0:
        raise ValueError("the body mask is empty")
    left_seen = np.maximum.accumulate(central, axis=0)
    right_seen = np.maximum.accumulate(central[::-1], axis=0)[::-1]
    gap = (~central & left_seen & right_seen).any(axis=0)  # (Z,)
    z_low = int(has_body[0])
    if not gap[z_low: z_low + min_run].any():
        raise ValueError("the legs do not separate at the lower end of the volume")
    joined = ~gap[z_low:]
    run = np.convolve(joined.astype(int), np.ones(min_run, dtype=int), mode="valid")
    starts = np.flatnonzero(run == min_run)
    if starts.size == 0:
        raise ValueError("no groin found: the legs stay separate over the whole volume")
    return z_low, z_low + int(starts[0])


def thigh_slices(vol: Volume, n_slices: int = THIGH_SLICES,
                 size: tuple[int, int] = THIGH_SIZE, mask: np.ndarray | None = None) -> np.ndarray:
    """Axial mid-thigh water slices of both legs (ISMRM thigh-function study).

    The mid-thigh level is half-way between the lowest body slice (knees) and the groin, found
    from the body mask by :func:`crotch_index`; ``n_slices`` consecutive axial slices centred
    there are taken from the bed-cropped water volume. Each slice is an image with rows =
    anterior→posterior and columns = patient right→left (radiological), resized to ``size``
    (at the UKB grid the default (152, 224) is the native size). The slab is scaled to 0-255 by
    its own 0.5th-99.5th percentiles (robust against bright fat-suppression failures).

    Returns
    -------
    (n_slices, H, W) uint8
    """
    mask = _body_mask(vol, mask)
    try:
        z_low, z_crotch = crotch_index(mask)
    except ValueError as exc:
        raise ValueError(f"subject {vol.eid}: {exc}") from None
    mid = (z_low + z_crotch) // 2
    start = int(np.clip(mid - n_slices // 2, 0, max(vol.shape[2] - n_slices, 0)))
    if vol.shape[2] < n_slices:
        raise ValueError(f"subject {vol.eid}: {vol.shape[2]} slices, fewer than {n_slices}")
    water, _fat = _bed_cropped(vol)
    slab = np.moveaxis(water[:, :, start: start + n_slices], 2, 0).transpose(0, 2, 1)  # (n, Y, X)
    if not np.isfinite(slab).all():
        raise ValueError(f"subject {vol.eid}: the thigh slices hold NaN or infinite values")
    lo, hi = np.percentile(slab, [0.5, 99.5])
    unit = np.clip((slab - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    return _to_uint8(resize(unit, size))


# --------------------------------------------------------------------------------------------
# the original MIMIR images (for original modules; REFERENCE_METHODS §2.5-2.7)

#: the original trimmed 4 slices at both ends of the fused volume (3 mm each at the UKB grid)
ORIGINAL_TRIM_MM: float = 4 * UKB_SPACING[2]


def _truncate(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats → 0..255 truncated (the original's ``(x * 255).astype(uint8)``), as float."""
    return np.floor(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.float32)


def _round_uint8(values: np.ndarray) -> np.ndarray:
    """0..255 floats → uint8 rounded (``cv2.resize`` on uint8 rounds its result)."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def mimir_original(vol: Volume, mask: np.ndarray | None = None) -> np.ndarray:
    """The 3-channel image an original MIMIR module was trained on, reproduced from ``vol``.

    ``vol`` should be fused *without* station intensity levelling, as the original did
    (:data:`FUSE_OPTIONS`; ``biometry prepare`` and the inference engine do so for this format).
    Differences from :func:`mimir`, each the original's behaviour:

    - 4 slices (12 mm) are trimmed at both ends of the fused volume;
    - each view is min-max normalised and *truncated* to 0..255 before the bilinear resize
      (which rounds), instead of resized in floating point and rounded once;
    - the fat-fraction slices are taken one slice after the half-mass slice (the first index
      whose preceding mass reaches half), and the fat fraction is truncated, not rounded.

    Returns
    -------
    (3, 256, 256) uint8 : water projection, fat projection, full-height fat-fraction slices.
    """
    trim = int(round(ORIGINAL_TRIM_MM / vol.spacing[2]))
    if vol.shape[2] <= 2 * trim + 1:
        raise ValueError(f"subject {vol.eid}: {vol.shape[2]} slices, too few to trim {trim} at "
                         f"both ends")
    mask = _body_mask(vol, mask)[..., trim:-trim]
    water, fat = _bed_cropped(vol)
    water, fat = water[..., trim:-trim], fat[..., trim:-trim]
    channels = []
    for what, arr in (("water", water), ("fat", fat)):
        coronal, sagittal = mean_views(arr)
        side = np.concatenate([_truncate(_minmax(coronal, f"{what} coronal projection", vol.eid)),
                               _truncate(_minmax(sagittal, f"{what} sagittal projection", vol.eid))],
                              axis=1)
        channels.append(_round_uint8(resize(side, (SQUARE, SQUARE))))
    mask = mask[:, : water.shape[1], :]
    try:
        y_c, x_s = centre_of_mass_slices(mask)
    except ValueError as exc:
        raise ValueError(f"subject {vol.eid}: {exc}") from None
    y_c, x_s = min(y_c + 1, water.shape[1] - 1), min(x_s + 1, water.shape[0] // 2 - 1)
    image = np.concatenate([_head_up(fat_fraction(water[:, y_c, :], fat[:, y_c, :])),
                            _head_up(fat_fraction(water[x_s], fat[x_s]))], axis=1)
    if not np.isfinite(image).all():
        raise ValueError(f"subject {vol.eid}: the fat-fraction slices hold NaN or infinite values")
    channels.append(_round_uint8(resize(_truncate(image * (1.0 / FF_FULL_SCALE)), (SQUARE, SQUARE))))
    return np.stack(channels)


#: keyword arguments of :func:`biometry.data.volumes.fuse` that a format needs (default: none)
FUSE_OPTIONS: dict[str, dict] = {"mimir_original": {"correct_intensity": False}}


def fuse_options(name: str) -> dict:
    """The :func:`biometry.data.volumes.fuse` options that format ``name`` is made from."""
    return dict(FUSE_OPTIONS.get(name, {}))


_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "projection": projection, "fat_fraction_slices": fat_fraction_slices, "mimir": mimir,
    "thigh": thigh_slices, "mimir_original": mimir_original}
#: format name -> (function, shape, dtype); shapes and dtypes from :mod:`biometry.config.formats`
FORMATS: dict[str, tuple[Callable[..., np.ndarray], tuple[int, ...], np.dtype]] = {
    name: (_FUNCTIONS[name], shape, dtype) for name, (shape, dtype) in FORMAT_SPECS.items()}


def compute(vol: Volume, names: list[str] | tuple[str, ...],
            mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Compute the formats ``names`` of one volume, sharing the body mask and projections.

    Returns ``{name: array}`` with each array of ``FORMATS[name]``'s shape and dtype.
    """
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise KeyError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    needs_mask = any(n != "projection" for n in names)
    if needs_mask:
        mask = _body_mask(vol, mask)
    out: dict[str, np.ndarray] = {}
    if {"fat_fraction_slices", "mimir"} & set(names):
        proj, ff, mim = projection_and_mimir(vol, mask)
        out.update(projection=proj, fat_fraction_slices=ff, mimir=mim)
    elif "projection" in names:
        out["projection"] = projection(vol)
    if "thigh" in names:
        out["thigh"] = thigh_slices(vol, mask=mask)
    if "mimir_original" in names:
        out["mimir_original"] = mimir_original(vol, mask=mask)
    return {n: out[n] for n in names}


def projection_split(n_x: int, n_y_cropped: int, width: int = SQUARE) -> int:
    """First column of the sagittal view in a ``width``-wide [coronal | sagittal] image made from
    ``n_x`` R-L and ``n_y_cropped`` A-P (bed cropped) voxels: ``round(width * X / (X + Y))``.

    The resize mixes the two views in at most one column at the seam.
    """
    if n_x < 1 or n_y_cropped < 1:
        raise ValueError(f"a view needs at least one voxel (got X={n_x}, Y={n_y_cropped})")
    return int(round(width * n_x / (n_x + n_y_cropped)))
