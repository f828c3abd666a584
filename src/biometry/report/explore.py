"""Interactive exploration of a study's results (``notebooks/explore.ipynb``).

:class:`FieldExplorer` gathers, for one field, what a researcher looks at: its metrics, the
scatter and Bland-Altman plot, its worst outliers with their network input images, and the
saliency map where one has been computed. ``show(field)`` displays them; the notebook binds it to
a dropdown with ipywidgets, and calls it once directly so that it also runs headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biometry.analysis import evaluate
from biometry.analysis.agreement import outliers
from biometry.analysis.stats import agreement
from biometry.config import fields
from biometry.config.paths import runs_dir
from biometry.config.study import data_paths, resolve_study
from biometry.data.store import Store
from biometry.report import plots


class FieldExplorer:
    def __init__(self, study: str, runs_root: str | Path | None = None, data_dir=None):
        self.study = resolve_study(study)
        self.runs_root = runs_root
        self.predictions = evaluate.study_predictions(self.study, runs_root)
        self.paths = data_paths(self.study, data_dir, runs_root)
        self._store = None

    @property
    def fields(self) -> list[str]:
        return sorted(self.predictions["field"].astype(str).unique())

    def options(self) -> list[tuple[str, str]]:
        """(label, key) pairs for a dropdown."""
        return [(f"{fields.get(k).name} ({k})", k) for k in self.fields]

    def metrics(self, key: str) -> pd.DataFrame:
        sub = self.predictions[self.predictions["field"] == str(key)]
        return pd.DataFrame([agreement(sub["reference"], sub["prediction"], nan_policy="omit")],
                            index=[str(key)])

    def figure(self, key: str):
        sub = self.predictions[self.predictions["field"] == str(key)]
        f = fields.get(key)
        return plots.scatter_bland_altman(sub["reference"], sub["prediction"],
                                          title=f"{f.name} ({key})", unit=f.unit)

    def outliers(self, key: str, n: int = 5) -> pd.DataFrame:
        return outliers(self.predictions, str(key), n=n)

    def outlier_images(self, key: str, n: int = 5):
        """A figure of the worst outliers' network inputs (None without a prepared store)."""
        try:
            self._store = self._store or Store.open(self.paths.prepared)
        except FileNotFoundError:
            return None
        worst = self.outliers(key, n)
        rows = self._store.rows(worst["eid"].tolist())
        arr = self._store.array(self.study.format)
        images = [np.asarray(arr[int(r)]) for r in rows]
        titles = [f"{e}: {err:+.3g}" for e, err in zip(worst["eid"], worst["error"])]
        return plots.image_grid(images, titles)

    def saliency_path(self, key: str) -> Path | None:
        root = Path(self.runs_root) if self.runs_root else runs_dir()
        hits = sorted((root / self.study.name / "saliency" / str(key)).glob("*.png"))
        return hits[0] if hits else None

    def show(self, key: str) -> None:
        from IPython.display import Image, Markdown, display  # only in a notebook

        display(Markdown(f"### {fields.get(key).name} ({key})"))
        display(self.metrics(key))
        display(self.figure(key))
        display(Markdown("**Largest errors**"))
        display(self.outliers(key))
        grid = self.outlier_images(key)
        if grid is not None:
            display(grid)
        sal = self.saliency_path(key)
        display(Image(filename=str(sal)) if sal else Markdown("_no saliency map computed yet_"))
