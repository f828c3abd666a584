"""A trained network with what is needed to use it (``model.pt``): load it and predict in the
fields' units."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from biometry.learn.augment import to_input
from biometry.learn.devices import resolve_device
from biometry.learn.models import build_model


@dataclass
class ModelBundle:
    """A trained model with what is needed to use it (see :func:`load_model`)."""

    model: nn.Module
    head: str
    field_keys: list[str]
    mean: np.ndarray
    std: np.ndarray
    input_size: tuple[int, int] | None
    in_channels: int
    config: dict[str, Any]



# ---------------------------------------------------------------------------------------------
# inference


def bundle_from_raw(raw: dict[str, Any], model: nn.Module | None = None) -> ModelBundle:
    """A :class:`ModelBundle` from the dict saved as ``model.pt`` (``model`` reuses a live network)."""
    if model is None:
        cfg = raw["config"]
        model = build_model(raw["arch"], raw["in_channels"], raw["n_outputs"], raw["head"],
                            weights=None, freeze_backbone=cfg.get("freeze_backbone", False))
        model.load_state_dict(raw["state_dict"])
    model.eval()
    size = raw.get("input_size")
    return ModelBundle(model=model, head=raw["head"], field_keys=list(raw["field_keys"]),
                       mean=np.asarray(raw["mean"], dtype=np.float64),
                       std=np.asarray(raw["std"], dtype=np.float64),
                       input_size=tuple(size) if size else None, in_channels=raw["in_channels"],
                       config=dict(raw["config"]))


def load_model(path: str | os.PathLike) -> ModelBundle:
    """Load a trained model bundle from a run folder (``model.pt`` inside) or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return bundle_from_raw(raw)


@torch.no_grad()
def predict(model_dir_or_model: str | os.PathLike | ModelBundle | nn.Module, images,
            batch_size: int = 64, device: str = "auto",
            input_size: Sequence[int] | None = None) -> np.ndarray:
    """Predict for uint8 images (N, C, H, W), in batches, without augmentation.

    Parameters
    ----------
    model_dir_or_model : a run folder / ``model.pt`` / :class:`ModelBundle` (outputs in the fields'
        units), or a bare ``nn.Module`` (raw outputs; ``input_size`` then applies).
    images : uint8 (N, C, H, W).
    batch_size : images per forward pass.
    device : "auto" | "cpu" | "cuda".

    Returns
    -------
    ndarray, float64: regression (N, T) values; mean_variance (N, T, 2) with ``[..., 0]`` the mean
    and ``[..., 1]`` the variance (not calibrated); classification (N, K) class probabilities;
    a bare module: its raw outputs (N, outputs).
    """
    bundle = model_dir_or_model
    if isinstance(bundle, (str, os.PathLike)):
        bundle = load_model(bundle)
    if isinstance(bundle, ModelBundle):
        model, size = bundle.model, bundle.input_size
    else:
        model, size = bundle, input_size
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    outs = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(dev)
        outs.append(model(to_input(x, size)).float().cpu())
    model.train(was_training)
    n_cols = sum(p.shape[0] for n, p in model.named_parameters() if n == "fc.bias")
    raw = torch.cat(outs).numpy().astype(np.float64) if outs else np.zeros((0, n_cols))
    if not isinstance(bundle, ModelBundle):
        return raw
    if bundle.head == "regression":
        return raw * bundle.std + bundle.mean
    if bundle.head == "mean_variance":
        t = raw.reshape(len(raw), -1, 2)
        return np.stack([t[..., 0] * bundle.std + bundle.mean,
                         np.exp(t[..., 1]) * bundle.std ** 2], axis=-1)
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

