"""Time per subject of the multi-atlas liver baseline beside the network's, and how much the
phantom's livers differ (Dice of the best template before and after registration).

Phantom subjects are made in memory (``phantom.make_subject``) and fused; templates are chosen
among them as the liver study does (:func:`biometry.analysis.atlas.choose_templates`), the others
are targets. The network's time is the forward pass of the liver study's network on the
fat-fraction slices (batch 32, no gradient); the atlas's is :func:`atlas.segment` (registration
of every template, warping, intersection, erosion, median) after the subject's volume is loaded,
so neither includes reading files.

    python benchmarks/atlas.py [--subjects 8] [--scale 0.35] [--study liver-demo] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import time
from pathlib import Path

import pandas as pd
import torch

from biometry.analysis import atlas
from biometry.config.study import load_study
from biometry.data.volumes import fuse
from biometry.learn.augment import to_input
from biometry.learn.models import build_model
from biometry.phantom import LABELS, make_subject
from biometry.phantom.cohort import subject_seed

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def network_seconds(study, repeats: int = 3) -> float:
    cfg = study.training
    c, h, w = study.image_shape()
    model = build_model(cfg.arch, c, 1, cfg.head, weights=None).eval()
    x = torch.randint(0, 255, (32, c, h, w), dtype=torch.uint8)
    size = cfg.input_size
    with torch.no_grad():
        model(to_input(x, size))
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(to_input(x, size))
    return (time.perf_counter() - t0) / (repeats * 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.35)
    ap.add_argument("--study", default="liver-demo")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    study = load_study(a.study)
    cfg = atlas.AtlasConfig.from_dict(study.liver)
    subjects = []
    for i in range(a.subjects):
        s = make_subject(str(1000000 + i), subject_seed(11, i), a.scale)
        vol = fuse(s.stations, s.grid.spacing, eid=s.eid)
        sub = atlas.prepare_subject(vol, cfg.spacing_mm, cfg.top_fraction)
        sub.mask = s.labels == LABELS["liver"]
        subjects.append(sub)
    desc = atlas.liver_descriptors({s.eid: (s.mask, s.grid.GetSpacing()) for s in subjects})
    chosen = atlas.choose_templates(desc, cfg.templates)
    templates = [s for s in subjects if s.eid in chosen]
    rows = []
    for target in (s for s in subjects if s.eid not in chosen):
        before = max(atlas.dice(target.mask, t.mask) for t in templates)
        t0 = time.perf_counter()
        res = atlas.segment(target, templates, cfg)
        seconds = time.perf_counter() - t0
        inside = float(target.mask[res["mask"]].mean())
        rows.append({"eid": target.eid, "seconds": seconds, "best_dice_before": before,
                     "share_in_liver": inside})
    df = pd.DataFrame(rows)
    net = network_seconds(study)
    load = os.getloadavg()[0]
    atlas_s = float(df.seconds.median())
    text = (
        f"Measured by `benchmarks/atlas.py` on {dt.date.today()}: {cpu_name()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (load average {load:.0f} during the run, so "
        f"absolute times are pessimistic), one thread each, SimpleITK "
        f"{atlas.sitk.Version.VersionString()}, torch {torch.__version__}. Preset `{a.study}` "
        f"({cfg.templates} templates, registration at {cfg.spacing_mm:g} mm, "
        f"{cfg.affine_iterations} affine + {cfg.bspline_iterations} B-spline iterations), "
        f"{len(df)} phantom targets at scale {a.scale}; medians per subject.\n\n"
        f"| method | s / subject |\n|---|---:|\n"
        f"| network ({study.training.arch}, forward pass, batch 32) | {net:.4f} |\n"
        f"| multi-atlas ({cfg.templates} registrations, warp, intersect, erode, median) | "
        f"{atlas_s:.2f} |\n\n"
        f"- the atlas is **{atlas_s / net:.0f}x** slower than the network per subject "
        f"(paper: about 50x).\n"
        f"- the phantom's livers vary: the best of the {cfg.templates} templates overlaps a "
        f"target's liver with Dice {df.best_dice_before.median():.2f} (median; range "
        f"{df.best_dice_before.min():.2f}-{df.best_dice_before.max():.2f}) before registration; "
        f"after it, {100 * df.share_in_liver.median():.0f} % of the final mask's voxels lie in "
        f"the true liver (median; worst {100 * df.share_in_liver.min():.0f} %).\n\n"
        f"Re-run: `python benchmarks/atlas.py --write`.\n")
    print(df.to_string(index=False))
    print(text)
    if a.write:
        path = ROOT / "BENCHMARKS.md"
        old = path.read_text()
        section = "## Multi-atlas liver baseline\n\n" + text
        pattern = re.compile(r"## Multi-atlas liver baseline\n.*?(?=\n## |\Z)", re.S)
        new = pattern.sub(section.rstrip("\n"), old) if pattern.search(old) else \
            old.rstrip("\n") + "\n\n" + section
        path.write_text(new)


if __name__ == "__main__":
    main()
