"""Run folders, provenance and batch execution of notebooks (papermill over Dask).

A *run* is one execution of one notebook stage with one set of parameters. Its folder is named
from the parameters, never from a timestamp::

    papermill_runs/<study>/<stage>/[<field>/][fold_<k>/]

and holds the executed notebook, ``params.yaml``, ``provenance.json`` and the stage's outputs as
plain files. A run is *finished* when ``done.json`` exists (written atomically after the notebook
succeeded); a failed run leaves ``failed.json`` with the error and the executed notebook that shows
it. A batch skips finished runs, retries failed ones, and keeps going when one fails.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from biometry import io
from biometry.notebook_exec import NotebookFailed, execute_notebook
from biometry.paths import notebooks_dir, repo_root, runs_dir

#: stage -> notebook file (in notebooks/)
STAGES: dict[str, str] = {
    "phantom": "00_phantom_cohort.ipynb",
    "prepare": "01_prepare.ipynb",
    "train": "02_train.ipynb",
    "evaluate": "03_evaluate_field.ipynb",
    "agreement": "04_agreement.ipynb",
    "feature_space": "05_feature_space.ipynb",
}
DONE = "done.json"
FAILED = "failed.json"
_PACKAGES = ("biometry", "numpy", "scipy", "pandas", "torch", "torchvision", "nibabel", "pydicom",
             "scikit-learn", "statsmodels", "papermill", "dask", "umap-learn")


@dataclass(frozen=True)
class RunSpec:
    """One notebook execution: which notebook, with which parameters, into which folder."""

    study: str
    stage: str
    parameters: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    field: str | None = None
    fold: int | None = None
    notebook: str | None = None  # defaults to STAGES[stage]

    @property
    def label(self) -> str:
        parts = [self.study, self.stage]
        if self.field is not None:
            parts.append(str(self.field))
        if self.fold is not None:
            parts.append(f"fold_{self.fold}")
        return "/".join(parts)


@dataclass
class RunResult:
    spec: RunSpec
    status: str  # "done", "skipped" (finished before), "failed"
    run_dir: Path
    notebook: Path | None = None
    error: str | None = None
    seconds: float = 0.0


def run_dir_for(spec: RunSpec, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<study>/<stage>/[<field>/][fold_<k>/]`` (root defaults to ``papermill_runs/``)."""
    path = Path(root) if root is not None else runs_dir()
    path = path / spec.study / spec.stage
    if spec.field is not None:
        path = path / str(spec.field)
    if spec.fold is not None:
        path = path / f"fold_{int(spec.fold)}"
    return path


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).is_file()


