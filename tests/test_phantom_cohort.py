"""Phantom cohort on disk: layout contract, exact atlas fields, byte determinism, kill safety,
CLI errors and the cohort notebook."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from biometry.config import fields
from biometry.config.paths import notebooks_dir
from biometry.config.population import POPULATION
from biometry.phantom import LABELS, cohort_eids, field_columns, generate_cohort, writer
from biometry.phantom import main as synth_main
from biometry.phantom.cohort import sample_fields
from biometry.runs.notebook import execute_notebook

SEED, SCALE, N = 7, 0.2, 3


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("phantom") / "c", N, SEED, scale=SCALE,
                           progress=False)


def test_layout(cohort):
    eids = cohort_eids(N, SEED)
    assert sorted(p.name for p in (cohort / "nifti").iterdir()) == sorted(eids)
    assert all(len(e) == 7 and e.isdigit() for e in eids)
    eid = eids[0]
    names = sorted(p.name for p in (cohort / "nifti" / eid).iterdir())
    assert names == sorted(f"station_{k}_{kind}.nii.gz" for k in range(1, 7)
                           for kind in ("water", "fat"))
    affines, dz = [], []
    for k in range(1, 7):
        w = nib.load(cohort / "nifti" / eid / f"station_{k}_water.nii.gz")
        f = nib.load(cohort / "nifti" / eid / f"station_{k}_fat.nii.gz")
        assert np.allclose(w.affine, f.affine) and w.shape == f.shape
        assert w.get_data_dtype() == np.int16 and w.dataobj.slope != 1.0   # scaled integers
        assert w.shape[:2] == (round(224 * SCALE), round(174 * SCALE))
        assert nib.aff2axcodes(w.affine) == ("L", "A", "S")
        assert w.header["sform_code"] == 1
        affines.append(w.affine)
        dz.append(round(float(w.header.get_zooms()[2]), 4))
    assert dz == [round(d / SCALE, 4) for d in (3.0, 4.5, 4.5, 4.5, 3.5, 4.0)]
    assert len({tuple(a[:3, 3]) for a in affines}) == 6
    zs = [a[2, 3] for a in affines]
    assert zs == sorted(zs, reverse=True)       # station 1 (neck) is the most superior
    lab = nib.load(cohort / "truth" / "labels" / f"{eid}_labels.nii.gz")
    assert lab.get_data_dtype() == np.uint8 and nib.aff2axcodes(lab.affine) == ("L", "P", "S")
    meta = json.loads((cohort / "cohort.json").read_text())
    assert meta["seed"] == SEED and meta["scale"] == SCALE and meta["n_subjects"] == N
    assert meta["complete"] is True and "version" in meta
    assert not (cohort / ".partial").exists()


def test_field_table_contract(cohort):
    obs = pd.read_csv(cohort / "fields.csv", dtype={"eid": str})
    assert list(obs.columns) == ["eid"] + [c for c, _k, _a in field_columns()]
    cat = fields.catalogue()
    with_id = [k for k in cat.index if cat.loc[k, "field_id"]]
    for k in with_id:
        assert fields.column(k) in obs.columns
    for c in ("22407-2.0", "31-0.0", "34-0.0", "52-0.0", "53-2.0", "102-2.0", "102-2.1", "23289-2.0"):
        assert c in obs.columns
    assert not any(c.startswith(("age", "liver_volume", "kidney")) for c in obs.columns)
    assert obs["eid"].tolist() == cohort_eids(N, SEED)
    truth = pd.read_csv(cohort / "truth" / "parameters.csv", dtype={"eid": str})
    for c in ("sex", "age", "height_cm", "weight_kg", "visceral_fatness", "liver_fat_fraction",
              "22407", "23289", "liver_volume", "kidney_parenchymal_volume", "atlas_slice_lo"):
        assert c in truth.columns, c
    # DXA masses in g, MRI volumes in L, DXA VAT in cm3 (native units)
    assert truth["23278"].between(3000, 90000).all()
    assert truth["22407"].between(0.02, 15).all() and truth["23289"].between(5, 5000).all()
    # observed values equal the truth where present
    for key in ("21002", "22407", "23278"):
        o = obs[fields.column(key)]
        ok = o.notna()
        assert np.array_equal(o[ok].to_numpy(float), truth.loc[ok, key].to_numpy(float))
    qc = pd.read_csv(cohort / "truth" / "qc.csv", dtype={"eid": str})
    assert list(qc.columns) == ["eid", "flag", "detail"]


def test_atlas_fields_equal_their_definition_on_the_label_volume(cohort):
    """VAT (22407, up to the T9 landmark) and one thigh muscle (22403), recomputed from labels."""
    truth = pd.read_csv(cohort / "truth" / "parameters.csv", dtype={"eid": str})
    obs = pd.read_csv(cohort / "fields.csv", dtype={"eid": str}).set_index("eid")
    for _, row in truth.iterrows():
        img = nib.load(cohort / "truth" / "labels" / f"{row.eid}_labels.nii.gz")
        lab = np.asanyarray(img.dataobj)
        voxel_l = float(np.prod(np.asarray(img.header.get_zooms(), dtype=np.float64))) / 1e6
        lo, hi = int(row.atlas_slice_lo), int(row.atlas_slice_hi)
        assert 0 < lo < hi < lab.shape[2] - 1
        vat = np.count_nonzero(lab[:, :, lo:hi + 1] == LABELS["vat"]) * voxel_l
        thigh = np.count_nonzero(lab == LABELS["thigh_anterior_right"]) * voxel_l
        assert vat == row["22407"] and thigh == row["22403"]
        # VAT above the landmark (pericardial fat) exists and is left out
        assert np.count_nonzero(lab[:, :, hi + 1:] == LABELS["vat"]) > 0
        for key, value in (("22407", vat), ("22403", thigh)):
            o = obs.loc[row.eid, fields.column(key)]
            assert np.isnan(o) or o == value


def test_same_seed_same_bytes_whatever_the_workers(cohort, tmp_path):
    again = generate_cohort(tmp_path / "w2", N, SEED, scale=SCALE, workers=2, progress=False)
    assert _hashes(again) == _hashes(cohort)
    other = generate_cohort(tmp_path / "s8", 1, SEED + 1, scale=SCALE, progress=False)
    assert _hashes(other)["fields.csv"] != _hashes(cohort)["fields.csv"]


def test_killed_generation_is_not_taken_as_complete(cohort, tmp_path):
    root = tmp_path / "killed"
    shutil.copytree(cohort, root)
    eid = cohort_eids(N, SEED)[1]
    # what a kill leaves behind: a half-written partial folder, a subject whose stations are
    # in place but whose record is not, a truncated file, no tables, an incomplete cohort.json
    junk = root / ".partial" / f"{eid}-dead" / "nifti"
    junk.mkdir(parents=True)
    (junk / "station_1_water.nii.gz").write_bytes(b"\x1f\x8b half")
    (root / "truth" / "subjects" / f"{eid}.json").unlink()
    station = root / "nifti" / eid / "station_3_fat.nii.gz"
    station.write_bytes(station.read_bytes()[:100])
    (root / "fields.csv").unlink()
    other = cohort_eids(N, SEED)[2]
    (root / "nifti" / other / "station_6_water.nii.gz").unlink()   # record there, file missing
    assert writer.read_record(root, eid) is None
    assert writer.read_record(root, other) is None
    assert writer.read_record(root, cohort_eids(N, SEED)[0]) is not None
    # a plain re-run refuses the non-empty folder; --overwrite resumes and repairs
    with pytest.raises(FileExistsError):
        generate_cohort(root, N, SEED, scale=SCALE, progress=False)
    generate_cohort(root, N, SEED, scale=SCALE, overwrite=True, progress=False)
    assert _hashes(root) == _hashes(cohort)


def test_a_failure_mid_subject_leaves_no_complete_looking_subject(cohort, tmp_path, monkeypatch):
    root = tmp_path / "fail"
    calls = {"n": 0}
    real = writer.nifti_gz_bytes

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 17:            # second subject, its second station
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "nifti_gz_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(root, N, SEED, scale=SCALE, progress=False)
    first, second = cohort_eids(N, SEED)[:2]
    assert writer.read_record(root, first) is not None
    assert writer.read_record(root, second) is None
    assert not (root / "nifti" / second).exists()
    assert not (root / "fields.csv").exists()
    assert json.loads((root / "cohort.json").read_text())["complete"] is False
    monkeypatch.setattr(writer, "nifti_gz_bytes", real)
    generate_cohort(root, N, SEED, scale=SCALE, overwrite=True, progress=False)
    assert _hashes(root) == _hashes(cohort)


def test_overwrite_with_other_parameters_replaces_the_cohort(tmp_path):
    root = generate_cohort(tmp_path / "c", 2, 1, scale=0.15, progress=False)
    (root / "notes.txt").write_text("mine")
    generate_cohort(root, 1, 2, scale=0.15, overwrite=True, progress=False)
    assert sorted(p.name for p in (root / "nifti").iterdir()) == cohort_eids(1, 2)
    assert len(list((root / "truth" / "labels").iterdir())) == 1
    assert (root / "notes.txt").read_text() == "mine"    # files it does not own are left alone


@pytest.mark.parametrize("args, message", [
    (["--subjects", "0", "--seed", "1"], "subjects"),
    (["--subjects", "2", "--seed", "1", "--scale", "0.1"], "scale"),
    (["--subjects", "2", "--seed", "1", "--scale", "2.5"], "scale"),
    (["--subjects", "2", "--seed", "-3"], "seed"),
    (["--subjects", "two", "--seed", "1"], "subjects"),
    (["--subjects", "2", "--seed", "1", "--station-format", "dicom"], "station-format"),
    (["--subjects", "2", "--seed", "1", "--thigh-asymmetry", "0.9"], "thigh_asymmetry"),
    (["--subjects", "2", "--seed", "1", "--liver-fat-coupling", "1.5"],
     "liver_fat_coupling must be a number in [0, 1]"),
    (["--subjects", "2", "--seed", "1", "--liver-fat-coupling", "nan"], "liver_fat_coupling"),
])
def test_cli_bad_arguments(tmp_path, capsys, args, message):
    rc = synth_main(["--out", str(tmp_path / "out")] + args)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_folder_and_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    rc = synth_main(["--out", str(out), "--subjects", "1", "--seed", "1", "--scale", "0.15"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not empty" in err
    rc = synth_main(["--out", str(tmp_path / "new"), "--subjects", "1", "--seed", "1",
                     "--scale", "0.15", "--no-progress"])
    assert rc == 0 and (tmp_path / "new" / "fields.csv").is_file()


@pytest.mark.slow
def test_cohort_notebook_runs(tmp_path):
    source = notebooks_dir() / "00_phantom_cohort.ipynb"
    out_dir = tmp_path / "cohort"
    executed = execute_notebook(source, tmp_path / "run" / "00_phantom_cohort.ipynb",
                                parameters={"out_dir": str(out_dir), "subjects": 6, "seed": 3,
                                            "scale": 0.25, "liver_fat_coupling": 0.0},
                                cwd=tmp_path)
    assert executed.is_file()
    meta = json.loads((out_dir / "cohort.json").read_text())
    assert meta["complete"] is True and meta["liver_fat_coupling"] == 0.0
    assert len(pd.read_csv(out_dir / "fields.csv")) == 6


def test_thigh_asymmetry_gives_each_side_its_own_information():
    """The saliency check's cohort option: same people (same stream), thighs less alike; the
    default stays the UKB-like phantom (r ~ 0.94 between the anterior thighs)."""
    keys = ["22403-2.0", "22405-2.0"]
    ukb = sample_fields(80, 5)[0]
    asym = sample_fields(80, 5, thigh_asymmetry=0.10)[0]
    assert ukb["eid"].tolist() == asym["eid"].tolist()
    r_ukb = ukb[keys].dropna().corr().iloc[0, 1]
    r_asym = asym[keys].dropna().corr().iloc[0, 1]
    assert r_ukb > 0.9 and r_asym < 0.75, (r_ukb, r_asym)
    # only the thighs change: the liver fat of a subject is the same
    np.testing.assert_array_equal(ukb["22402-2.0"].to_numpy(), asym["22402-2.0"].to_numpy())


@pytest.mark.parametrize("option, value, other", [("thigh_asymmetry", 0.10, 0.3),
                                                   ("liver_fat_coupling", 0.0, 1.0)])
def test_a_later_release_keeps_the_population_options(tmp_path, option, value, other):
    first = generate_cohort(tmp_path / "a", 1, 1, scale=0.15, progress=False, **{option: value})
    meta = json.loads((first / "cohort.json").read_text())
    assert meta[option] == value and not set(POPULATION) - {option} & set(meta)
    later = generate_cohort(tmp_path / "b", 1, 1, scale=0.15, progress=False,
                            later_release_of=first)
    assert json.loads((later / "cohort.json").read_text())[option] == value
    # and its subjects are drawn with it, not with the default
    eid = pd.read_csv(later / "fields.csv", dtype={"eid": str})["eid"][0]
    truth = pd.read_csv(later / "truth" / "parameters.csv", dtype={"eid": str}).iloc[0]
    seed = writer.cohort.subject_seed(1, 0, 2)  # cohort seed 1, first subject, release 2
    kept = writer.cohort.make_subject(eid, seed, 0.15, stations=False, **{option: value})
    default = writer.cohort.make_subject(eid, seed, 0.15, stations=False)
    key = "thigh_asym" if option == "thigh_asymmetry" else "liver_fat_fraction"
    assert truth[key] == pytest.approx(kept.params[key]) != pytest.approx(default.params[key])
    with pytest.raises(ValueError, match=f"has {option} {value:g}, this one {other:g}; a later "
                                         f"release keeps the protocol"):
        generate_cohort(tmp_path / "d", 1, 1, scale=0.15, progress=False,
                        later_release_of=first, **{option: other})
    assert not (tmp_path / "d" / "cohort.json").exists()
    broken = json.loads((first / "cohort.json").read_text()) | {option: 7}
    (first / "cohort.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=f"{first}: cohort.json: {option} must be a number in"):
        generate_cohort(tmp_path / "e", 1, 1, scale=0.15, progress=False, later_release_of=first)
    # the default, given or not, is the default cohort: nothing recorded
    plain = generate_cohort(tmp_path / "c", 1, 1, scale=0.15, progress=False,
                            **{option: POPULATION[option].default})
    assert option not in json.loads((plain / "cohort.json").read_text())


def test_liver_fat_coupling_zero_leaves_the_liver_the_only_evidence():
    """The liver check's option: the same people (same stream); liver fat no longer follows
    visceral fat or BMI, with its marginal kept; the thighs are untouched, and the default is the
    UKB-like phantom (liver fat correlates with visceral fatness)."""
    _, ukb = sample_fields(120, 4)
    _, free = sample_fields(120, 4, liver_fat_coupling=0.0)
    assert ukb["eid"].tolist() == free["eid"].tolist()
    log_ukb, log_free = np.log(ukb["liver_fat_fraction"]), np.log(free["liver_fat_fraction"])
    r_ukb = np.corrcoef(log_ukb, ukb["visceral_fatness"])[0, 1]
    r_free = np.corrcoef(log_free, free["visceral_fatness"])[0, 1]
    assert r_ukb > 0.35 and abs(r_free) < 0.2, (r_ukb, r_free)
    assert abs(np.corrcoef(log_free, free["bmi_target"])[0, 1]) < 0.2
    # the marginal: log liver fat keeps its centre and spread (unit SD on the log scale)
    assert abs(np.median(log_free) - np.log(0.023)) < 0.25
    assert 0.8 < log_free.std() < 1.2 and 0.8 < log_ukb.std() < 1.2
    for key in ("22405", "22403", "visceral_fatness", "age", "sex"):
        np.testing.assert_array_equal(ukb[key].to_numpy(), free[key].to_numpy())
    # a coupling between keeps the loadings in proportion
    _, half = sample_fields(120, 4, liver_fat_coupling=0.5)
    r_half = np.corrcoef(np.log(half["liver_fat_fraction"]), half["visceral_fatness"])[0, 1]
    assert r_free < r_half < r_ukb


def test_the_default_population_is_what_it_was():
    """Pinned values of the UKB-like phantom (seed 4), computed before the population options
    existed: adding an option must not change the default cohort."""
    _, truth = sample_fields(3, 4)
    np.testing.assert_allclose(truth["liver_fat_fraction"],
                               [0.006699947097, 0.020801875723, 0.003494506773], atol=1e-11)
    np.testing.assert_allclose(truth["thigh_asym"],
                               [-0.001114656769, 0.010725755697, 0.008199347258], atol=1e-11)
