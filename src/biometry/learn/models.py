"""ResNet50/ResNet18 networks for image-based regression and classification.

All networks are torchvision ResNets whose first convolution takes ``in_channels`` channels and
whose final ``fc`` layer is replaced by a head:

``regression``
    ``fc: Linear(features, T)``: one standardised value per field, shape (B, T).
``mean_variance``
    ``fc: Linear(features, 2 T)``: a mean and a log-variance per field, laid out as in the MIMIR
    code: the output viewed as (B, T, 2) holds ``[..., 0]`` = mean and ``[..., 1]`` = log-variance
    (both in standardised units). Use :func:`split_mean_logvar`.
``classification``
    ``fc: Linear(features, K)``: logits of K classes, shape (B, K).

:class:`SliceNet` (the thigh-function study) applies a ResNet to every slice of a (B, S, H, W)
stack as a grey image in the weights' RGB normalisation and averages the slice features per
subject, instead of feeding the slices as channels (see :func:`build_slice_model`).

Pretrained weights
------------------
``weights="imagenet"`` loads torchvision's IMAGENET1K_V1 file (the weights of the papers) from the
local torch hub cache, ``$TORCH_HOME/hub/checkpoints/`` (see :func:`imagenet_checkpoint_path`);
``weights=<path>`` loads any state dict of the same architecture. Nothing is ever downloaded: a
missing file raises ``FileNotFoundError`` saying which file to place where. Files are read with
``torch.load(path, weights_only=True)``.

The ``fc`` parameters of a loaded file are always dropped (the head is new). ``conv1`` is adapted
to the channel count as follows (pretrained filters have 3 RGB input channels):

* ``in_channels <= 3``: the first ``in_channels`` RGB filters are taken, as the original code did
  for its 2-channel fat/water input (``weight[:, :2]``); a 1-channel input takes the R filter.
* ``in_channels > 3``: every channel gets the mean of the RGB filters scaled by ``3 / in_channels``,
  so that the expected activation of conv1 on a uniform input stays that of the pretrained net.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from biometry import fileio
from biometry.config.training import ARCHS, HEADS

#: torchvision's IMAGENET1K_V1 files (the weights of ``pretrained=True`` used in 2020/21).
IMAGENET_FILES = {
    "resnet50": ("resnet50-0676ba61.pth", "ResNet50_Weights.IMAGENET1K_V1", "97.8 MB"),
    "resnet18": ("resnet18-f37072fd.pth", "ResNet18_Weights.IMAGENET1K_V1", "44.7 MB"),
}


def save_torch(target: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically, with the same bytes for the same object: saved to a path,
    torch names the archive's records after the file, here a random temporary name, so every
    save of the same weights differed (and so did a bundle's checksums)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return fileio.write_bytes(target, buf.getvalue())


def imagenet_checkpoint_path(arch: str) -> Path:
    """Where torchvision keeps the IMAGENET1K_V1 file of ``arch``: ``<hub dir>/checkpoints/<file>``.

    The hub dir follows torch: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else
    ``~/.cache/torch/hub``.
    """
    _check_arch(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[arch][0]


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")


def _missing_weights_message(arch: str, path: Path) -> str:
    fname, enum, size = IMAGENET_FILES[arch]
    return (
        f"ImageNet weights for {arch} not found: place torchvision's {enum} file {fname} ({size}) at "
        f"{path} (or set weights to its path in the study file). Nothing is downloaded here; to get "
        f"the file, run on a machine with internet access: python -c \"import torchvision; "
        f"torchvision.models.{arch}(weights='IMAGENET1K_V1')\" and copy "
        f"~/.cache/torch/hub/checkpoints/{fname} to {path.parent}/ on this machine."
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; a biometry bundle's ``state_dict`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def adapt_conv1(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt pretrained conv1 filters (64, 3, 7, 7) to ``in_channels`` input channels.

    Returns a tensor of shape (64, in_channels, 7, 7); see the module docstring for the rule.
    """
    c_in = weight.shape[1]
    if in_channels == c_in:
        return weight.clone()
    if in_channels < c_in:
        return weight[:, :in_channels].clone()
    mean = weight.mean(dim=1, keepdim=True) * (c_in / in_channels)
    return mean.repeat(1, in_channels, 1, 1)


