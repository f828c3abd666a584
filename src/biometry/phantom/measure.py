"""Field values of a phantom subject, measured the way each modality measures.

* MRI atlas fields (group ``mri_atlas``): voxel counts of the label volume on the fused grid times
  the voxel volume (from the float32 spacing a NIfTI header stores), VAT and ASAT only between the
  top of the femoral heads and the top of T9 (slice range ``atlas_slice_lo..atlas_slice_hi``).
* DXA fields: tissue masses of the label volume projected onto the coronal plane and summed in
  DXA's regions (arms, legs, trunk, android, gynoid, VAT band = android), plus the tissue that the
  MRI field of view does not see (whole arms, head, lower legs and feet, from the analytic body
  model), with a per-region measurement error.
* Liver fat 22402 (dedicated liver MRI): the true liver fat with a mild non-linearity, noise and a
  few gross outliers; 22436 (atlas PDFF) closer to the truth.
* Anthropometry: weight = body mass (inside and outside the FOV) plus scale error; waist and hip
  from the outline perimeters; grip strength and pulse rate weak, noisy functions of anatomy;
  diabetes 2443 from a logistic model of age, BMI, VAT and liver fat.

All values are in UKB native units (DXA masses in g, DXA VAT volume in cm3, MRI volumes in L).
"""

from __future__ import annotations

import datetime as _dt
import functools

import numpy as np

from biometry.config import fields as _fields
from biometry.phantom.anatomy import (
    ADIPOSE,
    BONE,
    LABELS,
    N_LABELS,
    Body,
    Grid,
    arm_masses,
    below_fov_legs,
    head_masses,
)
from biometry.phantom.function import FUNCTION_FIELDS

L = LABELS
THIGH = (L["thigh_anterior_right"], L["thigh_posterior_right"], L["thigh_anterior_left"],
         L["thigh_posterior_left"])


def label_slice_counts(labels: np.ndarray) -> np.ndarray:
    """Voxel count of every label in every axial slice.

    Parameters
    ----------
    labels : (nx, ny, nz) uint8 label volume.

    Returns
    -------
    (N_LABELS, nz) int64 counts.
    """
    nz = labels.shape[2]
    idx = labels.astype(np.int32) * nz + np.arange(nz, dtype=np.int32)[None, None, :]
    return np.bincount(idx.ravel(), minlength=N_LABELS * nz).reshape(N_LABELS, nz)


def atlas_slices(p: dict[str, float], grid: Grid) -> tuple[int, int]:
    """Inclusive fused-grid slice range of the AMRA abdominal region (femoral heads .. T9)."""
    body = Body(p)
    w = grid.axes()[2]
    lo_w, hi_w = body.h_femhead - body.h_bottom, body.h_t9 - body.h_bottom
    inside = np.nonzero((w >= lo_w) & (w <= hi_w))[0]
    if inside.size == 0:
        return 0, -1
    return int(inside[0]), int(inside[-1])


def mri_atlas_fields(p: dict[str, float], labels: np.ndarray, grid: Grid) -> dict[str, float]:
    """MRI atlas volumes (L) from the label volume on ``grid`` (see module docstring)."""
    c = label_slice_counts(labels)
    vv = grid.voxel_volume_l
    lo, hi = atlas_slices(p, grid)
    region = slice(lo, hi + 1)
    vat = float(c[L["vat"], region].sum() * vv)
    asat = float(c[L["sat"], region].sum() * vv)
    out = {
        "22407": vat,
        "22408": asat,
        "22403": float(c[L["thigh_anterior_right"]].sum() * vv),
        "22404": float(c[L["thigh_posterior_right"]].sum() * vv),
        "22405": float(c[L["thigh_anterior_left"]].sum() * vv),
        "22406": float(c[L["thigh_posterior_left"]].sum() * vv),
        "22415": float((c[L["sat"]].sum() + c[L["vat"]].sum()) * vv),
        "22416": float((c[L["muscle"]].sum() + sum(c[k].sum() for k in THIGH)) * vv),
        "liver_volume": float(c[L["liver"]].sum() * vv),
        "kidney_parenchymal_volume": float(c[L["kidneys"]].sum() * vv),
    }
    out["22409"] = out["22403"] + out["22404"] + out["22405"] + out["22406"]
    out["22410"] = vat + asat
    return out


