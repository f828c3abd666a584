"""The phantom population's options (docs/phantom.md, "Population options").

Each option is a number with a UKB-like default that changes how the phantom's subjects vary,
never the random stream: a cohort drawn with another value has the same subjects in every other
respect. A study's ``data:`` block, ``biometry synth`` and
:func:`biometry.phantom.generate_cohort` take them by name; only values other than the default
are recorded in a cohort's ``cohort.json``, so a default cohort stays what it was. The table lives
in ``config`` so that a study's YAML is checked when it is loaded, and the phantom draws from the
same table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PopulationOption:
    """One option: its UKB-like default, its range (inclusive) and what it means."""

    default: float
    low: float
    high: float
    meaning: str


#: name -> option. ``thigh_asymmetry`` gives each thigh information of its own (0.10 in the
#: ``saliency-check`` study); ``liver_fat_coupling`` scales how far liver fat follows visceral
#: fatness and BMI (0 in ``saliency-check-liver``: the liver is then the only evidence of its fat).
POPULATION: dict[str, PopulationOption] = {
    "thigh_asymmetry": PopulationOption(
        0.02, 0.0, 0.5, "SD of the relative left/right difference of thigh muscle"),
    "liver_fat_coupling": PopulationOption(
        1.0, 0.0, 1.0, "how far liver fat follows visceral fat and BMI: 1 UKB-like, 0 not at all"),
}


def check_population_value(name: str, value: object, strict: bool = False) -> float:
    """``value`` of option ``name`` as a float in its range, else ValueError naming both.
    ``strict`` (a study's YAML) refuses text such as ``"0.5"``, which a command line gives."""
    if name not in POPULATION:
        raise ValueError(f"unknown population option {name!r}; known: {', '.join(POPULATION)}")
    opt = POPULATION[name]
    if isinstance(value, bool) or (strict and isinstance(value, str)):
        number = math.nan
    else:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
    if not opt.low <= number <= opt.high:  # NaN fails too
        raise ValueError(f"{name} must be a number in [{opt.low:g}, {opt.high:g}] "
                         f"({opt.meaning}), got {value!r}")
    return number


def population(options: Mapping[str, object] | None = None) -> dict[str, float]:
    """Every option, the given ones checked (None values mean the default), the rest defaults."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(POPULATION))
    if unknown:
        raise ValueError(f"unknown population option {unknown[0]!r}; known: "
                         f"{', '.join(POPULATION)}")
    return {name: check_population_value(name, given[name]) if name in given else opt.default
            for name, opt in POPULATION.items()}


def non_default(options: Mapping[str, float]) -> dict[str, float]:
    """The options of ``options`` whose value differs from the default (what a cohort records)."""
    return {k: float(v) for k, v in options.items()
            if k in POPULATION and float(v) != POPULATION[k].default}


def options_of(data: Mapping[str, object]) -> dict[str, object]:
    """The population options a study's ``data:`` block sets (a null one means the default)."""
    return {k: data[k] for k in POPULATION if data.get(k) is not None}
