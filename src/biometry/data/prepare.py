"""``biometry prepare``: station NIfTI or UKB zips → fused volumes → 2D formats in a store.

Input folders (detected in this order):

1. a phantom cohort root: ``DIR/nifti/<eid>/station_<k>_{water,fat}.nii.gz``, or ``DIR/zip/``
   when the phantom wrote only zips;
2. a folder of UKB bulk files ``<eid>_20201_<instance>_0.zip``: each is read in memory by
   :func:`biometry.data.ingest.read_ukb_zip` (the stations that :func:`biometry.data.ingest.zip_to_nifti`
   would write, without the NIfTI round trip) and fused. The subject key is ``<eid>`` for
   instance 2 (the first imaging visit) and ``<eid>-<instance>`` otherwise (the UKB column
   convention), so that repeat scans sit beside the first ones;
3. a folder of subject folders ``DIR/<eid>/station_*.nii.gz``;
4. a folder of subject folders of converter output ``DIR/<eid>/*.nii.gz`` (e.g. dcm2niix's
   ``15_Dixon_noBH_W.nii.gz`` with JSON sidecars): water and fat series found, paired and ordered
   head to foot by :mod:`biometry.data.discovery`; a subject folder counts as this layout when it
   holds NIfTI files but no ``station_*`` files.

The QC row of every subject names what was left out: ``dropped_repeats`` lists the earlier
acquisitions of a repeated station (series numbers for a zip, file names for converter output).

Subjects are processed in chunks (one task per chunk, not per subject) on a Dask cluster
(:func:`biometry.parallel.dask_client`): a ``local_cluster(workers)`` by default, or the existing
scheduler at ``scheduler`` (its workers must see the input and the store at the same paths: a shared file
system). Workers write each chunk's arrays as new part files of the store; the client
commits them to the index as they complete (:mod:`biometry.data.store`), so a killed run loses at most
the chunks in flight and leaves no half-written array. The store's row order therefore records
which chunk finished first; everything downstream orders subjects by eid instead
(:func:`biometry.data.store.canonical_order`, ``docs/reproducibility.md``). A resumed run skips subjects that are in
the store or failed before (``retry_failed`` redoes the failed ones). A subject that fails gets a
QC row naming the stage and the error; the others go on; the exit status is 1 if any subject of
the input is failed in the store.

**A stored subject is never reused once its source changed.** Each attempt records in its QC row
a fingerprint of the files that preparing the subject reads (:func:`source_files`; stray files
beside them do not count): ``source_size`` (names and sizes), ``source_stat`` (and modification
times), ``source_sha256`` (names and contents). A resumed run compares (:func:`verify_sources`):
sizes and times alike, the same files; a size differs, changed; only the times differ (a copied
or restored folder), the contents decide, and a match records the new times. A failed subject
whose files changed is tried again; a subject with arrays whose files changed stops the run
before any work with one line naming the store and the subjects (:class:`SourceChanged`): a store
is append-only, so those subjects belong in a new store folder. Stores written before
fingerprints were recorded are trusted as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from dask.distributed import as_completed
from tqdm.auto import tqdm

from biometry.data import formats as fmt_mod
from biometry.data.discovery import load_converter_subject, nifti_files
from biometry.data.formats import FORMATS
from biometry.data.ingest import read_ukb_zip
from biometry.data.store import Store
from biometry.data.types import UKB_SPACING
from biometry.data.volumes import fuse, load_subject
from biometry.errors import UsageError, one_line, run_guarded
from biometry.parallel import dask_client

DEFAULT_FORMATS: tuple[str, ...] = ("projection", "fat_fraction_slices", "mimir")
DEFAULT_CHUNK_SIZE: int = 16
_ZIP_RE = re.compile(r"^(\d+)_20201_(\d+)_(\d+)\.zip$")
_NIFTI_GLOB = "station_*.nii*"
_NIFTI_STEM = re.compile(r"\.nii(\.gz)?$")


class SourceChanged(ValueError):
    """Subjects of a store whose source files changed since they were prepared."""


def source_files(subject: Subject) -> list[Path]:
    """The files that preparing ``subject`` reads: its zip; its ``station_*`` files; or its
    converter output's NIfTI files with their JSON sidecars. Stray files beside them (notes,
    masks, ``.DS_Store``) are not part of the subject."""
    path = Path(subject.source)
    if subject.kind == "zip":
        return [path]
    if subject.kind == "nifti":
        return sorted(path.glob(_NIFTI_GLOB))
    files = []
    for f in nifti_files(path):
        files.append(f)
        sidecar = f.with_name(_NIFTI_STEM.sub("", f.name) + ".json")
        if sidecar.is_file():
            files.append(sidecar)
    return files


def _relative(path: Path, source: Path) -> str:
    return path.name if path == source else path.relative_to(source).as_posix()


def _stat_digests(subject: Subject) -> tuple[str, str]:
    """``(source_size, source_stat)``: the files' names and sizes, and with their modification
    times too, from one ``stat`` of each file."""
    sizes, stats = hashlib.sha256(), hashlib.sha256()
    for p in source_files(subject):
        st = p.stat()
        line = f"{_relative(p, Path(subject.source))}\t{st.st_size}"
        sizes.update(f"{line}\n".encode())
        stats.update(f"{line}\t{st.st_mtime_ns}\n".encode())
    return sizes.hexdigest()[:20], stats.hexdigest()[:20]


def source_sha256(subject: Subject) -> str:
    """The fingerprint of a subject's files by content: their names and bytes."""
    h = hashlib.sha256()
    for p in source_files(subject):
        h.update(f"{_relative(p, Path(subject.source))}\0".encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def source_fingerprint(subject: Subject) -> dict[str, str]:
    """The QC row's fingerprint of a subject's files (empty when they are unreadable):
    ``source_size`` (names and sizes), ``source_stat`` (with modification times) and
    ``source_sha256`` (names and contents)."""
    try:
        size, stat = _stat_digests(subject)
        return {"source_size": size, "source_stat": stat, "source_sha256": source_sha256(subject)}
    except OSError:
        return {}


def verify_sources(store: Store, subjects: Sequence[Subject], progress: bool = False,
                   hint: str | None = None) -> set[str]:
    """Compare ``subjects`` with the fingerprints their latest attempt recorded in ``store``.

    Sizes and times alike: the same files. A size differs: changed. Only the times differ (a
    copied or restored folder): the contents decide, and a match records the new times so that
    the next run does not read the files again. Subjects without a recorded fingerprint (never
    attempted, or by an older version) are taken as they are.

    Raises :class:`SourceChanged` naming the store and the subjects when a subject *with arrays*
    changed, before anything is written, ending in ``hint`` (default: prepare into a new store
    folder, or remove this one). Returns the failed subjects whose files changed (to be tried
    again).
    """
    qc = store.qc
    if "source_stat" not in qc.columns or not len(subjects):
        return set()
    recorded = qc.drop_duplicates("eid", keep="last").set_index("eid")
    changed, to_hash = [], {}
    for s in subjects:
        if s.eid not in recorded.index:
            continue
        row = recorded.loc[s.eid]
        stat, size = row.get("source_stat"), row.get("source_size")
        if not isinstance(stat, str) or not stat:
            continue
        try:
            now_size, now_stat = _stat_digests(s)
        except OSError:  # unreadable now: not the files that were prepared
            changed.append(s)
            continue
        if now_stat == stat:
            continue
        if isinstance(size, str) and size and now_size != size:
            changed.append(s)
        else:
            to_hash[s] = now_stat
    restamped = []
    for s, now_stat in tqdm(to_hash.items(), desc="checking sources", unit="subject",
                            disable=not progress or not to_hash, delay=1, file=sys.stderr):
        try:
            same = source_sha256(s) == recorded.at[s.eid, "source_sha256"]
        except OSError:
            same = False
        if same:
            restamped.append({**recorded.loc[s.eid].to_dict(), "eid": s.eid,
                              "source_stat": now_stat})
        else:
            changed.append(s)
    stored = set(store.subjects["eid"])
    stale = [s for s in changed if s.eid in stored]
    if stale:
        listed = ", ".join(f"{s.eid} ({s.source})" for s in stale[:5])
        more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
        raise SourceChanged(
            f"{store.path}: {len(stale)} subject(s) there were prepared from other files than "
            f"the input now holds: {listed}{more}; "
            + (hint or f"prepare the input into a new store folder, or remove {store.path}"))
    if restamped:
        store.commit(None, [], None, restamped)
    return {s.eid for s in changed}


@dataclass(frozen=True)
class Subject:
    """One subject to prepare: its key, where its data lie, and what kind of input that is."""

    eid: str
    source: str
    kind: str  # "nifti" (station_<k> files), "converter" (dcm2niix output) or "zip" (UKB bulk)


@dataclass
class PrepareResult:
    """What one ``prepare`` call did.

    Attributes
    ----------
    out_dir : the store folder.
    n_input : subjects found in the input.
    n_done : subjects prepared successfully in this call.
    n_skipped : subjects skipped because the store already had them (ok or failed).
    failed : QC rows (eid, stage, error) of input subjects whose latest attempt failed.
    seconds : wall time of the call.
    """

    out_dir: Path
    n_input: int
    n_done: int
    n_skipped: int
    failed: pd.DataFrame = field(default_factory=pd.DataFrame)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return len(self.failed) == 0

    def summary(self) -> str:
        line = (f"prepare: {self.n_input} subjects, {self.n_done} prepared, {self.n_skipped} already "
                f"in the store, {len(self.failed)} failed, {self.seconds:.1f} s -> {self.out_dir}")
        if len(self.failed):
            first = self.failed.iloc[0]
            line += f" (e.g. {first['eid']}: {first['stage']}: {first['error']}; see qc.csv)"
        return line


# --------------------------------------------------------------------------------------------
# input discovery


def find_subjects(input_dir: str | Path) -> list[Subject]:
    """Subjects of an input folder (phantom root, folder of UKB zips, or of subject folders).

    Raises ``FileNotFoundError``/``ValueError`` naming the folder when it holds no subjects or
    when two inputs give the same subject key.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found")
    if (root / "nifti").is_dir():
        root = root / "nifti"
    elif (root / "zip").is_dir():
        root = root / "zip"
    subjects: list[Subject] = []
    odd = []
    for zp in sorted(root.glob("*.zip")):
        m = _ZIP_RE.match(zp.name)
        if not m:
            odd.append(zp.name)
            continue
        eid, instance = m.group(1), int(m.group(2))
        key = eid if instance == 2 else f"{eid}-{instance}"
        subjects.append(Subject(key, str(zp), "zip"))
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(d.glob(_NIFTI_GLOB)):
            subjects.append(Subject(d.name, str(d), "nifti"))
        elif nifti_files(d):
            subjects.append(Subject(d.name, str(d), "converter"))
    if odd:  # said, not silently dropped: a renamed download is a subject too
        print(f"note: {root}: {len(odd)} zip file(s) skipped, not named "
              f"<eid>_20201_<instance>_0.zip: {', '.join(odd[:5])}"
              + (" ..." if len(odd) > 5 else ""), file=sys.stderr)
    if not subjects:
        raise ValueError(f"{input_dir}: no subjects found (expected nifti/<eid>/ folders, "
                         f"<eid>/station_*.nii.gz folders, <eid>/ folders of converter output "
                         f"such as dcm2niix's *_Dixon_*_W.nii.gz, or <eid>_20201_2_0.zip files)")
    keys = pd.Series([s.eid for s in subjects])
    dup = sorted(set(keys[keys.duplicated()]))
    if dup:
        raise ValueError(f"{input_dir}: subject(s) {', '.join(dup[:10])} appear more than once")
    return subjects


def phantom_spacing(input_dir: str | Path) -> tuple[float, float, float] | None:
    """The fused-grid spacing (mm) recorded in a phantom cohort's ``cohort.json``, for the
    cohort's root or its ``zip/`` or ``nifti/`` folder (the same subjects), else None."""
    input_dir = Path(input_dir)
    meta = input_dir / "cohort.json"
    if not meta.is_file() and input_dir.name in ("zip", "nifti"):
        meta = input_dir.parent / "cohort.json"
    if not meta.is_file():
        return None
    try:
        spacing = json.loads(meta.read_text())["fused_grid"]["spacing_mm"]
        return tuple(float(v) for v in spacing)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta}: no usable fused_grid.spacing_mm ({exc})") from None