def _composition(p: dict[str, float]) -> np.ndarray:
    """(N_LABELS, 3) grams of (lipid, lean, bone mineral) per mL of each label; arms excluded."""
    comp = np.zeros((N_LABELS, 3))
    mff = p["muscle_fat_fraction"]
    lff = p["liver_fat_fraction"]
    comp[L["sat"]] = comp[L["vat"]] = ADIPOSE
    for k in (L["muscle"], *THIGH):
        comp[k] = (1.06 * mff, 1.06 * (1 - mff), 0.0)
    comp[L["liver"]] = (1.06 * lff, 1.06 * (1 - lff), 0.0)
    comp[L["lungs"]] = (0.0, 0.45, 0.0)
    comp[L["heart"]] = comp[L["kidneys"]] = (0.0, 1.05, 0.0)
    comp[L["bone"]] = BONE
    comp[L["viscera"]] = (0.02, 1.0, 0.0)
    return comp


def coronal_masses(p: dict[str, float], labels: np.ndarray, grid: Grid) -> np.ndarray:
    """Tissue masses projected onto the coronal plane.

    Returns
    -------
    (3, nx, nz) float64: lipid, lean and bone-mineral mass (g) per coronal pixel (arms excluded).
    """
    comp = _composition(p) * (grid.voxel_volume_l * 1000.0)  # g per voxel
    nx, _ny, nz = labels.shape
    out = np.empty((3, nx, nz))
    # per-(x, z) label histogram, then masses by composition
    idx = (labels.astype(np.int32) * (nx * nz)
           + (np.arange(nx, dtype=np.int32)[:, None, None] * nz
              + np.arange(nz, dtype=np.int32)[None, None, :]))
    hist = np.bincount(idx.ravel(), minlength=N_LABELS * nx * nz).reshape(N_LABELS, nx, nz)
    for j in range(3):
        out[j] = np.tensordot(comp[:, j], hist, axes=(0, 0))
    return out


