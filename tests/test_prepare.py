"""``biometry prepare`` on tiny synthetic subjects, good and bad: QC rows, exit status, resume."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biometry.data import prepare as prep
from biometry.data.store import Store
from biometry.data.types import Station, lps_index_affine

pytest.importorskip("biometry.data.volumes")

SPACING = (8.0, 8.0, 8.0)
SPACING_ARGS = ["--spacing", "8", "8", "8"]


def stations(seed: int) -> list[Station]:
    """Six overlapping LPS stations (24 x 20 x 7 voxels at 8 mm) of a noisy elliptic body."""
    rng = np.random.default_rng(seed)
    out, top = [], 0.0
    nx, ny, nz = 24, 20, 7
    for k in range(6):
        origin = (0.5 * (nx - 1) * 8.0, 0.5 * (ny - 1) * 8.0, top - (nz - 0.5) * 8.0)
        aff = lps_index_affine(SPACING, origin)
        i, j, _k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
        body = np.hypot((i - 11.5) / 9.0, (j - 8) / 6.0) < 1
        total = body * (300.0 + rng.normal(0, 5, body.shape))
        out.append(Station(k + 1, (0.8 * total).astype(np.float32),
                           (0.2 * total).astype(np.float32), aff))
        top -= (nz - 2) * 8.0
    return out


def write_subject(root: Path, eid: str, seed: int) -> Path:
    from biometry.data.volumes import save_stations

    return save_stations(stations(seed), root / eid)


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Three good subjects and three bad ones (truncated file, missing station, NaNs)."""
    from biometry.data.volumes import save_nifti, station_path

    root = tmp_path / "in"
    for k, eid in enumerate(["1000001", "1000002", "1000003"]):
        write_subject(root, eid, k)
    bad = write_subject(root, "2000001", 7)
    f = station_path(bad, 2, "fat")
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    bad = write_subject(root, "2000002", 8)
    station_path(bad, 3, "water").unlink()
    bad = write_subject(root, "2000003", 9)
    st = stations(9)[3]
    water = st.water.copy()
    water[3, 3, 3] = np.nan
    save_nifti(station_path(bad, 4, "water"), water, st.affine)
    return root


def test_bad_subjects_get_qc_rows_and_the_rest_completes(cohort, tmp_path, capsys):
    out = tmp_path / "store"
    rc = prep.main(["--input", str(cohort), "--out", str(out), "--no-progress", "--chunk-size", "2",
                    *SPACING_ARGS])
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 prepared" in err and "3 failed" in err
    st = Store.open(out)
    assert sorted(st.eids) == ["1000001", "1000002", "1000003"]
    assert set(st.formats) == set(prep.DEFAULT_FORMATS)
    for name in prep.DEFAULT_FORMATS:
        arr = st.load(name)
        assert arr.shape[0] == 3 and arr.dtype == np.uint8 and arr.max() > 0
    qc = st.qc.set_index("eid")
    assert (qc.loc[["1000001", "1000002", "1000003"], "status"] == "ok").all()
    errors = qc.loc[["2000001", "2000002", "2000003"], "error"]
    assert (qc.loc[errors.index, "status"] == "failed").all()
    assert "station_2_fat.nii.gz" in errors["2000001"]
    assert "station_3_water.nii.gz" in errors["2000002"] and "missing" in errors["2000002"]
    assert "NaN" in errors["2000003"]


def test_rerun_skips_done_subjects_and_appends_new_ones(cohort, tmp_path):
    out = tmp_path / "store"
    first = prep.prepare(cohort, out, progress=False, spacing=SPACING)
    assert (first.n_done, first.n_skipped, len(first.failed)) == (3, 0, 3)
    parts = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.npy")}
    write_subject(cohort, "1000004", 4)
    second = prep.prepare(cohort, out, progress=False, spacing=SPACING)
    assert (second.n_done, second.n_skipped, len(second.failed)) == (1, 6, 3)
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # nothing rewritten
    st = Store.open(out)
    assert st.eids == ["1000001", "1000002", "1000003", "1000004"]
    # a repaired subject is redone on request
    write_subject(cohort, "2000002", 8)
    third = prep.prepare(cohort, out, progress=False, spacing=SPACING, retry_failed=True)
    assert third.n_done == 1 and sorted(third.failed["eid"]) == ["2000001", "2000003"]
    assert Store.open(out).qc.set_index("eid").loc["2000002", "status"] == "ok"


