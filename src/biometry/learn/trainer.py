"""The iteration-based training loop: one network, one fold, plain arrays in, plain files out.

Inputs are plain arrays: ``images`` uint8 (N, C, H, W) (an ndarray or a memory map), ``targets``
float (N, T) with NaN for a missing label, and ``eids``. :func:`train` trains on ``train_idx`` and
writes, into ``out_dir``:

* ``model.pt``: the model bundle (architecture, head, fields, standardisation, state dict);
* ``predictions.csv``: out-of-fold predictions for ``val_idx`` (eid, fold, field, reference,
  prediction, variance) in the target's units, one row per subject and labelled field;
* ``metrics.json``: per field r2, mae, n (classification: accuracy, auc, n), final loss,
  iterations: only what the data, configuration and seed determine (byte-comparable);
* ``timing.json``: wall-clock seconds of training, data loading and the whole call, and the
  torch threads it ran with (the result depends on them);
* ``checkpoint.pt`` every ``checkpoint_every`` iterations while training (removed at the end
  unless ``keep_checkpoint``), from which a killed training resumes exactly.

Decisions (see ``docs/training.md``):

* **Input scaling** is ``uint8 / 255`` (the original fed 0-255 floats; the first BatchNorm makes the
  two equivalent for a network trained from scratch, and [0, 1] suits fp16).
* **Subjects in canonical order**: ``train_idx`` and ``val_idx`` are put in eid order
  (:func:`biometry.data.store.canonical_order`) before anything uses them, so the
  standardisation, every batch, the prediction table and the training hash do not depend on the
  order of the rows of ``images`` (a store's row order records which worker finished first).
* **Batches are a pure function of (seed, iteration)**: the training subjects are visited in a
  fresh seeded permutation per epoch, and the translation of every sample of iteration ``i`` is
  drawn from ``numpy.random.default_rng([seed, 1, i])``. Augmentation therefore differs across
  samples, batches and data-loader workers (the workers of the original code shared one seed), is
  reproducible for a seed, and the data order needs no state beyond the iteration number: resuming
  at iteration ``i`` reproduces the batches of an uninterrupted run exactly.
* **Translation** by integer shifts up to ``±translate_px`` (in the stored image's pixels) with edge
  replication, done on the whole uint8 batch on the training device by clamped gathers, *before*
  resizing to ``input_size``.
* **input_size** resizes (antialiased bilinear) rather than crops: the demo trains on the store's
  256 × 256 images downsampled to 96 or 128 px on the fly; the whole body stays in view.
* **Standardisation**: each field is z-scored with the mean and SD (ddof=1) of its labelled
  *training* subjects; the parameters are stored in the bundle and undone for predictions.
* **Losses** average over the labels that are present only (the MIMIR loss averaged masked zeros
  too, which down-weighted fields with many gaps).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from biometry import fileio
from biometry.config.training import TrainConfig
from biometry.data.store import canonical_order
from biometry.learn.augment import batch_positions, batch_shifts, to_input, translate
from biometry.learn.bundle import bundle_from_raw, predict
from biometry.learn.devices import amp_dtype as autocast_dtype
from biometry.learn.devices import auto_flag, resolve_device
from biometry.learn.losses import compute_loss
from biometry.learn.models import build_model, save_torch, set_train_mode


@dataclass
class TrainResult:
    """What :func:`train` returns (everything is also on disk in ``out_dir``)."""

    out_dir: Path
    model: nn.Module
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    lr_history: list[float] = field(default_factory=list)
    loss_history: list[float] = field(default_factory=list)
    skipped: bool = False
    #: wall-clock seconds (train, data, total), also in ``timing.json``; not in ``metrics.json``
    timing: dict[str, float] = field(default_factory=dict)



class BatchDataset(torch.utils.data.Dataset):
    """Item ``i`` is the whole batch of iteration ``i``: uint8 images, targets and shifts."""

    def __init__(self, images, targets: np.ndarray, subjects: np.ndarray, batch_size: int,
                 seed: int, translate_px: int) -> None:
        self.images, self.targets, self.subjects = images, targets, subjects
        self.batch_size, self.seed, self.translate_px = batch_size, seed, translate_px

    def __len__(self) -> int:  # pragma: no cover - the sampler decides the range
        return sys.maxsize

    def __getitem__(self, iteration: int) -> dict[str, torch.Tensor]:
        pos = batch_positions(len(self.subjects), self.batch_size, iteration, self.seed)
        rows = self.subjects[pos]
        order = np.argsort(rows, kind="stable")   # sorted reads are kinder to memory maps
        imgs = np.empty((len(rows),) + tuple(self.images.shape[1:]), dtype=np.uint8)
        imgs[order] = self.images[rows[order]]
        return {"images": torch.from_numpy(imgs),
                "targets": torch.from_numpy(self.targets[rows]),
                "shifts": torch.from_numpy(batch_shifts(len(rows), iteration, self.seed,
                                                        self.translate_px)),
                "iteration": torch.tensor(iteration)}


def seed_worker(_worker_id: int) -> None:
    # Randomness is keyed by (seed, iteration), not by worker state; workers only need to leave
    # the cores to the training process.
    torch.set_num_threads(1)



# ---------------------------------------------------------------------------------------------
# training


def _train_hash(eids: Sequence[str], idx: np.ndarray, targets: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update("\n".join(str(eids[i]) for i in idx).encode())
    h.update(np.ascontiguousarray(targets[idx]).tobytes())
    return h.hexdigest()[:16]


def _in_eid_order(idx: np.ndarray, eids: Sequence[str]) -> np.ndarray:
    """``idx`` (row indices) reordered so that their eids are in canonical order."""
    return idx[canonical_order([eids[i] for i in idx])]


def _validate_inputs(config: TrainConfig, images, targets: np.ndarray, train_idx: np.ndarray,
                     val_idx: np.ndarray, eids: Sequence[str], field_keys: Sequence[str]) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if images.shape[1] != config.in_channels:
        raise ValueError(f"images have {images.shape[1]} channels but the config expects "
                         f"in_channels={config.in_channels}")
    if targets.ndim != 2 or targets.shape[1] != len(field_keys):
        raise ValueError(f"targets must be (N, T) with T = {len(field_keys)} fields "
                         f"({', '.join(field_keys)}), got shape {targets.shape}")
    if not (len(images) == len(targets) == len(eids)):
        raise ValueError(f"images ({len(images)}), targets ({len(targets)}) and eids "
                         f"({len(eids)}) differ in length")
    for name, idx in (("train_idx", train_idx), ("val_idx", val_idx)):
        if len(idx) and (idx.min() < 0 or idx.max() >= len(images)):
            raise ValueError(f"{name} out of range 0..{len(images) - 1}")
    both = np.intersect1d(train_idx, val_idx)
    if len(both):
        raise ValueError(f"{len(both)} subjects are in both train_idx and val_idx, e.g. eid "
                         f"{eids[both[0]]}")
    if config.head == "classification" and targets.shape[1] != 1:
        raise ValueError("classification trains one field per network")


def fit_standardization(targets: np.ndarray, train_idx: np.ndarray,
                        field_keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-field mean and SD (ddof=1) over the labelled training subjects, (T,) each.

    Raises ``ValueError`` naming a field with fewer than 2 labelled training subjects or SD 0.
    """
    y = targets[train_idx].astype(np.float64)
    n = np.sum(~np.isnan(y), axis=0)
    bad = [f"{k} ({c} labelled)" for k, c in zip(field_keys, n, strict=True) if c < 2]
    if bad:
        raise ValueError(f"too few labelled training subjects for field(s): {', '.join(bad)}")
    mean = np.nanmean(y, axis=0)
    std = np.nanstd(y, axis=0, ddof=1)
    const = [k for k, s in zip(field_keys, std, strict=True) if not s > 0]
    if const:
        raise ValueError(f"field(s) {', '.join(const)} are constant over the training subjects")
    return mean, std


