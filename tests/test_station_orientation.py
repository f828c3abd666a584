"""Water and fat of one station written in different axis orders (issue 9, item 7): each NIfTI is
reoriented on its own, so the same grid in world space is accepted and another grid is rejected
with a message naming both files."""

from __future__ import annotations

import numpy as np
import pytest

from biometry.data.volumes import InputError, load_stations, save_nifti, station_path, to_lps


def _station(tmp_path, permute_fat: bool, shift_mm: float = 0.0):
    rng = np.random.default_rng(0)
    water = rng.uniform(10, 100, (6, 5, 4)).astype(np.float32)
    fat = rng.uniform(1, 50, (6, 5, 4)).astype(np.float32)
    affine = np.diag([-3.0, -3.0, 4.0, 1.0])  # LPS index order, RAS world
    affine[:3, 3] = (10.0, 20.0, -300.0)
    subject = tmp_path / "1000001"
    save_nifti(station_path(subject, 1, "water"), water, affine)
    if permute_fat:
        # the same voxels, stored with axes (z, x, y) and the first of them reversed
        stored = np.flip(np.transpose(fat, (2, 0, 1)), axis=0)
        aff = np.eye(4)
        aff[:3, 0] = -affine[:3, 2]
        aff[:3, 1] = affine[:3, 0]
        aff[:3, 2] = affine[:3, 1]
        aff[:3, 3] = affine[:3, 3] + affine[:3, 2] * (fat.shape[2] - 1)
        aff[2, 3] += shift_mm
        save_nifti(station_path(subject, 1, "fat"), stored, aff)
    else:
        save_nifti(station_path(subject, 1, "fat"), fat, affine)
    return subject, water, fat


def test_water_and_fat_in_different_axis_orders_are_accepted(tmp_path):
    subject, water, fat = _station(tmp_path, permute_fat=True)
    (st,) = load_stations(subject, n_stations=1)
    w, _ = to_lps(st.water, st.affine)
    f, _ = to_lps(st.fat, st.affine)
    np.testing.assert_allclose(w, water, rtol=1e-3)
    np.testing.assert_allclose(f, fat, rtol=1e-3)  # voxel for voxel the fat we wrote


def test_water_and_fat_on_other_grids_are_rejected_naming_both(tmp_path):
    subject, _, _ = _station(tmp_path, permute_fat=True, shift_mm=4.0)
    with pytest.raises(InputError, match="station_1_fat.*station_1_water.*differ in world space"):
        load_stations(subject, n_stations=1)
