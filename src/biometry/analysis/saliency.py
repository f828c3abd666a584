"""Guided Grad-CAM saliency of a regression network, aggregated over a cohort (``docs/saliency.md``).

The maps come from captum's ``GuidedGradCam`` (guided backpropagation times the Grad-CAM map of
one layer, upsampled bilinearly to the input). This module takes a plain ``torch.nn.Module`` and
images: it never loads a model bundle (the analysis room does not import ``learn``); a notebook
loads the bundle and passes ``bundle.model`` and its input transform.

**The sign of a regression output.** Grad-CAM ends in a ReLU, so it keeps only evidence that
*raises* the attributed output: a region whose signal lowers the prediction gives an all-zero
map. For a regression target both directions are evidence, so :func:`saliency_maps` attributes
``+y`` and ``-y`` separately (two guided Grad-CAM passes) and combines them, with the image
channels, into one magnitude per pixel::

    s(p) = sqrt( sum_c  G(+y)_c(p)^2 + G(-y)_c(p)^2 )

Raw values are kept (no per-image min-max), so subjects and fields stay comparable; the cohort
aggregate is the mean of ``s^2`` (as in the paper), see :func:`aggregate`.

**A second opinion: occlusion.** Guided backpropagation can mark bright structures for any output
(Adebayo et al. 2018, "Sanity checks for saliency maps"), so a guided Grad-CAM aggregate may show a
region that the network's answer does not depend on. :func:`occlusion_maps` asks the network
directly: each square window of the input set to zero in turn, ``|y(x) - y(x without the
window)|`` spread over the window's pixels. It needs forward passes only (one per window that
holds any signal) and is aggregated like the saliency (``occlusion: true`` in a study's saliency
block; docs/saliency.md).

**Which output.** :func:`output_column` maps a head and a field to the column of the network's
output: the field itself for ``regression``, the *mean* of a ``mean_variance`` head (column
``2 j`` of the MIMIR layout (B, T, 2) flattened), a class logit for ``classification``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam
from torch import nn

from biometry import fileio
from biometry.analysis import registration
from biometry.data.store import Store, canonical_order
from biometry.data.tables import references_from_fields_csv

#: heads whose output columns :func:`output_column` knows
HEADS = ("regression", "mean_variance", "classification")
SIGNS = ("both", "positive", "negative")


def output_column(head: str, field_index: int = 0) -> int:
    """Column of the raw network output that holds field ``field_index``'s prediction.

    ``regression``: ``field_index``; ``mean_variance``: ``2 * field_index`` (the mean; the
    log-variance at ``2 j + 1`` is not attributed); ``classification``: the class index.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if field_index < 0:
        raise ValueError(f"field index must be >= 0, got {field_index}")
    return 2 * field_index if head == "mean_variance" else field_index


def field_column(head: str, field_keys: Sequence[str], field: str) -> int:
    """:func:`output_column` of ``field`` in a network trained on ``field_keys``."""
    keys = [str(k) for k in field_keys]
    if str(field) not in keys:
        raise ValueError(f"field {field} is not an output of this network (its fields: "
                         f"{', '.join(keys)})")
    return output_column(head, keys.index(str(field)))


