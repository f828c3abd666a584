"""A study's stages in order, one table: ``biometry run <stage>`` and ``biometry study run``.

:data:`PIPELINE` lists the stages that follow data preparation. Each entry says which notebook
runs, how often (``scope``), and which stages' runs it reads (``needs``):

* ``"network"``: one run per network and fold (``train``: a field, or a multi-field network);
* ``"module"``: one run per network, all folds together (``calibrate``);
* ``"field"``: one run per field of the study (``evaluate``);
* ``"study"``: one run for the study (``release``, ``agreement``, ``feature-space``);
* ``"figures"``: the figure notebooks that apply to the study
  (:func:`biometry.runs.figures.figure_notebooks`).

Adding a stage is one :class:`Stage` entry here; its notebook takes the standard parameters
``study``, ``runs_root``, ``data_dir``, ``run_dir`` (and ``field`` for a per-field stage).

**Identity.** Every run carries the resolved inputs that define it (:func:`train_identity`,
:func:`derived_identity`), stored in ``done.json``. A training run whose inputs changed (``lr``,
``iterations``, the fields, the splits, the prepared subjects, the fields table) stops the batch
before any work, naming the run and what changed: training is expensive, and its old result is
only replaced on request (``--redo-changed``, or ``--force`` for everything). A run of a later
stage whose inputs changed (because training was redone, or the study changed) is simply redone:
it is cheap and must follow its inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biometry.config.study import (
    Study,
    data_paths,
    default_runs_root,
    new_study,
    resolve_study,
)
from biometry.data.store import Store
from biometry.data.tables import references_from_fields_csv
from biometry.learn.cv import check_training_inputs, load_targets
from biometry.learn.splits import load_or_create_splits
from biometry.parallel import available_cores, dask_client
from biometry.runs.batch import (
    execute_with_threads,
    report,
    run_batch,
    study_train_specs,
    thread_plan,
)
from biometry.runs.figures import build_figures, figure_specs, figures_dir_for
from biometry.runs.runner import (
    RunResult,
    RunSpec,
    changed_inputs,
    execute_run,
    file_hash,
    identity_hash,
    is_finished,
    run_dir_for,
    stored_identity,
)

SCOPES = ("network", "module", "field", "study", "figures")


def _always(_study: Study) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of a study: its name on the command line, notebook, scope and needs.

    ``applies`` says whether ``biometry study run`` includes it for a study (a stage that does
    not apply can still be run by name); ``fields`` gives a per-field stage's default fields
    (default: all of the study's), and ``parameters`` extra notebook parameters from the study.
    """

    name: str
    notebook: str | None  # in notebooks/; None for the figures, built by biometry.runs.figures
    scope: str
    needs: tuple[str, ...] = ()
    help: str = ""
    applies: Callable[[Study], bool] = _always
    fields: Callable[[Study], Sequence[str]] | None = None
    parameters: Callable[[Study], dict[str, Any]] | None = None
    #: its runs go one at a time even when stages run side by side (they share a cache)
    serial: bool = False

    @property
    def folder(self) -> str:
        """The run-folder name: ``papermill_runs/<study>/<folder>/``."""
        return self.name.replace("-", "_")


def _networks(study: Study) -> bool:  # a thigh-function study trains in its own stage
    return not study.thigh


def _several_fields(study: Study) -> bool:  # a UMAP of the fields needs at least two
    return not study.thigh and len(study.fields) > 1


def _saliency_fields(study: Study) -> list[str]:
    return list((study.saliency or {}).get("fields", []))


