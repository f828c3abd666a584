"""Batches of runs on a Dask cluster (local, a scheduler address, or SLURM/PBS through
dask-jobqueue): finished runs are skipped, failed ones retried, and a failure never stops the rest.
``biometry run`` and ``biometry study run`` (:mod:`biometry.runs.pipeline`) dispatch through it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from biometry.config import fields as catalogue
from biometry.config.paths import runs_dir
from biometry.runs.runner import RunResult, RunSpec, execute_run, is_finished, run_dir_for


def _executor_client(workers: int, scheduler: str | None, jobqueue: dict | None):
    """A dask Client: a running scheduler, a dask-jobqueue cluster, or a local cluster."""
    from dask.distributed import Client, LocalCluster  # here: a figure notebook needs no dask
    if scheduler:
        return Client(scheduler)
    if jobqueue:
        cluster = make_jobqueue_cluster(jobqueue)
        cluster.scale(jobs=int(jobqueue.get("jobs", workers)))
        return Client(cluster)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster)


def make_jobqueue_cluster(settings: dict):
    """A dask-jobqueue cluster from a study's ``dispatch.jobqueue`` settings.

    ``settings = {"kind": "slurm"|"pbs"|"sge"|"lsf", "jobs": 4, ...}``; the other keys go to the
    cluster class (cores, memory, walltime, queue, account, job_extra_directives, ...).
    """
    try:
        import dask_jobqueue  # optional: the [hpc] extra
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("dask-jobqueue is not installed: pip install 'biometry[hpc]'") from exc
    kinds = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster",
             "lsf": "LSFCluster"}
    kw = {k: v for k, v in settings.items() if k not in ("kind", "jobs")}
    kind = str(settings.get("kind", "slurm")).lower()
    if kind not in kinds:
        raise ValueError(f"unknown jobqueue kind {kind!r}; use one of {', '.join(kinds)}")
    kw.setdefault("processes", 1)
    return getattr(dask_jobqueue, kinds[kind])(**kw)


def run_batch(specs: Sequence[RunSpec], root: str | os.PathLike | None = None, workers: int = 1,
              scheduler: str | None = None, jobqueue: dict | None = None, force: bool = False,
              progress: bool = True) -> list[RunResult]:
    """Execute runs, skipping finished ones, in parallel on Dask when ``workers > 1``.

    A failing notebook does not stop the batch: its result has ``status == "failed"`` and names
    the executed notebook that shows the error.
    """
    root = Path(root) if root is not None else runs_dir()
    todo = [s for s in specs if force or not is_finished(run_dir_for(s, root), s.identity)]
    results = [RunResult(s, "skipped", run_dir_for(s, root)) for s in specs if s not in todo]
    if not todo:
        return results
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress)
    if workers <= 1 and not scheduler and not jobqueue:
        for spec in todo:
            bar.set_postfix_str(spec.label)
            results.append(execute_run(spec, root, force=force))
            bar.update()
    else:
        from dask.distributed import as_completed  # with the cluster only (see above)

        with _executor_client(workers, scheduler, jobqueue) as client:
            futures = [client.submit(execute_run, spec, root, force, pure=False, key=f"run-{i}")
                       for i, spec in enumerate(todo)]
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.set_postfix_str(results[-1].spec.label)
                bar.update()
    bar.close()
    order = {s: i for i, s in enumerate(specs)}
    results.sort(key=lambda r: order.get(r.spec, 0))
    return results


def report(results: Iterable[RunResult], stream=None) -> int:
    """Print a one-line summary and each failure with its notebook; return the number failed."""
    stream = stream or sys.stdout
    results = list(results)
    counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
    print(f"{counts['done']} run(s) done, {counts['skipped']} already finished, "
          f"{counts['failed']} failed", file=stream)
    for r in results:
        if r.status == "failed":
            print(f"  FAILED {r.spec.label}: {r.error}\n         see {r.notebook}", file=stream)
    return counts["failed"]


# ---------------------------------------------------------------------------------------- CLI


def study_train_specs(study, fields: Sequence[str] | None = None,
                      folds: Sequence[int] | None = None,
                      extra: dict[str, Any] | None = None) -> list[RunSpec]:
    """The training runs of a study: one per (field or network group, fold)."""
    if getattr(study, "thigh", None):
        raise ValueError(f"study {study.name!r} is a thigh-function study (frozen slice-wise "
                         f"backbone): run it with `biometry thigh --study {study.name}`")
    chosen = list(study.fields) if not fields else catalogue.validate(fields)
    missing = [f for f in chosen if f not in study.fields]
    if missing:
        raise ValueError(f"study {study.name!r} does not train {', '.join(missing)}; "
                         f"its fields: {', '.join(study.fields)}")
    if folds is None:
        folds = list(getattr(study, "train_folds", None) or range(study.folds))
    folds = [int(k) for k in folds]
    bad = [k for k in folds if not 0 <= k < study.folds]
    if bad:
        raise ValueError(f"fold(s) {bad} out of range for {study.folds}-fold study {study.name!r}")
    units = study.network_units() if study.multi_field else chosen
    specs = []
    for unit in units:
        for k in folds:
            # the notebook gets the study's YAML path, so user studies outside the presets work
            params = {"study": str(getattr(study, "path", study.name)), "field": unit, "fold": k,
                      **(extra or {})}
            if study.multi_field:
                params["fields"] = ([f for f in study.modules[unit] if f in chosen]
                                    if study.modules else chosen)
            specs.append(RunSpec(study.name, "train", params, field=unit, fold=k))
    return specs
