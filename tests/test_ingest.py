"""UKB field-20201 zips: write from stations, read back, convert to NIfTI, fuse."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from biometry.data.ingest import InputError, eid_from_zip, read_ukb_zip, write_ukb_zip, zip_to_nifti
from biometry.data.types import Station
from biometry.data.volumes import fuse, load_subject, save_stations
from test_volumes import SPACING, make_stations, reorient


@pytest.fixture(scope="module")
def stations() -> list[Station]:
    # small and noisy, stored in RAS order, so the writer must reorient to DICOM's LPS
    return [reorient(s, (0, 1, 2), (True, True, False))
            for s in make_stations(seed=5, noise=2.0, nx=24, ny=18)]


@pytest.fixture(scope="module")
def ukb_zip(tmp_path_factory, stations) -> Path:
    out = tmp_path_factory.mktemp("zips")
    return write_ukb_zip(stations, "1234567", out, add_noise_series=True, repeat_station=4,
                         seed=1)


def test_zip_layout(ukb_zip, stations):
    assert ukb_zip.name == "1234567_20201_2_0.zip"
    assert eid_from_zip(ukb_zip) == "1234567"
    with zipfile.ZipFile(ukb_zip) as zf:
        names = zf.namelist()
        assert "manifest.cvs" in names
        dcm = [n for n in names if n.endswith(".dcm")]
        n_slices = sum(s.water.shape[2] for s in stations)
        n_repeat = stations[3].water.shape[2]
        assert len(dcm) == 4 * (n_slices + n_repeat)      # W, F, in, opp; station 4 twice
        ds = pydicom.dcmread(io.BytesIO(zf.read(dcm[0])))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.pixel_array.dtype in (np.uint16, np.int16)
    assert ds.SeriesDescription.rsplit("_", 1)[-1] in {"W", "F", "in", "opp"}


def test_read_zip_recovers_stations(ukb_zip, stations):
    read = read_ukb_zip(ukb_zip)
    assert [s.index for s in read] == [1, 2, 3, 4, 5, 6]
    fused_orig = fuse(stations, SPACING)
    fused_read = fuse(read, SPACING)
    np.testing.assert_allclose(fused_read.affine, fused_orig.affine, atol=1e-4)
    peak = max(float(s.water.max()) for s in stations)
    # uint16 quantisation with one slope per station (max / 65000), times the fusion scales
    assert np.abs(fused_read.water - fused_orig.water).max() < 3 * peak / 65000
    assert read[3].meta["dropped_repeats"], "the earlier acquisition of station 4 was dropped"
    assert read[0].affine[2, 3] > read[5].affine[2, 3]   # station 1 is the head


def test_zip_roundtrip_equals_nifti_route(tmp_path, ukb_zip, stations):
    """stations -> zip -> NIfTI -> load_subject == stations -> NIfTI -> load_subject."""
    via_zip = zip_to_nifti(ukb_zip, tmp_path / "from_zip")
    assert via_zip == tmp_path / "from_zip" / "1234567"
    assert sorted(p.name for p in via_zip.iterdir())[:2] == ["station_1_fat.nii.gz",
                                                             "station_1_water.nii.gz"]
    direct = save_stations(stations, tmp_path / "direct" / "1234567", dtype=np.int16)
    a = load_subject(via_zip, SPACING)
    b = load_subject(direct, SPACING)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    peak = max(float(s.water.max()) for s in stations) * 1.3
    tol = 2 * peak / 32767 + peak / 65000        # two int16 roundings and one uint16
    assert np.abs(a.water - b.water).max() < tol
    assert np.abs(a.fat - b.fat).max() < tol


def _rewrite(src: Path, dst: Path, keep) -> Path:
    """Copy a zip, keeping only members for which keep(name, bytes) is true (or new bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            res = keep(name, data)
            if res is True:
                zout.writestr(name, data)
            elif isinstance(res, bytes):
                zout.writestr(name, res)
    return dst


def _description(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SeriesDescription)


def test_zip_without_water_fails_clearly(tmp_path, ukb_zip):
    bad = _rewrite(ukb_zip, tmp_path / "7654321_20201_2_0.zip",
                   lambda n, d: n.startswith("manifest") or not _description(d).endswith("_W"))
    with pytest.raises(InputError, match=r"7654321_20201_2_0\.zip.*no water series"):
        read_ukb_zip(bad)


def test_zip_without_manifest_still_reads(tmp_path, ukb_zip, stations):
    bad = _rewrite(ukb_zip, tmp_path / "1_20201_2_0.zip", lambda n, d: "manifest" not in n)
    assert len(read_ukb_zip(bad)) == len(stations)


def test_lying_manifest_is_not_trusted(tmp_path, ukb_zip, stations):
    """A manifest that labels every file as in-phase does not hide the water and fat series."""
    def lie(name, data):
        if "manifest" in name:
            text = data.decode()
            for suffix in ("_W", "_F"):
                text = text.replace(suffix + ",", "_in,").replace(suffix + "\n", "_in\n")
            return text.encode()
        return True

    bad = _rewrite(ukb_zip, tmp_path / "2_20201_2_0.zip", lie)
    assert len(read_ukb_zip(bad)) == len(stations)


def test_water_fat_position_mismatch_fails(tmp_path, stations):
    moved = [Station(s.index, s.water, s.fat, s.affine) for s in stations]
    path = write_ukb_zip(moved, "42", tmp_path, add_noise_series=False)

    def shift_fat(name, data):
        if not name.endswith(".dcm"):
            return True
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.SeriesDescription.endswith("_F") and int(ds.SeriesNumber) == 2:
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [f"{pos[0] + 7.0:.6f}", f"{pos[1]:.6f}", f"{pos[2]:.6f}"]
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            return buf.getvalue()
        return True

    bad = _rewrite(path, tmp_path / "42_20201_2_0_bad.zip", shift_fat)
    with pytest.raises(InputError, match=r"42_20201_2_0_bad\.zip.*disagree in position"):
        read_ukb_zip(bad)


def test_unreadable_dicom_fails_clearly(tmp_path, ukb_zip):
    def corrupt(name, data):
        if name.endswith(".dcm") and _description(data).endswith("_W"):
            return data[:300]
        return True

    bad = _rewrite(ukb_zip, tmp_path / "9_20201_2_0.zip", corrupt)
    with pytest.raises(InputError, match=r"9_20201_2_0\.zip.*DICOM"):
        read_ukb_zip(bad)


def test_phantom_zip_route(tmp_path):
    """A phantom subject written as a UKB zip fuses like its stations written as NIfTI."""
    cohort = pytest.importorskip("biometry.phantom.cohort")
    subject = cohort.make_subject("1000002", 11, scale=0.2)
    zip_path = write_ukb_zip(subject.stations, subject.eid, tmp_path, instance=3,
                             add_noise_series=False, repeat_station=2, seed=4)
    assert zip_path.name == "1000002_20201_3_0.zip"
    a = load_subject(zip_to_nifti(zip_path, tmp_path / "nifti"), subject.grid.spacing)
    b = fuse(subject.stations, subject.grid.spacing)
    np.testing.assert_allclose(a.affine, subject.labels_affine, atol=1e-3)
    peak = max(float(s.water.max()) for s in subject.stations) * 2
    assert np.abs(a.water - b.water).max() < 3 * peak / 32767
    assert np.abs(a.fat - b.fat).max() < 3 * peak / 32767


def _slice(pixels: np.ndarray, *, bits_stored: int, signed: bool, syntax=None) -> pydicom.Dataset:
    """A minimal single-frame greyscale slice holding ``pixels``' bytes as stored."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


@pytest.mark.parametrize(("dtype", "bits_stored"), [
    ("u2", 16), ("u2", 12), ("i2", 16), ("i2", 12), ("u1", 8), ("u1", 6), ("i4", 20)])
def test_stored_values_are_what_pydicom_decodes(dtype, bits_stored, monkeypatch):
    """The fast path for uncompressed slices gives pydicom's values bit for bit, including bits
    beyond BitsStored (garbage in the high bits: masked when unsigned, sign-extended when
    signed); a layout it does not take (big-endian) goes through pydicom."""
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    from biometry.data.ingest import stored_values

    dt = np.dtype(dtype)
    rng = np.random.default_rng(3)
    info = np.iinfo(dt)
    raw = rng.integers(info.min, info.max, size=(7, 5), endpoint=True, dtype=dt)
    for syntax in (None, ImplicitVRLittleEndian):
        ds = _slice(raw, bits_stored=bits_stored, signed=dt.kind == "i", syntax=syntax)
        slow = ds.pixel_array
        with monkeypatch.context() as m:  # the fast path must not fall back to pydicom here
            m.setattr(pydicom.Dataset, "pixel_array", property(lambda _: 1 / 0))
            fast = stored_values(ds)
        assert fast.dtype == slow.dtype and np.array_equal(fast, slow)
    if bits_stored < dt.itemsize * 8:  # the high bits were garbage and do not survive
        assert not np.array_equal(fast, raw)
    big = _slice(raw, bits_stored=bits_stored, signed=dt.kind == "i")
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    big.PixelData = raw.astype(dt.newbyteorder(">")).tobytes()
    assert np.array_equal(stored_values(big), big.pixel_array)
