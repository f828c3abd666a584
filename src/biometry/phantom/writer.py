"""Writing a phantom cohort to disk like a UKB release, atomically per subject, in parallel.

Layout of ``DIR`` (contract)::

    nifti/<eid>/station_<k>_water.nii.gz, station_<k>_fat.nii.gz   k = 1..6 (LAS, int16 + scl_slope)
    zip/<eid>_20201_2_0.zip                                          with --station-format zip|both
    fields.csv                                                       eid + UKB showcase columns
    truth/labels/<eid>_labels.nii.gz                                 fused-grid labels (LPS, uint8)
    truth/parameters.csv, truth/qc.csv                               true parameters, artefacts
    truth/subjects/<eid>.json                                        per-subject record (commit mark)
    cohort.json                                                      seed, scale, n, version, ...

A subject is written into ``DIR/.partial/`` and moved into place file by file; its record under
``truth/subjects/`` is moved last and marks it complete. A killed run therefore leaves at worst a
``.partial`` folder or files without a record, and a re-run regenerates those subjects. gzip
streams carry no timestamp, so the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from biometry.config import population as population_module
from biometry.config.population import POPULATION, non_default
from biometry.config.population import population as population_options
from biometry.data.ingest import write_ukb_zip
from biometry.errors import UsageError, run_guarded
from biometry.fileio import atomic_path, write_csv, write_json
from biometry.phantom import anatomy, cohort
from biometry.phantom.cohort import PHANTOM_VERSION, Subject

STATION_FORMATS = ("nifti", "zip", "both")
_MANAGED = ("nifti", "zip", "truth", "fields.csv", "cohort.json", ".partial")
GZIP_LEVEL = 1


# ---------------------------------------------------------------------------------------------
# NIfTI


def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray, dtype=np.int16,
                   descrip: str = "", level: int = GZIP_LEVEL) -> bytes:
    """A ``.nii.gz`` file's bytes, deterministic (gzip mtime 0, no file name).

    Float arrays written as ``int16`` get nibabel's scaling (``scl_slope``), as a converter does.
    """
    img = nib.Nifti1Image(np.asarray(array), affine)
    hdr = img.header
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = descrip[:79].encode()
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def write_nifti_gz(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
                   dtype=np.int16, descrip: str = "") -> Path:
    """Write ``array`` as a deterministic ``.nii.gz`` at ``path``, atomically."""
    data = nifti_gz_bytes(array, affine, dtype=dtype, descrip=descrip)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        tmp.write_bytes(data)
    return Path(path)


def station_path(root: str | os.PathLike, eid: str, k: int, kind: str) -> Path:
    """``root/nifti/<eid>/station_<k>_<kind>.nii.gz`` (kind: water or fat)."""
    return Path(root) / "nifti" / eid / f"station_{k}_{kind}.nii.gz"


def label_path(root: str | os.PathLike, eid: str) -> Path:
    return Path(root) / "truth" / "labels" / f"{eid}_labels.nii.gz"


def record_path(root: str | os.PathLike, eid: str) -> Path:
    return Path(root) / "truth" / "subjects" / f"{eid}.json"


# ---------------------------------------------------------------------------------------------
# one subject


def code_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the generator's source files and of the population
    options' table: a resume never keeps subjects that an edited generator would write
    differently."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")) + [Path(population_module.__file__)]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cohort_key(seed: int, scale: float, station_format: str, release: int = 1) -> dict:
    return {"seed": int(seed), "scale": float(scale), "station_format": station_format,
            "version": PHANTOM_VERSION, "code": code_fingerprint(), "release": int(release)}


def earlier_release(root: str | os.PathLike, scale: float,
                    population: Mapping[str, float | None] | None = None
                    ) -> tuple[int, list[str], dict[str, float]]:
    """The release number that follows the phantom cohort at ``root``, the eids to avoid (its
    own and those of the releases before it) and the protocol's population options (every one,
    :mod:`biometry.config.population`). Raises ValueError naming the folder when it is not a
    complete phantom cohort or was made with another protocol (``scale``, or a population option
    given, not None, and different)."""
    root = Path(root)
    try:
        meta = json.loads((root / "cohort.json").read_text())
        eids = pd.read_csv(root / "fields.csv", usecols=["eid"], dtype={"eid": str})["eid"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{root}: not a phantom cohort to follow ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not meta.get("complete", False):
        raise ValueError(f"{root}: the earlier release is incomplete; finish it first")
    if abs(float(meta.get("scale", -1)) - float(scale)) > 1e-9:
        raise ValueError(f"{root}: the earlier release has scale {meta.get('scale')}, this one "
                         f"{scale}; a later release keeps the protocol")
    try:
        theirs = population_options({k: meta.get(k) for k in POPULATION})
    except ValueError as exc:
        raise ValueError(f"{root}: cohort.json: {exc}") from None
    mine = population_options(population)  # names and values checked
    for name, value in (population or {}).items():
        if value is not None and abs(mine[name] - theirs[name]) > 1e-12:
            raise ValueError(f"{root}: the earlier release has {name} {theirs[name]:g}, this "
                             f"one {mine[name]:g}; a later release keeps the protocol")
    earlier = sorted(set(eids) | set(meta.get("earlier_eids", [])))
    return int(meta.get("release", 1)) + 1, earlier, theirs


def write_subject(root: Path, subject: Subject, station_format: str, key: dict) -> None:
    """Write one subject's files under ``root`` (see module docstring), record last."""
    eid = subject.eid
    partial = root / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{eid}-", dir=partial))
    try:
        if station_format in ("nifti", "both"):
            (tmp / "nifti").mkdir()
            for st in subject.stations:
                for kind, arr in (("water", st.water), ("fat", st.fat)):
                    data = nifti_gz_bytes(arr, st.affine, descrip=f"phantom station {st.index} {kind}")
                    (tmp / "nifti" / f"station_{st.index}_{kind}.nii.gz").write_bytes(data)
        if station_format in ("zip", "both"):
            write_ukb_zip(subject.stations, eid, tmp / f"{eid}_20201_2_0.zip")
        (tmp / "labels.nii.gz").write_bytes(
            nifti_gz_bytes(subject.labels, subject.labels_affine, dtype=np.uint8,
                           descrip="phantom tissue labels"))
        record = {"key": key, "eid": eid, "observed": cohort.observed_row(subject),
                  "truth": cohort.truth_row(subject), "qc": cohort.qc_rows(subject)}
        (tmp / "record.json").write_text(json.dumps(record, default=_jsonable, allow_nan=True))
        # move into place; the record goes last and marks the subject complete
        lab = label_path(root, eid)
        lab.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "labels.nii.gz", lab)
        if station_format in ("zip", "both"):
            (root / "zip").mkdir(exist_ok=True)
            os.replace(tmp / f"{eid}_20201_2_0.zip", root / "zip" / f"{eid}_20201_2_0.zip")
        if station_format in ("nifti", "both"):
            dest = root / "nifti" / eid
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp / "nifti", dest)
        rec = record_path(root, eid)
        rec.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "record.json", rec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_record(root: Path, eid: str, key: dict | None = None) -> dict | None:
    """The record of a complete subject, or None if missing, unreadable or of another cohort."""
    try:
        rec = json.loads(record_path(root, eid).read_text())
    except (OSError, ValueError):
        return None
    if key is not None and rec.get("key") != key:
        return None
    fmt = rec.get("key", {}).get("station_format", "nifti")
    files = [label_path(root, eid)]
    if fmt in ("nifti", "both"):
        files += [station_path(root, eid, k, kind) for k in range(1, 7) for kind in ("water", "fat")]
    if fmt in ("zip", "both"):
        files.append(root / "zip" / f"{eid}_20201_2_0.zip")
    return rec if all(f.is_file() for f in files) else None


