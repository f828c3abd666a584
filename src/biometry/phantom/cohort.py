"""One phantom subject in memory, and the field tables of a cohort without any images.

Each subject is fully determined by ``(eid, seed, scale)``; a cohort derives the subject seeds
from ``(cohort seed, subject index)`` with :class:`numpy.random.SeedSequence`, so the number of
workers never changes a result. Within a subject, independent child streams draw the parameters,
the measurement errors, the availability, the artefacts and the image signal, so the field values
do not depend on how (or whether) the images are made.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from biometry.config.population import population as population_options
from biometry.data.types import Station, Volume
from biometry.phantom import anatomy, function, measure, signal
from biometry.phantom.anatomy import FOV_HEIGHT_MM, Grid

#: version of the generator's model; a cohort records it in ``cohort.json``
PHANTOM_VERSION = "2"  # 2: liver shape/position vary; planted reference outliers in truth
#: the table position puts the FOV centre at world z = 0
W_ISO = FOV_HEIGHT_MM / 2


@dataclass
class Subject:
    """One phantom subject.

    Attributes
    ----------
    eid : 7-digit subject id.
    scale : resolution factor (1 = UKB grid).
    stations : six :class:`~biometry.data.types.Station` (1 = neck .. 6 = knees); arrays in LAS
        voxel order (x right→left, y posterior→anterior, z inferior→superior) as a converter
        writes them, each with its own affine; empty when made with ``stations=False``.
    labels : (X, Y, Z) uint8 tissue labels on the fused grid, LPS index order
        (:data:`biometry.phantom.LABELS`).
    labels_affine : 4x4 voxel → RAS+ (mm) affine of ``labels``.
    params : true latent parameters (flat dict of floats).
    fields : every catalogue field without missingness, key → value in UKB native units
        (``"102#1"``: the second pulse reading; ``"53"``: ISO date).
    available : key → whether the field is released (missingness of ``fields.csv``).
    truth : error-free quantities behind the fields (body mass, DXA regions, atlas slices).
    qc : artefacts of the images: dicts with ``flag`` and geometry.
    """

    eid: str
    scale: float
    stations: list[Station]
    labels: np.ndarray
    labels_affine: np.ndarray
    params: dict[str, float]
    fields: dict[str, object]
    available: dict[str, bool]
    truth: dict[str, float]
    qc: list[dict] = field(default_factory=list)

    @property
    def grid(self) -> Grid:
        return anatomy.fused_grid(self.scale)


def subject_seed(cohort_seed: int, index: int, release: int = 1) -> int:
    """The seed of subject ``index`` of a cohort (64-bit int from a SeedSequence).

    ``release`` > 1 (a later release, :func:`cohort_eids`) draws its subjects from another stream,
    so that a later release with the cohort seed of the first one holds new people.
    """
    entropy = [int(cohort_seed), int(index)] + ([int(release)] if release != 1 else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def external_subject_seed(cohort_seed: int, index: int) -> int:
    """The seed of subject ``index`` of an external cohort (never that of a main-cohort subject)."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index), 0xE7]).generate_state(
        1, dtype=np.uint64)[0])


