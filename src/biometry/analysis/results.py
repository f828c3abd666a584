"""Reading run outputs and field tables into the frames that the analyses use.

Layout contract (written by the training stage)::

    <runs_root>/<study>/train/<field or group>/fold_<k>/predictions.csv

with columns ``eid`` (str), ``fold`` (int), ``field`` (str), ``reference``, ``prediction`` and
optionally ``variance``. A multi-field network writes several fields into one file; every
``predictions.csv`` below ``train/`` is read and concatenated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from biometry.analysis import stats
from biometry.config import fields

PREDICTION_COLUMNS = ("eid", "fold", "field", "reference", "prediction")
METRIC_COLUMNS = ("n", "r2", "mae", "mape", "bias", "loa_low", "loa_high", "pearson_r", "icc")
#: beside the network's numbers in Table 1: the linear baseline, and the thresholded scores
BASELINE_COLUMNS = ("baseline_r2", "baseline_mae")
THRESHOLD_COLUMNS = ("threshold", "auc", "accuracy", "sensitivity", "specificity")
#: a classification network's columns (``head: classification``): no R², no LoA
CLASSIFICATION_COLUMNS = ("n", "n_classes", "class_counts", "accuracy", "balanced_accuracy", "auc",
                          "baseline_accuracy")

#: thresholded fields: key -> (threshold in catalogue units, label); they also get AUC,
#: accuracy, sensitivity and specificity at that threshold
THRESHOLDS: dict[str, tuple[float, str]] = {
    "31": (0.5, "sex (male = 1)"),
    "22402": (5.5, "liver fat > 5.5 % (NAFLD)"),
    "22436": (5.5, "liver fat > 5.5 % (NAFLD)"),
    "2443": (0.5, "diabetes"),
}


def prediction_files(study_dir: str | os.PathLike) -> list[Path]:
    """Every ``predictions.csv`` under ``<study_dir>/train/``, sorted by path."""
    train = Path(study_dir) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"no training runs: {train} does not exist")
    return sorted(train.rglob("predictions.csv"))


def _read_prediction_file(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"eid": str, "field": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable predictions table ({exc})") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for col in ("reference", "prediction", "variance"):
        if col in df.columns:
            values = pd.to_numeric(df[col], errors="coerce")
            junk = values.isna() & df[col].notna()
            if junk.any():
                i = int(np.flatnonzero(junk.to_numpy())[0])
                raise ValueError(f"{path}: non-numeric {col} {df[col].iloc[i]!r} for eid "
                                 f"{df['eid'].iloc[i]}")
            df[col] = values.astype(float)
    df["fold"] = pd.to_numeric(df["fold"], errors="raise").astype(int)
    df["source"] = str(path)
    return df


def load_predictions(study_dir: str | os.PathLike,
                     files: list[Path] | None = None) -> pd.DataFrame:
    """All out-of-fold predictions of a study, one row per (field, eid).

    Parameters
    ----------
    study_dir : path
        ``<runs_root>/<study>``.
    files : list of paths, optional
        Read only these (the runs of the current study definition); default every
        ``predictions.csv`` under ``<study_dir>/train/``.

    Returns
    -------
    DataFrame
        Columns ``eid`` (str), ``fold`` (int), ``field`` (str), ``reference``, ``prediction``,
        ``variance`` (NaN where not written) and ``source`` (the file), sorted by field and eid.
        Rows repeated identically across files are kept once; a subject predicted twice for one
        field with different values raises ``ValueError`` naming the field, eid and files.
    """
    files = prediction_files(study_dir) if files is None else list(files)
    if not files:
        raise FileNotFoundError(f"no predictions.csv under {Path(study_dir) / 'train'}")
    df = pd.concat([_read_prediction_file(p) for p in files], ignore_index=True)
    if "variance" not in df.columns:
        df["variance"] = np.nan
    key = ["field", "eid", "fold", "reference", "prediction", "variance"]
    df = df.drop_duplicates(subset=key, keep="first")
    dup = df.duplicated(subset=["field", "eid"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        sources = sorted(set(df.loc[dup & (df["field"] == first["field"])
                                    & (df["eid"] == first["eid"]), "source"]))
        raise ValueError(f"{int(dup.sum())} rows predict a subject twice for one field, e.g. "
                         f"field {first['field']} eid {first['eid']} in {', '.join(sources)}")
    cols = list(PREDICTION_COLUMNS) + ["variance", "source"]
    return df[cols].sort_values(["field", "eid"], kind="stable").reset_index(drop=True)


def field_info(key: str) -> dict[str, str]:
    """Name, group and unit of a field; a key outside the catalogue gets its key as name."""
    try:
        f = fields.get(key)
    except KeyError:
        return {"name": str(key), "group": "other", "unit": ""}
    return {"name": f.name, "group": f.group, "unit": f.unit}


def mape_note(key: str, reference) -> str:
    """Why MAPE is not reported for this field ("" when it is): see
    :func:`biometry.analysis.stats.mape_meaningful`."""
    if str(key) in THRESHOLDS:
        return "not reported: thresholded field"
    if field_info(str(key))["unit"] == "%":
        return "not reported: percent near 0"
    if not stats.mape_meaningful(reference):
        return "not reported: reference near 0"
    return ""


def fitted_metrics(key: str, reference, prediction) -> dict:
    """:func:`biometry.analysis.stats.agreement` with MAPE only where it means something
    (``mape`` NaN and ``mape_note`` saying why otherwise); NaN pairs are omitted."""
    ref = np.asarray(reference, dtype=float)
    numbers = stats.agreement(ref, prediction, nan_policy="omit")
    note = mape_note(key, ref[np.isfinite(ref)])
    if note:
        numbers["mape"] = float("nan")
    return {**numbers, "mape_note": note}


def thresholded_metrics(key: str, reference, prediction) -> dict:
    """AUC, accuracy, sensitivity and specificity at the field's threshold (empty if it has
    none)."""
    if str(key) not in THRESHOLDS:
        return {}
    thr, _label = THRESHOLDS[str(key)]
    out = stats.classification(np.asarray(reference, float) > thr, prediction, thr,
                               nan_policy="omit")
    return {"threshold": thr, **{k: out[k] for k in THRESHOLD_COLUMNS[1:]}}


def field_metrics(predictions: pd.DataFrame, head: str = "regression",
                  baselines: dict[str, pd.Series] | None = None) -> pd.DataFrame:
    """Table 1: one row per field, the numbers that fit the field.

    Parameters
    ----------
    predictions : DataFrame
        As returned by :func:`load_predictions` (needs ``field``, ``eid``, ``reference``,
        ``prediction``).
    head : str
        The network's head. ``"classification"``: accuracy, balanced accuracy, AUC, per-class
        counts and the larger-class baseline (:func:`biometry.analysis.stats.classification_run`),
        never R². Otherwise the agreement numbers of :func:`biometry.stats.agreement` (MAPE only
        where the reference is bounded away from zero, else NaN with ``mape_note``), the linear
        baseline's R² and MAE on the same subjects when ``baselines`` has the field (out-of-fold
        predictions indexed by eid), and for thresholded fields (:data:`THRESHOLDS`) AUC,
        accuracy, sensitivity and specificity at the threshold.

    Returns
    -------
    DataFrame
        Sorted by field key: ``field``, ``name``, ``group``, ``unit``, then the columns above
        (``n`` counts the complete pairs). A field with fewer than three complete pairs raises
        ``ValueError`` naming it.
    """
    rows = []
    baselines = baselines or {}
    for key, grp in predictions.groupby("field", sort=True):
        key = str(key)
        try:
            if head == "classification":
                numbers = stats.classification_run(grp["reference"], grp["prediction"],
                                                   nan_policy="omit")
            else:
                numbers = fitted_metrics(key, grp["reference"], grp["prediction"])
                numbers.update(thresholded_metrics(key, grp["reference"], grp["prediction"]))
                base = baselines.get(key)
                if base is not None:
                    pairs = grp.dropna(subset=["reference"]).set_index("eid")["reference"]
                    common = pairs.index.intersection(base.dropna().index)
                    b = stats.agreement(pairs.loc[common], base.loc[common])
                    numbers.update(baseline_r2=b["r2"], baseline_mae=b["mae"])
        except ValueError as exc:
            raise ValueError(f"field {key}: {exc}") from exc
        rows.append({"field": key, **field_info(key), **numbers})
    if head == "classification":
        columns = ["field", "name", "group", "unit", *CLASSIFICATION_COLUMNS]
    else:
        columns = ["field", "name", "group", "unit", *METRIC_COLUMNS, "mape_note",
                   *BASELINE_COLUMNS, *THRESHOLD_COLUMNS]
    table = pd.DataFrame(rows).reindex(columns=columns)
    if head != "classification" and not baselines:
        table = table.drop(columns=list(BASELINE_COLUMNS))
    if head != "classification" and table["threshold"].isna().all():
        table = table.drop(columns=list(THRESHOLD_COLUMNS))
    return table
