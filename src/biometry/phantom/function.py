"""Functional measures of the thigh-function study and the external cohort's protocol.

The ISMRM thigh abstract classifies muscle *function* as high or low from axial mid-thigh slices.
The phantom gives every subject three functional measures, driven by the true thigh muscle volume
(field 22409, measured from the label volume), sex and age, with noise:

* ``leg_strength`` (kg, isometric knee extension): strongly driven by thigh muscle
  (r about 0.85 over the cohort, about 0.75 within a sex);
* ``walking_speed`` (m/s, usual pace over 4 m): weakly (r about 0.25);
* ``chair_stand_time`` (s, five stands): weakly and inversely (r about -0.25).

The *external cohort* (``protocol="external"``) imitates a handful of volunteers scanned with a
replicated protocol elsewhere: other noise level and tissue contrast (:data:`PROTOCOLS`), and no
functional measure, only a self-reported ``exercise`` label (regular exercise, yes = 1), a logistic
function of the subject's thigh muscle relative to their sex.

The draws use their own random stream (:func:`function_rng`), so the other fields of a subject are
those of a phantom without functional measures, value for value.
"""

from __future__ import annotations

import numpy as np

#: study-specific fields (catalogue group ``function``); their fields.csv column is the key
FUNCTION_FIELDS: tuple[str, ...] = ("leg_strength", "walking_speed", "chair_stand_time", "exercise")

#: acquisition protocols: noise relative to the UKB protocol, and the water signal of muscle and
#: the fat signal of adipose tissue relative to theirs (other sequence parameters, other contrast)
PROTOCOLS: dict[str, dict[str, float]] = {
    "ukb": {"noise": 1.0, "muscle_water": 1.0, "adipose_fat": 1.0},
    "external": {"noise": 2.5, "muscle_water": 0.85, "adipose_fat": 1.1},
}

#: share of subjects with each measure (main cohort); the external cohort has only ``exercise``
AVAILABILITY = {"leg_strength": 0.97, "walking_speed": 0.95, "chair_stand_time": 0.93}

#: cohort reference of thigh muscle volume (L): overall mean, and mean and SD within each sex
_V_MEAN = 7.2
_V_SEX = {0: (5.8, 1.1), 1: (8.5, 1.4)}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    return protocol


def function_rng(seed: int) -> np.random.Generator:
    """The subject's stream for functional measures, independent of its other streams."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0xF0,)))


def functional_measures(p: dict[str, float], thigh_muscle_l: float,
                        rng: np.random.Generator) -> dict[str, float]:
    """The functional measures of one subject (see the module docstring).

    Parameters
    ----------
    p : subject parameters (``sex``, ``age``, ``bmi_target`` are used).
    thigh_muscle_l : total thigh muscle volume (L), field 22409.
    rng : :func:`function_rng` of the subject.

    Returns
    -------
    key -> value: leg_strength (kg), walking_speed (m/s), chair_stand_time (s), exercise (0/1).
    """
    male = int(p["sex"])
    age = p["age"] - 64.0
    dv = thigh_muscle_l - _V_MEAN
    strength = 40.0 + 6.0 * dv - 0.4 * age + 3.0 * male + rng.normal(0.0, 5.0)
    speed = 1.30 + 0.025 * dv - 0.008 * age + 0.002 * (p["bmi_target"] - 27) + rng.normal(0.0, 0.17)
    stands = 11.5 - 0.35 * dv + 0.09 * age + 0.05 * (p["bmi_target"] - 27) + rng.normal(0.0, 2.2)
    mean, sd = _V_SEX[male]
    z = (thigh_muscle_l - mean) / sd
    exercise = int(rng.random() < 1.0 / (1.0 + np.exp(-(2.0 * z - 0.02 * age))))
    return {"leg_strength": float(np.round(max(strength, 5.0), 1)),
            "walking_speed": float(np.round(np.clip(speed, 0.3, 2.5), 2)),
            "chair_stand_time": float(np.round(np.clip(stands, 5.0, 40.0), 1)),
            "exercise": exercise}


def functional_availability(rng: np.random.Generator, protocol: str = "ukb") -> dict[str, bool]:
    """Which functional measures a subject has: the main cohort has no ``exercise`` label, the
    external cohort only that."""
    check_protocol(protocol)
    draws = {k: bool(rng.random() < pf) for k, pf in AVAILABILITY.items()}
    if protocol == "external":
        return {**{k: False for k in AVAILABILITY}, "exercise": True}
    return {**draws, "exercise": False}
