"""Phantom generator: geometry, anatomy, determinism, and the cohort's statistics (no files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from biometry.config import fields
from biometry.data.types import Station, Volume
from biometry.phantom import (
    LABELS,
    fused_grid,
    fused_truth,
    make_subject,
    mri_atlas_fields,
    sample_fields,
    station_grids,
    subject_seed,
)
from biometry.phantom.anatomy import STATION_DZ, check_scale


def test_grids_match_ukb_at_scale_1():
    st = station_grids(1.0)
    assert len(st) == 6
    assert all(g.shape[:2] == (224, 174) for g in st)
    assert all(np.allclose(g.spacing[:2], 2.232142857) for g in st)
    assert [g.spacing[2] for g in st] == list(STATION_DZ) == [3.0, 4.5, 4.5, 4.5, 3.5, 4.0]
    fz = fused_grid(1.0)
    assert fz.shape == (224, 174, 370) and fz.spacing[2] == 3.0
    # consecutive stations overlap by 2-4 cm, and together they cover the fused grid
    for upper, lower in zip(st[:-1], st[1:]):
        low_edge_upper = upper.origin[2] - upper.spacing[2] / 2
        top_edge_lower = lower.origin[2] + (lower.shape[2] - 0.5) * lower.spacing[2]
        assert 20.0 < top_edge_lower - low_edge_upper < 45.0
    assert st[-1].origin[2] - st[-1].spacing[2] / 2 == pytest.approx(0.0)


def test_scaled_grids():
    st = station_grids(0.5)
    assert st[0].shape[:2] == (112, 87)
    assert st[1].spacing[2] == pytest.approx(9.0)
    assert fused_grid(0.5).shape[2] == 185
    for bad in (0.1, 0.0, 2.5, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            check_scale(bad)


@pytest.fixture(scope="module")
def subject():
    return make_subject("1234567", subject_seed(3, 0), scale=0.3)


def test_subject_contract(subject):
    s = subject
    assert [st.index for st in s.stations] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(st, Station) for st in s.stations)
    assert len({round(st.spacing[2], 6) for st in s.stations}) == 4  # 3.0/4.5/3.5/4.0 mm, scaled
    assert len({tuple(np.round(st.affine[:3, 3], 3)) for st in s.stations}) == 6
    for st in s.stations:
        assert st.water.shape == st.fat.shape and st.water.dtype == np.float32
        assert st.water.min() >= 0 and st.fat.max() > 100   # scanner units, noise is magnitude
    assert s.labels.dtype == np.uint8 and s.labels.shape == fused_grid(0.3).shape
    assert set(np.unique(s.labels)) <= set(LABELS.values())
    for name in ("sat", "vat", "liver", "lungs", "heart", "kidneys", "bone", "arm_lean",
                 "thigh_anterior_right", "thigh_posterior_left"):
        assert (s.labels == LABELS[name]).any(), name
    keys = [k for k in fields.catalogue().index]
    assert set(keys) <= set(s.fields)
    assert s.params["sex"] in (0.0, 1.0)


def test_body_is_left_right_asymmetric_in_world_coordinates(subject):
    """Liver on the patient's right (RAS +x), heart on the left: a L/R flip is detectable."""
    s = subject

    def world_x(label):
        idx = np.argwhere(s.labels == LABELS[label]).mean(axis=0)
        return (s.labels_affine @ np.r_[idx, 1.0])[0]

    assert world_x("liver") > 30.0      # RAS +x = patient right
    assert world_x("heart") < 0.0


def test_stations_show_the_same_anatomy_as_the_labels(subject):
    """Sample a station at label-grid voxels through the affines: fat is bright in SAT only."""
    s = subject
    st = s.stations[2]
    inv = np.linalg.inv(st.affine)
    lab_vox = np.argwhere(s.labels >= 0)[:: 7]
    world = s.labels_affine @ np.c_[lab_vox, np.ones(len(lab_vox))].T
    ijk = np.rint(inv @ world)[:3].astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(st.fat.shape)[:, None]), axis=0)
    assert ok.sum() > 1000
    lab = s.labels[tuple(lab_vox[ok].T)]
    fat = st.fat[tuple(ijk[:, ok])]
    water = st.water[tuple(ijk[:, ok])]
    ff = fat / np.maximum(fat + water, 1e-6)
    assert np.median(ff[lab == LABELS["sat"]]) > 0.8
    muscle = np.isin(lab, [LABELS["muscle"], LABELS["thigh_anterior_left"]])
    if muscle.any():
        assert np.median(ff[muscle]) < 0.3
    assert np.median(fat[lab == 0]) < 0.1 * np.median(fat[lab == LABELS["sat"]])


def test_fused_truth_and_atlas_definition(subject):
    v = fused_truth(subject)
    assert isinstance(v, Volume) and v.shape == subject.labels.shape
    ff = v.fat_fraction()
    assert ff[subject.labels == LABELS["sat"]].min() > 0.85
    liver_ff = np.median(ff[subject.labels == LABELS["liver"]])
    assert liver_ff == pytest.approx(subject.params["liver_fat_fraction"], abs=1e-5)
    atlas = mri_atlas_fields(subject.params, subject.labels, fused_grid(0.3))
    for k, v_ in atlas.items():
        assert subject.fields[k] == v_


