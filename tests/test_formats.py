"""2D formats: shapes, orientation (radiological, head up), bed crop, fat-fraction scale, slices."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage

from biometry.data import formats
from biometry.data.types import UKB_SPACING, Station, Volume, lps_index_affine

# A coarse grid (3x the UKB voxel size): bed crop = round(49.1 / 6.70) = 7 voxels.
SPACING = tuple(3 * s for s in UKB_SPACING)
SHAPE = (75, 58, 124)


def make_volume(water_value: float = 100.0, fat_value: float = 30.0, shape=SHAPE,
                spacing=SPACING, seed: int = 0) -> tuple[Volume, np.ndarray]:
    """An elliptic-cylinder trunk (A-P centre at y = 25) on two legs (z < 30), noise, its mask."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((x - shape[0] / 2) / (0.4 * shape[0])) ** 2 + ((y - 25) / 18.0) ** 2 < 1
    legs = (np.abs(np.abs(x - shape[0] / 2) - 0.2 * shape[0]) < 0.15 * shape[0]) & (np.abs(y - 25) < 12)
    body = np.where(z < 30, legs, body)
    noise = rng.normal(0, 0.5, shape).astype(np.float32)
    water = np.where(body, water_value, 0).astype(np.float32) + noise
    fat = np.where(body, fat_value, 0).astype(np.float32)
    return Volume(water, fat, spacing, lps_index_affine(spacing), eid="test"), body


def coronal_width(n_x: int, n_y: int, spacing_y: float = SPACING[1]) -> int:
    """Columns of the 256-wide image that belong to the coronal view."""
    return round(256 * n_x / (n_x + n_y - formats.bed_voxels(spacing_y)))


def test_shapes_and_dtypes_match_the_catalogue():
    vol, mask = make_volume()
    out = formats.compute(vol, list(formats.FORMATS), mask=mask)
    for name, (fn, shape, dtype) in formats.FORMATS.items():
        assert out[name].shape == shape and out[name].dtype == dtype, name
        alone = fn(vol) if name == "projection" else fn(vol, mask=mask)
        np.testing.assert_array_equal(alone, out[name])
    assert set(formats.FORMATS) == {"projection", "fat_fraction_slices", "mimir", "thigh",
                                   "mimir_original"}
    with pytest.raises(KeyError, match="nope"):
        formats.compute(vol, ["nope"])


def test_radiological_convention_and_head_up():
    """A bright blob on the patient's LEFT (high x) near the head (high z): image right, top."""
    vol, _ = make_volume()
    vol.water[60:66, 20:30, 100:110] += 2000.0
    img = formats.projection(vol)[0].astype(float)
    cw = coronal_width(*SHAPE[:2])
    coronal = img[:, :cw]
    row, col = np.unravel_index(np.argmax(coronal), coronal.shape)
    assert col > 0.75 * cw, "patient left must appear on the image right"
    assert row < 256 * (1 - 100 / SHAPE[2]) + 2, "superior must be up"
    # the sagittal view: the blob sits anteriorly (y 20-30 of 51 kept): left half of that view
    sagittal = img[:, cw:]
    _r, c = np.unravel_index(np.argmax(sagittal), sagittal.shape)
    assert c < 0.65 * sagittal.shape[1]


def test_bed_is_cropped_in_millimetres():
    assert formats.bed_voxels(UKB_SPACING[1]) == 22
    assert formats.bed_voxels(2 * UKB_SPACING[1]) == 11
    vol, _ = make_volume()
    plain = formats.projection(vol)
    n_bed = formats.bed_voxels(SPACING[1])
    vol.water[:, -n_bed:, :] = 5000.0  # a bright bed inside the crop: no effect
    np.testing.assert_array_equal(formats.projection(vol), plain)
    vol.water[:, -n_bed - 1, :] = 5000.0  # one voxel in front of it: visible
    assert np.abs(formats.projection(vol).astype(int) - plain).max() > 10


def test_views_are_min_max_normalised():
    vol, _ = make_volume()
    img = formats.projection(vol)
    assert img.min() == 0 and img.max() == 255
    scaled = Volume(vol.water * 7.0, vol.fat * 0.1, vol.spacing, vol.affine)
    assert np.abs(formats.projection(scaled).astype(int) - img).max() <= 1


@pytest.mark.parametrize(("ff", "expected"), [(0.25, (127, 128)), (0.6, (255,)), (0.0, (0,)),
                                              (0.1, (51,))])
def test_fat_fraction_scale(ff, expected):
    total = 200.0
    vol, mask = make_volume(water_value=total * (1 - ff), fat_value=total * ff)
    vol.water[...] = np.where(mask, total * (1 - ff), 0).astype(np.float32)
    img = formats.fat_fraction_slices(vol, mask=mask)[0]
    inside = ndimage.binary_erosion(img > 0, iterations=3)  # away from resampled body edges
    body_pixels = img[inside] if ff > 0 else img
    assert set(np.unique(body_pixels).tolist()) <= set(expected)
    assert inside.mean() > 0.2 or ff == 0


