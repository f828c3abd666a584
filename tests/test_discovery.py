"""Converter output (dcm2niix) as users have it: station discovery, repeats, errors (issue 15)."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from biometry.data import discovery, formats, ingest
from biometry.data import prepare as prep
from biometry.data.store import Store
from biometry.data.types import Station
from biometry.data.volumes import InputError, fuse, save_nifti, save_stations
from test_prepare import SPACING, stations


def write_series(folder: Path, number: int, description: str, array: np.ndarray,
                 affine: np.ndarray, time: str | None = None, sidecar: bool = True) -> Path:
    """One series as dcm2niix writes it with ``-f "%s_%d"``: NIfTI plus JSON sidecar."""
    path = folder / f"{number}_{description}.nii.gz"
    save_nifti(path, array, affine)
    if sidecar:
        meta = {"Modality": "MR", "SeriesDescription": description, "SeriesNumber": number}
        if time is not None:
            meta["AcquisitionTime"] = time
        path.with_name(f"{number}_{description}.json").write_text(json.dumps(meta))
    return path


def write_converted(folder: Path, sts: list[Station], *, repeat: int | None = None) -> Path:
    """A subject as converter output: series numbers in an order unrelated to position, in- and
    opposed-phase series to ignore, and optionally station ``repeat`` acquired twice, where the
    degraded copy has the *higher* series number but the *earlier* acquisition time."""
    folder.mkdir(parents=True)
    order = [3, 0, 5, 1, 4, 2]   # series numbering does not follow head-to-foot order
    for rank, k in enumerate(order):
        st = sts[k]
        prefix = "Dixon_BH_17s" if k in (1, 2) else "Dixon_noBH"
        n = 10 + 4 * rank
        time = f"10:{rank:02d}:00.000000"
        write_series(folder, n, f"{prefix}_in", st.water + st.fat, st.affine, time)
        write_series(folder, n + 1, f"{prefix}_opp", np.abs(st.water - st.fat), st.affine, time)
        write_series(folder, n + 2, f"{prefix}_W", st.water, st.affine, time)
        write_series(folder, n + 3, f"{prefix}_F", st.fat, st.affine, time)
        if k == repeat:
            bad_w, bad_f = 0.3 * st.water + 50, 0.3 * st.fat + 50
            write_series(folder, 90, f"{prefix}_W", bad_w, st.affine, "09:00:00.000000")
            write_series(folder, 91, f"{prefix}_F", bad_f, st.affine, "09:00:00.000000")
    return folder


def test_stations_found_by_description_and_ordered_by_position(tmp_path):
    sts = stations(0)
    folder = write_converted(tmp_path / "1000001", sts, repeat=3)
    pairs, dropped = discovery.find_stations(folder)
    assert len(pairs) == 6
    for k, (w, f) in enumerate(pairs):   # head to foot = the stations' own order, by the affine
        np.testing.assert_allclose(w.affine, sts[k].affine)
        assert (w.channel, f.channel) == ("water", "fat")
        assert w.description.endswith("_W") and f.description.endswith("_F")
    # the later acquisition wins although its series number is lower
    assert [s.path.name for s in dropped] == ["90_Dixon_noBH_W.nii.gz", "91_Dixon_noBH_F.nii.gz"]
    vol = discovery.load_converter_subject(folder, SPACING)
    direct = fuse(sts, SPACING)
    np.testing.assert_allclose(vol.water, direct.water, rtol=1e-5, atol=1e-3)
    assert vol.eid == "1000001" and "90_Dixon_noBH_W.nii.gz" in vol.meta["dropped_repeats"]


def test_description_from_file_name_and_time_from_nifti_without_sidecars(tmp_path):
    """No sidecars: the description comes from the file name, the acquisition time from the
    ``Time=HHMMSS`` that dcm2niix writes into the NIfTI description, and it beats the number."""
    import nibabel as nib

    def write(number, channel, array, affine, hms):
        img = nib.Nifti1Image(array, affine)
        img.header["descrip"] = f"TE=0;Time={hms}".encode()
        nib.save(img, folder / f"{number}_Dixon_noBH_{channel}.nii.gz")

    sts = stations(1)
    folder = tmp_path / "s"
    folder.mkdir()
    for k, st in enumerate(sts):
        write(2 * k + 1, "W", st.water, st.affine, f"1000{k:02d}.00")
        write(2 * k + 2, "F", st.fat, st.affine, f"1000{k:02d}.00")
    write(30, "W", 0.5 * sts[2].water, sts[2].affine, "090000.00")   # earlier, higher number
    write(31, "F", 0.5 * sts[2].fat, sts[2].affine, "090000.00")
    series = {s.number: s for s in discovery.series_files(folder)}
    assert sorted(series) == [*range(1, 13), 30, 31]
    assert series[30].time == 9 * 3600.0 and series[3].time == 10 * 3600.0 + 1
    pairs, dropped = discovery.find_stations(folder)
    assert [w.number for w, _ in pairs] == [1, 3, 5, 7, 9, 11]
    assert [s.number for s in dropped] == [30, 31]


def test_sidecar_acquisition_time_beats_series_number(tmp_path):
    st = stations(0)[0]
    folder = tmp_path / "s"
    folder.mkdir()
    write_series(folder, 5, "Dixon_noBH_W", st.water, st.affine, "10:02:0.000000")  # dcm2niix's
    write_series(folder, 6, "Dixon_noBH_F", st.fat, st.affine, "10:02:0.000000")
    write_series(folder, 7, "Dixon_noBH_W", st.water, st.affine, "10:01:59.5")
    write_series(folder, 8, "Dixon_noBH_F", st.fat, st.affine, "10:01:59.5")
    series = {s.number: s for s in discovery.series_files(folder)}
    assert series[5].time == 36120.0 and series[7].time == 36119.5
    pairs, dropped = discovery.find_stations(folder, n_stations=1)
    assert [(w.number, f.number) for w, f in pairs] == [(5, 6)]
    assert [s.number for s in dropped] == [7, 8]


@pytest.fixture
def converted_cohort(tmp_path) -> Path:
    """A good converted subject, a station_<k> subject, and three bad converted subjects."""
    root = tmp_path / "in"
    write_converted(root / "1000001", stations(0), repeat=3)
    save_stations(stations(1), root / "1000002")                 # the station_<k> layout
    bad = write_converted(root / "2000001", stations(2))
    fat = next(bad.glob("*_Dixon_BH_17s_F.nii.gz"))            # a water series loses its fat
    fat.unlink()
    fat.with_suffix("").with_suffix(".json").unlink()
    bad = write_converted(root / "2000002", stations(3))
    for p in bad.glob("2[2-5]_*"):                                # one station fewer (ranks 3)
        p.unlink()
    bad = write_converted(root / "2000003", stations(4))
    src = next(bad.glob("*_Dixon_noBH_W.nii.gz"))                # same series twice, other name
    shutil.copy(src, bad / src.name.replace("_W.nii.gz", "_Wa.nii.gz"))
    sidecar = json.loads(src.with_suffix("").with_suffix(".json").read_text())
    (bad / src.name.replace("_W.nii.gz", "_Wa.json")).write_text(json.dumps(sidecar))
    return root


def test_prepare_converter_output_with_clear_errors(converted_cohort, tmp_path):
    kinds = {s.eid: s.kind for s in prep.find_subjects(converted_cohort)}
    assert kinds == {"1000001": "converter", "1000002": "nifti", "2000001": "converter",
                     "2000002": "converter", "2000003": "converter"}
    result = prep.prepare(converted_cohort, tmp_path / "store", formats=["projection"],
                          progress=False, spacing=SPACING)
    assert result.n_done == 2
    errors = dict(zip(result.failed["eid"], result.failed["error"], strict=True))
    assert sorted(errors) == ["2000001", "2000002", "2000003"]
    for eid, error in errors.items():
        assert "\n" not in error and f"/{eid}:" in error, error
    assert "water series" in errors["2000001"] and "has no fat series" in errors["2000001"]
    assert "_Dixon_BH_17s_W.nii.gz" in errors["2000001"]
    assert "5 water/fat stations found, expected 6" in errors["2000002"]
    assert "neither acquisition time nor series number" in errors["2000003"]
    assert "_Dixon_noBH_W.nii.gz" in errors["2000003"] and "_Dixon_noBH_Wa.nii.gz" in errors[
        "2000003"]
    store = Store.open(tmp_path / "store")
    for eid, seed in (("1000001", 0), ("1000002", 1)):
        direct = formats.projection(fuse(stations(seed), SPACING))
        got = store.array("projection")[store.rows([eid])[0]].astype(int)
        assert np.abs(got - direct).max() <= 1, eid
    qc = store.qc.set_index("eid")
    assert qc.loc["1000001", "dropped_repeats"] == ("90_Dixon_noBH_W.nii.gz; "
                                                    "91_Dixon_noBH_F.nii.gz")


def test_unrecognised_series_and_bad_sidecar_are_named(tmp_path):
    folder = tmp_path / "3000001"
    folder.mkdir()
    st = stations(0)[0]
    write_series(folder, 1, "localizer", st.water, st.affine)
    with pytest.raises(InputError, match=r"3000001: no water/fat series among 1 NIfTI files"):
        discovery.find_stations(folder)
    path = write_series(folder, 2, "Dixon_noBH_W", st.water, st.affine)
    path.with_name("2_Dixon_noBH_W.json").write_text("{not json")
    with pytest.raises(InputError, match=r"2_Dixon_noBH_W.json: unreadable JSON sidecar"):
        discovery.find_stations(folder)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dcm2niix") is None,
                    reason="dcm2niix is not installed (Debian package dcm2niix; .ci/run installs it)")
def test_dcm2niix_output_is_prepared_like_the_zips(tmp_path):
    """Phantom subjects written as UKB zips (one with a repeated station), unpacked and converted
    with dcm2niix exactly as docs/data_pipeline.md says, give the zips' projections to a grey
    level."""
    from biometry.phantom import cohort

    eids = ["1000001", "1000002", "1000003"]
    for k, eid in enumerate(eids):
        subject = cohort.make_subject(eid, 10 + k, 0.15)
        ingest.write_ukb_zip(subject.stations, eid, tmp_path / "zips", seed=k,
                             repeat_station=3 if k == 1 else None)
        dicom, out = tmp_path / "dicom" / eid, tmp_path / "converted" / eid
        with zipfile.ZipFile(tmp_path / "zips" / f"{eid}_20201_2_0.zip") as zf:
            zf.extractall(dicom)
        out.mkdir(parents=True)
        subprocess.run(["dcm2niix", "-z", "y", "-f", "%s_%d", "-o", str(out), str(dicom)],
                       check=True, capture_output=True)
    spacing = (14.88, 14.88, 20.0)
    fmts = ["projection", "fat_fraction_slices"]
    by_zip = prep.prepare(tmp_path / "zips", tmp_path / "from_zips", formats=fmts,
                          progress=False, spacing=spacing)
    by_conv = prep.prepare(tmp_path / "converted", tmp_path / "from_converted", formats=fmts,
                           progress=False, spacing=spacing)
    assert by_zip.n_done == by_conv.n_done == 3 and by_conv.ok
    a, b = Store.open(tmp_path / "from_zips"), Store.open(tmp_path / "from_converted")
    for name in fmts:
        diff = np.abs(a.load(name).astype(int) - b.load(name)[b.rows(a.eids)].astype(int))
        assert diff.max() <= 1, (name, diff.max(axis=(1, 2, 3)))
    qc = b.qc.set_index("eid")["dropped_repeats"].fillna("")
    assert qc["1000001"] == qc["1000003"] == ""
    dropped = qc["1000002"].split("; ")
    assert len(dropped) == 2 and dropped[0].endswith("_W.nii.gz") and dropped[1].endswith(
        "_F.nii.gz")
    # the zip reader dropped the same two series
    zq = a.qc.set_index("eid")["dropped_repeats"]
    assert zq["1000002"] == "; ".join(f"series {n.split('_')[0]}" for n in dropped)


def test_partner_errors_name_both_files(tmp_path):
    st = stations(0)[0]
    folder = tmp_path / "3000002"
    folder.mkdir()
    write_series(folder, 1, "Dixon_noBH_W", st.water, st.affine)
    shifted = st.affine.copy()
    shifted[0, 3] += 8.0                       # same slab, in-plane origin one voxel off
    write_series(folder, 2, "Dixon_noBH_F", st.fat, shifted)
    with pytest.raises(InputError, match=r"3000002: water series 1_Dixon_noBH_W.nii.gz and fat "
                                          r"series 2_Dixon_noBH_F.nii.gz differ"):
        discovery.find_stations(folder, n_stations=1)
    (folder / "1_Dixon_noBH_W.nii.gz").unlink()
    with pytest.raises(InputError, match=r"3000002: fat series 2_Dixon_noBH_F.nii.gz has no water"):
        discovery.find_stations(folder, n_stations=1)
