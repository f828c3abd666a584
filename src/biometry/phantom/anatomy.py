"""Phantom anatomy: subject parameters, the body model in millimetres and its rasterisation.

Coordinates of the body model (patient frame, mm):

* ``u``: patient right → left (0 on the midline), the x axis of the LPS index order;
* ``v``: anterior → posterior (0 at the centre of the field of view), the y axis;
* ``h``: height above the floor (inferior → superior), the z axis.

Every structure is an implicit shape: a *tube* (an elliptic cross-section whose centre and
half-axes are piecewise-linear functions of ``h``) or an *ellipsoid*. Rasterisation evaluates the
shapes at voxel centres of any axis-aligned grid (painter's order, later shapes win), so the same
anatomy gives the fused label volume and each station's labels. Cross-section areas of the tubes
are also integrated analytically (1-D in ``h``) for the tissue that lies outside the MRI field of
view (head, lower legs, the whole arms for DXA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biometry.config.population import POPULATION, check_population_value
from biometry.data.types import UKB_INPLANE, UKB_SPACING

# ---------------------------------------------------------------------------------------------
# labels

#: Tissue labels of the phantom label volume (uint8).
LABELS: dict[str, int] = {
    "background": 0,
    "sat": 1,                     # subcutaneous adipose tissue (trunk, neck, legs)
    "vat": 2,                     # visceral adipose tissue (incl. pericardial fat above T9)
    "muscle": 3,                  # other skeletal muscle (trunk wall, back, neck, calves)
    "thigh_anterior_right": 4,
    "thigh_posterior_right": 5,
    "thigh_anterior_left": 6,
    "thigh_posterior_left": 7,
    "liver": 8,
    "lungs": 9,
    "heart": 10,
    "kidneys": 11,
    "bone": 12,                   # spine, pelvis, femora, knees, tibiae (bone with marrow)
    "viscera": 13,                # lean abdominal/neck contents (bowel, other organs)
    "arm_lean": 14,
    "arm_fat": 15,
}
N_LABELS = 16
L = LABELS

# ---------------------------------------------------------------------------------------------
# acquisition geometry (UKB neck-to-knee protocol)

#: Per-station slice thickness (mm), stations 1 (neck) .. 6 (knees), as in UKB.
STATION_DZ: tuple[float, ...] = (3.0, 4.5, 4.5, 4.5, 3.5, 4.0)
#: Per-station slice counts at scale 1.
STATION_SLICES: tuple[int, ...] = (64, 44, 44, 44, 72, 64)
#: Overlap (mm) between station k and k+1.
STATION_OVERLAP: tuple[float, ...] = (36.0, 37.5, 36.0, 37.0, 37.5)
#: Height of the neck-to-knee field of view (mm): 370 fused slices of 3 mm.
FOV_HEIGHT_MM: float = 1110.0
#: Posterior bed: 22 voxels of 2.232 mm, as cropped by the papers.
BED_MM: float = 22 * UKB_SPACING[1]


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid in the patient frame (LPS index order).

    Attributes
    ----------
    shape : (nx, ny, nz) voxel counts.
    spacing : (du, dv, dh) voxel size in mm.
    origin : (u0, v0, w0) patient-frame coordinate (mm) of voxel (0, 0, 0); ``w`` is the height
        above the bottom of the field of view.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates (mm) along u, v, w: three 1-D float64 arrays."""
        return tuple(o + s * np.arange(n, dtype=np.float64)
                     for o, s, n in zip(self.origin, self.spacing, self.shape))

    @property
    def voxel_volume_l(self) -> float:
        """Voxel volume in litres, from the float32 spacing that a NIfTI header stores."""
        sp = np.asarray(self.spacing, dtype=np.float32).astype(np.float64)
        return float(sp[0] * sp[1] * sp[2] / 1e6)


def check_scale(scale: float) -> float:
    """Return ``scale`` as float, raising ``ValueError`` unless it is in (0.1, 2]."""
    scale = float(scale)
    if not (0.1 < scale <= 2.0) or not np.isfinite(scale):
        raise ValueError(f"scale must be in (0.1, 2], got {scale}")
    return scale


def inplane(scale: float) -> tuple[int, int, float, float]:
    """In-plane voxel counts and spacing (mm) at ``scale``: (nx, ny, du, dv)."""
    nx, ny = (max(4, int(round(n * scale))) for n in UKB_INPLANE)
    return nx, ny, UKB_SPACING[0] / scale, UKB_SPACING[1] / scale


def station_grids(scale: float) -> list[Grid]:
    """The six station grids at ``scale``; ``w`` is height above the FOV bottom (mm).

    Station 1 (neck) tops the field of view at ``w = FOV_HEIGHT_MM``; each following station
    starts ``STATION_OVERLAP`` mm above the bottom edge of the previous one.
    """
    nx, ny, du, dv = inplane(scale)
    u0 = -(nx - 1) / 2 * du
    v0 = -(ny - 1) / 2 * dv
    top = FOV_HEIGHT_MM
    grids = []
    for k, (dz, n) in enumerate(zip(STATION_DZ, STATION_SLICES)):
        nz = max(2, int(round(n * scale)))
        dzs = dz / scale
        bottom = top - nz * dzs
        grids.append(Grid((nx, ny, nz), (du, dv, dzs), (u0, v0, bottom + dzs / 2)))
        if k < len(STATION_OVERLAP):
            top = bottom + STATION_OVERLAP[k]
    # the scaled stations need not end exactly at w = 0; shift so the lowest edge is w = 0
    low = grids[-1].origin[2] - grids[-1].spacing[2] / 2
    return [Grid(g.shape, g.spacing, (g.origin[0], g.origin[1], g.origin[2] - low)) for g in grids]


