"""A later release against the cross-validation: test metrics and interval coverage per field.

What the ``release`` stage (``notebooks/09_later_release.ipynb``) reports, the MIMIR paper's
Fig. 2 made apples to apples, plus the intervals:

* **members**: each fold network alone on the release (R², MAE) against the same fold's
  validation metrics in the cross-validation. A fold network on new subjects is what the CV
  measured; the folds' min-max range is the spread the release metrics should fall in. With 3
  folds of ~130 subjects even a flawless system keeps every member inside for only one field in
  3 to 7 (``benchmarks/release_spread.py``, BENCHMARKS.md), hence the next point.
* **consistency**: the range of 3 folds is narrow, and every fold is drawn from the same cohort,
  so it cannot show the cohort's own sampling luck (on the phantom, the demo cohort's grip-strength
  noise is lighter than a later release's: docs/inference.md §5). With the out-of-fold
  predictions (``oof``), :func:`bootstrap_difference` gives the release metric (mean over the
  members) minus the pooled CV metric with a 95 % bootstrap interval that resamples the subjects
  of both; ``r2_consistent`` / ``mae_consistent``: the interval holds 0.
* **ensemble**: the mean of the members (R², MAE), better than any member, so it is *not*
  compared with the folds' range; and the coverage of its calibrated 95 % intervals by the
  ambiguity rule and by the mixture (:func:`biometry.inference.uncertainty.ensemble`), next to
  the coverage of fold 0 alone.

Inputs are the engine's per-member predictions (``infer(..., keep_members=True)``) and the
release's references; nothing here runs a network.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from biometry.analysis.stats import agreement, r2_mae_batched
from biometry.inference.bundle import Bundle
from biometry.inference.uncertainty import calibration_curve, coverage, ensemble

#: the coverage a calibrated 95 % interval should reach on new data (the acceptance band)
COVERAGE_BAND: tuple[float, float] = (0.92, 0.98)
NAN = float("nan")


def _metrics(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    try:
        a = agreement(y, pred)
    except ValueError:  # too few pairs, or a constant reference: no metric
        return NAN, NAN
    return a["r2"], a["mae"]


def _range(values) -> tuple[float, float]:
    v = [x for x in values if np.isfinite(x)]
    return (min(v), max(v)) if v else (NAN, NAN)


def member_arrays(members: pd.DataFrame, key: str, eids: list[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Means and calibrated variances (K, n) of field ``key`` for ``eids`` from the engine's
    member table (``eid, member, field, mean, var``)."""
    t = members[members["field"].astype(str) == key]
    mean = t.pivot(index="member", columns="eid", values="mean").sort_index()
    var = t.pivot(index="member", columns="eid", values="var").sort_index()
    return mean[eids].to_numpy(float), var[eids].to_numpy(float)


