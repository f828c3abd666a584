"""Agreement analyses across fields: outliers, DXA vs MRI, bilateral symmetry.

- :func:`method_comparison`: two reference methods measuring one property (e.g. DXA VAT 23289 and
  MRI VAT 22407) are put on a common scale by OLS of one on the other, in both directions; the
  limits of agreement of (fitted − actual) say how well one gold standard predicts the other.
- :func:`loa_ratio`: that width against the network's LoA width for the same field (Sci Rep 2020:
  the method-vs-method LoA were about 70 % wider on average).
- :func:`bilateral_symmetry`: left v. right reference correlation beside each side's
  reference v. prediction correlation (Sci Rep 2020, Supplementary Table 5).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from biometry.analysis import stats
from biometry.config import fields

MIN_SUBJECTS = 10


def outliers(pred_df: pd.DataFrame, field: str, n: int = 10) -> pd.DataFrame:
    """The ``n`` subjects with the largest absolute error for one field.

    Parameters
    ----------
    pred_df : DataFrame
        Predictions as from :func:`biometry.analysis.results.load_predictions`.
    field : str
        Field key.
    n : int
        Number of rows.

    Returns
    -------
    DataFrame
        ``eid``, ``fold``, ``reference``, ``prediction``, ``error`` (prediction − reference) and
        ``abs_error``, largest first (ties by eid); rows with NaN are skipped.
    """
    sub = pred_df[pred_df["field"].astype(str) == str(field)]
    if sub.empty:
        raise ValueError(f"no predictions for field {field!r}")
    sub = sub.dropna(subset=["reference", "prediction"])
    out = sub[["eid", "fold", "reference", "prediction"]].copy()
    out["error"] = out["prediction"] - out["reference"]
    out["abs_error"] = out["error"].abs()
    out = out.sort_values(["abs_error", "eid"], ascending=[False, True], kind="stable")
    return out.head(n).reset_index(drop=True)


def _fit_direction(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """OLS of y on x; LoA of (fitted − actual) in y's unit."""
    import statsmodels.api as sm  # heavy (~1 s to import): only for this fit

    fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
    fitted = fit.predict(sm.add_constant(x, has_constant="add"))
    bias, low, high = stats.limits_of_agreement(fitted, y)
    return {"intercept": float(fit.params[0]), "slope": float(fit.params[1]),
            "mean_difference": bias, "loa_low": low, "loa_high": high, "loa_width": high - low}


def method_comparison(references: pd.DataFrame, pairs: pd.DataFrame | None = None,
                      min_subjects: int = MIN_SUBJECTS) -> pd.DataFrame:
    """Fit each reference method to the other, both directions, for every pair of fields.

    Parameters
    ----------
    references : DataFrame indexed by eid
        Reference values in catalogue units, one column per field key.
    pairs : DataFrame, optional
        Columns ``a``, ``b``, ``property`` (default :func:`biometry.config.fields.pairs`).
    min_subjects : int
        Pairs with fewer subjects having both fields are left out.

    Returns
    -------
    DataFrame
        Two rows per pair, one per direction: ``field`` (the method being predicted),
        ``from_field`` (its regressor), ``property``, ``n``, ``slope``, ``intercept`` (so that
        ``field ≈ slope * from_field + intercept``), ``pearson_r``, ``raw_mean_difference``
        (mean of field − from_field, meaningful only where the units agree), ``unit``,
        ``from_unit``, ``mean_difference`` (of fitted − actual; zero by OLS), ``loa_low``,
        ``loa_high``, ``loa_width`` (of fitted − actual, ±1.96 SD, ddof=1, field's unit).
    """
    pairs = fields.pairs() if pairs is None else pairs
    rows = []
    for _, p in pairs.iterrows():
        a, b = str(p["a"]), str(p["b"])
        if a not in references.columns or b not in references.columns:
            continue
        both = references[[a, b]].apply(pd.to_numeric, errors="coerce").dropna()
        if len(both) < max(min_subjects, stats.MIN_PAIRS):
            continue
        for target, source in ((a, b), (b, a)):
            y = both[target].to_numpy(float)
            x = both[source].to_numpy(float)
            row = {"field": target, "from_field": source, "property": p.get("property", ""),
                   "n": len(both), "pearson_r": stats.pearson_r(x, y),
                   "raw_mean_difference": float(np.mean(y - x)),
                   "unit": _unit(target), "from_unit": _unit(source)}
            row.update(_fit_direction(x, y))
            rows.append(row)
    cols = ["field", "from_field", "property", "n", "slope", "intercept", "pearson_r",
            "raw_mean_difference", "unit", "from_unit", "mean_difference", "loa_low", "loa_high",
            "loa_width"]
    return pd.DataFrame(rows, columns=cols)


