"""Figures: they draw what the tables say, and saving twice gives identical bytes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biometry.analysis import stats
from biometry.report import plots


def _pair(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(5, 1, n)
    return ref, ref + 0.2 + rng.normal(0, 0.3, n)


def test_scatter_bland_altman_draws_bias_and_limits(tmp_path):
    ref, pred = _pair()
    fig = plots.scatter_bland_altman(ref, pred, title="VAT", unit="L")
    ax_scatter, ax_ba = fig.axes
    bias, low, high = stats.limits_of_agreement(pred, ref)
    hlines = sorted(line.get_ydata()[0] for line in ax_ba.get_lines())
    assert hlines == pytest.approx(sorted([bias, low, high]))
    assert "N=80" in ax_scatter.get_title()
    offsets = ax_ba.collections[0].get_offsets()
    assert np.allclose(offsets[:, 1], pred - ref)


def test_median_field_plot_marks_the_median():
    fm = pd.DataFrame({"field": ["a", "b", "c"], "name": ["A", "B", "C"],
                       "group": ["dxa", "mri_atlas", "dxa"], "r2": [0.9, 0.99, 0.95]})
    fig = plots.median_field_plot(fm)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["A", "C", "B"]
    assert "median R² = 0.950" in ax.get_title()


def test_figures_saved_twice_are_byte_identical(tmp_path):
    ref, pred = _pair()
    rng = np.random.default_rng(1)
    emb = {k: pd.DataFrame(rng.normal(size=(50, 3)), columns=["umap_1", "umap_2", "value"])
           for k in ("22407", "23289", "31")}
    figures = {"ba": lambda: plots.scatter_bland_altman(ref, pred, "VAT", "L"),
               "grid": lambda: plots.umap_grid(emb, labels={"31": "sex"})}
    for name, make in figures.items():
        first = plots.save_figure(make(), tmp_path / "a" / name)
        second = plots.save_figure(make(), tmp_path / "b" / name)
        assert [p.suffix for p in first] == [".pdf", ".png"]
        for p, q in zip(first, second, strict=True):
            assert p.read_bytes() == q.read_bytes(), p.name
        assert first[0].read_bytes().startswith(b"%PDF")
    assert len(plots.umap_grid(emb).axes) == 4 + 3  # 2x2 grid (one blank) + 3 colour bars


def test_image_grid_shows_the_chosen_channel():
    images = [np.stack([np.full((4, 6), i, np.uint8), np.eye(4, 6, dtype=np.uint8)]) for i in range(3)]
    fig = plots.image_grid(images, titles=["a", "b", "c"], channel=1, ncols=2)
    shown = fig.axes[0].images[0].get_array()
    assert np.array_equal(shown, np.eye(4, 6))
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 images but 2 titles"):
        plots.image_grid(images, titles=["a", "b"])


def _inside_figure(fig) -> bool:
    """True when everything drawn (titles, labels, tick labels, legends) lies inside the figure:
    nothing is cut at its edge."""
    fig.canvas.draw()
    tight = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    width, height = fig.get_size_inches()
    return tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= width + 0.01 \
        and tight.y1 <= height + 0.01


def test_every_axis_names_field_and_unit():
    ref, pred = _pair()
    fig = plots.scatter_bland_altman(ref, pred, title="MriVatVolume (22407)", unit="L",
                                     name="MriVatVolume")
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "MriVatVolume, reference [L]"
    assert ax1.get_ylabel() == "MriVatVolume, predicted [L]"
    assert ax2.get_xlabel() == "MriVatVolume\nmean of reference and prediction [L]"  # wrapped
    assert ax2.get_ylabel() == "MriVatVolume\nprediction − reference [L]"
    assert fig.get_suptitle() == "MriVatVolume (22407)"
    assert _inside_figure(fig)
    assert plots.field_label("22407") == "MriVatVolume (22407)" and plots.field_unit("22407") == "L"
    # a long name: on its own line above what is shown, and still inside the figure
    long = plots.scatter_bland_altman(ref, pred, title=plots.field_label("22405"), unit="L",
                                      name="MriAnteriorThighLeanMuscleLeft")
    assert long.axes[1].get_ylabel() == "MriAnteriorThighLeanMuscleLeft\nprediction − reference [L]"
    assert _inside_figure(long)


def test_umap_grid_keeps_long_names_inside_and_draws_sex_in_two_colours():
    rng = np.random.default_rng(2)
    n = 60
    sex = pd.DataFrame({"umap_1": rng.normal(size=n), "umap_2": rng.normal(size=n),
                        "value": np.repeat([0.0, 1.0], n // 2)})
    sex.attrs.update({"n": n, "features": ["a", "b", "c"]})
    long = pd.DataFrame(rng.normal(size=(n, 3)), columns=["umap_1", "umap_2", "value"])
    emb = {"31": sex, "22433": long}
    fig = plots.feature_space_figure(emb)
    ax_sex = fig.axes[0]
    assert ax_sex.get_title() == "sex (31)\nN = 60, 3 fields"
    legend = [t.get_text() for t in ax_sex.get_legend().get_texts()]
    assert legend == ["female (30)", "male (30)"]
    assert len(ax_sex.collections) == 2  # one scatter per sex, no colour bar
    cbar = [ax for ax in fig.axes if ax.get_ylabel() == plots.field_unit("22433")]
    assert cbar, "the colour bar is labelled with the field's unit"
    assert _inside_figure(fig)
    name = plots.field_label("22433")
    assert len(name) > 30  # long enough to be wrapped
    assert fig.axes[1].get_title().startswith(plots.wrap(name, 30))


def test_metrics_heatmap_and_method_pairs_and_distributions():
    fm = pd.DataFrame({"field": ["22407", "21002"], "name": ["MriVatVolume", "weight"],
                       "r2": [0.9, 0.95], "icc": [0.93, 0.97], "pearson_r": [0.95, 0.98]})
    fig = plots.metrics_heatmap(fm)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["weight (21002)",
                                                            "MriVatVolume (22407)"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.90", "0.93", "0.95", "0.95", "0.97",
                                                      "0.98"]
    with pytest.raises(ValueError, match="not in the table: mae"):
        plots.metrics_heatmap(fm, metrics=("mae",))
    rng = np.random.default_rng(3)
    mri = rng.uniform(1, 5, 40)
    refs = pd.DataFrame({"22407": mri, "23289": 0.3 * mri + rng.normal(0, 0.05, 40),
                         "31": np.tile([0.0, 1.0], 20)})
    pairs = plots.reference_method_pairs(refs)
    (panel,) = [a for a in pairs.axes if a.get_xlabel()]
    assert panel.get_xlabel() == "MriVatVolume (22407) [L]"
    assert panel.get_ylabel() == "DxaVatVolume (23289) [L]"
    assert "visceral adipose tissue: N=40" in panel.get_title()
    assert plots.reference_method_pairs(refs[["31"]]) is None
    dist = plots.distributions_by_sex(refs.rename(columns={"31": "sex"}), ["22407"])
    assert dist.axes[0].get_ylabel() == "MriVatVolume (22407) [L]"
    assert dist.axes[0].get_title() == "MriVatVolume (22407), N=40"
    assert [t.get_text() for t in dist.axes[0].get_xticklabels()] == ["female", "male"]


@pytest.mark.slow
def test_new_figures_saved_twice_are_byte_identical(tmp_path):
    rng = np.random.default_rng(4)
    mri = rng.uniform(1, 5, 40)
    refs = pd.DataFrame({"22407": mri, "23289": 0.3 * mri + rng.normal(0, 0.05, 40),
                         "sex": np.tile([0.0, 1.0], 20)})
    fm = pd.DataFrame({"field": ["22407", "21002"], "name": ["MriVatVolume", "weight"],
                       "r2": [0.9, 0.95], "icc": [0.93, 0.97], "pearson_r": [0.95, 0.98]})
    table = pd.DataFrame({"reference": mri, "prediction": mri + 0.1, "lower": mri - 0.3,
                          "upper": mri + 0.5})
    figures = {"heat": lambda: plots.metrics_heatmap(fm),
               "pairs": lambda: plots.reference_method_pairs(refs),
               "sex": lambda: plots.distributions_by_sex(refs, ["22407", "23289"]),
               "intervals": lambda: plots.interval_plot(table, "MriVatVolume (22407)", "L")}
    for name, make in figures.items():
        first = plots.save_figure(make(), tmp_path / "a" / name)
        second = plots.save_figure(make(), tmp_path / "b" / name)
        for p, q in zip(first, second, strict=True):
            assert p.read_bytes() == q.read_bytes(), p.name
