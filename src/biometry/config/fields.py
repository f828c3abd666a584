"""The catalogue of UK Biobank fields used by the papers (Sci Rep 2020: 64 targets; MIMIR: 71).

Built from the shared reference tables by ``tools/build_fields.py`` into package data; read here.

Every field has a string ``key``: the UKB field id (``"22407"``) where there is one, else a name
(``"age"``, ``"liver_volume"``). Field ids stay strings everywhere: ``"31"`` is not ``31``.

Columns of :func:`catalogue`:
    key, field_id, name, unit, native_unit, factor (value in ``unit`` = native value × factor),
    group (anthropometry, derived, dxa, mri_atlas, liver, organ, auxiliary; function: the thigh
    study's functional measures, read from a column named after the key), side (L/R/empty),
    partner (the other side's key), instance (UKB instance of the column: 0 or 2), arrays,
    scirep2020, mimir2021 (membership of the target lists), mimir_* (published CV metrics).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from biometry.config.paths import DATA_DIR

_COLUMN = re.compile(r"^(?P<field>\d+)-(?P<instance>\d+)\.(?P<array>\d+)$")


@functools.lru_cache(maxsize=1)
def catalogue() -> pd.DataFrame:
    """The field catalogue as a DataFrame indexed by ``key`` (a copy is cheap; do not mutate)."""
    df = pd.read_csv(DATA_DIR / "fields.csv", dtype={"key": str, "field_id": str, "partner": str,
                                                     "side": str, "instance": "Int64"})
    df[["field_id", "partner", "side"]] = df[["field_id", "partner", "side"]].fillna("")
    return df.set_index("key", drop=False)


@functools.lru_cache(maxsize=1)
def pairs() -> pd.DataFrame:
    """Pairs of fields that measure one property by two reference methods (DXA vs MRI, liver)."""
    return pd.read_csv(DATA_DIR / "field_pairs.csv", dtype=str)


@dataclass(frozen=True)
class Field:
    key: str
    field_id: str
    name: str
    unit: str
    native_unit: str
    factor: float
    group: str
    side: str
    partner: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.key}) [{self.unit}]" if self.key != self.name else self.name


def get(key: str | int) -> Field:
    """Look a field up by key; an unknown key raises ``KeyError`` naming close matches."""
    key = str(key)
    cat = catalogue()
    if key not in cat.index:
        by_name = cat.index[cat["name"].str.lower() == key.lower()]
        if len(by_name):
            key = by_name[0]
        else:
            raise KeyError(f"field {key!r} is not in the catalogue; see `biometry fields`"
                           f"{_suggest(key)}")
    r = cat.loc[key]
    return Field(key=r.key, field_id=r.field_id, name=r["name"], unit=r.unit,
                 native_unit=r.native_unit, factor=float(r.factor), group=r.group, side=r.side,
                 partner=r.partner)


def _suggest(key: str) -> str:
    cat = catalogue()
    close = difflib.get_close_matches(key, list(cat.index) + list(cat["name"]), n=3)
    return f" (close: {', '.join(close)})" if close else ""


def validate(keys: Iterable[str | int]) -> list[str]:
    """Return the keys as strings, raising one ``KeyError`` that lists every unknown key."""
    keys = [str(k) for k in keys]
    unknown = [k for k in keys if k not in catalogue().index]
    if unknown:
        raise KeyError(f"not in the field catalogue: {', '.join(unknown)}; see `biometry fields`")
    return keys


def study_fields(study: str) -> list[str]:
    """The target keys of a paper's list: ``"scirep2020"`` (64) or ``"mimir2021"`` (71)."""
    cat = catalogue()
    if study not in ("scirep2020", "mimir2021"):
        raise KeyError(f"unknown target list {study!r}: use 'scirep2020' or 'mimir2021'")
    return list(cat.index[cat[study]])


def bilateral_pairs(keys: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(left, right) key pairs among ``keys`` (default: the whole catalogue)."""
    cat = catalogue()
    keys = set(cat.index if keys is None else map(str, keys))
    out = []
    for k in sorted(keys):
        r = cat.loc[k]
        if r.side == "L" and r.partner in keys:
            out.append((k, r.partner))
    return out


def column(key: str, instance: int | None = None, array: int = 0) -> str:
    """The UKB showcase column of a field, e.g. ``column("22407") == "22407-2.0"``."""
    f = get(key)
    if not f.field_id:
        raise KeyError(f"field {key!r} is derived and has no UKB column")
    inst = catalogue().loc[f.key, "instance"] if instance is None else instance
    return f"{f.field_id}-{int(inst)}.{array}"


def parse_column(name: str) -> tuple[str, int, int] | None:
    """``"22407-2.0"`` → ``("22407", 2, 0)``; anything else → ``None``."""
    m = _COLUMN.match(name)
    return (m["field"], int(m["instance"]), int(m["array"])) if m else None


def to_unit(key: str, native_values):
    """Convert values from the UKB native unit to the catalogue unit (e.g. DXA g → kg)."""
    return native_values * get(key).factor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="biometry fields", description="List the field catalogue.")
    ap.add_argument("--list", choices=["scirep2020", "mimir2021", "all"], default="all")
    ap.add_argument("--group", help="only this group (anthropometry, dxa, mri_atlas, liver, ...)")
    a = ap.parse_args(argv)
    cat = catalogue()
    if a.list != "all":
        cat = cat[cat[a.list]]
    if a.group:
        cat = cat[cat.group == a.group]
    cols = ["key", "name", "unit", "native_unit", "group", "side", "partner"]
    sys.stdout.write(cat[cols].to_string(index=False) + f"\n{len(cat)} fields\n")
    return 0
