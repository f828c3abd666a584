"""The liver study end to end on a tiny phantom: cross-validation, the network on dataset B, the
multi-atlas baseline on A and C, Table 1 and the outliers (the issue's 'Done when' on a small run).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from biometry.analysis import atlas
from biometry.config.study import load_study
from biometry.data.prepare import prepare
from biometry.data.volumes import save_nifti
from biometry.learn.cv import train_fold
from biometry.phantom import LABELS, generate_cohort
from biometry.runs.liver import run_liver_study

pytestmark = pytest.mark.slow

# seed 8: 36 subjects, 16 with the reference, one of them a planted gross outlier
SUBJECTS, SEED, SCALE = 36, 8, 0.15


@pytest.fixture(scope="module")
def liver_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("liver")
    runs = root / "runs"
    raw = {
        "name": "tinyliver", "description": "liver study smoke test",
        "data": {"source": "phantom", "subjects": SUBJECTS, "seed": SEED, "scale": SCALE},
        "format": "fat_fraction_slices", "fields": ["22402"], "folds": 2, "split_seed": 0,
        "training": {"arch": "resnet18", "input_size": [32, 64], "head": "regression",
                     "loss": "mse", "optimizer": "adam", "lr": 1e-3, "batch_size": 8,
                     "iterations": 4, "lr_steps": [3], "translate_px": 2, "seed": 0,
                     "checkpoint_every": 2, "num_workers": 0},
        "liver": {"templates": 2, "spacing_mm": 16.0, "erode_mm": 0.0,
                  "affine_iterations": 10, "bspline_iterations": 0, "comparison_size": 3},
    }
    path = root / "tinyliver.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = load_study(path)
    cohort = runs / "tinyliver" / "data" / "cohort"
    generate_cohort(cohort, SUBJECTS, SEED, SCALE, progress=False)
    prepare(cohort, runs / "tinyliver" / "data" / "prepared", formats=["fat_fraction_slices"],
            progress=False)
    for fold in range(study.folds):
        fold_dir = runs / "tinyliver" / "train" / "22402" / f"fold_{fold}"
        train_fold(study, "22402", fold, fold_dir, runs_root=runs, progress=False)
        (fold_dir / "done.json").write_text("{}")  # finished, as the train stage marks it
    messages: list[str] = []
    run_dir = runs / "tinyliver" / "liver"
    metrics = run_liver_study(study, run_dir, runs_root=runs, progress=False,
                              log=messages.append)
    return study, cohort, run_dir, metrics, messages


def test_planted_reference_outliers_are_found(liver_run):
    study, cohort, run_dir, metrics, _ = liver_run
    truth = pd.read_csv(cohort / "truth" / "parameters.csv", dtype={"eid": str})
    values = pd.read_csv(run_dir / "liver_fat.csv", dtype={"eid": str})
    in_a = set(values.loc[values.dataset == "A", "eid"])
    planted = set(truth.loc[truth.liver_fat_reference_outlier == 1, "eid"]) & in_a
    assert planted, "the fixture's cohort should hold a planted outlier in A"
    outliers = pd.read_csv(run_dir / "outliers.csv", dtype={"eid": str})
    assert list(outliers.columns) == ["eid", "reference", "network", "atlas"]
    assert len(outliers) == 10
    assert planted <= set(outliers.eid)
    # the atlas measures the true liver fat better than the planted reference does
    row = values.set_index("eid").loc[sorted(planted)[0]]
    true_ff = 100 * truth.set_index("eid").loc[row.name, "liver_fat_fraction"]
    assert abs(row.atlas - true_ff) < abs(row.reference - true_ff)


def test_datasets_table_and_figures_inputs(liver_run):
    study, cohort, run_dir, metrics, messages = liver_run
    fields = pd.read_csv(cohort / "fields.csv", dtype={"eid": str})
    n_a = int(fields["22402-2.0"].notna().sum())
    assert metrics["n"] == {"A": n_a, "B": SUBJECTS - n_a - 3, "C": 3}
    values = pd.read_csv(run_dir / "liver_fat.csv", dtype={"eid": str})
    assert values.network.notna().all()                       # every subject, A and B
    assert values.loc[values.dataset == "B", "atlas"].isna().all()   # atlas only on A and C
    measured = values[values.dataset.isin(["A", "C"])]
    assert (measured.atlas.notna() | measured.error.notna()).all()
    assert measured.atlas.notna().sum() >= len(measured) - 1
    table = pd.read_csv(run_dir / "comparison.csv")
    assert list(zip(table.truth, table.other, table.dataset)) == [
        ("reference", "network", "A"), ("reference", "atlas", "A"), ("atlas", "network", "A"),
        ("atlas", "network", "C")]
    assert (table.n[:3] >= n_a - 1).all() and table.n[3] == 3
    assert json.loads((run_dir / "metrics.json").read_text())["correction"]["n"] >= n_a - 1
    assert len(metrics["templates"]) == 2 and metrics["seconds_per_subject"]["atlas"] > 0


def test_bad_template_and_missing_target_are_reported_and_skipped(liver_run, tmp_path):
    study, cohort, run_dir, metrics, _ = liver_run
    cfg = atlas.AtlasConfig.from_dict(study.liver)
    good, other = metrics["templates"]
    labels = cohort / "truth" / "labels"
    from biometry.data.volumes import read_nifti
    data, affine = read_nifti(labels / f"{other}_labels.nii.gz")
    save_nifti(tmp_path / "cropped.nii.gz", data[:, :, :-3].astype(np.uint8), affine)
    messages: list[str] = []
    spacing = tuple(json.loads((cohort / "cohort.json").read_text())["fused_grid"]["spacing_mm"])
    templates = atlas.load_templates(
        cohort, {good: labels / f"{good}_labels.nii.gz", other: tmp_path / "cropped.nii.gz"},
        cfg, spacing, LABELS["liver"], log=messages.append)
    assert [t.eid for t in templates] == [good]
    assert len(messages) == 1 and messages[0].startswith(f"atlas: skipping template {other}: ")
    assert "grid of shape" in messages[0]
    values = pd.read_csv(run_dir / "liver_fat.csv", dtype={"eid": str})
    target = values.loc[(values.dataset == "A") & (values.eid != good), "eid"].iloc[0]
    messages.clear()
    qc = atlas.run_atlas(cohort, ["9999999", target], templates, cfg, spacing,
                         log=messages.append)
    assert messages == ["atlas: subject 9999999: no station images in " + str(cohort)]
    assert np.isnan(qc.atlas_raw[0]) and qc.error[0].startswith("subject 9999999")
    assert np.isfinite(qc.atlas_raw[1]) and qc.error[1] == "" and qc.mask_voxels[1] > 0


def test_table_and_figure_notebooks_draw_from_the_run(liver_run, tmp_path):
    study, cohort, run_dir, metrics, _ = liver_run
    from biometry.config.paths import notebooks_dir
    from biometry.runs.notebook import execute_notebook

    runs_root = run_dir.parents[1]
    for nb in ("table1_liver_fat", "fig02_liver_bland_altman"):
        execute_notebook(notebooks_dir() / f"{nb}.ipynb", tmp_path / f"{nb}.ipynb",
                         parameters={"study": str(study.path), "runs_root": str(runs_root),
                                     "out_dir": str(tmp_path / "figs")})
    table = pd.read_csv(tmp_path / "figs" / "table1_liver_fat.csv")
    assert table.equals(pd.read_csv(run_dir / "comparison.csv"))
    assert (tmp_path / "figs" / "fig02_liver_bland_altman.png").stat().st_size > 10_000


def test_a_fold_keeps_the_grid_its_images_were_made_on(liver_run):
    """What `biometry export` writes into a bundle, so that new subjects are prepared alike."""
    import torch

    from biometry.data.prepare import phantom_spacing

    _study, cohort, run_dir, _metrics, _messages = liver_run
    raw = torch.load(run_dir.parent / "train" / "22402" / "fold_0" / "model.pt",
                     weights_only=True)
    assert raw["input_grid_mm"] == list(phantom_spacing(cohort))
