"""Figures as functions of tables and arrays; byte-reproducible output.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state), under the
style :data:`STYLE`, and written by :func:`save_figure` with the creation date and software tags
removed, so that the same inputs give the same PDF and PNG bytes. seaborn draws onto those
figures' axes (``ax=``) where it makes a statistical figure clearer (distributions by sex, the
metrics heat map, the DXA-vs-MRI pairs); nothing random is left in its calls (no bootstrap).

Every axis names the field and its unit (:func:`axis_label`), every title the field's name with
its id; figures use the constrained layout and long titles are wrapped, so nothing is cut at the
figure's edge.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from biometry import fileio
from biometry.analysis import stats
from biometry.analysis.embedding import SEX_CATEGORIES
from biometry.config import fields

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


def axis_label(name: str, unit: str = "", what: str = "", width: int = 36) -> str:
    """``"MriVatVolume, reference [L]"``: a field's name, what is shown of it, and its unit.

    Longer than ``width`` characters, the name goes on its own line above "what [unit]", so that
    a long field name stays within the axis (and the figure).
    """
    tail = " ".join(t for t in (what, f"[{unit}]" if unit else "") if t)
    text = ", ".join(t for t in (name, what) if t) + (f" [{unit}]" if unit else "")
    if len(text) <= width or not name or not tail:
        return text
    return f"{wrap(name, width)}\n{wrap(tail, width)}"


def field_label(key: str) -> str:
    """``"MriVatVolume (22407)"``: the field's name with its id (the key itself if unknown)."""
    try:
        return f"{fields.get(key).name} ({key})"
    except (KeyError, ValueError):
        return str(key)


def field_unit(key: str) -> str:
    """The field's unit in the catalogue ("" if unknown)."""
    try:
        return fields.get(key).unit
    except (KeyError, ValueError):
        return ""


