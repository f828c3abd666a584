"""Model bundles: a trained module as a self-describing folder that loads without the study.

A biometry bundle (in the spirit of a MONAI bundle)::

    bundle.json          what the module needs and promises (below), with a SHA-256 per file
    weights/fold_<k>.pt  one plain state dict of tensors per member network (torch.save)
    model_card.md        training data, cross-validated metrics, calibration, intended use

``bundle.json`` holds ``bundle_format``, ``package_version``, the network (``arch``,
``in_channels``, ``head``), the input (``format``, ``shape``, ``dtype``, ``input_size``,
``pixel_scale``), the fields (key, name, unit, divisor), the members (weights file, the target
standardisation of each: every fold standardised on its own training subjects, and its own
variance factors: fitted on its own out-of-fold subjects), the per-field variance
``calibration`` factors pooled over the folds, the ``ensemble`` rule and the CV metrics.

Loading (:func:`load_bundle`) checks, each with one line naming the folder and the file: the
bundle format, the package version (same major.minor), that every listed file exists and has its
checksum, and that weights are plain tensors: they are read with ``torch.load(weights_only=True)``,
which refuses any pickled object, and JSON/text for everything else. Nothing is executed.

An **original MIMIR module** (``snapshot.pth.tar``, ``metadata.txt``,
``standardization_parameters.txt``, ``calibration_factors.txt``; REFERENCE_METHODS §7) loads as a
bundle too: ResNet50 with ``fc = Linear(2048, 2T)``, 3 channels, the original-compatible input
format ``mimir_original``, uint8 values fed as floats 0–255, and its divisor applied to the mean and
(squared) to the variance (the original divided the variance by the divisor, not its square).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from biometry import __version__, fileio
from biometry.config import fields as field_catalogue
from biometry.config.formats import FORMAT_SPECS
from biometry.data.store import recorded_grid
from biometry.inference.uncertainty import DEFAULT_ENSEMBLE_RULE, ENSEMBLE_RULES, ensemble
from biometry.learn.devices import resolve_device
from biometry.learn.models import build_model, save_torch

#: the layout version of ``bundle.json``; a loader refuses any other
BUNDLE_FORMAT: int = 1
BUNDLE_JSON = "bundle.json"
MODEL_CARD = "model_card.md"
ORIGINAL_FILES = ("snapshot.pth.tar", "metadata.txt", "standardization_parameters.txt",
                  "calibration_factors.txt")


class BundleError(ValueError):
    """A bundle that cannot be used; the message is one line naming the folder and the file."""


@dataclass
class Member:
    """One network of a bundle, with the standardisation of its targets (per field) and, when
    the bundle has them, its own variance factors (fitted on its own out-of-fold subjects)."""

    model: nn.Module
    mean: np.ndarray
    std: np.ndarray
    calibration: np.ndarray | None = None


@dataclass
class Bundle:
    """A loaded bundle: its networks, what they take and what they give.

    Attributes
    ----------
    path : the bundle folder.
    name : a short name (the folder name, or ``meta["name"]``).
    meta : the parsed ``bundle.json`` (or its equivalent for an original module).
    members : the networks (one; or the k fold networks, combined as an ensemble).
    field_keys, field_names, units : per output field.
    divisors : per field, outputs are divided by it (variance by its square); 1 for ours.
    calibration : per field, the factor on the predicted variance.
    input_format : the prepared 2D format the networks take.
    input_size : the (H, W) the images are resized to, or None.
    pixel_scale : uint8 values are multiplied by it (1/255 for ours, 1 for the original).
    original : whether this is an original MIMIR module.
    grid_mm : the fused grid (mm) the training images were made on (``input.grid_mm``), on
        which new subjects are prepared; None: not recorded (older bundles, original modules).
    ensemble_rule : how several members are combined (``bundle.json``'s ``ensemble.rule``;
        :func:`biometry.inference.uncertainty.ensemble`).
    """

    path: Path
    name: str
    meta: dict[str, Any]
    members: list[Member]
    field_keys: list[str]
    field_names: list[str]
    units: list[str]
    divisors: np.ndarray
    calibration: np.ndarray
    input_format: str
    input_size: tuple[int, int] | None
    pixel_scale: float
    original: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    grid_mm: tuple[float, ...] | None = None
    ensemble_rule: str = DEFAULT_ENSEMBLE_RULE


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_release_line(a: str, b: str) -> bool:
    """Whether two versions share major.minor (a bundle's contract may change between them)."""
    return a.split(".")[:2] == b.split(".")[:2]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load_reason(exc: BaseException) -> str:
    """The gist of torch's refusal, one line without its terminal colours: for a pickled
    object, the unpickler's own sentence (what it met) rather than torch's advice on how to load
    the file anyway."""
    text = _ANSI.sub("", str(exc)).strip()
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    line = found.group(1) if found else (text.splitlines()[0] if text else type(exc).__name__)
    line = line.strip().split(". ")[0].rstrip(".")  # its first sentence: what, not what to do
    return line if len(line) <= 160 else line[:157] + "..."


def read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``path``, refusing pickled objects (one-line BundleError)."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise BundleError(f"{where}: {path.name} is not a plain tensor file (refused to unpickle "
                          f"it: {_load_reason(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise BundleError(f"{where}: {path.name} does not hold a state dict of tensors")
    # DataParallel snapshots prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# loading


def _load_network(root: Path, weights: str, arch: str, in_channels: int, n_fields: int,
                  head: str) -> nn.Module:
    """The network of one weights file of a bundle, in eval mode; a file that does not fit the
    architecture is one :class:`BundleError` naming it."""
    model = build_model(arch, in_channels, n_fields, head)
    try:
        model.load_state_dict(read_state_dict(root / weights, str(root)))
    except RuntimeError as exc:
        raise BundleError(f"{root}: {weights} does not fit a {arch} ({head} head) with "
                          f"{n_fields} fields ({str(exc).splitlines()[0]})") from None
    return model.eval()


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load a biometry bundle or an original MIMIR module folder (checks in the module docstring).

    Raises :class:`BundleError` (a ValueError) with one line naming the folder and the problem.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: model folder not found")
    if (root / BUNDLE_JSON).is_file():
        return _load_biometry(root)
    if any((root / f).exists() for f in ORIGINAL_FILES):
        return load_original_module(root)
    raise BundleError(f"{root}: not a model bundle (no {BUNDLE_JSON}, and not an original MIMIR "
                      f"module: {', '.join(ORIGINAL_FILES)})")


def _load_biometry(root: Path) -> Bundle:
    try:
        meta = json.loads((root / BUNDLE_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root}: {BUNDLE_JSON} is not valid JSON ({exc})") from None
    if meta.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(f"{root}: bundle format {meta.get('bundle_format')!r}, this biometry "
                          f"reads format {BUNDLE_FORMAT}")
    version = str(meta.get("package_version", "?"))
    if not _same_release_line(version, __version__):
        raise BundleError(f"{root}: exported by biometry {version}, this is biometry {__version__}"
                          f" (re-export the bundle with {__version__}, or use biometry {version})")
    for rel, digest in sorted(meta.get("files", {}).items()):
        f = root / rel
        if not f.is_file():
            raise BundleError(f"{root}: missing file {rel} (listed in {BUNDLE_JSON})")
        if sha256(f) != digest:
            raise BundleError(f"{root}: {rel} does not match its checksum in {BUNDLE_JSON} "
                              f"(changed or corrupt)")
    try:
        net, inp = meta["network"], meta["input"]
        fields = meta["fields"]
        keys = [str(f["key"]) for f in fields]
        members = []
        for m in meta["members"]:
            if m["weights"] not in meta.get("files", {}):
                raise BundleError(f"{root}: weights {m['weights']} have no checksum in "
                                  f"{BUNDLE_JSON}")
            model = _load_network(root, m["weights"], net["arch"], int(net["in_channels"]),
                                  len(keys), net["head"])
            own = m.get("calibration")
            members.append(Member(model, np.asarray(m["mean"], float), np.asarray(m["std"], float),
                                  None if own is None else np.asarray(own, dtype=np.float64)))
        calibration = np.asarray(meta["calibration"]["factors"], dtype=np.float64)
        size = inp.get("input_size")
        bundle = Bundle(
            path=root, name=str(meta.get("name") or root.name), meta=meta, members=members,
            field_keys=keys, field_names=[str(f["name"]) for f in fields],
            units=[str(f["unit"]) for f in fields],
            divisors=np.asarray([float(f.get("divisor", 1.0)) for f in fields]),
            calibration=calibration, input_format=str(inp["format"]),
            input_size=tuple(int(s) for s in size) if size else None,
            pixel_scale=float(inp.get("pixel_scale", 1 / 255)), grid_mm=_input_grid(root, inp),
            # bundles written before the rule was recorded: their members are calibrated too
            ensemble_rule=str((meta.get("ensemble") or {}).get("rule", DEFAULT_ENSEMBLE_RULE)))
    except KeyError as exc:
        raise BundleError(f"{root}: {BUNDLE_JSON} lacks {exc.args[0]!r}") from None
    _check_shapes(bundle)
    return bundle


def _input_grid(root: Path, inp: dict[str, Any]) -> tuple[float, ...] | None:
    """The input spec's ``grid_mm``, checked: three positive numbers (mm), or absent."""
    grid = inp.get("grid_mm")
    try:
        parsed = recorded_grid(inp)
        ok = parsed is None or (len(parsed) == 3 and all(np.isfinite(parsed))
                                and min(parsed) > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError(f"{root}: input grid_mm must be three positive numbers (mm), "
                          f"got {grid!r}")
    return parsed


def _check_shapes(b: Bundle) -> None:
    t = len(b.field_keys)
    if t == 0:
        raise BundleError(f"{b.path}: the module has no fields")
    if len(b.calibration) != t or not np.all(np.isfinite(b.calibration)) or np.any(b.calibration <= 0):
        raise BundleError(f"{b.path}: need {t} positive calibration factors, got "
                          f"{b.calibration.tolist()[:5]}")
    for m in b.members:
        if m.mean.shape != (t,) or m.std.shape != (t,):
            raise BundleError(f"{b.path}: standardisation has {m.mean.shape} values for {t} fields")
        own = m.calibration
        if own is not None and (own.shape != (t,) or not np.all(np.isfinite(own))
                                or np.any(own <= 0)):
            raise BundleError(f"{b.path}: a member needs {t} positive calibration factors, got "
                              f"{own.tolist()[:5]}")
    if b.ensemble_rule not in ENSEMBLE_RULES:
        raise BundleError(f"{b.path}: unknown ensemble rule {b.ensemble_rule!r} (this biometry "
                          f"knows {', '.join(ENSEMBLE_RULES)})")
    if b.input_format not in FORMAT_SPECS:
        raise BundleError(f"{b.path}: unknown input format {b.input_format!r}")


def _read_table(root: Path, name: str) -> pd.DataFrame:
    f = root / name
    if not f.is_file():
        raise BundleError(f"{root}: missing file {name} (an original MIMIR module needs "
                          f"{', '.join(ORIGINAL_FILES)})")
    try:
        return pd.read_csv(f, skipinitialspace=True)
    except (ValueError, OSError) as exc:
        raise BundleError(f"{root}: {name} is not a table ({exc})") from None


def _original_key(field_id: str, name: str) -> str:
    """Our catalogue key for an original field if we have it, else a slug of its name."""
    try:
        return field_catalogue.get(field_id).key
    except KeyError:
        return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or str(field_id)


def load_original_module(path: str | os.PathLike) -> Bundle:
    """An original MIMIR module folder as a :class:`Bundle` (see the module docstring)."""
    root = Path(path)
    meta_t = _read_table(root, "metadata.txt")
    stand = _read_table(root, "standardization_parameters.txt")
    calib = _read_table(root, "calibration_factors.txt")
    if not (root / "snapshot.pth.tar").is_file():
        raise BundleError(f"{root}: missing file snapshot.pth.tar")
    need = {"Name", "Field", "Unit", "Divisor"}
    if not need <= set(meta_t.columns):
        raise BundleError(f"{root}: metadata.txt needs columns {', '.join(sorted(need))}, has "
                          f"{', '.join(map(str, meta_t.columns))}")
    t = len(meta_t)
    if len(stand) != t or stand.shape[1] < 2 or len(calib) != t:
        raise BundleError(f"{root}: metadata.txt has {t} targets, standardization_parameters.txt "
                          f"{len(stand)} rows, calibration_factors.txt {len(calib)} rows")
    model = _load_network(root, "snapshot.pth.tar", "resnet50", 3, t, "mean_variance")
    names = [str(n) for n in meta_t["Name"]]
    keys = [_original_key(str(f), n) for f, n in zip(meta_t["Field"], names, strict=True)]
    bundle = Bundle(
        path=root, name=root.name,
        meta={"original_mimir": True, "fields": [
            {"key": k, "name": n, "unit": str(u), "divisor": float(d), "field": str(f)}
            for k, n, u, d, f in zip(keys, names, meta_t["Unit"], meta_t["Divisor"],
                                     meta_t["Field"], strict=True)]},
        members=[Member(model, stand.iloc[:, 0].to_numpy(float), stand.iloc[:, 1].to_numpy(float))],
        field_keys=keys, field_names=names, units=[str(u) for u in meta_t["Unit"]],
        divisors=meta_t["Divisor"].to_numpy(float), calibration=calib.iloc[:, 0].to_numpy(float),
        input_format="mimir_original", input_size=None, pixel_scale=1.0, original=True)
    if "mimir_original" not in FORMAT_SPECS:  # pragma: no cover - the registry defines it
        raise BundleError(f"{root}: this biometry lacks the mimir_original input format")
    _check_shapes(bundle)
    return bundle


# ---------------------------------------------------------------------------------------------
# prediction


@torch.no_grad()
def forward(bundle: Bundle, images: np.ndarray, batch_size: int = 32, device: str = "auto",
            channels_last: bool = False, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw means and variances of every member in the fields' units, before calibration.

    Parameters
    ----------
    images : uint8 (N, C, H, W) in the bundle's input format.
    batch_size : images per forward pass.
    device : "auto" | "cpu" | "cuda".
    channels_last, bf16 : memory layout and bfloat16 autocast (speed; see benchmarks/infer.py).

    Returns
    -------
    means, variances : float64 (K, N, T) for the K members.
    """
    dev = resolve_device(device)
    n, t = len(images), len(bundle.field_keys)
    means = np.zeros((len(bundle.members), n, t))
    variances = np.zeros((len(bundle.members), n, t))
    memory = torch.channels_last if channels_last else torch.contiguous_format
    for k, m in enumerate(bundle.members):
        model = m.model.to(dev).to(memory_format=memory)
        outs = []
        for s in range(0, n, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(dev)
            x = x.float().mul_(bundle.pixel_scale)
            if bundle.input_size is not None and tuple(x.shape[-2:]) != bundle.input_size:
                x = F.interpolate(x, size=bundle.input_size, mode="bilinear", antialias=True,
                                  align_corners=False)
            x = x.contiguous(memory_format=memory)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            outs.append(out.float().cpu())
        raw = (torch.cat(outs).numpy().astype(np.float64) if outs
               else np.zeros((0, 2 * t))).reshape(n, t, 2)
        means[k] = raw[..., 0] * m.std + m.mean
        variances[k] = np.exp(raw[..., 1]) * m.std ** 2
    means /= bundle.divisors
    variances /= bundle.divisors ** 2
    return means, variances


def member_factors(bundle: Bundle) -> np.ndarray:
    """(K, T) variance factors: each member's own (fitted on its own out-of-fold subjects) where
    the bundle has them, else the field's factor pooled over the folds."""
    return np.stack([bundle.calibration if m.calibration is None else m.calibration
                     for m in bundle.members])


def predict_members(bundle: Bundle, images: np.ndarray, **kwargs
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every member's mean and calibrated variance, (K, N, T) in the fields' units: each
    member's variance times its factors (:func:`member_factors`; ``kwargs``: :func:`forward`)."""
    means, variances = forward(bundle, images, **kwargs)
    return means, variances * member_factors(bundle)[:, None, :]


def predict_calibrated(bundle: Bundle, images: np.ndarray, rule: str | None = None, **kwargs
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated mean and variance (N, T) in the fields' units.

    The calibrated members (:func:`predict_members`) are combined by ``rule`` (default the
    bundle's, :attr:`Bundle.ensemble_rule`; :func:`biometry.inference.uncertainty.ensemble`).
    """
    return ensemble(*predict_members(bundle, images, **kwargs), rule or bundle.ensemble_rule)


# ---------------------------------------------------------------------------------------------
# export


def write_bundle(out_dir: str | os.PathLike, *, name: str, network: dict[str, Any],
                 input_spec: dict[str, Any], field_keys: Sequence[str],
                 members: Sequence[tuple],
                 calibration: Sequence[float], card: str, extra: dict[str, Any] | None = None,
                 ensemble_rule: str = DEFAULT_ENSEMBLE_RULE) -> Path:
    """Write a bundle folder (``out_dir`` must be missing or empty).

    ``members``: per network, ``(state_dict, mean, std)`` or ``(state_dict, mean, std,
    factors)`` with the member's own per-field variance factors; ``calibration``: per-field
    factors pooled over the folds (used for a member without its own);
    ``ensemble_rule``: how the engine combines several members (recorded in ``bundle.json``).
    Every file is written atomically; ``bundle.json`` (with the checksums) comes last, so a
    bundle interrupted while writing does not load.
    """
    if ensemble_rule not in ENSEMBLE_RULES:
        raise ValueError(f"unknown ensemble rule {ensemble_rule!r}; use one of "
                         f"{', '.join(ENSEMBLE_RULES)}")
    root = Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: exists and is not an empty folder")
    (root / "weights").mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    member_meta = []
    for k, (state, mean, std, *own) in enumerate(members):
        rel = f"weights/fold_{k}.pt"
        save_torch(root / rel, {n: v.detach().cpu().contiguous()
                                        for n, v in state.items()})
        files[rel] = sha256(root / rel)
        member_meta.append({"weights": rel, "mean": [float(v) for v in mean],
                            "std": [float(v) for v in std],
                            **({"calibration": [float(v) for v in own[0]]} if own and own[0]
                               is not None else {})})
    fileio.write_text(root / MODEL_CARD, card)
    files[MODEL_CARD] = sha256(root / MODEL_CARD)
    fields_meta = []
    for key in field_keys:
        f = field_catalogue.get(key)
        fields_meta.append({"key": f.key, "name": f.name, "unit": f.unit, "divisor": 1.0,
                            "ukb_field": f.field_id})
    meta = {"bundle_format": BUNDLE_FORMAT, "package": "biometry", "package_version": __version__,
            "name": name, "network": network, "input": input_spec, "fields": fields_meta,
            "members": member_meta,
            "calibration": {"method": "variance scaling, closed-form NLL minimiser on the "
                                      "out-of-fold predictions",
                            "factors": [float(c) for c in calibration]},
            "ensemble": {"rule": ensemble_rule, "members": len(member_meta)},
            "files": files, **(extra or {})}
    fileio.write_json(root / BUNDLE_JSON, meta)
    return root
