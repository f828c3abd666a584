"""Calibration maths against synthetic predictions with a known variance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biometry.inference import uncertainty as U


def _gaussian(n: int, true_scale: float, seed: int):
    """References drawn around the means with variance ``true_scale`` x the predicted one."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(50, 10, n)
    var = rng.uniform(0.5, 4.0, n)  # heteroscedastic: each subject its own predicted variance
    y = mean + rng.normal(0, 1, n) * np.sqrt(true_scale * var)
    return y, mean, var


@pytest.mark.parametrize("true_scale", [0.25, 1.0, 4.0])
def test_variance_scale_recovers_the_truth_and_minimises_nll(true_scale):
    y, mu, var = _gaussian(20000, true_scale, seed=1)
    s = U.fit_variance_scale(y, mu, var)
    assert s == pytest.approx(true_scale, rel=0.03)
    # the closed form is the NLL minimum: any other factor is worse
    best = U.gaussian_nll(y, mu, var * s)
    for f in (0.9, 1.1):
        assert U.gaussian_nll(y, mu, var * s * f) > best
    # and the scaled intervals cover what they say
    assert U.coverage(y, mu, var * s, 0.95) == pytest.approx(0.95, abs=0.005)
    assert U.coverage(y, mu, var * s, 0.68) == pytest.approx(0.68, abs=0.01)


def test_coverage_and_interval_by_hand():
    mu, var = np.zeros(4), np.ones(4)
    y = np.array([0.5, -1.9, 2.0, np.nan])  # NaN reference: ignored
    assert U.coverage(y, mu, var, 0.95) == pytest.approx(2 / 3)
    lo, hi = U.interval(np.array([10.0]), np.array([4.0]), 0.95)
    assert lo[0] == pytest.approx(10 - 1.959964 * 2, abs=1e-5)
    assert hi[0] == pytest.approx(10 + 1.959964 * 2, abs=1e-5)
    with pytest.raises(ValueError, match="interval level"):
        U.z_value(1.0)


def test_calibration_curve_and_auce():
    y, mu, var = _gaussian(20000, 1.0, seed=2)
    p, obs = U.calibration_curve(y, mu, var)
    assert np.max(np.abs(obs - p)) < 0.015
    assert U.auce(y, mu, var) < 0.01
    # variance 4x too small: every interval under-covers; the AUCE of N(0, 4) judged as N(0, 1)
    # is ∫ p - (2Φ(Φ⁻¹(0.5+p/2)/2) - 1) dp ≈ 0.19
    bad = U.auce(y, mu, var / 4)
    assert 0.17 < bad < 0.21
    assert np.all(U.calibration_curve(y, mu, var / 4)[1] < p)


def test_sparsification_follows_the_oracle_when_variance_is_informative():
    y, mu, var = _gaussian(5000, 1.0, seed=3)
    curve = U.sparsification(y, mu, var)
    assert curve["removed"].iloc[0] == 0.0
    assert curve["mae"].iloc[0] == pytest.approx(curve["random"].iloc[0])
    assert curve["mae"].iloc[-1] < 0.7 * curve["mae"].iloc[0]  # removing the uncertain helps
    assert np.all(curve["oracle"] <= curve["mae"] + 1e-12)
    # an uninformative variance gives a flat curve and a larger AUSE
    flat = U.sparsification(y, mu, np.ones_like(var) + 1e-9 * np.arange(len(var)))
    assert U.ause(flat) > U.ause(curve)


def test_ensemble_mixture():
    m = np.array([[1.0, 0.0], [3.0, 0.0]])
    v = np.array([[1.0, 2.0], [1.0, 2.0]])
    mu, var = U.ensemble(m, v, rule="mixture")
    np.testing.assert_allclose(mu, [2.0, 0.0])
    np.testing.assert_allclose(var, [1.0 + 1.0, 2.0])  # mean variance + spread of the means
    with pytest.raises(ValueError, match="same shape"):
        U.ensemble(m, v[:1])
    with pytest.raises(ValueError, match="unknown ensemble rule 'vote'; use one of ambiguity, "
                                         "mixture"):
        U.ensemble(m, v, rule="vote")