def provenance() -> dict[str, Any]:
    """Where and with what a run was made: git commit, package versions, host, device."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "user": _safe(getpass.getuser),
        "cpu_count": os.cpu_count(),
        "packages": {p: _safe(md.version, p) for p in _PACKAGES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import torch

        info["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # pragma: no cover - torch is a dependency
        info["device"] = "unknown"
    return info


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()
    except Exception:
        return None


def execute_run(spec: RunSpec, root: str | os.PathLike | None = None, force: bool = False,
                cwd: str | os.PathLike | None = None) -> RunResult:
    """Execute one run unless it is finished; never raises for a notebook error."""
    run_dir = run_dir_for(spec, root)
    if is_finished(run_dir) and not force:
        return RunResult(spec, "skipped", run_dir, notebook=run_dir / (spec.notebook or STAGES.get(spec.stage, "")))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    (run_dir / DONE).unlink(missing_ok=True)
    nb_name = spec.notebook or STAGES[spec.stage]
    source = notebooks_dir() / nb_name
    params = {**spec.parameters, "run_dir": str(run_dir)}
    io.write_text(run_dir / "params.yaml", yaml.safe_dump(
        {"study": spec.study, "stage": spec.stage, "field": spec.field, "fold": spec.fold,
         "notebook": nb_name, "parameters": params}, sort_keys=True))
    io.write_json(run_dir / "provenance.json", provenance())
    output = run_dir / nb_name
    start = time.perf_counter()
    try:
        execute_notebook(source, output, parameters=params, cwd=cwd or repo_root())
    except NotebookFailed as exc:
        seconds = time.perf_counter() - start
        message = str(exc).split(": ", 1)[-1]
        io.write_json(run_dir / FAILED, {"error": message, "notebook": str(output),
                                         "seconds": seconds})
        return RunResult(spec, "failed", run_dir, output, message, seconds)
    except Exception as exc:  # a missing notebook, a kernel that cannot start, ...
        seconds = time.perf_counter() - start
        message = f"{type(exc).__name__}: {exc}"
        io.write_json(run_dir / FAILED, {"error": message, "notebook": str(output),
                                         "seconds": seconds})
        return RunResult(spec, "failed", run_dir, output, message, seconds)
    seconds = time.perf_counter() - start
    io.write_json(run_dir / DONE, {"seconds": round(seconds, 3), "notebook": nb_name})
    return RunResult(spec, "done", run_dir, output, None, seconds)


def _executor_client(workers: int, scheduler: str | None, jobqueue: dict | None):
    """A dask Client: a running scheduler, a dask-jobqueue cluster, or a local cluster."""
    from dask.distributed import Client, LocalCluster

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
        import dask_jobqueue
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
    from tqdm.auto import tqdm

    root = Path(root) if root is not None else runs_dir()
    todo = [s for s in specs if force or not is_finished(run_dir_for(s, root))]
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
        from dask.distributed import as_completed

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
    from biometry import fields as catalogue

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
    units = [study.network_name] if study.multi_field else chosen
    specs = []
    for unit in units:
        for k in folds:
            # the notebook gets the study's YAML path, so user studies outside the presets work
            params = {"study": str(getattr(study, "path", study.name)), "field": unit, "fold": k,
                      **(extra or {})}
            if study.multi_field:
                params["fields"] = chosen
            specs.append(RunSpec(study.name, "train", params, field=unit, fold=k))
    return specs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="biometry run",
        description="Execute a notebook stage for every field and fold of a study, in parallel, "
                    "skipping finished runs. Exit status 1 if any run failed.")
    ap.add_argument("stage", choices=["train"], help="the stage to run")
    ap.add_argument("--study", required=True, help="preset name or path to a study YAML")
    ap.add_argument("--fields", nargs="*", help="field keys (default: all of the study)")
    ap.add_argument("--folds", nargs="*", type=int, help="fold indices (default: all)")
    ap.add_argument("--workers", type=int, default=1, help="parallel runs on a local Dask cluster")
    ap.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    ap.add_argument("--runs-root", help="folder of run outputs (default: papermill_runs/)")
    ap.add_argument("--data-dir", help="prepared data of the study (default: from the study)")
    ap.add_argument("--force", action="store_true", help="re-run finished runs")
    a = ap.parse_args(argv)
    from biometry.config import load_study

    try:
        study = load_study(a.study)
        extra = {"data_dir": a.data_dir} if a.data_dir else {}
        if a.runs_root:
            extra["runs_root"] = a.runs_root
        specs = study_train_specs(study, a.fields, a.folds, extra)
        from biometry.pipeline import check_training_inputs

        check_training_inputs(study, data_dir=a.data_dir, runs_root=a.runs_root,
                              fields=[s.field for s in specs] if not study.multi_field else None)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"biometry run: error: {msg}", file=sys.stderr)
        return 2
    jobqueue = (study.dispatch or {}).get("jobqueue") if not a.scheduler else None
    results = run_batch(specs, root=a.runs_root, workers=a.workers, scheduler=a.scheduler,
                        jobqueue=jobqueue if a.workers > 1 else None, force=a.force)
    return 1 if report(results) else 0
