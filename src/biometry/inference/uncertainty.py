"""Calibrated uncertainty of mean-variance predictions: variance scaling, intervals, coverage,
the calibration curve, AUCE, sparsification, and the ensemble of the fold networks (the
ambiguity rule for calibrated members, or the mixture).

Every function takes plain arrays (or the ``predictions.csv`` table of the trainer: ``eid, fold,
field, reference, prediction, variance``) in the field's unit; nothing here loads a network.

The calibration is σ-scaling (Laves et al., MELBA 2021): one factor ``s`` per field multiplies the
predicted variance, fitted on the out-of-fold predictions in closed form as the minimiser of the
Gaussian negative log-likelihood,

    NLL(s) = 1/2 Σ_i [log(s σ_i²) + (y_i − μ_i)² / (s σ_i²)]   ⇒   s = mean((y_i − μ_i)² / σ_i²).

It replaces the original's annealing search on coverage (non-monotone, REFERENCE_METHODS §3.2);
both multiply the variance by one number per field, so an original module's
``calibration_factors.txt`` means the same thing as ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

#: the central-interval levels of the calibration curve (0 and 1 are added by :func:`auce`)
CURVE_LEVELS: tuple[float, ...] = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


def _arrays(y, mean, var) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, mean, var = (np.asarray(a, dtype=np.float64).ravel() for a in (y, mean, var))
    if not (len(y) == len(mean) == len(var)):
        raise ValueError(f"reference, mean and variance differ in length "
                         f"({len(y)}, {len(mean)}, {len(var)})")
    keep = np.isfinite(y) & np.isfinite(mean) & np.isfinite(var) & (var > 0)
    return y[keep], mean[keep], var[keep]


def z_value(level: float) -> float:
    """The half-width of the central ``level`` interval of a standard normal (0.95 -> 1.95996)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2))


