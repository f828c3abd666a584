"""Interactive exploration of a study's results (``notebooks/explore.ipynb``).

:class:`FieldExplorer` gathers, for one field, what a researcher looks at: its metrics beside the
linear baseline, the scatter and Bland-Altman plot, the largest errors with their network input
images, the aggregated saliency map and each subject's 95 % interval where those stages have run.
It reads only the plain files of the run folders:

========================  ================================================================
what                      where (under ``papermill_runs/<study>/``)
========================  ================================================================
predictions               ``train/*/fold_*/predictions.csv`` (``variance`` column: intervals)
metrics v. baseline       ``evaluate/<field>/metrics.json`` (else: network metrics only)
input images              the study's prepared store (``data/prepared`` for a phantom study)
saliency                  ``saliency/<field>/saliency.png``, else ``aggregate_<sex>.npy``
========================  ================================================================

A stage that has not run gives a one-line note (:meth:`FieldExplorer.notes`), never a traceback.
:meth:`FieldExplorer.show` displays one field; :meth:`FieldExplorer.widget` binds it to a field
selector (ipywidgets) whose choice redraws the view.
"""

from __future__ import annotations

import json
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
from IPython.display import Image, Markdown, display

from biometry.analysis import evaluate
from biometry.analysis.agreement import outliers
from biometry.analysis.stats import agreement
from biometry.config import fields
from biometry.config.study import data_paths, resolve_study
from biometry.data.store import Store
from biometry.report import plots
from biometry.report.plots import field_label

#: two-sided 95 % normal quantile for the intervals drawn from a predicted variance
Z95 = 1.959963984540054
#: the columns of :meth:`FieldExplorer.metrics`, in order
METRIC_COLUMNS = ["n", "r2", "mae", "mape", "pearson_r", "icc", "bias", "loa_low", "loa_high"]


