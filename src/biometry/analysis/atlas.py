"""Multi-atlas liver fat: the independent baseline of the MICCAI 2020 liver study (SimpleITK).

It shares nothing with the network beyond reading the subjects' fused volumes
(:func:`biometry.data.volumes.load_subject`): a few *template* subjects with a liver mask are
registered, each on its own, to a *target* subject; the warped masks are intersected, eroded
(the paper: a spherical kernel of 7 voxels, about 15.6 mm at the UKB grid) and the median fat
fraction of the target inside what is left is its raw atlas value. A linear correction fitted on
the subjects with a reference (dataset A) maps raw values to the reference's scale and is applied
unchanged everywhere else. See ``docs/liver.md``.

Registration (per template, onto the target): one scalar image per subject, the water image
divided by its 95th percentile inside the body plus the fat fraction, zero outside the body mask (so both
contrasts count and the surroundings do not; SimpleITK's metrics take one channel), resampled
to ``spacing_mm``; an affine stage started from the scanner geometry (the same FOV for everyone), then a B-spline
stage (mean squares, L-BFGS-B), both multi-resolution. The mask is warped with nearest-neighbour
interpolation onto the target's own grid.

Per-subject QC: the number of voxels and the volume of the final mask, the registration metric
of each template (mean squares after the B-spline stage; lower is better) and their worst.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from biometry.data.prepare import find_subjects
from biometry.data.types import Volume
from biometry.data.volumes import InputError, body_mask, load_subject, read_nifti, to_lps

#: the paper's erosion: a 7-voxel spherical kernel at the UKB in-plane spacing
PAPER_ERODE_MM = 7 * 2.232142857
#: fatty liver threshold (PDFF, %)
FATTY_LIVER_PERCENT = 5.5


class AtlasError(ValueError):
    """One subject could not be measured (one line naming the subject and why)."""


@dataclass(frozen=True)
class AtlasConfig:
    """Settings of the multi-atlas baseline (the ``liver:`` block of a study YAML).

    templates : number of template subjects (chosen from dataset A for varied liver shape).
    erode_mm : radius of the spherical erosion of the intersected masks (mm).
    spacing_mm : isotropic grid on which registration runs (the masks are warped onto the
        target's own grid).
    top_fraction : registration sees only this upper part of the neck-to-knee field of view
        (the liver lies in its upper half; the legs would only cost time).
    affine_iterations, bspline_iterations : optimiser iterations of the two stages
        (``bspline_iterations: 0``: affine only).
    bspline_mesh_mm : control-point spacing of the B-spline transform (mm).
    sampling : share of the fixed image's voxels drawn (seeded) for the metric.
    comparison_size, comparison_seed : the random comparison subset C of dataset B.
    threads : ITK threads per registration (1 keeps results reproducible to the bit).
    masks_dir : real data: the folder of template liver masks ``<eid>_liver.nii.gz``, each on
        its subject's fused grid (phantom studies use the generator's truth labels).
    images_dir : real data: where the subjects' NIfTI stations are (``nifti/<eid>/`` or
        ``<eid>/`` folders, as ``biometry ingest`` writes them); default: the folder of
        ``fields.csv``.
    """

    templates: int = 5
    erode_mm: float = PAPER_ERODE_MM
    spacing_mm: float = 8.0
    top_fraction: float = 0.5
    affine_iterations: int = 60
    bspline_iterations: int = 20
    bspline_mesh_mm: float = 120.0
    sampling: float = 0.25
    comparison_size: int = 100
    comparison_seed: int = 0
    threads: int = 1
    masks_dir: str | None = None
    images_dir: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping | None, where: str = "liver") -> AtlasConfig:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        cfg = cls(**raw)
        if cfg.templates < 1 or cfg.spacing_mm <= 0 or cfg.erode_mm < 0:
            raise ValueError(f"{where}: templates >= 1, spacing_mm > 0 and erode_mm >= 0 "
                             f"required, got {cfg}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# images


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of an (X, Y, Z) array with a voxel → RAS+ affine (ITK works in LPS)."""
    lin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lin / spacing).ravel()])
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    img.SetOrigin([float(v) for v in origin])
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    """The (X, Y, Z) array of a SimpleITK image (inverse of :func:`to_sitk`'s layout)."""
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def registration_image(vol: Volume, body: np.ndarray) -> np.ndarray:
    """Water / p95(water in body), clipped at 1.5, plus the fat fraction inside the body; 0
    outside (float32). The 95th percentile is the lean-tissue level whatever the body's fat."""
    water = vol.water
    inside = water[body]
    scale = float(np.percentile(inside, 95)) if inside.size else 0.0
    if scale <= 0:
        raise AtlasError(f"subject {vol.eid}: empty body mask or no water signal")
    img = (np.minimum(water / np.float32(scale), np.float32(1.5))
           + vol.fat_fraction()).astype(np.float32)
    img[~body] = 0.0
    return img