def dxa_fields(p: dict[str, float], labels: np.ndarray, grid: Grid,
               rng: np.random.Generator) -> tuple[dict[str, float], dict[str, float]]:
    """DXA regional masses in native units (g, %, cm3) and the true masses behind them (g).

    Returns ``(fields, truth)`` where ``truth`` holds error-free regional masses for the table
    of true parameters.
    """
    body = Body(p)
    u, _v, w = grid.axes()
    h = w + body.h_bottom
    cm = coronal_masses(p, labels, grid)            # (3, nx, nz) g
    left = u[:, None] > body.su
    leg_zone = (h < body.h_femhead - 15.0)[None, :]
    head_zone = (h >= body.h_neckcut)[None, :]
    trunk_zone = ~leg_zone & ~head_zone
    android_h = 0.2 * (body.h_neckcut - body.h_crest)
    android = ((h >= body.h_crest) & (h < body.h_crest + android_h))[None, :]
    gyn_top = body.h_crest - 1.5 * android_h
    gynoid = ((h < gyn_top) & (h >= gyn_top - 2 * android_h))[None, :]
    lo_legs = below_fov_legs(p)

    def region(mask):
        return cm[:, np.broadcast_to(mask, cm.shape[1:])].sum(axis=1)  # (3,) g

    comp_true: dict[str, np.ndarray] = {}
    for side, name, sel in ((-1, "Right", ~left), (1, "Left", left)):
        a = arm_masses(p, side)
        comp_true[f"arm{name}"] = np.array([a["lipid"], a["lean"], a["bone"]]) * 1000.0
        below = lo_legs[name.lower()]
        comp_true[f"leg{name}"] = region(leg_zone & sel) + np.array(
            [below["lipid"], below["lean"], below["bone"]]) * 1000.0
    comp_true["trunk"] = region(trunk_zone)
    hd = head_masses(p)
    comp_true["head"] = region(head_zone) + np.array([hd["lipid"], hd["lean"], hd["bone"]]) * 1000.0
    comp_true["android"] = region(android)
    comp_true["gynoid"] = region(gynoid)

    # DXA error: soft-tissue partition error per region (fat <-> lean), bone error
    meas: dict[str, np.ndarray] = {}
    for k, (fat, lean, bone) in comp_true.items():
        soft = fat + lean
        frac = np.clip(fat / soft * (1 + rng.normal(0.0, 0.02)) + rng.normal(0.0, 0.004), 0, 1)
        soft_m = soft * (1 + rng.normal(0.0, 0.006))
        meas[k] = np.array([soft_m * frac, soft_m * (1 - frac), bone * (1 + rng.normal(0.0, 0.02))])

    out: dict[str, float] = {}

    def put(prefix_ids, m):
        fat_id, lean_id, pct_id, tot_id = prefix_ids
        fat, lean, bone = m
        out[fat_id] = fat
        out[lean_id] = lean
        out[pct_id] = 100.0 * fat / (fat + lean)
        out[tot_id] = fat + lean + bone

    put(("23249", "23250", "23251", "23252"), meas["armLeft"])
    put(("23253", "23254", "23255", "23256"), meas["armRight"])
    put(("23257", "23258", "23259", "23260"), meas["armLeft"] + meas["armRight"])
    put(("23266", "23267", "23268", "23269"), meas["legLeft"])
    put(("23270", "23271", "23272", "23273"), meas["legRight"])
    put(("23274", "23275", "23276", "23277"), meas["legLeft"] + meas["legRight"])
    put(("23284", "23285", "23286", "23287"), meas["trunk"])
    put(("23245", "23246", "23247", "23248"), meas["android"])
    put(("23262", "23263", "23264", "23265"), meas["gynoid"])
    out["23244"] = meas["android"][2]
    out["23261"] = meas["gynoid"][2]
    total = sum(meas[k] for k in ("armLeft", "armRight", "legLeft", "legRight", "trunk", "head"))
    out["23278"] = total[0]
    out["23280"] = total[1]
    out["23279"] = total[1] + total[2]
    out["23281"] = 100.0 * total[0] / (total[0] + total[1])
    out["23282"] = total[0] + total[1]
    out["23283"] = total[0] + total[1] + total[2]
    # DXA VAT: visceral fat in the android band, estimated by subtracting modelled SAT; the SAT
    # model leaks a little SAT into VAT and misses some VAT
    band = np.broadcast_to(android, labels.shape[::2])  # (nx, nz)
    gpv = grid.voxel_volume_l * 1000.0 * 0.92
    vat_band = float((labels == L["vat"]).sum(axis=1)[band].sum() * gpv)
    sat_band = float((labels == L["sat"]).sum(axis=1)[band].sum() * gpv)
    vat_mass = 0.80 * vat_band + 0.05 * sat_band - 40.0 + rng.normal(0.0, 40.0 + 0.08 * vat_band)
    out["23288"] = max(vat_mass, 5.0)
    out["23289"] = out["23288"] / 0.94
    truth = {f"dxa_true_{k}_{c}_g": float(v) for k, m in comp_true.items()
             for c, v in zip(("fat", "lean", "bone"), m)}
    truth["dxa_true_vat_band_g"] = vat_band
    truth["dxa_true_sat_band_g"] = sat_band
    return {k: float(v) for k, v in out.items()}, truth


def _perimeter(a: float, b: float) -> float:
    """Ramanujan's approximation of an ellipse perimeter (same unit as a, b)."""
    return float(np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b))))


def body_mass_kg(p: dict[str, float], labels: np.ndarray, grid: Grid) -> float:
    """True body mass (kg): label volume inside the FOV + arms, head, lower legs outside it."""
    cm = coronal_masses(p, labels, grid)
    mass = cm.sum() / 1000.0
    for side in (-1, 1):
        mass += sum(arm_masses(p, side).values())
    mass += sum(head_masses(p).values())
    for leg in below_fov_legs(p).values():
        mass += sum(leg.values())
    return float(mass)