def build_model(
    arch: str = "resnet50",
    in_channels: int = 2,
    n_outputs: int = 1,
    head: str = "regression",
    weights: str | os.PathLike | None = None,
    freeze_backbone: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A torchvision ResNet with ``in_channels`` inputs and the given head.

    Parameters
    ----------
    arch : "resnet50" or "resnet18".
    in_channels : number of image channels (2 for projections, 1 fat fraction, 3 mimir, ...).
    n_outputs : number of fields T (regression, mean_variance) or of classes K (classification).
    head : "regression" (T outputs), "mean_variance" (2 T outputs, see module doc) or
        "classification" (K logits).
    weights : None (random init), "imagenet" (torchvision's V1 file from the hub cache) or a path.
    freeze_backbone : if True, every parameter but ``fc``'s has ``requires_grad=False``.
    seed : seeds the random initialisation (in a forked RNG: the global torch state is untouched).

    Returns
    -------
    torch.nn.Module on the CPU; ``model.biometry = {"arch", "in_channels", "n_outputs", "head"}``.
    """
    _check_arch(arch)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if in_channels < 1 or n_outputs < 1:
        raise ValueError(f"in_channels ({in_channels}) and n_outputs ({n_outputs}) must be >= 1")
    if head == "classification" and n_outputs < 2:
        raise ValueError("a classification head needs n_outputs >= 2 classes")

    state = None
    if weights is not None:
        if str(weights) == "imagenet":
            path = imagenet_checkpoint_path(arch)
            if not path.is_file():
                raise FileNotFoundError(_missing_weights_message(arch, path))
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} does not exist (weights: "
                                        f"'imagenet' or a path to a {arch} state dict)")
        state = load_state_dict_file(path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(weights=None)
        if state is not None:
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise ValueError(f"{path} is not a {arch} state dict: "
                                 f"{str(exc).splitlines()[1].strip()}") from exc
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"{path} is not a {arch} state dict: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
        if in_channels != 3:
            old = model.conv1
            new = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                            stride=old.stride, padding=old.padding, bias=False)
            if weights is not None:
                with torch.no_grad():
                    new.weight.copy_(adapt_conv1(old.weight.data, in_channels))
            model.conv1 = new
        n_fc = 2 * n_outputs if head == "mean_variance" else n_outputs
        model.fc = nn.Linear(model.fc.in_features, n_fc)

    if freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    model.biometry = {"arch": arch, "in_channels": in_channels, "n_outputs": n_outputs,
                      "head": head}
    return model


def set_train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    """``model.train()``, but a frozen backbone keeps its BatchNorm statistics fixed (eval mode).

    Only ``fc`` learns when the backbone is frozen, so its features must not drift with batch
    statistics either.
    """
    model.train()
    if freeze_backbone:
        for name, m in model.named_modules():
            if name and not name.startswith("fc"):
                m.eval()


def split_mean_logvar(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a mean_variance output (B, 2 T) into mean (B, T) and log-variance (B, T)."""
    if output.ndim != 2 or output.shape[1] % 2:
        raise ValueError(f"mean_variance output must be (B, 2T), got {tuple(output.shape)}")
    view = output.view(output.shape[0], -1, 2)
    return view[..., 0], view[..., 1]


# ---------------------------------------------------------------------------------------------
# slice-wise networks (the thigh-function study)

#: the input normalisation of torchvision's ImageNet weights (RGB mean and SD of [0, 1] pixels)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SliceNet(nn.Module):
    """A 2D backbone applied to every slice of a stack, features averaged per subject, one head.

    A stack of S axial slices (B, S, H, W) uint8 is *not* fed as S channels: with a pretrained
    3-channel conv1 that would collapse the slices into one averaged image (every channel gets
    the same filter). Instead each slice is one grey image: scaled to [0, 1], resized to
    ``input_size`` (antialiased bilinear), repeated into the 3 channels the weights expect and
    normalised with the weights' mean and SD (ImageNet's by default); the backbone (a ResNet
    without ``fc``) gives F features per slice; their mean over the S slices is the subject's
    feature vector; ``fc`` maps it to the outputs.

    Attributes
    ----------
    backbone : torchvision ResNet with ``fc = Identity`` (outputs (N, F)).
    fc : ``Linear(F, n_outputs)``.
    """

    def __init__(self, backbone: nn.Module, n_features: int, n_outputs: int,
                 input_size: tuple[int, int] | None = None,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(n_features, n_outputs)
        self.input_size = tuple(int(s) for s in input_size) if input_size else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def slice_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, H, W) -> normalised float (B * S, 3, h, w), slice-major per subject."""
        if x.ndim != 4:
            raise ValueError(f"slice stacks must be (B, S, H, W), got {tuple(x.shape)}")
        b, s, h, w = x.shape
        g = x.reshape(b * s, 1, h, w).float().div(255.0)
        if self.input_size is not None and (h, w) != self.input_size:
            g = nn.functional.interpolate(g, size=self.input_size, mode="bilinear",
                                          antialias=True, align_corners=False)
        return (g.expand(-1, 3, -1, -1) - self.mean) / self.std

    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, H, W) -> backbone features of every slice (B, S, F)."""
        b, s = x.shape[:2]
        return self.backbone(self.slice_inputs(x)).reshape(b, s, -1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, H, W) -> the subject's feature vector (B, F): the mean over its slices."""
        return self.slice_features(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_slice_model(arch: str = "resnet18", n_outputs: int = 2,
                      weights: str | os.PathLike | None = None,
                      input_size: tuple[int, int] | None = None, freeze_backbone: bool = True,
                      seed: int = 0) -> SliceNet:
    """A :class:`SliceNet` on a torchvision ResNet.

    Parameters
    ----------
    arch : "resnet18" or "resnet50".
    n_outputs : classes (or regression targets) of ``fc``.
    weights : None (random), "imagenet" (torchvision's file, offline) or a path to a ResNet state
        dict, e.g. one written by :func:`biometry.learn.transfer.pretrain_backbone`; the 3-channel
        conv1 is kept as it is (each slice is repeated into RGB).
    input_size : (h, w) each slice is resized to; None keeps the stored size.
    freeze_backbone : every parameter but ``fc``'s has ``requires_grad=False``; keep the backbone
        in eval mode (:func:`set_slice_train_mode`) so that BatchNorm statistics stay fixed too.
    seed : seeds the random initialisation (forked RNG).
    """
    resnet = build_model(arch, in_channels=3, n_outputs=1, head="regression", weights=weights,
                         seed=seed)
    n_features = resnet.fc.in_features
    resnet.fc = nn.Identity()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = SliceNet(resnet, n_features, n_outputs, input_size)
    if freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad = False
    model.biometry = {"arch": arch, "n_outputs": n_outputs, "slice_net": True,
                      "input_size": list(model.input_size) if model.input_size else None}
    return model


def set_slice_train_mode(model: SliceNet, freeze_backbone: bool) -> None:
    """Train mode for ``fc`` (and the backbone unless frozen: then its BatchNorm stays in eval)."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()
