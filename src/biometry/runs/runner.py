"""Run folders and provenance: one notebook execution (papermill) into a folder named from its
parameters (batches of runs over Dask: :mod:`biometry.runs.batch`).

A *run* is one execution of one notebook stage with one set of parameters. Its folder is named
from the parameters, never from a timestamp::

    papermill_runs/<study>/<stage>/[<field>/][fold_<k>/]

and holds the executed notebook, ``params.yaml``, ``provenance.json`` and the stage's outputs as
plain files. A run is *finished* when ``done.json`` exists (written atomically after the notebook
succeeded); a failed run leaves ``failed.json`` with the error and the executed notebook that shows
it.

**Run identity.** A spec may carry ``identity``: the resolved inputs that define its result (the
training settings, the fields, a hash of the split file, of the prepared subject index and of the
fields table; see :mod:`biometry.runs.pipeline`). It is stored in ``done.json`` and
``params.yaml``; a finished run counts as finished only for the same identity
(:func:`changed_inputs` names what differs). :func:`execute_run` redoes a run whose identity
changed; the training batch refuses to start instead (see ``biometry run --help``).
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata as md
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import yaml

from biometry import fileio
from biometry.config.paths import notebooks_dir, repo_root, runs_dir
from biometry.runs.notebook import NotebookFailed, execute_notebook

#: stage -> notebook file (in notebooks/)
STAGES: dict[str, str] = {
    "phantom": "00_phantom_cohort.ipynb",
    "prepare": "01_prepare.ipynb",
    "train": "02_train.ipynb",
    "evaluate": "03_evaluate_field.ipynb",
    "agreement": "04_agreement.ipynb",
    "feature_space": "05_feature_space.ipynb",
    "thigh": "10_thigh_function.ipynb",
    "liver": "07_liver_fat.ipynb",
    "saliency": "06_saliency.ipynb",
    "calibrate": "08_calibrate.ipynb",
    "inference": "08_inference.ipynb",
}
DONE = "done.json"
FAILED = "failed.json"
_PACKAGES = ("biometry", "numpy", "scipy", "pandas", "torch", "torchvision", "nibabel", "pydicom",
             "scikit-learn", "statsmodels", "papermill", "dask", "umap-learn",
             "captum", "SimpleITK")


@dataclass(frozen=True)
class RunSpec:
    """One notebook execution: which notebook, with which parameters, into which folder."""

    study: str
    stage: str
    parameters: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    field: str | None = None
    fold: int | None = None
    notebook: str | None = None  # defaults to STAGES[stage]
    #: the resolved inputs that define the result (plain JSON types); None: not tracked
    identity: dict[str, Any] | None = dc_field(default=None, hash=False, compare=False)

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


def is_finished(run_dir: str | os.PathLike, identity: dict[str, Any] | None = None) -> bool:
    """``done.json`` exists and, when ``identity`` is given, was written for those inputs."""
    done = Path(run_dir) / DONE
    if not done.is_file():
        return False
    return identity is None or not changed_inputs(run_dir, identity)


def identity_hash(identity: dict[str, Any]) -> str:
    """sha256 of the identity's canonical JSON (sorted keys)."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_hash(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes (None when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def stored_identity(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The identity recorded in a finished run's ``done.json`` (None: none recorded)."""
    try:
        return json.loads((Path(run_dir) / DONE).read_text()).get("identity")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None


def attempted_identity(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The identity of a run's latest attempt, finished or not (its ``params.yaml``, written
    before the notebook starts); None when there is none."""
    try:
        return (yaml.safe_load((Path(run_dir) / "params.yaml").read_text()) or {}).get("identity")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def changed_inputs(run_dir: str | os.PathLike, identity: dict[str, Any]) -> list[str]:
    """What differs between a finished run's recorded inputs and ``identity``, as short phrases
    (``"training.lr: 0.001 -> 0.0005"``); empty when they agree."""
    old = stored_identity(run_dir)
    if old is None:
        return ["no recorded inputs (made by an older version)"]
    if identity_hash(old) == identity_hash(identity):
        return []
    a, b = _flatten(old), _flatten(identity)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
            if isinstance(va, str) and len(va) == 64:  # hashes: say only that they differ
                va, vb = "old", "new"
            out.append(f"{key}: {va} -> {vb}")
    return out or ["inputs differ"]


