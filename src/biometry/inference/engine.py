"""The inference engine (``biometry infer``): UKB zips or NIfTI station folders → one table of
calibrated predictions with 95 % intervals.

1. The model bundles are loaded and checked (:func:`biometry.inference.bundle.load_bundle`);
   two bundles that predict the same field are refused.
2. The input's subjects are prepared into a cache of prepared stores, one per input format and
   grid (``<cache>/<format>-<grid>/``, :mod:`biometry.data.store`), by ``workers`` processes
   (:func:`biometry.data.prepare.prepare_into`, the loop of ``biometry prepare``: workers write
   part files, only this process commits them to the index). A second run over the same input
   reuses what is cached, failures included (``--retry-failed`` redoes them).
3. Each bundle predicts every prepared subject; its calibrated members are combined by the
   bundle's ensemble rule (or ``ensemble_rule``); outputs are in the field's catalogue unit (or
   the original module's unit).
4. ``predictions.csv``: one row per subject, ``eid`` and for each field key F the columns
   ``F_mean``, ``F_var``, ``F_lo95``, ``F_hi95``; ``predictions.json``: fields, names, units, the
   models and their versions; ``failures.csv``: ``eid, source, stage, error`` of the subjects that
   could not be prepared (for an output ``X.csv``: ``X.json``, ``X_failures.csv``). All three
   are written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from biometry import __version__, fileio
from biometry.data.prepare import (
    DEFAULT_CHUNK_SIZE,
    Subject,
    find_subjects,
    phantom_spacing,
    prepare_into,
    verify_sources,
)
from biometry.data.store import Store, grid_text, same_grid
from biometry.data.types import UKB_SPACING
from biometry.errors import UsageError, one_line, run_guarded
from biometry.inference.bundle import (
    Bundle,
    BundleError,
    load_bundle,
    member_factors,
    predict_members,
)
from biometry.inference.uncertainty import ENSEMBLE_RULES, ensemble, interval

_ZIP_RE = re.compile(r"^(\d+)_20201_(\d+)_(\d+)\.zip$")
FAILURE_COLUMNS = ["eid", "source", "stage", "error"]
MEMBER_COLUMNS = ["eid", "model", "member", "field", "mean", "var"]


def default_workers() -> int:
    """Preparation processes by default: two, or one on a one-core machine."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass
class InferResult:
    """What one :func:`infer` call did (``summary()`` is the line the CLI prints)."""

    out: Path
    n_input: int
    predictions: pd.DataFrame
    failures: pd.DataFrame
    n_cached: int = 0
    prepare_seconds: float = 0.0
    network_seconds: float = 0.0
    seconds: float = 0.0
    fields: list[dict] = field(default_factory=list)
    #: with ``keep_members``: every member's mean and calibrated variance (``MEMBER_COLUMNS``)
    members: pd.DataFrame | None = None

    def summary(self) -> str:
        line = (f"infer: {self.n_input} subjects, {len(self.predictions)} predicted, "
                f"{len(self.failures)} failed, {self.n_cached} from the cache; "
                f"{self.seconds:.1f} s (preparation {self.prepare_seconds:.1f} s, networks "
                f"{self.network_seconds:.1f} s) -> {self.out}")
        if len(self.failures):
            first = self.failures.iloc[0]
            line += (f" (e.g. {first['eid']}: {first['error']}; see "
                     f"{failures_path(self.out).name})")
        return line


