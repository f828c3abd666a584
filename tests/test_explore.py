"""The explorer behind notebooks/explore.ipynb on a tiny finished study: what it shows, and a
clear note (never a traceback) for each stage that has not run."""

from __future__ import annotations

import numpy as np
import pytest

from biometry.config.paths import notebooks_dir
from biometry.report.explore import Z95, FieldExplorer, field_label
from biometry.runs.notebook import execute_notebook

pytestmark = pytest.mark.slow  # the finished study takes a few seconds to build


def test_metrics_beside_the_baseline_where_evaluated(finished_study):
    path, runs = finished_study
    ex = FieldExplorer(str(path), runs)
    assert ex.fields == ["22407", "21002", "22405"]  # the study's order
    assert ("MriVatVolume (22407)", "22407") in ex.options()
    evaluated = ex.metrics("22407")
    assert list(evaluated.index) == ["network", "baseline"]
    only_network = ex.metrics("22405")
    assert list(only_network.index) == ["network"]
    sub = ex.predictions[ex.predictions["field"] == "22405"]
    assert only_network.loc["network", "n"] == len(sub)
    assert "no baseline yet" in " ".join(ex.notes("22405"))
    assert not any("baseline" in n for n in ex.notes("22407"))
    summary = ex.summary()
    assert summary["field"].tolist() == [field_label(k) for k in ex.fields]
    by = summary.set_index("field")["baseline_r2"]
    assert np.isnan(by["weight (21002)"])
    assert by["MriVatVolume (22407)"] == pytest.approx(evaluated.loc["baseline", "r2"])


def test_intervals_from_the_variance_column(finished_study):
    path, runs = finished_study
    ex = FieldExplorer(str(path), runs)
    table = ex.intervals("21002")
    sub = ex.predictions[ex.predictions["field"] == "21002"].sort_values("eid")
    half = Z95 * np.sqrt(sub["variance"].to_numpy())
    assert np.allclose(table["upper"] - table["prediction"], half)
    assert np.allclose(table["prediction"] - table["lower"], half)
    inside = (sub["reference"].to_numpy() >= table["lower"]) & \
        (sub["reference"].to_numpy() <= table["upper"])
    assert table["inside"].tolist() == inside.tolist()
    assert ex.intervals("22407") is None
    assert any("no intervals" in n for n in ex.notes("22407"))
    fig = ex.interval_figure("21002")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "weight, reference [kg]"
    assert "weight (21002)" in ax.get_title()


def test_saliency_and_images_or_a_note(finished_study, tmp_path):
    path, runs = finished_study
    ex = FieldExplorer(str(path), runs)
    assert ex.saliency("22407") is not None  # aggregate_female.npy
    assert ex.saliency("21002") is None
    assert any("no saliency map yet" in n for n in ex.notes("21002"))
    grid = ex.outlier_images("21002", n=3)
    assert len(grid.axes) == 3 and "kg" in grid.axes[0].get_title()
    # without a prepared store: a note naming where it was looked for
    bare = FieldExplorer(str(path), runs, data_dir=tmp_path)
    assert bare.outlier_images("21002") is None
    assert any("no input images" in n and str(tmp_path) in n for n in bare.notes("21002"))


def test_a_study_without_runs_gives_a_note(finished_study, tmp_path):
    path, _ = finished_study
    ex = FieldExplorer(str(path), tmp_path / "nothing")
    assert ex.fields == []
    (note,) = ex.notes("22407")
    assert "no training runs" in note and "biometry run train" in note


def test_explore_notebook_runs_headless_and_degrades(finished_study, tmp_path):
    path, runs = finished_study
    out = tmp_path / "explore.ipynb"
    execute_notebook(notebooks_dir() / "explore.ipynb", out,
                     parameters={"study": str(path), "field": "22405", "runs_root": str(runs)})
    text = out.read_text()
    assert "Traceback" not in text and '"output_type": "error"' not in text
    assert "MriVatVolume (22407)" in text  # the summary table