def _generate_one(root: str, eid: str, seed: int, scale: float, station_format: str,
                  key: dict, protocol: str = "ukb", population: Mapping[str, float] | None = None
                  ) -> str:
    subject = cohort.make_subject(eid, seed, scale, stations=True, protocol=protocol,
                                  **(population or {}))
    write_subject(Path(root), subject, station_format, key)
    return eid


# ---------------------------------------------------------------------------------------------
# cohort


def _clear(root: Path, keep_eids: set[str] | None) -> None:
    """Remove the generator's own outputs (all, or those of eids not in ``keep_eids``)."""
    shutil.rmtree(root / ".partial", ignore_errors=True)
    if keep_eids is None:
        for name in _MANAGED:
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return
    for d in (root / "nifti",):
        if d.is_dir():
            for p in d.iterdir():
                if p.name not in keep_eids:
                    shutil.rmtree(p, ignore_errors=True)
    for d, suffix in ((root / "truth" / "subjects", ".json"),
                      (root / "truth" / "labels", "_labels.nii.gz"),
                      (root / "zip", "_20201_2_0.zip")):
        if d.is_dir():
            for p in d.iterdir():
                if not p.name.endswith(suffix) or p.name[: -len(suffix)] not in keep_eids:
                    p.unlink()


def generate_cohort(out_dir: str | os.PathLike, n_subjects: int, seed: int, scale: float = 1.0,
                    workers: int = 1, overwrite: bool = False, station_format: str = "nifti",
                    progress: bool = True, external: bool = False,
                    later_release_of: str | os.PathLike | None = None,
                    thigh_asymmetry: float | None = None,
                    liver_fat_coupling: float | None = None) -> Path:
    """Generate a phantom cohort that looks like a UKB release (layout in the module docstring).

    Parameters
    ----------
    out_dir : output folder; must be missing or empty unless ``overwrite``.
    n_subjects : number of subjects (>= 1).
    seed : cohort seed (>= 0); same seed, scale and format give the same bytes.
    scale : resolution factor in (0.1, 2] (1 = UKB grid).
    workers : processes; results do not depend on it.
    overwrite : replace an existing cohort in ``out_dir``. When ``out_dir`` holds the same cohort
        (seed, scale, format, generator version), its complete subjects are kept, since they would
        be rewritten byte for byte: this resumes a killed run.
    station_format : ``"nifti"``, ``"zip"`` (UKB bulk zips via :func:`biometry.data.ingest.write_ukb_zip`)
        or ``"both"``.
    progress : show a tqdm progress bar on stderr.
    external : an external cohort for the thigh-function study: other subjects (8-digit volunteer
        ids), other noise and contrast, only the self-reported ``exercise`` label among the
        functional measures (:mod:`biometry.phantom.function`).
    later_release_of : a phantom cohort folder: write its next release instead, with the same
        protocol (``scale``) and new subjects whose eids are disjoint from it and from the releases
        before it (recorded in ``cohort.json``: ``release``, ``earlier_eids``).
    thigh_asymmetry : SD of the relative left/right thigh-muscle difference; None: the UKB-like
        default (:data:`biometry.phantom.anatomy.THIGH_ASYMMETRY_SD`), or for a later release
        that of the cohort it follows (another value than that one is refused, like another
        ``scale``). A value other than the default is recorded in ``cohort.json``.
    liver_fat_coupling : how far liver fat follows visceral fat and BMI (1, the default:
        UKB-like; 0: independent, the liver the only evidence of it); None as for
        ``thigh_asymmetry``, and recorded likewise (:mod:`biometry.config.population`).

    Returns
    -------
    ``out_dir`` as a Path.
    """
    root = Path(out_dir)
    if isinstance(n_subjects, bool) or int(n_subjects) != n_subjects or n_subjects < 1:
        raise ValueError(f"the number of subjects must be a positive integer, got {n_subjects}")
    n_subjects = int(n_subjects)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    scale = anatomy.check_scale(scale)
    given = {"thigh_asymmetry": thigh_asymmetry, "liver_fat_coupling": liver_fat_coupling}
    options = population_options(given)  # checked before anything is written
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if station_format not in STATION_FORMATS:
        raise ValueError(f"station format must be one of {', '.join(STATION_FORMATS)}, "
                         f"got {station_format!r}")
    if root.exists() and not root.is_dir():
        raise ValueError(f"output path {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {root} is not empty; use --overwrite to replace "
                              f"(or resume) a cohort there")
    root.mkdir(parents=True, exist_ok=True)
    release, earlier = 1, []
    if later_release_of is not None:
        if external:
            raise ValueError("an external cohort has no later release")
        if Path(later_release_of).resolve() == root.resolve():
            raise ValueError(f"{root}: a later release needs its own folder")
        # the protocol of the release it follows, population options included
        release, earlier, options = earlier_release(later_release_of, scale, given)
    key = _cohort_key(seed, scale, station_format, release)
    key.update(non_default(options))  # only those: a default cohort's key stays as it was
    protocol = "external" if external else "ukb"
    if external:  # only then: a UKB cohort's key (and cohort.json) stays as it was
        key["protocol"] = protocol
        eids = cohort.external_eids(n_subjects, seed)
        seed_of = cohort.external_subject_seed
    else:
        eids = cohort.cohort_eids(n_subjects, seed, release=release, exclude=earlier)

        def seed_of(cohort_seed: int, index: int) -> int:
            return cohort.subject_seed(cohort_seed, index, release)
    try:
        old = json.loads((root / "cohort.json").read_text())
        same = {k: old.get(k) for k in key} == key
    except (OSError, ValueError):
        same = False
    _clear(root, set(eids) if same else None)
    meta = dict(key, n_subjects=n_subjects, complete=False, generator="biometry.phantom",
                fused_grid=_grid_meta(anatomy.fused_grid(scale)), earlier_eids=earlier,
                stations=[_grid_meta(g) for g in anatomy.station_grids(scale)])
    write_json(root / "cohort.json", meta)

    todo = [(i, e) for i, e in enumerate(eids) if read_record(root, e, key) is None]
    bar = None
    if progress:
        bar = tqdm(total=n_subjects, initial=n_subjects - len(todo), desc="phantom", unit="subj",
                   file=sys.stderr)
    try:
        if workers == 1 or len(todo) <= 1:
            for i, e in todo:
                _generate_one(str(root), e, seed_of(seed, i), scale, station_format, key, protocol,
                              options)
                if bar is not None:
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as ex:
                futs = [ex.submit(_generate_one, str(root), e, seed_of(seed, i), scale,
                                  station_format, key, protocol, options) for i, e in todo]
                for fut in as_completed(futs):
                    fut.result()
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _write_tables(root, eids, key)
    shutil.rmtree(root / ".partial", ignore_errors=True)
    meta["complete"] = True
    write_json(root / "cohort.json", meta)
    return root


