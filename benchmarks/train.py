"""Training throughput: images/s, the share of a step spent on data + augmentation, and the
implied time of the full Sci Rep 2020 study (64 fields x 7 folds = 448 trainings of 6000
iterations; the paper: under 25 minutes per training on a GTX 1080 Ti).

Usage: python benchmarks/train.py [--steps 3] [--device auto] [--skip-resnet50]

Each setting runs the library's own data path (a batch indexed from a uint8 array, moved to the
device, translated per sample with edge replication, converted and resized) and the model step
(forward, loss, backward, optimiser), timed separately with device synchronisation, after one
warm-up step. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import numpy as np
import torch

from biometry.config.study import load_study
from biometry.config.training import TrainConfig
from biometry.learn import augment, devices, losses, trainer
from biometry.learn.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: TrainConfig, image_shape: tuple[int, int, int], n_outputs: int, steps: int,
            device: torch.device, n_images: int = 256) -> dict[str, float]:
    """Mean seconds per step for data (+augmentation) and for the model; images/s."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images,) + image_shape, dtype=np.uint8)
    targets = rng.normal(size=(n_images, n_outputs)).astype(np.float32)
    ds = trainer.BatchDataset(images, targets, np.arange(n_images), cfg.batch_size, cfg.seed,
                           cfg.translate_px)
    use_amp = devices.auto_flag(cfg.amp, device)
    amp_dtype = devices.amp_dtype(device)
    channels_last = devices.auto_flag(cfg.channels_last, device)
    model = build_model(cfg.arch, image_shape[0], n_outputs, cfg.head).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    t_data, t_model = [], []
    for it in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        batch = ds[it]
        x = batch["images"].to(device, non_blocking=True)
        y = batch["targets"].to(device, non_blocking=True)
        x = augment.translate(x, batch["shifts"].to(device))
        x = augment.to_input(x, cfg.input_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = model(x)
        loss = losses.compute_loss(out, y, cfg.loss)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        float(loss.detach())
        _sync(device)
        t2 = time.perf_counter()
        if it:  # the first step warms up allocators and kernels
            t_data.append(t1 - t0)
            t_model.append(t2 - t1)
    data, mdl = float(np.mean(t_data)), float(np.mean(t_model))
    return {"data_s": data, "model_s": mdl, "step_s": data + mdl,
            "images_per_s": cfg.batch_size / (data + mdl), "data_share": data / (data + mdl)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (default 3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-resnet50", action="store_true", help="only the demo preset")
    a = ap.parse_args(argv)
    device = devices.resolve_device(a.device)
    sci = load_study("scirep2020").train_config(device=str(device), amp=False,
                                                channels_last=False)
    demo = load_study("demo")
    settings = []
    if not a.skip_resnet50:
        settings.append(("ResNet50 256x256 fp32 (scirep2020)", sci, (2, 256, 256), 1))
    settings.append((f"demo: ResNet18 {demo.training.input_size[0]}px from 256 "
                     f"({len(demo.fields)} fields)",
                     demo.train_config(device=str(device)), (2, 256, 256), len(demo.fields)))
    if device.type == "cuda" and not a.skip_resnet50:
        settings.append(("ResNet50 256x256 AMP + channels_last",
                         dataclasses.replace(sci, amp=True, channels_last=True),
                         (2, 256, 256), 1))
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or 'cpu'}), torch {torch.__version__}, {threads} threads, "
          f"{a.steps} timed steps after 1 warm-up\n")
    print("| setting | batch | step s | data+aug s | data share | images/s |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for label, cfg, shape, n_out in settings:
        r = measure(cfg, shape, n_out, a.steps, device)
        rows[label] = (cfg, r)
        print(f"| {label} | {cfg.batch_size} | {r['step_s']:.3f} | {r['data_s']:.4f} | "
              f"{100 * r['data_share']:.1f} % | {r['images_per_s']:.1f} |", flush=True)
    print()
    for label, (cfg, r) in rows.items():
        if label.startswith("ResNet50"):
            per = cfg.iterations * r["step_s"]
            print(f"{label}: one Sci Rep training ({cfg.iterations} iterations) ~ "
                  f"{per / 60:.1f} min; the full study (448 trainings) ~ {448 * per / 3600:.1f} h "
                  f"on this device, one training at a time (paper: < 25 min per training on a "
                  f"GTX 1080 Ti)")
        else:
            d = load_study("demo")
            per = cfg.iterations * r["step_s"]
            print(f"{label}: one demo fold ({cfg.iterations} iterations) ~ {per / 60:.1f} min; "
                  f"{d.folds} folds ~ {d.folds * per / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
