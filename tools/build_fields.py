"""Build the package's field catalogue from the shared reference tables (developer tool).

    python tools/build_fields.py [--shared ../shared/reference]

Writes ``src/biometry/data/fields.csv`` and ``src/biometry/data/field_pairs.csv``. The package
never reads ``../shared`` at run time; this script is re-run by hand when the references change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

GROUPS = {
    "anthropometry/metadata": "anthropometry",
    "DXA body composition": "dxa",
    "MRI body composition (AMRA atlas-based)": "mri_atlas",
    "liver (dedicated liver MRI, UKB)": "liver",
    "organ volume (authors own segmentation, not a UKB field at the time)": "organ",
}
# UKB native unit -> catalogue unit factor (value_in_unit = native * factor)
CONVERSIONS = {("g", "kg"): 0.001, ("cm3", "L"): 0.001}
# Auxiliary fields: inputs of age and of the baseline, not network targets.
AUXILIARY = [
    ("34", "yearOfBirth", "year", "year", 0),
    ("52", "monthOfBirth", "month", "month", 0),
    ("53", "dateOfAssessment", "date", "date", 2),
    ("2443", "diabetesDiagnosed", "(yes = 1)", "categorical (0=no,1=yes)", 2),
]
# Study-specific fields without a UKB id (thigh-function study, ISMRM 2024): functional measures
# of the phantom and the external cohort's self-reported exercise; fields.csv column = key.
STUDY_FIELDS = [
    ("leg_strength", "legStrength", "kg"),
    ("walking_speed", "walkingSpeed", "m/s"),
    ("chair_stand_time", "chairStandTime", "s"),
    ("exercise", "exerciseSelfReported", "(yes = 1)"),
]
# Pairs of fields that measure the same property with two reference methods.
PAIRS = [
    ("23289", "22407", "visceral adipose tissue", "dxa_mri"),
    ("23278", "22415", "total fat", "dxa_mri"),
    ("23280", "22416", "total lean tissue", "dxa_mri"),
    ("23284", "22410", "trunk fat", "dxa_mri"),
    ("23275", "22409", "leg/thigh lean tissue", "dxa_mri"),
    ("22402", "22436", "liver fat fraction", "liver_methods"),
]


def snake(label: str) -> str:
    out = []
    for i, ch in enumerate(label):
        if ch.isupper() and i and not label[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "reference"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src" / "biometry" / "config" / "data"))
    a = ap.parse_args()
    ref = Path(a.shared)
    sci = pd.read_csv(ref / "derived_scirep2020_targets.csv", dtype=str).fillna("")
    mim = pd.read_csv(ref / "derived_mimir_validation_targets.csv", dtype=str).fillna("")

    rows: dict[str, dict] = {}

    def key_of(fid: str, label: str) -> str:
        return fid if fid else snake(label)

    for r in sci.itertuples():
        key = key_of(r.field_id, r.label_in_repo)
        unit = r.unit_as_plotted if not r.unit_as_plotted.startswith("(not") else r.ukb_native_unit_unverified
        native = r.ukb_native_unit_unverified or unit
        if native.startswith("categorical"):
            native = unit
        rows[key] = dict(
            key=key, field_id=r.field_id, name=r.label_in_repo, unit=unit, native_unit=native,
            group=GROUPS[r.group], side=r.side, partner=r.lr_pair_field,
            scirep2020=r.in_scirep_64_plot_list == "yes", mimir2021=False,
        )
    for r in mim.itertuples():
        key = key_of(r.field_id, r.description)
        if key in rows:
            row = rows[key]
        else:
            native = {"kg": "kg", "%": "%"}.get(r.unit, r.unit)
            row = rows[key] = dict(
                key=key, field_id=r.field_id, name=r.description, unit=r.unit, native_unit=native,
                group=GROUPS[r.group], side=r.side, partner=r.lr_pair_field,
                scirep2020=False, mimir2021=False,
            )
        row["mimir2021"] = True
        row["mimir_n"] = int(r.N)
        for col in ("ICC", "R2", "MAE", "MAPE_percent"):
            row[f"mimir_{col.lower()}"] = float(r._asdict()[col])
    # Fix the names of keys without a field id: age is derived, organ volumes are not UKB fields.
    for k in list(rows):
        if rows[k]["group"] == "anthropometry" and k == "age":
            rows[k]["group"] = "derived"
    for fid, name, unit, native, _inst in AUXILIARY:
        # Diabetes status is the MIMIR engine's 72nd output (classification; not in the PDF table).
        is_dm = fid == "2443"
        rows[fid] = dict(key=fid, field_id=fid, name=name, unit=unit, native_unit=native,
                         group="disease" if is_dm else "auxiliary", side="", partner="",
                         scirep2020=False, mimir2021=is_dm)
    for key, name, unit in STUDY_FIELDS:
        rows[key] = dict(key=key, field_id="", name=name, unit=unit, native_unit=unit,
                         group="function", side="", partner="", scirep2020=False, mimir2021=False)

    df = pd.DataFrame(rows.values())
    df["factor"] = [CONVERSIONS.get((n, u), 1.0) for n, u in zip(df.native_unit, df.unit)]
    inst = {fid: i for fid, *_r, i in AUXILIARY}
    inst.update({"31": 0})
    df["instance"] = [inst.get(f, 2) if f else "" for f in df.field_id]
    df["arrays"] = [2 if f == "102" else 1 for f in df.field_id]
    cols = ["key", "field_id", "name", "unit", "native_unit", "factor", "group", "side", "partner",
            "instance", "arrays", "scirep2020", "mimir2021", "mimir_n", "mimir_icc", "mimir_r2",
            "mimir_mae", "mimir_mape_percent"]
    df = df[cols].sort_values(["group", "key"], key=lambda s: s.astype(str)).reset_index(drop=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "fields.csv", index=False)
    pd.DataFrame(PAIRS, columns=["a", "b", "property", "kind"]).to_csv(out / "field_pairs.csv", index=False)
    print(f"{len(df)} fields ({df.scirep2020.sum()} Sci Rep 2020, {df.mimir2021.sum()} MIMIR) -> {out}")


if __name__ == "__main__":
    main()
