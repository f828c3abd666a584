"""The prepared dataset: one array per 2D format, a subject index and a QC table.

Layout of a store folder::

    store.json                    formats with their per-subject shape and dtype (written once),
                                  and ``grid_mm``: the fused grid its subjects were prepared on
                                  (recorded by the first preparation; absent in older stores)
    subjects.csv                  eid, row, part, offset, source, time: the commit point
    qc.csv                        eid, status (ok/failed), stage, error, numeric fusion QC columns,
                                  the source's fingerprint (source_size, source_stat, source_sha256)
    <format>/part-00000.npy       (n, C, H, W) uint8, one file per format and appended chunk
    <format>/part-00001.npy       ...

Design
------
- **Append without rewriting.** A new chunk of subjects (a new release, or the next batch of a
  run) becomes a new ``part-NNNNN.npy`` in every format folder; existing part files are never
  opened for writing again. Each part is a plain ``.npy`` file, so it can be memory-mapped and
  read by any NumPy.
- **Commit point.** Part files are written atomically (temporary file + rename), then the index
  files ``subjects.csv`` and ``qc.csv`` are replaced atomically. Readers only see parts that
  ``subjects.csv`` names, so a writer killed at any moment leaves either the old or the new store,
  never a half-written array: an unreferenced part left by a crash is ignored and overwritten by
  the next append. The index files are small (about 60 bytes per subject) and rewritten whole.
- **One writer at a time.** Workers may write part files in parallel (each gets its own part
  number from :meth:`Store.next_parts`), but only one process commits (``prepare`` does it in the
  client).
- **Rows.** ``row`` is the subject's position in the concatenation of the committed parts in
  commit order; :meth:`Store.array` returns that concatenation (a memory map when there is one
  part, a lazy :class:`PartedArray` otherwise) and :meth:`Store.load` reads it into memory.
  Row order is history (which chunk a worker finished first, which release came later), not
  meaning: everything downstream orders subjects by :func:`canonical_order` (eid) instead, so that
  results do not depend on it (``docs/reproducibility.md``).
- **QC.** One row per subject (the latest attempt wins); failed subjects have no array row.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from biometry.config.formats import FORMAT_SPECS
from biometry.fileio import atomic_path, write_csv, write_json

SUBJECT_COLUMNS = ["eid", "row", "part", "offset", "source", "time"]
QC_COLUMNS = ["eid", "status", "stage", "error"]
_PART_RE = re.compile(r"^part-(\d{5,})\.npy$")
_VERSION = 1


def canonical_order(eids: Sequence) -> np.ndarray:
    """Positions that put ``eids`` in the canonical order: by eid as a string, code point order.

    The one subject order of everything downstream of the store (training subjects and batches,
    prediction tables, ``splits.csv``, analysis tables), whatever order the store's rows are in.
    For UK Biobank's fixed-width numeric eids this is numeric order; repeat visits
    (``<eid>-<instance>``) follow their first visit. Returns (N,) int64.
    """
    keys = np.asarray([str(e) for e in eids], dtype=str)
    return np.argsort(keys, kind="stable").astype(np.int64)


def _part_name(number: int) -> str:
    return f"part-{number:05d}.npy"


@dataclass(frozen=True)
class FormatSpec:
    """Per-subject array layout of one format: ``shape`` (C, H, W) and ``dtype``."""

    shape: tuple[int, ...]
    dtype: str = "uint8"


class PartedArray:
    """A read-only concatenation of memory-mapped parts along axis 0.

    Supports ``len``, ``shape``, ``dtype``, integer / slice / index-array access (returns
    in-memory arrays) and :meth:`load` (everything into one array).
    """

    def __init__(self, paths: Sequence[Path], item_shape: tuple[int, ...], dtype: np.dtype):
        self.paths = list(paths)
        self.parts = [np.load(p, mmap_mode="r") for p in self.paths]
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)
        self.bounds = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.item_shape)

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = np.searchsorted(self.bounds, rows, side="right") - 1
        return part, rows - self.bounds[part]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} subjects")
            part, off = self._locate(np.array([row]))
            return np.asarray(self.parts[int(part[0])][int(off[0])])
        rows = np.arange(len(self))[key]
        part, off = self._locate(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *self.item_shape), dtype=self.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[int(p)][off[sel]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.load()
        return arr if dtype is None else arr.astype(dtype)

    def load(self) -> np.ndarray:
        """Read every part into one in-memory array ``(N, *item_shape)`` (sequential reads)."""
        out = np.empty(self.shape, dtype=self.dtype)
        for path, mm, start in zip(self.paths, self.parts, self.bounds[:-1], strict=True):
            _read_npy_into(path, out[int(start): int(start) + len(mm)], mm.offset)
        return out


def _read_npy_into(path: Path, target: np.ndarray, offset: int) -> None:
    """Read the data block of a C-ordered ``.npy`` file straight into ``target`` (no extra copy)."""
    view = memoryview(target.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        done = 0
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                raise OSError(f"{path}: file ended after {done} of {len(view)} data bytes")
            done += n


#: relative tolerance within which two fused grids are the same (a grid printed by
#: :func:`grid_text`, six significant digits, given back is the same grid)
GRID_RTOL = 1e-5


def same_grid(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """Whether two grids are the same within :data:`GRID_RTOL` (two unknown grids are too)."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=GRID_RTOL, atol=0.0))


