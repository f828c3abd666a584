"""Benchmark of the inference engine: subjects per minute end to end (UKB zips -> predictions.csv)
for 4 ResNet50 modules at 256 x 256 (the MIMIR set-up), preparation and networks apart.

1. A phantom release of ``--subjects`` subjects at ``--scale`` (1 = the UKB grid) is written as UKB
   zips (DICOM) into a temporary folder.
2. Four bundles are written like ``biometry export`` writes them: ResNet50, 3-channel ``mimir``
   input at 256 x 256, mean-variance heads with the field counts of MIMIR's four modules (body
   composition 10, organs/atlas 50, anthropometry/experimental 11, age 1 = 72 fields); random
   weights (the speed of a network does not depend on its weights).
3. ``biometry.inference.engine.infer`` runs end to end (cold cache), timed by phase: preparation
   (zip -> DICOM -> fused volume -> mimir image, in ``--workers`` processes; their CPU time is
   counted) and networks.
4. The networks alone, per image, in fp32, fp32 channels-last and bfloat16 autocast (with the
   largest difference of the bfloat16 means from fp32, in units of the predicted standard
   deviation), on the CPU with ``--threads`` threads, and on CUDA when there is a GPU.

Usage: ``python benchmarks/infer.py [--subjects 4] [--scale 1.0] [--threads 2] [--batch 8]
[--workers 2]``;
prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from biometry.config import fields as field_catalogue
from biometry.data.store import Store
from biometry.inference.bundle import forward, load_bundle, write_bundle
from biometry.inference.engine import infer
from biometry.learn.models import build_model
from biometry.phantom import generate_cohort
from biometry.runs.runner import cpu_model

#: MIMIR's four modules and their numbers of fields (72 in all)
MODULES = {"body_composition": 10, "organs": 50, "anthropometry": 11, "age": 1}


def make_bundles(root: Path) -> list[Path]:
    keys = list(field_catalogue.catalogue().index)
    out, start = [], 0
    for i, (name, t) in enumerate(MODULES.items()):
        mine = [keys[(start + j) % len(keys)] for j in range(t)]
        start += t
        model = build_model("resnet50", 3, t, "mean_variance", seed=i)
        with torch.no_grad():  # moderate outputs from an untrained network
            model.fc.weight.mul_(1e-2)
        out.append(write_bundle(
            root / name, name=name, network={"arch": "resnet50", "in_channels": 3,
                                             "head": "mean_variance"},
            input_spec={"format": "mimir", "shape": [3, 256, 256], "dtype": "uint8",
                        "input_size": None, "pixel_scale": 1 / 255},
            field_keys=mine, members=[(model.state_dict(), [0.0] * t, [1.0] * t)],
            calibration=[1.0] * t, card=f"# benchmark module {name}\n"))
    return out


def time_networks(bundles, images: np.ndarray, device: str, batch: int, repeats: int = 2
                  ) -> dict[str, float]:
    """Seconds per image for all bundles together, per setting; and the bf16 difference."""
    res = {}
    settings = {"fp32": {}, "fp32 channels-last": {"channels_last": True},
                "bf16 autocast channels-last": {"channels_last": True, "bf16": True}}
    ref = None
    for label, kw in settings.items():
        forward(bundles[0], images[:1], device=device, **kw)  # warm-up
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            outs = [forward(b, images, batch_size=batch, device=device, **kw) for b in bundles]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        res[label] = best / len(images)
        res[label + " cpu"] = best_cpu / len(images)
        if ref is None:
            ref = outs
        elif kw.get("bf16"):
            worst = 0.0
            for (m, _v), (m0, v0) in zip(outs, ref, strict=True):
                worst = max(worst, float(np.max(np.abs(m - m0) / np.sqrt(v0))))
            res["bf16_max_diff_sd"] = worst
    return res


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="preparation processes of the engine")
    ap.add_argument("--copies", type=int, default=1,
                    help="each synthesised zip also hard-linked under COPIES-1 other eids, so that "
                         "a long run (start-up spread thin) needs no hour of synthesis; the work per "
                         "input is the same")
    ap.add_argument("--bf16", action="store_true",
                    help="end to end with `biometry infer --bf16 --channels-last` (default fp32)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cohort = generate_cohort(tmp / "release", a.subjects, 123, scale=a.scale,
                                 station_format="zip", progress=False)
        t_synth = time.perf_counter() - t0
        zips = sorted((cohort / "zip").glob("*_20201_*.zip"))
        for j in range(1, a.copies):
            for z in zips:  # <eid>_20201_2_0.zip -> <j><eid>_20201_2_0.zip, the same bytes
                (z.parent / f"{j}{z.name}").hardlink_to(z)
        bundles = make_bundles(tmp / "bundles")
        # core-seconds of this process and of the preparation workers (reaped when the pool
        # closes, so RUSAGE_CHILDREN holds them afterwards)
        c0, k0 = time.process_time(), _children_cpu()
        result = infer(bundles, cohort / "zip", tmp / "out" / "predictions.csv",
                       batch_size=a.batch, device="cpu", progress=False, workers=a.workers,
                       channels_last=a.bf16, bf16=a.bf16)
        infer_cpu = time.process_time() - c0 + _children_cpu() - k0
        loaded = [load_bundle(b) for b in bundles]
        store = next((tmp / "out" / "cache").glob("mimir-*"))
        images = np.asarray(Store.open(store).load("mimir"))[:48]  # the networks alone: 48 do
        cpu = time_networks(loaded, images, "cpu", a.batch)
        gpu = time_networks(loaded, images, "cuda", 32) if torch.cuda.is_available() else None
    n = result.n_input
    prep = result.prepare_seconds / n
    net = result.network_seconds / n
    total = result.seconds / n
    # CPU (core-) seconds of this process: what the work costs on idle cores (the wall times
    # include waiting on a machine shared with other jobs); networks from the run below in the
    # setting the end-to-end run used.
    # On 2 idle cores the best case is core-seconds / 2 (two preparation workers, 2 threads).
    total_cpu = infer_cpu / n
    setting = "bf16 autocast channels-last" if a.bf16 else "fp32"
    net_cpu = cpu[setting + " cpu"]  # core-seconds (all torch threads)
    prep_cpu = max(total_cpu - net_cpu, 0.0)
    cpu_name = cpu_model()
    lines = [
        "## Inference engine", "",
        f"Measured by `benchmarks/infer.py` on {dt.date.today().isoformat()}: {cpu_name}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; {n} phantom subjects "
        f"at scale {a.scale} as UKB zips (synthesised in {t_synth:.0f} s, not counted"
        + (f"; {len(zips)} distinct, each under {a.copies} eids by hard links" if a.copies > 1
           else "") + "); 4 ResNet50 "
        f"modules (MIMIR's 10 + 50 + 11 + 1 fields) on the 3 x 256 x 256 `mimir` input, batch "
        f"{a.batch}; cold cache.", "",
        "| phase | wall s / subject | min / 1,000 (wall) | core-s / subject | min / 1,000 on 2 idle cores |",
        "|---|---:|---:|---:|---:|",
        f"| preparation (zip -> fused volume -> mimir image, {a.workers} worker(s)) | {prep:.2f} | "
        f"{prep * 1000 / 60:.1f} | {prep_cpu:.2f} | {prep_cpu * 1000 / 120:.1f} |",
        f"| networks, 4 modules ({setting}) | {net:.2f} | {net * 1000 / 60:.1f} | {net_cpu:.2f} | "
        f"{net_cpu * 1000 / 120:.1f} |",
        f"| **end to end (`infer`)** | **{total:.2f}** | **{total * 1000 / 60:.1f}** | "
        f"**{total_cpu:.2f}** | **{total_cpu * 1000 / 120:.1f}** |", "",
        "Networks alone (4 modules, per subject; core-s = process CPU seconds):", "",
        "| device / setting | wall s / subject | min / 1,000 (wall) | core-s / subject |",
        "|---|---:|---:|---:|"]
    for label, per in cpu.items():
        if label != "bf16_max_diff_sd" and not label.endswith(" cpu"):
            lines.append(f"| CPU {label} | {per:.3f} | {per * 1000 / 60:.1f} | "
                         f"{cpu[label + ' cpu']:.3f} |")
    if gpu:
        for label, per in gpu.items():
            if label != "bf16_max_diff_sd" and not label.endswith(" cpu"):
                lines.append(f"| CUDA {label} | {per:.4f} | {per * 1000 / 60:.2f} | |")
    lines += ["", f"- bfloat16 autocast: largest change of a predicted mean "
                  f"{cpu['bf16_max_diff_sd']:.3f} predicted SDs (CPU)."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