def fused_grid(scale: float) -> Grid:
    """The fused label grid at ``scale``: stations' in-plane grid, 3/scale mm slices over the FOV."""
    st = station_grids(scale)
    top = st[0].origin[2] + (st[0].shape[2] - 0.5) * st[0].spacing[2]
    dz = UKB_SPACING[2] / scale
    nz = max(2, int(round(top / dz)))
    g0 = st[0]
    return Grid((g0.shape[0], g0.shape[1], nz), (g0.spacing[0], g0.spacing[1], dz),
                (g0.origin[0], g0.origin[1], dz / 2))


def ras_affine(grid: Grid, w_iso: float) -> np.ndarray:
    """4x4 voxel → RAS+ world (mm) affine of ``grid`` in LPS index order.

    World z is ``w - w_iso`` (the table position puts height ``w_iso`` of the FOV at z = 0).
    """
    du, dv, dw = grid.spacing
    aff = np.diag([-du, -dv, dw, 1.0])
    aff[:3, 3] = (-grid.origin[0], -grid.origin[1], grid.origin[2] - w_iso)
    return aff


# ---------------------------------------------------------------------------------------------
# parameters

#: piecewise-linear profiles in relative height r = h / H (knots, values)
_TRUNK_R = np.array([0.47, 0.50, 0.56, 0.62, 0.70, 0.76, 0.815, 0.835, 1.0])
_TRUNK_A = {1: [0.090, 0.096, 0.090, 0.082, 0.090, 0.098, 0.100, 0.036, 0.034],
            0: [0.095, 0.102, 0.090, 0.078, 0.084, 0.088, 0.088, 0.033, 0.031]}
_TRUNK_B = {1: [0.052, 0.056, 0.054, 0.052, 0.058, 0.062, 0.056, 0.034, 0.034],
            0: [0.054, 0.058, 0.052, 0.048, 0.054, 0.058, 0.050, 0.031, 0.031]}
_SAT_T = {1: [0.8, 0.9, 1.1, 1.2, 0.8, 0.5, 0.35, 0.3, 0.3],
          0: [1.3, 1.4, 1.2, 1.0, 0.8, 0.6, 0.35, 0.3, 0.3]}
_VAT_R = np.array([0.49, 0.52, 0.58, 0.63, 0.68, 0.70])
_VAT_P = np.array([0.5, 0.65, 1.0, 1.0, 0.75, 0.6])
_LEG_R = np.array([0.04, 0.06, 0.12, 0.20, 0.25, 0.285, 0.32, 0.40, 0.47, 0.53])
_LEG_M = 1.1 * np.array([0.010, 0.012, 0.018, 0.026, 0.024, 0.020, 0.026, 0.036, 0.041, 0.042])
_LEG_T = np.array([0.2, 0.25, 0.3, 0.4, 0.4, 0.5, 0.6, 0.9, 1.1, 1.2])
_ARM_R = np.array([0.38, 0.48, 0.49, 0.63, 0.64, 0.80, 0.815])
_ARM_M = np.array([0.020, 0.018, 0.011, 0.016, 0.019, 0.021, 0.018])
_ARM_T = np.array([0.15, 0.2, 0.25, 0.35, 0.5, 0.5, 0.4])

#: mass (kg) of what the analytic model of :func:`solve_body` leaves out (bones, organs, feet)
MASS_OFFSET_KG = 5.6

# tissue mass composition per mL: (lipid g, lean g, bone mineral g) used for weight and DXA
ADIPOSE = (0.92 * 0.85, 0.92 * 0.15, 0.0)
BONE = (0.25, 0.85, 0.35)


#: SD of the left/right thigh-muscle asymmetry of the default (UKB-like) phantom: the two
#: anterior thighs correlate at r ~ 0.94, as in UKB
THIGH_ASYMMETRY_SD = POPULATION["thigh_asymmetry"].default
#: how far log liver fat follows the visceral factor and BMI in the default phantom (UKB-like)
LIVER_FAT_COUPLING = POPULATION["liver_fat_coupling"].default


