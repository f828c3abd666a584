"""The later-release comparison (inference.release) on member predictions with known errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biometry.inference.bundle import Bundle
from biometry.inference.engine import member_table
from biometry.inference.release import compare_release


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