def external_eids(n: int, seed: int) -> list[str]:
    """``n`` distinct 8-digit volunteer ids starting with 9: never equal to a 7-digit UKB eid."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xE7]))
    picks = rng.choice(10_000_000, size=n, replace=False)
    return [str(90_000_000 + int(k)) for k in picks]


def cohort_eids(n: int, seed: int, release: int = 1, exclude: Collection[str] = ()) -> list[str]:
    """``n`` distinct 7-digit eids; the first ``k`` of ``n`` are those of a cohort of ``k``.

    ``release`` > 1 draws from another stream, and ``exclude`` (the eids of the earlier releases)
    are never drawn: a later release is disjoint from them by construction, like a UKB release
    that brings new participants.
    """
    if release < 1:
        raise ValueError(f"release must be >= 1, got {release}")
    entropy = [int(seed), 0xE1D] + ([int(release)] if release != 1 else [])
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    out: list[str] = []
    seen: set[str] = {str(e) for e in exclude}
    while len(out) < n:
        e = str(int(rng.integers(1_000_000, 10_000_000)))
        if e not in seen:
            seen.add(e)
            out.append(e)
    return out


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("params", "fields", "available", "artefacts", "signal")
    kids = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.default_rng(k) for n, k in zip(names, kids)}


def station_affine_las(grid: Grid) -> np.ndarray:
    """Affine of a station array stored in LAS order (the LPS grid with the y axis reversed)."""
    aff = anatomy.ras_affine(grid, W_ISO)
    flipped = aff.copy()
    flipped[:3, 3] = aff[:3, 3] + aff[:3, 1] * (grid.shape[1] - 1)
    flipped[:3, 1] = -aff[:3, 1]
    return flipped


def make_subject(eid: str, seed: int, scale: float = 1.0, stations: bool = True,
                 protocol: str = "ukb", **population: float) -> Subject:
    """Make one subject: parameters, labels, fields and (optionally) the six stations.

    Parameters
    ----------
    eid : subject id (stored; it does not change the anatomy).
    seed : the subject's seed (:func:`subject_seed` within a cohort).
    scale : resolution factor in (0.1, 2]; in-plane voxels ``round(224*scale) x round(174*scale)``,
        spacings divided by ``scale``.
    stations : also synthesise the station images (the slow part).
    protocol : "ukb", or "external": the external cohort's noise and contrast, and only the
        ``exercise`` label among the functional measures (:mod:`biometry.phantom.function`).
    **population : the population's options by name (``thigh_asymmetry``,
        ``liver_fat_coupling``; :mod:`biometry.config.population`); defaults where not given.
    """
    scale = anatomy.check_scale(scale)
    function.check_protocol(protocol)
    rng = _streams(seed)
    p = anatomy.draw_parameters(rng["params"], **population_options(population))
    grid = anatomy.fused_grid(scale)
    labels = anatomy.rasterise(p, grid)
    values, truth = measure.measure_fields(p, labels, grid, rng["fields"])
    have = measure.availability(rng["available"])
    rng_function = function.function_rng(seed)
    values.update(function.functional_measures(p, float(values["22409"]), rng_function))
    have.update(function.functional_availability(rng_function, protocol))
    artefacts = signal.draw_artefacts(p, rng["artefacts"])
    st: list[Station] = []
    if stations:
        for k, sg in enumerate(anatomy.station_grids(scale), start=1):
            lab = anatomy.rasterise(p, sg)
            water, fat = signal.station_signal(p, lab, sg, k, rng["signal"], artefacts, protocol)
            st.append(Station(index=k, water=np.ascontiguousarray(water[:, ::-1, :]),
                              fat=np.ascontiguousarray(fat[:, ::-1, :]),
                              affine=station_affine_las(sg),
                              meta={"station": k, "slice_thickness_mm": sg.spacing[2],
                                    "series_description": "Dixon_noBH", "axcodes": "LAS"}))
    return Subject(eid=str(eid), scale=scale, stations=st, labels=labels,
                   labels_affine=anatomy.ras_affine(grid, W_ISO), params=p, fields=values,
                   available=have, truth=truth, qc=artefacts)


def fused_truth(subject: Subject) -> Volume:
    """The ideal fused water/fat volume on the label grid (no bias, noise or artefacts).

    Intensities are in the stations' nominal units (unit scale × 1000), LPS index order.
    """
    water, fat = signal.ideal_signal(subject.params, subject.labels)
    return Volume(water=water * np.float32(1000), fat=fat * np.float32(1000),
                  spacing=subject.grid.spacing, affine=subject.labels_affine.copy(),
                  eid=subject.eid, meta={"source": "phantom truth"})


def qc_rows(subject: Subject) -> list[dict[str, str]]:
    """Rows of ``qc.csv`` for a subject: eid, flag, detail."""
    rows = []
    for a in subject.qc:
        if a["flag"] == "water_fat_swap":
            detail = f"station {a['station']}"
        else:
            detail = (f"{a['side']} {a['where']}, radius {a['radius']:.0f} mm "
                      f"(stations covering height {a['h']:.0f} mm above floor)")
        rows.append({"eid": subject.eid, "flag": a["flag"], "detail": detail})
    return rows


def truth_row(subject: Subject) -> dict[str, object]:
    """One row of ``truth/parameters.csv``: demographics, latent parameters, every field value."""
    s = subject
    row: dict[str, object] = {"eid": s.eid, "sex": int(s.params["sex"]), "age": s.fields["age"],
                              "height_cm": s.params["height_mm"] / 10.0,
                              "weight_kg": s.fields["21002"]}
    row.update({k: v for k, v in s.params.items() if k not in ("sex", "age")})
    row.update({k.replace("#", "_reading"): v for k, v in s.fields.items()})
    row.update(s.truth)
    row["qc_flags"] = ";".join(a["flag"] for a in s.qc)
    return row


def observed_row(subject: Subject) -> dict[str, object]:
    """One row of ``fields.csv`` (UKB showcase columns with missingness)."""
    return measure.observed_row(subject.eid, subject.fields, subject.available)


def sample_fields(n: int, seed: int, scale: float = 0.15, **population: float
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Field tables of a cohort without writing or synthesising any station image.

    Uses the same eids, seeds and measurement code as :func:`biometry.phantom.generate_cohort`,
    so the tables equal that cohort's ``fields.csv`` and ``truth/parameters.csv`` at the same
    ``scale`` (MRI atlas and DXA values are measured on the label grid of that scale) and
    population options (``thigh_asymmetry``, ``liver_fat_coupling``).

    Returns
    -------
    observed : ``fields.csv`` rows (eid + UKB columns, NaN where missing).
    truth : ``truth/parameters.csv`` rows.
    """
    obs, tru = [], []
    for i, eid in enumerate(cohort_eids(n, seed)):
        s = make_subject(eid, subject_seed(seed, i), scale, stations=False, **population)
        obs.append(observed_row(s))
        tru.append(truth_row(s))
    return tidy_observed(pd.DataFrame(obs)), pd.DataFrame(tru)


def tidy_observed(df: pd.DataFrame) -> pd.DataFrame:
    """Integer-valued columns as nullable integers (UKB style: ``1`` rather than ``1.0``)."""
    df = df.copy()
    df["eid"] = df["eid"].astype(str)
    for c in df.columns:
        if c == "eid" or not pd.api.types.is_numeric_dtype(df[c]):
            continue
        vals = df[c].dropna()
        if len(vals) and np.all(np.mod(vals.to_numpy(dtype=float), 1) == 0) and c.split("-")[0] in (
                "31", "34", "52", "2443", "47", "48", "49", "102"):
            df[c] = df[c].astype("Int64")
    return df
