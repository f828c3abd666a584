"""Dixon water/fat signal of the phantom: tissue signal, bias fields, station scales, noise,
artefacts.

Signals are in arbitrary units: pure fat gives a fat signal of about 0.9 before the station
intensity scale (about 1000) is applied.
"""

from __future__ import annotations

import numpy as np

from biometry.phantom.anatomy import LABELS, N_LABELS, Body, Grid
from biometry.phantom.function import PROTOCOLS, check_protocol

L = LABELS

#: probability that a subject has a water-fat swap in one station, and a metal implant void
P_SWAP = 0.02
P_METAL = 0.015


def tissue_signal(p: dict[str, float], protocol: str = "ukb") -> np.ndarray:
    """(N_LABELS, 2) noiseless water and fat signal of every label for subject ``p``.

    ``protocol`` (:data:`biometry.phantom.function.PROTOCOLS`) changes the contrast of muscle
    water and adipose fat for the external cohort; ``"ukb"`` leaves the table as it is.
    """
    lut = np.zeros((N_LABELS, 2), dtype=np.float32)
    mff = p["muscle_fat_fraction"]
    lff = p["liver_fat_fraction"]
    lut[L["sat"]] = lut[L["vat"]] = lut[L["arm_fat"]] = (0.08, 0.90)
    for name in ("muscle", "thigh_anterior_right", "thigh_posterior_right", "thigh_anterior_left",
                 "thigh_posterior_left", "arm_lean"):
        lut[L[name]] = (0.62 * (1 - mff), 0.62 * mff)
    lut[L["liver"]] = (0.70 * (1 - lff), 0.70 * lff)
    lut[L["lungs"]] = (0.04, 0.005)
    lut[L["heart"]] = (0.45, 0.02)
    lut[L["kidneys"]] = (0.72, 0.02)
    lut[L["bone"]] = (0.25, 0.55)
    lut[L["viscera"]] = (0.45, 0.05)
    if protocol != "ukb":
        proto = PROTOCOLS[check_protocol(protocol)]
        for name in ("muscle", "thigh_anterior_right", "thigh_posterior_right",
                     "thigh_anterior_left", "thigh_posterior_left", "arm_lean"):
            lut[L[name], 0] *= proto["muscle_water"]
        for name in ("sat", "vat", "arm_fat"):
            lut[L[name], 1] *= proto["adipose_fat"]
    return lut


def ideal_signal(p: dict[str, float], labels: np.ndarray,
                 protocol: str = "ukb") -> tuple[np.ndarray, np.ndarray]:
    """Noiseless water and fat images (float32, same shape as ``labels``), unit intensity scale."""
    lut = tissue_signal(p, protocol)
    return lut[labels, 0], lut[labels, 1]


def draw_artefacts(p: dict[str, float], rng: np.random.Generator) -> list[dict]:
    """Artefacts of one subject: water-fat swap in a station and/or a metal void (hip or knee).

    Returns a list of dicts with ``flag`` (``"water_fat_swap"`` or ``"metal_void"``) and their
    geometry (station number; centre in body-model mm and radius).
    """
    out: list[dict] = []
    if rng.random() < P_SWAP:
        out.append(dict(flag="water_fat_swap", station=int(rng.choice([1, 2, 3, 4, 5, 6],
                                                                      p=[.3, .1, .1, .1, .15, .25]))))
    if rng.random() < P_METAL:
        body = Body(p)
        side = int(rng.choice([-1, 1]))
        where = str(rng.choice(["hip", "knee"]))
        lg = body.leg(np.array([body.h_femhead if where == "hip" else body.h_knee]), side)
        h = float(body.h_femhead - 20 if where == "hip" else body.h_knee + 10)
        out.append(dict(flag="metal_void", where=where, side="left" if side > 0 else "right",
                        u=float(lg["u"][0]), v=float(lg["v"][0]), h=h,
                        radius=float(rng.uniform(28.0, 45.0))))
    return out


def station_signal(p: dict[str, float], labels: np.ndarray, grid: Grid, station: int,
                   rng: np.random.Generator, artefacts: list[dict] = (),
                   protocol: str = "ukb") -> tuple[np.ndarray, np.ndarray]:
    """Water and fat images of one station as a scanner would reconstruct them.

    Parameters
    ----------
    p : subject parameters.
    labels : (nx, ny, nz) uint8 labels of the station grid.
    grid : the station grid (patient frame).
    station : station number 1..6.
    rng : generator for the station scale, bias field and noise.
    artefacts : from :func:`draw_artefacts`.
    protocol : "ukb", or "external" for other noise and contrast
        (:data:`biometry.phantom.function.PROTOCOLS`).

    Returns
    -------
    water, fat : (nx, ny, nz) float32, non-negative magnitudes in scanner units.
    """
    water, fat = ideal_signal(p, labels, protocol)
    nx, ny, nz = labels.shape
    u, v, w = grid.axes()
    xs = (u / (u[-1] - u[0] + 1e-9) * 2).astype(np.float32)[:, None, None]
    ys = ((v - v.mean()) / (v[-1] - v[0] + 1e-9) * 2).astype(np.float32)[None, :, None]
    zs = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    c = rng.normal(0.0, 0.06, size=6).astype(np.float32)
    bias = 1 + c[0] * xs + c[1] * ys + c[2] * zs + c[3] * (xs * xs - 0.3) + c[4] * (ys * ys - 0.3) \
        + c[5] * xs * zs
    # coil sensitivity drops towards the lateral edges of the FOV, where the arms lie
    bias = bias * (1 - 0.45 * np.clip(np.abs(xs) - 0.75, 0, None) / 0.25)
    scale = np.float32(1000.0 * np.exp(rng.normal(0.0, 0.18)))
    gain = bias * scale
    water = water * gain
    fat = fat * gain
    for a in artefacts:
        if a["flag"] == "metal_void":
            body = Body(p)
            d2 = ((u[:, None, None] - a["u"]) ** 2 + (v[None, :, None] - a["v"]) ** 2
                  + (w[None, None, :] + body.h_bottom - a["h"]) ** 2)
            r = a["radius"]
            void = d2 <= r * r
            rim = (d2 <= (r + 6) ** 2) & ~void
            if void.any():
                water[void] *= 0.02
                fat[void] *= 0.02
                water[rim] *= 1.8
                fat[rim] *= 1.8
    sigma = np.float32(0.012 * PROTOCOLS[check_protocol(protocol)]["noise"]) * scale
    water = np.abs(water + sigma * rng.standard_normal(water.shape, dtype=np.float32))
    fat = np.abs(fat + sigma * rng.standard_normal(fat.shape, dtype=np.float32))
    if any(a["flag"] == "water_fat_swap" and a["station"] == station for a in artefacts):
        water, fat = fat, water
    return water.astype(np.float32, copy=False), fat.astype(np.float32, copy=False)
