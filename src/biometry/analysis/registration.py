"""2D co-registration of subjects' network inputs to a reference subject (SimpleITK).

A subject's 2D image ([coronal | sagittal], see :mod:`biometry.data.formats`) is split into its
two views, and each view is registered to the same view of a reference subject: an affine stage
(correlation metric, moments initialisation) followed by a cubic B-spline stage. The views are
registered separately because they are different projections of the body: a transform that
crossed the seam would drag coronal anatomy into the sagittal view.

The transform of a view maps reference-image points to the subject's image, so
:func:`warp` resamples anything drawn on the subject's image (a saliency map) into the
reference's image space. Transforms are written once per subject (``<eid>.tfm``, one composite
per view in a ``.tfm`` pair) and reused by every field of a study (:func:`register_cached`).

Coordinates are pixels of the stored image (spacing 1). Registration runs on a pyramid that stops
at a quarter of the stored resolution (shrink 4: 64 px for a 256 px image, the demo network's input
size), as the original ``deform`` parameters stopped above full resolution: the maps being
aligned are no sharper than that (layer3 of a ResNet at 64 px is 4 x 4). The B-spline metric
samples 20 % of the pixels (seeded, so the result is deterministic). Each view keeps the identity,
the affine alone or both stages, whichever has the highest NCC at the stored resolution, so a
subject already close to the reference is not made worse. A transform folder records the method's
version and settings (``registration.json``); transforms of another are computed again. Speeds
and the alignment reached are in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from biometry.fileio import atomic_path, write_json

#: first column of the sagittal view in a 256-wide [coronal | sagittal] image at the UKB geometry:
#: 224 R-L voxels beside 152 A-P voxels (174 minus the 22 of the bed) -> 256 * 224 / 376
DEFAULT_SPLIT = 152


@dataclass(frozen=True)
class RegistrationSettings:
    """Knobs of :func:`register_view` (defaults measured in ``benchmarks/saliency.py``)."""

    affine_shrink: tuple[int, ...] = (8, 4)
    affine_iterations: int = 60
    bspline_mesh: tuple[int, int] = (4, 6)          # control-point mesh (x, y) per view
    bspline_shrink: tuple[int, ...] = (4,)
    bspline_iterations: int = 20
    bspline_sampling: float = 0.2                   # share of pixels in the metric (seeded)
    seed: int = 1


def views(image: np.ndarray, split: int = DEFAULT_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """(coronal, sagittal) halves of an (H, W) image, split at column ``split``."""
    image = np.asarray(image)
    if image.ndim != 2 or not 0 < split < image.shape[1]:
        raise ValueError(f"cannot split an image of shape {image.shape} at column {split}")
    return image[:, :split], image[:, split:]


def _img(a: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equally shaped images (Pearson over all pixels)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def register_view(fixed: np.ndarray, moving: np.ndarray,
                  settings: RegistrationSettings = RegistrationSettings()) -> sitk.Transform:
    """Affine then B-spline registration of one view; returns the fixed -> moving transform: the
    composite, or the affine alone, or the identity, whichever gives the highest NCC to ``fixed``
    (so registration never lowers it)."""
    f, m = _img(fixed), _img(moving)
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-2,
                                                 numberOfIterations=settings.affine_iterations,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(settings.affine_shrink))
    reg.SetSmoothingSigmasPerLevel([s / 2.0 for s in settings.affine_shrink])
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(f, m)
    affine = sitk.AffineTransform(init)

    bspline = sitk.BSplineTransformInitializer(f, list(settings.bspline_mesh), order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                             numberOfIterations=settings.bspline_iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=60,
                             costFunctionConvergenceFactor=1e7)
    if settings.bspline_sampling < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(settings.bspline_sampling, settings.seed)
    reg.SetShrinkFactorsPerLevel(list(settings.bspline_shrink))
    reg.SetSmoothingSigmasPerLevel([s / 2.0 for s in settings.bspline_shrink])
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(f, m)
    composite = sitk.CompositeTransform(affine)  # applied last
    composite.AddTransform(bspline)                # applied first: fixed -> bspline -> affine
    # A stage is kept only where it raises the NCC at the stored resolution: optimised on a
    # coarse, smoothed pyramid, the B-spline (or the affine) can lower it for a subject that is
    # already close to the reference (5 % of the women of a 3,000-subject phantom cohort;
    # BENCHMARKS.md). Ties keep the simpler transform.
    stages = [sitk.CompositeTransform(sitk.AffineTransform(2)), sitk.CompositeTransform(affine),
              composite]
    scores = [ncc(fixed, moving)] + [ncc(fixed, warp_view(moving, fixed.shape, t))
                                     for t in stages[1:]]
    return stages[int(np.argmax(scores))]


def warp_view(moving: np.ndarray, fixed_shape: tuple[int, int], transform: sitk.Transform) -> np.ndarray:
    """Resample a subject's view (e.g. its saliency) into the reference view's space (linear)."""
    ref = sitk.Image(int(fixed_shape[1]), int(fixed_shape[0]), sitk.sitkFloat32)
    out = sitk.Resample(_img(moving), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


@dataclass
class SubjectTransform:
    """The two view transforms of one subject and the alignment they reached."""

    coronal: sitk.Transform
    sagittal: sitk.Transform
    ncc_before: float
    ncc_after: float


def register(fixed: np.ndarray, moving: np.ndarray, split: int = DEFAULT_SPLIT,
             settings: RegistrationSettings = RegistrationSettings()) -> SubjectTransform:
    """Register a subject's (H, W) image to the reference's, view by view.

    ``ncc_before`` / ``ncc_after``: mean over the two views of the NCC to the reference before
    registration and after warping the subject's image with the transform.
    """
    fixed, moving = np.asarray(fixed, np.float32), np.asarray(moving, np.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"reference {fixed.shape} and subject {moving.shape} images differ in shape")
    tf = []
    before, after = [], []
    for fv, mv in zip(views(fixed, split), views(moving, split)):
        t = register_view(fv, mv, settings)
        tf.append(t)
        before.append(ncc(fv, mv))
        after.append(ncc(fv, warp_view(mv, fv.shape, t)))
    return SubjectTransform(tf[0], tf[1], float(np.mean(before)), float(np.mean(after)))


def warp(image: np.ndarray, transform: SubjectTransform, split: int = DEFAULT_SPLIT) -> np.ndarray:
    """Warp a subject's (H, W) map (both views) into the reference's image space; float32."""
    cor, sag = views(np.asarray(image, np.float32), split)
    return np.concatenate([warp_view(cor, cor.shape, transform.coronal),
                           warp_view(sag, sag.shape, transform.sagittal)], axis=1)


# ---------------------------------------------------------------------------------------------
# saved transforms


def save_transform(path: str | os.PathLike, st: SubjectTransform) -> None:
    """Write ``<path>`` (coronal), ``<path>.sagittal.tfm`` and the NCC record, atomically."""
    path = Path(path)
    with atomic_path(path.with_suffix(".sagittal.tfm")) as tmp:
        sitk.WriteTransform(st.sagittal, str(tmp))
    with atomic_path(path.with_suffix(".ncc")) as tmp:
        tmp.write_text(f"{st.ncc_before!r} {st.ncc_after!r}\n")
    with atomic_path(path) as tmp:  # written last: marks the subject done
        sitk.WriteTransform(st.coronal, str(tmp))


def load_transform(path: str | os.PathLike) -> SubjectTransform:
    """Read what :func:`save_transform` wrote."""
    path = Path(path)
    try:
        before, after = (float(v) for v in path.with_suffix(".ncc").read_text().split())
        cor = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
        sag = sitk.CompositeTransform(sitk.ReadTransform(str(path.with_suffix(".sagittal.tfm"))))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable saved transform ({str(exc).splitlines()[0]})") from None
    return SubjectTransform(cor, sag, before, after)


#: the registration method's version: 2 keeps a stage only where it raises the NCC
#: (:func:`register_view`). Saved transforms of another version or other settings are not reused.
REGISTRATION_VERSION = 2


def open_transform_cache(directory: str | os.PathLike,
                         settings: RegistrationSettings = RegistrationSettings()) -> Path:
    """Make ``directory`` a cache of transforms computed by this method with ``settings``.

    ``registration.json`` records the method's version and the settings; when it is missing
    (transforms of a version before 2) or differs, the saved transforms in the folder are
    removed, so that :func:`register_cached` computes them again instead of reusing a result
    whose method changed. Returns the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # through JSON, so that the settings' tuples compare equal to the lists read back
    key = json.loads(json.dumps({"version": REGISTRATION_VERSION,
                                 "settings": dataclasses.asdict(settings)}))
    record = directory / "registration.json"
    try:
        same = json.loads(record.read_text()) == key
    except (OSError, ValueError):
        same = False
    if not same:
        for pattern in ("*.tfm", "*.ncc"):
            for old in directory.glob(pattern):
                old.unlink()
        write_json(record, key)
    return directory