#: the stages after `biometry prepare`, in the order `biometry study run` executes them
PIPELINE: tuple[Stage, ...] = (
    Stage("train", "02_train.ipynb", "network", (),
          "train the study's networks, one run per network and fold", applies=_networks),
    Stage("evaluate", "03_evaluate_field.ipynb", "field", ("train",),
          "per field: metrics, linear baseline, AUC at the field's threshold, outliers",
          applies=_networks),
    Stage("calibrate", "08_calibrate.ipynb", "module", ("train",),
          "per network: variance scaling on the out-of-fold predictions, coverage, AUCE, "
          "sparsification (docs/inference.md)",
          applies=lambda s: s.calibration and s.training.head == "mean_variance"),
    Stage("release", "09_later_release.ipynb", "study", ("train", "calibrate"),
          "the study's modules on a later release (the `release:` block; a phantom study's next "
          "release is synthesised): each fold network against its CV fold, the ensemble's "
          "coverage (docs/inference.md)",
          applies=lambda s: s.release is not None and s.training.head == "mean_variance"),
    Stage("saliency", "06_saliency.ipynb", "field", ("train",),
          "per field: guided Grad-CAM aggregated per sex by co-registration (docs/saliency.md)",
          applies=lambda s: bool(_saliency_fields(s)), fields=_saliency_fields,
          parameters=lambda s: {"n_subjects": int((s.saliency or {}).get("subjects", 200)),
                                "layer": str((s.saliency or {}).get("layer", "layer4")),
                                **({"occlusion": True} if (s.saliency or {}).get("occlusion")
                                   else {})},
          serial=True),  # the fields share the registration's transforms (computed by the first)
    Stage("liver", "07_liver_fat.ipynb", "study", ("train",),
          "liver fat: network on the unlabelled subjects, multi-atlas baseline, comparison "
          "(docs/liver.md)", applies=lambda s: s.liver is not None),
    Stage("thigh", "10_thigh_function.ipynb", "study", (),
          "thigh function: frozen backbone, last layer per measure (docs/thigh.md)",
          applies=lambda s: bool(s.thigh)),
    Stage("agreement", "04_agreement.ipynb", "study", ("train",),
          "tables across fields: Table 1, DXA vs MRI, bilateral symmetry", applies=_networks),
    Stage("feature-space", "05_feature_space.ipynb", "study", (),
          "UMAP of the study's reference fields", applies=_several_fields),
    Stage("figures", None, "figures", ("agreement", "feature-space", "release"),
          "every figure and table notebook"),
)


def default_stages(study: Study) -> list[str]:
    """The stages ``biometry study run`` executes for ``study``, in order."""
    return [s.name for s in PIPELINE if s.applies(study)]


class StageError(RuntimeError):
    """A stage that cannot start (missing or stale inputs); the message is one line."""


class RunsFailed(StageError):
    """Some runs of a stage failed (each reported with its notebook)."""


def stage(name: str) -> Stage:
    for s in PIPELINE:
        if s.name == name or s.folder == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in PIPELINE)}")


# ------------------------------------------------------------------------------------ identity


def data_identity(study: Study, data_dir=None, runs_root=None) -> dict[str, Any]:
    """Hashes of what a study's runs read: the split file, the prepared subject index, the
    fields table."""
    paths = data_paths(study, data_dir, runs_root)
    return {"splits": file_hash(paths.splits),
            "prepared_subjects": file_hash(Path(paths.prepared) / "subjects.csv"),
            "fields_csv": file_hash(paths.fields_csv)}


def train_identity(study: Study, unit: str, fold: int, data: dict[str, Any],
                   fields: Sequence[str] | None = None) -> dict[str, Any]:
    """The inputs of one training run: resolved settings, its fields, fold, data hashes."""
    keys = list(fields) if fields else (list(study.fields) if study.multi_field else [unit])
    return {"study": study.name, "network": unit, "fold": int(fold), "fields": keys,
            "study_fields": list(study.fields), "format": study.format, "folds": study.folds,
            "split_seed": study.split_seed, "stratify": study.stratify,
            "training": study.training.to_dict(), **data}


def derived_identity(study: Study, st: Stage, upstream: list[RunSpec], root: Path,
                     data: dict[str, Any], field: str | None = None) -> dict[str, Any]:
    """The inputs of a later stage: the study definition, the data, and the identities of the
    runs it reads."""
    hashes = []
    for spec in upstream:
        old = stored_identity(run_dir_for(spec, root))
        hashes.append(identity_hash(old) if old is not None else None)
    return {"stage": st.name, "field": field, "study": study.to_dict(),
            "fields_csv": data.get("fields_csv"), "upstream": hashes}


# --------------------------------------------------------------------------------- the specs


