"""The thigh-function study (``notebooks/10_thigh_function.ipynb``, ``biometry thigh``):
high/low muscle function from axial mid-thigh slices with a frozen backbone (docs/thigh.md).

The notebook calls, in order:

1. :func:`load_data`: the study's slice stacks, measures, sex and split (a phantom study makes its
   main and external phantom cohorts and prepares their ``thigh`` slices first, resumably);
2. :func:`fit_fold` for each of the study's ``train_folds``: the backbone (pretrained on the
   phantom's regression fields on the fold's training subjects, or the study's weights file),
   then every last layer (:func:`biometry.learn.transfer.fit_fold`);
3. :func:`external_predictions`: the best whole-cohort network on the external cohort;
4. :func:`write_outputs`: ``predictions.csv``, ``thigh_function.csv``/``.md`` (the table of
   ``make figures``) and ``metrics.json`` into the run folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from biometry import fileio
from biometry.analysis import thigh as evaluation
from biometry.config.population import options_of
from biometry.config.study import Study, data_paths, load_study, resolve_study
from biometry.data.prepare import prepare
from biometry.data.store import Store
from biometry.data.tables import references_from_fields_csv
from biometry.learn import transfer
from biometry.learn.cv import load_targets
from biometry.learn.models import save_torch
from biometry.learn.splits import fold_indices
from biometry.phantom import generate_cohort
from biometry.runs.runner import RunSpec, execute_run

STAGE = "thigh"


@dataclass
class ThighData:
    """Everything the study trains and evaluates on (rows = subjects of the prepared store)."""

    eids: list[str]
    images: np.ndarray            # uint8 (N, S, H, W)
    measures: dict[str, np.ndarray]  # measure key -> (N,) values, NaN = missing
    sex: np.ndarray               # (N,) 1 = male, 0 = female, NaN = unknown
    pretrain_targets: np.ndarray  # (N, T) the regression fields of thigh.pretrain_fields
    splits: pd.DataFrame
    external: dict | None = None  # eids, images, labels, sex of the external cohort


def _phantom_cohort(root: Path, prepared: Path, subjects: int, seed: int, scale: float,
                    external: bool, workers: int, progress: bool, **population: float) -> None:
    done = Store.open(prepared).eids if (prepared / "store.json").is_file() else []
    if len(done) < subjects:
        generate_cohort(root, subjects, seed, scale=scale, workers=workers, overwrite=True,
                        progress=progress, external=external, **population)
        prepare(root, prepared, formats=["thigh"], workers=workers, progress=progress)


def load_data(study: str | Path | Study, runs_root=None, data_dir=None, workers: int = 1,
              progress: bool = False) -> ThighData:
    """The study's data; a phantom study's cohorts are synthesised and prepared when missing."""
    study = resolve_study(study)
    if study.format != "thigh" or not study.thigh:
        raise ValueError(f"study {study.name!r} is not a thigh-function study (format thigh and a "
                         f"thigh: block)")
    paths = data_paths(study, data_dir, runs_root)
    settings = study.thigh
    ext_cfg = settings["external"]
    ext_paths = None
    if study.data.get("source") == "phantom" and data_dir is None:
        d = study.data
        _phantom_cohort(paths.cohort, paths.prepared, int(d["subjects"]), int(d["seed"]),
                        float(d["scale"]), False, workers, progress,
                        **options_of(d))
        if ext_cfg:
            base = paths.cohort.parent
            ext_paths = (base / "external" / "cohort", base / "external" / "prepared")
            _phantom_cohort(*ext_paths, int(ext_cfg["subjects"]), int(ext_cfg["seed"]),
                            float(d["scale"]), True, workers, progress)
            ext_paths = (ext_paths[0] / "fields.csv", ext_paths[1])
    elif ext_cfg and "fields_csv" in ext_cfg:  # (a phantom's {subjects, seed} needs no data_dir)
        ext_paths = (Path(ext_cfg["fields_csv"]), Path(ext_cfg["prepared"]))
    keys = list(study.fields) + [k for k in settings["pretrain_fields"] if k not in study.fields]
    store, eids, targets, splits = load_targets(study, keys, data_dir, runs_root)
    sex = _sex(paths.fields_csv, eids)
    pre = [keys.index(k) for k in settings["pretrain_fields"]]
    data = ThighData(eids=eids, images=store.load("thigh"),
                     measures={k: targets[:, j] for j, k in enumerate(study.fields)},
                     sex=sex, pretrain_targets=targets[:, pre], splits=splits)
    if ext_paths is not None:
        ext_store = Store.open(ext_paths[1])
        ext_eids = [str(e) for e in ext_store.eids]
        label = settings["external_label"]
        refs = references_from_fields_csv(ext_paths[0], [label])
        refs.index = refs.index.astype(str)
        data.external = {"eids": ext_eids, "images": ext_store.load("thigh"),
                         "labels": refs.reindex(ext_eids)[label].to_numpy(dtype=np.float64),
                         "sex": _sex(ext_paths[0], ext_eids), "label": label}
    return data


def _sex(fields_csv: Path, eids: list[str]) -> np.ndarray:
    refs = references_from_fields_csv(fields_csv, ["31"])
    refs.index = refs.index.astype(str)
    return refs.reindex(eids)["31"].to_numpy(dtype=np.float64)


def backbone_weights(study: Study, data: ThighData, train_idx: np.ndarray, run_dir: Path,
                     fold: int) -> str | None:
    """The frozen backbone's weights for a fold: the study's file, or one pretrained here on the
    phantom's regression fields of the fold's training subjects (saved in the run folder)."""
    s = study.thigh
    if s["backbone"] == "weights":
        return study.training.weights
    path = Path(run_dir) / f"backbone_fold_{fold}.pt"
    if not path.is_file():
        state = transfer.pretrain_backbone(
            data.images, data.pretrain_targets, train_idx, arch=study.training.arch,
            input_size=study.training.input_size, iterations=int(s["pretrain_iterations"]),
            batch_size=int(s["pretrain_batch_size"]), slices_per_subject=int(s["pretrain_slices"]),
            lr=float(s["pretrain_lr"]), seed=study.training.seed + fold)
        save_torch(path, state)
    return str(path)


def fit_fold(study: Study, data: ThighData, fold: int, run_dir: str | Path
             ) -> transfer.FoldResult:
    """Every network of one fold (see the module docstring)."""
    train_idx, test_idx = fold_indices(data.splits, data.eids, fold)
    weights = backbone_weights(study, data, train_idx, Path(run_dir), fold)
    backbones = {"pretrained": weights}
    if study.thigh["random_control"]:
        backbones["random"] = None
    groups = ("all", "male", "female") if study.thigh["sex_stratified"] else ("all",)
    return transfer.fit_fold(data.images, data.measures, data.sex, data.eids, train_idx, test_idx,
                             backbones, study.training, fold=fold, groups=groups)


def external_predictions(data: ThighData, result: transfer.FoldResult, measure: str,
                         fold: int = 0) -> pd.DataFrame:
    """The whole-cohort pretrained network of ``measure`` applied to the external cohort."""
    if data.external is None:
        return pd.DataFrame(columns=list(evaluation.PREDICTION_COLUMNS))
    ext = data.external
    return transfer.predict_external(result.models["pretrained"],
                                     result.heads[(measure, "all", "pretrained")], ext["images"],
                                     ext["labels"], ext["eids"], ext["sex"], measure=measure,
                                     backbone="pretrained", fold=fold)


def write_outputs(run_dir: str | Path, study: Study, predictions: pd.DataFrame,
                  results: list[transfer.FoldResult], external_label: str | None) -> dict:
    """``predictions.csv``, the table ``thigh_function`` (.csv/.md) and ``metrics.json``."""
    run_dir = Path(run_dir)
    table = evaluation.classification_table(predictions)
    metrics = evaluation.study_metrics(table, list(study.fields))
    metrics["study"] = study.name
    metrics["folds"] = list(study.train_folds)
    metrics["backbone"] = study.thigh["backbone"]
    metrics["thresholds"] = {f"fold_{k}": r.thresholds for k, r in zip(study.train_folds, results,
                                                                         strict=True)}
    if metrics["external"] is not None:
        metrics["external"]["label"] = external_label
    metrics["sex_breakdown"] = evaluation.sex_breakdown(predictions).to_dict(orient="records")
    fileio.write_csv(run_dir / "predictions.csv", predictions)
    fileio.write_table(table.round(4), run_dir / "thigh_function")
    fileio.write_json(run_dir / "metrics.json", metrics)
    return metrics


def run_spec(study: str, runs_root=None) -> RunSpec:
    name = load_study(study).name
    return RunSpec(name, STAGE, {"study": str(study),
                                 "runs_root": str(runs_root) if runs_root else None})


def main(argv: list[str] | None = None) -> int:
    """``biometry thigh``: run the thigh-function study in its run folder."""
    ap = argparse.ArgumentParser(prog="biometry thigh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="thigh-demo", help="a thigh study (default thigh-demo)")
    ap.add_argument("--runs-root", help="root of run folders (default papermill_runs/)")
    ap.add_argument("--force", action="store_true", help="re-run a finished study")
    a = ap.parse_args(argv)
    try:
        result = execute_run(run_spec(a.study, a.runs_root), a.runs_root, force=a.force)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"biometry thigh: error: {exc}", file=sys.stderr)
        return 2
    if result.status == "failed":
        print(f"biometry thigh: failed: {result.error}\n  see {result.notebook}", file=sys.stderr)
        return 1
    print(f"thigh study {result.status}: {result.run_dir}")
    return 0