def draw_parameters(rng: np.random.Generator, thigh_asymmetry: float = THIGH_ASYMMETRY_SD,
                    liver_fat_coupling: float = LIVER_FAT_COUPLING) -> dict[str, float]:
    """Draw one subject's demographic and latent body parameters.

    Marginals follow the UKB imaging cohort (age 44–82, mean 64, SD 7.5; 52 % male; BMI mean
    about 27, SD 4.3; liver fat median about 2 %, 20 % above 5.5 %). Returns a flat dict of
    floats: lengths in mm, fractions in [0, 1], masses in kg.

    ``thigh_asymmetry`` is the SD of the relative left/right difference of thigh muscle
    (default :data:`THIGH_ASYMMETRY_SD`, UKB-like); a larger value (0.10 in the
    ``saliency-check`` study) gives each side information of its own, so a network for one
    thigh has a reason to look at that side. ``liver_fat_coupling`` scales the loadings of log
    liver fat on the visceral factor (0.55) and BMI (0.3), keeping its variance: 1 (default) is
    UKB-like, 0 makes liver fat independent of both (``saliency-check-liver``), so the liver is
    the only evidence of it. The random stream is the same for any value of either option
    (:mod:`biometry.config.population`).
    """
    p: dict[str, float] = {}
    male = float(rng.random() < 0.52)
    p["sex"] = male
    p["age"] = float(np.clip(rng.normal(64.0, 7.5), 44.5, 81.9))
    height_cm = rng.normal(176.0 if male else 163.0, 6.6 if male else 6.1) - 0.08 * (p["age"] - 64)
    p["height_mm"] = float(np.clip(height_cm, 140.0, 205.0) * 10.0)
    bmi = np.exp(rng.normal(np.log(27.3 if male else 26.3), 0.15))
    p["bmi_target"] = float(np.clip(bmi, 16.0, 55.0))
    h_m = p["height_mm"] / 1000.0
    p["weight_target"] = p["bmi_target"] * h_m ** 2
    # Deurenberg body-fat equation plus individual scatter
    bf = 1.2 * p["bmi_target"] + 0.23 * p["age"] - 10.8 * male - 5.4 + rng.normal(0.0, 3.0)
    p["body_fat_target"] = float(np.clip(bf, 8.0, 60.0)) / 100.0
    # latent "fatness" shared by the depots, visceral fatness on top of it
    z_vat = rng.normal()
    p["visceral_fatness"] = float(np.clip(
        0.38 + 0.12 * male + 0.025 * (p["bmi_target"] - 27) + 0.006 * (p["age"] - 64)
        + 0.08 * z_vat, 0.05, 0.85))
    p["muscle_fat_fraction"] = float(np.clip(
        0.065 + 0.002 * (p["age"] - 64) + 0.003 * (p["bmi_target"] - 27) + 0.01 * (1 - male)
        + rng.normal(0.0, 0.012), 0.015, 0.25))
    # log liver fat: unit variance, loading on the visceral factor and on BMI (both scaled by
    # the coupling), the rest its own
    coupling = check_population_value("liver_fat_coupling", liver_fat_coupling)
    a, b = 0.55 * coupling, 0.3 * coupling
    log_lff = np.log(2.3) + 1.0 * (a * z_vat + b * (p["bmi_target"] - 27) / 4.3
                                   + np.sqrt(1 - a ** 2 - b ** 2) * rng.normal())
    p["liver_fat_fraction"] = float(np.clip(np.exp(log_lff), 0.3, 46.0)) / 100.0
    p["liver_size"] = float(np.clip(rng.normal(1.0, 0.08), 0.7, 1.3))
    p["kidney_size"] = float(np.clip(rng.normal(1.0, 0.08), 0.7, 1.3))
    p["heart_size"] = float(np.clip(rng.normal(1.0, 0.07), 0.75, 1.3))
    # muscularity of the regions (relative to the solved lean width factor)
    for region in ("trunk", "legs", "arms"):
        p[f"lean_{region}"] = float(np.clip(rng.normal(1.0, 0.035), 0.85, 1.15))
    # left/right asymmetry of thigh muscle (+: left larger), occasional strong atrophy
    p["thigh_asym"] = float(check_population_value("thigh_asymmetry", thigh_asymmetry) * rng.normal(0.0, 1.0))
    p["atrophy_side"] = 0.0
    p["atrophy_factor"] = 1.0
    if rng.random() < 0.03:
        p["atrophy_side"] = float(rng.choice([-1.0, 1.0]))  # -1 right, +1 left
        p["atrophy_factor"] = float(rng.uniform(0.65, 0.88))
    p["arm_asym"] = float(rng.normal(0.02, 0.03))          # right arm slightly larger
    # positioning: top of the FOV near the chin, jitter of the patient on the table
    p["fov_top_rel"] = float(rng.normal(0.872, 0.006))
    p["shift_u"] = float(rng.normal(0.0, 6.0))
    # solved below
    p["lean_width"] = 1.0
    p["fat_thickness"] = 20.0
    solve_body(p)
    # liver shape and position, drawn last so that every earlier draw (and every field but the
    # label counts around the liver) stays what it was: the half-axes vary independently
    # (SD 12 %, so the liver is sometimes long and flat, sometimes round) and the centre moves
    # by SD 9 mm left-right, 7 mm anterior-posterior and 14 mm up-down (breathing, habitus):
    # enough that no single template overlaps every subject's liver well (docs/liver.md)
    for axis in ("u", "v", "h"):
        p[f"liver_aspect_{axis}"] = float(np.clip(rng.normal(1.0, 0.12), 0.7, 1.35))
    for axis, sd in (("u", 9.0), ("v", 7.0), ("h", 14.0)):
        p[f"liver_shift_{axis}"] = float(np.clip(rng.normal(0.0, sd), -2.5 * sd, 2.5 * sd))
    return p


# ---------------------------------------------------------------------------------------------
# body model