def default_preprocess(x: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """0-255 float images -> [0, 1], resized (antialiased bilinear) to ``input_size``.

    The same transform as the trainer's (``learn.augment.to_input``), written out-of-place so that
    gradients reach the stored-size image.
    """
    x = x / 255.0
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x


class ScalarOutput(nn.Module):
    """``sign * model(preprocess(x))[:, column]`` as a (B, 1) output, for captum.

    The preprocessing sits inside the module so that the attribution lands on the stored image
    (e.g. 256 x 256) although the network sees a resized one. ``preprocess`` gets a copy of the
    input and may work in place.
    """

    def __init__(self, model: nn.Module, column: int, sign: float = 1.0,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.column = int(column)
        self.sign = float(sign)
        self.preprocess = preprocess if preprocess is not None else default_preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(self.preprocess(x.clone()))
        if out.ndim != 2 or self.column >= out.shape[1]:
            raise ValueError(f"output column {self.column} does not exist in the network's output "
                             f"of shape {tuple(out.shape)}")
        return self.sign * out[:, self.column: self.column + 1]


def _layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"the network has no layer {layer!r} (e.g. {', '.join(list(modules)[1:6])})")
    return modules[layer]


def layer_grid(model: nn.Module, layer: str | nn.Module, image_shape: Sequence[int],
               preprocess: Callable | None = None) -> tuple[int, int]:
    """(h, w) of ``layer``'s output for one stored image of shape (C, H, W): the Grad-CAM grid.

    A ResNet's ``layer4`` is 1/32 of the network's input, so 2 x 2 at the demo's 64 px: each
    Grad-CAM cell then spans half the image, and bilinear upsampling of the coarse map shifts
    saliency towards the cell of the strongest evidence (docs/saliency.md, "The Grad-CAM grid").
    """
    shape: list[tuple[int, int]] = []
    hook = _layer(model, layer).register_forward_hook(
        lambda _m, _i, out: shape.append(tuple(out.shape[-2:])))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((1, *image_shape), dtype=torch.float32)
            model(preprocess(x) if preprocess is not None else default_preprocess(x))
    finally:
        hook.remove()
        model.train(was_training)
    return int(shape[0][0]), int(shape[0][1])


#: a Grad-CAM grid narrower than this cannot put the two thighs (or liver and spleen side) in
#: different cells; the stage warns
MIN_GRID = 4


def guided_gradcam(model: nn.Module, images: np.ndarray, column: int, layer: str | nn.Module = "layer4",
                   sign: float = 1.0, preprocess: Callable | None = None,
                   batch_size: int = 16) -> np.ndarray:
    """Raw captum guided Grad-CAM of ``sign * output[:, column]`` for each image.

    Parameters
    ----------
    model : the network (put in eval mode here; restored afterwards).
    images : (N, C, H, W) uint8 or float in 0-255 (the stored format).
    column : output column (:func:`output_column`).
    layer : the Grad-CAM layer, a module name of ``model`` (``"layer4"``, ``"layer3"``) or module.
    sign : +1 attributes the output, -1 its negative.
    preprocess : float 0-255 (B, C, H, W) -> the network's input; default :func:`default_preprocess`.
    batch_size : images per pass.

    Returns
    -------
    (N, C, H, W) float32, unnormalised.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    target_layer = _layer(model, layer)
    wrapped = ScalarOutput(model, column, sign, preprocess)
    explainer = GuidedGradCam(wrapped, target_layer)
    was_training = model.training
    model.eval()
    out = np.zeros(images.shape, dtype=np.float32)
    try:
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size], dtype=np.float32))
            x.requires_grad_(True)
            with warnings.catch_warnings():  # captum announces its (temporary) ReLU hooks each call
                warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                attr = explainer.attribute(x, target=0, interpolate_mode="bilinear")
            out[s:s + len(x)] = attr.detach().numpy()
    finally:
        model.train(was_training)
    return out


def guided_gradcam_both_signs(model: nn.Module, images: np.ndarray, column: int,
                              layer: str | nn.Module = "layer4", preprocess: Callable | None = None,
                              batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """:func:`guided_gradcam` of ``+y`` and of ``-y`` at the cost of three passes instead of four.

    Grad-CAM is linear in the output before its ReLU (its channel weights are mean gradients), so
    the map of ``-y`` is the negative of that of ``y``: one ``LayerGradCam`` pass without the ReLU
    gives both, ``relu(cam)`` and ``relu(-cam)``, each upsampled as ``GuidedGradCam`` does.
    Guided backpropagation is not linear in the sign and runs once per sign.

    Returns
    -------
    (positive, negative): two (N, C, H, W) float32 arrays, equal to ``guided_gradcam(..., sign=+1)``
    and ``guided_gradcam(..., sign=-1)``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    target_layer = _layer(model, layer)
    up, down = (ScalarOutput(model, column, s, preprocess) for s in (1.0, -1.0))
    cam_of, gb_up, gb_down = LayerGradCam(up, target_layer), GuidedBackprop(up), GuidedBackprop(down)
    was_training = model.training
    model.eval()
    pos = np.zeros(images.shape, dtype=np.float32)
    neg = np.zeros(images.shape, dtype=np.float32)
    try:
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size], dtype=np.float32))
            x.requires_grad_(True)
            with warnings.catch_warnings():  # captum announces its (temporary) ReLU hooks each call
                warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                cam = cam_of.attribute(x, target=0, relu_attributions=False).detach()
                size = tuple(x.shape[2:])
                for out, gb, c in ((pos, gb_up, cam), (neg, gb_down, -cam)):
                    weight = LayerAttribution.interpolate(F.relu(c), size, interpolate_mode="bilinear")
                    out[s:s + len(x)] = (gb.attribute(x, target=0) * weight).detach().numpy()
    finally:
        model.train(was_training)
    return pos, neg