def bootstrap_difference(y_release: np.ndarray, members: np.ndarray, y_cv: np.ndarray,
                         oof: np.ndarray, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """Release metric minus CV metric, with a percentile bootstrap interval.

    Parameters
    ----------
    y_release, members : the release's references (n,) and the members' means (K, n); the release
        metric is the members' mean metric (a fold network on new subjects, as the CV measured).
    y_cv, oof : the cohort's references and out-of-fold means (m,), pooled over the folds.
    n_boot, seed : resamples (subjects with replacement, of both sets independently), generator.

    Returns
    -------
    ``r2_diff``, ``r2_diff_lo``, ``r2_diff_hi``, ``mae_diff``, ``mae_diff_lo``, ``mae_diff_hi``
    (NaN when either set has fewer than 3 subjects).
    """
    y_release, members = np.asarray(y_release, float), np.atleast_2d(np.asarray(members, float))
    y_cv, oof = np.asarray(y_cv, float), np.asarray(oof, float)
    keys = [f"{m}_diff{s}" for m in ("r2", "mae") for s in ("", "_lo", "_hi")]
    if len(y_release) < 3 or len(y_cv) < 3:
        return dict.fromkeys(keys, NAN)
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    r2_rel, mae_rel = (v.mean() for v in r2_mae_batched(y_release, members))
    r2_cv, mae_cv = r2_mae_batched(y_cv, oof)
    point = {"r2": r2_rel - r2_cv, "mae": mae_rel - mae_cv}
    boot = {"r2": [], "mae": []}
    for s in range(0, n_boot, 250):  # bounded memory: K x 250 x n at a time
        b = min(250, n_boot - s)
        i = rng.integers(0, len(y_release), (b, len(y_release)))
        j = rng.integers(0, len(y_cv), (b, len(y_cv)))
        r2_r, mae_r = r2_mae_batched(y_release[i][None], members[:, i])
        r2_c, mae_c = r2_mae_batched(y_cv[j], oof[j])
        boot["r2"].append(r2_r.mean(axis=0) - r2_c)
        boot["mae"].append(mae_r.mean(axis=0) - mae_c)
    tail = 100 * (1 - level) / 2
    for m in ("r2", "mae"):
        lo, hi = np.percentile(np.concatenate(boot[m]), [tail, 100 - tail])
        out.update({f"{m}_diff": float(point[m]), f"{m}_diff_lo": float(lo),
                    f"{m}_diff_hi": float(hi)})
    return out


def compare_release(members: pd.DataFrame, references: pd.DataFrame, bundle: Bundle,
                    min_references: int = 100, oof: pd.DataFrame | None = None, seed: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per field of ``bundle``: members against the CV folds, the ensemble and its coverage.

    Parameters
    ----------
    members : the engine's member table for this bundle (``eid, member, field, mean, var``;
        variances calibrated).
    references : the release's references, eid index, one column per field key.
    min_references : fields with fewer references are listed but not judged.
    oof : the module's out-of-fold predictions (``field, reference, prediction``, pooled over the
        folds; :func:`biometry.inference.export.oof_predictions`): adds the bootstrap comparison.
    seed : the bootstrap's generator.

    Returns
    -------
    table : one row per field: ``n``, ``judged``; the members' ``member_r2_min/max`` and
        ``member_mae_min/max`` against the folds' ``cv_r2_min/max`` and ``cv_mae_min/max``,
        ``r2_within_cv``/``mae_within_cv`` (every member inside the folds' range); the
        ensemble's ``ensemble_r2``, ``ensemble_mae``; ``coverage95_ambiguity``,
        ``coverage95_mixture``, ``coverage95_member0``; ``rule`` (the bundle's) and
        ``coverage_ok`` (that rule's coverage in :data:`COVERAGE_BAND`); with ``oof``, the
        columns of :func:`bootstrap_difference` and ``r2_consistent`` / ``mae_consistent``.
    per_member : ``field, member, fold, n, r2, mae, cv_r2, cv_mae`` (each member against its fold).
    long : ``eid, field, reference, prediction, variance`` (the bundle's rule),
        ``variance_mixture``, ``prediction_member0``, ``variance_member0``: for plots.
    """
    refs = references.copy()
    refs.index = refs.index.astype(str)
    members = members.assign(eid=members["eid"].astype(str))
    have = set(members["eid"])
    folds = list(bundle.meta.get("members_from_folds", range(len(bundle.members))))
    fold_r2 = bundle.meta.get("cv_fold_r2", {})
    fold_mae = bundle.meta.get("cv_fold_mae", {})
    cv_folds = list(bundle.meta.get("cv_folds", folds))
    rows, per_member, longs = [], [], []
    for key in bundle.field_keys:
        y_all = refs[key] if key in refs.columns else pd.Series(dtype=float)
        eids = sorted(e for e, v in y_all.items() if e in have and np.isfinite(v))
        y = y_all.reindex(eids).to_numpy(float)
        means, variances = member_arrays(members, key, eids) if eids else (
            np.zeros((len(bundle.members), 0)), np.zeros((len(bundle.members), 0)))
        m_metrics = [_metrics(y, means[k]) for k in range(len(means))]
        cv_r2 = dict(zip(cv_folds, fold_r2.get(key, []), strict=False))
        cv_mae = dict(zip(cv_folds, fold_mae.get(key, []), strict=False))
        for k, (r2, mae) in enumerate(m_metrics):
            fold = folds[k] if k < len(folds) else k
            per_member.append({"field": key, "member": k, "fold": fold, "n": len(eids),
                               "r2": r2, "mae": mae, "cv_r2": cv_r2.get(fold, NAN),
                               "cv_mae": cv_mae.get(fold, NAN)})
        mu, amb = ensemble(means, variances, "ambiguity")
        _mu, mix = ensemble(means, variances, "mixture")
        r2_lo, r2_hi = _range(fold_r2.get(key, []))
        mae_lo, mae_hi = _range(fold_mae.get(key, []))
        r2s, maes = [m[0] for m in m_metrics], [m[1] for m in m_metrics]
        ens_r2, ens_mae = _metrics(y, mu)
        cover = {"ambiguity": coverage(y, mu, amb), "mixture": coverage(y, mu, mix)}
        cv = bundle.meta.get("cv_metrics", {}).get(key, {})
        boot: dict[str, object] = {}
        if oof is not None:
            t = oof[(oof["field"].astype(str) == key) & oof["reference"].notna()
                    & oof["prediction"].notna()]
            boot = bootstrap_difference(y, means, t["reference"].to_numpy(float),
                                        t["prediction"].to_numpy(float), seed=seed)
            for m in ("r2", "mae"):
                boot[f"{m}_consistent"] = bool(boot[f"{m}_diff_lo"] <= 0 <= boot[f"{m}_diff_hi"])
        rows.append({
            "field": key, "n": len(eids), "judged": len(eids) >= min_references,
            "member_r2_min": _range(r2s)[0], "member_r2_max": _range(r2s)[1],
            "cv_r2_min": r2_lo, "cv_r2_max": r2_hi,
            "member_mae_min": _range(maes)[0], "member_mae_max": _range(maes)[1],
            "cv_mae_min": mae_lo, "cv_mae_max": mae_hi,
            "r2_within_cv": bool(len(eids)) and all(r2_lo <= v <= r2_hi for v in r2s),
            "mae_within_cv": bool(len(eids)) and all(mae_lo <= v <= mae_hi for v in maes),
            "ensemble_r2": ens_r2, "ensemble_mae": ens_mae,
            "cv_r2": cv.get("r2", NAN), "cv_mae": cv.get("mae", NAN),
            "coverage95_ambiguity": cover["ambiguity"], "coverage95_mixture": cover["mixture"],
            "coverage95_member0": coverage(y, means[0], variances[0]) if eids else NAN,
            "rule": bundle.ensemble_rule,
            "coverage_ok": COVERAGE_BAND[0] <= cover[bundle.ensemble_rule] <= COVERAGE_BAND[1],
            **boot})
        longs.append(pd.DataFrame({
            "eid": eids, "field": key, "reference": y, "prediction": mu,
            "variance": amb if bundle.ensemble_rule == "ambiguity" else mix,
            "variance_mixture": mix, "prediction_member0": means[0],
            "variance_member0": variances[0]}))
    return pd.DataFrame(rows), pd.DataFrame(per_member), pd.concat(longs, ignore_index=True)


def release_curves(long: pd.DataFrame) -> pd.DataFrame:
    """Calibration curve per field of a release's long table (``field, expected, observed``,
    and ``observed_raw``: the mixture's, drawn dashed by
    :func:`biometry.report.plots.calibration_curves`)."""
    out = []
    for key, t in long.groupby("field", sort=True):
        p, obs = calibration_curve(t["reference"], t["prediction"], t["variance"])
        _p, mix = calibration_curve(t["reference"], t["prediction"], t["variance_mixture"])
        out.append(pd.DataFrame({"field": key, "expected": p, "observed": obs,
                                 "observed_raw": mix}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["field", "expected", "observed", "observed_raw"])