def stage_specs(study: Study, st: Stage, root: Path, data_dir=None,
                fields: Sequence[str] | None = None, folds: Sequence[int] | None = None,
                with_identity: bool = True) -> list[RunSpec]:
    """The runs of one stage of ``study`` (figures: none, they are built by ``build_figures``)."""
    common: dict[str, Any] = {"study": str(study.path), "runs_root": str(root)}
    if data_dir:
        common["data_dir"] = str(data_dir)
    data = data_identity(study, data_dir, root) if with_identity else {}
    if st.scope == "network":
        specs = study_train_specs(study, fields, folds, extra={k: v for k, v in common.items()
                                                                if k != "study"})
        out = []
        for s in specs:
            ident = (train_identity(study, s.field, s.fold, data, s.parameters.get("fields"))
                     if with_identity else None)
            out.append(RunSpec(s.study, st.folder, s.parameters, field=s.field, fold=s.fold,
                               notebook=st.notebook, identity=ident))
        return out
    if st.scope == "figures":
        return []
    upstream = [u for need in st.needs for u in stage_specs(study, stage(need), root, data_dir,
                                                            with_identity=False)]
    if st.parameters is not None:
        common.update(st.parameters(study))
    if st.scope == "field":
        keys = list(fields) if fields else list(st.fields(study) if st.fields else study.fields)
        return [RunSpec(study.name, st.folder, {**common, "field": k}, field=k,
                        notebook=st.notebook,
                        identity=derived_identity(study, st, upstream, root, data, k)
                        if with_identity else None) for k in keys]
    if st.scope == "module":
        return [RunSpec(study.name, st.folder, {**common, "module": u}, field=u,
                        notebook=st.notebook,
                        identity=derived_identity(study, st, upstream, root, data, u)
                        if with_identity else None) for u in study.network_units()]
    if st.scope == "study":
        return [RunSpec(study.name, st.folder, dict(common), notebook=st.notebook,
                        identity=derived_identity(study, st, upstream, root, data)
                        if with_identity else None)]
    raise ValueError(f"stage {st.name}: unknown scope {st.scope!r}; use one of {SCOPES}")


# --------------------------------------------------------------------------- checks before work


def split_strata(study: Study, eids: Sequence[str], data_dir=None, runs_root=None):
    """The stratum of each eid for ``study.stratify`` (None when not stratified): the value of a
    field with at most a few distinct values (sex), else its quintile; missing: its own stratum."""
    if study.stratify is None:
        return None
    paths = data_paths(study, data_dir, runs_root)
    values = references_from_fields_csv(paths.fields_csv, [study.stratify])[study.stratify]
    values.index = values.index.astype(str)
    values = values.reindex([str(e).split("-", 1)[0] for e in eids])
    if values.nunique() > 5:
        values = pd.qcut(values, 5, labels=False, duplicates="drop")
    return ["missing" if pd.isna(v) else str(v) for v in values]


def prepare_splits(study: Study, data_dir=None, runs_root=None) -> None:
    """Write the study's ``splits.csv`` once, before any run is dispatched (parallel runs must
    not race to create it): visits of one eid grouped, stratified as the study says, recorded in
    ``splits.json``; and report a field with too few labelled subjects in a validation fold."""
    paths = data_paths(study, data_dir, runs_root)
    eids = [str(e) for e in Store.open(paths.prepared).eids]
    load_or_create_splits(paths.splits, eids, study.folds, study.split_seed,
                          strata=split_strata(study, eids, data_dir, runs_root),
                          stratify=study.stratify)
    _store, _eids, targets, splits = load_targets(study, list(study.fields), data_dir, runs_root)
    fold_of = splits.set_index("eid")["fold"].reindex([str(e) for e in _eids]).to_numpy()
    low = []
    for j, key in enumerate(study.fields):
        labelled = ~np.isnan(targets[:, j])
        counts = [int(np.sum(labelled & (fold_of == k))) for k in range(study.folds)]
        if min(counts) < study.min_labelled_per_fold:
            low.append(f"{key} (per fold: {counts})")
    if low:
        raise StageError(f"{study.name}: too few labelled subjects in a validation fold (need "
                         f"{study.min_labelled_per_fold}): {'; '.join(low)}")