class Body:
    """Cross-section functions of one subject's body (all lengths mm, ``h`` in mm above floor)."""

    def __init__(self, p: dict[str, float]):
        self.p = p
        self.H = p["height_mm"]
        self.sex = int(p["sex"])
        self.g = p["lean_width"]
        self.f = p["fat_thickness"]
        self.h_top = p["fov_top_rel"] * self.H          # FOV top (mm above floor)
        self.h_bottom = self.h_top - FOV_HEIGHT_MM
        self.v_bed = UKB_INPLANE[1] * UKB_SPACING[1] / 2 - BED_MM
        self.su = p.get("shift_u", 0.0)
        self._cache: dict = {}
        # landmarks
        H = self.H
        self.h_crotch = 0.47 * H
        self.h_femhead = 0.515 * H + 22.0 * np.sqrt(self.g)   # top of the femoral heads
        self.h_crest = 0.59 * H                                 # iliac crest
        self.h_t9 = 0.705 * H                                   # top of T9
        self.h_diaphragm = 0.70 * H
        self.h_shoulder = 0.815 * H
        self.h_neckcut = 0.87 * H
        self.h_knee = 0.285 * H

    # -- trunk ---------------------------------------------------------------------------
    def _prof(self, knots, values, h):
        return np.interp(np.asarray(h, dtype=np.float64) / self.H, knots, values)

    def trunk(self, h: np.ndarray) -> dict[str, np.ndarray]:
        """Trunk cross-sections at heights ``h``: outline, core and cavity ellipses.

        Returns arrays (same shape as ``h``): ``a_out, b_out, v_out`` (outline half-width,
        half-depth, centre v), ``a_core, b_core, v_core``, ``a_cav, b_cav, v_cav`` and
        ``m`` (muscle wall thickness).
        """
        s = self.sex
        lw = self.g * self.p["lean_trunk"]
        a_core = self._prof(_TRUNK_R, _TRUNK_A[s], h) * self.H * lw
        b_core = self._prof(_TRUNK_R, _TRUNK_B[s], h) * self.H * lw
        t = self._prof(_TRUNK_R, _SAT_T[s], h) * self.f
        m = np.minimum(0.011 * self.H * lw, 0.45 * b_core)
        b_out = b_core + t
        v_out = self.v_bed - b_out
        v_core = v_out - 0.3 * t
        return dict(a_out=a_core + t, b_out=b_out, v_out=v_out, a_core=a_core, b_core=b_core,
                    v_core=v_core, a_cav=a_core - m, b_cav=b_core - 1.3 * m, v_cav=v_core - 0.3 * m,
                    m=m)

    def vat_share(self, h: np.ndarray) -> np.ndarray:
        """Fraction of the abdominal cavity's cross-section that is VAT at heights ``h``."""
        return np.clip(self.p["visceral_fatness"] * self._prof(_VAT_R, _VAT_P, h), 0.0, 0.85)

    # -- limbs ----------------------------------------------------------------------------
    def leg(self, h: np.ndarray, side: int) -> dict[str, np.ndarray]:
        """One leg (side -1 right, +1 left): muscle radius ``rm``, outline radius ``ro``, centre."""
        p = self.p
        fac = self.g * p["lean_legs"] * (1.0 + side * p["thigh_asym"] / 2)
        if p["atrophy_side"] == side:
            fac *= np.sqrt(p["atrophy_factor"])
        rm = self._prof(_LEG_R, _LEG_M, h) * self.H * fac
        fat = self.f * (1.0 if self.sex else 1.35)
        t = self._prof(_LEG_R, _LEG_T, h) * fat
        ro = rm + t
        if "leg" not in self._cache:
            hip = self.trunk(np.array([0.50 * self.H]))
            knee_ro = float(np.interp(0.285, _LEG_R, _LEG_M) * self.H * self.g
                            + np.interp(0.285, _LEG_R, _LEG_T) * fat)
            # the thighs stay inside the hip outline where they join the trunk
            a_hip = float(hip["a_out"][0])
            ro_top = float(np.interp(0.50, _LEG_R, _LEG_M) * self.H * self.g
                           + np.interp(0.50, _LEG_R, _LEG_T) * fat)
            u_top = float(np.clip(0.98 * a_hip - ro_top, 0.35 * a_hip, 0.55 * a_hip))
            self._cache["leg"] = (u_top, knee_ro + 12.0)
        u_top, u_knee = self._cache["leg"]
        r = np.asarray(h, dtype=np.float64) / self.H
        uc = np.interp(r, [0.285, 0.53], [u_knee, max(u_top, u_knee)])
        return dict(rm=rm, ro=ro, u=side * uc + self.su, v=self.v_bed - ro * 1.05)

    def arm(self, h: np.ndarray, side: int) -> dict[str, np.ndarray]:
        """One arm (side -1 right, +1 left) hanging at the side: radii and centre."""
        p = self.p
        fac = self.g * p["lean_arms"] * (1.0 - side * p["arm_asym"] / 2)
        rm = self._prof(_ARM_R, _ARM_M, h) * self.H * fac
        t = self._prof(_ARM_R, _ARM_T, h) * self.f * (1.0 if self.sex else 1.4)
        ro = rm + t
        uc = self._arm_offset(side)
        return dict(rm=rm, ro=ro, u=np.full_like(rm, side * uc) + self.su, v=self.v_bed - ro)

    def _arm_offset(self, side: int) -> float:
        """Distance (mm) of an arm's axis from the midline: beside the widest trunk outline."""
        if side not in self._cache:
            hh = np.linspace(0.47 * self.H, 0.80 * self.H, 34)
            widest = float(self.trunk(hh)["a_out"].max())
            fac = self.g * self.p["lean_arms"] * (1.0 - side * self.p["arm_asym"] / 2)
            ro_max = (_ARM_M.max() * self.H * fac
                      + _ARM_T.max() * self.f * (1.0 if self.sex else 1.4))
            # in the bore the arms rest against the body; the FOV edge cuts the outer part of
            # the arm of a wide subject, but the inner part stays in view
            fov_half = UKB_INPLANE[0] * UKB_SPACING[0] / 2
            self._cache[side] = min(widest + 0.8 * ro_max + 4.0, fov_half - 0.2 * ro_max)
        return self._cache[side]

    # -- organs (ellipsoids: centre u, v, h; radii) ---------------------------------------
    def organs(self) -> dict[str, tuple[float, float, float, float, float, float]]:
        """Ellipsoid organs and bones: name -> (u, v, h, ru, rv, rh) in mm."""
        H, p, su = self.H, self.p, self.su
        wscale = (p["weight_target"] / 75.0) ** (1 / 3)
        ls = p["liver_size"] * wscale * (1 + 0.8 * p["liver_fat_fraction"])
        hl = 0.665 * H
        tl = self.trunk(np.array([hl]))
        lp = p.get
        liver = (-0.42 * tl["a_cav"][0] + su + lp("liver_shift_u", 0.0),
                 tl["v_cav"][0] - 0.05 * tl["b_cav"][0] + lp("liver_shift_v", 0.0),
                 hl + lp("liver_shift_h", 0.0),
                 80 * ls * lp("liver_aspect_u", 1.0), 68 * ls * lp("liver_aspect_v", 1.0),
                 62 * ls * lp("liver_aspect_h", 1.0))
        hk = 0.635 * H
        tk = self.trunk(np.array([hk]))
        ks = p["kidney_size"] * wscale
        kid_u = 0.45 * tk["a_cav"][0]
        kid_v = tk["v_cav"][0] + 0.55 * tk["b_cav"][0]
        kid_r = (30 * ks, 25 * ks, 52 * ks)
        hh = 0.735 * H
        th = self.trunk(np.array([hh]))
        hs = p["heart_size"] * wscale
        heart = (0.22 * th["a_cav"][0] + su, th["v_cav"][0] - 0.25 * th["b_cav"][0], hh,
                 56 * hs, 46 * hs, 52 * hs)
        peri = 4.0 + 6.0 * p["visceral_fatness"] / 0.3
        hp = 0.57 * H
        tp = self.trunk(np.array([hp]))
        g = np.sqrt(self.g)
        return {
            "liver": liver,
            "kidney_right": (-kid_u + su, kid_v, hk - 10, *kid_r),
            "kidney_left": (kid_u + su, kid_v, hk + 5, *kid_r),
            "pericardial_fat": (heart[0], heart[1], heart[2], heart[3] + peri, heart[4] + peri,
                                heart[5] + peri),
            "heart": heart,
            "ilium_right": (-0.62 * tp["a_core"][0] + su, tp["v_core"][0] + 0.25 * tp["b_core"][0],
                            self.h_crest - 45 * g, 30 * g, 16 * g, 45 * g),
            "ilium_left": (0.62 * tp["a_core"][0] + su, tp["v_core"][0] + 0.25 * tp["b_core"][0],
                           self.h_crest - 45 * g, 30 * g, 16 * g, 45 * g),
        }

    def spine(self, h: np.ndarray) -> dict[str, np.ndarray]:
        """Vertebral column: a tube at the posterior edge of the cavity (radius ~17 mm)."""
        t = self.trunk(h)
        r = np.full_like(t["m"], 17.0 * np.sqrt(self.g))
        return dict(u=np.full_like(r, self.su), v=t["v_cav"] + t["b_cav"] + 0.6 * r, a=r, b=r)