def interval(mean, var, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The central ``level`` interval ``μ ± Φ⁻¹(0.5 + level/2) σ`` (arrays of any shape)."""
    half = z_value(level) * np.sqrt(np.asarray(var, dtype=np.float64))
    mean = np.asarray(mean, dtype=np.float64)
    return mean - half, mean + half


def fit_variance_scale(y, mean, var) -> float:
    """The factor ``s`` on the variance that minimises the Gaussian NLL: ``mean((y−μ)²/σ²)``.

    Entries with a missing reference, prediction or a non-positive variance are ignored.
    Raises ValueError when none is left.
    """
    y, mean, var = _arrays(y, mean, var)
    if len(y) == 0:
        raise ValueError("no usable (reference, mean, variance) triple to fit a variance scale")
    return float(np.mean((y - mean) ** 2 / var))


def gaussian_nll(y, mean, var) -> float:
    """Mean Gaussian negative log-likelihood, with the constant ``log(2π)/2``."""
    y, mean, var = _arrays(y, mean, var)
    return float(np.mean(0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)))


def coverage(y, mean, var, level: float = 0.95) -> float:
    """Share of references inside the central ``level`` interval (NaN when none is usable)."""
    y, mean, var = _arrays(y, mean, var)
    if len(y) == 0:
        return float("nan")
    return float(np.mean(np.abs(y - mean) <= z_value(level) * np.sqrt(var)))


def calibration_curve(y, mean, var, levels: Sequence[float] = CURVE_LEVELS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Expected against observed coverage of the central intervals (the uncertainty papers' plot).

    Returns ``(levels, observed)``; a calibrated model lies on the diagonal.
    """
    levels = np.asarray(levels, dtype=np.float64)
    return levels, np.array([coverage(y, mean, var, p) for p in levels])


def auce(y, mean, var, levels: Sequence[float] = CURVE_LEVELS) -> float:
    """Area under the calibration error curve, ``∫₀¹ |observed(p) − p| dp`` (0 = calibrated).

    The curve is pinned at (0, 0) and (1, 1) and integrated with the trapezoidal rule.
    """
    p, obs = calibration_curve(y, mean, var, levels)
    p = np.concatenate([[0.0], p, [1.0]])
    obs = np.concatenate([[0.0], obs, [1.0]])
    return float(np.trapezoid(np.abs(obs - p), p))


def sparsification(y, mean, var, fractions: Sequence[float] | None = None) -> pd.DataFrame:
    """Mean absolute error of the subjects kept as the most uncertain ones are removed.

    Columns: ``removed`` (fraction removed), ``mae`` (ordered by predicted variance, largest first),
    ``oracle`` (ordered by the true absolute error, the best any uncertainty could do), ``random``
    (the expectation without ordering: the overall MAE). A useful uncertainty falls with ``removed``
    and stays close to the oracle; ``ause`` (:func:`ause`) is the area between the two.
    """
    y, mean, var = _arrays(y, mean, var)
    if fractions is None:
        fractions = np.round(np.arange(0.0, 0.951, 0.05), 2)
    fractions = np.asarray(fractions, dtype=np.float64)
    err = np.abs(y - mean)
    # stable sorts so that ties keep a reproducible order
    by_var = err[np.argsort(-var, kind="stable")]
    by_err = np.sort(err)[::-1]
    rows = []
    for f in fractions:
        k = int(np.floor(f * len(err)))
        rest_v, rest_o = by_var[k:], by_err[k:]
        rows.append({"removed": float(f),
                     "mae": float(rest_v.mean()) if len(rest_v) else float("nan"),
                     "oracle": float(rest_o.mean()) if len(rest_o) else float("nan"),
                     "random": float(err.mean()) if len(err) else float("nan")})
    return pd.DataFrame(rows)


def ause(curve: pd.DataFrame) -> float:
    """Area between a sparsification curve and its oracle, relative to the overall MAE."""
    gap = (curve["mae"] - curve["oracle"]).to_numpy()
    base = float(curve["random"].iloc[0])
    return float(np.trapezoid(gap, curve["removed"].to_numpy()) / base) if base > 0 else float("nan")


#: how the K calibrated fold networks of a bundle are combined (:func:`ensemble`)
ENSEMBLE_RULES: tuple[str, ...] = ("ambiguity", "mixture")
#: the rule the engine uses for calibrated members (docs/inference.md, "The ensemble's calibration")
DEFAULT_ENSEMBLE_RULE: str = "ambiguity"


def _members(means, variances) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(means, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    if m.shape != v.shape or m.ndim < 1 or m.shape[0] < 1:
        raise ValueError(f"means {m.shape} and variances {v.shape} must have the same shape (K, ...)")
    return m, v


def mixture(means, variances) -> tuple[np.ndarray, np.ndarray]:
    """Mixture of K Gaussian predictions (axis 0): mean of the means, and the mixture variance.

    ``μ* = mean_k μ_k``, ``σ*² = mean_k(σ_k² + μ_k²) − μ*²`` (the deep-ensemble mixture of
    Lakshminarayanan et al. 2017): the average predicted variance plus the spread of the members'
    means. Right for members whose variances hold only the aleatoric part; members calibrated
    on their own errors already hold the spread, so the mixture counts it twice (too wide).
    """
    m, v = _members(means, variances)
    mu = m.mean(axis=0)
    return mu, np.maximum(v.mean(axis=0) + (m ** 2).mean(axis=0) - mu ** 2, 0.0)


def ambiguity_ensemble(means, variances) -> tuple[np.ndarray, np.ndarray]:
    """K calibrated members (axis 0) → the mean of the means and the variance of *its* error.

    The ambiguity decomposition (Krogh & Vedelsby 1995): for any reference ``y``,
    ``mean_k(μ_k − y)² = (μ̄ − y)² + mean_k(μ_k − μ̄)²``. A calibrated member variance estimates
    that member's full squared error, ``σ_k² ≈ E(μ_k − y)²``, so

        E(μ̄ − y)² = mean_k σ_k² − mean_k(μ_k − μ̄)².

    The spread term is estimated from K draws per subject and can exceed the first; the variance
    is floored at ``mean_k σ_k² / K`` (what it would be with independent member errors), so it
    stays positive. For K = 1 it is the member's variance.
    """
    m, v = _members(means, variances)
    mu = m.mean(axis=0)
    mean_var = v.mean(axis=0)
    spread = ((m - mu) ** 2).mean(axis=0)
    return mu, np.maximum(mean_var - spread, mean_var / m.shape[0])


def ensemble(means, variances, rule: str = DEFAULT_ENSEMBLE_RULE
             ) -> tuple[np.ndarray, np.ndarray]:
    """Combine K members (axis 0) by ``rule``: ``"ambiguity"`` (:func:`ambiguity_ensemble`, for
    calibrated members) or ``"mixture"`` (:func:`mixture`)."""
    if rule == "ambiguity":
        return ambiguity_ensemble(means, variances)
    if rule == "mixture":
        return mixture(means, variances)
    raise ValueError(f"unknown ensemble rule {rule!r}; use one of {', '.join(ENSEMBLE_RULES)}")


# ---------------------------------------------------------------------------------------------
# prediction tables


def fit_scales(table: pd.DataFrame) -> dict[str, float]:
    """Per-field variance scale from a prediction table (``field, reference, prediction,
    variance``), e.g. the pooled out-of-fold ``predictions.csv`` of a study's folds."""
    missing = {"field", "reference", "prediction", "variance"} - set(table.columns)
    if missing:
        raise ValueError(f"prediction table lacks column(s) {', '.join(sorted(missing))}")
    out = {}
    for key, t in table.groupby(table["field"].astype(str), sort=True):
        try:
            out[key] = fit_variance_scale(t["reference"], t["prediction"], t["variance"])
        except ValueError:
            raise ValueError(f"field {key}: no usable variance to calibrate (is the head "
                             f"mean_variance?)") from None
    return out


def apply_scales(table: pd.DataFrame, scales: dict[str, float]) -> pd.DataFrame:
    """A copy of ``table`` with each field's ``variance`` multiplied by its scale."""
    out = table.copy()
    factor = out["field"].astype(str).map(scales)
    if factor.isna().any():
        lacking = sorted(set(out.loc[factor.isna(), "field"].astype(str)))
        raise ValueError(f"no calibration factor for field(s) {', '.join(lacking)}")
    out["variance"] = out["variance"] * factor
    return out


def calibration_table(table: pd.DataFrame, scales: dict[str, float] | None = None,
                      levels: Sequence[float] = (0.68, 0.95)) -> pd.DataFrame:
    """Per field: n, the scale, NLL, AUCE and coverage at ``levels`` before and after scaling."""
    rows = []
    for key, t in table.groupby(table["field"].astype(str), sort=True):
        y, mu, var = t["reference"], t["prediction"], t["variance"]
        s = (scales or {}).get(key, 1.0)
        row = {"field": key, "n": int(np.isfinite(_arrays(y, mu, var)[0]).sum()), "scale": s,
               "nll_raw": gaussian_nll(y, mu, var), "nll": gaussian_nll(y, mu, var * s),
               "auce_raw": auce(y, mu, var), "auce": auce(y, mu, var * s)}
        for p in levels:
            tag = f"{round(100 * p)}"
            row[f"coverage{tag}_raw"] = coverage(y, mu, var, p)
            row[f"coverage{tag}"] = coverage(y, mu, var * s, p)
        rows.append(row)
    return pd.DataFrame(rows)


def ensemble_table(tables: Sequence[pd.DataFrame], rule: str = DEFAULT_ENSEMBLE_RULE
                   ) -> pd.DataFrame:
    """Combine K prediction tables of the same subjects (one per fold network) into one by
    ``rule`` (:func:`ensemble`).

    Rows are matched on ``(eid, field)``; a subject/field missing from any member is dropped.
    """
    if not tables:
        raise ValueError("no prediction tables to combine")
    key = ["eid", "field"]
    merged = None
    for k, t in enumerate(tables):
        part = t[key + ["prediction", "variance"]].rename(
            columns={"prediction": f"m{k}", "variance": f"v{k}"})
        if merged is None:
            merged = t[key + ["reference"]].merge(part, on=key)
        else:
            merged = merged.merge(part, on=key)
    k = len(tables)
    mu, var = ensemble(merged[[f"m{i}" for i in range(k)]].to_numpy().T,
                       merged[[f"v{i}" for i in range(k)]].to_numpy().T, rule)
    return pd.DataFrame({"eid": merged["eid"], "field": merged["field"],
                         "reference": merged["reference"], "prediction": mu, "variance": var})