# --------------------------------------------------------------------------------------------
# the work


def _load(subject: Subject, spacing: tuple[float, float, float] | None = None,
          fuse_options: dict | None = None):
    kwargs = {} if spacing is None else {"spacing": tuple(float(s) for s in spacing)}
    kwargs.update(fuse_options or {})
    if subject.kind == "nifti":
        return load_subject(subject.source, **kwargs)
    if subject.kind == "converter":
        return load_converter_subject(subject.source, **kwargs)
    # Straight from the zip's DICOM to the fused volume: the same stations that
    # ingest.zip_to_nifti would write, without compressing and re-reading NIfTI files.
    stations = read_ukb_zip(subject.source)
    vol = fuse(stations, eid=subject.eid, **kwargs)
    vol.meta["source"] = subject.source
    dropped = sorted(n for st in stations for n in st.meta.get("dropped_repeats", []))
    vol.meta["dropped_repeats"] = "; ".join(f"series {n}" for n in dropped)
    return vol


def _numeric_meta(meta: dict) -> dict:
    """Scalar numbers of a volume's provenance (seam mismatch, ...) for the QC table."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[k] = float(v)
    return out


def prepare_subject(subject: Subject, formats: Sequence[str],
                    spacing: tuple[float, float, float] | None = None
                    ) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Load one subject and compute its formats; never raises on bad data.

    Returns
    -------
    arrays : ``{format: (C, H, W) uint8}``, or None when the subject failed.
    qc : the subject's QC row (eid, status, stage, error, source, numeric fusion QC,
        dropped_repeats).
    """
    qc: dict = {"eid": subject.eid, "status": "failed", "stage": "load", "error": "",
                "source": subject.source}
    try:
        # formats made from differently fused volumes (mimir_original: no intensity levelling)
        # are computed from one fusion per set of options
        groups: dict[str, list[str]] = {}
        for name in formats:
            groups.setdefault(json.dumps(fmt_mod.fuse_options(name), sort_keys=True), []).append(name)
        arrays = {}
        for options, names in groups.items():
            qc["stage"] = "load"
            vol = _load(subject, spacing, json.loads(options))
            qc.update(_numeric_meta(vol.meta))
            qc["dropped_repeats"] = vol.meta.get("dropped_repeats", "")
            qc["stage"] = "formats"
            # NaN/inf: read_nifti refuses them in the files, and the formats refuse them in what
            # they use (a clear ValueError naming the subject), so no extra pass over the volume
            arrays.update(fmt_mod.compute(vol, names))
        arrays = {name: arrays[name] for name in formats}
    except Exception as exc:  # a bad subject must not stop the batch: report it
        qc["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        return None, qc
    qc.update(status="ok", stage="done")
    return arrays, qc


def process_chunk(subjects: Sequence[Subject], store_path: str, part: str,
                  formats: Sequence[str], spacing: tuple[float, float, float] | None = None
                  ) -> tuple[str | None, list[str], list[str], list[dict]]:
    """Prepare a chunk of subjects and write their arrays as store part ``part`` (not committed).

    Runs on a worker. Returns ``(part or None, eids, sources, qc_rows)`` for :meth:`Store.commit`.
    """
    store = Store.open(store_path)
    eids, sources, qc_rows = [], [], []
    stacks: dict[str, list[np.ndarray]] = {f: [] for f in formats}
    for subject in subjects:
        fingerprint = source_fingerprint(subject)  # before reading: what was prepared
        arrays, qc = prepare_subject(subject, formats, spacing)
        qc.update(fingerprint)
        qc_rows.append(qc)
        if arrays is None:
            continue
        eids.append(subject.eid)
        sources.append(subject.source)
        for f in formats:
            stacks[f].append(arrays[f])
    if not eids:
        return None, [], [], qc_rows
    store.write_part(part, {f: np.stack(v) for f, v in stacks.items()})
    return part, eids, sources, qc_rows


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def prepare(input_dir: str | Path, out_dir: str | Path,
            formats: Sequence[str] | None = None, workers: int = 1,
            scheduler: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
            retry_failed: bool = False, progress: bool = True,
            spacing: tuple[float, float, float] | None = None) -> PrepareResult:
    """Prepare every subject of ``input_dir`` into the store ``out_dir`` (resumable).

    Parameters
    ----------
    input_dir : phantom root, folder of UKB zips, or folder of subject folders (station_<k> files
        or converter output; module docstring).
    out_dir : the store folder (created if missing).
    formats : format names (:data:`biometry.data.formats.FORMATS`); None: the existing store's
        formats, or :data:`DEFAULT_FORMATS` for a new store.
    workers : Dask worker processes of the local cluster; 1 with no ``scheduler`` runs
        in-process without Dask.
    scheduler : address of a running Dask scheduler (``tcp://host:8786``); overrides ``workers``.
    chunk_size : subjects per task (and per store part).
    retry_failed : redo subjects whose earlier attempt failed.
    progress : show a tqdm progress bar (subjects).
    spacing : fused grid spacing (mm); None: the grid the store records (its first
        preparation's), else the phantom's fused grid when ``input_dir`` is a phantom cohort or its
        ``zip/`` or ``nifti/`` folder (:func:`phantom_spacing`), else
        :func:`biometry.data.volumes.load_subject`'s default (the UKB grid), so that a coarse demo
        phantom is not upsampled. Another grid than the store's is refused (one line).

    Returns
    -------
    PrepareResult
    """
    t0 = time.perf_counter()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    subjects = find_subjects(input_dir)
    if formats is None and (out_dir / "store.json").is_file():
        store = Store.open(out_dir)
        formats = list(store.formats)
    else:
        formats = list(formats or DEFAULT_FORMATS)
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
        store = Store.create(out_dir, formats, exist_ok=True)
    if spacing is None:  # the store's own grid, like its formats; else a phantom's, else UKB's
        spacing = store.grid_mm or phantom_spacing(input_dir)
    n_done, n_skipped = prepare_into(store, subjects, formats, spacing, workers, scheduler,
                                     chunk_size, retry_failed, _progress(len(subjects), progress))
    store.refresh()
    input_eids = {s.eid for s in subjects}
    failed = store.failed()
    failed = failed[failed["eid"].isin(input_eids)][["eid", "stage", "error"]].reset_index(drop=True)
    return PrepareResult(out_dir=out_dir, n_input=len(subjects), n_done=n_done,
                         n_skipped=n_skipped, failed=failed,
                         seconds=time.perf_counter() - t0)


def prepare_into(store: Store, subjects: Sequence[Subject], formats: Sequence[str],
                 spacing: tuple[float, float, float] | None = None, workers: int = 1,
                 scheduler: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 retry_failed: bool = False, bar=None) -> tuple[int, int]:
    """Prepare the ``subjects`` that ``store`` lacks (ok or failed) and commit them as they finish.

    The one preparation loop of ``biometry prepare`` and ``biometry infer``: chunks of
    ``chunk_size`` subjects (fewer when that leaves a worker idle), in-process when one worker
    (or one chunk) suffices, else on a Dask cluster (``workers`` processes, or ``scheduler``).
    Only this process writes the store's index; a failed subject gets its QC row and the others
    go on. ``bar``: a tqdm bar (its total is set to the subjects to do) or None. The fused grid
    (``spacing``, None: the UKB grid) must be the one the store records (an empty store records
    it: :meth:`~biometry.data.store.Store.check_grid`).
    Returns ``(subjects prepared now, subjects skipped)``.
    """
    store.check_grid(spacing if spacing is not None else UKB_SPACING)
    done = store.done(retry_failed=retry_failed)
    progress = bar is not None and not getattr(bar, "disable", True)
    # failed before, and their files changed since: try again
    retry = verify_sources(store, [s for s in subjects if s.eid in done], progress)
    todo = [s for s in subjects if s.eid not in done or s.eid in retry]
    if scheduler is None:  # small inputs: do not leave a worker without a chunk
        chunk_size = max(1, min(chunk_size, -(-len(todo) // workers)))
    chunks = _chunks(todo, chunk_size)
    parts = store.next_parts(len(chunks))
    bar = bar if bar is not None else _progress(0, False)
    bar.total = len(todo)  # not reset(): it draws the bar at once, delay or not
    n_done = 0
    try:
        if scheduler is None and (workers == 1 or len(chunks) <= 1):
            for chunk, part in zip(chunks, parts, strict=True):
                res = process_chunk(chunk, str(store.path), part, formats, spacing)
                store.commit(*res)
                n_done += len(res[1])
                bar.update(len(chunk))
        else:
            n_done = _run_dask(chunks, parts, str(store.path), formats, spacing, workers,
                               scheduler, store, bar)
    finally:
        bar.close()
    return n_done, len(subjects) - len(todo)


def _progress(total: int, enabled: bool, desc: str = "prepare"):
    # shown after a second: none for a run with nothing to do, or refused at once
    return tqdm(total=total, unit="subject", desc=desc, disable=not enabled or total == 0,
                delay=1, file=sys.stderr)


def _run_dask(chunks, parts, store_path, formats, spacing, workers, scheduler, store, bar) -> int:
    """Map chunks over a Dask cluster and commit each as it completes; returns subjects done."""
    n_done = 0
    with dask_client(workers, scheduler) as client:
        futures = {client.submit(process_chunk, chunk, store_path, part, formats, spacing,
                                 pure=False): chunk
                   for chunk, part in zip(chunks, parts, strict=True)}
        for fut in as_completed(futures):
            chunk = futures[fut]
            try:
                part, eids, sources, qc_rows = fut.result()
            except Exception as exc:  # a worker died: record the chunk's subjects, go on
                part, eids, sources = None, [], []
                qc_rows = [{"eid": s.eid, "status": "failed", "stage": "worker",
                            "error": f"{type(exc).__name__}: {exc}", "source": s.source}
                           for s in chunk]
            store.commit(part, eids, sources, qc_rows)
            n_done += len(eids)
            bar.update(len(chunk))
    return n_done


# --------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biometry prepare",
        description="Stations (NIfTI folders, a phantom cohort or UKB zips) -> fused volumes -> "
                    "2D formats in a resumable store.")
    p.add_argument("--input", required=True, help="phantom cohort root, folder of subject folders "
                   "(station_<k>_water/fat NIfTI, or converter output such as dcm2niix's), or "
                   "folder of <eid>_20201_2_0.zip files")
    p.add_argument("--out", required=True, help="store folder (created; resumed if it exists)")
    p.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                   help=f"formats to compute ({', '.join(FORMATS)}); default: the existing store's, "
                        f"else {' '.join(DEFAULT_FORMATS)}")
    p.add_argument("--workers", type=int, default=1, help="local Dask workers (1: in-process)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="fused grid spacing in mm (default: the store's recorded grid; for a "
                        "new store a phantom cohort's grid, else the UKB grid 2.23214 2.23214 3)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="subjects per task")
    p.add_argument("--retry-failed", action="store_true", help="redo subjects that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    """CLI entry: exit 0 when every input subject is prepared, 1 if any failed, 2 on bad usage."""
    def _run(args_list: list[str]) -> int:
        args = _parser().parse_args(args_list)
        for name in args.formats or []:
            if name not in FORMATS:
                raise UsageError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
        if args.workers < 1 or args.chunk_size < 1:
            raise UsageError("--workers and --chunk-size must be at least 1")
        try:
            result = prepare(args.input, args.out, formats=args.formats, workers=args.workers,
                             scheduler=args.scheduler, chunk_size=args.chunk_size,
                             retry_failed=args.retry_failed, progress=not args.no_progress,
                             spacing=args.spacing)
        except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
            raise UsageError(one_line(exc)) from None
        print(result.summary(), file=sys.stderr if not result.ok else sys.stdout)
        return 0 if result.ok else 1

    return run_guarded(_run, argv, "biometry prepare")
