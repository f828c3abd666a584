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