def _grid_meta(g: anatomy.Grid) -> dict:
    return {"shape": list(g.shape), "spacing_mm": [round(s, 9) for s in g.spacing]}


def _write_tables(root: Path, eids: list[str], key: dict) -> None:
    obs, tru, qc = [], [], []
    for e in eids:
        rec = read_record(root, e, key)
        if rec is None:
            raise RuntimeError(f"subject {e}: no complete record under {root / 'truth' / 'subjects'}")
        obs.append(rec["observed"])
        tru.append(rec["truth"])
        qc.extend(rec["qc"])
    observed = cohort.tidy_observed(pd.DataFrame(obs))
    write_csv(root / "fields.csv", observed)
    write_csv(root / "truth" / "parameters.csv", pd.DataFrame(tru))
    write_csv(root / "truth" / "qc.csv", pd.DataFrame(qc, columns=["eid", "flag", "detail"]))


# ---------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(message)


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog="biometry synth",
                 description="Generate a phantom cohort that looks like a UKB release "
                             "(NIfTI stations, fields.csv, ground truth).")
    ap.add_argument("--out", required=True, help="output folder (missing or empty)")
    ap.add_argument("--subjects", required=True, type=int, help="number of subjects")
    ap.add_argument("--seed", required=True, type=int, help="cohort seed")
    ap.add_argument("--scale", type=float, default=None,
                    help="resolution factor in (0.1, 2]; 1 = UKB grid (default 1; for "
                         "--later-release-of, the earlier release's)")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace (or resume) a cohort in a non-empty output folder")
    ap.add_argument("--station-format", choices=STATION_FORMATS, default="nifti",
                    help="write stations as NIfTI, UKB bulk zips, or both (default nifti)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--external", action="store_true",
                    help="an external cohort for the thigh study: other noise and contrast, "
                         "volunteer ids, only a self-reported exercise label")
    ap.add_argument("--later-release-of", metavar="DIR", default=None,
                    help="write the next release of the phantom cohort in DIR: same protocol, "
                         "new subjects with eids disjoint from it")
    ap.add_argument("--thigh-asymmetry", type=float, default=None, metavar="SD",
                    help="SD of the relative left/right thigh-muscle difference (default 0.02, "
                         "UKB-like; the saliency check uses 0.10)")
    ap.add_argument("--liver-fat-coupling", type=float, default=None, metavar="C",
                    help="how far liver fat follows visceral fat and BMI, in [0, 1] (default 1, "
                         "UKB-like; 0: independent, as in the saliency-check-liver study)")
    return ap.parse_args(argv)


