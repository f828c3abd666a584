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


def load_predictions(study_dir: str | os.PathLike) -> pd.DataFrame:
    """All out-of-fold predictions of a study, one row per (field, eid).

    Parameters
    ----------
    study_dir : path
        ``<runs_root>/<study>``.

    Returns
    -------
    DataFrame
        Columns ``eid`` (str), ``fold`` (int), ``field`` (str), ``reference``, ``prediction``,
        ``variance`` (NaN where not written) and ``source`` (the file), sorted by field and eid.
        Rows repeated identically across files are kept once; a subject predicted twice for one
        field with different values raises ``ValueError`` naming the field, eid and files.
    """
    files = prediction_files(study_dir)
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


def field_metrics(predictions: pd.DataFrame) -> pd.DataFrame:
    """Agreement numbers per field (pairs with a NaN reference or prediction are omitted).

    Parameters
    ----------
    predictions : DataFrame
        As returned by :func:`load_predictions` (needs ``field``, ``reference``, ``prediction``).

    Returns
    -------
    DataFrame
        One row per field, sorted by field key: ``field``, ``name``, ``group``, ``unit`` and
        the numbers of :func:`biometry.stats.agreement` (``n`` counts the complete pairs).
        A field with fewer than three complete pairs raises ``ValueError`` naming it.
    """
    rows = []
    for key, grp in predictions.groupby("field", sort=True):
        try:
            numbers = stats.agreement(grp["reference"], grp["prediction"], nan_policy="omit")
        except ValueError as exc:
            raise ValueError(f"field {key}: {exc}") from exc
        rows.append({"field": str(key), **field_info(str(key)), **numbers})
    return pd.DataFrame(rows, columns=["field", "name", "group", "unit", *METRIC_COLUMNS])
