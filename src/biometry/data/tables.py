"""The release's field table (UKB showcase columns ``<field>-<instance>.<array>``, native units)
read into the catalogue's units: the references of fields and the baseline covariates.

Junk cells, duplicated or missing eids give a ``ValueError`` naming the file and column.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from biometry.config import fields


def _read_fields_csv(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"eid": str}, low_memory=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: not a readable field table ({exc})") from exc
    if "eid" not in df.columns:
        raise ValueError(f"{path}: no 'eid' column")
    if df["eid"].isna().any():
        raise ValueError(f"{path}: {int(df['eid'].isna().sum())} row(s) without an eid")
    dup = df["eid"].duplicated(keep=False)
    if dup.any():
        raise ValueError(f"{path}: duplicated eid(s) {', '.join(sorted(set(df.loc[dup, 'eid']))[:5])}")
    return df.set_index("eid")


def _numeric(df: pd.DataFrame, column: str, path) -> pd.Series:
    if column not in df.columns:
        raise ValueError(f"{path}: no column {column!r}")
    values = pd.to_numeric(df[column], errors="coerce")
    junk = values.isna() & df[column].notna()
    if junk.any():
        eid = junk.index[junk.to_numpy()][0]
        raise ValueError(f"{path}: non-numeric value {df.at[eid, column]!r} in column {column} "
                         f"for eid {eid}")
    return values.astype(float)


def _age(df: pd.DataFrame, path) -> pd.Series:
    """Age in years at the imaging visit: birth on the 15th of the birth month (UKB has no day)."""
    year = _numeric(df, fields.column("34"), path)
    month = _numeric(df, fields.column("52"), path)
    col = fields.column("53")
    if col not in df.columns:
        raise ValueError(f"{path}: no column {col!r} (date of the imaging visit)")
    scan = pd.to_datetime(df[col], errors="coerce")
    junk = scan.isna() & df[col].notna()
    if junk.any():
        eid = junk.index[junk.to_numpy()][0]
        raise ValueError(f"{path}: unreadable date {df.at[eid, col]!r} in column {col} for eid {eid}")
    ok = year.notna() & month.notna() & scan.notna()
    age = pd.Series(np.nan, index=df.index, dtype=float)
    if not ok.any():
        return age
    birth = pd.to_datetime(pd.DataFrame({"year": year[ok].astype(int),
                                         "month": month[ok].astype(int), "day": 15}))
    age[ok] = (scan[ok] - birth).dt.days.to_numpy() / 365.25
    return age


def references_from_fields_csv(path: str | os.PathLike, keys) -> pd.DataFrame:
    """Reference values of ``keys`` from a UKB-style field table, in catalogue units.

    Parameters
    ----------
    path : path
        CSV with ``eid`` and showcase columns ``<field>-<instance>.<array>`` in UKB native units.
    keys : iterable of str
        Field keys; ``"age"`` is derived (see :func:`covariates_from_fields_csv`); a key without a
        UKB id is read from a column of the same name.

    Returns
    -------
    DataFrame indexed by eid (str), one float column per key, NaN where missing.
    """
    df = _read_fields_csv(path)
    out = {}
    for key in map(str, keys):
        if key == "age":
            out[key] = _age(df, path)
            continue
        f = fields.get(key)
        column = fields.column(key) if f.field_id else key
        out[key] = fields.to_unit(key, _numeric(df, column, path))
    return pd.DataFrame(out, index=df.index)


def covariates_from_fields_csv(path: str | os.PathLike) -> pd.DataFrame:
    """The linear baseline's covariates: age (years), sex (male = 1), height (cm), weight (kg).

    Age is computed from the birth year (34-0.0) and month (52-0.0) and the imaging visit date
    (53-2.0); sex from 31-0.0, height from 12144-2.0, weight from 21002-2.0.

    Returns
    -------
    DataFrame indexed by eid (str) with columns age, sex, height, weight.
    """
    ref = references_from_fields_csv(path, ["age", "31", "12144", "21002"])
    return ref.rename(columns={"31": "sex", "12144": "height", "21002": "weight"})
