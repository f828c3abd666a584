"""Station loading and fusion: orientation invariance, left/right, seams, fat fraction, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from biometry.data.types import Station, Volume, lps_index_affine
from biometry.data.volumes import (
    InputError,
    body_mask,
    fuse,
    load_stations,
    load_subject,
    save_nifti,
    save_stations,
    station_path,
    to_lps,
)

# A small UKB-like layout: UKB z spacings x3, 40 x 30 in-plane at 10 mm, fused at 10 x 10 x 9 mm.
SPACING = (10.0, 10.0, 9.0)
DZ = (9.0, 13.5, 13.5, 13.5, 10.5, 12.0)
NZ = (10, 8, 8, 8, 12, 10)
OVERLAP_MM = 27.0
SCALES = (1.0, 1.3, 0.8, 1.15, 0.9, 1.25)
LEFT_BLOB = (-80.0, 20.0, -300.0)   # RAS mm: x < 0 is the patient's LEFT


def fat_fraction_truth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """FF depends on (x, y) only, so that linear z-interpolation keeps it exactly."""
    return 0.1 + 0.5 / (1 + np.exp(-(np.hypot(x / 120, y / 80) - 0.8) * 12))


def anatomy(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Water and fat (float32) of an asymmetric torso at RAS mm positions."""
    r = np.hypot(x / (140 + 0.05 * z), y / 90)
    body = 1.0 / (1 + np.exp((r - 1) * 20))
    blob = np.exp(-(((x - LEFT_BLOB[0]) ** 2 + (y - LEFT_BLOB[1]) ** 2) / 900
                    + (z - LEFT_BLOB[2]) ** 2 / 6000))
    total = 500 * body * (1 + 0.3 * np.cos(z / 150)) + 300 * blob
    ff = fat_fraction_truth(x, y)
    return (total * (1 - ff)).astype(np.float32), (total * ff).astype(np.float32)


def make_stations(seed: int = 0, noise: float = 0.0, scales=SCALES, nx: int = 40,
                  ny: int = 30) -> list[Station]:
    """Six LPS-ordered stations, head (1) to knees (6), overlapping by OVERLAP_MM."""
    rng = np.random.default_rng(seed)
    stations = []
    top = 0.0
    for k in range(6):
        dz, nz = DZ[k], NZ[k]
        z_first = top - nz * dz + 0.5 * dz            # centre of the lowest slice
        origin = (0.5 * (nx - 1) * SPACING[0], 0.5 * (ny - 1) * SPACING[1], z_first)
        aff = lps_index_affine((SPACING[0], SPACING[1], dz), origin)
        i, j, kk = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
        x, y, z = (aff[a, 0] * i + aff[a, 1] * j + aff[a, 2] * kk + aff[a, 3] for a in range(3))
        w, f = anatomy(x, y, z)
        if noise:
            w += rng.normal(0, noise, w.shape).astype(np.float32)
            f += rng.normal(0, noise, f.shape).astype(np.float32)
        s = np.float32(scales[k])
        stations.append(Station(index=k + 1, water=w * s, fat=f * s, affine=aff))
        top = top - nz * dz + OVERLAP_MM
    return stations


