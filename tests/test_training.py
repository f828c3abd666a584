"""The training loop: augmentation, losses, schedule, exact resume, outputs, learning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from biometry.config.training import TrainConfig
from biometry.learn import augment, bundle, losses, trainer

torch.set_num_threads(1)


def _tiny(**kw) -> TrainConfig:
    base = dict(arch="resnet18", in_channels=1, batch_size=8, iterations=6, lr=1e-3,
                lr_steps=(), translate_px=2, checkpoint_every=0, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _brightness_data(n: int, size: int = 16, seed: int = 0):
    """Images whose mean brightness is the target (plus a second, noisier field)."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(30, 220, n)
    imgs = np.clip(level[:, None, None, None] + rng.normal(0, 15, (n, 1, size, size)), 0, 255)
    targets = np.stack([level * 0.5 + 10, level * 0.1 + rng.normal(0, 2, n)], axis=1)
    return imgs.astype(np.uint8), targets, [f"{5000000 + i}" for i in range(n)]


# -- augmentation -----------------------------------------------------------------------------

def test_translate_replicates_edges_like_scipy_nearest():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 2, 9, 11), dtype=np.uint8)
    shifts = np.array([[2, -3], [-4, 1], [0, 0]])
    out = augment.translate(torch.from_numpy(x), torch.from_numpy(shifts)).numpy()
    for b in range(3):
        ref = ndimage.shift(x[b], (0, *shifts[b]), order=0, mode="nearest")
        np.testing.assert_array_equal(out[b], ref)
    # the rows shifted in from the top copy the border row: not zeros
    assert (out[0, :, :2, :] == out[0, :, 2:3, :]).all()
    assert out.dtype == np.uint8


def test_shifts_differ_across_samples_and_iterations_and_reproduce():
    a = augment.batch_shifts(32, iteration=0, seed=7, translate_px=16)
    b = augment.batch_shifts(32, iteration=1, seed=7, translate_px=16)
    assert len({tuple(s) for s in a}) > 20            # per sample, not one shift per batch
    assert not np.array_equal(a, b)
    assert np.array_equal(a, augment.batch_shifts(32, 0, 7, 16))
    assert not np.array_equal(a, augment.batch_shifts(32, 0, 8, 16))
    assert a.min() >= -16 and a.max() <= 16


def test_augmentation_differs_across_workers_and_is_reproducible():
    imgs, targets, _ = _brightness_data(20, size=8)
    ds = trainer.BatchDataset(imgs, targets.astype(np.float32), np.arange(20), 4, seed=3,
                           translate_px=16)

    def collect(workers: int):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(6),
                                             num_workers=workers,
                                             worker_init_fn=trainer.seed_worker)
        got = {int(b["iteration"]): b["shifts"].numpy() for b in loader}
        return [got[i] for i in range(6)]

    two = collect(2)          # worker 0 makes iterations 0, 2, 4; worker 1 makes 1, 3, 5
    assert not np.array_equal(two[0], two[1]) and not np.array_equal(two[2], two[3])
    again = collect(2)
    for s, t, u in zip(two, again, collect(0), strict=True):
        np.testing.assert_array_equal(s, t)
        np.testing.assert_array_equal(s, u)


def test_every_epoch_visits_each_subject_once():
    pos = np.concatenate([augment.batch_positions(10, 4, i, seed=0) for i in range(5)])
    assert sorted(pos[:10]) == list(range(10)) and sorted(pos[10:20]) == list(range(10))
    assert not np.array_equal(pos[:10], pos[10:20])    # a fresh permutation per epoch


# -- losses -----------------------------------------------------------------------------------

def test_masked_mse_ignores_nan_labels():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [1.0, float("nan")]])
    loss = losses.masked_mse(pred, target)
    assert loss.item() == pytest.approx((1 + 4) / 2)   # mean over the 2 present labels
    loss.backward()
    assert pred.grad[:, 1].abs().sum() == 0
    assert pred.grad[0, 0].item() == pytest.approx(2 * 1 / 2)


