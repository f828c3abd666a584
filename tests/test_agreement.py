"""Agreement analyses and run-output reading on constructed data with a known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biometry import fileio
from biometry.analysis import agreement, results
from biometry.data import tables


def _eids(n: int) -> pd.Index:
    return pd.Index([f"{2000000 + i}" for i in range(n)], name="eid")


def test_method_comparison_recovers_slope_and_offset():
    rng = np.random.default_rng(0)
    n = 500
    mri = rng.normal(4.0, 1.5, n)
    dxa = 1.2 * mri + 0.3 + rng.normal(0, 0.2, n)
    refs = pd.DataFrame({"23289": dxa, "22407": mri}, index=_eids(n))
    refs.iloc[:50, 0] = np.nan  # DXA for a subset only
    table = agreement.method_comparison(refs)
    assert len(table) == 2  # the other pairs have no columns here
    dxa_from_mri = table[table["field"] == "23289"].iloc[0]
    assert dxa_from_mri["from_field"] == "22407" and dxa_from_mri["n"] == 450
    assert dxa_from_mri["slope"] == pytest.approx(1.2, abs=0.02)
    assert dxa_from_mri["intercept"] == pytest.approx(0.3, abs=0.1)
    # residual SD is the noise SD: LoA width 2 * 1.96 * 0.2
    assert dxa_from_mri["loa_width"] == pytest.approx(2 * 1.96 * 0.2, rel=0.1)
    assert dxa_from_mri["mean_difference"] == pytest.approx(0.0, abs=1e-9)
    assert dxa_from_mri["raw_mean_difference"] == pytest.approx(0.2 * 4.0 + 0.3, abs=0.1)
    mri_from_dxa = table[table["field"] == "22407"].iloc[0]
    assert mri_from_dxa["slope"] == pytest.approx(1 / 1.2, abs=0.02)
    assert mri_from_dxa["pearson_r"] == pytest.approx(dxa_from_mri["pearson_r"])


def test_method_comparison_skips_pairs_with_too_few_subjects():
    refs = pd.DataFrame({"23289": np.arange(5.0), "22407": np.arange(5.0) ** 1.5}, index=_eids(5))
    assert agreement.method_comparison(refs, min_subjects=10).empty


def test_loa_ratio():
    mc = pd.DataFrame({"field": ["23289", "22407"], "from_field": ["22407", "23289"],
                       "property": ["vat", "vat"], "loa_width": [1.7, 0.9]})
    fm = pd.DataFrame({"field": ["23289", "22407"], "loa_low": [-0.5, -0.3],
                       "loa_high": [0.5, 0.3]})
    out = agreement.loa_ratio(mc, fm)
    assert out["ratio"].tolist() == pytest.approx([1.7, 1.5])
    assert out.attrs["mean_ratio"] == pytest.approx(1.6)


def test_bilateral_symmetry_on_constructed_data():
    rng = np.random.default_rng(1)
    n = 400
    base = rng.normal(0, 1, n)
    # left = base + e1, right = base + e2 with equal noise: r(left, right) = 1 / (1 + s^2)
    s = 0.5
    left = base + rng.normal(0, s, n)
    right = base + rng.normal(0, s, n)
    eid = _eids(n)
    refs = pd.DataFrame({"22405": left, "22403": right}, index=eid)
    pl = left + rng.normal(0, 0.1, n)
    preds = pd.DataFrame({"eid": np.r_[eid, eid[:200]], "field": ["22405"] * n + ["22403"] * 200,
                          "reference": np.r_[left, right[:200]],
                          "prediction": np.r_[pl, right[:200] * 2 + 1]})
    table = agreement.bilateral_symmetry(refs, preds)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["left"], row["right"]) == ("22405", "22403")
    assert row["r_left_right"] == pytest.approx(np.corrcoef(left, right)[0, 1])
    assert row["r_left_right"] == pytest.approx(1 / (1 + s**2), abs=0.05)
    assert row["r_left"] == pytest.approx(np.corrcoef(left, pl)[0, 1])
    assert row["r_right"] == pytest.approx(1.0)  # an exact linear map
    assert (row["n_left_right"], row["n_left"], row["n_right"]) == (400, 400, 200)


def test_outliers_lists_largest_errors_by_eid():
    preds = pd.DataFrame({"eid": ["a", "b", "c", "d"], "fold": [0, 1, 0, 1], "field": "22407",
                          "reference": [1.0, 2.0, 3.0, 4.0], "prediction": [1.1, 5.0, 2.0, np.nan]})
    out = agreement.outliers(preds, "22407", n=2)
    assert out["eid"].tolist() == ["b", "c"]
    assert out["error"].tolist() == pytest.approx([3.0, -1.0])
    with pytest.raises(ValueError, match="no predictions"):
        agreement.outliers(preds, "22408")


def test_write_table_is_deterministic(tmp_path):
    df = pd.DataFrame({"field": ["22407", "23289"], "r2": [0.98765432, np.nan], "n": [10, 12]})
    csv, md = fileio.write_table(df, tmp_path / "t1")
    first = (csv.read_bytes(), md.read_bytes())
    fileio.write_table(df, tmp_path / "t1")
    assert (csv.read_bytes(), md.read_bytes()) == first
    assert md.read_text().splitlines()[2] == "| 22407 | 0.9877 | 10 |"
    back = pd.read_csv(csv, dtype={"field": str})
    assert back["r2"][0] == pytest.approx(0.98765432)


def _write_predictions(path, df):
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)


def test_load_predictions_and_field_metrics(tmp_path):
    rng = np.random.default_rng(4)
    study = tmp_path / "runs" / "demo"
    eid = [f"{i:07d}" for i in range(30)]
    ref = rng.normal(5, 1, 30)
    for k in range(3):
        part = slice(10 * k, 10 * k + 10)
        _write_predictions(study / "train" / "22407" / f"fold_{k}" / "predictions.csv",
                           pd.DataFrame({"eid": eid[part], "fold": k, "field": "22407",
                                         "reference": ref[part], "prediction": ref[part] + 0.1}))
    multi = pd.DataFrame({"eid": eid * 2, "fold": 0, "field": ["22403"] * 30 + ["22405"] * 30,
                          "reference": np.r_[ref, ref], "prediction": np.r_[ref, ref] * 1.1})
    multi.loc[0, "reference"] = np.nan  # a missing label in a multi-field network run
    _write_predictions(study / "train" / "thighs" / "fold_0" / "predictions.csv", multi)
    preds = results.load_predictions(study)
    assert preds["eid"].iloc[0] == "0000000"  # eid stays a string
    assert preds.groupby("field").size().to_dict() == {"22403": 30, "22405": 30, "22407": 30}
    fm = results.field_metrics(preds)
    assert fm["field"].tolist() == ["22403", "22405", "22407"]
    assert fm.set_index("field").loc["22403", "n"] == 29
    row = fm.set_index("field").loc["22407"]
    assert row["bias"] == pytest.approx(0.1) and row["group"] == "mri_atlas"
    assert row["unit"] == "L"

    # an identical copy of a file is deduplicated; a conflicting one is an error
    _write_predictions(study / "train" / "copy" / "fold_0" / "predictions.csv",
                       pd.read_csv(study / "train" / "22407" / "fold_0" / "predictions.csv",
                                   dtype={"eid": str}))
    assert len(results.load_predictions(study)) == 90
    clash = multi.iloc[[5]].assign(prediction=-1.0)
    _write_predictions(study / "train" / "clash" / "fold_0" / "predictions.csv", clash)
    with pytest.raises(ValueError, match="field 22403 eid 0000005"):
        results.load_predictions(study)


def test_covariates_and_references_from_fields_csv(tmp_path):
    path = tmp_path / "fields.csv"
    pd.DataFrame({"eid": ["0012", "0013", "0014"], "34-0.0": [1950, 1960, 1955],
                  "52-0.0": [6, 1, 12], "53-2.0": ["2015-06-15", "2020-01-15", "2016-01-01"],
                  "31-0.0": [1, 0, 1], "12144-2.0": [180.0, 165.0, np.nan],
                  "21002-2.0": [80.0, 60.0, 70.0], "23289-2.0": [1500.0, np.nan, 800.0]}
                 ).to_csv(path, index=False)
    cov = tables.covariates_from_fields_csv(path)
    assert cov.index.tolist() == ["0012", "0013", "0014"]
    assert cov.columns.tolist() == ["age", "sex", "height", "weight"]
    assert cov["age"].tolist() == pytest.approx([65.0, 60.0, 60 + 17 / 365.25], abs=1e-3)
    assert np.isnan(cov.loc["0014", "height"])
    refs = tables.references_from_fields_csv(path, ["23289"])
    assert refs["23289"].tolist()[0] == pytest.approx(1.5)  # cm3 -> L

    pd.read_csv(path).assign(**{"12144-2.0": ["180", "abc", "170"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="non-numeric value 'abc' in column 12144-2.0 for eid 13"):
        tables.covariates_from_fields_csv(path)