def _earlier_scale(root: str) -> float:
    try:
        return float(json.loads((Path(root) / "cohort.json").read_text())["scale"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{root}: not a phantom cohort to follow (cohort.json: "
                         f"{type(exc).__name__})") from None


def _main(argv: list[str]) -> int:
    a = _parse(argv)
    if a.subjects < 1:
        raise UsageError(f"--subjects must be at least 1, got {a.subjects}")
    if a.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {a.seed}")
    if a.scale is None:  # a later release keeps its protocol: the earlier one's scale
        a.scale = _earlier_scale(a.later_release_of) if a.later_release_of else 1.0
    if not (0.1 < a.scale <= 2.0) or not math.isfinite(a.scale):
        raise UsageError(f"--scale must be in (0.1, 2], got {a.scale}")
    if a.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {a.workers}")
    out = Path(a.out)
    if out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise UsageError(f"output directory {out} is not empty; use --overwrite to replace it")
    try:
        generate_cohort(out, a.subjects, a.seed, scale=a.scale, workers=a.workers,
                        overwrite=a.overwrite, station_format=a.station_format,
                        progress=not a.no_progress, external=a.external,
                        later_release_of=a.later_release_of, thigh_asymmetry=a.thigh_asymmetry,
                        liver_fat_coupling=a.liver_fat_coupling)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    print(f"phantom cohort of {a.subjects} subjects written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``biometry synth``: returns 0, or 2 with a one-line message for bad arguments."""
    return run_guarded(_main, list(sys.argv[1:] if argv is None else argv), "biometry synth")
