"""Training settings of a study (``training:`` in its YAML): :class:`TrainConfig`, validated.

Plain data, no torch: the study layer reads and checks it; ``biometry.learn`` acts on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: network architectures and output heads that :func:`biometry.learn.models.build_model` builds.
ARCHS = ("resnet50", "resnet18")
HEADS = ("regression", "mean_variance", "classification")
LOSSES = ("mse", "gaussian_nll", "cross_entropy")
OPTIMIZERS = ("adam", "sgd")
HEAD_LOSS = {"regression": "mse", "mean_variance": "gaussian_nll",
              "classification": "cross_entropy"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training (the ``training:`` block of a study file).

    Attributes
    ----------
    arch : "resnet50" | "resnet18".
    in_channels : image channels C of the format.
    input_size : None (native size) or the (H, W) the batch is resized to; an int means square.
    head : "regression" | "mean_variance" | "classification".
    loss : "mse" (regression) | "gaussian_nll" (mean_variance) | "cross_entropy" (classification).
    optimizer, lr, momentum (SGD only), weight_decay : the optimiser.
    batch_size : images per iteration.
    iterations : number of optimiser steps; or give ``epochs`` instead (resolved with the number of
        training subjects: ``ceil(epochs * n_train / batch_size)``).
    lr_steps : iterations (0-based) from which lr is divided by 10 (MultiStepLR per iteration):
        ``lr_steps=(5000,)`` with 6000 iterations trains the last 1000 at lr/10.
    translate_px : maximum translation in stored-image pixels (0 disables augmentation).
    class_split : classification only: "median" binarises the (single) field at the median of the
        training subjects (1 = above); None takes the targets as class labels 0..K-1.
    weights, freeze_backbone : see :func:`biometry.learn.models.build_model`.
    seed : initialisation, data order and augmentation.
    device : "auto" (cuda if available) | "cpu" | "cuda" | "cuda:1" ...
    amp : "auto" (on CUDA) | True | False; bfloat16 where supported, else float16 + GradScaler.
    channels_last : "auto" (on CUDA) | True | False.
    checkpoint_every : iterations between checkpoints (0: none).
    num_workers : data-loader worker processes (0: load in the training process).
    """

    arch: str = "resnet50"
    in_channels: int = 2
    input_size: tuple[int, int] | None = None
    head: str = "regression"
    loss: str = "mse"
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    iterations: int = 6000
    epochs: float = 0.0
    lr_steps: tuple[int, ...] = (5000,)
    translate_px: int = 16
    class_split: str | None = "median"
    weights: str | None = None
    freeze_backbone: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool | str = "auto"
    channels_last: bool | str = "auto"
    checkpoint_every: int = 500
    num_workers: int = 0

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, (int, np.integer)):
            object.__setattr__(self, "input_size", (int(size), int(size)))
        elif size is not None:
            object.__setattr__(self, "input_size", tuple(int(s) for s in size))
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in (self.lr_steps or ())))
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))
        errors = []
        if self.arch not in ARCHS:
            errors.append(f"arch {self.arch!r} not in {ARCHS}")
        if self.head not in HEADS:
            errors.append(f"head {self.head!r} not in {HEADS}")
        if self.loss not in LOSSES:
            errors.append(f"loss {self.loss!r} not in {LOSSES}")
        elif self.head in HEADS and HEAD_LOSS[self.head] != self.loss:
            errors.append(f"loss {self.loss!r} does not fit head {self.head!r} "
                          f"(use {HEAD_LOSS[self.head]!r})")
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"optimizer {self.optimizer!r} not in {OPTIMIZERS}")
        if (self.iterations > 0) == (self.epochs > 0):
            errors.append("give exactly one of iterations and epochs (> 0)")
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 8):
            errors.append(f"input_size {self.input_size} must be None, an int or (H, W) >= 8")
        for name in ("in_channels", "batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1")
        for name in ("translate_px", "checkpoint_every", "num_workers"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0")
        if self.lr <= 0:
            errors.append("lr must be > 0")
        if self.class_split not in (None, "median"):
            errors.append(f"class_split {self.class_split!r} must be 'median' or null")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. a YAML block); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), for YAML/JSON and for checkpoint comparison."""
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size else None
        d["lr_steps"] = list(self.lr_steps)
        return d

    def resolve_iterations(self, n_train: int) -> int:
        """The number of iterations for ``n_train`` training subjects."""
        if self.iterations > 0:
            return int(self.iterations)
        return int(math.ceil(self.epochs * n_train / self.batch_size))