def register_cached(directory: str | os.PathLike, eid: str, fixed: np.ndarray, moving: np.ndarray,
                    split: int = DEFAULT_SPLIT,
                    settings: RegistrationSettings = RegistrationSettings()) -> SubjectTransform:
    """:func:`register` once per subject: read ``<directory>/<eid>.tfm`` if present, else compute
    and save it. ``directory`` belongs to one reference (see :func:`choose_reference`) and is
    opened once with :func:`open_transform_cache`, which drops transforms of another method."""
    path = Path(directory) / f"{eid}.tfm"
    if path.is_file():
        return load_transform(path)
    st = register(fixed, moving, split, settings)
    save_transform(path, st)
    return st


def choose_reference(chunks: Callable[[], Iterable[np.ndarray]], eids: Sequence[str]
                     ) -> tuple[str, float]:
    """The most typical subject: the highest NCC between its image and the mean image of all.

    Parameters
    ----------
    chunks : called twice (mean, then scores); yields (n, H, W) image chunks of the subjects of
        one sex (e.g. the water channel, unregistered), in the order of ``eids``. Streaming keeps
        a cohort of any size out of memory; an in-memory array ``a`` is ``lambda: [a]``.
    eids : their ids.

    Returns
    -------
    (eid, its NCC to the mean image)
    """
    total, n = None, 0
    for c in chunks():
        c = np.asarray(c, dtype=np.float64)
        total = c.sum(axis=0) if total is None else total + c.sum(axis=0)
        n += len(c)
    if n == 0 or n != len(eids):
        raise ValueError(f"need one image per subject: {n} images for {len(eids)} eids")
    mean = total / n
    scores = [ncc(mean, im) for c in chunks() for im in np.asarray(c)]
    best = int(np.argmax(scores))
    return str(eids[best]), float(scores[best])
