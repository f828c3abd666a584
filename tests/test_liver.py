"""The liver study's pieces on small arrays: atlas geometry, errors, templates, correction and
the three-way comparison (the end-to-end run on a phantom is tests/test_liver_study.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from biometry.analysis import atlas, liver, stats
from biometry.data.types import Volume, lps_index_affine
from biometry.data.volumes import save_nifti


def _volume(shape=(24, 20, 30), spacing=(4.0, 4.0, 5.0), eid="1000001", seed=0) -> Volume:
    """A body-like block: an ellipsoid of water with a fatty rind and a liver-like blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = ((x - c[0]) / (0.4 * shape[0])) ** 2 + ((y - c[1]) / (0.4 * shape[1])) ** 2 \
        + ((z - c[2]) / (0.45 * shape[2])) ** 2
    water = np.where(r < 1, 800.0, 0.0) + rng.normal(0, 5, shape).clip(0)
    fat = np.where((r > 0.7) & (r < 1), 700.0, np.where(r < 1, 40.0, 0.0))
    return Volume(water.astype(np.float32), fat.astype(np.float32), spacing,
                  lps_index_affine(spacing, (40.0, 30.0, -60.0)), eid)


def test_to_sitk_keeps_the_world_position_of_every_voxel():
    vol = _volume()
    img = atlas.to_sitk(vol.water, vol.affine)
    for ijk in [(0, 0, 0), (5, 3, 7), (23, 19, 29)]:
        ras = vol.affine @ np.array([*ijk, 1.0])
        lps = np.array(img.TransformIndexToPhysicalPoint([int(v) for v in ijk]))
        assert lps == pytest.approx([-ras[0], -ras[1], ras[2]])
        assert img[ijk] == pytest.approx(vol.water[ijk])
    assert np.array_equal(atlas.from_sitk(img), vol.water)
    assert np.allclose(atlas._affine_of(img), vol.affine)


def test_template_mask_on_another_grid_names_the_subject(tmp_path):
    vol = _volume(eid="1234567")
    good = np.zeros(vol.shape, np.uint8)
    good[8:14, 8:12, 10:18] = 8
    save_nifti(tmp_path / "good.nii.gz", good, vol.affine)
    assert atlas.read_mask(tmp_path / "good.nii.gz", vol, label=8).sum() == 6 * 4 * 8
    save_nifti(tmp_path / "shape.nii.gz", good[:, :, :-2], vol.affine)
    with pytest.raises(atlas.AtlasError, match=r"template 1234567: liver mask .*shape\.nii\.gz "
                                               r"is on a grid of shape \(24, 20, 28\)"):
        atlas.read_mask(tmp_path / "shape.nii.gz", vol, label=8)
    moved = vol.affine.copy()
    moved[0, 3] += 10.0
    save_nifti(tmp_path / "moved.nii.gz", good, moved)
    with pytest.raises(atlas.AtlasError, match="template 1234567: .*origin"):
        atlas.read_mask(tmp_path / "moved.nii.gz", vol, label=8)
    with pytest.raises(atlas.AtlasError, match="template 1234567: .*no liver voxels .label 3"):
        atlas.read_mask(tmp_path / "good.nii.gz", vol, label=3)


def _subject(vol: Volume, mask: np.ndarray | None, cfg: atlas.AtlasConfig) -> atlas.Subject:
    s = atlas.prepare_subject(vol, cfg.spacing_mm, cfg.top_fraction)
    s.mask = mask
    return s


CFG = atlas.AtlasConfig(templates=2, spacing_mm=6.0, top_fraction=1.0, affine_iterations=5,
                        bspline_iterations=0, erode_mm=4.0)


def test_segment_measures_the_fat_fraction_inside_the_warped_masks():
    target = _volume(eid="2000001", seed=1)
    mask = np.zeros(target.shape, bool)
    mask[9:15, 8:12, 10:20] = True
    t = _subject(target, None, CFG)
    templates = [_subject(_volume(eid=e, seed=i + 2), mask, CFG)
                 for i, e in enumerate(["3000001", "3000002"])]
    res = atlas.segment(t, templates, CFG)
    # the inner body is 40 / (800 + 40 + noise) fat: about 4.7 %
    assert res["atlas_raw"] == pytest.approx(100 * 40 / 840, abs=0.3)
    assert 0 < res["mask_voxels"] <= mask.sum() and res["templates_used"] == 2
    # leave-one-out: a template that is the target itself is not used
    assert atlas.segment(t, templates + [_subject(target, mask, CFG)], CFG)["templates_used"] == 2


def test_segment_is_reproducible():
    mask = np.zeros((24, 20, 30), bool)
    mask[9:15, 8:12, 10:20] = True
    templates = [_subject(_volume(eid=e, seed=i + 2), mask, CFG)
                 for i, e in enumerate(["3000001", "3000002"])]
    t = _subject(_volume(eid="2000001", seed=1), None, CFG)
    first, second = atlas.segment(t, templates, CFG), atlas.segment(t, templates, CFG)
    assert np.array_equal(first.pop("mask"), second.pop("mask")) and first == second


def test_empty_final_mask_names_the_subject():
    target = _volume(eid="2000002", seed=1)
    one_voxel = np.zeros(target.shape, bool)
    one_voxel[12, 10, 15] = True
    t = _subject(target, None, CFG)
    tpl = _subject(_volume(eid="3000003", seed=2), one_voxel, CFG)
    with pytest.raises(atlas.AtlasError, match=r"subject 2000002: the liver mask is empty after "
                                               r"intersecting 1 warped template"):
        atlas.segment(t, [tpl], CFG)


def test_atlas_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="liver: unknown key.s. templatez"):
        atlas.AtlasConfig.from_dict({"templatez": 3})
    assert atlas.AtlasConfig.from_dict({"templates": 2}).templates == 2