def occlusion_maps(model: nn.Module, images: np.ndarray, column: int, window: int = 32,
                   stride: int = 16, preprocess: Callable | None = None,
                   batch_size: int = 64) -> np.ndarray:
    """How far the output moves when each part of the input is hidden (occlusion sensitivity).

    Every ``window`` x ``window`` square on a ``stride`` grid of the stored image (all channels) is
    set to 0 in turn; the change ``|y(x) - y(x_occluded)|`` of output ``column`` is added to the
    window's pixels, and each pixel's sum is divided by the number of windows that cover it.
    Windows that are already all zero (background) change nothing and are not evaluated.

    Parameters
    ----------
    images : (N, C, H, W) in 0-255 (the stored format); the windows are in its pixels.
    window, stride : in stored pixels (32 and 16 on a 256 x 256 format: a 15 x 15 grid of
        windows, each pixel covered by up to four).

    Returns
    -------
    (N, H, W) float32 >= 0, in the output's units.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    h, w = images.shape[2:]
    if not 0 < stride <= window <= min(h, w):
        raise ValueError(f"need 0 < stride <= window <= image size, got window {window}, "
                         f"stride {stride} on {h} x {w}")
    ys = sorted(set(range(0, h - window + 1, stride)) | {h - window})
    xs = sorted(set(range(0, w - window + 1, stride)) | {w - window})
    cover = np.zeros((h, w), dtype=np.float32)
    for y in ys:
        for x in xs:
            cover[y:y + window, x:x + window] += 1
    wrapped = ScalarOutput(model, column, 1.0, preprocess)
    was_training = model.training
    model.eval()
    out = np.zeros((len(images), h, w), dtype=np.float32)
    try:
        with torch.no_grad():
            for i, image in enumerate(images):
                x0 = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
                base = float(wrapped(x0[None])[0, 0])
                boxes = [(y, x) for y in ys for x in xs if image[:, y:y + window, x:x + window].any()]
                for s in range(0, len(boxes), batch_size):
                    part = boxes[s:s + batch_size]
                    batch = x0[None].repeat(len(part), 1, 1, 1)
                    for b, (y, x) in enumerate(part):
                        batch[b, :, y:y + window, x:x + window] = 0
                    delta = np.abs(base - wrapped(batch)[:, 0].numpy())
                    for d, (y, x) in zip(delta, part):
                        out[i, y:y + window, x:x + window] += d
    finally:
        model.train(was_training)
    return out / cover


def saliency_maps(model: nn.Module, images: np.ndarray, column: int, layer: str | nn.Module = "layer4",
                  signs: str = "both", preprocess: Callable | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """One saliency magnitude per pixel and subject (see the module doc for the sign rule).

    ``signs``: ``"both"`` (default) combines the guided Grad-CAM of ``+y`` and ``-y``;
    ``"positive"`` / ``"negative"`` keep one of them (the textbook map is ``"positive"``).

    Returns
    -------
    (N, H, W) float32 >= 0: ``sqrt`` of the sum of squares over channels (and signs).
    """
    if signs not in SIGNS:
        raise ValueError(f"signs must be one of {', '.join(SIGNS)}, got {signs!r}")
    if signs == "both":
        parts = guided_gradcam_both_signs(model, images, column, layer, preprocess, batch_size)
    else:
        sign = 1.0 if signs == "positive" else -1.0
        parts = (guided_gradcam(model, images, column, layer, sign, preprocess, batch_size),)
    energy = sum(np.square(p, dtype=np.float32).sum(axis=1) for p in parts)
    return np.sqrt(energy).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# aggregation and the anatomy check


def aggregate(maps: np.ndarray) -> np.ndarray:
    """Mean of the squared maps over subjects (axis 0): the paper's cohort saliency, float32."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or len(maps) == 0:
        raise ValueError(f"maps must be (N, H, W) with N >= 1, got shape {maps.shape}")
    return np.square(maps).mean(axis=0).astype(np.float32)