def _resample_iso(img: sitk.Image, spacing_mm: float) -> sitk.Image:
    size = [max(int(round(n * s / spacing_mm)), 4) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         [spacing_mm] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)


@dataclass
class Subject:
    """One subject prepared for the atlas: its registration image (coarse) and full-grid data."""

    eid: str
    image: sitk.Image           # registration image on the coarse isotropic grid
    grid: sitk.Image            # an empty image on the subject's own fused grid (geometry only)
    fat_fraction: np.ndarray    # (X, Y, Z) F / (W + F) in [0, 1] on the fused grid
    body: np.ndarray            # (X, Y, Z) bool body mask
    voxel_ml: float
    mask: np.ndarray | None = None  # (X, Y, Z) bool liver mask (templates only)


def prepare_subject(vol: Volume, spacing_mm: float, top_fraction: float = 1.0) -> Subject:
    """Registration image (upper ``top_fraction`` of the FOV), fat fraction, body mask."""
    body = body_mask(vol)
    reg = registration_image(vol, body)
    k0 = int(np.floor(vol.shape[2] * (1.0 - top_fraction)))
    affine = vol.affine.copy()
    affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * k0
    image = to_sitk(reg[:, :, k0:], affine)
    grid = to_sitk(np.zeros(vol.shape, np.uint8), vol.affine)
    return Subject(eid=str(vol.eid), image=_resample_iso(image, spacing_mm), grid=grid,
                   fat_fraction=vol.fat_fraction(), body=body,
                   voxel_ml=float(np.prod(vol.spacing)) / 1000.0)


def read_mask(path: str | Path, vol: Volume, label: int | None = None) -> np.ndarray:
    """A template's liver mask as (X, Y, Z) bool on the grid of its fused volume ``vol``.

    ``label``: the liver's value in a label volume (the phantom's truth labels use 8); None
    reads any non-zero voxel as liver. Raises :class:`AtlasError` naming the subject and the
    file when the mask is not on the volume's grid (shape or affine) or holds no liver.
    """
    try:
        data, affine = read_nifti(path)
    except InputError as exc:
        raise AtlasError(f"template {vol.eid}: {exc}") from None
    data, affine = to_lps(data, affine)
    if data.shape != vol.shape or not np.allclose(affine, vol.affine, atol=1e-2):
        raise AtlasError(
            f"template {vol.eid}: liver mask {path} is on a grid of shape {data.shape} "
            f"(voxel {np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()} mm, origin "
            f"{np.round(affine[:3, 3], 1).tolist()}), but the template's fused volume is "
            f"{vol.shape} (voxel {np.round(vol.spacing, 3).tolist()} mm, origin "
            f"{np.round(vol.affine[:3, 3], 1).tolist()}): give the mask on the fused grid")
    mask = data > 0 if label is None else np.rint(data) == label
    if not mask.any():
        raise AtlasError(f"template {vol.eid}: liver mask {path} holds no liver voxels"
                         + (f" (label {label})" if label is not None else ""))
    return np.ascontiguousarray(mask)


# ---------------------------------------------------------------------------------------------
# templates


def liver_descriptors(masks: Mapping[str, tuple[np.ndarray, tuple[float, float, float]]]
                      ) -> pd.DataFrame:
    """Shape and position of each liver mask: centroid and extent (SD) per axis in mm, volume.

    ``masks``: eid -> ((X, Y, Z) bool mask, voxel spacing in mm). The centroid is relative to
    the grid's centre, so subjects on the same grid compare directly.
    """
    rows = []
    for eid, (mask, spacing) in masks.items():
        idx = np.argwhere(mask).astype(np.float64)
        mm = (idx - (np.array(mask.shape) - 1) / 2) * np.asarray(spacing)
        row = {"eid": str(eid), "volume_ml": float(len(idx) * np.prod(spacing) / 1000.0)}
        for a, name in enumerate("xyz"):
            row[f"centre_{name}_mm"] = float(mm[:, a].mean())
            row[f"extent_{name}_mm"] = float(mm[:, a].std())
        rows.append(row)
    return pd.DataFrame(rows)