def _class_targets(config: TrainConfig, targets: np.ndarray, train_idx: np.ndarray
                   ) -> tuple[np.ndarray, float | None, int]:
    y = targets[:, :1].astype(np.float64)
    if config.class_split == "median":
        thr = float(np.nanmedian(y[train_idx]))
        lab = np.where(np.isnan(y), np.nan, (y > thr).astype(np.float64))
        return lab, thr, 2
    present = y[~np.isnan(y)]
    if len(present) == 0 or np.any(present != np.round(present)) or present.min() < 0:
        raise ValueError("classification targets must be class labels 0..K-1 (or class_split: median)")
    return y, None, int(present.max()) + 1


def _checkpoint_path(out_dir: Path) -> Path:
    return out_dir / "checkpoint.pt"


def train(
    config: TrainConfig,
    images,
    targets: np.ndarray,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    out_dir: str | os.PathLike,
    eids: Sequence[str],
    field_keys: Sequence[str],
    resume: bool = True,
    progress: bool = True,
    *,
    fold: int = 0,
    callback: Callable[[int, float, float], None] | None = None,
    keep_checkpoint: bool = False,
    input_grid_mm: Sequence[float] | None = None,
) -> TrainResult:
    """Train one network on ``train_idx`` and predict ``val_idx`` (out-of-fold).

    Parameters
    ----------
    config : the training configuration.
    images : uint8 (N, C, H, W) array or memory map; indexed per batch, never loaded whole.
    targets : float (N, T), NaN = missing label, in the fields' units.
    train_idx, val_idx : row indices into images/targets/eids (disjoint), in any order: both are
        put in eid order first, so results do not depend on the row order. Training rows without
        any label are skipped.
    out_dir : the run folder (created); see the module docstring for its files.
    eids : (N,) subject ids (str).
    field_keys : (T,) field keys (str), the columns of targets.
    resume : continue from ``out_dir/checkpoint.pt`` if present (exact: same final weights as an
        uninterrupted run); a finished run (``model.pt`` and ``metrics.json`` with this config) is
        loaded and returned with ``skipped=True``. False starts afresh.
    progress : a tqdm progress bar on stderr.
    fold : written into predictions.csv.
    callback : ``callback(iterations_done, loss, lr)`` after each iteration (after a checkpoint).
    keep_checkpoint : keep ``checkpoint.pt`` (with optimiser state) after training.
    input_grid_mm : the fused grid (mm) the images were prepared on (their store's), kept in
        ``model.pt`` so that an exported bundle prepares new subjects alike; None: unknown.

    Returns
    -------
    TrainResult
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eids = [str(e) for e in eids]
    field_keys = [str(k) for k in field_keys]
    targets = np.asarray(targets, dtype=np.float64)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    val_idx = np.asarray(val_idx, dtype=np.int64)
    _validate_inputs(config, images, targets, train_idx, val_idx, eids, field_keys)
    train_idx = _in_eid_order(train_idx, eids)
    val_idx = _in_eid_order(val_idx, eids)
    train_idx = train_idx[~np.all(np.isnan(targets[train_idx]), axis=1)]
    cfg_dict = config.to_dict()

    if resume and (out_dir / "model.pt").is_file() and (out_dir / "metrics.json").is_file():
        bundle_raw = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)
        if bundle_raw.get("config") == cfg_dict and bundle_raw.get("train_hash") == _train_hash(
                eids, train_idx, targets):
            return _finished_result(out_dir, bundle_raw)

    # targets as the network sees them
    threshold = None
    if config.head == "classification":
        y_net, threshold, n_classes = _class_targets(config, targets, train_idx)
        mean = np.zeros(1)
        std = np.ones(1)
        n_out = n_classes
    else:
        mean, std = fit_standardization(targets, train_idx, field_keys)
        y_net = (targets - mean) / std
        n_out = len(field_keys)
    y_net = y_net.astype(np.float32)

    device = resolve_device(config.device)
    use_amp = auto_flag(config.amp, device)
    amp_dtype = autocast_dtype(device)
    channels_last = auto_flag(config.channels_last, device)
    n_iter = config.resolve_iterations(len(train_idx))

    model = build_model(config.arch, config.in_channels, n_out, config.head, config.weights,
                        config.freeze_backbone, seed=config.seed)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.lr_steps), gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    train_hash = _train_hash(eids, train_idx, targets)
    start, lr_hist, loss_hist, data_s, elapsed_before = 0, [], [], 0.0, 0.0
    ckpt_path = _checkpoint_path(out_dir)
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("config") != cfg_dict or ck.get("train_hash") != train_hash:
            raise ValueError(f"{ckpt_path} was written by a different configuration or training "
                             f"set; delete it or train with resume=False")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng_cpu"])
        if device.type == "cuda" and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"], device)
        start, lr_hist, loss_hist = int(ck["iteration"]), list(ck["lr_history"]), list(
            ck["loss_history"])
        data_s, elapsed_before = float(ck["data_seconds"]), float(ck["train_seconds"])

    dataset = BatchDataset(images, y_net, train_idx, config.batch_size, config.seed,
                       config.translate_px)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, n_iter), num_workers=config.num_workers,
        pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
        prefetch_factor=2 if config.num_workers else None)

    bar = tqdm(total=n_iter, initial=start, disable=not progress, mininterval=10, file=sys.stderr,
               desc=f"train {'+'.join(field_keys)[:40]} fold {fold}")
    t_loop = time.perf_counter()
    set_train_mode(model, config.freeze_backbone)
    it = start
    t_fetch = time.perf_counter()
    for batch in loader:
        x = batch["images"].to(device, non_blocking=True)
        y = batch["targets"].to(device, non_blocking=True)
        if config.translate_px:
            x = translate(x, batch["shifts"].to(device, non_blocking=True))
        x = to_input(x, config.input_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        data_s += time.perf_counter() - t_fetch
        lr_now = opt.param_groups[0]["lr"]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = model(x)
        loss = compute_loss(out, y, config.loss)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        it += 1
        loss_value = float(loss.detach())
        lr_hist.append(lr_now)
        loss_hist.append(loss_value)
        bar.update(1)
        if progress and it % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(loss_hist[-50:]):.4f}", lr=f"{lr_now:.1e}")
        if config.checkpoint_every and it % config.checkpoint_every == 0 and it < n_iter:
            save_torch(ckpt_path, {
                "config": cfg_dict, "train_hash": train_hash, "iteration": it,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "lr_history": lr_hist, "loss_history": loss_hist, "data_seconds": data_s,
                "train_seconds": elapsed_before + time.perf_counter() - t_loop,
            })
        if callback is not None:
            callback(it, loss_value, lr_now)
        t_fetch = time.perf_counter()
    bar.close()
    train_seconds = elapsed_before + time.perf_counter() - t_loop

    model.eval()
    bundle = {
        "format_version": 1, "arch": config.arch, "in_channels": config.in_channels,
        "n_outputs": n_out, "head": config.head, "field_keys": field_keys,
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "class_threshold": threshold, "input_size": cfg_dict["input_size"],
        "config": cfg_dict, "train_hash": train_hash,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "lr_history": lr_hist, "loss_history": loss_hist,
        "input_grid_mm": None if input_grid_mm is None else [float(v) for v in input_grid_mm],
    }
    save_torch(out_dir / "model.pt", bundle)

    loaded = bundle_from_raw(bundle, model)
    preds = predict(loaded, images[val_idx] if len(val_idx) else images[:0], device=str(device))
    table = _prediction_table(config.head, preds, targets, y_net, val_idx, eids, field_keys, fold)
    metrics = _metrics(config.head, table, field_keys, n_classes=n_out)
    tail = loss_hist[-min(50, len(loss_hist)):] if loss_hist else [float("nan")]
    # wall-clock times go to their own file: metrics.json holds only what the seed determines,
    # so that two runs of one configuration can be compared byte for byte
    timing = {"train_seconds": round(train_seconds, 3), "data_seconds": round(data_s, 3),
              "total_seconds": round(time.perf_counter() - t_start, 3),
              "torch_threads": torch.get_num_threads()}
    metrics.update({
        "iterations": n_iter,
        "final_loss": float(np.mean(tail)), "last_loss": float(tail[-1]),
        "n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "fold": int(fold),
        "device": str(device), "amp": bool(use_amp), "fields": field_keys,
        "head": config.head, "class_threshold": threshold,
    })
    fileio.write_csv(out_dir / "predictions.csv", table)
    fileio.write_json(out_dir / "timing.json", timing)
    fileio.write_json(out_dir / "metrics.json", metrics)
    if not keep_checkpoint and ckpt_path.is_file():
        ckpt_path.unlink()
    return TrainResult(out_dir, model, metrics, table, lr_hist, loss_hist, timing=timing)


def _finished_result(out_dir: Path, raw: dict[str, Any]) -> TrainResult:

    bundle = bundle_from_raw(raw)
    timing_file = out_dir / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    return TrainResult(out_dir, bundle.model, json.loads((out_dir / "metrics.json").read_text()),
                       pd.read_csv(out_dir / "predictions.csv", dtype={"eid": str, "field": str}),
                       list(raw.get("lr_history", [])), list(raw.get("loss_history", [])),
                       skipped=True, timing=timing)


def _prediction_table(head: str, preds: np.ndarray, targets: np.ndarray, y_net: np.ndarray,
                      val_idx: np.ndarray, eids: list[str], field_keys: list[str],
                      fold: int) -> pd.DataFrame:
    rows = []
    for j, key in enumerate(field_keys):
        ref = y_net[val_idx, 0] if head == "classification" else targets[val_idx, j]
        if head == "regression":
            pred, var = preds[:, j], np.full(len(val_idx), np.nan)
        elif head == "mean_variance":
            pred, var = preds[:, j, 0], preds[:, j, 1]
        else:
            pred, var = preds[:, 1] if preds.shape[1] == 2 else preds.argmax(1), np.full(
                len(val_idx), np.nan)
        keep = ~np.isnan(ref)
        rows.append(pd.DataFrame({
            "eid": [eids[i] for i in val_idx[keep]], "fold": fold, "field": key,
            "reference": ref[keep].astype(np.float64), "prediction": pred[keep].astype(np.float64),
            "variance": var[keep].astype(np.float64)}))
    cols = ["eid", "fold", "field", "reference", "prediction", "variance"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def _metrics(head: str, table: pd.DataFrame, field_keys: list[str],
             n_classes: int = 2) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for key in field_keys:
        t = table[table["field"] == key]
        ref, pred = t["reference"].to_numpy(), t["prediction"].to_numpy()
        n = len(t)
        if head == "classification":
            # binary: the prediction is P(class 1); more classes: it is the argmax class
            label = (pred > 0.5).astype(np.float64) if n_classes == 2 else pred
            acc = float(np.mean(label == ref)) if n else float("nan")
            auc = float(roc_auc_score(ref, pred)) if n and len(np.unique(ref)) == 2 else float("nan")
            per[key] = {"accuracy": acc, "auc": auc, "n": n}
        else:
            defined = n > 1 and np.ptp(ref) > 0  # R² of a constant reference is undefined
            r2 = float(r2_score(ref, pred)) if defined else float("nan")
            mae = float(mean_absolute_error(ref, pred)) if n else float("nan")
            per[key] = {"r2": r2, "mae": mae, "n": n}
    return {"per_field": per}


