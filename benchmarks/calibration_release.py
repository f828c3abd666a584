"""The coverage measurement of BENCHMARKS.md ("Mean-variance demo, calibration and a later
release"): the demo study's mean-variance folds -> calibration -> bundles (the fold ensemble and
fold 0 alone) -> the engine on a later-release phantom -> metrics and 95 % coverage per field.

Expects, under ``--root`` (default /tmp/mimir_measure): ``runs/demo/train/all/fold_<k>/`` (trained
with ``biometry.learn.cv.train_fold`` on the demo's phantom, ``runs_root=<root>/runs``) and
``release2/`` (``biometry synth --out <root>/release2 --subjects 400 --seed 0 --scale 0.35
--later-release-of <root>/runs/demo/data/cohort``). Usage: ``python benchmarks/calibration_release.py --train-folds 0 1 2 --release-subjects 400`` makes
all of it (about an hour of a shared 2-core CPU); without the options it reuses what is there.
"""
import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from biometry.config.study import data_paths, load_study
from biometry.data.prepare import prepare
from biometry.inference.bundle import load_bundle
from biometry.inference.engine import infer
from biometry.inference.export import calibrate_module, export_module
from biometry.inference.release import compare_release
from biometry.learn.cv import train_fold
from biometry.phantom import generate_cohort

torch.set_num_threads(1)
pd.set_option("display.width", 250)
pd.set_option("display.max_columns", 30)
ap = argparse.ArgumentParser(description="coverage of the demo's intervals on a later release")
ap.add_argument("--root", default="/tmp/mimir_measure")
ap.add_argument("--train-folds", type=int, nargs="*", default=[],
                help="first make the demo phantom, prepare it and train these folds (e.g. 0 1)")
ap.add_argument("--release-subjects", type=int, default=0,
                help="first write the later release with this many subjects")
args = ap.parse_args()
root = Path(args.root)
train = root / "runs/demo/train/all"
study = load_study("demo")
t0 = time.time()
if args.train_folds:
    paths = data_paths(study, runs_root=root / "runs")
    d = study.data
    generate_cohort(paths.cohort, int(d["subjects"]), int(d["seed"]), scale=float(d["scale"]),
                    overwrite=True, progress=False)
    prepare(paths.cohort, paths.prepared, formats=[study.format], progress=False)
    for k in args.train_folds:
        r = train_fold(study, "all", k, train / f"fold_{k}", runs_root=root / "runs",
                       progress=False)
        print("fold", k, time.time() - t0, r.metrics["per_field"], flush=True)
if args.release_subjects:
    generate_cohort(root / "release2", args.release_subjects, int(study.data["seed"]),
                    scale=float(study.data["scale"]), overwrite=True, progress=False,
                    later_release_of=data_paths(study, runs_root=root / "runs").cohort)
print("calibration factors (OOF):", calibrate_module(train, root / "calib"), flush=True)
print(pd.read_csv(root / "calib/calibration.csv", dtype={"field": str}).to_string(), flush=True)
for name, fold in (("ens", None), ("fold0", 0)):
    out = root / f"bundle_{name}"
    if not out.exists():
        export_module(study, "all", out, folder=train, fold=fold)
    b = load_bundle(out)
    res = infer([b], root / "release2", root / f"pred_{name}/predictions.csv", cache=root / "cache", progress=False)
    print(name, res.summary(), flush=True)
    table, long = compare_release(res.predictions, root / "release2/fields.csv", b, min_references=100)
    print(name, "\n", table.to_string(), flush=True)
    table.to_csv(root / f"release_{name}.csv", index=False)
print("total", time.time() - t0)
