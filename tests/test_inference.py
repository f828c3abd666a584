"""Model bundles and the inference engine on a tiny phantom: outputs, cache, failures."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from biometry.cli import main as cli_main
from biometry.config.paths import notebooks_dir
from biometry.config.study import load_study
from biometry.config.training import TrainConfig
from biometry.data.store import Store
from biometry.errors import one_line
from biometry.inference import bundle as B
from biometry.inference import engine
from biometry.inference.engine import infer
from biometry.inference.export import calibrate_module, export_module
from biometry.learn.models import build_model
from biometry.learn.trainer import train
from biometry.phantom import generate_cohort
from biometry.runs.notebook import execute_notebook
from biometry.runs.runner import RunSpec, run_dir_for

KEYS = ["22407", "21002"]  # VAT (L), weight (kg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two folds of a tiny mean-variance network on random images (the files a study leaves)."""
    root = tmp_path_factory.mktemp("train") / "all"
    rng = np.random.default_rng(0)
    n = 24
    images = rng.integers(0, 255, (n, 2, 256, 256), dtype=np.uint8)
    targets = np.column_stack([rng.normal(4, 1, n), rng.normal(80, 10, n)])
    targets[::5, 0] = np.nan
    eids = [str(1000000 + i) for i in range(n)]
    cfg = TrainConfig(arch="resnet18", in_channels=2, input_size=(16, 16), head="mean_variance",
                      loss="gaussian_nll", batch_size=4, iterations=2, lr_steps=(), device="cpu",
                      checkpoint_every=0, translate_px=0)
    idx = np.arange(n)
    for k in range(2):
        val = idx[idx % 2 == k]
        train(cfg, images, targets, idx[idx % 2 != k], val, root / f"fold_{k}", eids, KEYS,
              progress=False, fold=k)
    return root