def _unit(key: str) -> str:
    try:
        return fields.get(key).unit
    except KeyError:
        return ""


def loa_ratio(method_comparison: pd.DataFrame, field_metrics: pd.DataFrame) -> pd.DataFrame:
    """Ratio of the method-vs-method LoA width to the network's LoA width, per predicted field.

    Parameters
    ----------
    method_comparison : DataFrame
        From :func:`method_comparison`.
    field_metrics : DataFrame
        From :func:`biometry.analysis.results.field_metrics` (``field``, ``loa_low``, ``loa_high``).

    Returns
    -------
    DataFrame
        ``field``, ``from_field``, ``property``, ``method_loa_width``, ``network_loa_width`` and
        ``ratio`` (> 1: the other gold standard agrees worse than the network), for the fields
        present in both tables. ``.attrs["mean_ratio"]`` holds the mean ratio (NaN if none).
    """
    net = field_metrics.assign(field=field_metrics["field"].astype(str)).set_index("field")
    rows = []
    for _, m in method_comparison.iterrows():
        if m["field"] not in net.index:
            continue
        width = float(net.at[m["field"], "loa_high"] - net.at[m["field"], "loa_low"])
        rows.append({"field": m["field"], "from_field": m["from_field"],
                     "property": m["property"], "method_loa_width": float(m["loa_width"]),
                     "network_loa_width": width,
                     "ratio": float(m["loa_width"]) / width if width > 0 else math.inf})
    out = pd.DataFrame(rows, columns=["field", "from_field", "property", "method_loa_width",
                                      "network_loa_width", "ratio"])
    out.attrs["mean_ratio"] = float(out["ratio"].mean()) if len(out) else float("nan")
    return out


def _pearson(x: pd.Series, y: pd.Series) -> tuple[float, int]:
    both = pd.concat([x, y], axis=1, join="inner").dropna()
    if len(both) < stats.MIN_PAIRS:
        return float("nan"), len(both)
    a, b = both.iloc[:, 0].to_numpy(float), both.iloc[:, 1].to_numpy(float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), len(both)
    return stats.pearson_r(a, b), len(both)


def bilateral_symmetry(references: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Left/right symmetry of the references beside the network's accuracy on each side.

    Parameters
    ----------
    references : DataFrame indexed by eid
        Reference values, one column per field key (catalogue units).
    predictions : DataFrame
        Long predictions (``eid``, ``field``, ``reference``, ``prediction``).

    Returns
    -------
    DataFrame
        One row per (left, right) pair of :func:`biometry.config.fields.bilateral_pairs` whose both
        sides are columns of ``references``: ``left``, ``right``, ``name_left``,
        ``name_right``, ``n_left_right`` and ``r_left_right`` (reference left v. right),
        ``n_left``/``r_left`` and ``n_right``/``r_right`` (each side's reference v. its
        prediction). A side without predictions (or under three pairs) has n 0-2 and r NaN.
    """
    preds = predictions.assign(field=predictions["field"].astype(str),
                               eid=predictions["eid"].astype(str))
    rows = []
    for left, right in fields.bilateral_pairs(references.columns):
        row = {"left": left, "right": right, "name_left": fields.get(left).name,
               "name_right": fields.get(right).name}
        row["r_left_right"], row["n_left_right"] = _pearson(references[left], references[right])
        for side, key in (("left", left), ("right", right)):
            sub = preds[preds["field"] == key].set_index("eid")
            row[f"r_{side}"], row[f"n_{side}"] = _pearson(sub["reference"], sub["prediction"])
        rows.append(row)
    return pd.DataFrame(rows, columns=["left", "right", "name_left", "name_right", "n_left_right",
                                       "r_left_right", "n_left", "r_left", "n_right", "r_right"])