def stale_training(specs: Sequence[RunSpec], root: Path) -> list[tuple[RunSpec, list[str]]]:
    """Finished training runs whose recorded inputs differ from the specs'."""
    out = []
    for s in specs:
        run_dir = run_dir_for(s, root)
        if is_finished(run_dir) and s.identity is not None:
            changes = changed_inputs(run_dir, s.identity)
            if changes:
                out.append((s, changes))
    return out


def stale_message(stale: list[tuple[RunSpec, list[str]]], study: Study) -> str:
    spec, changes = stale[0]
    more = f" (and {len(stale) - 1} more run(s))" if len(stale) > 1 else ""
    return (f"run {spec.label}{more} finished with other inputs ({'; '.join(changes[:3])}); "
            f"pass --redo-changed to retrain them, or give the study another name (or "
            f"--runs-root) to keep the old runs")


def check_needs(study: Study, st: Stage, root: Path, data_dir=None) -> None:
    """Every run of the stages that ``st`` reads is finished and current, else one line."""
    for need in st.needs:
        dep = stage(need)
        if dep.scope == "figures" or not dep.applies(study):
            continue
        specs = stage_specs(study, dep, root, data_dir)
        missing = [s.label for s in specs if not is_finished(run_dir_for(s, root), s.identity)]
        if missing:
            raise StageError(f"stage {st.name} needs finished, current {dep.name} runs; missing "
                             f"or out of date: {', '.join(missing[:6])}"
                             f"{' ...' if len(missing) > 6 else ''}; run `biometry run {dep.name} "
                             f"--study {study.path}` first")


# --------------------------------------------------------------------------------- execution


def run_stage(study, name: str, runs_root=None, data_dir=None, workers: int = 1,
              fields: Sequence[str] | None = None, folds: Sequence[int] | None = None,
              scheduler: str | None = None, force: bool = False, redo_changed: bool = False,
              figures_root=None, progress: bool = True) -> list[RunResult]:
    """Run one stage of a study; raises :class:`StageError` before any work when it cannot start.

    Returns the run results (failed runs included); figures return an empty list and raise
    ``StageError`` when a figure notebook failed.
    """
    study = resolve_study(study)
    root = Path(runs_root) if runs_root else default_runs_root(study)
    st = stage(name)
    if st.scope == "figures":
        check_needs(study, st, root, data_dir)
        if build_figures(str(study.path), runs_root=root, figures_root=figures_root,
                         progress=progress, analyses=False):
            raise RunsFailed("some figure notebooks failed (see above)")
        return []
    if st.scope == "network":
        chosen = stage_specs(study, st, root, data_dir, fields, folds, with_identity=False)
        check_training_inputs(study, data_dir=data_dir, runs_root=root,
                              fields=None if study.multi_field else [s.field for s in chosen])
        prepare_splits(study, data_dir, root)
    else:
        check_needs(study, st, root, data_dir)
    specs = stage_specs(study, st, root, data_dir, fields, folds)
    if st.scope == "network" and not force and not redo_changed:
        stale = stale_training(specs, root)
        if stale:
            raise StageError(stale_message(stale, study))
    jobqueue = (study.dispatch or {}).get("jobqueue") if not scheduler and workers > 1 else None
    if st.scope == "network":
        threads = None
        if workers > 1 and not scheduler and not jobqueue:
            # counted over the whole stage, so that a run of some folds gets the same counts
            every = stage_specs(study, st, root, data_dir, with_identity=False)
            threads = dict(zip(every, thread_plan(len(every), workers), strict=True))
        return run_batch(specs, root=root, workers=workers, scheduler=scheduler,
                         jobqueue=jobqueue, force=force, progress=progress, threads=threads)
    return [execute_run(s, root, force=force) for s in specs]


def resolve_workers(study: Study, workers: int | None = None) -> int:
    """``workers`` when given, else the study's ``dispatch.workers`` (default 1): capped at the
    cores of this machine, unless the study's runs go to a ``dispatch: jobqueue:`` cluster."""
    if workers is not None:
        if int(workers) < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        return int(workers)
    wanted = (study.dispatch or {}).get("workers") or 1
    if not isinstance(wanted, int) or wanted < 1:
        raise ValueError(f"{study.path}: dispatch.workers must be a whole number of at least 1, "
                         f"got {wanted!r}")
    return wanted if (study.dispatch or {}).get("jobqueue") else min(wanted, available_cores())