def solve_body(p: dict[str, float], iterations: int = 6) -> None:
    """Set ``lean_width`` and ``fat_thickness`` so the body's analytic masses match the targets.

    Targets are the weight (BMI × height²) and the body-fat share; the analytic model integrates
    cross-section areas along ``h`` (see :func:`analytic_masses`). Modifies ``p`` in place.
    """
    # the analytic model leaves out bones, organs and the feet (about MASS_OFFSET_KG)
    w_t = p["weight_target"] - MASS_OFFSET_KG
    fm_t = p["body_fat_target"] * p["weight_target"]
    for _ in range(iterations):
        m = analytic_masses(p)
        lean = m["total"] - m["lipid"]
        p["lean_width"] = float(np.clip(p["lean_width"] * np.sqrt((w_t - fm_t) / lean), 0.6, 1.6))
        ratio = fm_t / max(m["lipid"], 1e-3)
        p["fat_thickness"] = float(np.clip(p["fat_thickness"] * ratio ** 0.9, 1.5, 120.0))


def _ellipse_area(a, b):
    return np.pi * np.clip(a, 0, None) * np.clip(b, 0, None)


def analytic_masses(p: dict[str, float], h_lo: float = 0.0, h_hi: float | None = None,
                    include_arms: bool = True, include_head: bool = True) -> dict[str, float]:
    """Approximate tissue masses (kg) of the body between heights ``h_lo`` and ``h_hi`` (mm).

    Integrates the cross-section areas of trunk and legs (1-D, 2 mm steps); arms and the head are
    added whole when asked. Returns ``total``, ``lipid``, ``lean``, ``bone`` (kg).
    """
    b = Body(p)
    H = b.H
    h_hi = H if h_hi is None else h_hi
    dh = 5.0
    h = np.arange(h_lo + dh / 2, h_hi, dh)
    lipid = lean = bone = 0.0
    # trunk from the crotch up to the chin
    ht = h[(h >= b.h_crotch) & (h < b.h_neckcut)]
    if ht.size:
        t = b.trunk(ht)
        sat = _ellipse_area(t["a_out"], t["b_out"]) - _ellipse_area(t["a_core"], t["b_core"])
        wall = _ellipse_area(t["a_core"], t["b_core"]) - _ellipse_area(t["a_cav"], t["b_cav"])
        cav = _ellipse_area(t["a_cav"], t["b_cav"])
        abdo = (ht >= 0.49 * H) & (ht < b.h_diaphragm)
        thor = (ht >= b.h_diaphragm) & (ht < b.h_shoulder)
        vat = np.where(abdo, b.vat_share(ht) * cav, 0.0)
        visc = np.where(abdo, cav - vat, 0.0) + np.where(~abdo & ~thor, cav, 0.0)
        lung = np.where(thor, cav, 0.0)
        adip = (sat + vat).sum() * dh / 1e6
        mff = p["muscle_fat_fraction"]
        lipid += adip * ADIPOSE[0] * 1e3 / 1e3 + wall.sum() * dh / 1e6 * 1.06 * mff
        lean += (adip * ADIPOSE[1] + wall.sum() * dh / 1e6 * 1.06 * (1 - mff)
                 + visc.sum() * dh / 1e6 * 1.02 + lung.sum() * dh / 1e6 * 0.45)
    # legs
    hl = h[h < 0.53 * H]
    if hl.size:
        for side in (-1, 1):
            lg = b.leg(hl, side)
            musc = _ellipse_area(lg["rm"], lg["rm"] * 1.05)
            fat = _ellipse_area(lg["ro"], lg["ro"] * 1.05) - musc
            # the upper thigh overlaps the trunk: count only below the crotch
            w = np.where(hl < b.h_crotch, 1.0, 0.0)
            lipid += ((fat * w).sum() * ADIPOSE[0] + (musc * w).sum() * 1.06 * p["muscle_fat_fraction"]) * dh / 1e6
            lean += ((fat * w).sum() * ADIPOSE[1] + (musc * w).sum() * 1.06 * (1 - p["muscle_fat_fraction"])) * dh / 1e6
    if include_arms:
        for side in (-1, 1):
            a = arm_masses(p, side)
            lipid += a["lipid"]
            lean += a["lean"]
            bone += a["bone"]
    if include_head:
        hd = head_masses(p)
        lipid += hd["lipid"]
        lean += hd["lean"]
        bone += hd["bone"]
    return dict(total=lipid + lean + bone, lipid=lipid, lean=lean, bone=bone)