def test_ambiguity_ensemble_by_hand_and_its_floor():
    m = np.array([[1.0, 0.0, 0.0], [3.0, 0.0, 10.0]])
    v = np.array([[4.0, 2.0, 4.0], [4.0, 2.0, 4.0]])
    mu, var = U.ensemble(m, v)  # the default rule
    np.testing.assert_allclose(mu, [2.0, 0.0, 5.0])
    # mean variance - spread of the means (1.0; 0; 25 -> floored at 4/2)
    np.testing.assert_allclose(var, [4.0 - 1.0, 2.0, 2.0])


def test_one_member_ensemble_is_the_member():
    rng = np.random.default_rng(4)
    m, v = rng.normal(size=(1, 50, 3)), rng.uniform(0.5, 2, (1, 50, 3))
    for rule in U.ENSEMBLE_RULES:
        mu, var = U.ensemble(m, v, rule)
        np.testing.assert_array_equal(mu, m[0])
        np.testing.assert_allclose(var, v[0], rtol=1e-12)


def _calibrated_ensemble(k: int, n: int, seed: int):
    """K members whose errors have a shared part (variance a) and an independent part (variance
    b), known per subject; each member's calibrated variance is its full error variance a + b."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.25, 4.0, n), rng.uniform(0.25, 4.0, n)
    y = rng.normal(50, 10, n)
    means = y + rng.normal(0, 1, n) * np.sqrt(a) + rng.normal(0, 1, (k, n)) * np.sqrt(b)
    return y, means, np.broadcast_to(a + b, (k, n)), a + b / k


@pytest.mark.parametrize("k", [2, 3])
def test_ambiguity_rule_covers_and_the_mixture_over_covers(k):
    y, means, var, truth = _calibrated_ensemble(k, 100000, seed=k)
    # every member alone is calibrated
    assert U.coverage(y, means[0], var[0]) == pytest.approx(0.95, abs=0.004)
    mu, amb = U.ensemble(means, var, "ambiguity")
    # the ensemble's error variance is a + b/K, less than a member's a + b
    assert np.mean((mu - y) ** 2) == pytest.approx(np.mean(truth), rel=0.03)
    assert np.mean(amb) < np.mean(var[0])
    assert U.coverage(y, mu, amb) == pytest.approx(0.95, abs=0.008)
    _mu, mix = U.ensemble(means, var, "mixture")
    assert U.coverage(y, mu, mix) > 0.975


def test_tables_fit_apply_and_report():
    rows = []
    for key, scale in (("22407", 4.0), ("21002", 0.5)):
        y, mu, var = _gaussian(4000, scale, seed=int(key))
        rows.append(pd.DataFrame({"eid": [str(i) for i in range(len(y))], "field": key,
                                  "reference": y, "prediction": mu, "variance": var}))
    table = pd.concat(rows, ignore_index=True)
    scales = U.fit_scales(table)
    assert scales["22407"] == pytest.approx(4.0, rel=0.06)
    assert scales["21002"] == pytest.approx(0.5, rel=0.06)
    report = U.calibration_table(table, scales).set_index("field")
    assert report.loc["22407", "coverage95_raw"] < 0.70
    assert report.loc["22407", "coverage95"] == pytest.approx(0.95, abs=0.01)
    assert report.loc["21002", "coverage95_raw"] > 0.99
    assert (report["nll"] < report["nll_raw"]).all()
    scaled = U.apply_scales(table, scales)
    assert U.fit_scales(scaled)["22407"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no calibration factor for field"):
        U.apply_scales(table, {"22407": 1.0})
    pair = [table, table.assign(prediction=table["prediction"] + 2.0)]
    ens = U.ensemble_table(pair, rule="mixture")
    assert len(ens) == len(table)
    np.testing.assert_allclose(ens["variance"], table["variance"] + 1.0)
    np.testing.assert_allclose(U.ensemble_table(pair)["variance"],
                               np.maximum(table["variance"] - 1.0, table["variance"] / 2))


def test_no_variance_is_an_error_naming_the_field():
    table = pd.DataFrame({"field": ["47"] * 3, "reference": [1.0, 2, 3],
                          "prediction": [1.0, 2, 3], "variance": [np.nan] * 3})
    with pytest.raises(ValueError, match="field 47: no usable variance"):
        U.fit_scales(table)
