"""Study presets: ``src/biometry/studies/<name>.yaml`` read into a frozen, validated :class:`Study`.

A study file holds::

    name: scirep2020                  # must match the file name for presets
    description: one paragraph
    data: {source: ukb | phantom, ...} # phantom: subjects, seed, scale
    format: projection                 # projection | fat_fraction_slices | mimir | thigh
    fields: ["22407", "21002", ...]    # field keys, quoted (coerced to str anyway)
    multi_field: false                 # one network for all fields, or one per field
    folds: 7                           # k of the k-fold split
    train_folds: null                  # folds to train (default: all; thigh2024 trains fold 0)
    split_seed: 0
    calibration: false                 # post-hoc variance calibration (mean_variance studies)
    min_labelled_per_fold: 2           # a field needs folds * this many labelled subjects
    training: {...}                    # biometry.learn.trainer.TrainConfig fields
    dispatch: {workers: 1, jobqueue: null}
    network_name: all                  # run-folder name of a multi-field network
    modules: {name: [keys], ...}       # multi-field only: several networks ("modules"), each
                                       # for its fields; together they partition `fields`

Errors are ``StudyError`` (a ``ValueError``) with a one-line message naming the file and problem.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from biometry.config import fields as fieldcat
from biometry.config.formats import FORMAT_SPECS, format_shape
from biometry.config.paths import STUDIES_DIR, runs_dir
from biometry.config.training import TrainConfig

_TOP_KEYS = {"name", "description", "data", "format", "fields", "multi_field", "folds",
             "train_folds", "split_seed", "calibration", "min_labelled_per_fold", "training",
             "dispatch", "network_name", "modules"}
_REQUIRED = {"name", "data", "format", "fields", "folds", "training"}


class StudyError(ValueError):
    """A study file or preset name that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Study:
    """A validated study preset; ``fields`` are str keys. Picklable (for Dask workers); treat the
    ``data`` and ``dispatch`` mappings as read-only."""

    name: str
    description: str
    data: Mapping[str, Any]
    format: str
    fields: tuple[str, ...]
    multi_field: bool
    folds: int
    train_folds: tuple[int, ...]
    split_seed: int
    calibration: bool
    min_labelled_per_fold: int
    training: TrainConfig
    dispatch: Mapping[str, Any]
    path: Path

    #: run-folder name of the one network of a multi-field study
    #: (``papermill_runs/<study>/train/<network_name>/fold_<k>/``)
    network_name: str = "all"
    #: multi-field studies with several networks (MIMIR's modules): module name -> its fields
    modules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def formats_needed(self) -> tuple[str, ...]:
        """The 2D formats the prepared store must hold for this study."""
        return (self.format,)

    def networks(self) -> list[tuple[str, ...]]:
        """The field groups that get one network each: all fields at once, or one per field."""
        if self.modules:
            return [tuple(v) for v in self.modules.values()]
        return [self.fields] if self.multi_field else [(f,) for f in self.fields]

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The training config with overrides (e.g. ``seed=fold``, ``device="cpu"``)."""
        try:
            return dataclasses.replace(self.training, **overrides)
        except TypeError as exc:
            raise StudyError(f"{self.name}: bad training override ({exc})") from exc

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the study's format in the store."""
        return format_shape(self.format)

    def check_label_counts(self, counts: Mapping[str, int], keys=None) -> None:
        """Raise naming every field with too few labelled subjects for the folds.

        ``counts`` maps field key -> number of subjects with a label (and an image); ``keys``
        restricts the check to the fields about to be trained (default: all of the study).
        """
        need = self.folds * self.min_labelled_per_fold
        keys = self.fields if keys is None else [str(k) for k in keys]
        low = [f"{k} ({int(counts.get(k, 0))})" for k in keys if int(counts.get(k, 0)) < need]
        if low:
            raise StudyError(f"{self.name}: too few labelled subjects for {self.folds} folds "
                             f"(need {need}): {', '.join(low)}")

    def check_format(self, available: list[str] | tuple[str, ...]) -> None:
        """Raise if the prepared store lacks the study's format."""
        if self.format not in available:
            raise StudyError(f"{self.name}: the prepared store has no {self.format!r} images "
                             f"(it has: {', '.join(available) or 'none'}); run `biometry prepare --formats "
                             f"{self.format}` first")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for ``params.yaml`` and provenance."""
        return {"name": self.name, "description": self.description, "data": dict(self.data),
                "format": self.format, "fields": list(self.fields),
                "multi_field": self.multi_field, "folds": self.folds,
                "train_folds": list(self.train_folds), "split_seed": self.split_seed,
                "calibration": self.calibration,
                "min_labelled_per_fold": self.min_labelled_per_fold,
                "training": self.training.to_dict(), "dispatch": dict(self.dispatch),
                "network_name": self.network_name,
                "modules": {k: list(v) for k, v in self.modules.items()}}


def available_studies() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise StudyError(f"study file {p} does not exist")
        return p
    preset = STUDIES_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise StudyError(f"unknown study preset {str(name_or_path)!r}; available: "
                         f"{', '.join(available_studies())} (or give a path to a .yaml file)")
    return preset


def load_study(name_or_path: str | os.PathLike) -> Study:
    """Load and validate a preset by name (``"demo"``) or a study YAML file by path."""
    path = _resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping at the top level")
    return study_from_dict(raw, path)


def study_from_dict(raw: Mapping[str, Any], path: str | os.PathLike = "<dict>") -> Study:
    """Validate a study mapping (as read from YAML) into a :class:`Study`."""
    path = Path(path)
    where = str(path)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(_REQUIRED - set(raw))
    if missing:
        raise StudyError(f"{where}: missing key(s) {', '.join(missing)}")
    fmt = str(raw["format"])
    if fmt not in FORMAT_SPECS:
        raise StudyError(f"{where}: unknown format {fmt!r}; use one of {', '.join(FORMAT_SPECS)}")
    field_list = raw["fields"]
    if isinstance(field_list, (str, int)) or not field_list:
        raise StudyError(f"{where}: fields must be a non-empty list of field keys")
    keys = [str(k) for k in field_list]
    try:
        keys = fieldcat.validate(keys)
    except KeyError as exc:
        raise StudyError(f"{where}: {exc.args[0]}") from exc
    if len(set(keys)) != len(keys):
        raise StudyError(f"{where}: duplicated field keys")
    folds = int(raw["folds"])
    if folds < 2:
        raise StudyError(f"{where}: folds must be >= 2")
    train_folds = raw.get("train_folds")
    train_folds = tuple(range(folds)) if train_folds is None else tuple(int(f) for f in train_folds)
    if not train_folds or any(not 0 <= f < folds for f in train_folds):
        raise StudyError(f"{where}: train_folds must be folds in 0..{folds - 1}")
    tr = dict(raw["training"] or {})
    channels = format_shape(fmt)[0]
    tr.setdefault("in_channels", channels)
    if int(tr["in_channels"]) != channels:
        raise StudyError(f"{where}: training.in_channels={tr['in_channels']} but format {fmt!r} "
                         f"has {channels} channels")
    try:
        training = TrainConfig.from_dict(tr)
    except (ValueError, TypeError) as exc:
        raise StudyError(f"{where}: {exc}") from exc
    multi = bool(raw.get("multi_field", False))
    if training.head == "classification" and (multi and len(keys) > 1):
        raise StudyError(f"{where}: a classification study trains one network per field "
                         f"(multi_field: false)")
    name = str(raw["name"])
    if path.parent == STUDIES_DIR and path.stem != name:
        raise StudyError(f"{where}: name {name!r} differs from the file name {path.stem!r}")
    data = dict(raw["data"] or {})
    if data.get("source") not in ("phantom", "ukb"):
        raise StudyError(f"{where}: data.source must be 'phantom' or 'ukb'")
    modules = _modules(raw.get("modules"), keys, multi, where)
    return Study(
        name=name, description=str(raw.get("description", "")).strip(),
        data=data, format=fmt, fields=tuple(keys), multi_field=multi,
        folds=folds, train_folds=train_folds, split_seed=int(raw.get("split_seed", 0)),
        calibration=bool(raw.get("calibration", False)),
        min_labelled_per_fold=int(raw.get("min_labelled_per_fold", 2)), training=training,
        dispatch=dict(raw.get("dispatch") or {}), path=path,
        network_name=str(raw.get("network_name", "all")), modules=modules)


def _modules(raw, keys, multi: bool, where: str) -> dict[str, tuple[str, ...]]:
    """The ``modules:`` block: names -> field keys, a partition of the study's fields."""
    if not raw:
        return {}
    if not multi or not isinstance(raw, Mapping):
        raise StudyError(f"{where}: modules needs multi_field: true and a mapping name -> fields")
    out: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for name, members in raw.items():
        name = str(name)
        if not name.replace("_", "").replace("-", "").isalnum():
            raise StudyError(f"{where}: module name {name!r} must be letters, digits, _ or -")
        members = tuple(str(k) for k in (members or ()))
        if not members:
            raise StudyError(f"{where}: module {name!r} has no fields")
        for k in members:
            if k not in keys:
                raise StudyError(f"{where}: module {name!r} names field {k} that is not in fields")
            if k in seen:
                raise StudyError(f"{where}: field {k} is in modules {seen[k]!r} and {name!r}")
            seen[k] = name
        out[name] = members
    left = [k for k in keys if k not in seen]
    if left:
        raise StudyError(f"{where}: field(s) {', '.join(left)} belong to no module")
    return out