def arm_masses(p: dict[str, float], side: int) -> dict[str, float]:
    """Whole-arm masses (kg) from the arm tube: lipid, lean, bone mineral (side -1 right, +1 left)."""
    b = Body(p)
    dh = 5.0
    h = np.arange(0.38 * b.H + dh / 2, b.h_shoulder, dh)
    a = b.arm(h, side)
    musc = _ellipse_area(a["rm"], a["rm"]).sum() * dh / 1e6
    fat = (_ellipse_area(a["ro"], a["ro"]).sum() * dh / 1e6) - musc
    mff = p["muscle_fat_fraction"]
    bone = 0.045 * musc * 1.06
    return dict(lipid=fat * ADIPOSE[0] + musc * 1.06 * mff * 0.7,
                lean=fat * ADIPOSE[1] + musc * 1.06 * (1 - mff * 0.7) - bone, bone=bone)


def head_masses(p: dict[str, float]) -> dict[str, float]:
    """Head and the neck above the chin line (kg): lipid, lean, bone mineral."""
    s = p["height_mm"] / 1750.0
    male = p["sex"]
    lean = (3.5 + 0.4 * male) * s ** 1.5 * p["lean_width"] ** 0.5
    lipid = 0.25 + 0.006 * p["fat_thickness"]
    bone = (0.50 + 0.08 * male) * s
    return dict(lipid=lipid, lean=lean, bone=bone)


def below_fov_legs(p: dict[str, float]) -> dict[str, dict[str, float]]:
    """Leg tissue below the FOV (lower legs and feet) per side, in kg: side -> lipid/lean/bone."""
    b = Body(p)
    dh = 2.0
    out: dict[str, dict[str, float]] = {}
    h = np.arange(0.04 * b.H + dh / 2, max(b.h_bottom, 0.04 * b.H + dh), dh)
    mff = p["muscle_fat_fraction"]
    for side, name in ((-1, "right"), (1, "left")):
        lg = b.leg(h, side)
        musc = _ellipse_area(lg["rm"], lg["rm"] * 1.05).sum() * dh / 1e6
        fat = _ellipse_area(lg["ro"], lg["ro"] * 1.05).sum() * dh / 1e6 - musc
        bone_vol = (np.pi * (15.0 * np.sqrt(b.g)) ** 2 * h.size * dh) / 1e6
        foot = 0.9 * b.H / 1750.0
        out[name] = dict(lipid=fat * ADIPOSE[0] + musc * 1.06 * mff + 0.08 * foot,
                         lean=fat * ADIPOSE[1] + musc * 1.06 * (1 - mff) + bone_vol * BONE[1]
                         + 0.78 * foot,
                         bone=bone_vol * BONE[2] + 0.07 * foot)
    return out


