"""The whole pipeline through the notebooks on a tiny phantom study (the notebook smoke tests).

One module-scoped run of ``run_demo`` on a 2-fold study of a few dozen subjects with a tiny
network: every stage notebook executes, writes its plain-file outputs, and the figures are
byte-identical when rebuilt from the same runs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from biometry.config.paths import notebooks_dir
from biometry.data.store import Store
from biometry.data.tables import references_from_fields_csv
from biometry.runs.notebook import execute_notebook

pytestmark = pytest.mark.slow

FIELDS = ["22407", "21002", "22405", "22403", "23289"]
#: enough for the network to learn body weight from the projections of 20 training subjects at
#: 32 px (R² 0.79 measured on a 36-subject phantom at scale 0.2, 2 folds); see R2_FLOOR
ITERATIONS = 150
#: the stated floor for the easy field (weight, 21002): a regression that breaks the images, the
#: targets' units or the fold pooling falls far below it
R2_FLOOR = 0.4


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    study = {
        "name": "tiny", "description": "end-to-end smoke test",
        "data": {"source": "phantom", "subjects": 40, "seed": 3, "scale": 0.2},
        "format": "projection", "fields": FIELDS, "multi_field": True, "folds": 2,
        "saliency": {"fields": ["22405", "22403"], "subjects": 60, "layer": "layer2"},
        "split_seed": 0,
        "training": {"arch": "resnet18", "input_size": [32, 32], "head": "regression",
                     "loss": "mse", "optimizer": "adam", "lr": 1e-3, "batch_size": 8,
                     "iterations": ITERATIONS, "lr_steps": [120], "translate_px": 2, "seed": 0,
                     "checkpoint_every": 50, "num_workers": 0},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    from biometry.runs.demo import run_demo

    # two at a time, as the demo runs: the later stages side by side, each when its inputs are
    # there (a figure notebook started before the stage it reads fails the run)
    summary = run_demo(str(path), root=root / "runs", workers=2)
    return path, root, summary


def test_every_stage_leaves_its_outputs(tiny_study):
    path, root, summary = tiny_study
    runs = root / "runs" / "tiny"
    assert (runs / "data" / "cohort" / "fields.csv").is_file()
    assert (runs / "data" / "prepared" / "store.json").is_file()
    splits = pd.read_csv(runs / "splits.csv", dtype={"eid": str})
    assert set(splits["fold"]) == {0, 1}
    for k in (0, 1):
        run = runs / "train" / "all" / f"fold_{k}"
        assert {"done.json", "params.yaml", "provenance.json", "02_train.ipynb",
                "predictions.csv", "metrics.json"} <= {p.name for p in run.iterdir()}
        pred = pd.read_csv(run / "predictions.csv", dtype={"eid": str, "field": str})
        # out-of-fold: every prediction of this run is for a subject of this fold
        fold_of = splits.set_index("eid")["fold"]
        assert (fold_of.loc[pred["eid"]].to_numpy() == k).all()
        assert set(pred["field"]) <= set(FIELDS)
    for key in FIELDS:
        m = json.loads((runs / "evaluate" / key / "metrics.json").read_text())
        assert m["network"]["n"] > 0 and "r2" in m["network"]
    weight = json.loads((runs / "evaluate" / "21002" / "metrics.json").read_text())
    labelled = references_from_fields_csv(runs / "data" / "cohort" / "fields.csv", ["21002"])
    stored = set(Store.open(runs / "data" / "prepared").eids)
    n_labelled = int(labelled["21002"][labelled.index.astype(str).isin(stored)].notna().sum())
    assert weight["network"]["n"] == n_labelled  # every labelled subject once, folds pooled
    assert weight["network"]["r2"] > R2_FLOOR, weight["network"]
    assert list(summary["field"]) == FIELDS
    assert (runs / "summary" / "summary.csv").is_file()


def test_saliency_outputs_follow_the_contract(tiny_study):
    _, root, _ = tiny_study
    stage = root / "runs" / "tiny" / "saliency"
    for key in ("22405", "22403"):  # the demo's saliency fields that the tiny study trains
        d = stage / key
        refs = json.loads((d / "reference.json").read_text())["per_sex"]
        everything = json.loads((d / "metrics.json").read_text())
        metrics = everything["per_sex"]
        # the study's layer reached the notebook: layer2 of a 32 px input is a 4 x 4 grid
        assert everything["layer"] == "layer2" and everything["layer_grid"] == [4, 4]
        assert (d / "saliency.png").is_file()
        for sex in ("female", "male"):
            agg = np.load(d / f"aggregate_{sex}.npy")
            assert agg.dtype == np.float32 and agg.shape == (256, 256)
            assert np.isfinite(agg).all() and (agg >= 0).all()
            m = metrics[sex]
            assert m["n"] >= 5 and not m["failed"]
            assert m["alignment"]["share_improved"] >= 0.95
            assert {"thigh_left_right_ratio", "liver_body_density_ratio"} <= set(m["anatomy"])
            # transforms: one per subject, shared by both fields
            tf = stage / "registration" / f"{sex}_{refs[sex]['eid']}"
            assert len(list(tf.glob("*.sagittal.tfm"))) == m["n"]


def test_figures_are_reproducible(tiny_study):
    path, root, _ = tiny_study
    from biometry.runs.figures import build_figures

    figs = root / "figures"  # where the demo's figures stage put them: figures/ beside the YAML
    produced = sorted(p for p in figs.rglob("*") if p.is_file())
    names = {p.name for p in produced}
    for expected in ("fig03_median_field.pdf", "fig03_median_field.png", "fig02_umap.png",
                     "fig04_saliency.png",
                     "table1_field_metrics.csv", "table1_field_metrics.md",
                     "table2_dxa_mri.csv", "stable5_bilateral_symmetry.md"):
        assert expected in names, f"{expected} missing from {sorted(names)}"
    # nothing from a notebook that this study cannot draw (no liver:, no release: block)
    assert not {n for n in names if "liver" in n or "later_release" in n}, sorted(names)
    first = {p: p.read_bytes() for p in produced}
    # `biometry figures` again: the analyses re-run, every figure rebuilt, the same bytes
    assert build_figures(str(path), runs_root=root / "runs", progress=False) == 0
    changed = [p.name for p, data in first.items() if p.read_bytes() != data]
    assert not changed, f"not byte-identical on re-run: {changed}"
    sym = pd.read_csv(figs / "tiny" / "stable5_bilateral_symmetry.csv", dtype=str)
    assert ("22405", "22403") in set(zip(sym["left"], sym["right"]))


def test_explore_notebook_runs_headless(tiny_study):
    path, root, _ = tiny_study
    out = root / "explore.ipynb"
    execute_notebook(notebooks_dir() / "explore.ipynb", out,
                     parameters={"study": str(path), "field": "22407",
                                 "runs_root": str(root / "runs")})
    text = out.read_text()
    assert "Largest errors" in text and "image/png" in text