# ---------------------------------------------------------------------------------------------
# where a study's data lives
#
# * phantom studies: ``<runs_root>/<study>/data/cohort`` (the synthetic release: ``nifti/``,
#   ``fields.csv``, ``truth/``) and ``<runs_root>/<study>/data/prepared`` (the prepared store);
# * real data: the study YAML names them, ``data: {fields_csv: ..., prepared: ...}``, or the user
#   passes ``data_dir`` (a folder holding ``fields.csv`` and ``prepared/``).
#
# The fold assignment is computed once per study into ``<runs_root>/<study>/splits.csv`` and only
# read afterwards, so every field of a study shares it.


@dataclass(frozen=True)
class DataPaths:
    cohort: Path  # the release: fields.csv (+ nifti/, truth/ for a phantom)
    prepared: Path  # the prepared store
    splits: Path  # splits.csv of the study

    @property
    def fields_csv(self) -> Path:
        return self.cohort / "fields.csv"


def resolve_study(study: str | os.PathLike | Study) -> Study:
    """A :class:`Study` from itself, a preset name or a YAML path."""
    return load_study(study) if isinstance(study, str | os.PathLike) else study


def data_paths(study, data_dir: str | Path | None = None,
               runs_root: str | Path | None = None) -> DataPaths:
    """Where the fields table, the prepared store and the splits of ``study`` live."""
    study = resolve_study(study)
    root = Path(runs_root) if runs_root else runs_dir()
    base = root / study.name
    data = dict(study.data or {})
    if data_dir:
        d = Path(data_dir)
        return DataPaths(d, d / "prepared", base / "splits.csv")
    if data.get("source", "phantom") == "phantom":
        return DataPaths(base / "data" / "cohort", base / "data" / "prepared", base / "splits.csv")
    try:
        return DataPaths(Path(data["fields_csv"]).parent, Path(data["prepared"]),
                         base / "splits.csv")
    except KeyError as exc:
        raise ValueError(f"study {study.name!r}: data needs 'fields_csv' and 'prepared' paths "
                         f"(missing {exc.args[0]!r})") from None