# ---------------------------------------------------------------------------------------------
# rasterisation


def _krange(w: np.ndarray, lo: float, hi: float) -> slice:
    """Slice of the ascending coordinate array ``w`` with lo <= w < hi."""
    return slice(int(np.searchsorted(w, lo, "left")), int(np.searchsorted(w, hi, "left")))


def _lut(labels) -> np.ndarray:
    lut = np.zeros(256, dtype=bool)
    lut[list(labels)] = True
    return lut


def _paint_tube(lab, u, v, w, h_of_w, ks, cu, cv, a, b, label, within=None, extra=None):
    """Paint an elliptic tube on slices ``ks`` (cu, cv, a, b: arrays over those slices)."""
    if ks.stop <= ks.start:
        return
    ok = (a > 0) & (b > 0)
    if not ok.any():
        return
    lo_u, hi_u = np.min((cu - a)[ok]), np.max((cu + a)[ok])
    lo_v, hi_v = np.min((cv - b)[ok]), np.max((cv + b)[ok])
    iu = _krange(u, lo_u, hi_u + 1e-9)
    iv = _krange(v, lo_v, hi_v + 1e-9)
    if iu.stop <= iu.start or iv.stop <= iv.start:
        return
    a = np.where(ok, a, 1e-9)
    b = np.where(ok, b, 1e-9)
    du = (u[iu, None, None] - cu[None, None, :]) / a[None, None, :]
    dv = (v[None, iv, None] - cv[None, None, :]) / b[None, None, :]
    mask = du * du + dv * dv <= 1.0
    if extra is not None:
        mask &= extra(u[iu, None, None], v[None, iv, None], cu[None, None, :], cv[None, None, :])
    sub = lab[iu, iv, ks]
    if within is not None:
        mask &= _lut(within)[sub]
    sub[mask] = label


def _paint_ellipsoid(lab, u, v, w, to_w, e, label, within=None):
    cu, cv, ch, ru, rv, rh = e
    cw = to_w(ch)
    iu = _krange(u, cu - ru, cu + ru)
    iv = _krange(v, cv - rv, cv + rv)
    iw = _krange(w, cw - rh, cw + rh)
    if min(iu.stop - iu.start, iv.stop - iv.start, iw.stop - iw.start) <= 0:
        return
    d = (((u[iu, None, None] - cu) / ru) ** 2 + ((v[None, iv, None] - cv) / rv) ** 2
         + ((w[None, None, iw] - cw) / rh) ** 2)
    mask = d <= 1.0
    sub = lab[iu, iv, iw]
    if within is not None:
        mask &= _lut(within)[sub]
    sub[mask] = label


def _anterior(uu, vv, cu, cv):
    return vv < cv


def _posterior(uu, vv, cu, cv):
    return vv >= cv