def test_half_mass_index_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts = rng.integers(0, 50, size=rng.integers(1, 40))
        counts[rng.integers(len(counts))] += 1
        brute = next(i for i in range(len(counts)) if counts[: i + 1].sum() >= counts.sum() / 2)
        assert formats.half_mass_index(counts) == brute
    with pytest.raises(ValueError, match="empty"):
        formats.half_mass_index(np.zeros(5))


def test_centre_of_mass_slices_on_a_box():
    mask = np.zeros((40, 30, 20), bool)
    mask[4:34, 10:30, 2:18] = True  # A-P 10..29 -> 19; right half x 4..19 -> 11
    assert formats.centre_of_mass_slices(mask) == (19, 11)


def test_sagittal_slice_is_in_the_patients_right_half():
    """Right half (x < X/2) has FF 40 %, left half 10 %: the sagittal part shows 40 %."""
    vol, mask = make_volume()
    x = np.arange(SHAPE[0])[:, None, None]
    ff = np.where(x < SHAPE[0] // 2, 0.4, 0.1)
    vol.water[...] = np.where(mask, 100 * (1 - ff), 0)
    vol.fat[...] = np.where(mask, 100 * ff, 0)
    img = formats.fat_fraction_slices(vol, mask=mask)[0]
    cw = round(376 * SHAPE[0] / (SHAPE[0] + SHAPE[1] - formats.bed_voxels(SPACING[1])))
    sag = img[:, cw + 2:]
    assert np.median(sag[sag > 0]) == 204  # 0.4 / 0.5 * 255
    cor = img[:, : cw - 2]
    left_cols, right_cols = cor[:, : cw // 3], cor[:, -cw // 3:]
    assert np.median(left_cols[left_cols > 0]) == 204  # patient right on the image left
    assert np.median(right_cols[right_cols > 0]) == 51


def test_mimir_combines_projection_and_full_height_ff():
    vol, mask = make_volume(water_value=150, fat_value=50)
    out = formats.mimir(vol, mask=mask)
    np.testing.assert_array_equal(out[:2], formats.projection(vol))
    body = out[2][ndimage.binary_erosion(out[2] > 0, iterations=3)]
    assert body.size > 0.2 * out[2].size
    assert np.mean(np.abs(body.astype(int) - 128) <= 1) > 0.99  # FF 25 %; edges aside


def test_resize_is_exact_linear_interpolation():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(formats.resize(img, (3, 4)), img)
    up = formats.resize(np.array([[0.0, 10.0]]), (1, 4))
    np.testing.assert_allclose(up[0], [0.0, 2.5, 7.5, 10.0])
    ramp = np.tile(np.arange(100, dtype=np.float32), (5, 1))
    down = formats.resize(ramp, (5, 50))  # centres at 2i + 0.5
    np.testing.assert_allclose(down[0], np.arange(50) * 2 + 0.5, atol=1e-4)


def test_nan_is_reported_with_the_subject():
    vol, mask = make_volume()
    vol.fat[30, 20, 50] = np.nan
    with pytest.raises(ValueError, match="test.*NaN"):
        formats.projection(vol)


def test_thigh_slices_find_mid_thigh():
    """Two separate legs from z = 0 to 59, a trunk above: mid-thigh at about z = 30."""
    shape = (75, 58, 124)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    leg = lambda cx: ((x - cx) / 12.0) ** 2 + ((y - 25) / 12.0) ** 2 < 1  # noqa: E731
    trunk = ((x - 37) / 30.0) ** 2 + ((y - 25) / 18.0) ** 2 < 1
    mask = np.where(z < 60, leg(22) | leg(52), trunk)
    water = np.where(mask, 100.0, 0).astype(np.float32) + (z == 30) * mask * 50.0
    vol = Volume(water.astype(np.float32), np.zeros(shape, np.float32), SPACING,
                 lps_index_affine(SPACING))
    assert formats.crotch_index(mask) == (0, 60)
    out = formats.thigh_slices(vol, n_slices=15, size=(32, 48), mask=mask)
    assert out.shape == (15, 32, 48) and out.dtype == np.uint8
    means = out.reshape(15, -1).mean(axis=1)
    assert int(np.argmax(means)) == 7  # the marked slice z = 30 is the centre one
    with pytest.raises(ValueError, match="legs"):
        formats.thigh_slices(vol, mask=trunk.copy())


# ---------------------------------------------------------------------------------------------
# the same anatomy in different NIfTI orientations (needs biometry.data.volumes)

HAS_VOLUMES = importlib.util.find_spec("biometry.data.volumes") is not None
ST_SPACING = (8.0, 8.0, 8.0)


def _stations() -> list[Station]:
    """Six LPS stations (30 x 24 x 8 voxels, overlapping 2 slices) of an asymmetric body."""
    stations, top = [], 0.0
    nx, ny, nz, dz = 30, 24, 8, ST_SPACING[2]
    for k in range(6):
        origin = (0.5 * (nx - 1) * ST_SPACING[0], 0.5 * (ny - 1) * ST_SPACING[1], top - (nz - 0.5) * dz)
        aff = lps_index_affine((ST_SPACING[0], ST_SPACING[1], dz), origin)
        i, j, kk = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
        xr, yr, zr = (aff[a, 0] * i + aff[a, 1] * j + aff[a, 2] * kk + aff[a, 3] for a in range(3))
        body = np.hypot(xr / 90.0, (yr - 10) / 60.0) < 1
        blob = np.hypot(np.hypot(xr + 50, yr - 20), (zr + 150) / 2) < 25  # RAS x < 0: left
        total = body * (300.0 + 400.0 * blob + 20.0 * np.cos(zr / 70))  # air = 0
        ff = 0.15 + 0.2 * (xr > 0)
        stations.append(Station(k + 1, (total * (1 - ff)).astype(np.float32),
                                (total * ff).astype(np.float32), aff))
        top -= (nz - 2) * dz
    return stations


def _reoriented(st: Station, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Station:
    aff, w, f = st.affine.copy(), st.water, st.fat
    for ax, flip in enumerate(flips):
        if flip:
            aff[:3, 3] += aff[:3, ax] * (w.shape[ax] - 1)
            aff[:3, ax] *= -1
            w, f = np.flip(w, ax), np.flip(f, ax)
    aff[:3, :3] = aff[:3, list(perm)]
    return Station(st.index, np.ascontiguousarray(w.transpose(perm)),
                   np.ascontiguousarray(f.transpose(perm)), aff)


@pytest.mark.skipif(not HAS_VOLUMES, reason="biometry.data.volumes not available yet")
@pytest.mark.parametrize("variant", ["RAS", "LPS", "permuted", "int16-scl_slope"])
def test_projection_is_orientation_invariant(tmp_path, variant):
    from biometry.data.volumes import body_mask, load_subject, save_stations

    base = _stations()
    save_stations(base, tmp_path / "ref")
    ref_vol = load_subject(tmp_path / "ref", spacing=ST_SPACING)
    ref = formats.compute(ref_vol, ["projection", "mimir"], mask=body_mask(ref_vol))
    dtype = None
    if variant == "RAS":
        stations = [_reoriented(s, (0, 1, 2), (True, True, False)) for s in base]
    elif variant == "LPS":
        stations = base
    elif variant == "permuted":
        stations = [_reoriented(s, (2, 0, 1), (False, True, True)) for s in base]
    else:
        stations, dtype = [_reoriented(s, (1, 0, 2), (True, False, False)) for s in base], np.int16
    save_stations(stations, tmp_path / variant, dtype=dtype)
    vol = load_subject(tmp_path / variant, spacing=ST_SPACING)
    out = formats.compute(vol, ["projection", "mimir"], mask=body_mask(vol))
    for name in out:
        diff = np.abs(out[name].astype(int) - ref[name].astype(int))
        assert diff.max() <= 1, f"{name} differs by {diff.max()} grey levels ({variant})"
    # the left blob (RAS x < 0 = patient left) lands on the image right of the coronal view
    cw = coronal_width(vol.shape[0], vol.shape[1], ST_SPACING[1])
    col = np.argmax(out["projection"][0][:, :cw].max(axis=0))
    assert col > cw / 2


def test_coarse_body_mask_gives_the_same_slice_positions():
    """The formats' 4.5 mm in-plane mask puts the fat-fraction slices where the full mask does."""
    from biometry.data.formats import centre_of_mass_slices
    from biometry.data.types import Volume, lps_index_affine
    from biometry.data.volumes import body_mask

    x, y, z = np.meshgrid(np.arange(120), np.arange(90), np.arange(40), indexing="ij")
    body = ((x - 55) / 45.0) ** 2 + ((y - 40) / 30.0) ** 2 < 1  # off-centre, asymmetric
    body |= ((x - 95) / 12.0) ** 2 + ((y - 60) / 10.0) ** 2 < 1
    rng = np.random.default_rng(0)
    water = (body * 100.0 + rng.normal(0, 3, body.shape)).astype(np.float32)
    fat = (body * 40.0 + rng.normal(0, 3, body.shape)).astype(np.float32)
    spacing = (2.232, 2.232, 3.0)
    vol = Volume(water, fat, spacing, lps_index_affine(spacing))
    full = body_mask(vol)
    coarse = body_mask(vol, max_inplane_mm=4.5)
    assert coarse.shape == full.shape
    dice = 2 * (full & coarse).sum() / (full.sum() + coarse.sum())
    assert dice > 0.97
    (yc_f, xs_f), (yc_c, xs_c) = centre_of_mass_slices(full), centre_of_mass_slices(coarse)
    assert abs(yc_f - yc_c) <= 1 and abs(xs_f - xs_c) <= 1
