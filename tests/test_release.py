"""The later-release comparison (inference.release) on member predictions with known errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biometry.inference.bundle import Bundle
from biometry.inference.engine import member_table
from biometry.inference.release import bootstrap_difference, compare_release


def _bundle(meta: dict, k: int) -> Bundle:
    return Bundle(path=Path("bundle"), name="bundle", meta=meta, members=[None] * k,
                  field_keys=["21002", "22402"], field_names=["weight", "liver fat"],
                  units=["kg", "%"], divisors=np.ones(2), calibration=np.ones(2),
                  input_format="projection", input_size=None, pixel_scale=1 / 255)


def test_members_against_their_folds_and_the_ensemble_coverage():
    k, n = 3, 6000
    rng = np.random.default_rng(7)
    y = rng.normal(80, 12, n)
    shared, own = 4.0, 9.0  # error variances: shared by the members, and each member's own
    means = y + rng.normal(0, np.sqrt(shared), n) + rng.normal(0, np.sqrt(own), (k, n))
    variances = np.full((k, n), shared + own)  # every member calibrated on its own errors
    eids = [str(1000000 + i) for i in range(n)]
    m = np.stack([means, means], axis=2)  # the second field: same numbers, no references
    table = member_table(eids, "bundle", ["21002", "22402"], m, np.stack([variances] * 2, axis=2))
    refs = pd.DataFrame({"21002": y, "22402": np.nan}, index=eids)
    refs.iloc[:10, 0] = np.nan  # ten subjects without a reference
    meta = {"members_from_folds": [0, 1, 2], "cv_folds": [0, 1, 2],
            "cv_fold_r2": {"21002": [0.80, 0.95, 0.85]},  # the members' R² (~0.91) lie inside
            "cv_fold_mae": {"21002": [1.0, 1.5, 1.2]},  # their MAE (~2.9 kg) does not
            "cv_metrics": {"21002": {"r2": 0.9, "mae": 1.3}}}
    out, members, long = compare_release(table, refs, _bundle(meta, k), min_references=100)
    row = out.set_index("field").loc["21002"]
    assert row["n"] == n - 10 and row["judged"]
    ok = np.isfinite(refs["21002"].to_numpy())
    mae = [np.mean(np.abs(means[j][ok] - y[ok])) for j in range(k)]
    np.testing.assert_allclose(members[members["field"] == "21002"]["mae"], mae)
    assert members[members["field"] == "21002"]["cv_mae"].tolist() == [1.0, 1.5, 1.2]
    assert row["member_mae_min"] == pytest.approx(min(mae))
    assert row["r2_within_cv"] and not row["mae_within_cv"]
    assert row["ensemble_mae"] < row["member_mae_min"]
    assert row["coverage95_member0"] == pytest.approx(0.95, abs=0.01)
    assert row["coverage95_ambiguity"] == pytest.approx(0.95, abs=0.012)
    assert row["coverage95_mixture"] > 0.98
    assert row["rule"] == "ambiguity" and row["coverage_ok"]
    empty = out.set_index("field").loc["22402"]
    assert empty["n"] == 0 and not empty["judged"] and np.isnan(empty["ensemble_r2"])
    assert set(long["field"]) == {"21002"} and len(long) == n - 10


def _draw(rng, n, noise, k=1):
    y = rng.normal(30, 13, n)
    return y, y + rng.normal(0, noise, (k, n))


def test_bootstrap_difference_holds_zero_for_the_same_networks_and_not_for_a_shift():
    """Release and cohort drawn alike: the 95 % interval of release minus CV holds 0 (in about
    95 of 100 draws); a release whose errors are larger is told apart; a seed repeats."""
    rng = np.random.default_rng(3)
    held = 0
    for _ in range(40):
        y_r, m_r = _draw(rng, 300, 8.0, k=3)
        y_c, m_c = _draw(rng, 300, 8.0)
        d = bootstrap_difference(y_r, m_r, y_c, m_c[0], n_boot=400, seed=1)
        held += d["r2_diff_lo"] <= 0 <= d["r2_diff_hi"] and d["mae_diff_lo"] <= 0 <= d["mae_diff_hi"]
    assert held >= 33  # two metrics at 95 % each: expected ~36 of 40
    y_r, m_r = _draw(rng, 300, 11.0, k=3)  # the networks are worse on the release
    y_c, m_c = _draw(rng, 300, 8.0)
    d = bootstrap_difference(y_r, m_r, y_c, m_c[0], n_boot=400, seed=1)
    assert d["r2_diff_hi"] < 0 and d["mae_diff_lo"] > 0
    assert d == bootstrap_difference(y_r, m_r, y_c, m_c[0], n_boot=400, seed=1)
    r2 = np.mean([1 - np.sum((y_r - m) ** 2) / np.sum((y_r - y_r.mean()) ** 2) for m in m_r])
    r2_cv = 1 - np.sum((y_c - m_c[0]) ** 2) / np.sum((y_c - y_c.mean()) ** 2)
    assert d["r2_diff"] == pytest.approx(r2 - r2_cv)
    assert np.isnan(bootstrap_difference(y_r[:2], m_r[:, :2], y_c, m_c[0])["r2_diff"])


def test_compare_release_adds_the_bootstrap_with_the_out_of_fold_predictions():
    rng = np.random.default_rng(4)
    k, n = 3, 300
    y, means = _draw(rng, n, 8.0, k=k)
    eids = [str(1000000 + i) for i in range(n)]
    m = np.stack([means, means], axis=2)
    table = member_table(eids, "bundle", ["21002", "22402"], m, np.full((k, n, 2), 64.0))
    refs = pd.DataFrame({"21002": y, "22402": np.nan}, index=eids)
    y_c, m_c = _draw(rng, n, 8.0)
    oof = pd.DataFrame({"eid": eids, "field": "21002", "reference": y_c, "prediction": m_c[0]})
    meta = {"members_from_folds": [0, 1, 2], "cv_folds": [0, 1, 2]}
    out, _, _ = compare_release(table, refs, _bundle(meta, k), min_references=100, oof=oof)
    row = out.set_index("field").loc["21002"]
    assert row["r2_diff_lo"] <= row["r2_diff"] <= row["r2_diff_hi"]
    assert row["r2_consistent"] == bool(row["r2_diff_lo"] <= 0 <= row["r2_diff_hi"])
    assert np.isnan(out.set_index("field").loc["22402"]["r2_diff"])