def recorded_grid(meta: dict) -> tuple[float, ...] | None:
    """The ``grid_mm`` of a ``store.json`` or a bundle's input spec, or None when absent."""
    grid = meta.get("grid_mm")
    return tuple(float(v) for v in grid) if grid else None


def grid_text(grid: Sequence[float]) -> str:
    """``"6.37755 x 6.37755 x 8.57143 mm"``: six significant digits, enough to give back."""
    return " x ".join(f"{v:.6g}" for v in grid) + " mm"


class Store:
    """A prepared dataset folder (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = self.path / "store.json"
        if not header.is_file():
            raise FileNotFoundError(f"{self.path}: not a prepared store (no store.json)")
        meta = json.loads(header.read_text())
        self.formats: dict[str, FormatSpec] = {
            name: FormatSpec(tuple(spec["shape"]), spec["dtype"])
            for name, spec in meta["formats"].items()
        }
        #: the fused grid (mm) the images were prepared on; None: not recorded (older store)
        self.grid_mm = recorded_grid(meta)
        self.refresh()

    def check_grid(self, grid_mm: Sequence[float]) -> None:
        """Record the fused grid of the store's images, or refuse another one than recorded (one
        line naming the store and both grids): the grid sets the images' resolution and crops, so
        one store holds one grid. While the store holds no images (new, or every attempt failed)
        the grid is (re)recorded; a store with images and no record (made by an older version)
        is left as it is. Grids within :data:`GRID_RTOL` are the same."""
        grid = tuple(float(v) for v in grid_mm)  # exact: the engine prepares on it again
        meta = json.loads((self.path / "store.json").read_text())  # another process may have
        self.refresh()                                              # written since we opened it
        self.grid_mm = recorded_grid(meta)
        if self.grid_mm is not None and same_grid(self.grid_mm, grid):
            return
        if len(self.subjects):
            if self.grid_mm is None:
                return
            raise ValueError(
                f"{self.path}: prepared on the fused grid {grid_text(self.grid_mm)}, not "
                f"{grid_text(grid)}; prepare into another store (or give the store's grid)")
        write_json(self.path / "store.json", {**meta, "grid_mm": list(grid)})
        self.grid_mm = grid

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike,
               formats: Mapping[str, tuple[tuple[int, ...], str | np.dtype]] | Iterable[str],
               exist_ok: bool = False) -> Store:
        """Create an empty store at ``path``.

        ``formats`` maps a format name to ``(shape, dtype)`` of one subject's array, or is a list
        of names from :data:`biometry.config.formats.FORMAT_SPECS`. With ``exist_ok`` an existing store with
        the same formats is opened instead; different formats are an error.
        """
        if not isinstance(formats, Mapping):
            names = list(formats)
            unknown = [n for n in names if n not in FORMAT_SPECS]
            if unknown:
                raise KeyError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMAT_SPECS)}")
            formats = {n: FORMAT_SPECS[n] for n in names}
        spec = {name: {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).str}
                for name, (shape, dtype) in formats.items()}
        if not spec:
            raise ValueError("a store needs at least one format")
        path = Path(path)
        if (path / "store.json").is_file():
            if not exist_ok:
                raise FileExistsError(f"{path}: a store exists already")
            existing = cls(path)
            have = {n: {"shape": list(f.shape), "dtype": f.dtype} for n, f in existing.formats.items()}
            if have != spec:
                raise ValueError(f"{path}: the store holds formats {sorted(have)} "
                                 f"({have}), not the requested {sorted(spec)}")
            return existing
        path.mkdir(parents=True, exist_ok=True)
        for name in spec:
            (path / name).mkdir(exist_ok=True)
        write_csv(path / "subjects.csv", pd.DataFrame(columns=SUBJECT_COLUMNS))
        write_csv(path / "qc.csv", pd.DataFrame(columns=QC_COLUMNS))
        write_json(path / "store.json", {"version": _VERSION, "formats": spec})
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        """Open an existing store (reads the index; arrays are mapped lazily)."""
        return cls(path)

    # -- reading ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the index files (e.g. after another process appended)."""
        self.subjects = pd.read_csv(self.path / "subjects.csv", dtype={"eid": str, "source": str,
                                                                      "part": str, "time": str})
        self.qc = pd.read_csv(self.path / "qc.csv", dtype={"eid": str, "status": str,
                                                           "stage": str, "error": str,
                                                           "source_size": str,
                                                           "source_stat": str,
                                                           "source_sha256": str})

    @property
    def eids(self) -> list[str]:
        """Subject ids in row order (those with arrays)."""
        return self.subjects["eid"].tolist()

    def __len__(self) -> int:
        return len(self.subjects)

    def has(self, fmt: str) -> bool:
        """Whether the store holds format ``fmt``."""
        return fmt in self.formats

    def _parts(self) -> list[str]:
        return list(dict.fromkeys(self.subjects["part"].tolist()))

    def _check_format(self, fmt: str) -> FormatSpec:
        if fmt not in self.formats:
            raise KeyError(f"{self.path}: no format {fmt!r}; the store holds {', '.join(self.formats)}")
        return self.formats[fmt]

    def array(self, fmt: str) -> np.ndarray | PartedArray:
        """All subjects' arrays of ``fmt`` in row order, ``(N, C, H, W)``, without reading them.

        One committed part: a read-only ``np.memmap``; several: a :class:`PartedArray` over the
        parts' memory maps. No subjects: an empty array.
        """
        spec = self._check_format(fmt)
        parts = self._parts()
        if not parts:
            return np.empty((0, *spec.shape), dtype=spec.dtype)
        if len(parts) == 1:
            return np.load(self.path / fmt / parts[0], mmap_mode="r")
        return PartedArray([self.path / fmt / p for p in parts], spec.shape, np.dtype(spec.dtype))

    def load(self, fmt: str) -> np.ndarray:
        """Read all subjects' arrays of ``fmt`` into memory ``(N, C, H, W)`` (fast sequential I/O)."""
        spec = self._check_format(fmt)
        arr = self.array(fmt)
        if isinstance(arr, PartedArray):
            return arr.load()
        out = np.empty(arr.shape, dtype=spec.dtype)
        if len(out):
            _read_npy_into(Path(arr.filename), out, arr.offset)
        return out

    def rows(self, eids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``eids`` (KeyError naming those that the store does not hold)."""
        lookup = dict(zip(self.subjects["eid"], self.subjects["row"], strict=True))
        missing = [e for e in eids if str(e) not in lookup]
        if missing:
            raise KeyError(f"{self.path}: no arrays for eid(s) {', '.join(map(str, missing[:10]))}")
        return np.array([lookup[str(e)] for e in eids], dtype=np.int64)

    def done(self, retry_failed: bool = False) -> set[str]:
        """What a resumed run skips: subjects with arrays, and (unless ``retry_failed``) subjects
        whose latest attempt failed."""
        done = set(self.subjects["eid"])
        if not retry_failed:
            done |= set(self.qc.loc[self.qc["status"] == "failed", "eid"])
        return done

    def failed(self) -> pd.DataFrame:
        """QC rows of subjects whose latest attempt failed."""
        return self.qc[self.qc["status"] == "failed"].reset_index(drop=True)

    # -- writing ----------------------------------------------------------------------------

    def next_parts(self, n: int = 1) -> list[str]:
        """``n`` fresh part names, above every part committed or lying in a format folder."""
        numbers = [-1]
        for name in self._parts():
            numbers.append(int(_PART_RE.match(name).group(1)))
        for fmt in self.formats:
            for entry in (self.path / fmt).glob("part-*.npy"):
                m = _PART_RE.match(entry.name)
                if m:
                    numbers.append(int(m.group(1)))
        start = max(numbers) + 1
        return [_part_name(start + i) for i in range(n)]

    def write_part(self, part: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write one chunk's arrays (``{fmt: (n, C, H, W)}``, every format) as part files.

        Atomic per file and invisible to readers until :meth:`commit` names the part. Safe to
        call from parallel workers with distinct part names.
        """
        if not _PART_RE.match(part):
            raise ValueError(f"bad part name {part!r}")
        missing = set(self.formats) - set(arrays)
        extra = set(arrays) - set(self.formats)
        if missing or extra:
            raise ValueError(f"{self.path}: a part needs exactly the formats {sorted(self.formats)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"{self.path}: formats of part {part} hold different subject counts "
                             f"{ {k: len(v) for k, v in arrays.items()} }")
        for fmt, arr in arrays.items():
            spec = self.formats[fmt]
            arr = np.ascontiguousarray(arr)
            if arr.shape[1:] != spec.shape or arr.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{self.path}: format {fmt} needs (n, {spec.shape}) {spec.dtype}, "
                                 f"got {arr.shape} {arr.dtype}")
            with atomic_path(self.path / fmt / part, suffix=".npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
                    fh.flush()
                    os.fsync(fh.fileno())

    def commit(self, part: str | None, eids: Sequence[str], sources: Sequence[str] | None = None,
               qc_rows: Sequence[Mapping] = ()) -> None:
        """Make a written part visible: append its subjects to the index and merge ``qc_rows``.

        ``eids`` are the subjects of ``part`` in order (none with ``part=None``: a chunk where
        every subject failed still records its QC rows). This is the commit point: the two index
        files are replaced atomically, ``qc.csv`` first (a crash between the two leaves QC rows
        for subjects without arrays, which a resumed run redoes unless they failed).
        """
        self.refresh()
        eids = [str(e) for e in eids]
        dup = sorted(set(eids) & set(self.subjects["eid"]))
        if dup or len(set(eids)) != len(eids):
            raise ValueError(f"{self.path}: eid(s) already stored or repeated: {', '.join(dup[:10])}")
        if eids and part is None:
            raise ValueError("subjects with arrays need a part")
        if part is not None and eids:
            for fmt, spec in self.formats.items():
                target = self.path / fmt / part
                if not target.is_file():
                    raise FileNotFoundError(f"{target}: part not written")
                arr = np.load(target, mmap_mode="r")
                if len(arr) != len(eids) or arr.shape[1:] != spec.shape:
                    raise ValueError(f"{target}: holds {arr.shape}, expected ({len(eids)}, {spec.shape})")
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        new = pd.DataFrame({
            "eid": eids,
            "row": np.arange(len(self.subjects), len(self.subjects) + len(eids)),
            "part": [part] * len(eids),
            "offset": np.arange(len(eids)),
            "source": list(sources) if sources is not None else [""] * len(eids),
            "time": [now] * len(eids),
        })
        qc_new = pd.DataFrame([dict(r) for r in qc_rows])
        if len(qc_new):
            qc_new["eid"] = qc_new["eid"].astype(str)
            qc = pd.concat([self.qc[~self.qc["eid"].isin(qc_new["eid"])], qc_new], ignore_index=True)
            cols = QC_COLUMNS + [c for c in qc.columns if c not in QC_COLUMNS]
            write_csv(self.path / "qc.csv", qc[cols])
        if len(new):
            subjects = pd.concat([self.subjects, new], ignore_index=True) if len(self.subjects) else new
            write_csv(self.path / "subjects.csv", subjects[SUBJECT_COLUMNS])
        self.refresh()

    def append(self, eids: Sequence[str], arrays: Mapping[str, np.ndarray],
               qc_rows: Sequence[Mapping] = (), sources: Sequence[str] | None = None) -> str | None:
        """Append subjects ``eids`` with ``arrays`` (``{fmt: (n, C, H, W)}``) and their QC rows.

        Writes a new part (existing files are not touched) and commits it. Subjects that failed
        go in ``qc_rows`` only. Returns the part name (None when ``eids`` is empty).
        """
        eids = [str(e) for e in eids]
        part = None
        if eids:
            part = self.next_parts(1)[0]
            self.write_part(part, arrays)
        self.commit(part, eids, sources, qc_rows)
        return part