def test_same_seed_same_subject_and_fields_do_not_depend_on_images():
    a = make_subject("1", 99, scale=0.2)
    b = make_subject("1", 99, scale=0.2, stations=False)
    c = make_subject("1", 99, scale=0.25, stations=False)
    d = make_subject("1", 100, scale=0.2, stations=False)
    assert np.array_equal(a.labels, make_subject("1", 99, scale=0.2).labels)
    assert all(np.array_equal(x.water, y.water) for x, y in
               zip(a.stations, make_subject("1", 99, scale=0.2).stations))
    assert a.fields == b.fields and a.available == b.available
    # demographics do not depend on the scale; image-measured volumes nearly so
    for k in ("31", "34", "52", "53", "12144", "47"):
        assert a.fields[k] == c.fields[k]
    assert c.fields["22407"] == pytest.approx(a.fields["22407"], rel=0.1)
    assert d.params != a.params


# ---------------------------------------------------------------------------------------------
# the cohort's statistics (1000 subjects, labels on a coarse grid, no station images)


@pytest.fixture(scope="module")
def cohort1000():
    observed, truth = sample_fields(1000, seed=2024, scale=0.15)
    return observed, truth


def _col(key, array=0):
    return fields.column(key, array=array)


def _r(a, b):
    ok = a.notna() & b.notna()
    return stats.pearsonr(a[ok].astype(float), b[ok].astype(float))


@pytest.mark.slow
def test_cohort_marginals_follow_ukb(cohort1000):
    obs, tru = cohort1000
    assert len(obs) == 1000 and obs["eid"].str.fullmatch(r"\d{7}").all()
    assert obs["eid"].is_unique
    assert 62.5 < tru["age"].mean() < 65.5 and 6.0 < tru["age"].std() < 9.0
    assert 44 <= tru["age"].min() and tru["age"].max() <= 82
    assert 0.47 < tru["sex"].mean() < 0.57
    bmi = obs[_col("21001")].dropna()
    assert 25.8 < bmi.mean() < 28.2 and 3.3 < bmi.std() < 5.5
    lf = tru["22402"]
    assert 1.2 < lf.median() < 3.2 and 0.12 < (lf > 5.5).mean() < 0.3
    # derived age from birth year/month and the scan date within about a month of the truth
    scan = pd.to_datetime(obs[_col("53")])
    birth = pd.to_datetime(dict(year=obs[_col("34")], month=obs[_col("52")], day=15))
    derived = (scan - birth).dt.days / 365.25
    assert np.abs(derived - tru["age"]).max() < 0.1


@pytest.mark.slow
def test_cohort_reproduces_the_papers_situations(cohort1000):
    obs, tru = cohort1000
    # weight rises with height
    r_hw, _ = _r(obs[_col("12144")], obs[_col("21002")])
    assert r_hw > 0.3
    # males have larger muscle volumes
    male = tru["sex"] == 1
    for key in ("22409", "22416"):
        t = stats.ttest_ind(tru.loc[male, key], tru.loc[~male, key])
        assert tru.loc[male, key].mean() > 1.2 * tru.loc[~male, key].mean() and t.pvalue < 1e-20
    # MRI VAT and DXA VAT (cm3 -> L) correlate strongly but differ systematically
    mri, dxa = tru["22407"], tru["23289"] / 1000.0
    r_vat, _ = _r(mri, dxa)
    assert r_vat > 0.8
    assert stats.ttest_rel(mri, dxa).pvalue < 1e-10
    fit = stats.linregress(mri, dxa)
    assert abs(fit.slope - 1.0) > 10 * fit.stderr
    # left/right thigh muscle: strong but imperfect symmetry
    r_lr, _ = _r(tru["22405"], tru["22403"])
    assert 0.9 < r_lr < 0.995


@pytest.mark.slow
def test_grip_and_pulse_are_only_weakly_determined(cohort1000):
    obs, tru = cohort1000
    X = np.column_stack([np.ones(len(tru)), tru["age"], tru["sex"], tru["12144"], tru["21002"]])

    def r2(y):
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        return 1 - np.sum((y - X @ beta) ** 2) / np.sum((y - y.mean()) ** 2)

    r2_grip, r2_pulse, r2_vat = r2(tru["47"].to_numpy()), r2(tru["102"].to_numpy()), r2(tru["22407"].to_numpy())
    assert 0.1 < r2_grip < 0.6
    assert r2_pulse < 0.2
    assert r2_vat > r2_grip          # anatomy fields are much better determined
    # the two pulse readings agree closely, as repeated measurements do
    r_pp, _ = _r(obs[_col("102", 0)], obs[_col("102", 1)])
    assert r_pp > 0.8


@pytest.mark.slow
def test_cohort_missingness(cohort1000):
    obs, _ = cohort1000
    cols = [c for c in obs.columns if fields.parse_column(c)]  # UKB columns (not study fields)
    every = obs[cols].notna().all(axis=1).mean()
    assert 0.0 < every < 0.2
    present = obs[cols].notna().mean()
    assert present[_col("21002")] > 0.95 and present[_col("31")] == 1.0
    assert 0.7 < present[_col("22407")] < 0.95       # MRI atlas: most
    assert 0.25 < present[_col("23289")] < 0.5       # DXA: a minority
    assert 0.2 < present[_col("22402")] < 0.45       # liver fat: a minority
    assert 0.7 < present[_col("102", 0)] < 0.9
    # DXA fields come as a block: a subject has all of them or (nearly) none
    dxa = obs[[_col(k) for k in fields.catalogue().query("group == 'dxa'").index]].notna()
    share = dxa.mean(axis=1)
    assert ((share > 0.9) | (share < 0.1)).mean() > 0.99