def measure_fields(p: dict[str, float], labels: np.ndarray, grid: Grid,
                   rng: np.random.Generator) -> tuple[dict[str, object], dict[str, float]]:
    """Every catalogue field of one subject, without missingness.

    Parameters
    ----------
    p : subject parameters.
    labels, grid : the fused-grid label volume and its grid.
    rng : generator for measurement errors (independent of the rasterisation).

    Returns
    -------
    fields : key -> value in UKB native units (``"53"`` is an ISO date string, ``"102"`` the
        first pulse reading; ``"102#1"`` holds the second).
    truth : error-free quantities behind them (body mass, DXA regions, landmarks).
    """
    body = Body(p)
    f: dict[str, object] = {}
    truth: dict[str, float] = {}
    male = int(p["sex"])
    # dates and age
    start = _dt.date(2014, 8, 1).toordinal()
    scan = _dt.date.fromordinal(start + int(rng.integers(0, 2040)))
    birth = _dt.date.fromordinal(scan.toordinal() - int(round(p["age"] * 365.25)))
    f["31"] = male
    f["34"] = birth.year
    f["52"] = birth.month
    f["53"] = scan.isoformat()
    f["age"] = (scan.toordinal() - birth.toordinal()) / 365.25
    # anthropometry
    mass = body_mass_kg(p, labels, grid)
    truth["body_mass_kg"] = mass
    height_cm = p["height_mm"] / 10.0
    f["12144"] = float(np.round(height_cm + rng.normal(0.0, 0.4), 1))
    f["20015"] = float(np.round(0.52 * height_cm + rng.normal(0.0, 1.6), 1))
    f["21002"] = float(np.round(mass + rng.normal(0.0, 0.5), 1))
    f["21001"] = float(np.round(f["21002"] / (f["12144"] / 100.0) ** 2, 4))
    tw = body.trunk(np.array([0.62 * body.H]))
    th = body.trunk(np.array([0.50 * body.H]))
    f["48"] = float(np.round(_perimeter(tw["a_out"][0], tw["b_out"][0]) / 10 + rng.normal(0, 2.0)))
    f["49"] = float(np.round(_perimeter(th["a_out"][0], th["b_out"][0]) / 10 + rng.normal(0, 2.0)))
    arm_r = arm_masses(p, -1)
    truth["arm_lean_right_kg"] = arm_r["lean"]
    grip = 17.0 * arm_r["lean"] - 6.0 - 0.3 * (p["age"] - 64) + rng.normal(0.0, 8.5)
    f["47"] = float(max(0.0, np.round(grip)))
    pulse = 71.0 - 3.0 * male + 0.3 * (p["bmi_target"] - 27) + rng.normal(0.0, 10.0)
    f["102"] = float(np.round(np.clip(pulse + rng.normal(0, 3.5), 38, 160)))
    f["102#1"] = float(np.round(np.clip(pulse + rng.normal(0, 3.5), 38, 160)))
    # MRI atlas
    atlas = mri_atlas_fields(p, labels, grid)
    lo, hi = atlas_slices(p, grid)
    truth["atlas_slice_lo"], truth["atlas_slice_hi"] = lo, hi
    f.update(atlas)
    f["22432"] = (atlas["22407"] + atlas["22408"]) / (f["12144"] / 100.0) ** 2
    f["22433"] = f["21002"] / max(atlas["22409"], 1e-6)
    f["22434"] = (atlas["22410"]) / (atlas["22410"] + atlas["22409"])
    f["22435"] = float(100 * p["muscle_fat_fraction"] + rng.normal(0.0, 0.3))
    lff = 100.0 * p["liver_fat_fraction"]
    f["22436"] = float(max(0.0, lff + rng.normal(0.0, 0.35)))
    # dedicated liver MRI (3 ROIs): mild non-linearity, noise, gross outliers
    ref = 1.08 * lff + 0.012 * lff ** 2 - 0.3 + rng.normal(0.0, 0.45)
    outlier = rng.random() < 0.01
    if outlier:
        ref = lff * rng.uniform(2.0, 4.0) + rng.uniform(3.0, 10.0)
    # planted gross errors of the reference, for the liver study's outlier search to find
    truth["liver_fat_reference_outlier"] = float(outlier)
    f["22402"] = float(np.clip(ref, 0.0, 46.0))
    # DXA
    dxa, dtruth = dxa_fields(p, labels, grid, rng)
    f.update(dxa)
    truth.update(dtruth)
    # diabetes
    logit = (-3.3 + 0.06 * (p["age"] - 64) + 0.12 * (f["21001"] - 27) + 0.25 * (atlas["22407"] - 4)
             + 0.05 * (lff - 4) + 0.3 * male)
    f["2443"] = int(rng.random() < 1 / (1 + np.exp(-logit)))
    return f, truth


