"""Transfer learning on slice stacks (the thigh-function study): a frozen backbone, a trained
last layer, and the backbone that stands in for ImageNet on the phantom.

* :func:`median_split` makes the high/low labels of a measure (1 = above the median of the
  training subjects of the whole cohort, whatever subgroup a network is then trained on).
* :func:`extract_features` runs the frozen backbone of a :class:`~biometry.learn.models.SliceNet`
  once per subject (eval mode, no gradient): (N, F).
* :func:`train_last_layer` trains ``fc`` alone with SGD and cross-entropy on those features.
  With the backbone frozen and its BatchNorm in eval mode, and no augmentation, this is the same
  optimisation as running the whole network for every batch, only 15 x (slices) cheaper per
  epoch. The features are standardised with the training subjects' mean and SD during training
  (a preconditioning of the same linear model: the random control's features are orders of
  magnitude larger than a trained backbone's, and plain SGD at lr 1e-4 would diverge on them);
  the standardisation is folded into ``fc`` at the end, so the result is an ordinary
  ``Linear(F, K)`` on the backbone's features. Nothing else in the network changes.
* :func:`pretrain_backbone` trains a whole SliceNet on the phantom's own regression fields (MSE on
  z-scored targets, missing labels masked, Adam), on the training subjects only, and returns the
  backbone's state dict: the phantom's honest stand-in for ImageNet weights, which cannot be
  downloaded here.

Every random choice takes a seed; the global RNG state is not touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from biometry.config.training import TrainConfig
from biometry.learn.models import SliceNet, build_slice_model


def median_split(values: np.ndarray, train_idx: Sequence[int]) -> tuple[np.ndarray, float]:
    """High/low labels at the median of the labelled training subjects.

    Parameters
    ----------
    values : (N,) float, NaN = missing.
    train_idx : rows whose median defines the threshold.

    Returns
    -------
    labels : (N,) float: 1.0 above the median, 0.0 at or below it, NaN where ``values`` is NaN.
    threshold : the median.
    """
    values = np.asarray(values, dtype=np.float64)
    train = values[np.asarray(train_idx, dtype=np.int64)]
    train = train[~np.isnan(train)]
    if len(train) < 2:
        raise ValueError(f"a median split needs >= 2 labelled training subjects, got {len(train)}")
    thr = float(np.median(train))
    labels = np.where(np.isnan(values), np.nan, (values > thr).astype(np.float64))
    return labels, thr


@torch.no_grad()
def extract_features(model: SliceNet, images, batch_size: int = 16,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Backbone features of every subject: (N, F) float32 (eval mode, no gradient).

    ``images`` is uint8 (N, S, H, W) (an array or a memory map; read ``batch_size`` at a time).
    """
    model.eval()
    model.to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start: start + batch_size])).to(device)
        out.append(model.features(x).float().cpu().numpy())
    n_feat = model.fc.in_features
    return np.concatenate(out) if out else np.zeros((0, n_feat), dtype=np.float32)