@pytest.fixture(scope="module")
def bundle_dir(trained, tmp_path_factory) -> Path:
    # runs root of its own: the checkout's demo store (if one was made) must not lend its grid
    return export_module(load_study("demo"), "all", tmp_path_factory.mktemp("b") / "bundle",
                         folder=trained, runs_root=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A 3-subject phantom release as UKB zips, one of them corrupt."""
    root = generate_cohort(tmp_path_factory.mktemp("rel") / "r", 3, 4, scale=0.2,
                           station_format="zip", progress=False)
    zips = sorted((root / "zip").glob("*.zip"))
    zips[1].write_bytes(b"PK\x03\x04 this is not a zip")
    return root


def test_calibration_stage_files(trained, tmp_path):
    scales = calibrate_module(trained, tmp_path)
    meta = json.loads((tmp_path / "calibration.json").read_text())
    assert set(meta["factors"]) == set(KEYS) == set(scales)
    oof = pd.concat([pd.read_csv(trained / f"fold_{k}" / "predictions.csv",
                                 dtype={"field": str}) for k in (0, 1)])
    t = oof[oof["field"] == "21002"]
    expected = np.mean((t["reference"] - t["prediction"]) ** 2 / t["variance"])
    assert meta["factors"]["21002"] == pytest.approx(expected)
    report = pd.read_csv(tmp_path / "calibration.csv", dtype={"field": str}).set_index("field")
    assert report.loc["21002", "coverage95"] == pytest.approx(
        np.mean(np.abs(t["reference"] - t["prediction"]) <= 1.959964 * np.sqrt(
            t["variance"] * expected)), abs=1e-6)
    assert (tmp_path / "sparsification.csv").is_file() and (tmp_path / "calibration.md").is_file()


def test_bundle_round_trip(bundle_dir, trained):
    b = B.load_bundle(bundle_dir)
    assert b.field_keys == KEYS and b.units == ["L", "kg"] and len(b.members) == 2
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["input"]["format"] == "projection" and meta["input"]["input_size"] == [16, 16]
    assert "weights/fold_0.pt" in meta["files"] and "model_card.md" in meta["files"]
    card = (bundle_dir / "model_card.md").read_text()
    assert "Cross-validated metrics" in card and "| 21002 | weight | kg |" in card
    # the bundle's fold-0 network predicts what the trained one predicted out of fold
    raw = torch.load(trained / "fold_0" / "model.pt", weights_only=True)
    assert torch.equal(b.members[0].model.state_dict()["fc.weight"], raw["state_dict"]["fc.weight"])
    np.testing.assert_allclose(b.calibration, [meta["calibration"]["factors"][0],
                                               meta["calibration"]["factors"][1]])
    # each member also carries the factors fitted on its own fold's out-of-fold predictions
    for k in (0, 1):
        own = pd.read_csv(trained / f"fold_{k}" / "predictions.csv", dtype={"field": str})
        t = own[own["field"] == "21002"]
        expected = np.mean((t["reference"] - t["prediction"]) ** 2 / t["variance"])
        assert meta["members"][k]["calibration"][1] == pytest.approx(expected)
        assert b.members[k].calibration[1] == pytest.approx(expected)


def test_bundle_records_its_ensemble_rule_and_the_engine_applies_it(bundle_dir):
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["ensemble"] == {"rule": "ambiguity", "members": 2}
    b = B.load_bundle(bundle_dir)
    assert b.ensemble_rule == "ambiguity"
    images = np.random.default_rng(5).integers(0, 255, (6, 2, 256, 256), dtype=np.uint8)
    m_k, v_k = B.predict_members(b, images)
    own = np.stack([m.calibration for m in b.members])[:, None, :]
    np.testing.assert_allclose(v_k, B.forward(b, images)[1] * own)
    mu, var = B.predict_calibrated(b, images)
    spread = ((m_k - m_k.mean(axis=0)) ** 2).mean(axis=0)
    np.testing.assert_allclose(mu, m_k.mean(axis=0))
    np.testing.assert_allclose(var, np.maximum(v_k.mean(axis=0) - spread, v_k.mean(axis=0) / 2))
    _mu, mix = B.predict_calibrated(b, images, rule="mixture")
    np.testing.assert_allclose(mix, v_k.mean(axis=0) + spread)


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


def _one_line_error(capsys, argv) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bundle_from_another_version(bundle_dir, tmp_path, capsys):
    d = _copy(bundle_dir, tmp_path)
    meta = json.loads((d / "bundle.json").read_text())
    meta["package_version"] = "9.3.0"
    (d / "bundle.json").write_text(json.dumps(meta))
    err = _one_line_error(capsys, ["infer", "--model", str(d), "--input", str(tmp_path),
                                   "--out", str(tmp_path / "p.csv")])
    assert "exported by biometry 9.3.0, this is biometry" in err and str(d) in err


def test_bundle_with_a_missing_file(bundle_dir, tmp_path, capsys):
    d = _copy(bundle_dir, tmp_path)
    (d / "weights" / "fold_1.pt").unlink()
    err = _one_line_error(capsys, ["infer", "--model", str(d), "--input", str(tmp_path),
                                   "--out", str(tmp_path / "p.csv")])
    assert err.endswith(f"{d}: missing file weights/fold_1.pt (listed in bundle.json)")


class Payload:
    """An arbitrary object: loading it would run code chosen by whoever wrote the file."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_object_where_weights_should_be(bundle_dir, tmp_path, capsys):
    d = _copy(bundle_dir, tmp_path)
    w = d / "weights" / "fold_0.pt"
    torch.save({"state_dict": Payload()}, w)  # a checksum that matches: only unpickling guards
    meta = json.loads((d / "bundle.json").read_text())
    meta["files"]["weights/fold_0.pt"] = B.sha256(w)
    (d / "bundle.json").write_text(json.dumps(meta))
    err = _one_line_error(capsys, ["infer", "--model", str(d), "--input", str(tmp_path),
                                   "--out", str(tmp_path / "p.csv")])
    assert "fold_0.pt is not a plain tensor file (refused to unpickle it" in err
    # what the unpickler met, without torch's terminal colours or its advice to load it anyway
    assert "GLOBAL print" in err, err  # the unpickler's sentence: what it met
    assert "\x1b" not in err and "add_safe_globals" not in err, err
    assert "unpickled!" not in capsys.readouterr().out
    # and a tampered file is caught by its checksum before that
    pickle.dump({"x": 1}, w.open("wb"))
    with pytest.raises(B.BundleError, match="does not match its checksum"):
        B.load_bundle(d)
    # a plain pickle with a matching checksum: refused, without torch's warning first
    meta["files"]["weights/fold_0.pt"] = B.sha256(w)
    (d / "bundle.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(B.BundleError, match=r"fold_0.pt is not a plain tensor file \(refused "
                                                r"to unpickle it: [^\n]+\)$"):
            B.load_bundle(d)


def test_weights_of_another_network_name_the_file(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    w = d / "weights" / "fold_0.pt"
    state = torch.load(w, weights_only=True)
    fc = [k for k in state if k.startswith("fc.")]
    for k in fc:  # the last layer of a network with one field fewer
        state[k] = state[k][:-2]
    torch.save(state, w)
    meta = json.loads((d / "bundle.json").read_text())
    meta["files"]["weights/fold_0.pt"] = B.sha256(w)
    (d / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(B.BundleError, match=r"weights/fold_0.pt does not fit a resnet\d+ "
                                            r"\(mean_variance head\) with \d+ fields"):
        B.load_bundle(d)


def test_input_folder_with_nothing_usable(bundle_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    err = _one_line_error(capsys, ["infer", "--model", str(bundle_dir), "--input", str(empty),
                                   "--out", str(tmp_path / "p.csv")])
    assert f"{empty}: no subjects found" in err


def _folds_on_grids(trained: Path, target: Path, grids) -> Path:
    """A copy of the trained folds whose model.pt say on which grids their images were made."""
    shutil.copytree(trained, target)
    for k, grid in enumerate(grids):
        raw = torch.load(target / f"fold_{k}" / "model.pt", weights_only=True)
        raw["input_grid_mm"] = grid
        torch.save(raw, target / f"fold_{k}" / "model.pt")
    return target


def test_export_records_the_training_grid_and_writes_the_same_bytes_twice(trained, tmp_path):
    """A bundle says on which fused grid its networks' images were made (each fold's model.pt
    keeps its store's grid), and two exports of the same runs are the same files: the weights'
    checksums do not change from one export to the next."""
    folds = _folds_on_grids(trained, tmp_path / "all", [[6.4, 6.4, 8.6]] * 2)
    a = export_module(load_study("demo"), "all", tmp_path / "a", folder=folds)
    b = export_module(load_study("demo"), "all", tmp_path / "b", folder=folds)
    meta_a = json.loads((a / "bundle.json").read_text())
    assert meta_a["input"]["grid_mm"] == [6.4, 6.4, 8.6]
    assert meta_a["files"] == json.loads((b / "bundle.json").read_text())["files"]
    for rel in meta_a["files"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert B.load_bundle(a).grid_mm == (6.4, 6.4, 8.6)
    # folds from stores of different grids make no bundle
    mixed = _folds_on_grids(trained, tmp_path / "mixed", [[6.4, 6.4, 8.6], [2.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="different fused grids"):
        export_module(load_study("demo"), "all", tmp_path / "c", folder=mixed)


def test_the_engine_prepares_on_the_grid_the_bundle_was_trained_on(bundle_dir, tmp_path):
    """A folder of zips says nothing of its grid: the bundle's recorded grid is used, before a
    phantom root's and the UKB grid; --spacing wins over it, with a note, as does a phantom
    cohort of another grid."""
    d = _copy(bundle_dir, tmp_path)
    meta = json.loads((d / "bundle.json").read_text())
    meta["input"]["grid_mm"] = [6.4, 6.4, 8.6]
    (d / "bundle.json").write_text(json.dumps(meta))
    with_grid, without = B.load_bundle(d), B.load_bundle(bundle_dir)
    zips = tmp_path / "zips"
    zips.mkdir()
    assert engine.input_grids([with_grid, without], zips, None) == (
        [(6.4, 6.4, 8.6), tuple(engine.UKB_SPACING)], [])
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"fused_grid": {"spacing_mm": [5, 5, 7]}}))
    grids, notes = engine.input_grids([with_grid, without], cohort, None)
    assert grids == [(6.4, 6.4, 8.6), (5.0, 5.0, 7.0)]
    assert notes == [f"{d}: trained on the fused grid 6.4 x 6.4 x 8.6 mm, the input cohort's is "
                     f"5 x 5 x 7 mm; preparing on the bundle's"]
    grids, notes = engine.input_grids([with_grid], zips, [3, 3, 3])
    assert grids == [(3.0, 3.0, 3.0)] and "as --spacing says" in notes[0]
    # the grid a note prints, given back, is the same grid: no note
    assert engine.input_grids([with_grid], zips, [6.40000, 6.40000, 8.60000])[1] == []
    # a cohort.json without a grid does not stop a bundle that knows its own, nor --spacing
    (cohort / "cohort.json").write_text("{}")
    assert engine.input_grids([with_grid], cohort, None)[0] == [(6.4, 6.4, 8.6)]
    assert engine.input_grids([without], cohort, [3, 3, 3])[0] == [(3.0, 3.0, 3.0)]
    meta["input"]["grid_mm"] = [6.4, -1, 8.6]
    (d / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(B.BundleError, match="grid_mm must be three positive numbers"):
        B.load_bundle(d)


def test_failures_go_beside_the_predictions_under_their_name(tmp_path):
    assert engine.failures_path(tmp_path / "predictions.csv") == tmp_path / "failures.csv"
    assert engine.failures_path(tmp_path / "rel2.csv") == tmp_path / "rel2_failures.csv"


def test_input_errors_name_the_path_and_the_missing_key(bundle_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    err = _one_line_error(capsys, ["infer", "--model", str(bundle_dir), "--input", str(missing),
                                   "--out", str(tmp_path / "p.csv")])
    assert err.endswith(f"{missing}: no such file or folder")
    d = _copy(bundle_dir, tmp_path)
    meta = json.loads((d / "bundle.json").read_text())
    del meta["input"]
    (d / "bundle.json").write_text(json.dumps(meta))
    err = _one_line_error(capsys, ["infer", "--model", str(d), "--input", str(tmp_path),
                                   "--out", str(tmp_path / "p.csv")])
    assert err.endswith("bundle.json lacks 'input'")
    assert one_line(KeyError("unknown format 'x'")) == "unknown format 'x'"  # no quotes added
    with pytest.raises(SystemExit):
        cli_main(["infer", "--help"])
    assert "calibrated 95 % intervals" in capsys.readouterr().out


@pytest.mark.slow
def test_engine_end_to_end_with_a_corrupt_zip(bundle_dir, release, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    # two preparation workers (a Dask cluster): the corrupt zip fails in one of them
    rc = cli_main(["infer", "--model", str(bundle_dir), "--input", str(release / "zip"),
                   "--out", str(out), "--no-progress", "--cache", str(tmp_path / "cache"),
                   "--workers", "2"])
    assert rc == 1
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("infer: 3 subjects, 2 predicted, 1 failed")
    zips = sorted((release / "zip").glob("*.zip"))
    bad = zips[1].name.split("_")[0]
    fails = pd.read_csv(out.parent / "failures.csv", dtype={"eid": str})
    assert fails["eid"].tolist() == [bad] and fails["error"].str.len().min() > 0
    pred = pd.read_csv(out, dtype={"eid": str})
    assert sorted(pred["eid"]) == sorted(z.name.split("_")[0] for z in zips if z != zips[1])
    for key in KEYS:
        lo, hi = pred[f"{key}_lo95"], pred[f"{key}_hi95"]
        np.testing.assert_allclose(hi - lo, 2 * 1.959964 * np.sqrt(pred[f"{key}_var"]), rtol=1e-5)
        assert ((lo < pred[f"{key}_mean"]) & (pred[f"{key}_mean"] < hi)).all()
    side = json.loads(out.with_suffix(".json").read_text())
    assert {f["key"]: f["unit"] for f in side["fields"]} == {"22407": "L", "21002": "kg"}
    assert side["workers"] == 2 and side["models"][0]["ensemble_rule"] == "ambiguity"
    assert {f["ensemble_rule"] for f in side["fields"]} == {"ambiguity"}
    # the cache the two workers filled holds each subject once: two prepared, one failed
    (store_dir,) = (tmp_path / "cache").glob("projection-*")
    store = Store.open(store_dir)
    assert sorted(store.eids) == sorted(pred["eid"]) and store.failed()["eid"].tolist() == [bad]
    # a second run prepares nothing: every subject (the failed one too) comes from the cache
    res = infer([bundle_dir], release / "zip", tmp_path / "again.csv", cache=tmp_path / "cache",
                progress=False)
    assert res.n_cached == 3 and res.prepare_seconds < 5
    pd.testing.assert_frame_equal(res.predictions.reset_index(drop=True),
                                  pred.astype({"eid": object}), check_dtype=False)
    # a cached subject whose zip changed since is never predicted from its old images
    changed = tmp_path / "changed" / "zip"  # the cohort copied whole: same grid, same cache
    shutil.copytree(release, changed.parent)
    first = sorted(changed.glob("*.zip"))[0]
    first.write_bytes(first.read_bytes() + b"\0")
    capsys.readouterr()
    rc = cli_main(["infer", "--model", str(bundle_dir), "--input", str(changed),
                   "--out", str(tmp_path / "changed.csv"), "--no-progress",
                   "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert first.name.split("_")[0] in err[0] and "--cache" in err[0], err
    assert not (tmp_path / "changed.csv").exists()
    # a bundle that knows its grid has the zips prepared on it, into a cache of that grid
    d = _copy(bundle_dir, tmp_path)
    meta = json.loads((d / "bundle.json").read_text())
    meta["input"]["grid_mm"] = [12.0, 12.0, 15.0]
    (d / "bundle.json").write_text(json.dumps(meta))
    res = infer([d], release / "zip", tmp_path / "g" / "rel.csv", progress=False)
    assert [p.name for p in (tmp_path / "g" / "cache").iterdir()] == ["projection-12x12x15"]
    side = json.loads((tmp_path / "g" / "rel.json").read_text())
    assert side["models"][0]["grid_mm"] == side["models"][0]["trained_grid_mm"] == [12, 12, 15]
    assert len(res.predictions) == 2 and (tmp_path / "g" / "rel_failures.csv").is_file()


@pytest.mark.slow
def test_original_mimir_module_loads_and_applies_its_divisor(tmp_path):
    t = 2
    model = build_model("resnet50", 3, t, "mean_variance", seed=1)
    with torch.no_grad():  # moderate outputs from an untrained net fed 0-255 values
        model.fc.weight.mul_(1e-3)
    d = tmp_path / "module_body"
    d.mkdir()
    torch.save({"epoch": 10000, "state_dict": model.state_dict()}, d / "snapshot.pth.tar")
    (d / "metadata.txt").write_text("Name,Field,Unit,Divisor\nVAT,22407,L,1\nGrip,47,g,1000\n")
    (d / "standardization_parameters.txt").write_text("mean,sd\n4.0,1.5\n30000,8000\n")
    (d / "calibration_factors.txt").write_text("calibration_factor\n1.2\n0.8\n")
    b = B.load_bundle(d)
    assert b.original and b.input_format == "mimir_original" and b.pixel_scale == 1.0
    assert b.field_keys == ["22407", "47"]
    images = np.random.default_rng(0).integers(0, 4, (2, 3, 256, 256), dtype=np.uint8)
    means, variances = B.forward(b, images)
    with torch.no_grad():
        raw = model.eval()(torch.from_numpy(images).float()).numpy().reshape(2, t, 2)
    np.testing.assert_allclose(means[0, :, 1], (raw[:, 1, 0] * 8000 + 30000) / 1000, rtol=1e-4)
    # the variance is divided by the divisor squared (the original divided by the divisor)
    np.testing.assert_allclose(variances[0, :, 1], np.exp(raw[:, 1, 1]) * 8000 ** 2 / 1000 ** 2,
                               rtol=1e-4)
    mu, var = B.predict_calibrated(b, images)
    np.testing.assert_allclose(var[:, 0], variances[0, :, 0] * 1.2, rtol=1e-6)
    (d / "calibration_factors.txt").unlink()
    with pytest.raises(B.BundleError, match="missing file calibration_factors.txt"):
        B.load_bundle(d)


def _study_with_a_release(tmp_path: Path, trained: Path) -> tuple[Path, Path]:
    """A phantom study of the two KEYS with a `release:` block, its cohort and trained folds."""
    raw = yaml.safe_load(load_study("demo").path.read_text())
    raw.update(name="reltest", fields=KEYS, folds=2, saliency=None,
               data={"source": "phantom", "subjects": 4, "seed": 4, "scale": 0.2},
               release={"subjects": 3, "seed": 1})
    path = tmp_path / "reltest.yaml"
    path.write_text(yaml.safe_dump(raw))
    runs_root = tmp_path / "runs"
    shutil.copytree(trained, runs_root / "reltest" / "train" / "all")
    generate_cohort(runs_root / "reltest" / "data" / "cohort", 4, 4, scale=0.2, progress=False)
    return path, runs_root


@pytest.mark.slow
def test_notebooks_calibrate_and_the_release_stage(trained, tmp_path):
    """08_calibrate on a module's folds; 09_later_release (the release stage) synthesises the
    phantom's next release and judges it; fig_later_release draws it."""
    study, runs_root = _study_with_a_release(tmp_path, trained)
    cal = tmp_path / "cal"
    execute_notebook(notebooks_dir() / "08_calibrate.ipynb", cal / "08.ipynb",
                     {"study": str(study), "module": "all", "run_dir": str(cal),
                      "runs_root": str(runs_root)})
    assert set(json.loads((cal / "calibration.json").read_text())["factors"]) == set(KEYS)
    assert (cal / "calibration_curves.png").is_file() and (cal / "sparsification.pdf").is_file()
    rel = run_dir_for(RunSpec("reltest", "release"), runs_root)
    execute_notebook(notebooks_dir() / "09_later_release.ipynb", rel / "09.ipynb",
                     {"study": str(study), "runs_root": str(runs_root), "run_dir": str(rel),
                      "workers": 1, "min_references": 1})
    metrics = json.loads((rel / "metrics.json").read_text())
    assert metrics["n_subjects"] == metrics["n_predicted"] == 3 and metrics["rule"] == ["ambiguity"]
    release = runs_root / "reltest" / "data" / "release"
    pred = pd.read_csv(rel / "predictions.csv", dtype={"eid": str})
    cohort = pd.read_csv(runs_root / "reltest" / "data" / "cohort" / "fields.csv", dtype={"eid": str})
    assert len(pred) == 3 and not set(pred["eid"]) & set(cohort["eid"])  # new subjects
    table = pd.read_csv(rel / "release_metrics.csv", dtype={"field": str}).set_index("field")
    assert list(table.index) == KEYS
    refs = pd.read_csv(release / "fields.csv", dtype={"eid": str}).set_index("eid")
    y = refs.loc[pred["eid"], "21002-2.0"].to_numpy()
    inside = (pred["21002_lo95"] <= y) & (y <= pred["21002_hi95"])
    assert table.loc["21002", "n"] == np.isfinite(y).sum() == 3
    # the engine's intervals (the bundle's rule) are the ones the table judges
    assert table.loc["21002", "coverage95_ambiguity"] == pytest.approx(inside.mean())
    members = pd.read_csv(rel / "release_members.csv", dtype={"field": str})
    assert members[members["field"] == "21002"]["fold"].tolist() == [0, 1]
    fig_out = tmp_path / "figs"
    execute_notebook(notebooks_dir() / "fig_later_release.ipynb", tmp_path / "fig.ipynb",
                     {"study": str(study), "runs_root": str(runs_root), "out_dir": str(fig_out)})
    assert (fig_out / "fig_later_release.png").stat().st_size > 10_000
    assert (rel / "release_vs_cv.png").is_file() and (rel / "release_calibration.png").is_file()
    # a release subject's files change: the stage's own cache is made again, never reused
    from biometry.runs.release import run_release
    a, b = sorted((release / "nifti").iterdir())[:2]
    (a / "station_3_water.nii.gz").write_bytes((b / "station_3_water.nii.gz").read_bytes())
    again = tmp_path / "again"
    run_release(str(study), again, runs_root=runs_root, workers=1, min_references=1,
                progress=False)
    new = pd.read_csv(again / "predictions.csv", dtype={"eid": str}).set_index("eid")
    old = pred.set_index("eid")
    assert new.loc[a.name, "21002_mean"] != pytest.approx(old.loc[a.name, "21002_mean"])
    assert new.loc[b.name, "21002_mean"] == pytest.approx(old.loc[b.name, "21002_mean"])
