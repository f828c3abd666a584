"""Saliency stage speed: seconds per subject for the guided Grad-CAM maps (both signs) and for the
2D co-registration (two views, affine + B-spline), and the implied time of 3,000 subjects of one
field.

Usage: python benchmarks/saliency.py [--subjects 12] [--layer layer4] [--input-size 64]
       [--store DIR]   (a prepared store with the projection format; default: phantom subjects
                        made here at the demo's scale 0.35)
       python benchmarks/saliency.py --stage --store DIR --fields-csv FILE [--subjects N]
                       [--layer layer4] [--folds 3]
                       (the stage's own function, ``study_field_saliency``, on the store's first
                        N subjects, both sexes: reference choice, maps, registration with every
                        transform written, warping, aggregation, outputs; ``--folds`` networks
                        with the subjects dealt to them in turn)

The network is the demo's ResNet18 (7 outputs, 2 channels) with random weights: the time of a
forward and backward pass does not depend on the weights. The registration runs on real
projection images (phantom), each subject to the first one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from biometry import phantom
from biometry.analysis import registration, saliency
from biometry.data.formats import projection
from biometry.data.store import Store
from biometry.learn.models import build_model


def phantom_images(n: int, scale: float = 0.35, seed: int = 0) -> np.ndarray:
    """(n, 2, 256, 256) uint8 projections of noise-free phantom subjects."""
    eids = phantom.cohort_eids(n, seed)
    return np.stack([projection(phantom.fused_truth(phantom.make_subject(
        e, phantom.subject_seed(seed, i), scale=scale, stations=False))) for i, e in enumerate(eids)])


def stage(a: argparse.Namespace) -> None:
    """Time :func:`saliency.study_field_saliency` end to end on the store's first subjects."""
    store = Store.open(a.store)
    eids = store.eids[: a.subjects]
    models = {k: (build_model("resnet18", 2, 7, "regression", seed=k),
                  lambda x: saliency.default_preprocess(x, (a.input_size, a.input_size)))
              for k in range(a.folds)}
    with tempfile.TemporaryDirectory() as tmp:
        splits = Path(tmp) / "splits.csv"
        pd.DataFrame({"eid": eids, "fold": np.arange(len(eids)) % a.folds}).to_csv(splits,
                                                                                 index=False)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = saliency.study_field_saliency(
            store, "projection", a.fields_csv, splits, models, 0, Path(tmp) / "out",
            Path(tmp) / "registration", layer=a.layer, progress=None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(int(v["n"]) for v in metrics["per_sex"].values())
    per_sex = ", ".join(f"{sex} {v['n']}" for sex, v in metrics["per_sex"].items())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"study_field_saliency, {a.layer}, {a.input_size} px, {a.folds} folds: {n} subjects "
          f"({per_sex}) in "
          f"{wall / 60:.1f} min wall ({wall / n:.3f} s per subject; CPU {cpu / n:.3f} s per "
          f"subject, this process)")
    for sex, v in metrics["per_sex"].items():
        print(f"  {sex}: maps {v['seconds_per_subject_maps']:.3f} s, registration (with "
              f"writing, warping) {v['seconds_per_subject_registration']:.3f} s per subject; "
              f"NCC rose for {v['alignment']['share_improved']:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--store", help="prepared store folder (projection format)")
    ap.add_argument("--stage", action="store_true",
                    help="time the stage's function on the store (needs --store, --fields-csv)")
    ap.add_argument("--fields-csv", help="the cohort's fields.csv (sex of each subject)")
    ap.add_argument("--folds", type=int, default=3, help="networks in --stage (default 3)")
    a = ap.parse_args()
    if a.stage:
        if not (a.store and a.fields_csv):
            ap.error("--stage needs --store and --fields-csv")
        stage(a)
        return
    if a.store:
        store = Store.open(a.store)
        images = np.asarray(store.array("projection")[: a.subjects])
    else:
        images = phantom_images(a.subjects)
    model = build_model("resnet18", 2, 7, "regression", seed=0)

    def pre(x):
        return saliency.default_preprocess(x, (a.input_size, a.input_size))

    saliency.saliency_maps(model, images[:2], 0, a.layer, preprocess=pre)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    saliency.saliency_maps(model, images, 0, a.layer, preprocess=pre, batch_size=a.batch_size)
    maps = ((time.perf_counter() - t0) / len(images), (time.process_time() - c0) / len(images))

    fixed = images[0, 0].astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    gains = []
    for im in images[1:]:
        st = registration.register(fixed, im[0].astype(np.float32))
        gains.append(st.ncc_after > st.ncc_before)
    n_reg = max(1, len(images) - 1)
    reg = ((time.perf_counter() - t0) / n_reg, (time.process_time() - c0) / n_reg)
    total = (maps[0] + reg[0], maps[1] + reg[1])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}, {len(images)} subjects")
    print("| step | wall s / subject | CPU s / subject | 3,000 subjects, wall (min) |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu) in ((f"maps: guided Grad-CAM, both signs, ResNet18 at {a.input_size} "
                               f"px, {a.layer}", maps),
                              ("registration: 2 views, affine + B-spline", reg),
                              ("**one field (maps + registration)**", total),
                              ("a further field (transforms reused)", maps)):
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {3000 * wall / 60:.1f} |")
    print(f"NCC to the reference rose for {int(np.sum(gains))}/{len(gains)} subjects")


if __name__ == "__main__":
    main()
