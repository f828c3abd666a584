"""Small read-side helpers to show a phantom cohort (used by ``00_phantom_cohort.ipynb``).

These are previews, not the pipeline: the real fusion lives in :mod:`biometry.data.volumes` and the
network inputs in :mod:`biometry.data.formats`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from biometry.config import fields as _fields


def coronal_preview(root: str | os.PathLike, eid: str, kind: str = "fat") -> np.ndarray:
    """Coronal mean-intensity projection of a subject's stations on the fused label grid.

    Each fused slice takes the station slice nearest in world z (the upper station wins in an
    overlap); no blending or intensity correction.

    Returns
    -------
    (Z, X) float32 image, head at the top, patient's right on the image left (radiological).
    """
    root = Path(root)
    ref = nib.load(root / "truth" / "labels" / f"{eid}_labels.nii.gz")
    nx, _ny, nz = ref.shape
    z_world = (ref.affine @ np.c_[np.zeros((nz, 2)), np.arange(nz), np.ones(nz)].T)[2]
    out = np.zeros((nx, nz), dtype=np.float32)
    done = np.zeros(nz, dtype=bool)
    for k in range(1, 7):
        img = nib.load(root / "nifti" / eid / f"station_{k}_{kind}.nii.gz")
        lps = img.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS")))
        data = np.asanyarray(lps.dataobj, dtype=np.float32)
        zs = (lps.affine @ np.c_[np.zeros((data.shape[2], 2)), np.arange(data.shape[2]),
                                 np.ones(data.shape[2])].T)[2]
        dz = abs(zs[1] - zs[0])
        proj = data.mean(axis=1)  # (x, z)
        for j in np.nonzero(~done)[0]:
            i = int(np.argmin(np.abs(zs - z_world[j])))
            if abs(zs[i] - z_world[j]) <= dz / 2 + 1e-6 and proj.shape[0] == nx:
                out[:, j] = proj[:, i]
                done[j] = True
    return np.rot90(out)


def availability_by_group(observed: pd.DataFrame) -> pd.DataFrame:
    """Share of subjects with each field, with the field's catalogue group.

    Parameters
    ----------
    observed : a ``fields.csv`` table (eid + UKB columns).

    Returns
    -------
    DataFrame with columns column, key, group, present (share in [0, 1]).
    """
    cat = _fields.catalogue()
    rows = []
    by_id = {r.field_id: k for k, r in cat.iterrows() if r.field_id}
    for c in observed.columns:
        parsed = _fields.parse_column(c)
        if parsed is None or parsed[0] not in by_id:
            continue
        key = by_id[parsed[0]]
        rows.append({"column": c, "key": key, "group": cat.loc[key, "group"],
                     "present": float(observed[c].notna().mean())})
    return pd.DataFrame(rows)


def complete_share(observed: pd.DataFrame) -> float:
    """Share of subjects that have every UKB showcase column of ``fields.csv``.

    The thigh study's functional measures (columns named after their key, not UKB fields) do not
    count: the external cohort's ``exercise`` label is never present in a main cohort.
    """
    cols = [c for c in observed.columns if _fields.parse_column(c)]
    return float(observed[cols].notna().all(axis=1).mean())
