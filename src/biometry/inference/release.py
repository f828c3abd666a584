"""A later release against the cross-validation: test metrics and interval coverage per field.

What ``notebooks/09_later_release.ipynb`` reports (the MIMIR paper's Fig. 2, plus the intervals):
for each field of a bundle with enough references in the new release, R² and MAE on the release
next to the spread of the CV folds' R², and the share of references inside the calibrated 95 %
intervals of the engine's ``predictions.csv``.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from biometry.analysis.stats import agreement
from biometry.data.tables import references_from_fields_csv
from biometry.inference.bundle import Bundle
from biometry.inference.uncertainty import calibration_curve

#: the coverage a calibrated 95 % interval should reach on new data (the acceptance band)
COVERAGE_BAND: tuple[float, float] = (0.92, 0.98)


def long_predictions(predictions: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """Engine output (wide) and references (eid index, one column per key) → ``eid, field,
    reference, prediction, variance, lo95, hi95`` for every subject with a reference."""
    pred = predictions.set_index(predictions["eid"].astype(str))
    refs = references.copy()
    refs.index = refs.index.astype(str)
    rows = []
    for key in refs.columns:
        if f"{key}_mean" not in pred.columns:
            continue
        y = refs[key].reindex(pred.index)
        keep = y.notna().to_numpy()
        rows.append(pd.DataFrame({
            "eid": pred.index[keep], "field": key, "reference": y[keep].to_numpy(float),
            "prediction": pred[f"{key}_mean"].to_numpy(float)[keep],
            "variance": pred[f"{key}_var"].to_numpy(float)[keep],
            "lo95": pred[f"{key}_lo95"].to_numpy(float)[keep],
            "hi95": pred[f"{key}_hi95"].to_numpy(float)[keep]}))
    cols = ["eid", "field", "reference", "prediction", "variance", "lo95", "hi95"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)


def compare_release(predictions: pd.DataFrame, fields_csv: str | os.PathLike, bundle: Bundle,
                    min_references: int = 100) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per field: the release's metrics against the CV's, and the 95 % coverage.

    Returns
    -------
    table : one row per field: ``n``, ``r2``, ``mae``, ``coverage95`` (share of references
        inside ``[lo95, hi95]``), ``cv_r2`` (pooled out of fold), ``cv_r2_min``/``cv_r2_max``
        (the folds' spread), ``r2_within_cv`` and ``coverage_ok`` (in :data:`COVERAGE_BAND`),
        ``judged`` (n >= ``min_references``).
    long : the long table of :func:`long_predictions` (for plots).
    """
    keys = list(bundle.field_keys)
    refs = references_from_fields_csv(fields_csv, keys)
    long = long_predictions(predictions, refs)
    cv = bundle.meta.get("cv_metrics", {})
    spread = bundle.meta.get("cv_fold_r2", {})
    rows = []
    for key in keys:
        t = long[long["field"] == key]
        n = len(t)
        try:
            a = agreement(t["reference"], t["prediction"])
        except ValueError:  # too few pairs, or a constant reference: no metric
            a = {"r2": float("nan"), "mae": float("nan")}
        cover = float(np.mean((t["lo95"] <= t["reference"]) & (t["reference"] <= t["hi95"]))) \
            if n else float("nan")
        folds = [v for v in spread.get(key, []) if np.isfinite(v)]
        lo, hi = (min(folds), max(folds)) if folds else (float("nan"), float("nan"))
        rows.append({"field": key, "n": n, "r2": a["r2"], "mae": a["mae"], "coverage95": cover,
                     "cv_r2": cv.get(key, {}).get("r2", float("nan")), "cv_r2_min": lo,
                     "cv_r2_max": hi, "cv_mae": cv.get(key, {}).get("mae", float("nan")),
                     "r2_within_cv": bool(folds) and lo <= a["r2"] <= hi,
                     "coverage_ok": COVERAGE_BAND[0] <= cover <= COVERAGE_BAND[1],
                     "judged": n >= min_references})
    return pd.DataFrame(rows), long


def release_curves(long: pd.DataFrame) -> pd.DataFrame:
    """Calibration curve per field of a release's long table (``field, expected, observed``)."""
    out = []
    for key, t in long.groupby("field", sort=True):
        p, obs = calibration_curve(t["reference"], t["prediction"], t["variance"])
        out.append(pd.DataFrame({"field": key, "expected": p, "observed": obs}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["field", "expected", "observed"])