def run_study(study, runs_root=None, data_dir=None, workers: int = 1,
              stages: Sequence[str] | None = None, scheduler: str | None = None,
              force: bool = False, redo_changed: bool = False, figures_root=None,
              progress: bool = True, log=print) -> None:
    """Every stage of :data:`PIPELINE` (or ``stages``) in order; stops at the first failure.

    With ``workers > 1`` on this machine (no scheduler, no jobqueue) the stages after training
    run side by side (:func:`run_side_by_side`); not for a thigh-function study, whose figures
    stage runs its one training stage when it has not finished.
    """
    study = resolve_study(study)
    chosen = [stage(s).name for s in stages] if stages else default_stages(study)
    order = [st for st in PIPELINE if st.name in chosen]
    if (workers > 1 and not scheduler and not (study.dispatch or {}).get("jobqueue")
            and not study.thigh):
        run_side_by_side(study, order, runs_root, data_dir, workers, force, redo_changed,
                         figures_root, progress, log)
        return
    for st in order:
        _run_in_order(study, st, runs_root, data_dir, workers, scheduler, force, redo_changed,
                      figures_root, progress, log)


def _run_in_order(study: Study, st: Stage, runs_root, data_dir, workers: int, scheduler,
                  force: bool, redo_changed: bool, figures_root, progress: bool, log) -> None:
    """One stage through :func:`run_stage`; :class:`RunsFailed` when a run failed."""
    log(f"[{study.name}] {st.name} ...")
    results = run_stage(study, st.name, runs_root, data_dir, workers, scheduler=scheduler,
                        force=force, redo_changed=redo_changed, figures_root=figures_root,
                        progress=progress)
    if results and report(results, stream=sys.stdout):
        raise RunsFailed(f"stage {st.name} of {study.name}: some runs failed (see above)")


def stage_waits(order: Sequence[Stage]) -> dict[str, set[str]]:
    """What each of the chosen stages (``order``, in :data:`PIPELINE` order) waits for when
    stages run side by side: its needs among them; training, when chosen, for every stage after
    it (training takes every core); and, for the figures, every stage before them (a figure
    notebook may read any stage's outputs)."""
    names = [st.name for st in order]
    waits: dict[str, set[str]] = {}
    for i, st in enumerate(order):
        before = set(names[:i])
        if st.scope == "figures":
            waits[st.name] = before
        else:
            waits[st.name] = (set(st.needs) & before) | {s.name for s in order[:i]
                                                          if s.scope == "network"}
    return waits


def _ready_specs(study: Study, st: Stage, root: Path, data_dir, figures_root) -> list[RunSpec]:
    """The runs of a stage whose waits are over (its needs checked on disk first)."""
    check_needs(study, st, root, data_dir)
    if st.scope == "figures":
        return figure_specs(study, root, figures_root)[0]
    return stage_specs(study, st, root, data_dir)