def test_templates_are_chosen_for_varied_livers():
    rows = [{"eid": f"{i:07d}", "volume_ml": 1500.0 + i, "centre_x_mm": 0.0, "extent_x_mm": 30.0}
            for i in range(10)]
    rows[3]["volume_ml"], rows[7]["centre_x_mm"] = 2600.0, 40.0   # the two unusual livers
    chosen = atlas.choose_templates(pd.DataFrame(rows), 3)
    assert chosen[0] not in ("0000003", "0000007")   # starts from a typical liver
    assert set(chosen[1:]) == {"0000003", "0000007"}
    with pytest.raises(ValueError, match="need 11 template candidates"):
        atlas.choose_templates(pd.DataFrame(rows), 11)


def test_dice_and_mask_descriptors(tmp_path):
    a = np.zeros((10, 10, 10), bool)
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 2, axis=0)
    assert atlas.dice(a, b) == pytest.approx(0.5)
    save_nifti(tmp_path / "m.nii.gz", a.astype(np.uint8) * 8, lps_index_affine((2.0, 2.0, 3.0)))
    d = atlas.mask_descriptors({"1": tmp_path / "m.nii.gz", "2": tmp_path / "missing.nii.gz"},
                               label=8, log=lambda m: None)
    assert list(d["eid"]) == ["1"]
    assert d.loc[0, "volume_ml"] == pytest.approx(64 * 12 / 1000)


def test_correction_recovers_a_line_and_is_applied_unchanged():
    raw = np.array([1.0, 2.0, 4.0, 8.0, np.nan])
    ref = 0.5 + 1.2 * raw
    corr = atlas.fit_correction(raw, ref)
    assert corr["slope"] == pytest.approx(1.2) and corr["intercept"] == pytest.approx(0.5)
    assert corr["n"] == 4
    out = atlas.apply_correction([3.0, np.nan, -5.0], corr)
    assert out[0] == pytest.approx(4.1) and np.isnan(out[1]) and out[2] == 0.0
    with pytest.raises(ValueError, match="at least 3 subjects"):
        atlas.fit_correction([1.0, 2.0], [1.0, 2.0])


def _values(seed=0, n=60):
    rng = np.random.default_rng(seed)
    truth = rng.lognormal(np.log(3.0), 0.8, n)
    df = pd.DataFrame({"eid": [f"{1000000 + i}" for i in range(n)],
                       "dataset": ["A"] * 40 + ["C"] * 20,
                       "reference": truth + rng.normal(0, 0.3, n),
                       "network": truth + rng.normal(0, 0.8, n),
                       "atlas": truth + rng.normal(0, 0.5, n)})
    df.loc[df.dataset == "C", "reference"] = np.nan
    return df


def test_comparison_table_uses_the_first_named_method_as_truth():
    df = _values()
    table = liver.comparison_table(df)
    assert list(zip(table.truth, table.other, table.dataset)) == list(liver.COMPARISONS)
    a = df[df.dataset == "A"]
    row = table.iloc[0]
    expected = stats.agreement(a.reference, a.network)
    assert row["mae"] == pytest.approx(expected["mae"]) and row["r2"] == pytest.approx(
        expected["r2"])
    assert row["loa_low"] == pytest.approx(expected["loa_low"])
    cls = stats.classification(a.reference, a.network, 5.5)
    assert row["sensitivity"] == pytest.approx(cls["sensitivity"])
    assert row["auc"] == pytest.approx(cls["auc"])
    c = df[df.dataset == "C"]
    assert table.iloc[3]["n"] == 20
    assert table.iloc[3]["mae"] == pytest.approx(np.mean(np.abs(c.network - c.atlas)))


def test_reference_outliers_find_where_network_and_atlas_agree():
    df = _values()
    planted = ["1000004", "1000017"]
    df.loc[df.eid.isin(planted), "reference"] += 15.0
    df.loc[df.eid == "1000050", "network"] += 30.0   # in C: not a reference outlier candidate
    out = liver.reference_outliers(df, n=10)
    assert list(out.columns[:4]) == ["eid", "reference", "network", "atlas"]
    assert set(out.eid[:2]) == set(planted) and len(out) == 10
    assert "1000050" not in set(out.eid)


def test_comparison_subset_is_seeded_and_sized():
    b = [str(2000000 + i) for i in range(50)]
    c1 = liver.comparison_subset(b, 10, seed=3)
    assert c1 == liver.comparison_subset(list(reversed(b)), 10, seed=3)
    assert len(c1) == 10 and set(c1) <= set(b)
    assert c1 != liver.comparison_subset(b, 10, seed=4)
    assert liver.comparison_subset(b[:4], 10, seed=3) == sorted(b[:4])


@pytest.mark.parametrize("bspline_iterations", [0, 3])
def test_registration_recovers_a_known_shift(bspline_iterations):
    vol = _volume(shape=(30, 26, 34), eid="4000001")
    cfg = atlas.AtlasConfig(spacing_mm=4.0, top_fraction=1.0, affine_iterations=40,
                            bspline_iterations=bspline_iterations, bspline_mesh_mm=60.0)
    fixed = _subject(vol, None, cfg).image
    shifted = sitk.Resample(fixed, sitk.TranslationTransform(3, (6.0, 0.0, -5.0)))
    transform, metric = atlas.register(fixed, shifted, cfg)
    # the transform maps fixed points into the moving image: about the shift
    p = np.array(fixed.TransformIndexToPhysicalPoint([15, 13, 17]))
    q = np.array(transform.TransformPoint(p.tolist()))
    assert np.linalg.norm(q - p - np.array([-6.0, 0.0, 5.0])) < 2.0, q - p
