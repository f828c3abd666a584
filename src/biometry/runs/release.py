"""The ``release`` stage: a study's trained modules on a later release (notebook 09).

1. The release: for a phantom study, the phantom's next release (``release: {subjects, seed}``
   in the study; :func:`biometry.phantom.generate_cohort` with ``later_release_of`` the study's
   cohort, same scale, eids disjoint) in ``<runs_root>/<study>/data/release/``; for real data, the
   study's ``release: {input, fields_csv}``.
2. Each module of the study is exported as a bundle of all its fold networks
   (:func:`biometry.inference.export.export_module`) into ``<run_dir>/bundles/<module>/``.
3. The engine (:func:`biometry.inference.engine.infer`) prepares the release through its cache
   (``<runs_root>/<study>/data/release_cache/``, reused by a second run) and predicts; it keeps
   every member's predictions.
4. :func:`biometry.inference.release.compare_release` per module.

Files in the run folder: ``predictions.csv``/``.json``, ``failures.csv`` (the engine's),
``release_metrics.csv``/``.md`` (per field), ``release_members.csv`` (per field and member),
``release_long.csv`` (per subject and field, for the figures), ``metrics.json`` (counts, seconds,
the release's eids range and rule).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from biometry import fileio
from biometry.config.study import data_paths, resolve_study, study_path
from biometry.data.prepare import SourceChanged
from biometry.data.tables import references_from_fields_csv
from biometry.inference.bundle import load_bundle
from biometry.inference.engine import infer
from biometry.inference.export import export_module, oof_predictions, train_dir
from biometry.inference.release import compare_release
from biometry.phantom import generate_cohort


def release_input(study, runs_root=None, data_dir=None, workers: int = 1,
                  progress: bool = True) -> tuple[Path, Path]:
    """The release's input (folder or zips) and its fields table; a phantom study's next release
    is synthesised first (kept and reused when it is there already)."""
    study = resolve_study(study)
    block = dict(study.release or {})
    if not block:
        raise ValueError(f"{study.name}: the study has no `release:` block")
    if "input" in block:
        return study_path(study, block["input"]), study_path(study, block["fields_csv"])
    paths = data_paths(study, data_dir, runs_root)
    out = paths.prepared.parent / "release"
    scale = float((study.data or {}).get("scale", 1.0))
    generate_cohort(out, int(block["subjects"]), int(block["seed"]), scale=scale,
                    workers=workers, overwrite=True, progress=progress,
                    later_release_of=paths.cohort)
    return out, out / "fields.csv"


def run_release(study, run_dir: str | Path, runs_root=None, data_dir=None, workers: int = 2,
                min_references: int = 100, progress: bool = True) -> dict:
    """Run the stage (module docstring); returns the contents of ``metrics.json``."""
    study = resolve_study(study)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    source, fields_csv = release_input(study, runs_root, data_dir, workers, progress)
    t_synth = time.perf_counter() - t0
    bundles = []
    for unit in study.network_units():
        target = run_dir / "bundles" / unit
        shutil.rmtree(target, ignore_errors=True)  # re-exported from the current folds
        bundles.append(load_bundle(export_module(study, unit, target, runs_root=runs_root)))
    # the study's own cache (beside its splits, in its run folder), never one in a data folder
    # that other studies share: the stage may remove it (below)
    cache = Path(data_paths(study, data_dir, runs_root).splits).parent / "data" / "release_cache"
    try:
        result = infer(bundles, source, run_dir / "predictions.csv", cache=cache,
                       progress=progress, workers=workers, keep_members=True)
    except SourceChanged as exc:  # the stage's own cache, of earlier files of the release
        print(f"release cache made again: {exc}", file=sys.stderr)
        shutil.rmtree(cache)
        result = infer(bundles, source, run_dir / "predictions.csv", cache=cache,
                       progress=progress, workers=workers, keep_members=True)
    keys = [k for b in bundles for k in b.field_keys]
    refs = references_from_fields_csv(fields_csv, keys)
    tables, per_member, longs = [], [], []
    for unit, b in zip(study.network_units(), bundles, strict=True):
        mine = result.members[result.members["model"] == str(b.path)]
        oof = oof_predictions(train_dir(study, unit, runs_root))
        table, members, long = compare_release(mine, refs, b, min_references, oof=oof)
        tables.append(table.assign(module=b.name))
        per_member.append(members.assign(module=b.name))
        longs.append(long)
    table = pd.concat(tables, ignore_index=True)
    fileio.write_table(table, run_dir / "release_metrics")
    fileio.write_csv(run_dir / "release_members.csv", pd.concat(per_member, ignore_index=True))
    fileio.write_csv(run_dir / "release_long.csv", pd.concat(longs, ignore_index=True))
    judged = table[table["judged"]]
    metrics = {
        "release": str(source), "fields_csv": str(fields_csv), "n_subjects": result.n_input,
        "n_predicted": len(result.predictions), "n_failed": len(result.failures),
        "rule": sorted({b.ensemble_rule for b in bundles}), "members": [len(b.members)
                                                                        for b in bundles],
        "seconds": {"release_synthesis": round(t_synth, 1),
                    "preparation": round(result.prepare_seconds, 1),
                    "networks": round(result.network_seconds, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "judged_fields": judged["field"].tolist(),
        "coverage_ok": judged.loc[judged["coverage_ok"], "field"].tolist(),
        "members_within_cv": judged.loc[judged["r2_within_cv"] & judged["mae_within_cv"],
                                        "field"].tolist(),
        "consistent_with_cv": judged.loc[judged["r2_consistent"] & judged["mae_consistent"],
                                         "field"].tolist(),
    }
    fileio.write_json(run_dir / "metrics.json", metrics)
    return metrics
