"""``biometry demo`` / ``make demo``: the whole pipeline on a phantom cohort, through the notebooks.

1. ``00_phantom_cohort``  synthesise a cohort that looks like a UKB release;
2. ``01_prepare``         fuse the stations and write the 2D formats into a prepared store;
3. ``biometry study run``  every stage of :data:`biometry.runs.pipeline.PIPELINE` in order
   (train, evaluate, saliency of the fields in demo.yaml's ``saliency:`` block, agreement,
   feature-space, figures), as for any other study.

Every stage is a run folder under ``papermill_runs/<study>/``; a finished stage is skipped when the
demo is started again (for the same inputs), so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from biometry import fileio
from biometry.config import fields
from biometry.config.population import options_of
from biometry.config.study import data_paths, default_runs_root, load_study
from biometry.runs.pipeline import StageError, run_study
from biometry.runs.runner import RunSpec, execute_run, run_dir_for


def _stage(spec: RunSpec, root: Path, force: bool = False) -> None:
    t0 = time.perf_counter()
    print(f"[demo] {spec.label} ...", flush=True)
    result = execute_run(spec, root, force=force)
    if result.status == "failed":
        raise RuntimeError(f"stage {spec.label} failed: {result.error}\n  see {result.notebook}")
    note = "already finished" if result.status == "skipped" else f"{time.perf_counter() - t0:.0f} s"
    print(f"[demo] {spec.label}: {note}", flush=True)


def run_demo(study_name: str = "demo", root: str | Path | None = None, workers: int = 1,
             force: bool = False, figures: bool = True) -> pd.DataFrame:
    """Run every stage of ``study_name`` on its phantom cohort; return the summary table."""
    study = load_study(study_name)
    root = Path(root) if root is not None else default_runs_root(study)
    paths = data_paths(study, runs_root=root)
    data = dict(study.data or {})
    if data.get("source", "phantom") != "phantom":
        raise ValueError(f"the demo runs on a phantom cohort; study {study.name!r} uses "
                         f"{data.get('source')!r} data")
    data_workers = max(1, min(os.cpu_count() or 1, 4))  # per-subject work scales with cores
    t_start = time.perf_counter()
    _stage(RunSpec(study.name, "phantom", {
        "out_dir": str(paths.cohort), "subjects": int(data.get("subjects", 300)),
        "seed": int(data.get("seed", 0)), "scale": float(data.get("scale", 0.5)),
        "workers": data_workers,  # the population's options only where the study sets them
        **{k: float(v) for k, v in options_of(data).items()}}), root, force)
    _stage(RunSpec(study.name, "prepare", {
        "input_dir": str(paths.cohort), "out_dir": str(paths.prepared),
        "formats": [study.format], "workers": data_workers}), root, force)

    print(f"[demo] {study.name}: {study.folds}-fold CV, then every stage (biometry study run)",
          flush=True)
    stages = None if figures else ["train", "evaluate"]
    # a changed demo.yaml retrains (the demo's runs are its own, nothing to protect)
    run_study(study, root, workers=workers, stages=stages, force=force, redo_changed=True,
              log=lambda line: print(f"[demo] {line}", flush=True))

    summary = summary_table(study, root)
    out = run_dir_for(RunSpec(study.name, "summary"), root)
    fileio.write_table(summary, out / "summary")
    minutes = (time.perf_counter() - t_start) / 60
    fileio.write_json(out / "timing.json", {"minutes": round(minutes, 2), "workers": workers})
    print(f"\n[demo] cross-validated results on the phantom ({study.folds}-fold, "
          f"{minutes:.1f} min in all):")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"[demo] stored in {out}")
    return summary


def summary_table(study, root: Path) -> pd.DataFrame:
    """One row per field from the evaluation runs: network and baseline metrics side by side."""
    rows = []
    for key in study.fields:
        path = run_dir_for(RunSpec(study.name, "evaluate", field=key), root) / "metrics.json"
        m = json.loads(path.read_text())
        f = fields.get(key)
        net, base = m["network"], m.get("baseline") or {}
        rows.append({"field": key, "name": f.name, "unit": f.unit, "n": net["n"],
                     "r2": net["r2"], "mae": net["mae"], "loa_low": net["loa_low"],
                     "loa_high": net["loa_high"], "baseline_r2": base.get("r2"),
                     "baseline_mae": base.get("mae"),
                     "beats_baseline": (base.get("mae") is not None and net["mae"] < base["mae"])})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="biometry demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="demo", help="a study preset with phantom data (default demo)")
    ap.add_argument("--runs-root", help="where run folders go (default papermill_runs/)")
    ap.add_argument("--workers", type=int, default=1,
                    help="parallel runs (default 1: on 2 cores one training uses both)")
    ap.add_argument("--force", action="store_true", help="re-run stages that finished before")
    ap.add_argument("--no-figures", action="store_true", help="skip the figure notebooks")
    a = ap.parse_args(argv)
    try:
        run_demo(a.study, a.runs_root, a.workers, a.force, figures=not a.no_figures)
    except (StageError, RuntimeError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"biometry demo: {exc}", file=sys.stderr)
        return 1
    return 0
