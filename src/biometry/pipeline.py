"""Glue between a study, its prepared data and the training loop (what the notebooks call).

Where a study's data lives:

* phantom studies: ``<runs_root>/<study>/data/cohort`` (the synthetic release: ``nifti/``,
  ``fields.csv``, ``truth/``) and ``<runs_root>/<study>/data/prepared`` (the prepared store);
* real data: the study YAML names them, ``data: {fields_csv: ..., prepared: ...}``, or the user
  passes ``data_dir`` (a folder holding ``fields.csv`` and ``prepared/``).

The fold assignment is computed once per study into ``<runs_root>/<study>/splits.csv`` and only
read afterwards, so every field of a study shares it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class DataPaths:
    cohort: Path  # the release: fields.csv (+ nifti/, truth/ for a phantom)
    prepared: Path  # the prepared store
    splits: Path  # splits.csv of the study

    @property
    def fields_csv(self) -> Path:
        return self.cohort / "fields.csv"


def _study(study):
    from biometry.config import load_study

    return load_study(study) if isinstance(study, str | Path) else study


def data_paths(study, data_dir: str | Path | None = None,
               runs_root: str | Path | None = None) -> DataPaths:
    """Where the fields table, the prepared store and the splits of ``study`` live."""
    from biometry.paths import runs_dir

    study = _study(study)
    root = Path(runs_root) if runs_root else runs_dir()
    base = root / study.name
    data = dict(study.data or {})
    if data_dir:
        d = Path(data_dir)
        return DataPaths(d, d / "prepared", base / "splits.csv")
    if data.get("source", "phantom") == "phantom":
        return DataPaths(base / "data" / "cohort", base / "data" / "prepared", base / "splits.csv")
    try:
        return DataPaths(Path(data["fields_csv"]).parent, Path(data["prepared"]),
                         base / "splits.csv")
    except KeyError as exc:
        raise ValueError(f"study {study.name!r}: data needs 'fields_csv' and 'prepared' paths "
                         f"(missing {exc.args[0]!r})") from None


def load_targets(study, keys: list[str], data_dir=None, runs_root=None):
    """(store, eids, targets (N, T) in catalogue units with NaN where missing, splits)."""
    from biometry.results import references_from_fields_csv
    from biometry.splits import load_or_create_splits
    from biometry.store import Store

    study = _study(study)
    paths = data_paths(study, data_dir, runs_root)
    store = Store.open(paths.prepared)
    eids = [str(e) for e in store.eids]
    refs = references_from_fields_csv(paths.fields_csv, keys)
    refs.index = refs.index.astype(str)
    targets = refs.reindex(eids)[list(keys)].to_numpy(dtype=np.float64)
    splits = load_or_create_splits(paths.splits, eids, study.folds, study.split_seed)
    return store, eids, targets, splits


def check_training_inputs(study, data_dir=None, runs_root=None,
                          fields: list[str] | None = None) -> None:
    """Fail fast, with one line, before any training starts.

    Checks: the prepared store exists and holds the study's format; the fields table exists;
    each field has enough labelled subjects for the folds (the study's own checks).
    """
    from biometry.results import references_from_fields_csv
    from biometry.store import Store

    study = _study(study)
    paths = data_paths(study, data_dir, runs_root)
    if not paths.fields_csv.is_file():
        raise FileNotFoundError(f"no fields table at {paths.fields_csv}")
    try:
        store = Store.open(paths.prepared)
    except FileNotFoundError:
        raise FileNotFoundError(f"no prepared store at {paths.prepared}: run `biometry prepare` "
                                f"first") from None
    study.check_format(list(store.formats))
    keys = list(fields or study.fields)
    refs = references_from_fields_csv(paths.fields_csv, keys)
    refs.index = refs.index.astype(str)
    labelled = refs[refs.index.isin(set(map(str, store.eids)))].notna().sum()
    study.check_label_counts({k: int(labelled[k]) for k in keys}, keys=keys)


def train_fold(study, unit: str, fold: int, run_dir: str | Path, fields: list[str] | None = None,
               data_dir=None, runs_root=None, iterations: int | None = None,
               progress: bool = True):
    """Train the network ``unit`` (a field key, or a multi-field network) on all folds but ``fold``.

    Writes ``predictions.csv`` (out-of-fold, for the subjects of ``fold``) and ``metrics.json``
    into ``run_dir``; returns the training result.
    """
    from biometry.training import train

    study = _study(study)
    keys = [str(k) for k in (fields or ([unit] if not study.multi_field else study.fields))]
    store, eids, targets, splits = load_targets(study, keys, data_dir, runs_root)
    fold_of = splits.set_index("eid")["fold"].reindex(eids).to_numpy()
    labelled = ~np.isnan(targets).all(axis=1)
    train_idx = np.flatnonzero(labelled & (fold_of != fold))
    val_idx = np.flatnonzero(labelled & (fold_of == fold))
    config = study.training
    if iterations:
        config = replace(config, iterations=int(iterations))
    images = store.load(study.format)  # into memory: training indexes it at random
    return train(config, images, targets, train_idx, val_idx, Path(run_dir), eids=eids,
                 field_keys=keys, fold=fold, progress=progress)


def read_predictions(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "predictions.csv", dtype={"eid": str, "field": str})