def test_masked_gaussian_nll_mean_over_present_labels_only():
    mean = torch.tensor([[0.0, 5.0, 1.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, 3.0, np.log(4.0)]], requires_grad=True)
    target = torch.tensor([[2.0, float("nan"), 3.0]])
    loss = losses.masked_gaussian_nll(mean, logvar, target)
    expect = 0.5 * ((0 + 4) + (np.log(4) + 4 / 4)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    assert mean.grad[0, 1] == 0 and logvar.grad[0, 1] == 0
    # torch's own Gaussian NLL over the present labels only agrees (the original averaged over
    # all B*T entries, masked zeros included, which gives 2/3 of this)
    present = [0, 2]
    reference = torch.nn.functional.gaussian_nll_loss(
        mean[0, present].detach(), target[0, present], logvar[0, present].detach().exp())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    out = torch.stack([mean, logvar], dim=-1).reshape(1, 6)
    assert losses.compute_loss(out, target, "gaussian_nll").item() == pytest.approx(expect)


# -- the loop ---------------------------------------------------------------------------------

def test_lr_schedule_fires_at_the_configured_iterations(tmp_path):
    imgs, targets, eids = _brightness_data(24)
    seen = []
    cfg = _tiny(iterations=7, lr=1e-2, lr_steps=(3, 5), batch_size=4, num_workers=2)
    res = trainer.train(cfg, imgs, targets[:, :1], np.arange(16), np.arange(16, 24), tmp_path,
                         eids, ["21002"], progress=False,
                         callback=lambda it, loss, lr: seen.append((it, lr)))
    np.testing.assert_allclose(res.lr_history, [1e-2] * 3 + [1e-3] * 2 + [1e-4] * 2)
    assert [it for it, _ in seen] == list(range(1, 8))
    np.testing.assert_allclose([lr for _, lr in seen], res.lr_history)


@pytest.mark.slow
def test_exact_resume_gives_identical_weights(tmp_path):
    imgs, targets, eids = _brightness_data(32)
    cfg = _tiny(iterations=6, checkpoint_every=3, lr_steps=(4,))
    args = (imgs, targets, np.arange(24), np.arange(24, 32))
    straight = trainer.train(cfg, *args, tmp_path / "straight", eids, ["21002", "47"],
                              progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(it, loss, lr):
        if it == 3:
            raise Crash

    with pytest.raises(Crash):
        trainer.train(cfg, *args, tmp_path / "resumed", eids, ["21002", "47"], progress=False,
                       callback=crash_at_3)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "model.pt").exists()
    resumed = trainer.train(cfg, *args, tmp_path / "resumed", eids, ["21002", "47"],
                             progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.loss_history == straight.loss_history
    assert resumed.lr_history == straight.lr_history
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    # a finished run is not trained again
    again = trainer.train(cfg, *args, tmp_path / "resumed", eids, ["21002", "47"],
                           progress=False)
    assert again.skipped and again.metrics == resumed.metrics
    # a checkpoint of another configuration is refused
    with pytest.raises(Crash):
        trainer.train(cfg, *args, tmp_path / "other", eids, ["21002", "47"], progress=False,
                       callback=crash_at_3)
    with pytest.raises(ValueError, match="different configuration"):
        trainer.train(_tiny(iterations=6, checkpoint_every=3, lr=5e-4), *args,
                       tmp_path / "other", eids, ["21002", "47"], progress=False)


@pytest.mark.slow
def test_tiny_training_learns_brightness_and_writes_outputs(tmp_path):
    imgs, targets, eids = _brightness_data(96)
    targets[::3, 1] = np.nan                       # a second field with gaps
    cfg = _tiny(iterations=40, batch_size=16, lr=3e-3, lr_steps=(30,))
    res = trainer.train(cfg, imgs, targets, np.arange(64), np.arange(64, 96), tmp_path, eids,
                         ["21002", "47"], progress=False, fold=2)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["per_field"]["21002"]["r2"] > 0.8
    assert m["per_field"]["21002"]["n"] == 32
    assert m["per_field"]["47"]["n"] == int(np.sum(~np.isnan(targets[64:, 1])))
    pred = pd.read_csv(tmp_path / "predictions.csv", dtype={"eid": str, "field": str})
    assert list(pred.columns) == ["eid", "fold", "field", "reference", "prediction", "variance"]
    assert (pred["fold"] == 2).all() and set(pred["field"]) == {"21002", "47"}
    v = pred[pred.field == "21002"]
    np.testing.assert_allclose(v["reference"], targets[64:, 0])   # in target units
    assert v["eid"].tolist() == eids[64:]
    # predict() from the run folder reproduces the out-of-fold predictions
    again = bundle.predict(tmp_path, imgs[64:], batch_size=7, device="cpu")
    np.testing.assert_allclose(again[:, 0], v["prediction"], rtol=1e-5, atol=1e-4)
    loaded = bundle.load_model(tmp_path)
    y = targets[:64, 1]
    assert loaded.std[1] == pytest.approx(np.nanstd(y[~np.isnan(y)], ddof=1))
    assert res.metrics["final_loss"] < res.loss_history[0]


def test_mean_variance_and_classification_heads(tmp_path):
    imgs, targets, eids = _brightness_data(32)
    targets[:5, 0] = np.nan
    mv = trainer.train(_tiny(head="mean_variance", loss="gaussian_nll", iterations=3), imgs,
                        targets, np.arange(24), np.arange(24, 32), tmp_path / "mv", eids,
                        ["21002", "47"], progress=False)
    assert (mv.predictions["variance"] > 0).all() and len(mv.predictions) == 16
    cl = trainer.train(_tiny(head="classification", loss="cross_entropy", iterations=3,
                              freeze_backbone=True, optimizer="sgd"),
                        imgs, targets[:, :1], np.arange(5, 24), np.arange(24, 32),
                        tmp_path / "cl", eids, ["21002"], progress=False)
    med = np.median(targets[5:24, 0])
    np.testing.assert_array_equal(cl.predictions["reference"], targets[24:, 0] > med)
    assert cl.predictions["prediction"].between(0, 1).all()
    assert {"accuracy", "auc", "n"} <= set(cl.metrics["per_field"]["21002"])
    assert cl.metrics["class_threshold"] == pytest.approx(med)


def test_bad_input_is_named(tmp_path):
    imgs, targets, eids = _brightness_data(20)
    with pytest.raises(ValueError, match="2 channels but the config expects in_channels=1"):
        trainer.train(_tiny(), np.repeat(imgs, 2, axis=1), targets[:, :1], np.arange(10),
                       np.arange(10, 20), tmp_path, eids, ["21002"], progress=False)
    few = targets[:, :1].copy()
    few[1:10] = np.nan
    with pytest.raises(ValueError, match=r"too few labelled training subjects for field\(s\): "
                                         r"21002 \(1 labelled\)"):
        trainer.train(_tiny(), imgs, few, np.arange(10), np.arange(10, 20), tmp_path, eids,
                       ["21002"], progress=False)
    with pytest.raises(ValueError, match="in both train_idx and val_idx"):
        trainer.train(_tiny(), imgs, targets[:, :1], np.arange(12), np.arange(10, 20),
                       tmp_path, eids, ["21002"], progress=False)
    with pytest.raises(ValueError, match="does not fit head"):
        _tiny(head="mean_variance")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"arch": "resnet18", "learning_rate": 1})


