"""A study's trained module → its calibration and a model bundle (``biometry export``).

The trained folds of a module lie in ``<runs root>/<study>/train/<module>/fold_<k>/`` (``model.pt``,
``predictions.csv``, ``metrics.json``; see docs/architecture.md). :func:`calibrate_module` fits the
per-field variance scale on the pooled out-of-fold predictions and writes the calibration stage's
files; :func:`export_module` writes a bundle (:mod:`biometry.inference.bundle`) holding the k fold
networks (an ensemble) or one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from biometry import __version__, fileio
from biometry.analysis.stats import agreement
from biometry.config import fields as field_catalogue
from biometry.config.formats import FORMAT_SPECS
from biometry.config.study import default_runs_root, resolve_study
from biometry.data.store import same_grid
from biometry.errors import UsageError, one_line, run_guarded
from biometry.inference import uncertainty as unc
from biometry.inference.bundle import write_bundle

CALIBRATION_JSON = "calibration.json"


def train_dir(study, module: str, runs_root: str | Path | None = None) -> Path:
    """``<runs root>/<study>/train/<module>``: the folder of a module's fold runs."""
    study = resolve_study(study)
    root = Path(runs_root) if runs_root else default_runs_root(study)
    return root / study.name / "train" / str(module)


def fold_runs(folder: str | Path) -> dict[int, Path]:
    """``{k: fold_<k> folder}`` of the finished folds (``model.pt`` and ``predictions.csv``)."""
    folder = Path(folder)
    runs = {}
    for d in sorted(folder.glob("fold_*")):
        suffix = d.name[len("fold_"):]
        if suffix.isdigit() and (d / "model.pt").is_file() and (d / "predictions.csv").is_file():
            runs[int(suffix)] = d
    if not runs:
        raise FileNotFoundError(f"{folder}: no finished fold runs (fold_<k>/model.pt with "
                                f"predictions.csv); train the module first")
    return runs


def oof_predictions(folder: str | Path) -> pd.DataFrame:
    """The pooled out-of-fold predictions of a module's folds."""
    return pd.concat([pd.read_csv(d / "predictions.csv", dtype={"eid": str, "field": str})
                      for d in fold_runs(folder).values()], ignore_index=True)


def calibrate_module(folder: str | Path, out_dir: str | Path | None = None) -> dict[str, float]:
    """Fit the per-field variance scales on the out-of-fold predictions; write the stage's files.

    Writes into ``out_dir`` (default ``folder``): ``calibration.json`` (``factors`` per field,
    ``n``), ``calibration.csv``/``.md`` (per field: scale, NLL, AUCE and 68/95 % coverage before
    and after), ``calibration_curve.csv`` and ``sparsification.csv`` (long tables per field).
    Returns the factors.
    """
    folder = Path(folder)
    out = Path(out_dir) if out_dir else folder
    table = oof_predictions(folder)
    scales = unc.fit_scales(table)
    report = unc.calibration_table(table, scales)
    curves, spars = [], []
    for key, t in table.groupby("field", sort=True):
        y, mu, var = t["reference"], t["prediction"], t["variance"] * scales[key]
        p, obs = unc.calibration_curve(y, mu, var)
        _p, raw = unc.calibration_curve(y, mu, t["variance"])
        curves.append(pd.DataFrame({"field": key, "expected": p, "observed": obs,
                                    "observed_raw": raw}))
        spars.append(unc.sparsification(y, mu, var).assign(field=key))
    fileio.write_json(out / CALIBRATION_JSON, {
        "method": "variance scaling: s = mean((y - mu)^2 / var), the Gaussian NLL minimiser",
        "fitted_on": "pooled out-of-fold predictions", "folds": sorted(fold_runs(folder)),
        "factors": scales, "n": {r["field"]: int(r["n"]) for _, r in report.iterrows()}})
    fileio.write_table(report, out / "calibration")
    fileio.write_csv(out / "calibration_curve.csv", pd.concat(curves, ignore_index=True))
    fileio.write_csv(out / "sparsification.csv", pd.concat(spars, ignore_index=True))
    return scales


