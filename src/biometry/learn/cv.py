"""Cross-validation glue between a study, its prepared data and the training loop (what the
training notebook calls): the targets of a study's fields, the checks before training, one fold.

Where a study's data lives is :func:`biometry.config.study.data_paths`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biometry import fileio
from biometry.config.study import data_paths, resolve_study, with_iterations
from biometry.data.store import Store
from biometry.data.tables import references_from_fields_csv
from biometry.learn.bundle import load_model, predict
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
        config = with_iterations(config, int(iterations))  # lr_steps scale with it
    images = store.load(study.format)  # into memory: training indexes it at random
    return train(config, images, targets, train_idx, val_idx, Path(run_dir), eids=eids,
                 field_keys=keys, fold=fold, progress=progress, input_grid_mm=store.grid_mm)


def train_final(study, unit: str, run_dir: str | Path, fields: list[str] | None = None,
                data_dir=None, runs_root=None, iterations: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Train ``unit`` on every labelled subject, then predict every subject without a label.

    The liver study's dataset B. The network is trained with no held-out subjects (``model.pt``
    in ``run_dir``); ``predictions_unlabelled.csv`` there holds ``eid, fold (-1), field,
    reference (NaN), prediction, variance`` for the subjects with no reference, and is returned.
    """
    study = resolve_study(study)
    keys = [str(k) for k in (fields or ([unit] if not study.multi_field else study.fields))]
    store, eids, targets, _ = load_targets(study, keys, data_dir, runs_root)
    labelled = ~np.isnan(targets).all(axis=1)
    config = study.training
    if iterations:
        config = with_iterations(config, int(iterations))  # lr_steps scale with it
    images = store.load(study.format)
    run_dir = Path(run_dir)
    train(config, images, targets, np.flatnonzero(labelled), np.zeros(0, np.int64), run_dir,
          eids=eids, field_keys=keys, fold=-1, progress=progress, input_grid_mm=store.grid_mm)
    rows = np.flatnonzero(~labelled)
    pred = predict(load_model(run_dir), images[rows], device=config.device)
    if pred.ndim == 3:  # mean_variance: (N, T, 2)
        mean, var = pred[..., 0], pred[..., 1]
    else:
        mean, var = pred, np.full_like(pred, np.nan)
    table = pd.concat([pd.DataFrame({
        "eid": [eids[i] for i in rows], "fold": -1, "field": key, "reference": np.nan,
        "prediction": mean[:, j], "variance": var[:, j]}) for j, key in enumerate(keys)],
        ignore_index=True)
    fileio.write_csv(run_dir / "predictions_unlabelled.csv", table, index=False)
    return table


def read_predictions(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "predictions.csv", dtype={"eid": str, "field": str})
