"""Benchmark of data preparation at full UKB resolution, and of reading the prepared store.

Measures, on one core (in-process, no Dask):

1. the floor: reading and decompressing a subject's 12 station NIfTI files (int16, gzip), nothing
   else (``nib.load`` + ``dataobj.get_unscaled()``);
2. ``biometry`` preparation of all three formats per subject (``prepare.prepare_subject``: read with
   scaling, fuse, body mask, projection + fat-fraction slices + MIMIR), and its ratio to the floor;
3. a straightforward scipy implementation of the same steps for comparison: stations read as
   float64 (``get_fdata``), each resampled onto the fused grid with
   ``scipy.ndimage.map_coordinates`` (order 1), overlaps averaged, a per-coronal-plane Otsu body
   mask as in the original, whole-volume fat fraction, the original O(n·volume) centre-of-mass
   search, and ``scipy.ndimage.zoom`` (order 1) for the resizes;
4. the store: a synthetic store of 30,000 projections (30000 x 2 x 256 x 256 uint8 = 3.9 GB) in
   ``--store-dir`` (default ``/tmp``), read into memory from a warm page cache.

Subjects come from the phantom at scale 1 when ``biometry.phantom.generate_cohort`` exists,
otherwise from synthetic NIfTI stations of the UKB layout (224 x 174 in-plane at 2.232 mm; 64, 44,
44, 44, 72, 64 slices of 3.0, 4.5, 4.5, 4.5, 3.5, 4.0 mm; int16 with ``scl_slope``; an
elliptic body with noise, so that gzip sees realistic data).

Usage: ``python benchmarks/prepare.py [--subjects 4] [--store-subjects 30000] [--write]``;
``--write`` replaces the "Data preparation" section of BENCHMARKS.md with the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from biometry.config.paths import repo_root
from biometry.data import formats
from biometry.data.prepare import DEFAULT_FORMATS, Subject, find_subjects, prepare_subject
from biometry.data.store import Store
from biometry.data.types import UKB_INPLANE, UKB_SPACING, Station, lps_index_affine
from biometry.fileio import write_text

STATION_DZ = (3.0, 4.5, 4.5, 4.5, 3.5, 4.0)
STATION_SLICES = (64, 44, 44, 44, 72, 64)
OVERLAP_MM = 37.0


# ------------------------------------------------------------------------------------------------
# input


def synthetic_stations(seed: int) -> list[Station]:
    """Six UKB-sized stations, head (1) to knees (6), of a noisy elliptic body on two legs."""
    rng = np.random.default_rng(seed)
    nx, ny = UKB_INPLANE
    out, top = [], 0.0
    for k in range(6):
        dz, nz = STATION_DZ[k], STATION_SLICES[k]
        origin = (0.5 * (nx - 1) * UKB_SPACING[0], 0.5 * (ny - 1) * UKB_SPACING[1],
                  top - (nz - 0.5) * dz)
        aff = lps_index_affine((UKB_SPACING[0], UKB_SPACING[1], dz), origin)
        x = (np.arange(nx) - nx / 2) * UKB_SPACING[0]
        y = (np.arange(ny) - 70) * UKB_SPACING[1]
        z = origin[2] + dz * np.arange(nz)
        xx, yy, zz = np.meshgrid(x, y, z, indexing="ij", sparse=True)
        trunk = np.hypot(xx / 180.0, yy / 120.0) < 1
        legs = (np.hypot((np.abs(xx) - 90) / 75.0, yy / 75.0) < 1)
        body = np.where(zz > -800, trunk, legs)
        fat_layer = body & ~np.where(zz > -800, np.hypot(xx / 160.0, yy / 100.0) < 1,
                                     np.hypot((np.abs(xx) - 90) / 60.0, yy / 60.0) < 1)
        water = body * 400.0 * (1 - 0.8 * fat_layer) + rng.normal(0, 15, (nx, ny, nz))
        fat = body * (40.0 + 400.0 * fat_layer) + rng.normal(0, 15, (nx, ny, nz))
        scale = 1.0 + 0.1 * k
        out.append(Station(k + 1, np.abs(water * scale).astype(np.float32),
                           np.abs(fat * scale).astype(np.float32), aff))
        top -= nz * dz - OVERLAP_MM
    return out


def make_cohort(root: Path, n: int, seed: int = 0) -> str:
    """Write ``n`` subjects under ``root``; returns what made them."""
    try:
        from biometry.phantom import generate_cohort
    except ImportError:
        generate_cohort = None
    if generate_cohort is not None:
        generate_cohort(root, n_subjects=n, seed=seed, scale=1.0, workers=1)
        return "phantom (scale 1)"
    from biometry.data.volumes import save_stations

    for i in range(n):
        save_stations(synthetic_stations(seed + i), root / "nifti" / f"{1000001 + i}",
                      dtype=np.int16)
    return "synthetic UKB-layout stations (int16 + scl_slope, gzip)"


# ------------------------------------------------------------------------------------------------
# the three ways


def read_floor(subject_dir: Path) -> None:
    for path in sorted(subject_dir.glob("station_*.nii*")):
        np.asarray(nib.load(path).dataobj.get_unscaled())


def _otsu_per_coronal_plane(total: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(np.mean([threshold_otsu(total[:, j, :]) for j in range(total.shape[1])]))


def _slice_of_mass_original(mask: np.ndarray, axis: int, half: float) -> int:
    """The original O(n·volume) search: re-count a growing sub-volume for each index."""
    for i in range(mask.shape[axis]):
        if np.count_nonzero(np.take(mask, np.arange(i), axis=axis)) >= half:
            return i
    return mask.shape[axis] - 1


def scipy_reference(subject_dir: Path) -> dict[str, np.ndarray]:
    """A straightforward scipy implementation of the same steps (see the module docstring)."""
    stations = []
    for k in range(1, 7):
        w = nib.load(subject_dir / f"station_{k}_water.nii.gz")
        f = nib.load(subject_dir / f"station_{k}_fat.nii.gz")
        stations.append((w.get_fdata(), f.get_fdata(), w.affine))
    sp = np.array(UKB_SPACING)
    lo = np.min([a[:3, 3] + np.minimum(0, a[:3, :3] @ (np.array(w.shape) - 1)) for w, _, a in stations], 0)
    hi = np.max([a[:3, 3] + np.maximum(0, a[:3, :3] @ (np.array(w.shape) - 1)) for w, _, a in stations], 0)
    z0, z1 = lo[2], hi[2]
    nz = int(np.floor((z1 - z0) / sp[2])) + 1
    nx, ny = stations[0][0].shape[:2]
    target = lps_index_affine(UKB_SPACING, (stations[0][2][0, 3], stations[0][2][1, 3], z0))
    acc_w = np.zeros((nx, ny, nz))
    acc_f = np.zeros((nx, ny, nz))
    weight = np.zeros((nx, ny, nz))
    for w, f, aff in stations:
        # only the fused slices that this station covers (its write window, as in the original)
        zs = aff[2, 3] + aff[2, 2] * np.array([0, w.shape[2] - 1])
        k0 = max(int(np.floor((zs.min() - z0) / sp[2])), 0)
        k1 = min(int(np.ceil((zs.max() - z0) / sp[2])) + 1, nz)
        grid = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(k0, k1), indexing="ij"), 0)
        world = np.tensordot(target[:3, :3], grid, axes=1) + target[:3, 3, None, None, None]
        inv = np.linalg.inv(aff)
        coords = np.tensordot(inv[:3, :3], world, axes=1) + inv[:3, 3, None, None, None]
        inside = np.all([(coords[a] >= -0.5) & (coords[a] <= w.shape[a] - 0.5) for a in range(3)], 0)
        acc_w[:, :, k0:k1] += inside * ndimage.map_coordinates(w, coords, order=1, mode="nearest")
        acc_f[:, :, k0:k1] += inside * ndimage.map_coordinates(f, coords, order=1, mode="nearest")
        weight[:, :, k0:k1] += inside
    water = acc_w / np.maximum(weight, 1)
    fat = acc_f / np.maximum(weight, 1)
    total = water + fat
    mask = total >= _otsu_per_coronal_plane(total)
    ff = np.where(total > 0, fat / np.where(total > 0, total, 1), 0)
    bed = formats.bed_voxels(UKB_SPACING[1])
    water, fat, mask, ff = (a[:, :-bed] for a in (water, fat, mask, ff))

    def views(v):
        return [np.rot90(v.sum(axis=1)), np.rot90(v.sum(axis=0))]

    def norm(img):
        return (img - img.min()) / max(img.max() - img.min(), 1e-12)

    def zoom_to(img, shape):
        return ndimage.zoom(img, (shape[0] / img.shape[0], shape[1] / img.shape[1]), order=1)

    proj = np.stack([zoom_to(np.hstack([norm(v) for v in views(c)]), (256, 256)) for c in (water, fat)])
    y_c = _slice_of_mass_original(mask, 1, np.count_nonzero(mask) / 2)
    right = mask[: mask.shape[0] // 2]
    x_s = _slice_of_mass_original(right, 0, np.count_nonzero(right) / 2)
    ff_img = np.clip(np.hstack([np.rot90(ff[:, y_c, :]), np.rot90(ff[x_s])]) / 0.5, 0, 1)
    return {"projection": (proj * 255).astype(np.uint8),
            "fat_fraction_slices": (zoom_to(ff_img[:176], (176, 376)) * 255).astype(np.uint8)[None],
            "mimir": np.concatenate([(proj * 255).astype(np.uint8),
                                     (zoom_to(ff_img, (256, 256)) * 255).astype(np.uint8)[None]])}


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# the store


def store_read_speed(folder: Path, n: int, part_size: int = 1000) -> dict:
    """Write a synthetic store of ``n`` projections, then time loading it (cold-ish, warm)."""
    path = folder / "biometry-bench-store"
    if path.exists():
        shutil.rmtree(path)
    st = Store.create(path, {"projection": ((2, 256, 256), "uint8")})
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, size=(part_size, 2, 256, 256), dtype=np.uint8)
    t = time.perf_counter()
    for start in range(0, n, part_size):
        m = min(part_size, n - start)
        part = st.next_parts(1)[0]
        st.write_part(part, {"projection": block[:m]})
        st.commit(part, [str(10_000_000 + start + i) for i in range(m)])
    write_s = time.perf_counter() - t
    st = Store.open(path)
    first = timed(st.load, "projection")
    warm = min(timed(Store.open(path).load, "projection") for _ in range(2))
    nbytes = n * 2 * 256 * 256
    shutil.rmtree(path)
    return {"n": n, "gb": nbytes / 1e9, "parts": -(-n // part_size), "write_s": write_s,
            "first_read_s": first, "warm_read_s": warm, "warm_gb_per_s": nbytes / 1e9 / warm}


# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()
        cpus = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M).group(1)
        return f"{model}, {cpus} CPUs"
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or "unknown CPU"


def run(n_subjects: int, store_subjects: int, store_dir: Path) -> dict:
    res: dict = {"date": dt.date.today().isoformat(), "machine": cpu_model(),
                 "python": platform.python_version(), "numpy": np.__version__}
    with tempfile.TemporaryDirectory(prefix="biometry-bench-") as tmp:
        root = Path(tmp)
        res["input"] = make_cohort(root, n_subjects)
        subjects = find_subjects(root)
        res["n_subjects"] = len(subjects)
        res["nifti_mb_per_subject"] = np.mean([sum(p.stat().st_size for p in Path(s.source).iterdir())
                                               for s in subjects]) / 1e6
        for s in subjects:  # warm the page cache: the floor is decompression, not disk
            read_floor(Path(s.source))
        floor = [timed(read_floor, Path(s.source)) for s in subjects]
        ours, shapes = [], {}
        prepare_subject(subjects[0], DEFAULT_FORMATS)  # warm-up: imports, first-call costs
        for s in subjects:
            t = time.perf_counter()
            arrays, qc = prepare_subject(Subject(s.eid, s.source, "nifti"), DEFAULT_FORMATS)
            ours.append(time.perf_counter() - t)
            if arrays is None:
                raise RuntimeError(f"benchmark subject {s.eid} failed: {qc['error']}")
            shapes = {k: list(v.shape) for k, v in arrays.items()}
        # where the time goes, on the first subject
        from biometry.data.volumes import body_mask, load_subject

        vol = load_subject(subjects[0].source)
        res["fused_shape"] = list(vol.shape)
        t = time.perf_counter()
        mask = body_mask(vol, max_inplane_mm=formats.MASK_INPLANE_MM)  # as formats.compute does
        res["body_mask_s"] = time.perf_counter() - t
        res["formats_s"] = min(timed(formats.compute, vol, list(DEFAULT_FORMATS), mask)
                               for _ in range(3))
        res["load_fuse_s"] = min(timed(load_subject, subjects[0].source) for _ in range(2))
        ref = [timed(scipy_reference, Path(s.source)) for s in subjects[:2]]
        res.update(
            floor_s=float(np.median(floor)), ours_s=float(np.median(ours)),
            scipy_s=float(np.median(ref)), shapes=shapes,
        )
        res["ratio_to_floor"] = res["ours_s"] / res["floor_s"]
        res["speedup_vs_scipy"] = res["scipy_s"] / res["ours_s"]
    if store_subjects:
        res["store"] = store_read_speed(store_dir, store_subjects)
    return res


def markdown(res: dict) -> str:
    lines = [
        "## Data preparation",
        "",
        f"Measured by `benchmarks/prepare.py` on {res['date']}: {res['machine']} (2 cores shared "
        f"with other jobs), Python {res['python']}, NumPy {res['numpy']}. One core, in-process, "
        f"{res['n_subjects']} subjects of {res['input']}, {res['nifti_mb_per_subject']:.1f} MB of "
        f"NIfTI per subject, fused to {' x '.join(map(str, res['fused_shape']))} voxels; page "
        "cache warm. Medians per subject.",
        "",
        "| step | s / subject | subjects / s |",
        "|---|---:|---:|",
        f"| floor: read + decompress the 12 NIfTI files | {res['floor_s']:.2f} | {1 / res['floor_s']:.2f} |",
        f"| biometry: load, fuse, body mask, all three formats | {res['ours_s']:.2f} | {1 / res['ours_s']:.2f} |",
        f"| straightforward scipy implementation (map_coordinates, zoom) | {res['scipy_s']:.2f} | {1 / res['scipy_s']:.2f} |",
        "",
        f"- ratio biometry / floor: **{res['ratio_to_floor']:.2f}x** (goal <= 2x); biometry is "
        f"**{res['speedup_vs_scipy']:.1f}x** faster than the scipy implementation.",
        f"- inside biometry (first subject): load + fuse {res['load_fuse_s']:.2f} s, body mask "
        f"{res['body_mask_s']:.2f} s (`volumes.body_mask` at the formats' 4.5 mm in-plane grid, used for the "
        f"centre-of-mass slices and the thigh level), "
        f"the three formats together {res['formats_s'] * 1000:.0f} ms; without the body mask the "
        f"ratio to the floor would be "
        f"{(res['ours_s'] - res['body_mask_s']) / res['floor_s']:.2f}x.",
    ]
    if "store" in res:
        s = res["store"]
        lines += [
            f"- store read: {s['n']:,} projections ({s['gb']:.1f} GB, {s['parts']} part files) into "
            f"memory in **{s['warm_read_s']:.1f} s** from a warm page cache "
            f"({s['warm_gb_per_s']:.1f} GB/s; goal < 10 s); first read after writing "
            f"{s['first_read_s']:.1f} s; writing the store took {s['write_s']:.1f} s.",
        ]
    lines += ["", "Re-run: `python benchmarks/prepare.py --write`.", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace (or add) the "## Data preparation" section of BENCHMARKS.md, atomically."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Data preparation\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _m: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    write_text(path, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--store-subjects", type=int, default=30_000)
    ap.add_argument("--store-dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    res = run(args.subjects, args.store_subjects, args.store_dir)
    print(json.dumps(res, indent=2, default=str))
    text = markdown(res)
    print(text)
    if args.write:
        write_section(text, repo_root() / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