def reorient(st: Station, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Station:
    """The same station stored with permuted and flipped array axes (affine adjusted exactly)."""
    aff = st.affine.copy()
    w, f = st.water, st.fat
    for ax, flip in enumerate(flips):
        if flip:
            n = w.shape[ax]
            aff[:3, 3] += aff[:3, ax] * (n - 1)
            aff[:3, ax] *= -1
            w, f = np.flip(w, ax), np.flip(f, ax)
    new = aff.copy()
    new[:3, :3] = aff[:3, list(perm)]
    return Station(st.index, np.ascontiguousarray(np.transpose(w, perm)),
                   np.ascontiguousarray(np.transpose(f, perm)), new)


def truth_on(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    i, j, k = np.meshgrid(*(np.arange(n) for n in vol.shape), indexing="ij")
    a = vol.affine
    x, y, z = (a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3))
    return anatomy(x, y, z)


@pytest.fixture(scope="module")
def stations() -> list[Station]:
    return make_stations()


@pytest.fixture(scope="module")
def reference(stations) -> Volume:
    return fuse(stations, SPACING)


def test_to_lps_is_exact_permutation():
    rng = np.random.default_rng(1)
    st = Station(1, rng.random((4, 5, 6), dtype=np.float32), rng.random((4, 5, 6), np.float32),
                 lps_index_affine((2.0, 3.0, 4.0), (10.0, -5.0, 7.0)))
    moved = reorient(st, (2, 0, 1), (True, False, True))
    back, aff = to_lps(moved.water, moved.affine)
    np.testing.assert_array_equal(back, st.water)
    np.testing.assert_allclose(aff, st.affine, atol=1e-9)


def test_grid_covers_stations(reference, stations):
    vol = reference
    assert vol.shape[:2] == (40, 30)
    z_lo = min(s.affine[2, 3] - 0.5 * s.affine[2, 2] for s in stations)
    z_hi = max(s.affine[2, 3] + (s.water.shape[2] - 0.5) * s.affine[2, 2] for s in stations)
    assert vol.shape[2] == int(np.round((z_hi - z_lo) / SPACING[2]))
    assert (vol.water + vol.fat).mean(axis=(0, 1)).min() > 0   # no empty slice at the ends
    assert vol.affine[2, 3] == pytest.approx(z_lo + 0.5 * SPACING[2])
    assert vol.water.dtype == np.float32 and vol.fat.dtype == np.float32
    assert all(vol.meta["aligned"].values())


@pytest.mark.parametrize("perm,flips", [
    ((0, 1, 2), (True, True, False)),     # RAS storage
    ((1, 0, 2), (False, False, False)),   # permuted in-plane axes
    ((2, 0, 1), (False, True, True)),     # z first, flipped (head first), A-P flipped
])
def test_orientation_invariance(stations, reference, perm, flips):
    moved = [reorient(s, perm, flips) for s in stations]
    vol = fuse(moved, SPACING)
    assert all(vol.meta["aligned"].values())      # exact reorientation, z-only resampling
    np.testing.assert_allclose(vol.affine, reference.affine, atol=1e-6)
    assert np.abs(vol.water - reference.water).max() <= 1e-4 * reference.water.max()
    assert np.abs(vol.fat - reference.fat).max() <= 1e-4 * reference.fat.max()


def test_nifti_int16_scaled_orientation_invariance(tmp_path, stations, reference):
    """Stations stored as RAS float32 and as permuted int16 with scl_slope load to one volume."""
    save_stations([reorient(s, (0, 1, 2), (True, True, False)) for s in stations],
                  tmp_path / "ras")
    save_stations([reorient(s, (1, 2, 0), (False, True, True)) for s in stations],
                  tmp_path / "int16", dtype=np.int16)
    hdr = nib.load(station_path(tmp_path / "int16", 2, "water"))
    assert hdr.get_data_dtype() == np.int16 and hdr.dataobj.slope != 1.0
    ras = load_subject(tmp_path / "ras", SPACING)
    i16 = load_subject(tmp_path / "int16", SPACING)
    assert np.abs(ras.water - reference.water).max() <= 1e-4 * reference.water.max()
    # int16 quantisation: half a step of (max / 32767) per station, scales up to 1.25
    tol = 1.3 * 0.5 * max(s.water.max() for s in stations) / 32767 * 1.5
    assert np.abs(i16.water - reference.water).max() <= tol
    assert np.abs(i16.fat - reference.fat).max() <= tol
    assert i16.eid == "int16"


def test_left_blob_lands_at_high_x(reference):
    """Patient left = RAS x < 0 must be at high x index (radiological right->left)."""
    vol = reference
    z_idx = int(round((LEFT_BLOB[2] - vol.affine[2, 3]) / SPACING[2]))
    plane = vol.water[:, :, z_idx] + vol.fat[:, :, z_idx]
    mirrored = plane[::-1, :]
    excess = plane - mirrored            # the blob minus its mirror image
    x_peak = np.unravel_index(np.argmax(excess), excess.shape)[0]
    assert x_peak > vol.shape[0] / 2 + 5
    world = vol.affine @ [x_peak, 0, z_idx, 1]
    assert world[0] == pytest.approx(LEFT_BLOB[0], abs=SPACING[0])


def test_seams_leave_no_step():
    """Stations with different intensity scales and noise: no jump in the z profile."""
    noise = 5.0
    vol = fuse(make_stations(seed=3, noise=noise), SPACING)
    truth_w, truth_f = truth_on(vol)
    ref_scale = vol.meta["scales"][vol.meta["stations"][len(SCALES) // 2]]
    ref_true = SCALES[vol.meta["stations"][len(SCALES) // 2] - 1]
    profile = (vol.water + vol.fat).mean(axis=(0, 1))
    truth = (truth_w + truth_f).mean(axis=(0, 1)) * ref_true * ref_scale
    rel = profile / truth - 1
    # noise of a slice mean: sqrt(2) * noise / sqrt(n_voxels), relative to the mean signal
    slice_noise = np.sqrt(2) * noise * 1.3 / np.sqrt(40 * 30) / truth.mean()
    assert np.abs(np.diff(rel)).max() < 4 * slice_noise       # no jump beyond the noise
    assert np.abs(rel).max() < 0.01                            # nor a drifting level
    # and the uncorrected fusion does show the steps
    raw = fuse(make_stations(seed=3, noise=noise), SPACING, correct_intensity=False)
    raw_rel = (raw.water + raw.fat).mean(axis=(0, 1)) / truth * ref_scale - 1
    assert np.abs(np.diff(raw_rel)).max() > 0.1
    steps = vol.meta["seams"]
    assert len(steps) == 5
    assert max(abs(s["step_before"]) for s in steps) > 0.15
    assert max(abs(s["step_after"]) for s in steps) < 0.02
    # the estimated scales undo the true ones (up to the reference)
    est = np.array([vol.meta["scales"][k] * SCALES[k - 1] for k in range(1, 7)])
    np.testing.assert_allclose(est / est[2], 1.0, atol=0.01)
    assert vol.meta["max_seam_step_after"] < 0.02 < vol.meta["max_seam_step_before"]


def test_fusion_preserves_fat_fraction(reference, stations):
    ff = reference.fat_fraction()
    truth_w, truth_f = truth_on(reference)
    body = (truth_w + truth_f) > 100
    true_ff = truth_f / np.maximum(truth_w + truth_f, 1e-6)
    assert body.sum() > 1000
    assert np.abs(ff[body] - true_ff[body]).max() < 1e-4


def test_fused_matches_truth_geometry(reference):
    truth_w, _ = truth_on(reference)
    k = reference.meta["stations"][3]
    scale = reference.meta["scales"][k] * SCALES[k - 1]
    rel = np.abs(reference.water - truth_w * scale).max() / truth_w.max()
    assert rel < 0.05   # linear z-interpolation of a smooth object


def test_general_resampling_fallback(stations, reference):
    """A station shifted by half a voxel in-plane goes through affine resampling."""
    shifted = [Station(s.index, s.water, s.fat, s.affine.copy()) for s in stations]
    shifted[4].affine[0, 3] += 0.5 * SPACING[0]
    vol = fuse(shifted, SPACING)
    assert [k for k, a in vol.meta["aligned"].items() if not a] == [5]
    assert vol.shape[0] == reference.shape[0] + 1   # in-plane union grew by one column
    # away from station 5 the fused volume is the reference (its origin moved one column)
    assert np.allclose(vol.affine[:3, 3] + vol.affine[:3, 0], reference.affine[:3, 3])
    a5, n5 = shifted[4].affine, shifted[4].water.shape[2]
    z = vol.affine[2, 3] + SPACING[2] * np.arange(vol.shape[2])
    lo5, hi5 = a5[2, 3] - a5[2, 2] / 2, a5[2, 3] + a5[2, 2] * (n5 - 0.5)
    near5 = (z > lo5 - 20) & (z < hi5 + 20)
    np.testing.assert_allclose(vol.water[1:, :, ~near5], reference.water[:, :, ~near5],
                               atol=1e-3)
    # inside station 5 the half-voxel shift is honoured: there the object sits 5 mm to the right
    inner = (z > lo5 + 30) & (z < hi5 - 30)
    i, j, k = np.meshgrid(*(np.arange(n) for n in vol.shape), indexing="ij")
    x, y, zz = (vol.affine[r, 0] * i + vol.affine[r, 1] * j + vol.affine[r, 2] * k
                + vol.affine[r, 3] for r in range(3))
    moved_w, _ = anatomy(x - 5.0, y, zz)
    got = vol.water[1:-1, :, inner] / (vol.meta["scales"][5] * SCALES[4])
    err = np.abs(got - moved_w[1:-1, :, inner]).max() / moved_w.max()
    unshifted = np.abs(got - truth_on(vol)[0][1:-1, :, inner]).max() / moved_w.max()
    assert err < 0.5 * unshifted


def test_body_mask_finds_body(reference):
    truth_w, truth_f = truth_on(reference)
    truth = (truth_w + truth_f) > 0.5 * 500 * 0.7
    mask = body_mask(reference)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert mask.dtype == bool and dice > 0.9


# ---------------------------------------------------------------- bad input -------------------

@pytest.fixture
def subject(tmp_path, stations) -> Path:
    return save_stations(stations, tmp_path / "1000001", dtype=np.int16)


def test_load_stations_reads_all(subject):
    loaded = load_stations(subject)
    assert [s.index for s in loaded] == [1, 2, 3, 4, 5, 6]
    assert loaded[0].water.dtype == np.float32


def test_truncated_file_named(subject):
    p = station_path(subject, 4, "fat")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="station_4_fat"):
        load_subject(subject, SPACING)


def test_missing_station_named(subject):
    station_path(subject, 3, "water").unlink()
    with pytest.raises(InputError, match="station_3_water.*missing"):
        load_subject(subject, SPACING)


def test_geometry_mismatch_named(subject, stations):
    st = stations[1]
    save_nifti(station_path(subject, 2, "fat"), st.fat, st.affine + np.diag([0, 0, 0.5, 0]))
    with pytest.raises(InputError, match="station_2_fat.*affine"):
        load_subject(subject, SPACING)
    save_nifti(station_path(subject, 2, "fat"), st.fat[:, :, :-1], st.affine)
    with pytest.raises(InputError, match="station_2_fat.*shape"):
        load_subject(subject, SPACING)


def test_nan_named(subject, stations):
    bad = stations[4].water.copy()
    bad[3, 4, 5] = np.nan
    save_nifti(station_path(subject, 5, "water"), bad, stations[4].affine)
    with pytest.raises(InputError, match="station_5_water.*NaN"):
        load_subject(subject, SPACING)


def test_corrupt_gzip_named(subject):
    p = station_path(subject, 1, "water")
    p.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(InputError, match="station_1_water"):
        load_subject(subject, SPACING)


# ---------------------------------------------------------------- phantom ---------------------

def test_phantom_body_mask_matches_labels(tmp_path):
    """A phantom subject (LAS-stored stations, scaled int16 NIfTI) fuses onto its label grid."""
    cohort = pytest.importorskip("biometry.phantom.cohort")
    subject = cohort.make_subject("1000001", 7, scale=0.25)
    folder = save_stations(subject.stations, tmp_path / subject.eid, dtype=np.int16)
    vol = load_subject(folder, subject.grid.spacing)
    assert vol.shape == subject.labels.shape
    np.testing.assert_allclose(vol.affine, subject.labels_affine, atol=1e-3)
    truth = subject.labels > 0
    mask = body_mask(vol)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95
    assert vol.meta["max_seam_step_after"] < 0.02


def test_gap_between_stations_is_reported(stations):
    """Stations that do not overlap fuse without correction across the gap, which is listed."""
    apart = [Station(s.index, s.water, s.fat, s.affine.copy()) for s in stations[:2]]
    apart[1].affine[2, 3] -= 60.0          # 27 mm overlap -> 33 mm gap
    vol = fuse(apart, SPACING)
    assert len(vol.meta["gaps"]) == 1 and vol.meta["gaps"][0]["overlap_mm"] == pytest.approx(-33)
    assert np.isnan(vol.meta["seams"][0]["step_before"])
    profile = (vol.water + vol.fat).mean(axis=(0, 1))
    assert (profile == 0).sum() >= 2       # the gap stays empty rather than invented
    single = fuse(stations[:1], SPACING)
    assert single.meta["seams"] == [] and single.shape[2] == 10
