"""Cross-validation glue between a study, its prepared data and the training loop (what the
training notebook calls): the targets of a study's fields, the checks before training, one fold.

Where a study's data lives is :func:`biometry.config.study.data_paths`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from biometry.config.study import data_paths, resolve_study
from biometry.data.store import Store
from biometry.data.tables import references_from_fields_csv
from biometry.learn.splits import fold_indices, load_or_create_splits
from biometry.learn.trainer import train


def load_targets(study, keys: list[str], data_dir=None, runs_root=None):
    """(store, eids, targets (N, T) in catalogue units with NaN where missing, splits)."""
    study = resolve_study(study)
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
    study = resolve_study(study)
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
    study = resolve_study(study)
    default = study.fields if not study.modules else study.modules.get(unit, study.fields)
    keys = [str(k) for k in (fields or ([unit] if not study.multi_field else default))]
    store, eids, targets, splits = load_targets(study, keys, data_dir, runs_root)
    labelled = ~np.isnan(targets).all(axis=1)
    train_idx, val_idx = fold_indices(splits, eids, fold)
    train_idx, val_idx = train_idx[labelled[train_idx]], val_idx[labelled[val_idx]]
    config = study.training
    if iterations:
        config = replace(config, iterations=int(iterations))
    images = store.load(study.format)  # into memory: training indexes it at random
    return train(config, images, targets, train_idx, val_idx, Path(run_dir), eids=eids,
                 field_keys=keys, fold=fold, progress=progress)


def read_predictions(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "predictions.csv", dtype={"eid": str, "field": str})