def find_inputs(inputs: Sequence[str | Path]) -> tuple[list[Subject], Path | None]:
    """Subjects of ``inputs``: one folder (see :func:`biometry.data.prepare.find_subjects`) or
    UKB zip files ``<eid>_20201_<instance>_0.zip``. Returns the subjects and the folder (if one).

    Raises ValueError with one line when nothing usable is there.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input given")
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such file or folder"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if len(inputs) == 1 and inputs[0].is_dir():
        return find_subjects(inputs[0]), inputs[0]
    subjects = []
    for p in inputs:
        m = _ZIP_RE.match(p.name)
        if p.is_dir() or not m:
            raise ValueError(f"{p}: give one input folder or UKB zip files "
                             f"(<eid>_20201_2_0.zip)")
        eid, instance = m.group(1), int(m.group(2))
        subjects.append(Subject(eid if instance == 2 else f"{eid}-{instance}", str(p), "zip"))
    keys = pd.Series([s.eid for s in subjects])
    dup = sorted(set(keys[keys.duplicated()]))
    if dup:
        raise ValueError(f"subject(s) {', '.join(dup[:10])} appear more than once in the input")
    return subjects, None


def _grid_tag(spacing: tuple[float, float, float] | None) -> str:
    if spacing is None or same_grid(spacing, UKB_SPACING):
        return "ukb"
    return "x".join(f"{s:.6g}" for s in spacing)


def failures_path(out: str | Path) -> Path:
    """Where the failures of the predictions ``out`` go: ``failures.csv`` beside
    ``predictions.csv``, ``<name>_failures.csv`` beside any other ``<name>.csv`` (two outputs
    in one folder keep their own)."""
    out = Path(out)
    return out.parent / ("failures.csv" if out.stem == "predictions" else
                         f"{out.stem}_failures.csv")


def input_grids(bundles: Sequence[Bundle], folder: Path | None,
                spacing: Sequence[float] | None) -> tuple[list[tuple[float, float, float]],
                                                            list[str]]:
    """The fused grid each bundle's inputs are prepared on, and notes for the user.

    ``spacing`` (``--spacing``) wins; else the grid the bundle records (what its networks were
    trained on); else a phantom root's grid; else the UKB grid. A note names each bundle whose
    recorded grid is not the one used, or not the phantom root's.
    """
    given = tuple(float(s) for s in spacing) if spacing is not None else None
    try:  # read once; a bad cohort.json stops only a bundle that needs the cohort's grid
        folder_grid, bad = (phantom_spacing(folder) if folder is not None else None), None
    except ValueError as exc:
        folder_grid, bad = None, exc
    grids, notes = [], []
    for b in bundles:
        own = b.grid_mm
        if given is not None:
            grid = given
            if own is not None and not same_grid(own, given):
                notes.append(f"{b.path}: trained on the fused grid {grid_text(own)}; preparing "
                             f"on {grid_text(given)} as --spacing says")
        elif own is not None:
            grid = own
            if folder_grid is not None and not same_grid(own, folder_grid):
                notes.append(f"{b.path}: trained on the fused grid {grid_text(own)}, the input "
                             f"cohort's is {grid_text(folder_grid)}; preparing on the bundle's")
        else:
            if bad is not None:
                raise bad
            grid = folder_grid or tuple(UKB_SPACING)
        grids.append(grid)
    return grids, notes


def cache_store(cache: Path, fmt: str, spacing: tuple[float, float, float] | None) -> Path:
    """The cache's store of one format on one fused grid: ``<cache>/<format>-<grid>``."""
    return Path(cache) / f"{fmt}-{_grid_tag(spacing)}"


def prepare_cached(subjects: Sequence[Subject], fmt: str, cache: Path,
                   spacing: tuple[float, float, float] | None, progress: bool = True,
                   retry_failed: bool = False, workers: int = 1) -> tuple[Store, int]:
    """Prepare ``subjects`` in format ``fmt`` into the cache store with ``workers`` processes;
    returns it and how many of the subjects were there already."""
    store = Store.create(cache_store(cache, fmt, spacing), [fmt], exist_ok=True)
    bar = tqdm(total=len(subjects), unit="subject", desc=f"prepare {fmt}",  # shown after 1 s:
               disable=not progress, delay=1, file=sys.stderr)  # not for a cache that has all
    _done, cached = prepare_into(store, subjects, [fmt], spacing, workers=workers,
                                 chunk_size=DEFAULT_CHUNK_SIZE, retry_failed=retry_failed, bar=bar)
    store.refresh()
    return store, cached


def load_bundles(models: Sequence[str | Path]) -> list[Bundle]:
    """Load every bundle; refuse two that predict the same field (one line naming both)."""
    if not models:
        raise ValueError("no model given (--model DIR)")
    bundles = [load_bundle(m) for m in models]
    seen: dict[str, str] = {}
    for b in bundles:
        for key in b.field_keys:
            if key in seen:
                raise ValueError(f"field {key} is predicted by both {seen[key]} and {b.path}")
            seen[key] = str(b.path)
    return bundles


