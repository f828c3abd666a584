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
from biometry.parallel import MALLOC_TRIM, available_cores, dask_client
from biometry.runs.runner import RunResult, RunSpec, execute_run, is_finished, run_dir_for


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


def thread_plan(n_runs: int, workers: int, cores: int | None = None) -> list[int]:
    """Torch threads for each of ``n_runs`` runs executed ``workers`` at a time on one machine.

    The runs are counted in waves of ``workers`` in their order; each run of a wave gets an equal
    share of the cores, at least one (a run starts when a worker frees, so a run of the next wave
    may overlap the end of this one). A last, smaller wave takes the cores the others leave: 3 folds on
    2 workers and 2 cores get 1, 1 and 2 threads (on this 2-core CPU two 1-thread trainings side
    by side do ~1.3x the work of one 2-thread training, and a lone 1-thread one ~0.55x;
    BENCHMARKS.md). The plan depends on the runs' positions in the whole stage only, so a run
    gets the same count when a batch resumes or runs some of its folds (the count changes a
    network's floating-point result).
    """
    cores = cores or available_cores()
    workers = max(1, int(workers))
    plan = []
    for i in range(n_runs):
        start = (i // workers) * workers
        plan.append(max(1, cores // min(workers, n_runs - start)))
    return plan


#: what a kernel reads for its thread count: OpenMP (torch), MKL, OpenBLAS, numba (UMAP), ITK
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def execute_with_threads(spec: RunSpec, root, force: bool = False,
                         threads: int | None = None) -> RunResult:
    """:func:`execute_run` in a worker process of a local cluster, its notebook's kernel limited
    to ``threads`` (through the variables it inherits; None: the worker's as they are). Only for
    a worker process, which runs one task at a time: it sets this process's environment.

    Dask starts the workers of a cluster not made by :func:`biometry.parallel.local_cluster`
    (``dask worker``) with ``MALLOC_TRIM_THRESHOLD_=65536``, which a kernel would inherit: glibc
    then hands memory back to the system after every large free, and a training's allocations
    turn into system calls (a third of the CPU time in system mode, measured; a training ~1.7x
    slower). The kernel gets glibc's default instead."""
    os.environ.pop(MALLOC_TRIM, None)
    if threads is not None:
        os.environ.update({name: str(int(threads)) for name in THREAD_VARIABLES})
    return execute_run(spec, root, force)


def job_threads(jobqueue: dict | None) -> int | None:
    """The threads of a run on a dask-jobqueue job: the job's ``cores`` over its ``processes``
    (a job's Dask worker would otherwise leave its kernels one thread); None when not said."""
    if not jobqueue or not jobqueue.get("cores"):
        return None
    return max(1, int(jobqueue["cores"]) // max(1, int(jobqueue.get("processes", 1) or 1)))


def run_batch(specs: Sequence[RunSpec], root: str | os.PathLike | None = None, workers: int = 1,
              scheduler: str | None = None, jobqueue: dict | None = None, force: bool = False,
              progress: bool = True, threads: dict[RunSpec, int] | None = None
              ) -> list[RunResult]:
    """Execute runs, skipping finished ones, in parallel on Dask when ``workers > 1``.

    A failing notebook does not stop the batch: its result has ``status == "failed"`` and names
    the executed notebook that shows the error. ``threads``: each run's thread count on a local
    cluster (:func:`thread_plan`; else one thread, Dask's default for the processes of a local
    cluster); on a jobqueue cluster a run gets :func:`job_threads`.
    """
    root = Path(root) if root is not None else runs_dir()
    plan = dict(threads or {}) if not scheduler and not jobqueue else {}
    per_job = job_threads(jobqueue)
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

        cluster = None
        if jobqueue and not scheduler:
            cluster = make_jobqueue_cluster(jobqueue)
            cluster.scale(jobs=int(jobqueue.get("jobs", workers)))
        with dask_client(workers, scheduler, cluster) as client:
            futures = [client.submit(execute_with_threads, spec, root, force,
                                     plan.get(spec, per_job), pure=False, key=f"run-{i}")
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
