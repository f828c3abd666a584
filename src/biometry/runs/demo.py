"""``biometry demo`` / ``make demo``: the whole pipeline on a phantom cohort, through the notebooks.

1. ``00_phantom_cohort``  synthesise a cohort that looks like a UKB release;
2. ``01_prepare``         fuse the stations and write the 2D formats into a prepared store;
3. ``biometry study run``  every stage of :data:`biometry.runs.pipeline.PIPELINE` in order
   (train, evaluate, saliency of the fields in demo.yaml's ``saliency:`` block, agreement,
   feature-space, figures), as for any other study.

Every stage is a run folder under ``papermill_runs/<study>/``; a finished stage is skipped when the
demo is started again for the same inputs, so an interrupted demo resumes where it stopped. The
phantom and prepare stages record their inputs like every later stage: an edited ``data:`` block
(subjects, seed, scale, a population option) or an edited generator makes the cohort again, and a
changed cohort the prepared store, from scratch; the trainings then see new data and run again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from biometry import fileio
from biometry.config import fields
from biometry.config.population import options_of, population
from biometry.config.study import data_paths, default_runs_root, load_study
from biometry.parallel import available_cores
from biometry.phantom.cohort import PHANTOM_VERSION
from biometry.phantom.writer import code_fingerprint
from biometry.runs.pipeline import StageError, resolve_workers, run_study
from biometry.runs.runner import (
    RunSpec,
    attempted_identity,
    changed_inputs,
    execute_run,
    file_hash,
    is_finished,
    run_dir_for,
)


def _stage(spec: RunSpec, root: Path, force: bool = False) -> None:
    t0 = time.perf_counter()
    run_dir = run_dir_for(spec, root)
    if (run_dir / "done.json").is_file() and not is_finished(run_dir, spec.identity):
        changes = changed_inputs(run_dir, spec.identity)
        print(f"[demo] {spec.label}: inputs changed ({'; '.join(changes[:3])}), run again",
              flush=True)
    print(f"[demo] {spec.label} ...", flush=True)
    result = execute_run(spec, root, force=force)
    if result.status == "failed":
        raise RuntimeError(f"stage {spec.label} failed: {result.error}\n  see {result.notebook}")
    note = "already finished" if result.status == "skipped" else f"{time.perf_counter() - t0:.0f} s"
    print(f"[demo] {spec.label}: {note}", flush=True)


def run_demo(study_name: str = "demo", root: str | Path | None = None, workers: int | None = None,
             force: bool = False, figures: bool = True,
             figures_root: str | Path | None = None) -> pd.DataFrame:
    """Run every stage of ``study_name`` on its phantom cohort; return the summary table.
    ``figures_root``: where the figures go (default: the study's, ``figures/`` of the checkout
    for a preset)."""
    study = load_study(study_name)
    root = Path(root) if root is not None else default_runs_root(study)
    data = dict(study.data or {})
    if data.get("source", "phantom") != "phantom":
        raise ValueError(f"the demo runs on a phantom cohort; study {study.name!r} uses "
                         f"{data.get('source')!r} data")
    t_start = time.perf_counter()
    workers = resolve_workers(study, workers)
    make_data(study, root, force)

    print(f"[demo] {study.name}: {study.folds}-fold CV, then every stage (biometry study run)",
          flush=True)
    stages = None if figures else ["train", "evaluate"]
    # a changed demo.yaml retrains (the demo's runs are its own, nothing to protect)
    run_study(study, root, workers=workers, stages=stages, force=force, redo_changed=True,
              figures_root=figures_root, log=lambda line: print(f"[demo] {line}", flush=True))

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


def phantom_identity(data: dict) -> dict:
    """What defines the demo's cohort: its size, seed and scale, every population option
    (defaults resolved) and the generator's version and code."""
    return {"subjects": int(data.get("subjects", 300)), "seed": int(data.get("seed", 0)),
            "scale": float(data.get("scale", 0.5)), "population": population(options_of(data)),
            "phantom_version": PHANTOM_VERSION, "phantom_code": code_fingerprint()}


def prepare_identity(study, cohort: Path) -> dict:
    """What defines the prepared store: the format and the cohort it was made from (the hashes
    of its ``cohort.json`` and ``fields.csv``)."""
    return {"formats": [study.format], "cohort_json": file_hash(cohort / "cohort.json"),
            "fields_csv": file_hash(cohort / "fields.csv")}


def make_data(study, root: Path, force: bool = False) -> None:
    """The demo's phantom and prepare stages (notebooks 00 and 01), each redone when its inputs
    changed. A prepared store whose cohort changed is removed first, with the study's
    ``splits.csv``: a store resumes by subject id and refuses a subject whose files changed, and
    the splits list the old cohort's subjects. Only a phantom study's own data (under
    ``root/<study>/``) is ever removed."""
    data = dict(study.data or {})
    if data.get("source", "phantom") != "phantom":
        raise ValueError(f"the demo makes a phantom cohort; study {study.name!r} uses "
                         f"{data.get('source')!r} data")
    paths = data_paths(study, runs_root=root)
    own = (Path(root) / study.name).resolve()
    for path in (paths.cohort, paths.prepared, paths.splits):
        if not Path(path).resolve().is_relative_to(own):
            raise ValueError(f"{path}: the demo's data must lie in its run folder {own}")
    workers = min(available_cores(), 4)  # per-subject work scales with cores
    ident = phantom_identity(data)
    _stage(RunSpec(study.name, "phantom", {
        "out_dir": str(paths.cohort), "subjects": ident["subjects"], "seed": ident["seed"],
        "scale": ident["scale"], "workers": workers,  # the options only where the study sets them
        **{k: float(v) for k, v in options_of(data).items()}}, identity=ident), root, force)
    spec = RunSpec(study.name, "prepare", {
        "input_dir": str(paths.cohort), "out_dir": str(paths.prepared),
        "formats": [study.format], "workers": workers},
        identity=prepare_identity(study, Path(paths.cohort)))
    store, splits = Path(paths.prepared), Path(paths.splits)
    derived = [p for p in (store, splits, splits.with_suffix(".json")) if p.exists()]
    if derived and (force or attempted_identity(run_dir_for(spec, root)) != spec.identity):
        print(f"[demo] {spec.label}: {store} and the splits were made from another cohort (or "
              f"by an older version); made again", flush=True)
        for path in derived:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    _stage(spec, root, force)


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
    ap.add_argument("--figures-root",
                    help="where figures and tables go (default figures/, also with --runs-root)")
    ap.add_argument("--workers", type=int,
                    help="runs at a time (default: the study's dispatch.workers, at most the "
                         "cores; the demo's 2: trainings and later stages two at a time)")
    ap.add_argument("--force", action="store_true",
                    help="re-run stages that finished before (the prepared store and the splits "
                         "made again from the cohort)")
    ap.add_argument("--no-figures", action="store_true", help="skip the figure notebooks")
    a = ap.parse_args(argv)
    try:
        run_demo(a.study, a.runs_root, a.workers, a.force, figures=not a.no_figures,
                 figures_root=a.figures_root)
    except (StageError, RuntimeError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"biometry demo: {exc}", file=sys.stderr)
        return 1
    return 0