def infer(models: Sequence[str | Path | Bundle], inputs: Sequence[str | Path] | str | Path,
          out: str | Path, cache: str | Path | None = None, batch_size: int = 32,
          device: str = "auto", progress: bool = True, spacing: Sequence[float] | None = None,
          retry_failed: bool = False, channels_last: bool = False, bf16: bool = False,
          workers: int | None = None, ensemble_rule: str | None = None,
          keep_members: bool = False) -> InferResult:
    """Predict every subject of ``inputs`` with every model; write the three output files.

    Parameters
    ----------
    models : bundle folders (or loaded bundles).
    inputs : one folder (phantom root, UKB zips, subject folders with station NIfTI) or zip files.
    out : the ``predictions.csv`` path; ``predictions.json`` and ``failures.csv`` go beside it
        (for another name ``X.csv``: ``X.json`` and ``X_failures.csv``, :func:`failures_path`).
    cache : the cache folder (default ``<out folder>/cache``).
    batch_size, device, channels_last, bf16 : the forward passes.
    spacing : fused grid (mm); default the grid each bundle was trained on (recorded at
        export), else a phantom root's grid, else the UKB grid (:func:`input_grids`).
    retry_failed : prepare again the subjects that failed in an earlier run.
    workers : preparation processes (default :func:`default_workers`).
    ensemble_rule : how a bundle's members are combined (default each bundle's own rule;
        :data:`biometry.inference.uncertainty.ENSEMBLE_RULES`).
    keep_members : also return every member's predictions (``InferResult.members``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if ensemble_rule is not None and ensemble_rule not in ENSEMBLE_RULES:
        raise ValueError(f"unknown ensemble rule {ensemble_rule!r}; use one of "
                         f"{', '.join(ENSEMBLE_RULES)}")
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    bundles = [m if isinstance(m, Bundle) else None for m in models]
    if any(b is None for b in bundles):
        bundles = load_bundles([m for m in models if not isinstance(m, Bundle)]) + [
            b for b in bundles if b is not None]
    subjects, folder = find_inputs(inputs)
    grids, notes = input_grids(bundles, folder, spacing)
    for note in notes:
        print(f"infer: note: {note}", file=sys.stderr)
    cache = Path(cache) if cache else out.parent / "cache"
    inputs_of = [(b.input_format, g) for b, g in zip(bundles, grids, strict=True)]
    needed = list(dict.fromkeys(inputs_of))

    for fmt, grid in needed:  # every cache checked before any is added to
        if (cache_store(cache, fmt, grid) / "store.json").is_file():
            verify_sources(Store.open(cache_store(cache, fmt, grid)), subjects, progress,
                           hint=f"give --cache a new folder, or remove {cache}")
    stores, n_cached = {}, len(subjects)
    for fmt, grid in needed:
        stores[fmt, grid], cached = prepare_cached(subjects, fmt, cache, grid, progress,
                                                   retry_failed, workers)
        n_cached = min(n_cached, cached)
    t_prep = time.perf_counter() - t0

    order = [s.eid for s in subjects]
    failures = []
    ok = set(order)
    for (fmt, _grid), store in stores.items():
        failed = store.failed()
        failed = failed[failed["eid"].isin(ok)]
        for _, r in failed.iterrows():
            failures.append({"eid": r["eid"], "source": r.get("source", ""), "stage": r["stage"],
                             "error": f"{fmt}: {r['error']}"})
        ok &= set(store.eids)
    eids = [e for e in order if e in ok]
    fail_table = pd.DataFrame(failures, columns=FAILURE_COLUMNS).drop_duplicates("eid")
    fail_table = fail_table[~fail_table["eid"].isin(ok)].reset_index(drop=True)

    t1 = time.perf_counter()
    columns: dict[str, np.ndarray] = {"eid": np.asarray(eids, dtype=object)}
    field_meta, member_parts = [], []
    bar = tqdm(total=len(bundles) * len(eids), unit="subject", desc="predict",
               disable=not progress or not eids, file=sys.stderr)
    for b, key in zip(bundles, inputs_of, strict=True):
        store = stores[key]
        rows = store.rows(eids) if eids else np.zeros(0, dtype=np.int64)
        arr = store.array(b.input_format)
        rule = ensemble_rule or b.ensemble_rule
        means, variances = [], []
        for s in range(0, len(rows), 256):  # bounded memory: 256 images at a time
            m_k, v_k = predict_members(b, np.asarray(arr[rows[s:s + 256]]),
                                       batch_size=batch_size, device=device,
                                       channels_last=channels_last, bf16=bf16)
            means.append(m_k)
            variances.append(v_k)
            bar.update(m_k.shape[1])
        shape = (len(b.members), 0, len(b.field_keys))
        m_k = np.concatenate(means, axis=1) if means else np.zeros(shape)
        v_k = np.concatenate(variances, axis=1) if variances else np.zeros(shape)
        mu, var = ensemble(m_k, v_k, rule)
        if keep_members:
            member_parts.append(member_table(eids, str(b.path), b.field_keys, m_k, v_k))
        lo, hi = interval(mu, var, 0.95)
        factors = member_factors(b)
        for j, key in enumerate(b.field_keys):
            columns[f"{key}_mean"] = mu[:, j]
            columns[f"{key}_var"] = var[:, j]
            columns[f"{key}_lo95"] = lo[:, j]
            columns[f"{key}_hi95"] = hi[:, j]
            field_meta.append({"key": key, "name": b.field_names[j], "unit": b.units[j],
                               "model": str(b.path), "calibration_factor": float(b.calibration[j]),
                               "members": len(b.members), "ensemble_rule": rule,
                               "member_calibration_factors": factors[:, j].tolist()})
    bar.close()
    t_net = time.perf_counter() - t1
    table = pd.DataFrame(columns)
    fileio.write_csv(out, table)
    fileio.write_csv(failures_path(out), fail_table)
    fileio.write_json(out.with_suffix(".json"), {
        "biometry_version": __version__, "interval": 0.95,
        "columns": "F_mean, F_var (calibrated), F_lo95, F_hi95 = mean -/+ 1.96 sqrt(var)",
        "ensemble_rules": {"ambiguity": "mean of the calibrated members' variances minus the "
                                        "spread of their means (floored at 1/K of the former)",
                           "mixture": "mean of the calibrated members' variances plus the spread "
                                      "of their means"},
        "fields": field_meta,
        "models": [{"path": str(b.path), "name": b.name, "original_mimir": b.original,
                    "package_version": b.meta.get("package_version"),
                    "input_format": b.input_format, "members": len(b.members),
                    "ensemble_rule": ensemble_rule or b.ensemble_rule,
                    "grid_mm": list(g), "trained_grid_mm": b.grid_mm}
                   for b, g in zip(bundles, grids, strict=True)],
        "workers": workers,
        "grid_mm": list(grids[0]),
        "n_subjects": len(subjects), "n_predicted": len(table), "n_failed": len(fail_table)})
    return InferResult(out=out, n_input=len(subjects), predictions=table, failures=fail_table,
                       n_cached=n_cached, prepare_seconds=t_prep, network_seconds=t_net,
                       seconds=time.perf_counter() - t0, fields=field_meta,
                       members=(pd.concat(member_parts, ignore_index=True) if member_parts
                                else pd.DataFrame(columns=MEMBER_COLUMNS)) if keep_members
                       else None)


def member_table(eids: Sequence[str], model: str, keys: Sequence[str], means: np.ndarray,
                 variances: np.ndarray) -> pd.DataFrame:
    """(K, N, T) member means and calibrated variances → the long table ``MEMBER_COLUMNS``."""
    k, n, t = means.shape
    return pd.DataFrame({
        "eid": np.tile(np.repeat(np.asarray(eids, dtype=object), t), k), "model": model,
        "member": np.repeat(np.arange(k), n * t), "field": np.tile(np.asarray(keys, dtype=object),
                                                                   k * n),
        "mean": means.reshape(-1), "var": variances.reshape(-1)})


def main(argv: list[str]) -> int:
    """``biometry infer``: exit 0 when every subject is predicted, 1 if some failed, 2 on bad
    usage or an unusable model/input (one line)."""
    def _run(args_list: list[str]) -> int:
        p = argparse.ArgumentParser(
            prog="biometry infer",
            description="Predict every subject of a release with calibrated 95 % intervals.")
        p.add_argument("--model", action="append", required=True, metavar="DIR",
                       help="a model bundle or an original MIMIR module folder (repeatable)")
        p.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_ZIP",
                       help="one folder (UKB zips, NIfTI station folders, a phantom cohort) or "
                            "UKB zip files")
        p.add_argument("--out", required=True, help="predictions.csv to write (predictions.json "
                       "and failures.csv beside it; for X.csv: X.json and X_failures.csv)")
        p.add_argument("--cache", default=None, help="cache of prepared inputs (default: "
                       "<out folder>/cache); a second run reuses it")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                       help="fused grid (mm); default the grid the bundle was trained on, "
                            "else a phantom root's, else the UKB grid")
        p.add_argument("--workers", type=int, default=default_workers(),
                       help="preparation processes (default: %(default)s, i.e. min(2, cpus))")
        p.add_argument("--ensemble-rule", choices=ENSEMBLE_RULES, default=None,
                       help="how a bundle's fold networks are combined (default: the bundle's, "
                            "ambiguity; mixture for comparison; docs/inference.md)")
        p.add_argument("--retry-failed", action="store_true",
                       help="prepare again subjects that failed in an earlier run")
        p.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
        p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
        p.add_argument("--no-progress", action="store_true")
        a = p.parse_args(args_list)
        if a.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if a.workers < 1:
            raise UsageError("--workers must be at least 1")
        try:
            result = infer(a.model, a.input, a.out, a.cache, a.batch_size, a.device,
                           not a.no_progress, a.spacing, a.retry_failed, a.channels_last, a.bf16,
                           a.workers, a.ensemble_rule)
        except (BundleError, FileNotFoundError, ValueError, KeyError) as exc:
            raise UsageError(one_line(exc)) from None
        print(result.summary(), file=sys.stdout if result.failures.empty else sys.stderr)
        return 0 if result.failures.empty else 1

    return run_guarded(_run, argv, "biometry infer")