def wrap(text: str, width: int = 32) -> str:
    """Wrap a title to lines of at most ``width`` characters (a long field name stays inside)."""
    return "\n".join(textwrap.wrap(str(text), width, break_long_words=True)) if text else ""


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def scatter_bland_altman(reference, prediction, title: str = "", unit: str = "",
                         name: str = "") -> Figure:
    """Prediction v. reference scatter with the identity line, beside a Bland-Altman plot.

    Parameters
    ----------
    reference, prediction : array_like, shape (n,)
        Paired values (NaN pairs are left out), in ``unit``.
    title : str
        Figure title (the field's name with its id, e.g. ``"MriVatVolume (22407)"``).
    unit : str
        The field's unit, on every axis.
    name : str
        The field's name, on every axis.

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
    with matplotlib.rc_context(STYLE):
        fig = _figure(7.0, 3.2)
        ax1, ax2 = fig.subplots(1, 2)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        pad = 0.03 * (hi - lo or 1.0)
        ax1.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=0.8, zorder=1)
        ax1.scatter(ref, pred, s=6, alpha=0.6, lw=0, color="#1f77b4", zorder=2)
        ax1.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad), aspect="equal",
                xlabel=axis_label(name, unit, "reference"),
                ylabel=axis_label(name, unit, "predicted"),
                title=f"N={numbers['n']}, R²={numbers['r2']:.3f}, MAE={numbers['mae']:.3g}")
        mean = (ref + pred) / 2
        ax2.scatter(mean, pred - ref, s=6, alpha=0.6, lw=0, color="#1f77b4")
        for y, style in ((numbers["bias"], "-"), (numbers["loa_low"], "--"),
                         (numbers["loa_high"], "--")):
            ax2.axhline(y, color="#d62728", lw=0.9, ls=style)
        ax2.set(xlabel=axis_label(name, unit, "mean of reference and prediction"),
                ylabel=axis_label(name, unit, "prediction − reference"),
                title=(f"r={numbers['pearson_r']:.3f}, bias={numbers['bias']:.3g}, "
                       f"LoA {numbers['loa_low']:.3g} to {numbers['loa_high']:.3g}"))
        if title:
            fig.suptitle(wrap(title, 80))
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
              ncols: int | None = None, units: Mapping[str, str] | None = None,
              categories: Mapping[str, Mapping[float, str]] | None = None,
              title: str = "") -> Figure:
    """One UMAP panel per highlighted field, coloured by that field (Fig. 2 style).

    Parameters
    ----------
    embeddings : mapping field -> DataFrame
        From :func:`biometry.analysis.embedding.feature_space` (``umap_1``, ``umap_2``, ``value``;
        ``attrs["n"]`` and ``attrs["features"]`` when present).
    labels : mapping field -> str, optional
        Panel titles (default: the field key); wrapped so that they stay inside the figure.
    ncols : int, optional
        Columns of the grid (default: about square).
    units : mapping field -> str, optional
        The colour bar's label (the field's unit).
    categories : mapping field -> {value: label}, optional
        Fields drawn in discrete colours with a legend instead of a colour bar (e.g. sex:
        ``{0: "female", 1: "male"}``).
    title : str, optional
        Figure title (wrapped).

    Each panel's title states the number of subjects N (the embedding's rows) and, where
    known, the number of fields that span its embedding.
    """
    if not embeddings:
        raise ValueError("umap_grid: no embeddings")
    labels, units, categories = dict(labels or {}), dict(units or {}), dict(categories or {})
    n = len(embeddings)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    palette = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a"]
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.0 * ncols, 2.9 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, (field, emb) in zip(axes, embeddings.items(), strict=False):
            x, y = emb["umap_1"].to_numpy(float), emb["umap_2"].to_numpy(float)
            value = emb["value"].to_numpy(float)
            if field in categories:
                for i, (code, name) in enumerate(sorted(categories[field].items())):
                    sel = value == code
                    ax.scatter(x[sel], y[sel], s=4, lw=0, alpha=0.8, color=palette[i % 4],
                               label=f"{name} ({int(sel.sum())})")
                ax.legend(loc="best", frameon=False, markerscale=2.5, handletextpad=0.2)
            else:
                order = np.argsort(value, kind="stable")
                pts = ax.scatter(x[order], y[order], c=value[order], s=4, lw=0, cmap="viridis")
                bar = fig.colorbar(pts, ax=ax, shrink=0.8)
                bar.set_label(units.get(field, ""))
            features = emb.attrs.get("features")
            spanned = f", {len(features)} fields" if features is not None else ""
            ax.set_title(wrap(labels.get(field, str(field)), 30)
                         + f"\nN = {emb.attrs.get('n', len(emb))}{spanned}")
            ax.set(xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])
        for ax in axes[n:]:
            ax.set_axis_off()
        if title:
            fig.suptitle(wrap(title, 45 * ncols))
    return fig


def feature_space_figure(embeddings: Mapping[str, pd.DataFrame], ncols: int = 2) -> Figure:
    """Fig. 2: :func:`umap_grid` with each panel titled "name (id)", N and the number of fields,
    colour bars labelled with the unit, and sex (field 31) in two colours."""
    return umap_grid(embeddings, labels={k: field_label(k) for k in embeddings},
                     units={k: field_unit(k) for k in embeddings},
                     categories={"31": SEX_CATEGORIES}, ncols=min(ncols, len(embeddings)),
                     title="UMAP of the cohort's fields; each panel is embedded without the "
                           "field it is coloured by")


def image_grid(images, titles=None, channel: int = 0, ncols: int = 5,
               cmap: str = "gray") -> Figure:
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
    cmap : str
        Colour map (``"gray"`` for images, e.g. ``"inferno"`` for saliency maps).
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
            ax.imshow(im[channel] if im.ndim == 3 else im, cmap=cmap, interpolation="nearest")
            ax.set_title(wrap(title, 28))
        for ax in axes:
            ax.set_axis_off()
    return fig


def interval_plot(intervals: pd.DataFrame, title: str = "", unit: str = "",
                  name: str = "") -> Figure:
    """Each subject's 95 % interval against its reference value.

    Parameters
    ----------
    intervals : DataFrame
        ``reference``, ``prediction``, ``lower``, ``upper`` (and ``inside``), one row per subject,
        as from :meth:`biometry.report.explore.FieldExplorer.intervals`.
    title, unit, name : str
        The field's label, unit and name (axes read e.g. "MriVatVolume, reference [L]").

    Returns
    -------
    Figure
        Prediction with its interval (vertical bar) over the reference, the identity line; bars
        that miss the reference in red; the title gives the share of references inside.
    """
    df = intervals.dropna(subset=["reference", "prediction", "lower", "upper"])
    if df.empty:
        raise ValueError("interval_plot: no subject with an interval")
    inside = (df["reference"] >= df["lower"]) & (df["reference"] <= df["upper"])
    with matplotlib.rc_context(STYLE):
        fig = _figure(4.2, 3.6)
        ax = fig.subplots()
        lo = float(min(df["reference"].min(), df["lower"].min()))
        hi = float(max(df["reference"].max(), df["upper"].max()))
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, zorder=1)
        for ok, colour, label in ((True, "#1f77b4", "reference inside"),
                                  (False, "#d62728", "reference outside")):
            sel = (inside == ok).to_numpy()
            if not sel.any():
                continue
            part = df[sel]
            ax.errorbar(part["reference"], part["prediction"],
                        yerr=[part["prediction"] - part["lower"], part["upper"] - part["prediction"]],
                        fmt="o", ms=2.5, lw=0.6, color=colour, label=f"{label} ({int(sel.sum())})")
        ax.set(xlabel=axis_label(name, unit, "reference"),
               ylabel=axis_label(name, unit, "predicted, 95 % interval"),
               title=wrap(f"{title}: {inside.mean():.0%} of N={len(df)} inside", 48))
        ax.legend(loc="upper left", frameon=False)
    return fig


def metrics_heatmap(field_metrics: pd.DataFrame, metrics=("r2", "icc", "pearson_r"),
                    label: str = "name") -> Figure:
    """The per-field metrics table as a heat map (seaborn), one row per field.

    Parameters
    ----------
    field_metrics : DataFrame
        Table 1 (:func:`biometry.analysis.results.field_metrics`): ``field``, ``label`` and the
        ``metrics`` columns.
    metrics : sequence of str
        Columns on one 0-1 colour scale (agreement measures), annotated with their values.
    label : str
        Column naming each field; rows read "name (id)", sorted by the first metric.
    """
    missing = [m for m in metrics if m not in field_metrics.columns]
    if missing:
        raise ValueError(f"metrics_heatmap: column(s) not in the table: {', '.join(missing)}")
    df = field_metrics.sort_values([metrics[0], "field"], ascending=[False, True], kind="stable")
    rows = [f"{n} ({f})" for n, f in zip(df[label], df["field"])]
    names = {"r2": "R²", "icc": "ICC", "pearson_r": "Pearson r", "mae": "MAE", "mape": "MAPE %"}
    data = pd.DataFrame(df[list(metrics)].to_numpy(float), index=rows,
                        columns=[names.get(m, m) for m in metrics])
    with matplotlib.rc_context(STYLE):
        fig = _figure(1.6 + 0.7 * len(metrics) + 0.055 * max(map(len, rows)),
                      0.9 + 0.22 * len(rows))
        ax = fig.subplots()
        sns.heatmap(data, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f",
                    annot_kws={"size": 6}, linewidths=0.4, linecolor="white",
                    cbar_kws={"label": "agreement (0-1)", "shrink": 0.8})
        ax.set(xlabel="metric (cross-validated, network against reference)", ylabel="field",
               title=f"agreement per field, {len(rows)} fields")
        ax.tick_params(axis="both", length=0)
    return fig


def method_pairs(references: pd.DataFrame, pairs, ncols: int = 3) -> Figure:
    """Pair plots of two methods measuring one property (DXA against the MRI atlas), seaborn.

    Parameters
    ----------
    references : DataFrame indexed by eid
        Reference values in the catalogue's units, one column per field key.
    pairs : sequence of (x_key, y_key, property, x_label, y_label, x_unit, y_unit)
        One panel each: x (e.g. the MRI field) against y (the DXA field); labels are the
        fields' names with their ids.
    ncols : int
        Panels per row.

    Returns
    -------
    Figure
        Per panel: the subjects with both fields, the least-squares line (no bootstrap band, so
        the figure is deterministic), the identity line where both share a unit, N and r.
    """
    pairs = [p for p in pairs if p[0] in references.columns and p[1] in references.columns]
    if not pairs:
        raise ValueError("method_pairs: no pair with both fields in the table")
    ncols = min(ncols, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.9 * ncols, 2.8 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, (xk, yk, prop, xl, yl, xu, yu) in zip(axes, pairs, strict=False):
            both = references[[xk, yk]].apply(pd.to_numeric, errors="coerce").dropna()
            if len(both) < 3:
                ax.text(0.5, 0.5, f"{prop}: fewer than 3 subjects with both", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            r = stats.pearson_r(both[xk], both[yk])
            sns.regplot(x=both[xk].to_numpy(float), y=both[yk].to_numpy(float), ax=ax, ci=None,
                        scatter_kws={"s": 5, "linewidths": 0, "alpha": 0.6},
                        line_kws={"lw": 1.0, "color": "#d62728"})
            if xu == yu:
                lo = float(min(both.min()))
                hi = float(max(both.max()))
                ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls=":", label="identity")
                ax.legend(loc="upper left", frameon=False)
            ax.set(xlabel=axis_label(xl, xu), ylabel=axis_label(yl, yu),
                   title=wrap(f"{prop}: N={len(both)}, r={r:.3f}", 40))
        for ax in axes[len(pairs):]:
            ax.set_axis_off()
    return fig


def reference_method_pairs(references: pd.DataFrame, ncols: int = 3) -> Figure | None:
    """:func:`method_pairs` for every pair of the catalogue (``config/data/field_pairs.csv``):
    the MRI field (or the atlas liver fat) on x, the DXA field (or the liver-fat field) on y.
    None when the table holds no pair (a cohort without DXA)."""
    rows = []
    for _, p in fields.pairs().iterrows():
        x, y = fields.get(p["b"]), fields.get(p["a"])
        rows.append((x.key, y.key, p["property"], f"{x.name} ({x.key})", f"{y.name} ({y.key})",
                     x.unit, y.unit))
    if not any(r[0] in references.columns and r[1] in references.columns for r in rows):
        return None
    return method_pairs(references, rows, ncols=ncols)


def distributions_by_sex(table: pd.DataFrame, keys, sex: str = "sex",
                         labels: Mapping[str, str] | None = None,
                         units: Mapping[str, str] | None = None, ncols: int = 3) -> Figure:
    """Each field's distribution in women and men side by side (seaborn violins).

    Parameters
    ----------
    table : DataFrame
        One row per subject: the ``keys`` columns in their units and a ``sex`` column
        (0 female, 1 male).
    keys : sequence of str
        Fields, one panel each.
    labels, units : mapping key -> str, optional
        The field's "name (id)" for the title and its unit for the axis (default: from the
        catalogue).
    """
    keys = [str(k) for k in keys]
    labels = {k: field_label(k) for k in keys} | dict(labels or {})
    units = {k: field_unit(k) for k in keys} | dict(units or {})
    sexes = table[sex].map({0: "female", 1: "male"})
    ncols = min(ncols, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.4 * ncols, 2.4 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, key in zip(axes, keys, strict=False):
            frame = pd.DataFrame({"sex": sexes, "value": pd.to_numeric(table[key],
                                                                       errors="coerce")}).dropna()
            sns.violinplot(data=frame, x="sex", y="value", hue="sex", order=["female", "male"],
                           hue_order=["female", "male"], palette=["#d95f02", "#1b9e77"],
                           ax=ax, cut=0, inner="quartile", linewidth=0.7, legend=False)
            ax.set(xlabel="sex", ylabel=axis_label(labels.get(key, key), units.get(key, ""), width=30),
                   title=wrap(f"{labels.get(key, key)}, N={len(frame)}", 30))
        for ax in axes[len(keys):]:
            ax.set_axis_off()
    return fig


def bland_altman_panels(panels, unit: str = "", threshold: float | None = None) -> Figure:
    """Bland-Altman plots side by side (the liver study's Fig. 2).

    Parameters
    ----------
    panels : sequence of (title, truth, other) with paired arrays (NaN pairs left out); the
        difference drawn is other − truth against the mean of the pair.
    unit : axis unit.
    threshold : if given, a dotted vertical line at this mean (e.g. 5.5 % fatty liver).

    Returns
    -------
    Figure
        One panel per entry with the bias and ±1.96 SD (ddof=1) limits, titled with N and them.
    """
    u = f" [{unit}]" if unit else ""
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.2 * len(panels), 3.0)
        axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
        for ax, (title, truth, other) in zip(axes, panels):
            a, b = np.asarray(truth, float), np.asarray(other, float)
            ok = ~(np.isnan(a) | np.isnan(b))
            a, b = a[ok], b[ok]
            bias, low, high = stats.limits_of_agreement(b, a)
            ax.scatter((a + b) / 2, b - a, s=6, alpha=0.6, lw=0, color="#1f77b4")
            for y, style in ((bias, "-"), (low, "--"), (high, "--")):
                ax.axhline(y, color="#d62728", lw=0.9, ls=style)
            if threshold is not None:
                ax.axvline(threshold, color="0.5", lw=0.8, ls=":")
            ax.set(xlabel=f"mean{u}", ylabel=f"difference{u}",
                   title=f"{title}\nN={a.size}, bias {bias:.2f}, LoA {low:.2f} to {high:.2f}")
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


def saliency_grid(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], ncols: int = 3,
                  cmap: str = "inferno") -> Figure:
    """The paper's Fig. 4 layout: per panel, a cohort's squared saliency as a heat map over the
    reference subject's water image.

    Parameters
    ----------
    panels : title -> (water (H, W) of the reference, aggregate (H, W) = mean squared saliency),
        both in the reference's image space ([coronal | sagittal], head up, patient left on the
        image right). The aggregate is drawn as it is (scaled to its own maximum for the colour
        map, transparent where it is zero); no other post-processing.
    ncols : panels per row.
    """
    if not panels:
        raise ValueError("saliency_grid: no panels")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.4 * ncols, 2.6 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, (title, (water, agg)) in zip(axes, panels.items()):
            water, agg = np.asarray(water, dtype=np.float32), np.asarray(agg, dtype=np.float32)
            if water.shape != agg.shape:
                raise ValueError(f"saliency_grid: panel {title!r}: water {water.shape} and "
                                 f"saliency {agg.shape} differ")
            ax.imshow(water, cmap="gray", interpolation="nearest")
            top = float(agg.max())
            heat = np.ma.masked_less_equal(agg, 0.0)
            ax.imshow(heat, cmap=cmap, alpha=0.75, vmin=0.0, vmax=top if top > 0 else 1.0,
                      interpolation="nearest")
            ax.set_title(title)
        for ax in axes:
            ax.set_axis_off()
    return fig


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


def release_vs_cv(table: pd.DataFrame, members: pd.DataFrame, title: str = "") -> Figure:
    """A later release against the cross-validation per field (the MIMIR paper's Fig. 2, with
    the intervals). Left: R² of each fold network alone on the release (dots) over the CV folds'
    range (grey bar), and of the ensemble (diamond), all as differences from the pooled CV R² so
    that easy and hard fields share one scale. Right: coverage of the 95 % intervals of the
    ensemble by the ambiguity rule (dot) and the mixture (cross), and of fold 0 alone (ring), with
    the 92-98 % band. ``table``/``members``: the outputs of
    :func:`biometry.inference.release.compare_release`."""
    fig = _figure(6.8, 0.32 * max(len(table), 3) + 1.6)
    ax_r2, ax_cov = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(table))[::-1]
    row = {str(f): yi for f, yi in zip(table["field"].astype(str), y, strict=True)}
    base = dict(zip(table["field"].astype(str), table["cv_r2"], strict=True))
    labels = [f"{r.field} (n={r.n})" for r in table.itertuples()]
    ax_r2.axvline(0.0, color="#999999", lw=0.8)
    ax_r2.hlines(y, table["cv_r2_min"] - table["cv_r2"], table["cv_r2_max"] - table["cv_r2"],
                 color="#999999", lw=5, label="CV folds (range)")
    m = members[members["field"].astype(str).isin(row)]
    field = m["field"].astype(str)
    ax_r2.scatter(m["r2"] - field.map(base), field.map(row), color="C0", s=12, zorder=3,
                  label="each fold network on the release")
    ax_r2.scatter(table["ensemble_r2"] - table["cv_r2"], y, marker="D", color="C2", s=14,
                  zorder=3, label="ensemble on the release")
    ax_r2.set(yticks=y, yticklabels=labels, xlabel="R² − pooled CV R²", title=title)
    ax_r2.xaxis.set_major_locator(MaxNLocator(4))
    ax_r2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False,
                 fontsize="small")
    ax_cov.axvspan(0.92, 0.98, color="#dddddd", zorder=0)
    ax_cov.axvline(0.95, color="#999999", lw=0.8)
    ax_cov.scatter(table["coverage95_ambiguity"], y, color="C1", s=16, zorder=3,
                   label="ensemble (ambiguity rule)")
    ax_cov.scatter(table["coverage95_mixture"], y, color="#555555", marker="x", s=16, zorder=3,
                   label="ensemble (mixture)")
    ax_cov.scatter(table["coverage95_member0"], y, facecolors="none", edgecolors="C0", s=22,
                   zorder=3, label="fold 0 alone")
    ax_cov.set(xlabel="coverage of the 95 % intervals", xlim=(0.8, 1.0),
               xticks=[0.8, 0.85, 0.9, 0.95, 1.0])
    ax_cov.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False,
                  fontsize="small")
    return fig
