"""Statistics against textbook values and independent implementations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from sklearn import metrics

from biometry.analysis import stats

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8],
                          [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)


@pytest.mark.parametrize(("kind", "published"),
                         [("ICC(1,1)", 0.17), ("ICC(2,1)", 0.29), ("ICC(3,1)", 0.71)])
def test_icc_matches_shrout_fleiss_table(kind, published):
    res = stats.icc(SHROUT_FLEISS, kind)
    assert res.value == pytest.approx(published, abs=0.005)
    assert res.ci_low < res.value < res.ci_high
    assert (res.n, res.k, res.kind) == (6, 4, kind)


def _pingouin_rows(x: np.ndarray) -> pd.DataFrame:
    n, k = x.shape
    long = pd.DataFrame({"subject": np.repeat(np.arange(n), k), "rater": np.tile(np.arange(k), n),
                         "value": x.ravel()})
    table = pg.intraclass_corr(long, targets="subject", raters="rater", ratings="value")
    return table.set_index("Type")


def _row(table: pd.DataFrame, *labels: str) -> pd.Series:
    for label in labels:  # pingouin renamed ICC1/ICC2/ICC3 to ICC(1,1)/ICC(A,1)/ICC(C,1)
        if label in table.index:
            return table.loc[label]
    raise KeyError(labels)


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside pingouin, with pandas 3
@pytest.mark.parametrize("offset", [0.0, 0.5, 2.0])
def test_icc_matches_pingouin_incl_biased_predictions(offset):
    rng = np.random.default_rng(3)
    ref = rng.normal(10, 2, 200)
    pred = ref + offset + rng.normal(0, 0.5, 200)
    x = np.column_stack([ref, pred])
    table = _pingouin_rows(x)
    for kind, labels in (("ICC(1,1)", ("ICC(1,1)", "ICC1")), ("ICC(2,1)", ("ICC(A,1)", "ICC2")),
                         ("ICC(3,1)", ("ICC(C,1)", "ICC3"))):
        row = _row(table, *labels)
        res = stats.icc(x, kind)
        assert res.value == pytest.approx(row["ICC"], abs=1e-10)
        low, high = row["CI95"] if "CI95" in row.index else row["CI95%"]
        assert res.ci_low == pytest.approx(low, abs=0.006)  # pingouin rounds its CI to 2 decimals
        assert res.ci_high == pytest.approx(high, abs=0.006)


def test_icc_langner_reproduces_reference_numbers():
    rng = np.random.default_rng(0)
    ref = rng.normal(10, 2, 5000)
    unbiased = ref + rng.normal(0, 0.5, 5000)
    assert stats.icc_langner(ref, unbiased) == pytest.approx(
        stats.icc(np.column_stack([ref, unbiased])).value, abs=0.002)
    biased = unbiased + 2.0
    langner = stats.icc_langner(ref, biased)
    textbook = stats.icc(np.column_stack([ref, biased])).value
    # REFERENCE_METHODS §4: large bias 2.0 gives about 0.577 (original) v. 0.648 (textbook)
    assert langner == pytest.approx(0.577, abs=0.02)
    assert textbook == pytest.approx(0.648, abs=0.02)


def test_icc_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        stats.icc([[1, 2], [np.nan, 3], [4, 5]])
    with pytest.raises(ValueError, match="at least 3"):
        stats.icc([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="unknown ICC kind"):
        stats.icc(SHROUT_FLEISS, "ICC(2,k)")


def test_limits_of_agreement_uses_ddof_1():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.0, 0.0, 0.0, 0.0])
    bias, low, high = stats.limits_of_agreement(a, b, sd_limit=2.0)
    sd = np.std(a, ddof=1)
    assert bias == 2.5
    assert (low, high) == pytest.approx((2.5 - 2 * sd, 2.5 + 2 * sd))


def test_agreement_matches_sklearn_and_scipy():
    rng = np.random.default_rng(1)
    ref = rng.normal(5, 1, 300)
    pred = 0.9 * ref + 0.7 + rng.normal(0, 0.3, 300)
    out = stats.agreement(ref, pred)
    assert out["n"] == 300
    assert out["r2"] == pytest.approx(metrics.r2_score(ref, pred))
    assert out["mae"] == pytest.approx(metrics.mean_absolute_error(ref, pred))
    assert out["mape"] == pytest.approx(100 * metrics.mean_absolute_percentage_error(ref, pred))
    assert out["pearson_r"] == pytest.approx(np.corrcoef(ref, pred)[0, 1])
    assert out["bias"] == pytest.approx(np.mean(pred - ref))
    assert out["loa_high"] - out["loa_low"] == pytest.approx(2 * 1.96 * np.std(pred - ref, ddof=1))
    assert out["icc"] == pytest.approx(stats.icc(np.column_stack([ref, pred])).value)


def test_agreement_mape_skips_near_zero_references():
    ref = np.array([0.0, 1.0, 2.0, 4.0])
    pred = np.array([5.0, 1.5, 2.0, 3.0])
    # |err|/|ref| over the last three only: 0.5, 0, 0.25
    assert stats.agreement(ref, pred)["mape"] == pytest.approx(100 * 0.75 / 3)


def test_batched_r2_and_mae_are_agreements_on_each_sample():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4, 50))
    pred = ref + rng.normal(scale=0.5, size=(4, 50))
    r2, mae = stats.r2_mae_batched(ref, pred)
    for k in range(4):
        one = stats.agreement(ref[k], pred[k])
        assert r2[k] == pytest.approx(one["r2"]) and mae[k] == pytest.approx(one["mae"])


def test_agreement_nan_and_too_few_pairs_raise():
    ref = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    pred = np.array([1.1, np.nan, 3.0, 4.2, 4.9])
    with pytest.raises(ValueError, match="2 of 5 pairs contain NaN"):
        stats.agreement(ref, pred)
    assert stats.agreement(ref, pred, nan_policy="omit")["n"] == 3
    with pytest.raises(ValueError, match="at least 3"):
        stats.agreement([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        stats.agreement(ref[:4], pred[:4], nan_policy="omit")
    with pytest.raises(ValueError, match="constant"):
        stats.agreement([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("threshold", [0.5, 5.5])
def test_classification_matches_sklearn(threshold):
    rng = np.random.default_rng(2)
    if threshold == 0.5:  # sex: 0/1 labels, continuous score
        ref = rng.integers(0, 2, 400).astype(float)
        score = ref + rng.normal(0, 0.4, 400)
    else:  # liver fat in %
        ref = np.exp(rng.normal(1.2, 0.8, 400))
        score = ref * np.exp(rng.normal(0, 0.3, 400))
    out = stats.classification(ref, score, threshold)
    y, yhat = ref > threshold, score > threshold
    tn, fp, fn, tp = metrics.confusion_matrix(y, yhat).ravel()
    assert out["accuracy"] == pytest.approx(metrics.accuracy_score(y, yhat))
    assert out["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert out["specificity"] == pytest.approx(tn / (tn + fp))
    assert out["auc"] == pytest.approx(metrics.roc_auc_score(y, score))
    assert 0.5 < out["auc"] < 1.0


def test_classification_auc_with_ties_and_one_class():
    ref = np.array([0, 0, 1, 1, 1.0])
    score = np.array([0.2, 0.6, 0.6, 0.9, 0.6])
    assert stats.classification(ref, score, 0.5)["auc"] == pytest.approx(
        metrics.roc_auc_score(ref > 0.5, score))
    liver = np.array([2.0, 7.0, 12.0, 3.0, 6.0])
    by_value = stats.classification(liver, score * 10, 5.5)
    assert stats.classification(liver > 5.5, score * 10, 5.5) == by_value  # labels as given
    with pytest.raises(ValueError, match="both classes"):
        stats.classification(np.ones(5), score, 0.5)


def _cohort(n: int = 90, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    eid = pd.Index([f"{1000000 + i}" for i in range(n)], name="eid")
    cov = pd.DataFrame({"age": rng.uniform(45, 80, n), "sex": rng.integers(0, 2, n).astype(float),
                        "height": rng.normal(170, 9, n), "weight": rng.normal(76, 14, n)},
                       index=eid)
    folds = pd.Series(np.arange(n) % 3, index=eid, name="fold")
    return cov, folds


def test_linear_baseline_never_uses_the_subjects_own_fold():
    cov, folds = _cohort()
    for k in range(3):
        # exact linear function of the covariates, shifted by 100 in fold k only: a model fitted
        # without fold k predicts the unshifted value exactly, one fitted with it would not
        target = 2 * cov["height"] - cov["weight"] + 3 + 100.0 * (folds == k)
        target.name = "t"
        pred = stats.linear_baseline(cov, target, folds)
        resid = target - pred
        assert np.allclose(resid[folds == k], 100.0, atol=1e-6)
        assert pred.attrs["n_dropped"] == 0


def test_linear_baseline_matches_lstsq_per_fold_and_drops_missing():
    cov, folds = _cohort(seed=5)
    rng = np.random.default_rng(9)
    target = pd.Series(0.5 * cov["weight"] + rng.normal(0, 3, len(cov)), index=cov.index, name="t")
    cov.iloc[:4, 0] = np.nan
    with pytest.warns(UserWarning, match="dropped 4 of 90"):
        pred = stats.linear_baseline(cov, target, folds)
    assert len(pred) == 86 and pred.attrs["n_dropped"] == 4
    # a subset of the covariates (e.g. without the target itself) uses all rows with that subset
    assert len(stats.linear_baseline(cov.drop(columns="age"), target, folds)) == 90
    with pytest.raises(ValueError, match="lack column"):
        stats.linear_baseline(cov, target, folds, columns=("age", "bmi"))
    keep = cov.dropna().index
    x = np.column_stack([np.ones(len(keep)), cov.loc[keep].to_numpy()])
    y = target.loc[keep].to_numpy()
    f = folds.loc[keep].to_numpy()
    for k in range(3):
        beta = np.linalg.lstsq(x[f != k], y[f != k], rcond=None)[0]
        assert np.allclose(pred.loc[keep[f == k]], x[f == k] @ beta)
