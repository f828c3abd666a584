"""Per-field and per-study evaluation of cross-validated predictions (what notebooks 03-05 call).

Reads the training runs' ``predictions.csv`` files and the study's fields table, and writes plain
files: ``metrics.json`` (network and linear baseline), ``outliers.csv``, tables and figures.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

from biometry import fileio
from biometry.analysis.agreement import (
    bilateral_symmetry,
    loa_ratio,
    method_comparison,
    outliers,
)
from biometry.analysis.embedding import FIG2_FIELDS, feature_space
from biometry.analysis.results import (
    THRESHOLDS,
    field_metrics,
    fitted_metrics,
    load_predictions,
    thresholded_metrics,
)
from biometry.analysis.stats import BASELINE_COVARIATES, classification_run, linear_baseline
from biometry.config import fields
from biometry.config.study import data_paths, default_runs_root, resolve_study
from biometry.data.tables import covariates_from_fields_csv, references_from_fields_csv

__all__ = ["THRESHOLDS"]  # re-exported: the thresholds live in analysis.results
#: a target that is itself a covariate is predicted from the other three
_COVARIATE_OF = {"age": "age", "31": "sex", "12144": "height", "21002": "weight"}


def study_dir(study, runs_root: str | Path | None = None) -> Path:
    """``<runs_root>/<study name>`` for a preset name, a YAML path or a Study."""
    study = resolve_study(study)
    return (Path(runs_root) if runs_root else default_runs_root(study)) / study.name


def training_run_dirs(study, runs_root=None) -> list[Path]:
    """The training run folders of the current study definition:
    ``<study_dir>/train/<module, network or field>/fold_<k>`` for its networks and
    ``train_folds``."""
    study = resolve_study(study)
    base = study_dir(study, runs_root) / "train"
    return [base / u / f"fold_{k}" for u in study.network_units() for k in study.train_folds]


def study_predictions(study, runs_root=None) -> pd.DataFrame:
    """The out-of-fold predictions of the study's current training runs (long format).

    Reads only the runs of the current definition (not a dropped field's or an old layout's),
    and only the study's fields. Raises ``FileNotFoundError`` naming the runs that are not
    finished: a missing fold would silently shrink N.
    """
    study = resolve_study(study)
    runs = training_run_dirs(study, runs_root)
    missing = [r for r in runs if not (r / "done.json").is_file()
               or not (r / "predictions.csv").is_file()]
    if missing:
        root = study_dir(study, runs_root)
        names = ", ".join(str(r.relative_to(root)) for r in missing[:6])
        raise FileNotFoundError(f"study {study.name!r}: {len(missing)} of {len(runs)} training "
                                f"run(s) not finished ({names}{' ...' if len(missing) > 6 else ''} "
                                f"under {root}); run `biometry run train --study {study.path}`")
    pred = load_predictions(study_dir(study, runs_root), [r / "predictions.csv" for r in runs])
    return pred[pred["field"].isin(study.fields)].reset_index(drop=True)


def baseline_predictions(study, key: str, runs_root=None, data_dir=None) -> pd.Series:
    """Out-of-fold predictions of the linear baseline on age, sex, height and weight.

    Fitted in the same folds as the network (the study's ``splits.csv``); indexed by eid.
    """
    study = resolve_study(study)
    paths = data_paths(study, data_dir, runs_root)
    cov = covariates_from_fields_csv(paths.fields_csv)
    target = references_from_fields_csv(paths.fields_csv, [key])[key]
    splits = pd.read_csv(paths.splits, dtype={"eid": str}).set_index("eid")["fold"]
    cov.index = cov.index.astype(str)
    target.index = target.index.astype(str)
    common = cov.index.intersection(splits.index)
    columns = [c for c in BASELINE_COVARIATES if c != _COVARIATE_OF.get(key)]
    covariates = cov.loc[common, columns]
    return linear_baseline(covariates, target.reindex(common), splits.loc[common])


def evaluate_field(study, key: str, out_dir: str | Path, runs_root=None, data_dir=None,
                   predictions: pd.DataFrame | None = None) -> dict:
    """Metrics of the network and of the baseline for one field; writes ``metrics.json``."""
    study = resolve_study(study)
    out_dir = Path(out_dir)
    pred = predictions if predictions is not None else study_predictions(study, runs_root)
    pred = pred[pred["field"].astype(str) == str(key)].dropna(subset=["reference", "prediction"])
    if pred.empty:
        raise ValueError(f"field {key}: no predictions in the runs of study {study.name!r}")
    result: dict = {"field": str(key), "name": fields.get(key).name, "unit": fields.get(key).unit,
                    "head": study.training.head}
    if study.training.head == "classification":
        # a classification network: accuracy, balanced accuracy, AUC, class counts, never R²
        result["network"] = classification_run(pred["reference"], pred["prediction"])
        fileio.write_json(out_dir / "metrics.json", result)
        fileio.write_csv(out_dir / "outliers.csv", outliers(pred, str(key), n=10))
        return result
    result["network"] = fitted_metrics(key, pred["reference"], pred["prediction"])
    try:
        base = baseline_predictions(study, key, runs_root, data_dir).dropna()
        ref = pred.set_index("eid")["reference"]
        common = ref.index.intersection(base.index)
        result["baseline"] = fitted_metrics(key, ref.loc[common], base.loc[common])
    except (FileNotFoundError, ValueError, KeyError) as exc:
        result["baseline"] = None
        result["baseline_error"] = str(exc)
    if str(key) in THRESHOLDS:
        result["classification"] = {"label": THRESHOLDS[str(key)][1],
                                    **thresholded_metrics(key, pred["reference"],
                                                          pred["prediction"])}
    fileio.write_json(out_dir / "metrics.json", result)
    fileio.write_csv(out_dir / "outliers.csv", outliers(pred, str(key), n=10))
    return result


def study_references(study, runs_root=None, data_dir=None, keys=None) -> pd.DataFrame:
    """Reference values of every catalogue field present in the study's fields table."""
    study = resolve_study(study)
    path = data_paths(study, data_dir, runs_root).fields_csv
    if keys is None:
        header = pd.read_csv(path, nrows=0).columns
        present = {fields.parse_column(c)[0] for c in header if fields.parse_column(c)}
        cat = fields.catalogue()
        keys = [k for k in cat.index if cat.loc[k, "field_id"] in present
                and cat.loc[k, "group"] not in ("auxiliary",)]
        if {"34", "52", "53"} <= present:
            keys.append("age")
    refs = references_from_fields_csv(path, list(keys))
    refs.index = refs.index.astype(str)
    return refs


def agreement_tables(study, out_dir: str | Path, runs_root=None, data_dir=None) -> dict:
    """The paper's tables across fields, written as CSV and Markdown into ``out_dir``.

    * ``table1_field_metrics``: per field R², MAE, MAPE (where meaningful), LoA, ICC, r, n and the
      linear baseline's R² and MAE beside them; thresholded fields also AUC, accuracy,
      sensitivity, specificity (Table 1 / Supp. Table 1); a classification study its own
      columns (:func:`biometry.analysis.results.field_metrics`);
    * ``table2_method_comparison``: DXA vs MRI atlas (and the two liver-fat methods), each fitted
      to the other by linear regression in both directions, with the LoA of the fit;
    * ``table2b_loa_ratio``: that LoA width over the network's LoA width per field;
    * ``stable5_bilateral_symmetry``: left-right reference r beside each side's network r.
    """
    study = resolve_study(study)
    out_dir = Path(out_dir)
    preds = study_predictions(study, runs_root)
    refs = study_references(study, runs_root, data_dir)
    head = study.training.head
    baselines = {}
    if head != "classification":
        for key in sorted(set(preds["field"])):
            try:
                baselines[key] = baseline_predictions(study, key, runs_root, data_dir)
            except (FileNotFoundError, ValueError, KeyError):
                continue  # no covariates for this field: Table 1 leaves its baseline empty
    tables = {"table1_field_metrics": field_metrics(preds, head=head, baselines=baselines)}
    mc = method_comparison(refs)
    tables["table2_method_comparison"] = mc
    table1 = tables["table1_field_metrics"]
    if head == "classification":  # no limits of agreement for a classifier's probabilities
        table1 = pd.DataFrame(columns=["field", "loa_low", "loa_high"])
    tables["table2b_loa_ratio"] = loa_ratio(mc, table1)
    tables["stable5_bilateral_symmetry"] = bilateral_symmetry(refs, preds)
    for name, table in tables.items():
        fileio.write_table(table, out_dir / name)
    main = "r2" if head != "classification" else "balanced_accuracy"
    summary = {f"median_{main}": float(tables["table1_field_metrics"][main].median()),
               "n_fields": int(len(tables["table1_field_metrics"])),
               "mean_loa_ratio": tables["table2b_loa_ratio"].attrs.get("mean_ratio")}
    fileio.write_json(out_dir / "metrics.json", summary)
    return tables


def feature_space_tables(study, out_dir: str | Path, highlight: list[str] | None = None,
                         runs_root=None, data_dir=None, seed: int = 0,
                         max_subjects: int | None = 5000,
                         min_share: float = 0.5) -> dict[str, pd.DataFrame]:
    """UMAP of the cohort's reference fields (Fig. 2), one embedding per highlighted field.

    The feature space is spanned by every catalogue field of the study's fields table (not only
    the fields the study trains on) that at least ``min_share`` of the subjects have, diseases
    left out; each highlighted field (default :data:`FIG2_FIELDS`: sex, BMI, height, body-fat
    percentage; those present in the table) is removed from the features of its own embedding;
    one that too few subjects have for UMAP's neighbourhood is left out with a warning.
    At most ``max_subjects`` subjects, the first by eid, so the result is deterministic. Writes
    ``umap_<field>.csv`` and ``umap_fields.json`` (per field: N and the features) into
    ``out_dir``; :func:`read_feature_space` reads them back.
    """
    study = resolve_study(study)
    refs = study_references(study, runs_root, data_dir).sort_index()
    if max_subjects:
        refs = refs.head(max_subjects)
    share = refs.notna().mean()
    keys = [k for k in refs.columns
            if share[k] >= min_share and fields.get(k).group != "disease"]
    highlight = [str(h) for h in (highlight or [h for h in FIG2_FIELDS if h in refs.columns])]
    n_neighbors = int(min(15, max(2, len(refs[keys].dropna()) // 4)))
    # a colour field that too few subjects have (DXA in a small cohort) is left out, said aloud
    panel_n = {h: len(refs[[k for k in keys if k != h] + [h]].dropna()) for h in highlight}
    for h in [h for h in highlight if panel_n[h] <= n_neighbors]:
        warnings.warn(f"feature space of study {study.name!r}: {h} left out, only "
                      f"{panel_n[h]} subjects have it and every feature", stacklevel=2)
    highlight = [h for h in highlight if panel_n[h] > n_neighbors]
    if not highlight:
        raise ValueError(f"feature space of study {study.name!r}: too few subjects with every "
                         f"feature ({len(refs[keys].dropna())}) for a UMAP")
    emb = feature_space(refs, keys, highlight, seed=seed, n_neighbors=n_neighbors)
    out_dir = Path(out_dir)
    for key, frame in emb.items():
        fileio.write_csv(out_dir / f"umap_{key}.csv", frame, index=True, index_label="eid",
                         float_format="%.6g")
    fileio.write_json(out_dir / "umap_fields.json",
                      [{"field": k, "n": int(f.attrs["n"]), "features": list(f.attrs["features"])}
                       for k, f in emb.items()])
    return emb


def read_feature_space(folder: str | Path) -> dict[str, pd.DataFrame]:
    """The embeddings that :func:`feature_space_tables` wrote into ``folder``, attrs restored.

    In the order of ``umap_fields.json`` (the highlight order); each frame is indexed by eid with
    ``umap_1``, ``umap_2``, ``value`` and ``attrs`` ``field``, ``n``, ``features``.
    """
    folder = Path(folder)
    index = folder / "umap_fields.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no feature space here (run 05_feature_space)")
    out = {}
    for meta in json.loads(index.read_text()):
        key = str(meta["field"])
        frame = pd.read_csv(folder / f"umap_{key}.csv", index_col="eid", dtype={"eid": str})
        frame.attrs.update(meta)
        out[key] = frame
    return out