# ---------------------------------------------------------------------------------------------
# availability and columns

#: availability per group: (probability the block exists, probability of each field within it)
AVAILABILITY: dict[str, tuple[float, float]] = {
    "anthropometry": (1.0, 0.985),
    "dxa": (0.40, 0.99),
    "mri_atlas": (0.85, 0.985),
    "liver": (0.30, 1.0),
    "disease": (1.0, 0.985),
    "auxiliary": (1.0, 1.0),
}


@functools.lru_cache(maxsize=1)
def _catalogue_fields() -> tuple[tuple[str, str, int, int], ...]:
    """(key, group, instance, arrays) of every catalogue field with a UKB id."""
    cat = _fields.catalogue()
    return tuple((key, row.group, int(row.instance), int(row.arrays))
                 for key, row in cat.iterrows() if row.field_id)


@functools.lru_cache(maxsize=1)
def _field_columns() -> tuple[tuple[str, str, int], ...]:
    ukb = tuple((_fields.column(key, array=arr), key, arr)
                for key, _g, _i, arrays in _catalogue_fields() for arr in range(arrays))
    # study-specific fields without a UKB id (the thigh study's functional measures): column = key
    return ukb + tuple((key, key, 0) for key in FUNCTION_FIELDS)


def field_columns() -> list[tuple[str, str, int]]:
    """UKB showcase columns of the phantom's field table: (column, key, array) in catalogue order."""
    return list(_field_columns())


def availability(rng: np.random.Generator) -> dict[str, bool]:
    """Which fields a subject has (key -> bool; ``"102#1"`` for the second pulse reading)."""
    blocks = {g: rng.random() < pb for g, (pb, _pf) in AVAILABILITY.items()}
    have: dict[str, bool] = {}
    for key, group, _inst, _arrays in _catalogue_fields():
        pb, pf = AVAILABILITY.get(group, (1.0, 0.985))
        have[key] = bool(blocks.get(group, True) and rng.random() < pf)
    for key in ("31", "34", "52", "53"):
        have[key] = True
    have["102"] = bool(rng.random() < 0.81)
    have["102#1"] = bool(have["102"] and rng.random() < 0.97)
    have["20015"] = have["20015"] and bool(rng.random() < 0.98)
    # BMI needs both height and weight; atlas liver PDFF mostly with the atlas block
    have["21001"] = have["21001"] and have["21002"] and have["12144"]
    have["22436"] = bool(blocks["mri_atlas"] and rng.random() < 0.92)
    return have


def observed_row(eid: str, values: dict[str, object], have: dict[str, bool]) -> dict[str, object]:
    """One row of ``fields.csv``: eid and every showcase column (NaN / empty where missing)."""
    row: dict[str, object] = {"eid": eid}
    for col, key, arr in _field_columns():
        k = key if arr == 0 else f"{key}#{arr}"
        row[col] = values[k] if have.get(k, False) else (None if key == "53" else np.nan)
    return row