def run_side_by_side(study, order: Sequence[Stage], runs_root=None, data_dir=None,
                     workers: int = 2, force: bool = False, redo_changed: bool = False,
                     figures_root=None, progress: bool = True, log=print,
                     specs_of: Callable[[Stage], list[RunSpec]] | None = None) -> None:
    """Run the chosen stages on this machine, ``workers`` runs at a time.

    Training goes first (its runs share the cores, :func:`biometry.runs.batch.thread_plan`).
    Then each stage starts when the stages it waits for (:func:`stage_waits`) have finished: its
    runs join a queue (a stage that another waits for, such as ``calibrate``, at its front) and
    go ``workers`` at a time, a :attr:`Stage.serial` stage's one after another, each kernel with
    ``cores // workers`` threads (fixed, so that a result never depends on what else ran). After
    a stage fails (or cannot start) no other stage starts, the runs of the stages already started
    finish, and then :class:`RunsFailed` (or the :class:`StageError`) is raised.
    ``specs_of``: a stage's runs (default: from the study, its needs checked on disk).
    """
    from dask.distributed import wait  # only on this path

    study = resolve_study(study)
    root = Path(runs_root) if runs_root else default_runs_root(study)
    specs_of = specs_of or (lambda st: _ready_specs(study, st, root, data_dir, figures_root))
    waits, pending, done = stage_waits(order), list(order), set()
    if pending and pending[0].scope == "network":
        st = pending.pop(0)
        _run_in_order(study, st, root, data_dir, workers, None, force, redo_changed,
                      figures_root, progress, log)
        done.add(st.name)
    if not pending:
        return
    threads = max(1, available_cores() // workers)
    gates = {n for st in pending if st.scope != "figures" for n in waits[st.name]}
    queue: list[tuple[Stage, RunSpec]] = []
    expected: dict[str, int] = {}
    finished: dict[str, list[RunResult]] = {}
    started: dict[str, float] = {}
    failed: list[str] = []
    cannot_start: list[str] = []
    with dask_client(workers) as client:
        running: dict[Any, tuple[Stage, RunSpec]] = {}
        while True:
            stop = failed or cannot_start
            ready = [] if stop else [st for st in pending if waits[st.name] <= done]
            for st in ready:
                pending.remove(st)
                log(f"[{study.name}] {st.name} ...")
                try:
                    specs = specs_of(st)
                except StageError as exc:
                    cannot_start.append(str(exc))
                    break
                started[st.name] = time.perf_counter()
                expected[st.name], finished[st.name] = len(specs), []
                items = [(st, s) for s in specs]
                queue = items + queue if st.name in gates else queue + items
                if not specs:
                    done.add(st.name)
            if ready and not cannot_start:
                continue  # a stage without runs may free others
            busy = {st.name for st, _ in running.values() if st.serial}
            for item in list(queue):
                if len(running) >= workers:
                    break
                st, spec = item
                if st.name in busy:
                    continue
                queue.remove(item)
                fut = client.submit(execute_with_threads, spec, root,
                                    force or st.scope == "figures", threads, pure=False)
                running[fut] = item
                if st.serial:
                    busy.add(st.name)
            if not running:
                break
            for fut in wait(list(running), return_when="FIRST_COMPLETED").done:
                st, spec = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:  # a worker lost, an error outside the notebook
                    result = RunResult(spec, "failed", run_dir_for(spec, root),
                                       error=f"{type(exc).__name__}: {exc}")
                finished[st.name].append(result)
                if len(finished[st.name]) < expected[st.name]:
                    continue
                n_failed = report(finished[st.name], stream=sys.stdout)
                log(f"[{study.name}] {st.name}: {expected[st.name]} run(s), "
                    f"{time.perf_counter() - started[st.name]:.0f} s")
                if n_failed:
                    failed.append(st.name)
                else:
                    done.add(st.name)
    if cannot_start:
        raise StageError(cannot_start[0])
    if failed:
        raise RunsFailed(f"stage {', '.join(failed)} of {study.name}: some runs failed (see "
                         f"above)")
    if any(st.scope == "figures" for st in order if st.name in done):
        print(f"figures and tables of {study.name} in {figures_dir_for(study, figures_root)}")


# ------------------------------------------------------------------------------------ the CLI

_DEFAULTS_HELP = ("Outputs go to papermill_runs/<study>/ and figures/<study>/: of the checkout for "
                  "a preset, beside the study YAML for a study file of your own (--runs-root and "
                  "--figures-root override).")
_ERRORS = (KeyError, ValueError, FileNotFoundError, StageError)


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _guarded(prog: str, work) -> int:
    """``work()``'s exit status; failed runs give 1, a stage that cannot start gives one line
    and 2."""
    try:
        return int(work() or 0)
    except RunsFailed as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except _ERRORS as exc:
        print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
        return 2


def _common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--study", required=True, help="preset name or path to a study YAML")
    ap.add_argument("--workers", type=int, help="runs at a time on a local Dask cluster (default: "
                    "the study's dispatch.workers, at most the cores, else 1); with more than one, "
                    "the stages after training also run side by side")
    ap.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    ap.add_argument("--runs-root", help="folder of run outputs (default: see above)")
    ap.add_argument("--figures-root", help="folder of figures (default: see above)")
    ap.add_argument("--data-dir", help="a folder with fields.csv and prepared/ (default: the "
                    "study's data paths)")
    ap.add_argument("--redo-changed", action="store_true",
                    help="retrain finished runs whose inputs changed (default: stop and say so)")
    ap.add_argument("--force", action="store_true", help="redo every run, finished or not")


def run_main(argv: list[str] | None = None) -> int:
    """``biometry run <stage>``."""
    ap = argparse.ArgumentParser(
        prog="biometry run",
        description="Execute one stage of a study: "
                    + "; ".join(f"{s.name}: {s.help}" for s in PIPELINE)
                    + ". Finished runs with the same inputs are skipped; a training run whose "
                    "inputs changed stops the batch before any work. Exit status 1 if any run "
                    "failed, 2 if the stage could not start. " + _DEFAULTS_HELP)
    ap.add_argument("stage", choices=[s.name for s in PIPELINE], help="the stage to run")
    _common_arguments(ap)
    ap.add_argument("--fields", nargs="*", help="field keys (default: all of the study)")
    ap.add_argument("--folds", nargs="*", type=int, help="fold indices (train; default: all)")
    a = ap.parse_args(argv)

    def work() -> int:
        workers = resolve_workers(resolve_study(a.study), a.workers)
        results = run_stage(a.study, a.stage, a.runs_root, a.data_dir, workers, a.fields,
                            a.folds, a.scheduler, a.force, a.redo_changed, a.figures_root)
        return 1 if results and report(results) else 0

    return _guarded("biometry run", work)


def study_main(argv: list[str] | None = None) -> int:
    """``biometry study new|run``."""
    ap = argparse.ArgumentParser(prog="biometry study", description="Start a study of your "
                                 "own from a preset, or run every stage of a study.")
    sub = ap.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="write a study YAML for your data from a preset",
                         description="Write <name>.yaml (in --out, default the current folder) "
                         "from a preset, pointing at your fields table and prepared store with "
                         "paths relative to the new file's folder.")
    new.add_argument("name", help="the study's name (also the file name)")
    new.add_argument("--from", dest="preset", required=True, help="the preset to start from")
    new.add_argument("--fields-csv", required=True, help="the release's fields table")
    new.add_argument("--prepared", required=True, help="the store written by biometry prepare")
    new.add_argument("--fields", nargs="*", help="field keys (default: the preset's)")
    new.add_argument("--iterations", type=int, help="training iterations (lr_steps scale along)")
    new.add_argument("--folds", type=int, help="k of the k-fold cross-validation")
    new.add_argument("--out", default=".", help="folder of the new YAML (default: here)")
    new.add_argument("--overwrite", action="store_true", help="replace an existing file")
    run = sub.add_parser("run", help="run every stage of a study in order",
                         description="Run " + " -> ".join(s.name for s in PIPELINE)
                         + " for a study (its data prepared with `biometry prepare`). "
                         + _DEFAULTS_HELP)
    _common_arguments(run)
    run.add_argument("--stages", nargs="*", choices=[s.name for s in PIPELINE],
                     help="only these stages (default: those that apply to the study, in order)")
    a = ap.parse_args(argv)

    def new() -> int:
        path = new_study(a.name, a.preset, a.fields_csv, a.prepared, out_dir=a.out,
                         fields=a.fields, iterations=a.iterations, folds=a.folds,
                         overwrite=a.overwrite)
        shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path
        print(f"wrote {shown}\nnext: biometry study run --study {shown}")
        return 0

    def run() -> int:
        study = resolve_study(a.study)
        run_study(study, a.runs_root, a.data_dir, resolve_workers(study, a.workers), a.stages,
                  a.scheduler, a.force, a.redo_changed, a.figures_root)
        root = Path(a.runs_root) if a.runs_root else default_runs_root(study)
        print(f"[{study.name}] runs in {root / study.name}")
        return 0

    return _guarded(f"biometry study {a.action}", new if a.action == "new" else run)