def provenance() -> dict[str, Any]:
    """Where and with what a run was made: git commit, package versions, host, device."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "user": _safe(getpass.getuser),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "packages": {p: _safe(md.version, p) for p in _PACKAGES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import torch  # here, not at the top: the figure notebooks import this module, not torch

        info["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        # the kernels torch picks (e.g. AVX2 or AVX512): another set gives other last digits
        info["cpu_capability"] = _safe(torch.backends.cpu.get_cpu_capability)
        # the notebook's kernel, a child process, starts torch from this environment
        omp = os.environ.get("OMP_NUM_THREADS", "")
        info["torch_threads"] = int(omp) if omp.isdigit() else torch.get_num_threads()
    except Exception:  # pragma: no cover - torch is a dependency
        info["device"] = "unknown"
    return info


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The processor as the kernel names it, with its family, model and stepping numbers where
    ``cpuinfo`` gives them (``"AMD EPYC (family 26, model 2, stepping 1)"``): virtual machines
    of one name may run on different processor generations, whose kernels give other results.
    Falls back to :func:`platform.processor` (empty on some systems) where there is no cpuinfo."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or info.get("Processor") or platform.machine()
    numbers = ", ".join(f"{label} {info[key]}" for key, label in
                        (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
                        if info.get(key))
    return f"{name} ({numbers})" if numbers else name


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
    """Execute one run unless it is finished (for ``spec.identity``); never raises for a notebook
    error. A finished run whose recorded identity differs is redone."""
    run_dir = run_dir_for(spec, root)
    if is_finished(run_dir, spec.identity) and not force:
        return RunResult(spec, "skipped", run_dir,
                         notebook=run_dir / Path(spec.notebook or STAGES.get(spec.stage, "")).name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    (run_dir / DONE).unlink(missing_ok=True)
    nb_name = spec.notebook or STAGES[spec.stage]
    source = notebooks_dir() / nb_name
    params = {**spec.parameters, "run_dir": str(run_dir)}
    fileio.write_text(run_dir / "params.yaml", yaml.safe_dump(
        {"study": spec.study, "stage": spec.stage, "field": spec.field, "fold": spec.fold,
         "notebook": nb_name, "parameters": params, "identity": spec.identity}, sort_keys=True))
    fileio.write_json(run_dir / "provenance.json", provenance())
    # in the run folder, by name: a notebook given by an absolute path would otherwise be
    # overwritten by its own output (and read half-written by a run beside it)
    output = run_dir / Path(nb_name).name
    start = time.perf_counter()
    try:
        execute_notebook(source, output, parameters=params, cwd=cwd or repo_root())
    except NotebookFailed as exc:
        seconds = time.perf_counter() - start
        message = str(exc).split(": ", 1)[-1]
        fileio.write_json(run_dir / FAILED, {"error": message, "notebook": str(output),
                                         "seconds": seconds})
        return RunResult(spec, "failed", run_dir, output, message, seconds)
    except Exception as exc:  # a missing notebook, a kernel that cannot start, ...
        seconds = time.perf_counter() - start
        message = f"{type(exc).__name__}: {exc}"
        fileio.write_json(run_dir / FAILED, {"error": message, "notebook": str(output),
                                         "seconds": seconds})
        return RunResult(spec, "failed", run_dir, output, message, seconds)
    seconds = time.perf_counter() - start
    done = {"seconds": round(seconds, 3), "notebook": nb_name}
    if spec.identity is not None:
        done.update(identity=spec.identity, identity_hash=identity_hash(spec.identity))
    fileio.write_json(run_dir / DONE, done)
    return RunResult(spec, "done", run_dir, output, None, seconds)
