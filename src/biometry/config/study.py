"""Study presets: ``src/biometry/studies/<name>.yaml`` read into a frozen, validated :class:`Study`.

A study file holds::

    name: scirep2020                  # must match the file name for presets
    description: one paragraph
    data: {source: ukb | phantom, ...} # phantom: subjects, seed, scale; ukb: fields_csv, prepared
                                       # (relative paths: relative to this file's folder)
    format: projection                 # projection | fat_fraction_slices | mimir | thigh
    fields: ["22407", "21002", ...]    # field keys, quoted (coerced to str anyway)
    multi_field: false                 # one network for all fields, or one per field
    folds: 7                           # k of the k-fold split
    train_folds: null                  # folds to train (default: all; thigh2024 trains fold 0)
    split_seed: 0
    stratify: null                     # null | sex | a field key: StratifiedGroupKFold on it
                                       # (a continuous field in quintiles); see learn.splits
    calibration: false                 # post-hoc variance calibration (mean_variance studies)
    min_labelled_per_fold: 2           # a field needs folds * this many labelled subjects
    training: {...}                    # biometry.learn.trainer.TrainConfig fields
    dispatch: {workers: 1, jobqueue: null}
    network_name: all                  # run-folder name of a multi-field network
    thigh: {...}                       # thigh-function study settings (THIGH_DEFAULTS)
    modules: {name: [keys], ...}       # multi-field only: several networks ("modules"), each
                                       # for its fields; together they partition `fields`
    release: {subjects: 400, seed: 1}  # a later release to judge the trained modules on (stage
                                       # `release`); phantom: its next release is synthesised;
                                       # real data: {input: DIR_OR_ZIPS, fields_csv: FILE}

Errors are ``StudyError`` (a ``ValueError``) with a one-line message naming the file and problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from biometry import fileio
from biometry.config import fields as fieldcat
from biometry.config.formats import FORMAT_SPECS, format_shape
from biometry.config.paths import STUDIES_DIR, figures_dir, runs_dir
from biometry.config.population import POPULATION, check_population_value
from biometry.config.training import TrainConfig

#: the ``data:`` keys of a phantom study, besides the population options
_PHANTOM_DATA_KEYS = {"source", "subjects", "seed", "scale"}
_TOP_KEYS = {"name", "description", "data", "format", "fields", "multi_field", "folds",
             "train_folds", "split_seed", "calibration", "min_labelled_per_fold", "training",
             "dispatch", "network_name", "stratify", "thigh", "liver",
             "saliency", "modules", "release"}
#: the ``thigh:`` block of a thigh-function study (docs/thigh.md) and its defaults
THIGH_DEFAULTS: dict[str, Any] = {
    "backbone": "weights",         # "weights": training.weights (ImageNet file, a path);
                                   # "pretrain": pretrained on the phantom's regression fields
    "pretrain_fields": ["22409", "22408", "21002"],  # thigh muscle, abdominal SAT, weight
    "pretrain_iterations": 150,
    "pretrain_batch_size": 8,
    "pretrain_slices": 2,          # random slices per subject and pretraining iteration
    "pretrain_lr": 1.0e-3,
    "random_control": True,        # also a frozen random backbone
    "sex_stratified": True,        # also networks for men and women (whole-cohort median)
    "external": None,              # phantom: {subjects, seed}; real data: {fields_csv, prepared}
    "external_label": "exercise",
}
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
    #: None, or the field key whose value (sex: "31"; a continuous field: its quintile) the folds
    #: are stratified by
    stratify: str | None = None
    #: the thigh-function study's settings (THIGH_DEFAULTS filled in); empty for other studies
    thigh: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: the liver study's multi-atlas settings (``biometry.analysis.atlas.AtlasConfig``); a
    #: study with this block gets the ``liver`` stage (notebooks/07_liver_fat.ipynb)
    liver: Mapping[str, Any] | None = None
    #: fields whose guided Grad-CAM saliency ``biometry study run`` aggregates, and subjects per
    #: sex: ``{fields: [...], subjects: 60}`` (docs/saliency.md); None: only on request
    saliency: Mapping[str, Any] | None = None
    #: multi-field studies with several networks (MIMIR's modules): module name -> its fields
    modules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: a later release the ``release`` stage applies the study's bundles to
    #: (``{subjects, seed}`` for the phantom's next release, ``{input, fields_csv}`` for real
    #: data; docs/inference.md); None: no such stage
    release: Mapping[str, Any] | None = None

    @property
    def formats_needed(self) -> tuple[str, ...]:
        """The 2D formats the prepared store must hold for this study."""
        return (self.format,)

    def networks(self) -> list[tuple[str, ...]]:
        """The field groups that get one network each: all fields at once, or one per field."""
        if self.modules:
            return [tuple(v) for v in self.modules.values()]
        return [self.fields] if self.multi_field else [(f,) for f in self.fields]

    def network_units(self) -> list[str]:
        """The names of the study's networks, as their run folders (``train/<unit>/fold_k``) name
        them: its modules, its one multi-field network (``network_name``), or each field."""
        if self.modules:
            return list(self.modules)
        return [self.network_name] if self.multi_field else list(self.fields)

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
                "network_name": self.network_name, "stratify": self.stratify,
                **({"thigh": dict(self.thigh)} if self.thigh else {}),
                **({"liver": dict(self.liver)} if self.liver is not None else {}),
                **({"saliency": dict(self.saliency)} if self.saliency is not None else {}),
                **({"release": dict(self.release)} if self.release is not None else {})}


def check_lr_steps(training: TrainConfig, where: str = "training") -> None:
    """Raise if an ``lr_steps`` entry is not inside the iteration count (the drop would never
    fire: the original code's bug with 6000 iterations and a step configured beyond them)."""
    if training.iterations > 0:
        late = [s for s in training.lr_steps if not 0 < s < training.iterations]
        if late:
            raise StudyError(f"{where}: lr_steps {list(training.lr_steps)} must lie in "
                             f"1..{training.iterations - 1} (iterations={training.iterations}); "
                             f"step(s) {late} would never fire")


def with_iterations(training: TrainConfig, iterations: int) -> TrainConfig:
    """``training`` with another iteration count; ``lr_steps`` scale with it, explicitly.

    Each step keeps its fraction of the schedule: 5000 of 6000 becomes 250 of 300. The result is
    checked with :func:`check_lr_steps` (a step that would round to 0 or past the end raises).
    """
    iterations = int(iterations)
    if iterations < 1:
        raise StudyError(f"iterations must be >= 1, got {iterations}")
    if training.iterations > 0:
        steps = tuple(max(1, round(s * iterations / training.iterations)) for s in training.lr_steps)
    else:
        steps = training.lr_steps
    new = dataclasses.replace(training, iterations=iterations, epochs=0.0, lr_steps=steps)
    check_lr_steps(new, f"iterations={iterations}")
    return new


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
    """Load and validate a preset by name (``"demo"``) or a study YAML file by path.

    The path is made absolute here (against the current directory), so that a study handed on
    to notebooks and workers that run elsewhere still names the same file.
    """
    path = _resolve(name_or_path).resolve()
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
    check_lr_steps(training, where)
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
    for option in sorted(set(data) & set(POPULATION)):  # the phantom's (docs/phantom.md)
        value = data[option]
        if value is None:  # as in the API and the CLI: the default
            continue
        if data["source"] != "phantom":
            raise StudyError(f"{where}: data.{option} is an option of the phantom; this "
                             f"study's data.source is {data['source']!r}")
        try:
            check_population_value(option, value, strict=True)
        except ValueError as exc:
            raise StudyError(f"{where}: data.{exc}") from None
    if data["source"] == "phantom":  # a mistyped option would silently give the default
        unknown = sorted(set(data) - _PHANTOM_DATA_KEYS - set(POPULATION))
        if unknown:
            known = sorted(_PHANTOM_DATA_KEYS | set(POPULATION))
            close = difflib.get_close_matches(unknown[0], known, 1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise StudyError(f"{where}: unknown key data.{unknown[0]} for a phantom study; "
                             f"{hint}(known: {', '.join(known)})")
    stratify = raw.get("stratify")
    if stratify is not None:
        stratify = "31" if str(stratify) == "sex" else str(stratify)
        try:
            fieldcat.validate([stratify])
        except KeyError as exc:
            raise StudyError(f"{where}: stratify: {exc.args[0]}") from exc
    thigh = _thigh_settings(raw.get("thigh"), where)
    modules = _modules(raw.get("modules"), keys, multi, where)
    return Study(
        stratify=stratify, name=name, description=str(raw.get("description", "")).strip(),
        data=data, format=fmt, fields=tuple(keys), multi_field=multi,
        folds=folds, train_folds=train_folds, split_seed=int(raw.get("split_seed", 0)),
        calibration=bool(raw.get("calibration", False)),
        min_labelled_per_fold=int(raw.get("min_labelled_per_fold", 2)), training=training,
        dispatch=dict(raw.get("dispatch") or {}), path=path,
        network_name=str(raw.get("network_name", "all")), thigh=thigh,
        liver=None if raw.get("liver") is None else dict(raw["liver"]),
        saliency=_saliency_settings(raw.get("saliency"), keys, where),
        modules=modules, release=_release_settings(raw.get("release"), data, where))



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


def _release_settings(raw: Any, data: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """The ``release:`` block: ``{subjects, seed}`` (phantom) or ``{input, fields_csv}``."""
    if raw is None:
        return None
    phantom = data.get("source") == "phantom"
    need = {"subjects", "seed"} if phantom else {"input", "fields_csv"}
    if not isinstance(raw, Mapping) or set(raw) != need:
        shape = "{subjects: N, seed: S}" if phantom else "{input: DIR_OR_ZIPS, fields_csv: FILE}"
        raise StudyError(f"{where}: release must be {shape} for {data.get('source')} data")
    if not phantom:
        return {"input": str(raw["input"]), "fields_csv": str(raw["fields_csv"])}
    try:
        subjects, seed = int(raw["subjects"]), int(raw["seed"])
    except (TypeError, ValueError):
        subjects, seed = 0, -1
    if subjects < 1 or seed < 0:
        raise StudyError(f"{where}: release.subjects must be a positive and release.seed a "
                         f"non-negative integer, got {raw['subjects']!r} and {raw['seed']!r}")
    return {"subjects": subjects, "seed": seed}



#: Grad-CAM layers of the torchvision ResNets a study's saliency block may name
SALIENCY_LAYERS = ("layer4", "layer3", "layer2", "layer1")


def _saliency_settings(raw: Any, keys: list[str], where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"fields", "subjects", "layer", "occlusion"}:
        raise StudyError(f"{where}: saliency must be {{fields: [...], subjects: N, layer: L, "
                         f"occlusion: true|false}} (layer optional, default layer4; occlusion "
                         f"optional, default false)")
    fields = [str(k) for k in raw.get("fields") or []]
    missing = [k for k in fields if k not in keys]
    if missing:
        raise StudyError(f"{where}: saliency.fields {', '.join(missing)} are not fields of the study")
    layer = str(raw.get("layer", "layer4"))
    if layer not in SALIENCY_LAYERS:
        raise StudyError(f"{where}: saliency.layer {layer!r} is not one of "
                         f"{', '.join(SALIENCY_LAYERS)}")
    occlusion = raw.get("occlusion", False)
    if not isinstance(occlusion, bool):
        raise StudyError(f"{where}: saliency.occlusion must be true or false, got {occlusion!r}")
    return {"fields": fields, "subjects": int(raw.get("subjects", 200)), "layer": layer,
            **({"occlusion": True} if occlusion else {})}


def _thigh_settings(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise StudyError(f"{where}: thigh must be a mapping of settings")
    unknown = sorted(set(raw) - set(THIGH_DEFAULTS))
    if unknown:
        raise StudyError(f"{where}: unknown thigh setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(THIGH_DEFAULTS)}")
    out = {**THIGH_DEFAULTS, **raw}
    if out["backbone"] not in ("weights", "pretrain"):
        raise StudyError(f"{where}: thigh.backbone must be 'weights' or 'pretrain'")
    try:
        out["pretrain_fields"] = fieldcat.validate(out["pretrain_fields"])
    except KeyError as exc:
        raise StudyError(f"{where}: thigh.pretrain_fields: {exc.args[0]}") from exc
    ext = out["external"]
    if ext is not None and not (isinstance(ext, Mapping) and (
            {"subjects", "seed"} <= set(ext) or {"fields_csv", "prepared"} <= set(ext))):
        raise StudyError(f"{where}: thigh.external must be null, {{subjects, seed}} (phantom) or "
                         f"{{fields_csv, prepared}} (real data)")
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
    fields_file: Path | None = None  # the fields table when not ``cohort/fields.csv``

    @property
    def fields_csv(self) -> Path:
        return self.fields_file if self.fields_file is not None else self.cohort / "fields.csv"


def resolve_study(study: str | os.PathLike | Study) -> Study:
    """A :class:`Study` from itself, a preset name or a YAML path."""
    return load_study(study) if isinstance(study, str | os.PathLike) else study


def is_preset(study: Study) -> bool:
    """True for a preset shipped with the package, False for a user's study file."""
    return Path(study.path).parent == STUDIES_DIR.resolve() or Path(study.path).parent == STUDIES_DIR


def default_runs_root(study) -> Path:
    """Where a study's run folders go unless ``--runs-root`` says otherwise.

    A preset's go to the checkout's ``papermill_runs/``; a user's study file keeps its outputs
    beside itself, in ``papermill_runs/`` of the YAML's folder, where its user will look.
    """
    study = resolve_study(study)
    return runs_dir() if is_preset(study) else Path(study.path).parent / "papermill_runs"


def default_figures_root(study) -> Path:
    """Where a study's figures go by default: ``figures/`` beside the runs (see above)."""
    study = resolve_study(study)
    return figures_dir() if is_preset(study) else Path(study.path).parent / "figures"


def study_path(study, value: str | os.PathLike) -> Path:
    """A path from a study file, absolute: relative paths are relative to the YAML's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (Path(study.path).parent / p).resolve()


def data_paths(study, data_dir: str | Path | None = None,
               runs_root: str | Path | None = None) -> DataPaths:
    """Where the fields table, the prepared store and the splits of ``study`` live.

    Relative ``fields_csv`` and ``prepared`` in the study file are relative to the file's folder;
    ``runs_root`` defaults to :func:`default_runs_root`.
    """
    study = resolve_study(study)
    root = Path(runs_root) if runs_root else default_runs_root(study)
    base = root / study.name
    data = dict(study.data or {})
    if data_dir:
        d = Path(data_dir).resolve()
        return DataPaths(d, d / "prepared", base / "splits.csv")
    if data.get("source", "phantom") == "phantom":
        return DataPaths(base / "data" / "cohort", base / "data" / "prepared", base / "splits.csv")
    try:
        table = study_path(study, data["fields_csv"])
        return DataPaths(table.parent, study_path(study, data["prepared"]), base / "splits.csv",
                         fields_file=table)
    except KeyError as exc:
        raise ValueError(f"study {study.name!r}: data needs 'fields_csv' and 'prepared' paths "
                         f"(missing {exc.args[0]!r}); start a study of your own from it with "
                         f"`biometry study new mystudy --from {study.name} --fields-csv ... "
                         f"--prepared ...`") from None


def new_study(name: str, preset: str, fields_csv: str | os.PathLike, prepared: str | os.PathLike,
              out_dir: str | os.PathLike = ".", fields: list[str] | None = None,
              iterations: int | None = None, folds: int | None = None,
              overwrite: bool = False) -> Path:
    """Write ``<out_dir>/<name>.yaml``: the preset ``preset`` pointed at the user's data.

    ``fields_csv`` and ``prepared`` are written relative to ``out_dir`` (where the new file
    lives), so the folder can be moved as a whole; ``fields``, ``iterations`` (``lr_steps``
    scale with it, see :func:`with_iterations`) and ``folds`` override the preset's. The result
    is validated by loading it; returns its path.
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise StudyError(f"study name {name!r}: use letters, digits, '-' and '_'")
    base = load_study(preset)
    raw = yaml.safe_load(base.path.read_text())
    out_dir = Path(out_dir).resolve()
    target = out_dir / f"{name}.yaml"
    if target.exists() and not overwrite:
        raise StudyError(f"{target} exists; pass --overwrite to replace it")

    def relative(p: str | os.PathLike) -> str:
        return os.path.relpath(Path(p).expanduser().resolve(), out_dir)

    raw["name"] = name
    raw["description"] = (f"Started from the preset {base.name!r}. " + base.description).strip()
    raw["data"] = {"source": "ukb", "fields_csv": relative(fields_csv),
                   "prepared": relative(prepared)}
    # a preset's phantom release cannot be synthesised for real data; the user names theirs
    if isinstance(raw.get("release"), dict) and "input" not in raw["release"]:
        raw.pop("release")
    if fields:
        raw["fields"] = fieldcat.validate([str(f) for f in fields])
        # the preset's per-field blocks keep only the chosen fields
        if raw.get("saliency"):
            kept = [k for k in raw["saliency"].get("fields", []) if k in raw["fields"]]
            if kept:
                raw["saliency"] = {**raw["saliency"], "fields": kept}
            else:
                raw.pop("saliency")
        if raw.get("modules"):
            modules = {m: [k for k in ks if k in raw["fields"]]
                       for m, ks in raw["modules"].items()}
            raw["modules"] = {m: ks for m, ks in modules.items() if ks}
    if folds is not None:
        raw["folds"] = int(folds)
        raw.pop("train_folds", None)
    if iterations is not None:
        tr = with_iterations(base.training, iterations)
        raw["training"] = {**raw["training"], "iterations": tr.iterations,
                           "lr_steps": list(tr.lr_steps)}
        raw["training"].pop("epochs", None)
        if int(raw["training"].get("checkpoint_every", 0) or 0) > tr.iterations:
            raw["training"]["checkpoint_every"] = tr.iterations
    text = (f"# Study {name}: started with `biometry study new {name} --from {base.name}`.\n"
            f"# Paths are relative to this file's folder.\n" + yaml.safe_dump(raw, sort_keys=False))
    study_from_dict(yaml.safe_load(text), target)  # validate before writing
    fileio.write_text(target, text)
    return target