def train_last_layer(model: SliceNet, features: np.ndarray, labels: np.ndarray,
                     train_idx: Sequence[int], *, lr: float = 1e-4, momentum: float = 0.9,
                     batch_size: int = 8, epochs: int = 50, weight_decay: float = 0.0,
                     seed: int = 0) -> list[float]:
    """Train ``model.fc`` alone (cross-entropy, SGD) on precomputed backbone features.

    Parameters
    ----------
    model : a SliceNet whose ``fc`` has K outputs; its backbone is not touched.
    features : (N, F) from :func:`extract_features` with this model's backbone.
    labels : (N,) class labels 0..K-1 (float with NaN = unlabelled is accepted).
    train_idx : rows to train on (unlabelled ones are skipped).
    lr, momentum, batch_size, epochs, weight_decay : the optimiser (the abstract: SGD 1e-4,
        momentum 0.9, batch 8, 50 epochs).
    seed : initialisation of ``fc`` and the order of the subjects in every epoch.

    Returns
    -------
    The mean training loss of every epoch.
    """
    labels = np.asarray(labels, dtype=np.float64)
    idx = np.asarray(train_idx, dtype=np.int64)
    idx = idx[~np.isnan(labels[idx])]
    if len(idx) < 2:
        raise ValueError(f"too few labelled training subjects ({len(idx)}) for the last layer")
    x = torch.from_numpy(np.asarray(features[idx], dtype=np.float32))
    y = torch.from_numpy(labels[idx].astype(np.int64))
    k = model.fc.out_features
    if int(y.max()) >= k or int(y.min()) < 0:
        raise ValueError(f"labels must be classes 0..{k - 1}")
    mu = x.mean(dim=0)
    sd = x.std(dim=0).clamp_min(1e-6)
    xs = (x - mu) / sd
    head = nn.Linear(x.shape[1], k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    rng = np.random.default_rng([int(seed), 0x1A57])
    history = []
    for _epoch in range(int(epochs)):
        order = rng.permutation(len(idx))
        losses = []
        for start in range(0, len(order), batch_size):
            b = torch.from_numpy(order[start: start + batch_size])
            loss = nn.functional.cross_entropy(head(xs[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    with torch.no_grad():  # fold the standardisation into fc: fc(f) = head((f - mu) / sd)
        w = head.weight / sd
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(head.bias - w @ mu)
    return history


@torch.no_grad()
def predict_proba(model: SliceNet, features: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K) from backbone features (softmax of ``fc``)."""
    logits = model.fc(torch.from_numpy(np.asarray(features, dtype=np.float32)))
    return torch.softmax(logits, dim=1).numpy()


def pretrain_backbone(images, targets: np.ndarray, train_idx: Sequence[int], *,
                      arch: str = "resnet18", input_size: tuple[int, int] | None = None,
                      iterations: int = 300, batch_size: int = 8, slices_per_subject: int = 4,
                      lr: float = 1e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train a SliceNet from scratch on regression targets; return its backbone's state dict.

    Parameters
    ----------
    images : uint8 (N, S, H, W) slice stacks.
    targets : (N, T) float, NaN = missing; z-scored with the training subjects' mean and SD.
    train_idx : the subjects to train on (never the held-out ones).
    arch, input_size : as the study's network.
    iterations, batch_size, lr : Adam, MSE over the present labels.
    slices_per_subject : random slices of each subject per iteration, pooled as in the study
        (fewer than S keeps it cheap; the pooled feature still averages slices).
    seed : initialisation, subjects and slices of every iteration.

    Returns
    -------
    A ResNet state dict without ``fc`` (load it with ``build_slice_model(weights=path)`` after
    ``torch.save``).
    """
    targets = np.asarray(targets, dtype=np.float64)
    idx = np.asarray(train_idx, dtype=np.int64)
    idx = idx[~np.all(np.isnan(targets[idx]), axis=1)]
    if len(idx) < 2:
        raise ValueError("too few labelled training subjects to pretrain the backbone")
    mean = np.nanmean(targets[idx], axis=0)
    std = np.nanstd(targets[idx], axis=0, ddof=1)
    if not np.all(std > 0):
        raise ValueError("a pretraining target is constant over the training subjects")
    z = ((targets - mean) / std).astype(np.float32)
    model = build_slice_model(arch, targets.shape[1], weights=None, input_size=input_size,
                              freeze_backbone=False, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng([int(seed), 0xB0B])
    n_slices = images.shape[1]
    k = min(int(slices_per_subject), n_slices)
    model.train()
    for _it in range(int(iterations)):
        rows = np.sort(rng.choice(idx, size=min(batch_size, len(idx)), replace=False))
        picks = np.sort(np.stack([rng.choice(n_slices, size=k, replace=False) for _ in rows]), 1)
        x = torch.from_numpy(np.stack([images[r][p] for r, p in zip(rows, picks, strict=True)]))
        y = torch.from_numpy(z[rows])
        out = model(x)
        present = ~torch.isnan(y)
        loss = ((out - torch.nan_to_num(y)) ** 2)[present].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k_: v.detach().clone() for k_, v in model.backbone.state_dict().items()}


#: the subject groups a network is trained on (sex-stratified: 1 = male, as UKB field 31)
GROUPS = {"all": None, "male": 1, "female": 0}


@dataclass
class FoldResult:
    """What :func:`fit_fold` returns.

    Attributes
    ----------
    predictions : test-set rows (columns of :data:`biometry.analysis.thigh.PREDICTION_COLUMNS`;
        ``baseline`` = the larger class of the network's training subjects).
    thresholds : measure -> the whole-cohort median (high = above it).
    heads : (measure, group, backbone) -> the trained ``fc`` state dict.
    models : backbone name -> its SliceNet (the last ``fc`` loaded; see :func:`load_head`).
    losses : (measure, group, backbone) -> mean training loss per epoch.
    """

    predictions: pd.DataFrame
    thresholds: dict[str, float]
    heads: dict[tuple[str, str, str], dict[str, torch.Tensor]]
    models: dict[str, SliceNet]
    losses: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)


def load_head(model: SliceNet, head: dict[str, torch.Tensor]) -> SliceNet:
    """Put a trained ``fc`` (from :attr:`FoldResult.heads`) into ``model``; returns it."""
    model.fc.load_state_dict(head)
    return model


def fit_fold(images, measures: dict[str, np.ndarray], sex: np.ndarray, eids: Sequence[str],
             train_idx: Sequence[int], test_idx: Sequence[int],
             backbones: dict[str, str | os.PathLike | None], config: TrainConfig, *,
             fold: int = 0, groups: Sequence[str] = ("all", "male", "female"),
             feature_batch: int = 16) -> FoldResult:
    """Every network of one fold: per measure, per subject group, per backbone, a trained ``fc``.

    Parameters
    ----------
    images : uint8 (N, S, H, W) slice stacks.
    measures : measure key -> (N,) values (NaN = missing); split at the median of the labelled
        training subjects of the whole cohort (:func:`median_split`), also for the
        sex-stratified networks.
    sex : (N,) 1 = male, 0 = female (NaN: the subject joins only the ``all`` networks).
    eids : (N,) subject ids.
    train_idx, test_idx : rows of the fold's training and held-out subjects.
    backbones : name -> weights (None = random init, "imagenet", or a state-dict path); every
        backbone stays frozen. The study uses {"pretrained": <weights>, "random": None}.
    config : the study's TrainConfig (arch, input_size, lr, momentum, batch_size, epochs or
        iterations, weight_decay, seed).
    groups : which of :data:`GROUPS` to train.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    test_idx = np.sort(np.asarray(test_idx, dtype=np.int64))
    sex = np.asarray(sex, dtype=np.float64)
    eids = [str(e) for e in eids]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown subject group(s) {', '.join(unknown)}; use {', '.join(GROUPS)}")
    labels, thresholds = {}, {}
    for key, values in measures.items():
        labels[key], thresholds[key] = median_split(values, train_idx)
    rows, heads, models, losses = [], {}, {}, {}
    for bname, weights in backbones.items():
        model = build_slice_model(config.arch, 2, weights=weights, input_size=config.input_size,
                                  freeze_backbone=True, seed=config.seed)
        feats = extract_features(model, images, batch_size=feature_batch)
        models[bname] = model
        for key, lab in labels.items():
            for group in groups:
                want = GROUPS[group]
                tr = train_idx if want is None else train_idx[sex[train_idx] == want]
                te = test_idx if want is None else test_idx[sex[test_idx] == want]
                tr, te = tr[~np.isnan(lab[tr])], te[~np.isnan(lab[te])]
                if len(np.unique(lab[tr])) < 2 or len(te) == 0:
                    continue  # one class only (or nobody held out): no classifier to train
                epochs = config.epochs or config.iterations * config.batch_size / len(tr)
                losses[(key, group, bname)] = train_last_layer(
                    model, feats, lab, tr, lr=config.lr, momentum=config.momentum,
                    batch_size=config.batch_size, epochs=int(np.ceil(epochs)),
                    weight_decay=config.weight_decay, seed=config.seed)
                heads[(key, group, bname)] = {k: v.clone() for k, v in model.fc.state_dict().items()}
                prob = predict_proba(model, feats[te])[:, 1]
                rows.append(pd.DataFrame({
                    "eid": [eids[i] for i in te], "fold": int(fold), "measure": key,
                    "group": group, "backbone": bname, "set": "test", "sex": sex[te],
                    "reference": lab[te].astype(np.int64), "prediction": (prob > 0.5).astype(np.int64),
                    "probability": prob, "baseline": int(lab[tr].mean() > 0.5)}))
    preds = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return FoldResult(preds, thresholds, heads, models, losses)


def predict_external(model: SliceNet, head: dict[str, torch.Tensor], images, labels: np.ndarray,
                     eids: Sequence[str], sex: np.ndarray, *, measure: str, backbone: str,
                     fold: int = 0, feature_batch: int = 16) -> pd.DataFrame:
    """Apply one trained network to an external cohort whose only label is ``labels`` (e.g.
    self-reported exercise, 1 = yes; NaN = none): rows with ``set = "external"`` and ``reference``
    = that label, ``prediction`` = the network's high (1) / low (0) class of ``measure``, and
    ``baseline`` = the larger class of the external labels themselves."""
    load_head(model, head)
    prob = predict_proba(model, extract_features(model, images, batch_size=feature_batch))[:, 1]
    labels = np.asarray(labels, dtype=np.float64)
    keep = ~np.isnan(labels)
    return pd.DataFrame({
        "eid": [str(e) for e, k in zip(eids, keep, strict=True) if k], "fold": int(fold),
        "measure": measure, "group": "all", "backbone": backbone, "set": "external",
        "sex": np.asarray(sex, dtype=np.float64)[keep], "reference": labels[keep].astype(np.int64),
        "prediction": (prob[keep] > 0.5).astype(np.int64), "probability": prob[keep],
        "baseline": int(labels[keep].mean() > 0.5) if keep.any() else 0})