def choose_templates(descriptors: pd.DataFrame, n: int) -> list[str]:
    """``n`` eids with varied liver shape: farthest-point sampling on standardised descriptors.

    Starts from the most typical liver (closest to the median) and adds, one at a time, the
    liver farthest from those chosen; deterministic (ties by eid).
    """
    if len(descriptors) < n:
        raise ValueError(f"need {n} template candidates with a liver mask, got {len(descriptors)}")
    d = descriptors.sort_values("eid").reset_index(drop=True)
    x = d.drop(columns="eid").to_numpy(dtype=np.float64)
    x = (x - np.median(x, axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    chosen = [int(np.argmin(np.linalg.norm(x, axis=1)))]
    dist = np.linalg.norm(x - x[chosen[0]], axis=1)
    while len(chosen) < n:
        k = int(np.argmax(dist))
        chosen.append(k)
        dist = np.minimum(dist, np.linalg.norm(x - x[k], axis=1))
    return [str(d.loc[k, "eid"]) for k in chosen]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks on the same grid."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else float("nan")


# ---------------------------------------------------------------------------------------------
# registration and segmentation


def register(fixed: sitk.Image, moving: sitk.Image, cfg: AtlasConfig) -> tuple[sitk.Transform, float]:
    """Affine then B-spline registration of ``moving`` onto ``fixed``; (transform, metric).

    The transform maps points of ``fixed`` into ``moving`` (ITK's convention), so
    ``sitk.Resample(moving_mask, fixed_grid, transform, ...)`` warps a mask onto the target.
    The metric is the mean squares after the last stage (lower is better).
    """
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=0.5, minStep=1e-3,
                                                 numberOfIterations=cfg.affine_iterations,
                                                 relaxationFactor=0.6)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(cfg.sampling, seed=1)
    # translation in mm next to the unitless matrix entries: ~1 mm of shift per unit over
    # the image's half-size (what SetOptimizerScalesFromPhysicalShift estimates, for free)
    half = 0.5 * max(sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing()))
    reg.SetOptimizerScales([half] * 9 + [1.0] * 3)
    reg.SetInitialTransform(init, inPlace=True)
    reg.SetNumberOfThreads(cfg.threads)
    start = sitk.AffineTransform(init)
    before = float(reg.MetricEvaluate(fixed, moving))
    reg.Execute(fixed, moving)
    after = float(reg.MetricEvaluate(fixed, moving))
    # gradient descent can walk off on a poor match: never end worse than the initial alignment
    affine = init if after <= before else start
    if cfg.bspline_iterations <= 0:
        return affine, min(after, before)
    mesh = [max(int(round(sz * sp / cfg.bspline_mesh_mm)), 1)
            for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing())]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsMeanSquares()
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                              numberOfIterations=cfg.bspline_iterations,
                              maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=
                              4 * cfg.bspline_iterations)
    reg2.SetMetricSamplingStrategy(reg2.RANDOM)
    reg2.SetMetricSamplingPercentage(cfg.sampling, seed=2)
    reg2.SetMovingInitialTransform(affine)
    reg2.SetInitialTransform(bspline, inPlace=True)
    reg2.SetNumberOfThreads(cfg.threads)
    reg2.Execute(fixed, moving)
    metric = float(reg2.MetricEvaluate(fixed, moving))
    composite = sitk.CompositeTransform([affine, bspline])
    return composite, metric


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    r = [int(np.floor(radius_mm / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing)) <= 1.0


def segment(target: Subject, templates: Sequence[Subject], cfg: AtlasConfig) -> dict:
    """Multi-atlas liver mask of ``target`` and the median fat fraction inside it.

    A template that is the target itself is left out (leave-one-out on dataset A). Returns a
    dict: ``atlas_raw`` (median fat fraction inside the final mask, %), ``mask_voxels``,
    ``mask_ml``, ``metric_mean``, ``metric_worst``, ``templates_used``, and ``mask`` (the
    (X, Y, Z) bool mask). Raises :class:`AtlasError` naming the subject when no template is left
    or the final mask is empty.
    """
    used = [t for t in templates if t.eid != target.eid]
    if not used:
        raise AtlasError(f"subject {target.eid}: no template other than itself")
    mask = target.body.copy()
    metrics = []
    for tpl in used:
        transform, metric = register(target.image, tpl.image, cfg)
        warped = sitk.Resample(to_sitk(tpl.mask.astype(np.uint8), _affine_of(tpl.grid)),
                               target.grid, transform, sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt8)
        mask &= from_sitk(warped).astype(bool)
        metrics.append(metric)
    if cfg.erode_mm > 0 and mask.any():
        spacing = target.grid.GetSpacing()
        mask = ndimage.binary_erosion(mask, structure=_ball(cfg.erode_mm, spacing))
    n = int(mask.sum())
    if n == 0:
        raise AtlasError(f"subject {target.eid}: the liver mask is empty after intersecting "
                         f"{len(used)} warped template(s) and eroding by {cfg.erode_mm:.1f} mm "
                         f"(worst registration metric {max(metrics):.3g})")
    return {"atlas_raw": float(np.median(target.fat_fraction[mask]) * 100.0),
            "mask_voxels": n, "mask_ml": n * target.voxel_ml,
            "metric_mean": float(np.mean(metrics)), "metric_worst": float(np.max(metrics)),
            "templates_used": len(used), "mask": mask}


def _affine_of(img: sitk.Image) -> np.ndarray:
    """Voxel → RAS+ affine of a SimpleITK image (inverse of :func:`to_sitk`'s geometry)."""
    lin = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lin
    aff[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(img.GetOrigin())
    return aff


# ---------------------------------------------------------------------------------------------
# the batch


def _subject_dirs(input_dir: str | Path) -> dict[str, str]:
    return {s.eid: s.source for s in find_subjects(input_dir) if s.kind == "nifti"}


def load_templates(input_dir: str | Path, masks: Mapping[str, str | Path], cfg: AtlasConfig,
                   spacing: tuple[float, float, float] | None = None, label: int | None = None,
                   log=print) -> list[Subject]:
    """Load template subjects and their masks; a bad one is reported in one line and left out.

    ``masks``: eid -> NIfTI mask on that subject's fused grid (``label`` as in
    :func:`read_mask`). Raises :class:`AtlasError` only when no template is usable.
    """
    dirs = _subject_dirs(input_dir)
    out = []
    for eid, path in masks.items():
        try:
            if str(eid) not in dirs:
                raise AtlasError(f"template {eid}: no station images in {input_dir}")
            vol = _load(dirs[str(eid)], spacing)
            mask = read_mask(path, vol, label)
            subject = prepare_subject(vol, cfg.spacing_mm, cfg.top_fraction)
        except (AtlasError, InputError) as exc:
            log(f"atlas: skipping {exc}")
            continue
        subject.mask = mask
        out.append(subject)
    if not out:
        raise AtlasError(f"no usable template among {len(masks)} (see the messages above)")
    return out


def _load(subject_dir: str, spacing) -> Volume:
    return load_subject(subject_dir) if spacing is None else load_subject(subject_dir, spacing)


def run_atlas(input_dir: str | Path, eids: Iterable[str], templates: Sequence[Subject],
              cfg: AtlasConfig, spacing: tuple[float, float, float] | None = None,
              log=print) -> pd.DataFrame:
    """The raw atlas value and QC of each subject in ``eids``; failures are rows, not raises.

    Returns one row per eid: ``eid, atlas_raw, mask_voxels, mask_ml, metric_mean,
    metric_worst, templates_used, seconds, error`` (``error`` empty when measured; else the
    one-line reason, also passed to ``log``, and NaN values).
    """
    dirs = _subject_dirs(input_dir)
    rows = []
    for eid in map(str, eids):
        t0 = time.perf_counter()
        row: dict = {"eid": eid, "error": ""}
        try:
            if eid not in dirs:
                raise AtlasError(f"subject {eid}: no station images in {input_dir}")
            target = prepare_subject(_load(dirs[eid], spacing), cfg.spacing_mm,
                                     cfg.top_fraction)
            res = segment(target, templates, cfg)
            res.pop("mask")
            row.update(res)
        except (AtlasError, InputError) as exc:
            msg = str(exc) if str(exc).startswith(("subject", "template")) else \
                f"subject {eid}: {exc}"
            log(f"atlas: {msg}")
            row["error"] = msg
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    cols = ["eid", "atlas_raw", "mask_voxels", "mask_ml", "metric_mean", "metric_worst",
            "templates_used", "seconds", "error"]
    return pd.DataFrame(rows).reindex(columns=cols)


# ---------------------------------------------------------------------------------------------
# the linear correction


def fit_correction(atlas_raw, reference) -> dict[str, float]:
    """Least-squares line ``reference ≈ intercept + slope · atlas_raw`` on the complete pairs."""
    x = np.asarray(atlas_raw, float)
    y = np.asarray(reference, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        raise ValueError(f"the atlas correction needs at least 3 subjects with a reference and "
                         f"distinct atlas values, got {int(ok.sum())}")
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    return {"slope": float(slope), "intercept": float(intercept), "n": int(ok.sum())}


def apply_correction(atlas_raw, correction: Mapping[str, float]) -> np.ndarray:
    """``intercept + slope · atlas_raw``, clipped at 0 % (NaN stays NaN)."""
    x = np.asarray(atlas_raw, float)
    return np.clip(correction["intercept"] + correction["slope"] * x, 0.0, None)


def mask_descriptors(masks: Mapping[str, str | Path], label: int | None = None,
                     log=print) -> pd.DataFrame:
    """:func:`liver_descriptors` of mask files (eid -> NIfTI, ``label`` as in :func:`read_mask`).

    A file that cannot be read or holds no liver is reported in one line and left out.
    """
    loaded = {}
    for eid, path in masks.items():
        try:
            data, affine = to_lps(*read_nifti(path))
        except InputError as exc:
            log(f"atlas: skipping template candidate {eid}: {exc}")
            continue
        mask = data > 0 if label is None else np.rint(data) == label
        if mask.any():
            loaded[str(eid)] = (mask, tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    return liver_descriptors(loaded)