def fold_scales(folder: str | Path, pooled: dict[str, float]) -> dict[int, dict[str, float]]:
    """Per fold, the per-field variance factor fitted on that fold's own out-of-fold predictions:
    the calibration of the fold's network alone (a field the fold cannot fit, e.g. no usable
    variance, keeps the ``pooled`` factor)."""
    out = {}
    for k, d in fold_runs(folder).items():
        table = pd.read_csv(d / "predictions.csv", dtype={"eid": str, "field": str})
        own = {}
        for key, t in table.groupby("field", sort=True):
            try:
                own[key] = unc.fit_variance_scale(t["reference"], t["prediction"], t["variance"])
            except ValueError:
                own[key] = pooled[key]
        out[k] = {key: own.get(key, pooled[key]) for key in pooled}
    return out


def cv_metrics(table: pd.DataFrame, scales: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per field: n, R², MAE and calibrated 95 % coverage of pooled out-of-fold predictions."""
    out = {}
    for key, t in table.groupby("field", sort=True):
        a = agreement(t["reference"], t["prediction"], nan_policy="omit")
        out[key] = {"n": a["n"], "r2": a["r2"], "mae": a["mae"],
                    "coverage95": unc.coverage(t["reference"], t["prediction"],
                                               t["variance"] * scales[key], 0.95)}
    return out


def per_fold_metrics(folder: str | Path, metric: str = "r2") -> dict[str, list[float]]:
    """Per field, each fold's ``metric`` (``r2``, ``mae``) in fold order: the spread a later
    release is compared with."""
    out: dict[str, list[float]] = {}
    for d in fold_runs(folder).values():
        m = json.loads((d / "metrics.json").read_text())
        for key, v in m.get("per_field", {}).items():
            out.setdefault(key, []).append(float(v.get(metric, float("nan"))))
    return out


def _card(study, module: str, keys: list[str], metrics: dict, scales: dict, folds: list[int],
          n_train: list[int], cfg: dict) -> str:
    lines = [f"# Model card: {study.name} / {module}", "",
             f"Exported by biometry {__version__}. {' '.join(str(study.description).split())}", "",
             "## Training data", "",
             f"- source: {dict(study.data or {}).get('source', '?')} "
             f"({json.dumps(dict(study.data or {}), sort_keys=True)})",
             f"- input format: {study.format}, {cfg.get('arch')} with a {cfg.get('head')} head, "
             f"input size {cfg.get('input_size') or 'native'}",
             f"- {study.folds}-fold cross-validation; members: folds {folds} "
             f"(training subjects per fold: {n_train})", "",
             "## Cross-validated metrics (pooled out-of-fold predictions)", "",
             "| field | name | unit | n | R² | MAE | 95 % coverage (calibrated) | variance factor |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key in keys:
        f, m = field_catalogue.get(key), metrics.get(key, {})
        lines.append(f"| {key} | {f.name} | {f.unit} | {m.get('n', 0)} | {m.get('r2', float('nan')):.3f} "
                     f"| {m.get('mae', float('nan')):.4g} | {m.get('coverage95', float('nan')):.3f} "
                     f"| {scales.get(key, float('nan')):.3f} |")
    lines += ["", "## Use", "",
              "`biometry infer --model <this folder> --input <zips or NIfTI folders> --out "
              "predictions.csv`: per field the mean, the calibrated variance and the 95 % interval. "
              "Valid only for data like the training data (protocol, population); the intervals "
              "are calibrated on the cross-validation folds and assume the new data are alike.", ""]
    return "\n".join(lines)


def export_module(study, module: str, out_dir: str | Path, runs_root: str | Path | None = None,
                  folder: str | Path | None = None, fold: int | None = None) -> Path:
    """Write the bundle of a trained module (all finished folds as an ensemble, or one ``fold``).

    The calibration factors are fitted on the pooled out-of-fold predictions of all folds, and
    per member on its own fold's out-of-fold predictions (what the engine applies to that
    member). The input spec records the fused grid the folds' images were prepared on (kept in
    each ``model.pt`` by the training), on which the engine prepares new subjects.
    """
    study = resolve_study(study)
    folder = Path(folder) if folder else train_dir(study, module, runs_root)
    runs = fold_runs(folder)
    if fold is not None:
        if fold not in runs:
            raise FileNotFoundError(f"{folder}: no finished fold_{fold} (have {sorted(runs)})")
        chosen = {fold: runs[fold]}
    else:
        chosen = runs
    table = oof_predictions(folder)
    scales = unc.fit_scales(table)
    own_scales = fold_scales(folder, scales)
    members, n_train, first, grids = [], [], None, []
    for k, d in chosen.items():
        raw = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        grids.append(raw.get("input_grid_mm"))  # None: trained before it was kept
        if raw.get("head") != "mean_variance":
            raise ValueError(f"{d}: head {raw.get('head')!r}; a bundle needs a mean_variance "
                             f"network (calibrated intervals)")
        if first is None:
            first = raw
        elif list(raw["field_keys"]) != list(first["field_keys"]):
            raise ValueError(f"{d}: fields differ from fold {min(chosen)}")
        members.append((raw["state_dict"], raw["mean"], raw["std"],
                         [own_scales[k].get(str(f), scales.get(str(f), 1.0))
                          for f in raw["field_keys"]]))
        n_train.append(int(json.loads((d / "metrics.json").read_text()).get("n_train", 0)))
    keys = [str(k) for k in first["field_keys"]]
    if not all(same_grid(g, grids[0]) for g in grids):
        raise ValueError(f"{folder}: the folds were trained on images of different fused "
                         f"grids ({', '.join(map(str, grids))}); retrain them on one store")
    missing = [k for k in keys if k not in scales]
    if missing:
        raise ValueError(f"{folder}: no out-of-fold predictions for field(s) {', '.join(missing)}")
    metrics = cv_metrics(table, scales)
    cfg = dict(first["config"])
    shape, dtype = FORMAT_SPECS[study.format]
    input_spec = {"format": study.format, "shape": list(shape), "dtype": np.dtype(dtype).name,
                  "input_size": first.get("input_size"), "pixel_scale": 1 / 255}
    if grids[0] is not None:  # the engine prepares new subjects on it
        input_spec["grid_mm"] = grids[0]
    network = {"arch": first["arch"], "in_channels": int(first["in_channels"]),
               "head": first["head"]}
    return write_bundle(out_dir, name=f"{study.name}-{module}", network=network,
                        input_spec=input_spec, field_keys=keys, members=members,
                        calibration=[scales[k] for k in keys],
                        card=_card(study, module, keys, metrics, scales, sorted(chosen), n_train,
                                   cfg),
                        extra={"study": study.name, "module": str(module),
                               "members_from_folds": sorted(chosen), "cv_metrics": metrics,
                               "cv_folds": sorted(runs),
                               "cv_fold_r2": per_fold_metrics(folder, "r2"),
                               "cv_fold_mae": per_fold_metrics(folder, "mae")})


def main(argv: list[str]) -> int:
    """``biometry export --study S --module M --out DIR``."""
    def _run(args_list: list[str]) -> int:
        p = argparse.ArgumentParser(prog="biometry export",
                                    description="Write a trained module as a model bundle.")
        p.add_argument("--study", required=True, help="study preset name or YAML path")
        p.add_argument("--module", default="all", help="trained network (run folder name; "
                       "default all, the multi-field network)")
        p.add_argument("--out", required=True, help="bundle folder (missing or empty)")
        p.add_argument("--runs-root", default=None, help="where run folders are (default: "
                       "the checkout's papermill_runs/ for a preset, papermill_runs/ beside the "
                       "YAML for your own study)")
        p.add_argument("--train-dir", default=None, help="the folder of the fold_<k> runs, if "
                       "not <runs root>/<study>/train/<module>")
        p.add_argument("--fold", type=int, default=None, help="export one fold's network (default: "
                       "every finished fold, combined as an ensemble)")
        a = p.parse_args(args_list)
        try:
            out = export_module(a.study, a.module, a.out, a.runs_root, a.train_dir, a.fold)
        except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
            raise UsageError(one_line(exc)) from None
        print(f"export: bundle written to {out}")
        return 0

    return run_guarded(_run, argv, "biometry export")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