class FieldExplorer:
    """One study's results, field by field.

    Parameters
    ----------
    study : str or Study
        Preset name, path to a study YAML, or a Study.
    runs_root : path, optional
        Root of the run folders (default ``papermill_runs/``).
    data_dir : path, optional
        Folder with the fields table and ``prepared/`` (default: from the study).
    """

    def __init__(self, study, runs_root: str | Path | None = None, data_dir=None):
        self.study = resolve_study(study)
        self.runs_root = runs_root
        self.folder = evaluate.study_dir(self.study, runs_root)
        self.paths = data_paths(self.study, data_dir, runs_root)
        try:
            self.predictions = evaluate.study_predictions(self.study, runs_root)
        except (FileNotFoundError, ValueError) as exc:
            self.predictions = pd.DataFrame(columns=["eid", "fold", "field", "reference",
                                                     "prediction", "variance"])
            # the message names the runs and the command that makes them
            self._no_predictions = f"no training runs to show: {exc}"
        else:
            self._no_predictions = None
        self._store = None

    # -- what there is --------------------------------------------------------------------
    @property
    def fields(self) -> list[str]:
        """Fields with predictions, in the study's order (then any others, sorted)."""
        have = set(self.predictions["field"].astype(str))
        ordered = [k for k in self.study.fields if k in have]
        return ordered + sorted(have - set(ordered))

    def options(self) -> list[tuple[str, str]]:
        """(label, key) pairs for the field selector, e.g. ``("Weight (21002)", "21002")``."""
        return [(field_label(k), k) for k in self.fields]

    def _field(self, key: str) -> pd.DataFrame:
        return self.predictions[self.predictions["field"].astype(str) == str(key)]

    # -- numbers --------------------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        """One row per field: "name (id)", unit, N, R², MAE, and the baseline's R² where known."""
        rows = []
        for key in self.fields:
            m = self.metrics(key)
            net = m.loc["network"]
            base = m.loc["baseline", "r2"] if "baseline" in m.index else np.nan
            rows.append({"field": field_label(key), "unit": fields.get(key).unit,
                         "n": int(net["n"]), "r2": net["r2"], "mae": net["mae"],
                         "baseline_r2": base})
        return pd.DataFrame(rows, columns=["field", "unit", "n", "r2", "mae", "baseline_r2"])

    def metrics(self, key: str) -> pd.DataFrame:
        """The network's metrics beside the linear baseline's (rows), from ``03_evaluate_field``.

        Without that stage's ``metrics.json`` the network row is computed from the predictions
        and the baseline row is absent (see :meth:`notes`).
        """
        path = self.folder / "evaluate" / str(key) / "metrics.json"
        rows = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            rows = {name: saved[name] for name in ("network", "baseline") if name in saved}
        if "network" not in rows:
            sub = self._field(key)
            rows["network"] = agreement(sub["reference"], sub["prediction"], nan_policy="omit")
        table = pd.DataFrame.from_dict(rows, orient="index")
        return table[[c for c in METRIC_COLUMNS if c in table.columns]]

    def intervals(self, key: str) -> pd.DataFrame | None:
        """Each subject's 95 % interval ``prediction ± 1.96·sqrt(variance)``; None without variance.

        Returns
        -------
        DataFrame or None
            ``eid, reference, prediction, lower, upper, inside`` sorted by eid, in the field's
            unit; None when the runs wrote no ``variance`` (a regression head).
        """
        sub = self._field(key)
        if "variance" not in sub.columns:
            return None
        var = pd.to_numeric(sub["variance"], errors="coerce")
        if not var.notna().any():
            return None
        half = Z95 * np.sqrt(var.clip(lower=0))
        out = pd.DataFrame({"eid": sub["eid"].astype(str), "reference": sub["reference"],
                            "prediction": sub["prediction"], "lower": sub["prediction"] - half,
                            "upper": sub["prediction"] + half})
        out["inside"] = (out["reference"] >= out["lower"]) & (out["reference"] <= out["upper"])
        return out.dropna(subset=["lower"]).sort_values("eid", kind="stable").reset_index(drop=True)

    def outliers(self, key: str, n: int = 5) -> pd.DataFrame:
        """The ``n`` subjects with the largest absolute error."""
        return outliers(self.predictions, str(key), n=n)

    # -- pictures -------------------------------------------------------------------------
    def figure(self, key: str):
        """Scatter and Bland-Altman panels, axes named with the field's name and unit."""
        sub = self._field(key)
        f = fields.get(key)
        return plots.scatter_bland_altman(sub["reference"], sub["prediction"],
                                          title=field_label(key), unit=f.unit, name=f.name)

    def interval_figure(self, key: str):
        """Every subject's interval against its reference (None without variance)."""
        table = self.intervals(key)
        if table is None:
            return None
        f = fields.get(key)
        return plots.interval_plot(table, title=field_label(key), unit=f.unit, name=f.name)

    def store(self) -> Store | None:
        """The prepared store holding the study's format, or None where there is none."""
        if self._store is None:
            try:
                store = Store.open(self.paths.prepared)
                store.array(self.study.format)
            except (FileNotFoundError, KeyError, ValueError):
                return None
            self._store = store
        return self._store

    def outlier_images(self, key: str, n: int = 5):
        """The largest errors' network inputs side by side (None without a prepared store)."""
        store = self.store()
        if store is None:
            return None
        arr = store.array(self.study.format)
        worst = self.outliers(key, n)
        # a subject whose preparation failed has no images: show the others
        worst = worst[worst["eid"].astype(str).isin(set(store.subjects["eid"].astype(str)))]
        if worst.empty:
            return None
        rows = store.rows(worst["eid"].tolist())
        images = [np.asarray(arr[int(r)]) for r in rows]
        unit = fields.get(key).unit
        titles = [f"{e}: {err:+.3g} {unit}" for e, err in zip(worst["eid"], worst["error"])]
        return plots.image_grid(images, titles)

    def saliency_dir(self, key: str) -> Path:
        return self.folder / "saliency" / str(key)

    def saliency(self, key: str):
        """``saliency.png`` when the saliency stage wrote one; else a figure of the per-sex
        ``aggregate_<sex>.npy`` maps; else None."""
        folder = self.saliency_dir(key)
        png = folder / "saliency.png"
        if png.is_file():
            return Image(filename=str(png))
        maps = sorted(folder.glob("aggregate_*.npy"))
        if not maps:
            return None
        arrays = [np.load(p) for p in maps]
        titles = [f"{field_label(key)}: {p.stem.removeprefix('aggregate_')}" for p in maps]
        return plots.image_grid(arrays, titles, cmap="inferno")

    def notes(self, key: str) -> list[str]:
        """One line per stage whose output is missing for ``key`` (what to run to get it)."""
        out = []
        if self._no_predictions:
            return [self._no_predictions]
        if not (self.folder / "evaluate" / str(key) / "metrics.json").is_file():
            out.append(f"no baseline yet: `03_evaluate_field` has not run for {key} "
                       "(metrics of the network only)")
        if self.intervals(key) is None:
            out.append("no intervals: the runs wrote no `variance` (train a mean-variance head "
                       "for per-subject intervals)")
        if self.store() is None:
            out.append(f"no input images: no prepared store with format {self.study.format!r} "
                       f"at {self.paths.prepared}")
        folder = self.saliency_dir(key)
        if not (folder / "saliency.png").is_file() and not any(folder.glob("aggregate_*.npy")):
            out.append(f"no saliency map yet: nothing in {folder} "
                       "(run the saliency stage)")
        return out

    # -- display --------------------------------------------------------------------------
    def show(self, key: str) -> None:
        """Display everything there is for ``key``, with a note for each missing stage."""
        key = str(key)
        if self._no_predictions:
            display(Markdown(f"**Note:** {self.notes(key)[0]}"))
            return
        if key not in self.fields:
            display(Markdown(f"**Note:** no predictions for field {key} in study "
                             f"{self.study.name!r}; fields with predictions: "
                             f"{', '.join(self.fields)}"))
            return
        display(Markdown(f"### {field_label(key)}"))
        unit = fields.get(key).unit
        display(self.metrics(key).round(4).rename(columns={
            "r2": "R²", "mae": f"MAE [{unit}]", "mape": "MAPE [%]", "pearson_r": "r",
            "icc": "ICC", "bias": f"bias [{unit}]", "loa_low": f"LoA low [{unit}]",
            "loa_high": f"LoA high [{unit}]"}))
        display(self.figure(key))
        display(Markdown(f"**Largest errors** (prediction − reference, {unit})"))
        display(self.outliers(key))
        grid = self.outlier_images(key)
        if grid is not None:
            display(grid)
        sal = self.saliency(key)
        if sal is not None:
            display(Markdown("**Aggregated saliency**"))
            display(sal)
        ifig = self.interval_figure(key)
        if ifig is not None:
            table = self.intervals(key)
            display(Markdown(f"**95 % intervals**: {table['inside'].mean():.1%} of "
                             f"{len(table)} references inside"))
            display(ifig)
        for note in self.notes(key):
            display(Markdown(f"*Note:* {note}"))

    def widget(self, value: str | None = None) -> widgets.VBox:
        """A field selector above an output area; choosing a field redraws the view."""
        options = self.options()
        keys = [k for _, k in options]
        value = str(value) if value is not None and str(value) in keys else \
            (keys[0] if keys else None)
        selector = widgets.Dropdown(options=options, value=value, description="field",
                                    layout=widgets.Layout(width="28em"))
        out = widgets.Output()

        def redraw(change=None):
            out.clear_output(wait=True)
            with out:
                if selector.value is None:
                    self.show("")
                else:
                    self.show(selector.value)

        selector.observe(redraw, names="value")
        redraw()
        return widgets.VBox([selector, out])