def test_input_resize_and_epochs():
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = augment.to_input(x, (16, 16))
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    assert TrainConfig(iterations=0, epochs=2, batch_size=8).resolve_iterations(20) == 5
    assert TrainConfig(input_size=96).input_size == (96, 96)


def test_results_do_not_depend_on_the_row_order(tmp_path):
    """The same subjects in another row order (as a store filled by parallel workers holds them)
    give byte-identical predictions.csv and metrics.json; wall-clock times are in timing.json."""
    imgs, targets, eids = _brightness_data(24)
    cfg = _tiny(iterations=2, batch_size=4)
    perm = np.random.default_rng(1).permutation(24)
    outs = []
    for name, order in (("stored", np.arange(24)), ("shuffled", perm)):
        where = {e: i for i, e in enumerate(np.asarray(eids)[order])}
        train_idx = np.array([where[e] for e in eids[:16]])
        val_idx = np.array([where[e] for e in eids[16:]])
        res = trainer.train(cfg, imgs[order], targets[order, :1], train_idx, val_idx,
                            tmp_path / name, [eids[i] for i in order], ["21002"], progress=False)
        assert set(res.timing) == {"train_seconds", "data_seconds", "total_seconds",
                                   "torch_threads"}
        assert res.timing["torch_threads"] == torch.get_num_threads()  # the result depends on it
        assert json.loads((tmp_path / name / "timing.json").read_text()) == res.timing
        outs.append(tmp_path / name)
    for file in ("predictions.csv", "metrics.json"):
        assert (outs[0] / file).read_bytes() == (outs[1] / file).read_bytes(), file
    pred = pd.read_csv(outs[0] / "predictions.csv", dtype={"eid": str})
    assert pred["eid"].tolist() == sorted(eids[16:])


def test_classification_accuracy_counts_classes_not_a_threshold():
    """More than two classes: the prediction is the argmax class, so class 1 for a subject of
    class 2 is wrong (the old rule, prediction > 0.5 against reference > 0.5, called it right)."""
    table = pd.DataFrame({"field": "x", "reference": [2.0, 1.0, 0.0],
                          "prediction": [1.0, 1.0, 0.0]})
    per = trainer._metrics("classification", table, ["x"], n_classes=3)["per_field"]["x"]
    assert per["accuracy"] == pytest.approx(2 / 3)
    binary = pd.DataFrame({"field": "x", "reference": [1.0, 0.0, 1.0, 0.0],
                           "prediction": [0.9, 0.2, 0.4, 0.6]})
    per = trainer._metrics("classification", binary, ["x"], n_classes=2)["per_field"]["x"]
    assert per["accuracy"] == pytest.approx(0.5) and per["auc"] == pytest.approx(0.75)
