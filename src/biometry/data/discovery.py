"""Stations of a subject folder of converter output (dcm2niix and the like).

A UK Biobank zip converted with ``dcm2niix -z y -f "%s_%d"`` gives one NIfTI file per series,
named ``<SeriesNumber>_<SeriesDescription>.nii.gz`` (``15_Dixon_noBH_W.nii.gz``,
``11_Dixon_BH_17s_F.nii.gz``, ``10_Dixon_BH_17s_opp.nii.gz``, ...), each with a JSON sidecar.
:func:`find_stations` turns such a folder into the water/fat pairs that
:func:`biometry.data.volumes.fuse` needs, by the same rules as the zip reader
(:func:`biometry.data.ingest.read_ukb_zip`):

1. **Channel** from the series description, taken from the sidecar's ``SeriesDescription`` where
   there is one, else from the file name without its leading series number: a description ending
   in ``_W`` is water, ``_F`` fat (breath-hold and free-breathing alike); in-phase (``_in``),
   opposed-phase (``_opp``) and anything else are ignored.
2. **Position** from each file's affine (world z of its voxel box), never from the file name.
3. **Repeats**: series of one channel that share more than half of their z extent are one station
   acquired twice; the latest acquisition wins, by the sidecar's ``AcquisitionTime`` (or the
   ``Time=`` that dcm2niix writes into the NIfTI description) where both series have one, else by
   the series number (as the zip reader: time, then number). Two series that neither tells apart
   are an error. The dropped files are recorded
   (``Volume.meta["dropped_repeats"]``, a column of the prepare QC table).
4. **Pairs and order**: each water series is paired with the fat series at its position (same
   shape and affine); stations are numbered 1 (head) .. n (foot) by world z.

Every problem raises :class:`biometry.data.volumes.InputError` with one line naming the folder
(whose name is the subject) and the files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from biometry.data.types import UKB_SPACING, Station, Volume
from biometry.data.volumes import InputError, fuse, read_station

__all__ = ["SeriesFile", "find_stations", "later", "load_converter_subject", "nifti_files",
           "series_channel", "series_files"]

#: Series kept, by the suffix after the last underscore of the series description.
SERIES_CHANNELS = {"W": "water", "F": "fat"}
#: Series that share a position (z extent) by more than this fraction are one station.
SAME_STATION_OVERLAP = 0.5
_NIFTI_RE = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$")
_NUMBER_RE = re.compile(r"^(?P<number>\d+)_(?P<rest>.+)$")
_DESCRIP_TIME_RE = re.compile(r"Time=(?P<hms>\d{6}(\.\d*)?)")


def series_channel(description: str) -> str | None:
    """"water", "fat" or None (in/opp/other) from a series description like ``Dixon_BH_17s_W``."""
    suffix = description.strip().rsplit("_", 1)[-1].upper()
    return SERIES_CHANNELS.get(suffix)


@dataclass(frozen=True)
class SeriesFile:
    """One water or fat series file of converter output, with what is known about it."""

    path: Path
    description: str
    channel: str                          # "water" or "fat"
    number: int | None                    # SeriesNumber (sidecar, else file-name prefix)
    time: float | None                    # acquisition time, seconds after midnight
    shape: tuple[int, ...]
    affine: np.ndarray                    # voxel -> RAS+ (mm)
    z_range: tuple[float, float]          # world z extent of the voxel box (mm)



def later(a: SeriesFile, b: SeriesFile) -> bool | None:
    """Whether ``a`` was acquired after ``b``: by acquisition time where both have one and they
    differ, else by series number where both have one and they differ; None when neither tells."""
    if a.time is not None and b.time is not None and a.time != b.time:
        return a.time > b.time
    if a.number is not None and b.number is not None and a.number != b.number:
        return a.number > b.number
    return None


def nifti_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.nii`` / ``.nii.gz`` files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and _NIFTI_RE.match(p.name))


def _seconds(hms: str) -> float | None:
    """Seconds after midnight of ``HH:MM:SS[.f]`` (BIDS sidecar) or ``HHMMSS[.f]`` (DICOM TM)."""
    text = hms.strip()
    try:
        if ":" in text:
            h, m, sec = text.split(":")
        elif len(text.split(".")[0]) == 6:
            h, m, sec = text[:2], text[2:4], text[4:]
        else:
            return None
        return 3600.0 * int(h) + 60.0 * int(m) + float(sec)
    except ValueError:
        return None


def _z_range(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5)
                        for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)])
    z = (affine @ corners.T)[2]
    return float(z.min()), float(z.max())


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0])
    return inter / max(min(a[1] - a[0], b[1] - b[0]), 1e-6)


def _read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable JSON sidecar: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: JSON sidecar is not an object")
    return data


def series_files(folder: str | os.PathLike) -> list[SeriesFile]:
    """The water and fat series among the NIfTI files of ``folder`` (headers only are read).

    Raises :class:`InputError` naming the file for an unreadable header or sidecar, or an image
    that is not 3-D.
    """
    out = []
    for path in nifti_files(folder):
        stem = _NIFTI_RE.match(path.name).group("stem")
        sidecar_path = path.with_name(stem + ".json")
        sidecar = _read_sidecar(sidecar_path) if sidecar_path.is_file() else {}
        m = _NUMBER_RE.match(stem)
        description = str(sidecar.get("SeriesDescription") or (m.group("rest") if m else stem))
        channel = series_channel(description)
        if channel is None:
            continue
        number = sidecar.get("SeriesNumber", m.group("number") if m else None)
        try:
            number = int(number) if number is not None else None
        except (TypeError, ValueError):
            raise InputError(f"{sidecar_path}: SeriesNumber {number!r} is not a number") from None
        try:
            img = nib.load(path)
            descrip = img.header.get("descrip")
            descrip = descrip.item().decode("latin-1") if descrip is not None else ""
        except Exception as exc:  # nibabel raises many types for a broken header
            raise InputError(f"{path}: cannot read NIfTI header: {exc}") from exc
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise InputError(f"{path}: expected a 3-D image, got shape {shape}")
        time = None
        if sidecar.get("AcquisitionTime"):
            time = _seconds(str(sidecar["AcquisitionTime"]))
        if time is None:
            t = _DESCRIP_TIME_RE.search(descrip)
            time = _seconds(t.group("hms")) if t else None
        affine = np.asarray(img.affine, dtype=np.float64)
        out.append(SeriesFile(path, description, channel, number, time, shape, affine,
                              _z_range(affine, shape)))
    return out


def find_stations(folder: str | os.PathLike, n_stations: int | None = 6
                  ) -> tuple[list[tuple[SeriesFile, SeriesFile]], list[SeriesFile]]:
    """Water/fat pairs of a converter-output folder, head (first) to foot, and dropped repeats.

    Parameters
    ----------
    folder : one subject's converter output (NIfTI files, optional JSON sidecars).
    n_stations : the number of stations expected; None accepts any number.

    Returns
    -------
    pairs : ``[(water, fat), ...]`` ordered head to foot by world z.
    dropped : earlier acquisitions of a repeated station, water and fat.

    Raises
    ------
    InputError
        naming the folder and the files: no water/fat series, two series of one channel at one
        position that neither time nor series number tells apart, a water series without its fat
        partner (or the reverse), partners of different shape or affine, or a number of stations
        other than ``n_stations``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: subject folder is missing")
    series = series_files(folder)
    if not series:
        names = [p.name for p in nifti_files(folder)]
        raise InputError(f"{folder}: no water/fat series among {len(names)} NIfTI files "
                         f"(series descriptions ending in _W / _F expected): "
                         f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    kept: dict[str, list[SeriesFile]] = {}
    dropped: list[SeriesFile] = []
    for channel in ("water", "fat"):
        # series of one channel at one position (more than half their z extent shared) are
        # repeats of one station: keep the latest acquisition
        groups: list[list[SeriesFile]] = []
        for s in (s for s in series if s.channel == channel):
            group = next((g for g in groups if _overlap(s.z_range, g[0].z_range)
                          > SAME_STATION_OVERLAP), None)
            if group is None:
                groups.append([s])
            else:
                group.append(s)
        chosen = []
        for group in groups:
            best = group[0]
            for s in group[1:]:
                newer = later(s, best)
                if newer is None:
                    raise InputError(
                        f"{folder}: {channel} series {best.path.name} and {s.path.name} lie at "
                        f"the same position (z {s.z_range[0]:.0f}..{s.z_range[1]:.0f} mm) and "
                        f"neither acquisition time nor series number tells which is the latest")
                if newer:
                    best = s
            chosen.append(best)
            dropped += [s for s in group if s is not best]
        kept[channel] = sorted(chosen, key=lambda s: -(s.z_range[0] + s.z_range[1]))
    pairs: list[tuple[SeriesFile, SeriesFile]] = []
    fats = list(kept["fat"])
    for w in kept["water"]:
        partner = next((f for f in fats if _overlap(w.z_range, f.z_range)
                        > SAME_STATION_OVERLAP), None)
        if partner is None:
            raise InputError(f"{folder}: water series {w.path.name} has no fat series at its "
                             f"position (z {w.z_range[0]:.0f}..{w.z_range[1]:.0f} mm)")
        if partner.shape != w.shape or not np.allclose(partner.affine, w.affine, atol=1e-2):
            raise InputError(f"{folder}: water series {w.path.name} and fat series "
                             f"{partner.path.name} differ in shape or geometry ({w.shape} vs "
                             f"{partner.shape})")
        fats.remove(partner)
        pairs.append((w, partner))
    if fats:
        f = fats[0]
        raise InputError(f"{folder}: fat series {f.path.name} has no water series at its "
                         f"position (z {f.z_range[0]:.0f}..{f.z_range[1]:.0f} mm)")
    if n_stations is not None and len(pairs) != n_stations:
        raise InputError(f"{folder}: {len(pairs)} water/fat stations found, expected "
                         f"{n_stations}: {', '.join(w.path.name for w, _ in pairs)}")
    return pairs, sorted(dropped, key=lambda s: s.path.name)


def load_converter_subject(folder: str | os.PathLike,
                           spacing: tuple[float, float, float] = UKB_SPACING,
                           n_stations: int | None = 6, **kwargs) -> Volume:
    """Fused volume of the subject whose converter output lies in ``folder`` (eid: its name).

    ``= fuse(stations of find_stations(folder), spacing)``; keyword arguments go to
    :func:`biometry.data.volumes.fuse`. ``meta`` gains ``source``, ``layout`` ("converter"),
    ``station_files`` (water + fat file per station, head first) and ``dropped_repeats`` (the
    earlier acquisitions not used, "; "-separated, "" when none).
    """
    folder = Path(folder)
    pairs, dropped = find_stations(folder, n_stations)
    stations: list[Station] = [read_station(k, w.path, f.path)
                               for k, (w, f) in enumerate(pairs, start=1)]
    vol = fuse(stations, spacing, eid=folder.name, **kwargs)
    vol.meta.update(source=str(folder), layout="converter",
                    station_files="; ".join(f"{w.path.name} + {f.path.name}" for w, f in pairs),
                    dropped_repeats="; ".join(s.path.name for s in dropped))
    return vol
