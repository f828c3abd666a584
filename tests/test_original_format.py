"""The original-compatible MIMIR input (``mimir_original``): its pinned differences from ``mimir``."""

from __future__ import annotations

import numpy as np

from biometry.data import formats
from biometry.data.prepare import Subject, prepare_subject
from biometry.data.types import UKB_SPACING, Volume, lps_index_affine
from biometry.phantom import generate_cohort

SPACING = (3 * UKB_SPACING[0], 3 * UKB_SPACING[1], 3.0)  # 3 mm slices: the trim is 4 slices
SHAPE = (60, 50, 100)


def _volume(fat_value: float = 50.0, water_value: float = 150.0) -> tuple[Volume, np.ndarray]:
    """A box body with FF 25 % (-> 127.5 on the 0-50 % scale) and a bright top and bottom slab."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    body = (np.abs(x - 30) < 20) & (np.abs(y - 20) < 12)
    water = np.where(body, water_value, 0.0).astype(np.float32)
    fat = np.where(body, fat_value, 0.0).astype(np.float32)
    for sl in (slice(0, 4), slice(SHAPE[2] - 4, SHAPE[2])):  # inside the trimmed 12 mm
        water[..., sl] *= 5
        fat[..., sl] *= 5
    return Volume(water, fat, SPACING, lps_index_affine(SPACING), eid="orig"), body


def test_original_trims_four_slices_and_truncates():
    vol, mask = _volume()
    ours = formats.mimir(vol, mask=mask)
    orig = formats.mimir_original(vol, mask=mask)
    assert orig.shape == ours.shape == (3, 256, 256) and orig.dtype == np.uint8
    # ours sees the bright end slabs: they take the maximum and the body sits well below 255;
    # the original trimmed them away, so its body is at the top of the scale
    body = ours[0] > 0
    assert np.median(ours[0][body]) < 100
    assert np.median(orig[0][orig[0] > 0]) == 255
    # fat fraction 25 % = 127.5 of 255: ours rounds to 128, the original truncates to 127
    ff_ours, ff_orig = ours[2][ours[2] > 0], orig[2][orig[2] > 0]
    assert np.median(ff_ours) == 128 and np.median(ff_orig) == 127


def test_original_slice_positions_are_one_after_the_half_mass_slice():
    """A slice-dependent fat fraction shows which A-P slice each format takes."""
    vol, mask = _volume()
    ff_by_y = np.linspace(0.05, 0.45, SHAPE[1]).astype(np.float32)[None, :, None]
    total = vol.water + vol.fat
    vol = Volume(total * (1 - ff_by_y), total * ff_by_y, vol.spacing, vol.affine, eid="orig")
    y_ours, _ = formats.centre_of_mass_slices(mask[:, : SHAPE[1] - formats.bed_voxels(SPACING[1])])
    ours = formats.mimir(vol, mask=mask)[2]
    orig = formats.mimir_original(vol, mask=mask)[2]
    cw = 60 * 256 // (60 + SHAPE[1] - formats.bed_voxels(SPACING[1]))  # coronal columns
    step = 0.4 / (SHAPE[1] - 1) / 0.5 * 255  # grey levels per A-P slice
    gap = np.median(orig[100:150, 10: cw - 10].astype(float)) - np.median(
        ours[100:150, 10: cw - 10].astype(float))
    assert 0.5 * step < gap < 1.5 * step, (gap, step, y_ours)


def test_prepare_fuses_without_intensity_levelling_for_the_original(tmp_path):
    assert formats.fuse_options("mimir_original") == {"correct_intensity": False}
    assert formats.fuse_options("mimir") == {}
    root = generate_cohort(tmp_path / "c", 1, 11, scale=0.2, progress=False)
    subject_dir = next((root / "nifti").iterdir())
    subject = Subject(subject_dir.name, str(subject_dir), "nifti")
    arrays, qc = prepare_subject(subject, ["mimir", "mimir_original"],
                                 spacing=(2.232142857 / 0.2, 2.232142857 / 0.2, 3.0 / 0.2))
    assert qc["status"] == "ok", qc
    # the phantom's stations differ in intensity scale: without levelling the water projection
    # shows steps that the levelled one does not have
    assert not np.array_equal(arrays["mimir"][0], arrays["mimir_original"][0])
    assert arrays["mimir_original"].shape == (3, 256, 256)
