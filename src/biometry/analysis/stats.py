"""Agreement statistics and the linear baseline (contract: ``icc``, ``limits_of_agreement``, ``agreement``).

Conventions (see ``docs/statistics.md``):

- Differences are **prediction − reference** (positive bias: the network over-estimates). The
  original MIMIR plots draw reference − prediction; their limits are ours negated and swapped.
- Standard deviations of differences use ``ddof=1``.
- ``icc`` is the textbook intraclass correlation (Shrout & Fleiss 1979; McGraw & Wong 1996) with
  F-based 95 % confidence intervals; ``icc_langner`` reproduces the original MIMIR code, which is
  lower than ICC(2,1) when predictions carry a systematic offset.
- Missing values are never silently turned into a NaN statistic: NaN pairs raise unless
  ``nan_policy="omit"``, and fewer than three pairs always raise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as _sps
from sklearn.metrics import (
    balanced_accuracy_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

ICC_KINDS = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)")
MIN_PAIRS = 3
BASELINE_COVARIATES = ("age", "sex", "height", "weight")


@dataclass(frozen=True)
class ICCResult:
    """An intraclass correlation with its confidence interval.

    Attributes
    ----------
    value : float
        The ICC estimate.
    ci_low, ci_high : float
        Bounds of the two-sided confidence interval (95 % unless asked otherwise).
    kind : str
        ``"ICC(1,1)"``, ``"ICC(2,1)"`` or ``"ICC(3,1)"`` (Shrout & Fleiss names).
    n, k : int
        Number of subjects (targets) and raters.
    """

    value: float
    ci_low: float
    ci_high: float
    kind: str
    n: int
    k: int


def _as_ratings(ratings) -> np.ndarray:
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"ratings must be 2-D (n_subjects, k_raters), got shape {x.shape}")
    n, k = x.shape
    if k < 2:
        raise ValueError(f"ratings need at least two raters (columns), got {k}")
    if n < MIN_PAIRS:
        raise ValueError(f"ratings need at least {MIN_PAIRS} subjects (rows), got {n}")
    n_nan = int(np.isnan(x).sum())
    if n_nan:
        raise ValueError(f"ratings contain {n_nan} NaN value(s); drop incomplete subjects first")
    return x


def _anova_mean_squares(x: np.ndarray) -> tuple[float, float, float, float]:
    """Two-way ANOVA mean squares (rows = subjects, columns = raters): MSR, MSC, MSE, MSW."""
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * np.sum((x.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((x.mean(axis=0) - grand) ** 2)
    ss_total = np.sum((x - grand) ** 2)
    ss_error = ss_total - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_error / ((n - 1) * (k - 1))
    msw = (ss_cols + ss_error) / (n * (k - 1))
    return float(msr), float(msc), float(mse), float(msw)


def icc(ratings, kind: str = "ICC(2,1)", confidence: float = 0.95) -> ICCResult:
    """Intraclass correlation of single measures with an F-based confidence interval.

    Parameters
    ----------
    ratings : array_like, shape (n_subjects, k_raters)
        One row per subject, one column per rater (e.g. reference and prediction). No NaNs.
    kind : {"ICC(1,1)", "ICC(2,1)", "ICC(3,1)"}
        ``ICC(1,1)``: one-way random effects. ``ICC(2,1)``: two-way random effects, absolute
        agreement (McGraw & Wong ICC(A,1); pingouin's ``"ICC(A,1)"``/``"ICC2"``); a systematic
        offset between raters lowers it. ``ICC(3,1)``: two-way mixed, consistency (ICC(C,1));
        insensitive to offsets.
    confidence : float
        Coverage of the two-sided interval.

    Returns
    -------
    ICCResult
        The CI follows Shrout & Fleiss (1979) for ICC(1,1) and ICC(3,1) and McGraw & Wong (1996)
        with Satterthwaite degrees of freedom for ICC(2,1).
    """
    if kind not in ICC_KINDS:
        raise ValueError(f"unknown ICC kind {kind!r}; use one of {', '.join(ICC_KINDS)}")
    x = _as_ratings(ratings)
    n, k = x.shape
    msr, msc, mse, msw = _anova_mean_squares(x)
    alpha = 1.0 - confidence
    q = 1.0 - alpha / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "ICC(1,1)":
            value = (msr - msw) / (msr + (k - 1) * msw)
            f0 = msr / msw
            df1, df2 = n - 1, n * (k - 1)
            fl = f0 / _sps.f.ppf(q, df1, df2)
            fu = f0 * _sps.f.ppf(q, df2, df1)
            low, high = (fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1)
        elif kind == "ICC(3,1)":
            value = (msr - mse) / (msr + (k - 1) * mse)
            f0 = msr / mse
            df1, df2 = n - 1, (n - 1) * (k - 1)
            fl = f0 / _sps.f.ppf(q, df1, df2)
            fu = f0 * _sps.f.ppf(q, df2, df1)
            low, high = (fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1)
        else:
            value = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
            a = k * value / (n * (1 - value))
            b = 1 + k * value * (n - 1) / (n * (1 - value))
            v = (a * msc + b * mse) ** 2 / (
                (a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1)))
            fl = _sps.f.ppf(q, n - 1, v)
            fu = _sps.f.ppf(q, v, n - 1)
            c = k * msc + (k * n - k - n) * mse
            low = n * (msr - fl * mse) / (fl * c + n * msr)
            high = n * (fu * msr - mse) / (c + n * fu * msr)
    return ICCResult(float(value), float(low), float(high), kind, n, k)


def icc_langner(reference, prediction) -> float:
    """ICC as coded in the original MIMIR ``storeEvaluation.getIcc`` (for comparison with its PDFs).

    It departs from textbook ICC(2,1): the rater mean square lacks the factor n, and the error
    mean square uses deviations from the subject mean only (SS_within instead of the two-way
    residual). With no mean offset between reference and prediction it equals ``icc(...,
    "ICC(2,1)")``; with an offset it is lower. Use :func:`icc` for new results.

    Parameters
    ----------
    reference, prediction : array_like, shape (n,)
        Paired values without NaNs.
    """
    x = _as_ratings(np.column_stack([np.asarray(reference, float), np.asarray(prediction, float)]))
    n, k = x.shape
    grand = x.mean()
    row_mean = x.mean(axis=1, keepdims=True)
    ms_r = k * np.sum((row_mean - grand) ** 2) / (n - 1)
    ms_c = np.sum((x.mean(axis=0) - grand) ** 2) / (k - 1)
    ms_e = np.sum((x - row_mean) ** 2) / ((n - 1) * (k - 1))
    return float((ms_r - ms_e) / (ms_r + (k - 1) * ms_e + k * (ms_c - ms_e) / n))


def _paired(a, b, nan_policy: str, what: str = "pairs") -> tuple[np.ndarray, np.ndarray]:
    """Validate two paired 1-D arrays; handle NaNs per ``nan_policy`` ("raise" or "omit")."""
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} v. {b.size}")
    bad = np.isnan(a) | np.isnan(b)
    if bad.any():
        if nan_policy == "raise":
            raise ValueError(
                f"{int(bad.sum())} of {a.size} {what} contain NaN ({int(np.isnan(a).sum())} in the "
                f"first array, {int(np.isnan(b).sum())} in the second); pass nan_policy='omit' "
                "to drop them")
        a, b = a[~bad], b[~bad]
    if a.size < MIN_PAIRS:
        raise ValueError(f"need at least {MIN_PAIRS} complete {what}, got {a.size}")
    return a, b


def limits_of_agreement(a, b, sd_limit: float = 1.96,
                        nan_policy: str = "raise") -> tuple[float, float, float]:
    """Bland-Altman bias and limits of agreement of ``a - b``.

    Parameters
    ----------
    a, b : array_like, shape (n,)
        Paired measurements in the same unit.
    sd_limit : float
        Half-width of the limits in standard deviations of the difference (``ddof=1``).
    nan_policy : {"raise", "omit"}

    Returns
    -------
    (bias, low, high) : tuple of float
        ``mean(a - b)`` and ``bias ∓ sd_limit * std(a - b, ddof=1)``, in the unit of ``a``.
    """
    a, b = _paired(a, b, nan_policy)
    d = a - b
    bias = float(d.mean())
    sd = float(d.std(ddof=1))
    return bias, bias - sd_limit * sd, bias + sd_limit * sd


def pearson_r(x, y) -> float:
    """Pearson's r (``scipy.stats.pearsonr``); 0 when either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(_sps.pearsonr(x, y)[0])


def agreement(reference, prediction, nan_policy: str = "raise") -> dict[str, float]:
    """All agreement numbers of one field's predictions against its reference.

    Parameters
    ----------
    reference, prediction : array_like, shape (n,)
        Paired values in the field's unit.
    nan_policy : {"raise", "omit"}
        ``"raise"`` (default) refuses NaN pairs with a message that counts them; ``"omit"``
        drops every pair in which either value is NaN.

    Returns
    -------
    dict
        ``n`` (pairs used), ``r2`` (1 − SS_res/SS_tot), ``mae`` (unit), ``mape`` (percent, over
        pairs with |reference| > 1e-4; NaN only if no reference passes that), ``bias``,
        ``loa_low``, ``loa_high`` (prediction − reference, ±1.96 SD with ddof=1, unit),
        ``pearson_r`` and ``icc`` (ICC(2,1)).
    """
    ref, pred = _paired(reference, prediction, nan_policy)
    if np.ptp(ref) == 0:
        raise ValueError(f"agreement is undefined: the reference is constant ({ref[0]!r})")
    err = pred - ref
    nz = np.abs(ref) > 1e-4
    mape = float(np.mean(np.abs(err[nz]) / np.abs(ref[nz])) * 100.0) if nz.any() else float("nan")
    bias, low, high = limits_of_agreement(pred, ref)
    return {
        "n": int(ref.size),
        "r2": float(r2_score(ref, pred)),
        "mae": float(mean_absolute_error(ref, pred)),
        "mape": mape,
        "bias": bias,
        "loa_low": low,
        "loa_high": high,
        "pearson_r": pearson_r(ref, pred),
        "icc": icc(np.column_stack([ref, pred]), "ICC(2,1)").value,
    }


def r2_mae_batched(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R² and MAE of :func:`agreement` along the last axis, for many samples at once (e.g.
    bootstrap resamples: ``reference`` (B, n), ``prediction`` broadcastable to it). No NaN
    handling: pass complete pairs."""
    reference, prediction = np.asarray(reference, float), np.asarray(prediction, float)
    res = reference - prediction
    ss_tot = np.square(reference - reference.mean(axis=-1, keepdims=True)).sum(axis=-1)
    return 1.0 - np.square(res).sum(axis=-1) / ss_tot, np.abs(res).mean(axis=-1)


def classification(reference, score, threshold: float,
                   nan_policy: str = "raise") -> dict[str, float]:
    """Thresholded classification of a continuous field (sex at 0.5, liver fat at 5.5 %).

    The positive class is ``value > threshold`` for both the reference and the score.

    Parameters
    ----------
    reference : array_like, shape (n,)
        Reference values in the unit of ``threshold`` (0/1 for sex), or boolean labels that are
        already thresholded (used as they are).
    score : array_like, shape (n,)
        The network's continuous output, in the unit of ``threshold``.
    threshold : float
        Decision threshold in that unit.
    nan_policy : {"raise", "omit"}

    Returns
    -------
    dict
        ``n``, ``n_positive``, ``accuracy``, ``sensitivity`` (true positive rate),
        ``specificity`` (true negative rate) and ``auc`` (area under the ROC curve of ``score``
        against the thresholded reference; ties count one half).
    """
    labels = np.asarray(reference).dtype == bool
    ref, sc = _paired(np.asarray(reference, dtype=float), score, nan_policy)
    y = ref > (0.5 if labels else threshold)
    yhat = sc > threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"classification at threshold {threshold} needs both classes in the "
                         f"reference; got {n_pos} positive and {n_neg} negative")
    return {
        "n": int(y.size),
        "n_positive": n_pos,
        "accuracy": float(np.mean(y == yhat)),
        "sensitivity": float(np.sum(y & yhat) / n_pos),
        "specificity": float(np.sum(~y & ~yhat) / n_neg),
        "auc": float(roc_auc_score(y, sc)),
    }


def mape_meaningful(reference, min_ratio: float = 0.1) -> bool:
    """Whether a mean absolute percentage error means something for this reference.

    MAPE divides by the reference, so it is only reported where the reference is bounded away
    from zero: more than two distinct values (not a 0/1 label), all of one sign, and the 5th
    percentile of |reference| at least ``min_ratio`` times its median. A field given in percent
    (a fat fraction near 0 %) is excluded by the caller (:mod:`biometry.analysis.results`).
    """
    ref = np.asarray(reference, dtype=float)
    ref = ref[np.isfinite(ref)]
    if ref.size < 3 or np.unique(ref).size <= 2:
        return False
    if not ((ref > 0).all() or (ref < 0).all()):
        return False
    mag = np.abs(ref)
    return bool(np.percentile(mag, 5) >= min_ratio * np.median(mag))


def classification_run(labels, prediction, nan_policy: str = "raise") -> dict[str, float | str]:
    """Scores of a classification network (``head: classification``), never R².

    Parameters
    ----------
    labels : array_like, shape (n,)
        The reference class labels 0..K-1.
    prediction : array_like, shape (n,)
        For two classes the probability of class 1 (as ``predictions.csv`` holds it: the class is
        ``p > 0.5``), for more classes the predicted class index.

    Returns
    -------
    dict
        ``n``, ``n_classes``, ``class_counts`` (``"0:12 1:9"``), ``accuracy``,
        ``balanced_accuracy`` (mean per-class recall), ``auc`` (two classes only, else NaN) and
        ``baseline_accuracy``: always guessing the larger class.
    """
    y, p = _paired(labels, prediction, nan_policy, "labelled predictions")
    y = y.astype(int)
    classes, counts = np.unique(y, return_counts=True)
    binary = set(classes.tolist()) <= {0, 1}
    predicted = (p > 0.5).astype(int) if binary else np.rint(p).astype(int)
    auc = float(roc_auc_score(y, p)) if binary and classes.size == 2 else float("nan")
    return {
        "n": int(y.size),
        "n_classes": int(classes.size),
        "class_counts": " ".join(f"{c}:{n}" for c, n in zip(classes, counts, strict=True)),
        "accuracy": float(np.mean(predicted == y)),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "auc": auc,
        "baseline_accuracy": float(counts.max() / y.size),
    }


def linear_baseline(covariates: pd.DataFrame, target: pd.Series, folds: pd.Series,
                    columns: tuple[str, ...] | None = None) -> pd.Series:
    """Out-of-fold predictions of an OLS model on age, sex, height and weight.

    For each fold k, ``statsmodels`` OLS (with intercept) is fitted on the subjects of all other
    folds and predicts the subjects of fold k, so no prediction uses its own fold.

    Parameters
    ----------
    covariates : DataFrame indexed by eid
        The regressors, normally age (years), sex (male = 1), height (cm) and weight (kg).
    columns : tuple of str, optional
        The covariate columns to use (default: every column of ``covariates``); leave out the
        target itself when the target is one of them (height predicting height is no baseline).
    target : Series indexed by eid
        The field, in its unit.
    folds : Series indexed by eid
        Integer fold of each subject (the same assignment as the network's).

    Returns
    -------
    Series indexed by eid, name ``"baseline"``
        Only the subjects with a complete row (covariates, target and fold). The number of
        dropped subjects is in ``.attrs["n_dropped"]`` and is warned about when non-zero.
    """
    columns = tuple(covariates.columns) if columns is None else tuple(columns)
    if not columns:
        raise ValueError(f"linear_baseline ({target.name}): no covariates")
    missing = [c for c in columns if c not in covariates.columns]
    if missing:
        raise ValueError(f"linear_baseline: covariates lack column(s) {', '.join(missing)}")
    import statsmodels.api as sm  # heavy (~1 s to import): only for this fit

    for what, frame in (("target", target), ("covariates", covariates), ("folds", folds)):
        if frame.index.has_duplicates:
            raise ValueError(f"linear_baseline ({target.name}): duplicated eids in the {what}")
    data = pd.DataFrame({"__target": pd.to_numeric(target, errors="coerce")}, index=target.index)
    data = data.join(covariates[list(columns)].apply(pd.to_numeric, errors="coerce"))
    data["__fold"] = folds.reindex(data.index)
    n_all = len(data)
    data = data.dropna()
    n_dropped = n_all - len(data)
    if n_dropped:
        warnings.warn(f"linear_baseline ({target.name}): dropped {n_dropped} of {n_all} subjects "
                      "with a missing covariate, target or fold", stacklevel=2)
    out = pd.Series(np.nan, index=data.index, name="baseline", dtype=float)
    x_all = sm.add_constant(data[list(columns)].to_numpy(float), has_constant="add")
    y_all = data["__target"].to_numpy(float)
    fold_values = data["__fold"].to_numpy()
    for k in np.unique(fold_values):
        test = fold_values == k
        train = ~test
        if train.sum() <= len(columns) + 1:
            raise ValueError(f"linear_baseline ({target.name}): fold {k} leaves only "
                             f"{int(train.sum())} training subjects")
        fit = sm.OLS(y_all[train], x_all[train]).fit()
        out.iloc[np.flatnonzero(test)] = fit.predict(x_all[test])
    out.attrs["n_dropped"] = int(n_dropped)
    return out