def test_a_store_keeps_the_grid_it_was_prepared_on(cohort, tmp_path, capsys):
    """The images of one store share one fused grid (a network sees millimetres as pixels): the
    first preparation records it, another grid is refused with one line naming the store and
    both grids, and nothing of the store is touched."""
    out = tmp_path / "store"
    prep.prepare(cohort, out, progress=False, spacing=SPACING)
    assert Store.open(out).grid_mm == SPACING
    before = {f.name: f.read_bytes() for f in out.glob("*.*")}
    rc = prep.main(["--input", str(cohort), "--out", str(out), "--no-progress",
                    "--spacing", "8", "8", "10"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{out}: prepared on the fused grid 8 x 8 x 8 mm, not 8 x 8 x 10 mm" in err
    assert {f.name: f.read_bytes() for f in out.glob("*.*")} == before
    # the same grid goes on as before, and is the default on resume (like the formats)
    assert prep.prepare(cohort, out, progress=False, spacing=SPACING).n_done == 0
    assert prep.prepare(cohort, out, progress=False).n_done == 0
    # a grid as the messages print it (six digits) is the same grid
    ukb = Store.create(tmp_path / "ukb", ["projection"])
    ukb.check_grid((2.232142857, 2.232142857, 3.0))
    Store.open(tmp_path / "ukb").check_grid((2.23214, 2.23214, 3))
    # a phantom cohort's zip/ and nifti/ folders have its grid
    (tmp_path / "ph" / "zip").mkdir(parents=True)
    (tmp_path / "ph" / "cohort.json").write_text('{"fused_grid": {"spacing_mm": [7, 7, 10]}}')
    assert prep.phantom_spacing(tmp_path / "ph" / "zip") == (7.0, 7.0, 10.0)


def test_a_subject_whose_files_changed_is_never_reused(cohort, tmp_path, capsys):
    import os
    import shutil

    out = tmp_path / "store"
    prep.prepare(cohort, out, progress=False, spacing=SPACING)
    index = (out / "subjects.csv").read_bytes()
    # the same files copied elsewhere (new paths, new times), one touched, a stray file beside
    # the stations: nothing redone; the contents decided, and the new times are recorded
    copy = tmp_path / "copy"
    shutil.copytree(cohort, copy, copy_function=shutil.copy)
    some = sorted((copy / "1000001").iterdir())[0]
    os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns + 10**9))
    (copy / "1000003" / "notes.txt").write_text("scanned twice")
    again = prep.prepare(copy, out, progress=False, spacing=SPACING)
    assert (again.n_done, again.n_skipped) == (0, 6)
    copied = prep.Subject("1000001", str(copy / "1000001"), "nifti")
    recorded = Store.open(out).qc.set_index("eid").loc["1000001", "source_stat"]
    assert recorded == prep.source_fingerprint(copied)["source_stat"]
    # a failed subject whose files were mended is tried again without --retry-failed
    write_subject(cohort, "2000002", 8)
    mended = prep.prepare(cohort, out, progress=False, spacing=SPACING)
    assert mended.n_done == 1 and sorted(mended.failed["eid"]) == ["2000001", "2000003"]
    index = (out / "subjects.csv").read_bytes()
    # a stored subject whose images changed: refused before any work, naming store and subject
    write_subject(cohort, "1000002", 5)
    with pytest.raises(prep.SourceChanged, match=r"1 subject\(s\) there were prepared from other"):
        prep.prepare(cohort, out, progress=False, spacing=SPACING)
    rc = prep.main(["--input", str(cohort), "--out", str(out), "--no-progress", *SPACING_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "1000002" in err[0] and str(out) in err[0], err
    assert (out / "subjects.csv").read_bytes() == index  # the store as it was
    # a new store folder takes the changed input
    fresh = prep.prepare(cohort, tmp_path / "new", progress=False, spacing=SPACING)
    assert fresh.n_done == 4
    # a store written before fingerprints were recorded is trusted as it is
    qc = pd.read_csv(out / "qc.csv", dtype=str).drop(columns=["source_stat", "source_sha256"])
    qc.to_csv(out / "qc.csv", index=False)
    legacy = prep.prepare(cohort, out, progress=False, spacing=SPACING)
    assert legacy.n_done == 0


def test_same_result_as_direct_computation(cohort, tmp_path):
    from biometry.data import formats
    from biometry.data.volumes import load_subject

    out = tmp_path / "store"
    prep.prepare(cohort, out, formats=["projection", "mimir"], progress=False, spacing=SPACING)
    st = Store.open(out)
    vol = load_subject(cohort / "1000002", spacing=SPACING)
    expected = formats.compute(vol, ["projection", "mimir"])
    row = int(st.rows(["1000002"])[0])
    for name in ("projection", "mimir"):
        np.testing.assert_array_equal(st.array(name)[row], expected[name])
    # an existing store keeps its formats; asking for others is a usage error
    rc = prep.main(["--input", str(cohort), "--out", str(out), "--formats", "projection",
                    "--no-progress"])
    assert rc == 2


def test_find_subjects_layouts(tmp_path):
    (tmp_path / "zips").mkdir()
    for name in ["1234567_20201_2_0.zip", "1234567_20201_3_0.zip", "7654321_20201_2_0.zip",
                 "notes.zip"]:
        (tmp_path / "zips" / name).write_bytes(b"")
    found = prep.find_subjects(tmp_path / "zips")
    assert [(s.eid, s.kind) for s in found] == [("1234567", "zip"), ("1234567-3", "zip"),
                                                 ("7654321", "zip")]
    root = tmp_path / "phantom"
    (root / "nifti" / "11").mkdir(parents=True)
    (root / "nifti" / "11" / "station_1_water.nii.gz").write_bytes(gzip.compress(b""))
    assert [s.eid for s in prep.find_subjects(root)] == ["11"]
    with pytest.raises(ValueError, match="no subjects"):
        prep.find_subjects(tmp_path / "zips" / "..")
    with pytest.raises(FileNotFoundError):
        prep.find_subjects(tmp_path / "missing")


def test_a_zip_not_named_as_ukb_names_them_is_said_to_be_skipped(tmp_path, capsys):
    (tmp_path / "1234567_20201_2_0.zip").write_bytes(b"")
    (tmp_path / "1234568.zip").write_bytes(b"")
    assert [s.eid for s in prep.find_subjects(tmp_path)] == ["1234567"]
    err = capsys.readouterr().err
    assert "1 zip file(s) skipped, not named <eid>_20201_<instance>_0.zip: 1234568.zip" in err


def test_cli_usage_errors(tmp_path, capsys):
    assert prep.main(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--formats",
                      "nope"]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert prep.main(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_store(cohort, tmp_path):
    serial = prep.prepare(cohort, tmp_path / "serial", progress=False, spacing=SPACING)
    parallel = prep.prepare(cohort, tmp_path / "dask", workers=2, chunk_size=2, progress=False,
                            spacing=SPACING)
    assert (parallel.n_done, len(parallel.failed)) == (serial.n_done, len(serial.failed))
    a, b = Store.open(tmp_path / "serial"), Store.open(tmp_path / "dask")
    rows_b = b.rows(a.eids)
    for name in prep.DEFAULT_FORMATS:
        np.testing.assert_array_equal(a.load(name), b.load(name)[rows_b])
    pd.testing.assert_series_equal(a.failed().set_index("eid")["stage"].sort_index(),
                                   b.failed().set_index("eid")["stage"].sort_index())


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_input(cohort, tmp_path):
    from biometry.config.paths import notebooks_dir
    from biometry.runs.notebook import execute_notebook

    out = tmp_path / "store"
    execute_notebook(notebooks_dir() / "01_prepare.ipynb", tmp_path / "run" / "01_prepare.ipynb",
                     parameters={"input_dir": str(cohort), "out_dir": str(out),
                                 "formats": ["projection", "fat_fraction_slices", "mimir"],
                                 "workers": 1, "spacing": list(SPACING)},
                     cwd=tmp_path)
    st = Store.open(out)
    assert len(st) == 3 and len(st.failed()) == 3


def test_ukb_zips_are_prepared_like_nifti(tmp_path):
    """A zip gives the same arrays as its stations in NIfTI (to a grey level); a zip without a
    water series gets a QC row naming it."""
    import zipfile

    ingest = pytest.importorskip("biometry.data.ingest")
    from biometry.data import formats
    from biometry.data.volumes import fuse

    zips = tmp_path / "zips"
    ingest.write_ukb_zip(stations(0), "3000001", zips, add_noise_series=True)
    ingest.write_ukb_zip(stations(1), "3000002", zips, instance=3, add_noise_series=False)
    good = zips / "3000001_20201_2_0.zip"
    bad = zips / "3000003_20201_2_0.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if b"_W" not in data:  # drop every water slice (and the manifest rows naming them)
                dst.writestr(item, data)
    result = prep.prepare(zips, tmp_path / "store", formats=["projection"], progress=False,
                          spacing=SPACING)
    assert result.n_done == 2 and result.failed["eid"].tolist() == ["3000003"]
    assert "water" in result.failed["error"].item() and bad.name in result.failed["error"].item()
    st = Store.open(tmp_path / "store")
    assert st.eids == ["3000001", "3000002-3"]
    direct = formats.projection(fuse(stations(0), SPACING))
    assert np.abs(st.array("projection")[0].astype(int) - direct).max() <= 1