def rasterise(p: dict[str, float], grid: Grid) -> np.ndarray:
    """Tissue labels of the subject on ``grid`` (voxel centres), LPS index order.

    Parameters
    ----------
    p : subject parameters from :func:`draw_parameters`.
    grid : target grid; its ``w`` coordinate is height above the FOV bottom (mm).

    Returns
    -------
    (nx, ny, nz) uint8 array of :data:`LABELS`.
    """
    body = Body(p)
    u, v, w = grid.axes()
    h_of_w = w + body.h_bottom
    lab = np.zeros(grid.shape, dtype=np.uint8)
    H = body.H

    def to_w(h):
        return h - body.h_bottom

    def ks_for(h_lo, h_hi):
        return _krange(w, to_w(h_lo), to_w(h_hi))

    # trunk: outline (SAT), core (muscle), cavity contents
    ks = ks_for(body.h_crotch, np.inf)
    if ks.stop > ks.start:
        hh = h_of_w[ks]
        t = body.trunk(hh)
        cu = np.full_like(hh, body.su)
        _paint_tube(lab, u, v, w, h_of_w, ks, cu, t["v_out"], t["a_out"], t["b_out"], L["sat"])
        _paint_tube(lab, u, v, w, h_of_w, ks, cu, t["v_core"], t["a_core"], t["b_core"], L["muscle"])
        for lo, hi, name in ((0.49 * H, body.h_diaphragm, "vat"),
                             (body.h_diaphragm, body.h_shoulder, "lungs"),
                             (body.h_crotch, 0.49 * H, "viscera"),
                             (body.h_shoulder, np.inf, "viscera")):
            kk = ks_for(lo, hi)
            if kk.stop > kk.start:
                tt = body.trunk(h_of_w[kk])
                _paint_tube(lab, u, v, w, h_of_w, kk, np.full(kk.stop - kk.start, body.su),
                            tt["v_cav"], tt["a_cav"], tt["b_cav"], L[name])
        # lean viscera inside the abdominal cavity; VAT is what remains (more anterior)
        kk = ks_for(0.49 * H, body.h_diaphragm)
        if kk.stop > kk.start:
            hv = h_of_w[kk]
            tt = body.trunk(hv)
            q = np.sqrt(1.0 - body.vat_share(hv))
            bv = tt["b_cav"] * q
            _paint_tube(lab, u, v, w, h_of_w, kk, np.full_like(hv, body.su),
                        tt["v_cav"] + 0.6 * (tt["b_cav"] - bv), tt["a_cav"] * q, bv,
                        L["viscera"], within=[L["vat"]])
    org = body.organs()
    cavity = [L["vat"], L["viscera"], L["lungs"]]
    _paint_ellipsoid(lab, u, v, w, to_w, org["pericardial_fat"], L["vat"], within=[L["lungs"]])
    _paint_ellipsoid(lab, u, v, w, to_w, org["heart"], L["heart"], within=cavity)
    _paint_ellipsoid(lab, u, v, w, to_w, org["liver"], L["liver"], within=cavity)
    for k in ("kidney_right", "kidney_left"):
        _paint_ellipsoid(lab, u, v, w, to_w, org[k], L["kidneys"],
                         within=[L["vat"], L["viscera"], L["muscle"]])
    # legs: outline (SAT where empty), thigh compartments / calf muscle, femur, knee, tibia
    ks = ks_for(0.0, 0.53 * H)
    if ks.stop > ks.start:
        hh = h_of_w[ks]
        thigh = hh >= body.h_knee
        for side in (-1, 1):
            lg = body.leg(hh, side)
            _paint_tube(lab, u, v, w, h_of_w, ks, lg["u"], lg["v"], lg["ro"], lg["ro"] * 1.05,
                        L["sat"], within=[L["background"]])
            vm = lg["v"] - 0.05 * (lg["ro"] - lg["rm"])
            if thigh.any():
                kt = slice(ks.start + int(np.argmax(thigh)), ks.stop)
                sel = slice(int(np.argmax(thigh)), None)
                names = (("thigh_anterior_right", "thigh_posterior_right") if side < 0
                         else ("thigh_anterior_left", "thigh_posterior_left"))
                for name, extra in zip(names, (_anterior, _posterior)):
                    _paint_tube(lab, u, v, w, h_of_w, kt, lg["u"][sel], vm[sel], lg["rm"][sel],
                                lg["rm"][sel] * 1.05, L[name], within=[L["background"], L["sat"]],
                                extra=extra)
            if (~thigh).any():
                kc = slice(ks.start, ks.start + int((~thigh).sum()))
                sel = slice(0, int((~thigh).sum()))
                _paint_tube(lab, u, v, w, h_of_w, kc, lg["u"][sel], vm[sel], lg["rm"][sel],
                            lg["rm"][sel] * 1.05, L["muscle"], within=[L["background"], L["sat"]])
            rb = np.where(thigh, 13.0, 15.0) * np.sqrt(body.g) * np.ones_like(hh)
            fem = hh < 0.51 * H
            if fem.any():
                kb = slice(ks.start, ks.start + int(fem.sum()))
                _paint_tube(lab, u, v, w, h_of_w, kb, lg["u"][fem], vm[fem] - 0.1 * lg["rm"][fem],
                            rb[fem], rb[fem], L["bone"])
            kn = (float(np.interp(body.h_knee, hh, lg["u"])) if hh.size else side * 80.0)
            kv = float(np.interp(body.h_knee, hh, vm)) if hh.size else 0.0
            gk = np.sqrt(body.g)
            _paint_ellipsoid(lab, u, v, w, to_w, (kn, kv, body.h_knee + 10, 40 * gk, 32 * gk, 30 * gk),
                             L["bone"])
    # spine, pelvis and femoral heads
    ks = ks_for(0.50 * H, np.inf)
    if ks.stop > ks.start:
        sp = body.spine(h_of_w[ks])
        _paint_tube(lab, u, v, w, h_of_w, ks, sp["u"], sp["v"], sp["a"], sp["b"], L["bone"])
    for k in ("ilium_right", "ilium_left"):
        _paint_ellipsoid(lab, u, v, w, to_w, org[k], L["bone"],
                         within=[L["muscle"], L["vat"], L["viscera"], L["sat"]])
    for side in (-1, 1):
        lg = body.leg(np.array([0.5 * H]), side)
        r = 22.0 * np.sqrt(body.g)
        _paint_ellipsoid(lab, u, v, w, to_w,
                         (float(lg["u"][0]) * 0.95, float(lg["v"][0]), body.h_femhead - r, r, r, r),
                         L["bone"])
    # arms at the sides (often reaching the edge of the FOV)
    ks = ks_for(0.38 * H, body.h_shoulder)
    if ks.stop > ks.start:
        hh = h_of_w[ks]
        for side in (-1, 1):
            a = body.arm(hh, side)
            _paint_tube(lab, u, v, w, h_of_w, ks, a["u"], a["v"], a["ro"], a["ro"], L["arm_fat"],
                        within=[L["background"]])
            _paint_tube(lab, u, v, w, h_of_w, ks, a["u"], a["v"], a["rm"], a["rm"], L["arm_lean"],
                        within=[L["arm_fat"]])
    return lab
