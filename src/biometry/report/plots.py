"""Figures as functions of tables and arrays; byte-reproducible output.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state), under the
style :data:`STYLE`, and written by :func:`save_figure` with the creation date and software tags
removed, so that the same inputs give the same PDF and PNG bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from biometry import fileio
from biometry.analysis import stats

STYLE = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "biometry",
    "savefig.dpi": 200,
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
GROUP_COLOURS = {"anthropometry": "#1b9e77", "dxa": "#d95f02", "mri_atlas": "#7570b3",
                 "liver": "#e7298a", "organ": "#66a61e", "derived": "#e6ab02",
                 "disease": "#a6761d", "other": "#666666"}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
PNG_METADATA = {"Software": None}


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def scatter_bland_altman(reference, prediction, title: str = "", unit: str = "") -> Figure:
    """Prediction v. reference scatter with the identity line, beside a Bland-Altman plot.

    Parameters
    ----------
    reference, prediction : array_like, shape (n,)
        Paired values (NaN pairs are left out), in ``unit``.
    title : str
        Figure title (e.g. the field's label).
    unit : str
        Axis unit.

    Returns
    -------
    Figure
        Left: scatter, titled with N, R² and MAE. Right: mean of the pair v. prediction −
        reference, with the bias and the ±1.96 SD (ddof=1) limits of agreement.
    """
    numbers = stats.agreement(reference, prediction, nan_policy="omit")
    ref = np.asarray(reference, float)
    pred = np.asarray(prediction, float)
    ok = ~(np.isnan(ref) | np.isnan(pred))
    ref, pred = ref[ok], pred[ok]
    u = f" [{unit}]" if unit else ""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7.0, 3.2)
        ax1, ax2 = fig.subplots(1, 2)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        pad = 0.03 * (hi - lo or 1.0)
        ax1.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=0.8, zorder=1)
        ax1.scatter(ref, pred, s=6, alpha=0.6, lw=0, color="#1f77b4", zorder=2)
        ax1.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad), aspect="equal",
                xlabel=f"reference{u}", ylabel=f"prediction{u}",
                title=f"N={numbers['n']}, R²={numbers['r2']:.3f}, MAE={numbers['mae']:.3g}")
        mean = (ref + pred) / 2
        ax2.scatter(mean, pred - ref, s=6, alpha=0.6, lw=0, color="#1f77b4")
        for y, style in ((numbers["bias"], "-"), (numbers["loa_low"], "--"),
                         (numbers["loa_high"], "--")):
            ax2.axhline(y, color="#d62728", lw=0.9, ls=style)
        ax2.set(xlabel=f"mean of reference and prediction{u}",
                ylabel=f"prediction − reference{u}",
                title=(f"r={numbers['pearson_r']:.3f}, bias={numbers['bias']:.3g}, "
                       f"LoA {numbers['loa_low']:.3g} to {numbers['loa_high']:.3g}"))
        if title:
            fig.suptitle(title)
    return fig


def median_field_plot(field_metrics: pd.DataFrame, metric: str = "r2",
                      label: str = "name") -> Figure:
    """Fig. 3 style: one point per field, sorted by ``metric``, coloured by group, median marked.

    Parameters
    ----------
    field_metrics : DataFrame
        From :func:`biometry.analysis.results.field_metrics` (needs ``metric``, ``group``, ``label``).
    metric : str
        Column to plot (default R²).
    label : str
        Column naming each field on the axis.
    """
    df = field_metrics.sort_values([metric, label], kind="stable").reset_index(drop=True)
    if df.empty:
        raise ValueError("median_field_plot: no fields")
    median = float(df[metric].median())
    with matplotlib.rc_context(STYLE):
        fig = _figure(5.5, 1.0 + 0.16 * len(df))
        ax = fig.subplots()
        y = np.arange(len(df))
        for group in sorted(df["group"].unique()):
            sel = (df["group"] == group).to_numpy()
            ax.scatter(df.loc[sel, metric], y[sel], s=14, label=group,
                       color=GROUP_COLOURS.get(group, GROUP_COLOURS["other"]), zorder=3)
        ax.hlines(y, df[metric].min(), df[metric], color="0.85", lw=0.6, zorder=1)
        ax.axvline(median, color="k", ls="--", lw=0.8)
        ax.set_yticks(y, df[label].astype(str))
        ax.set_ylim(-0.7, len(df) - 0.3)
        name = "R²" if metric == "r2" else metric
        ax.set(xlabel=name, title=f"median {name} = {median:.3f} over {len(df)} fields")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="group")
    return fig


def umap_grid(embeddings: Mapping[str, pd.DataFrame], labels: Mapping[str, str] | None = None,
              ncols: int | None = None) -> Figure:
    """One UMAP panel per highlighted field, coloured by that field (Fig. 2 style).

    Parameters
    ----------
    embeddings : mapping field -> DataFrame
        From :func:`biometry.analysis.embedding.feature_space` (``umap_1``, ``umap_2``, ``value``).
    labels : mapping field -> str, optional
        Panel titles (default: the field key).
    ncols : int, optional
        Columns of the grid (default: about square).
    """
    if not embeddings:
        raise ValueError("umap_grid: no embeddings")
    labels = dict(labels or {})
    n = len(embeddings)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.6 * ncols, 2.4 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, (field, emb) in zip(axes, embeddings.items(), strict=False):
            order = np.argsort(emb["value"].to_numpy(), kind="stable")
            pts = ax.scatter(emb["umap_1"].to_numpy()[order], emb["umap_2"].to_numpy()[order],
                             c=emb["value"].to_numpy()[order], s=3, lw=0, cmap="viridis")
            fig.colorbar(pts, ax=ax, shrink=0.8)
            ax.set_title(labels.get(field, str(field)))
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[n:]:
            ax.set_axis_off()
    return fig


def image_grid(images, titles=None, channel: int = 0, ncols: int = 5) -> Figure:
    """Network input images side by side (e.g. a field's worst outliers), one channel each.

    Parameters
    ----------
    images : sequence of arrays, each (C, H, W) or (H, W)
        2-D formats as stored (row 0 at the top, head up), any dtype; shown in grey, each
        scaled to its own range.
    titles : sequence of str, optional
        One per image (e.g. ``"eid 1234567: +2.1 L"``).
    channel : int
        Channel shown for multi-channel images.
    ncols : int
        Images per row.
    """
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("image_grid: no images")
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(titles)} titles")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.0 * ncols, 2.1 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, im, title in zip(axes, images, titles, strict=False):
            ax.imshow(im[channel] if im.ndim == 3 else im, cmap="gray", interpolation="nearest")
            ax.set_title(title)
        for ax in axes:
            ax.set_axis_off()
    return fig


def save_figure(fig: Figure, path_without_ext: str | os.PathLike,
                formats: tuple[str, ...] = ("pdf", "png")) -> list[Path]:
    """Write ``fig`` as ``<path>.pdf`` and ``<path>.png`` atomically and byte-reproducibly.

    Returns
    -------
    list of Path
        The files written, in the order of ``formats``.
    """
    base = Path(path_without_ext)
    written = []
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            target = base.with_name(f"{base.name}.{fmt}")
            metadata = {"pdf": PDF_METADATA, "png": PNG_METADATA, "svg": {"Date": None}}.get(fmt)
            with fileio.atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, metadata=metadata)
            written.append(target)
    return written


# ---------------------------------------------------------------------------------------------
# uncertainty (the uncertainty paper's style: calibration curves, sparsification, release vs CV)


def calibration_curves(curves: pd.DataFrame, title: str = "") -> Figure:
    """Observed against expected coverage of central intervals, one line per field.

    ``curves``: ``field, expected, observed`` (and optionally ``observed_raw``, drawn dashed: the
    same before the variance scaling). The diagonal is a calibrated model.
    """
    fig = _figure(3.2, 3.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, zorder=0)
    for i, (key, t) in enumerate(curves.groupby("field", sort=True)):
        colour = f"C{i % 10}"
        ax.plot(np.r_[0, t["expected"], 1], np.r_[0, t["observed"], 1], color=colour, lw=1.2,
                label=str(key))
        if "observed_raw" in t:
            ax.plot(np.r_[0, t["expected"], 1], np.r_[0, t["observed_raw"], 1], color=colour,
                    lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="expected coverage of the central interval",
           ylabel="observed coverage", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", frameon=False, ncol=2)
    return fig


def sparsification_plot(curves: pd.DataFrame, title: str = "") -> Figure:
    """Sparsification curves per field: MAE (relative to all subjects) of the subjects kept as the
    most uncertain are removed (solid), against the oracle (dotted). ``curves``: ``field,
    removed, mae, oracle, random``."""
    fig = _figure(3.2, 3.0)
    ax = fig.add_subplot()
    for i, (key, t) in enumerate(curves.groupby("field", sort=True)):
        base = float(t["random"].iloc[0]) or 1.0
        ax.plot(t["removed"], t["mae"] / base, color=f"C{i % 10}", lw=1.2, label=str(key))
        ax.plot(t["removed"], t["oracle"] / base, color=f"C{i % 10}", lw=0.8, ls=":")
    ax.set(xlabel="fraction of subjects removed (most uncertain first)",
           ylabel="MAE / MAE of all subjects", title=title, xlim=(0, 1), ylim=(0, None))
    ax.legend(loc="lower left", frameon=False, ncol=2)
    return fig


def release_vs_cv(table: pd.DataFrame, title: str = "") -> Figure:
    """A later release against cross-validation per field (the MIMIR paper's Fig. 2, with the
    intervals): left, R² on the release (dot) over the CV folds' range (bar) and pooled CV R²
    (tick); right, coverage of the 95 % intervals with the 92-98 % band. ``table``: the output of
    :func:`biometry.inference.release.compare_release`."""
    fig = _figure(6.4, 0.35 * max(len(table), 3) + 0.8)
    ax_r2, ax_cov = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(table))[::-1]
    labels = [f"{r.field} (n={r.n})" for r in table.itertuples()]
    ax_r2.hlines(y, table["cv_r2_min"], table["cv_r2_max"], color="#999999", lw=4,
                 label="CV folds (range)")
    ax_r2.scatter(table["cv_r2"], y, marker="|", s=80, color="#333333", label="CV pooled")
    ax_r2.scatter(table["r2"], y, color="C0", s=14, zorder=3, label="later release")
    ax_r2.set(yticks=y, yticklabels=labels, xlabel="R²", title=title)
    ax_r2.legend(loc="lower left", frameon=False)
    ax_cov.axvspan(0.92, 0.98, color="#dddddd", zorder=0)
    ax_cov.axvline(0.95, color="#999999", lw=0.8)
    ax_cov.scatter(table["coverage95"], y, color="C1", s=14, zorder=3)
    ax_cov.set(xlabel="coverage of the 95 % intervals", xlim=(0.8, 1.0))
    return fig