def region_sum(agg: np.ndarray, mask: np.ndarray, columns: slice | None = None) -> float:
    """Sum of ``agg`` inside ``mask`` (optionally only the image columns ``columns``)."""
    m = np.asarray(mask, dtype=bool).copy()
    if columns is not None:
        keep = np.zeros_like(m)
        keep[:, columns] = True
        m &= keep
    return float(np.asarray(agg, dtype=np.float64)[m].sum())


def region_density(agg: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``agg`` over the pixels of ``mask`` (saliency per pixel inside it)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("the region is empty")
    return float(np.asarray(agg, dtype=np.float64)[m].mean())


def anatomy_metrics(agg: np.ndarray, masks: Mapping[str, np.ndarray], split: int) -> dict[str, float]:
    """Where the aggregate falls, from truth footprints in the same image space.

    Parameters
    ----------
    agg : (H, W) aggregate saliency.
    masks : footprints (H, W) bool with keys ``thigh_anterior_left``, ``thigh_anterior_right``,
        ``liver``, ``body`` (:func:`biometry.phantom.label_footprints`); missing keys are skipped.
    split : first column of the sagittal half: left and right are compared in the coronal half
        only, where they do not overlap.

    Returns
    -------
    ``thigh_left_right_ratio`` (saliency in the subject-left anterior thigh / in the right, coronal
    half), ``liver_body_density_ratio`` (mean saliency per pixel in the liver / in the body, both
    halves), and the sums and densities behind them.
    """
    out: dict[str, float] = {}
    cor = slice(0, int(split))
    if "thigh_anterior_left" in masks and "thigh_anterior_right" in masks:
        left = region_sum(agg, masks["thigh_anterior_left"], cor)
        right = region_sum(agg, masks["thigh_anterior_right"], cor)
        out.update(thigh_left_sum=left, thigh_right_sum=right,
                   thigh_left_right_ratio=left / right if right > 0 else float("inf"))
    if "liver" in masks and "body" in masks:
        liver, body = region_density(agg, masks["liver"]), region_density(agg, masks["body"])
        out.update(liver_density=liver, body_density=body,
                   liver_body_density_ratio=liver / body if body > 0 else float("inf"))
    return out


# ---------------------------------------------------------------------------------------------
# the stage: one field of a study, the subjects of one sex

#: UKB sex (field 31) codes
SEXES = {"female": 0, "male": 1}


def subjects_by_sex(fields_csv: str | os.PathLike, eids: Sequence[str]) -> dict[str, list[str]]:
    """``{"female": [...], "male": [...]}`` from field 31 of the field table (store order kept);
    subjects without a sex are left out."""
    sex = references_from_fields_csv(fields_csv, ["31"])["31"]
    sex.index = sex.index.astype(str)
    sex = sex.reindex([str(e) for e in eids])
    return {name: [e for e, v in sex.items() if v == code] for name, code in SEXES.items()}


def water_images(store: Store, fmt: str, eids: Sequence[str], chunk: int = 256) -> np.ndarray:
    """Channel 0 (water) of ``eids`` as float32 (N, H, W), read from the store in chunks."""
    arr = store.array(fmt)
    rows = store.rows(list(eids))
    out = np.empty((len(rows),) + tuple(arr.shape[-2:]), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        order = np.argsort(part)  # memory maps read fastest in row order
        out[s + order] = np.asarray(arr[part[order]])[:, 0]
    return out


def reference_subject(store: Store, fmt: str, eids: Sequence[str], chunk: int = 256
                      ) -> tuple[str, float]:
    """The most typical of ``eids`` (water images; :func:`registration.choose_reference`)."""
    eids = [str(e) for e in eids]
    def chunks():
        for s in range(0, len(eids), chunk):
            yield water_images(store, fmt, eids[s:s + chunk])
    return registration.choose_reference(chunks, eids)


def read_splits(path: str | os.PathLike) -> dict[str, int]:
    """``eid -> fold`` from a study's ``splits.csv``."""
    try:
        df = pd.read_csv(path, dtype={"eid": str})
        return dict(zip(df["eid"], df["fold"].astype(int)))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable splits table ({exc})") from None


def field_saliency(store: Store, fmt: str, eids: Sequence[str], reference: str,
                   folds: Mapping[str, int], models: Mapping[int, tuple[nn.Module, Callable | None]],
                   column: int, transform_dir: str | os.PathLike, layer: str = "layer4",
                   split: int = registration.DEFAULT_SPLIT, batch_size: int = 16,
                   signs: str = "both", occlusion: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict[str, object]:
    """Saliency of one output over ``eids`` (one sex), registered to ``reference`` and aggregated.

    Each subject's map comes from the network of the fold that held it out (``models[fold]`` =
    (module, preprocess)); its water image is registered to the reference's once
    (:func:`registration.register_cached` in ``transform_dir``) and the transform warps the map.
    A subject whose registration fails is reported and left out; the rest go on. With
    ``occlusion``, :func:`occlusion_maps` of the same subjects are warped and aggregated the same way.

    Returns
    -------
    dict: ``aggregate`` (H, W) float32 = mean of the squared warped maps, ``n``, ``failed``
    (``{eid: error}``), ``ncc`` (DataFrame eid, ncc_before, ncc_after), ``seconds_maps``,
    ``seconds_registration``; with ``occlusion`` also ``occlusion_aggregate`` and
    ``seconds_occlusion``.
    """
    eids = [str(e) for e in eids]
    missing = sorted({folds.get(e) for e in eids} - set(models), key=str)
    if missing:
        raise ValueError(f"no network for fold(s) {missing} (subjects need the network that held "
                         f"them out)")
    arr = store.array(fmt)
    fixed = water_images(store, fmt, [reference])[0]
    registration.open_transform_cache(transform_dir)  # transforms of another method: redone
    total = np.zeros(fixed.shape, dtype=np.float64)
    total_occ = np.zeros(fixed.shape, dtype=np.float64)
    rows, failed = [], {}
    t_maps = t_reg = t_occ = 0.0
    for fold in sorted({folds[e] for e in eids}):
        chosen = [e for e in eids if folds[e] == fold]
        model, preprocess = models[fold]
        for s in range(0, len(chosen), batch_size):
            batch = chosen[s:s + batch_size]
            images = np.asarray(arr[store.rows(batch)])
            t0 = time.perf_counter()
            maps = saliency_maps(model, images, column, layer, signs, preprocess, batch_size)
            t_maps += time.perf_counter() - t0
            t0 = time.perf_counter()
            occ = occlusion_maps(model, images, column, preprocess=preprocess) if occlusion else None
            t_occ += time.perf_counter() - t0
            t1 = time.perf_counter()
            for j, (eid, image, m) in enumerate(zip(batch, images, maps)):
                try:
                    st = registration.register_cached(transform_dir, eid, fixed, image[0], split)
                except (RuntimeError, ValueError) as exc:
                    failed[eid] = str(exc).splitlines()[0]
                    if progress:
                        progress(f"subject {eid}: registration failed ({failed[eid]}); left out")
                    continue
                total += np.square(registration.warp(m, st, split), dtype=np.float64)
                if occ is not None:
                    total_occ += np.square(registration.warp(occ[j], st, split), dtype=np.float64)
                rows.append({"eid": eid, "fold": fold, "ncc_before": st.ncc_before,
                             "ncc_after": st.ncc_after})
            t_reg += time.perf_counter() - t1
            if progress:
                progress(f"fold {fold}: {min(s + batch_size, len(chosen))}/{len(chosen)} subjects")
    n = len(rows)
    if n == 0:
        raise ValueError("no subject could be registered: nothing to aggregate")
    out = {"aggregate": (total / n).astype(np.float32), "n": n, "failed": failed,
           "ncc": pd.DataFrame(rows), "seconds_maps": t_maps, "seconds_registration": t_reg}
    if occlusion:
        out.update(occlusion_aggregate=(total_occ / n).astype(np.float32), seconds_occlusion=t_occ)
    return out


def alignment_summary(ncc: pd.DataFrame) -> dict[str, float]:
    """Share of subjects whose NCC to the reference rose, and the mean NCC before and after
    (the reference itself, NCC 1 before, is left out)."""
    others = ncc[ncc["ncc_before"] < 1.0 - 1e-9]
    if others.empty:
        return {"share_improved": float("nan"), "ncc_before_mean": float("nan"),
                "ncc_after_mean": float("nan"), "n": 0}
    return {"share_improved": float((others["ncc_after"] > others["ncc_before"]).mean()),
            "ncc_before_mean": float(others["ncc_before"].mean()),
            "ncc_after_mean": float(others["ncc_after"].mean()), "n": int(len(others))}


def write_outputs(out_dir: str | os.PathLike, sex: str, result: Mapping[str, object]) -> Path:
    """``aggregate_<sex>.npy`` (float32), ``ncc_<sex>.csv`` and, with occlusion,
    ``occlusion_<sex>.npy`` into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    fileio.write_npy(out_dir / f"aggregate_{sex}.npy", np.asarray(result["aggregate"], np.float32))
    occlusion = out_dir / f"occlusion_{sex}.npy"
    if result.get("occlusion_aggregate") is not None:
        fileio.write_npy(occlusion, np.asarray(result["occlusion_aggregate"], np.float32))
    else:  # a run redone without occlusion leaves no stale aggregate beside its metrics
        occlusion.unlink(missing_ok=True)
    fileio.write_csv(out_dir / f"ncc_{sex}.csv", result["ncc"])
    return out_dir


def candidate_subjects(store_eids: Sequence, folds: dict, models: dict) -> list[str]:
    """The subjects with a trained network, in canonical eid order: the store's row order (the
    order in which preparation workers finished) never changes which subjects are drawn."""
    eids = [str(e) for e in store_eids]
    return [eids[i] for i in canonical_order(eids) if folds.get(eids[i]) in models]


def pick_subjects(eids: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """``n`` of ``eids`` in a seeded random order (all of them when ``n`` is None or larger)."""
    eids = [str(e) for e in eids]
    if n is None or n >= len(eids):
        return eids
    order = np.random.default_rng(seed).permutation(len(eids))[: int(n)]
    return [eids[i] for i in sorted(order)]


def study_field_saliency(store: Store, fmt: str, fields_csv: str | os.PathLike,
                         splits_csv: str | os.PathLike,
                         models: Mapping[int, tuple[nn.Module, Callable | None]], column: int,
                         out_dir: str | os.PathLike, registration_root: str | os.PathLike,
                         sexes: Sequence[str] = ("female", "male"), n_subjects: int | None = None,
                         layer: str = "layer4", seed: int = 0, signs: str = "both",
                         occlusion: bool = False,
                         footprints: Callable[[str], tuple[Mapping[str, np.ndarray], int]] | None = None,
                         progress: Callable[[str], None] | None = print) -> dict[str, object]:
    """The saliency stage of one field: per sex, reference, maps, registration, aggregate, metrics.

    Writes into ``out_dir`` (the contract of ``docs/saliency.md``): ``aggregate_<sex>.npy``,
    ``ncc_<sex>.csv``, ``reference.json`` and ``metrics.json`` (and ``occlusion_<sex>.npy`` with
    ``occlusion``: :func:`occlusion_maps` of the same subjects, aggregated the same way). Transforms go to
    ``registration_root/<sex>_<reference eid>/`` and are shared by every field of the study.

    Parameters
    ----------
    models : fold -> (network, preprocess); only subjects of these folds are used.
    column : the output column (:func:`output_column`).
    footprints : eid -> (truth footprints, view split) of a subject (phantom cohorts:
        :func:`biometry.phantom.subject_footprints`); adds the anatomy figures to the metrics.

    Returns
    -------
    the metrics dict (also in ``metrics.json``).
    """
    for sex in sexes:
        if sex not in SEXES:
            raise ValueError(f"unknown sex {sex!r}; use {', '.join(SEXES)}")
    folds = read_splits(splits_csv)
    eids = candidate_subjects(store.eids, folds, models)
    by_sex = subjects_by_sex(fields_csv, eids)
    out_dir = Path(out_dir)
    first_model, first_pre = models[min(models)]
    grid = layer_grid(first_model, layer, store.array(fmt).shape[1:], first_pre)
    if min(grid) < MIN_GRID:
        message = (f"{layer} is a {grid[0]} x {grid[1]} grid at this input size: each Grad-CAM cell "
                   f"spans 1/{min(grid)} of the image, too coarse to tell left from right; use an "
                   f"earlier layer or a larger input (docs/saliency.md)")
        warnings.warn(message, stacklevel=2)  # shown once in the notebook's output
    metrics: dict[str, object] = {"layer": layer, "layer_grid": list(grid), "column": int(column),
                                  "signs": signs, "registration_channel": "water",
                                  "occlusion": bool(occlusion), "per_sex": {}}
    references: dict[str, object] = {"method": (
        "per sex, the subject whose water image (the stored 2D format, unregistered) has the "
        "highest normalised cross-correlation with the mean water image of all subjects of that "
        "sex with a trained network"), "per_sex": {}}
    for sex in sexes:
        pool = by_sex[sex]
        if not pool:
            raise ValueError(f"no {sex} subject with a trained network in {fields_csv}")
        ref, score = reference_subject(store, fmt, pool)
        chosen = pick_subjects(pool, n_subjects, seed)
        if ref not in chosen:
            chosen = chosen + [ref]
        result = field_saliency(store, fmt, chosen, ref, folds, models, column,
                                Path(registration_root) / f"{sex}_{ref}", layer=layer,
                                signs=signs, occlusion=occlusion, progress=progress)
        write_outputs(out_dir, sex, result)
        n = int(result["n"])
        entry = {"n": n, "failed": result["failed"],
                 "alignment": alignment_summary(result["ncc"]),
                 "seconds_per_subject_maps": result["seconds_maps"] / n,
                 "seconds_per_subject_registration": result["seconds_registration"] / n}
        if occlusion:
            entry["seconds_per_subject_occlusion"] = result["seconds_occlusion"] / n
        if footprints is not None:
            masks, split = footprints(ref)
            entry["anatomy"] = anatomy_metrics(result["aggregate"], masks, split)
            if occlusion:
                entry["occlusion_anatomy"] = anatomy_metrics(result["occlusion_aggregate"], masks,
                                                             split)
        metrics["per_sex"][sex] = entry
        references["per_sex"][sex] = {"eid": ref, "ncc_to_mean": score, "pool": len(pool)}
    fileio.write_json(out_dir / "reference.json", references)
    fileio.write_json(out_dir / "metrics.json", metrics)
    return metrics


def read_aggregates(stage_dir: str | os.PathLike, sex: str,
                    field_keys: Sequence[str]) -> dict[str, tuple[str, np.ndarray]]:
    """``field -> (reference eid, aggregate)`` of the fields whose saliency run left outputs for
    ``sex`` in ``stage_dir`` (``papermill_runs/<study>/saliency/``); others are skipped."""
    out = {}
    for key in field_keys:
        d = Path(stage_dir) / str(key)
        agg, ref = d / f"aggregate_{sex}.npy", d / "reference.json"
        if agg.is_file() and ref.is_file():
            eid = json.loads(ref.read_text())["per_sex"][sex]["eid"]
            out[str(key)] = (str(eid), np.load(agg))
    return out
