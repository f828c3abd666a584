"""The thigh-function study: functional measures of the phantom, the external cohort, the
slice-wise frozen backbone, last-layer training and the study's evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from biometry.analysis import thigh as evaluation
from biometry.config import fields
from biometry.config.study import StudyError, load_study, study_from_dict
from biometry.learn import transfer
from biometry.learn.models import IMAGENET_MEAN, IMAGENET_STD, build_slice_model
from biometry.phantom import cohort, function, signal
from biometry.phantom.anatomy import LABELS, station_grids
from biometry.runs.batch import study_train_specs
from biometry.runs.figures import build_figures
from biometry.runs.runner import RunSpec, execute_run

# ---------------------------------------------------------------------------------------------
# phantom


def _draws(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        male = int(rng.random() < 0.5)
        mean, sd = (8.5, 1.4) if male else (5.8, 1.1)
        v = rng.normal(mean, sd)
        p = {"sex": float(male), "age": rng.normal(64, 7.5), "bmi_target": rng.normal(27, 4)}
        rows.append({"sex": male, "age": p["age"], "v": v,
                     **function.functional_measures(p, v, rng)})
    return pd.DataFrame(rows)


def test_functional_measures_follow_thigh_muscle_strongly_and_weakly():
    d = _draws()
    r = {k: np.corrcoef(d[k], d["v"])[0, 1] for k in ("leg_strength", "walking_speed",
                                                       "chair_stand_time", "exercise")}
    assert r["leg_strength"] > 0.85                  # strongly
    assert 0.15 < r["walking_speed"] < 0.5           # weakly
    assert -0.5 < r["chair_stand_time"] < -0.15      # weakly, slower with less muscle
    assert r["exercise"] > 0.3
    for sex in (0, 1):  # within a sex too, and older is weaker at equal muscle
        s = d[d["sex"] == sex]
        assert np.corrcoef(s["leg_strength"], s["v"])[0, 1] > 0.6
    resid = d["leg_strength"] - np.polyval(np.polyfit(d["v"], d["leg_strength"], 1), d["v"])
    assert np.corrcoef(resid, d["age"])[0, 1] < -0.2
    assert d["leg_strength"].between(5, 120).all() and d["walking_speed"].between(0.3, 2.5).all()


def test_catalogue_has_the_study_fields_with_units():
    for key, unit in (("leg_strength", "kg"), ("walking_speed", "m/s"),
                      ("chair_stand_time", "s"), ("exercise", "(yes = 1)")):
        f = fields.get(key)
        assert (f.unit, f.group, f.field_id) == (unit, "function", "")


def test_external_protocol_changes_images_not_fields_and_labels_only_exercise():
    seed = cohort.subject_seed(0, 3)
    ukb = cohort.make_subject("1000001", seed, 0.15, stations=False)
    ext = cohort.make_subject("1000001", seed, 0.15, stations=False, protocol="external")
    assert ukb.fields == ext.fields
    assert not ukb.available["exercise"] and ext.available["exercise"]
    assert not any(ext.available[k] for k in ("leg_strength", "walking_speed", "chair_stand_time"))
    lut_u, lut_e = signal.tissue_signal(ukb.params), signal.tissue_signal(ukb.params, "external")
    m = LABELS["thigh_anterior_left"]
    assert lut_e[m, 0] == pytest.approx(0.85 * lut_u[m, 0])
    assert lut_e[LABELS["liver"]].tolist() == lut_u[LABELS["liver"]].tolist()
    # noise: the same seeds give more noise in the air of a station under the external protocol
    grid = station_grids(0.15)[0]
    lab = np.zeros(grid.shape, dtype=np.uint8)
    w_u, _ = signal.station_signal(ukb.params, lab, grid, 1, np.random.default_rng(1))
    w_e, _ = signal.station_signal(ukb.params, lab, grid, 1, np.random.default_rng(1),
                                   protocol="external")
    assert w_e.std() == pytest.approx(2.5 * w_u.std(), rel=0.05)
    with pytest.raises(ValueError, match="unknown protocol 'mri'"):
        cohort.make_subject("1", seed, 0.15, stations=False, protocol="mri")


def test_external_eids_never_collide_with_ukb_eids():
    ext = cohort.external_eids(50, 0)
    assert len(set(ext)) == 50 and all(len(e) == 8 and e.startswith("9") for e in ext)
    assert not set(ext) & set(cohort.cohort_eids(500, 0))
    assert cohort.external_subject_seed(0, 0) != cohort.subject_seed(0, 0)


# ---------------------------------------------------------------------------------------------
# network


def _stack(n=12, s=5, h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, h, w), dtype=np.uint8)


def test_slices_are_normalised_as_the_weights_expect():
    model = build_slice_model("resnet18", 2, input_size=None)
    x = torch.full((1, 2, 8, 8), 128, dtype=torch.uint8)
    x[0, 1] = 0
    inp = model.slice_inputs(x)
    assert inp.shape == (2, 3, 8, 8)
    for c in range(3):
        assert float(inp[0, c, 0, 0]) == pytest.approx((128 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        assert float(inp[1, c, 0, 0]) == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c])


def test_two_different_slices_give_different_backbone_features():
    torch.set_num_threads(1)
    model = build_slice_model("resnet18", 2, input_size=(32, 48)).eval()
    stack = torch.from_numpy(_stack(n=1, s=3))
    stack[0, 2] = stack[0, 0]                      # slice 2 repeats slice 0
    with torch.no_grad():
        f = model.slice_features(stack)[0]         # (S, F)
    assert f.shape == (3, 512)
    assert not torch.allclose(f[0], f[1], atol=1e-4)   # different slices, different features
    assert torch.equal(f[0], f[2])                      # the same slice, the same features
    # the subject's vector is their mean, and the order of the slices does not matter
    with torch.no_grad():
        pooled = model.features(stack)[0]
        flipped = model.features(stack.flip(1))[0]
    assert torch.allclose(pooled, f.mean(0), atol=1e-5)
    assert torch.allclose(pooled, flipped, atol=1e-5)


def test_only_the_last_layer_changes_during_training():
    torch.set_num_threads(1)
    images = _stack(n=16, s=3, h=32, w=48)
    labels = (np.arange(16) % 2).astype(float)
    model = build_slice_model("resnet18", 2, input_size=None, seed=3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}   # BatchNorm buffers too
    feats = transfer.extract_features(model, images, batch_size=5)
    loss = transfer.train_last_layer(model, feats, labels, np.arange(12), epochs=20, lr=1e-2)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]
    assert loss[-1] < loss[0]
    # the folded standardisation: the trained fc works on the raw backbone features
    again = transfer.extract_features(model, images)
    np.testing.assert_allclose(again, feats, rtol=1e-5, atol=1e-5)
    prob = transfer.predict_proba(model, feats)
    assert prob.shape == (16, 2) and np.allclose(prob.sum(1), 1)


def test_pretrained_backbone_round_trips_through_a_weights_file(tmp_path):
    torch.set_num_threads(1)
    images = _stack(n=10, s=4, h=32, w=48)
    targets = np.random.default_rng(1).normal(size=(10, 2))
    targets[0, 1] = np.nan
    state = transfer.pretrain_backbone(images, targets, np.arange(8), input_size=(32, 48),
                                       iterations=2, batch_size=4, slices_per_subject=2)
    assert not any(k.startswith("fc.") for k in state)
    torch.save(state, tmp_path / "backbone.pt")
    loaded = build_slice_model("resnet18", 2, weights=tmp_path / "backbone.pt", input_size=(32, 48))
    random = build_slice_model("resnet18", 2, input_size=(32, 48))
    for k, v in state.items():
        assert torch.equal(loaded.backbone.state_dict()[k], v)
    assert not torch.equal(random.backbone.conv1.weight, loaded.backbone.conv1.weight)


def test_median_split_uses_the_training_subjects_only():
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 100.0, 200.0])
    labels, thr = transfer.median_split(values, [0, 1, 2, 3, 4])
    assert thr == 2.5
    assert labels[:4].tolist() == [0, 0, 1, 1] and np.isnan(labels[4]) and labels[5:].tolist() == [1, 1]
    with pytest.raises(ValueError, match="median split needs >= 2"):
        transfer.median_split(values, [4, 0])


# ---------------------------------------------------------------------------------------------
# evaluation


def test_classification_metrics_against_hand_values():
    m = evaluation.classification_metrics([1, 1, 1, 0], [1, 0, 1, 0], [0.9, 0.4, 0.8, 0.1], 1)
    assert m["accuracy"] == 0.75 and m["baseline_accuracy"] == 0.75
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["auc"] == 1.0 and m["accuracy_over_baseline"] == 0.0 and m["share_high"] == 0.75
    assert m["train_majority_accuracy"] == 0.75
    # the baseline is the larger class of the evaluated subjects, not of the training ones
    low = evaluation.classification_metrics([0, 0, 0, 1], [0, 0, 0, 0], None, 1)
    assert low["baseline_accuracy"] == 0.75 and low["train_majority_accuracy"] == 0.25
    assert low["accuracy_over_baseline"] == 0.0 and np.isnan(low["auc"])
    only_one = evaluation.classification_metrics([0, 0], [0, 1])
    assert np.isnan(only_one["balanced_accuracy"]) and only_one["baseline_accuracy"] == 1.0


def _predictions():
    rows = []
    for backbone, correct in (("pretrained", 9), ("random", 5)):
        for i in range(10):
            ref = i % 2
            rows.append({"eid": str(i), "fold": 0, "measure": "leg_strength", "group": "all",
                         "backbone": backbone, "set": "test", "sex": float(i < 5),
                         "reference": ref, "prediction": ref if i < correct else 1 - ref,
                         "probability": 0.5, "baseline": 0})
    return pd.DataFrame(rows)


def test_study_metrics_put_controls_beside_the_network():
    preds = _predictions()
    table = evaluation.classification_table(preds)
    m = evaluation.study_metrics(table, ["leg_strength"])["measures"]["leg_strength"]
    assert m["pretrained"]["accuracy"] == 0.9 and m["random_backbone"]["accuracy"] == 0.5
    assert m["pretrained"]["accuracy_over_baseline"] == pytest.approx(40.0)
    assert m["sex_stratified"] == {"male": None, "female": None}
    assert evaluation.best_measure(table) == "leg_strength"
    with pytest.raises(ValueError, match="lacks column"):
        evaluation.classification_table(preds.drop(columns="baseline"))


def test_thigh_settings_are_validated(tmp_path):
    raw = load_study("thigh-demo").to_dict()
    raw["thigh"] = {"backbone": "imagenet21k"}
    with pytest.raises(StudyError, match="thigh.backbone must be"):
        study_from_dict(raw, tmp_path / "x.yaml")
    raw["thigh"] = {"pretrain_epochs": 3}
    with pytest.raises(StudyError, match="unknown thigh setting"):
        study_from_dict(raw, tmp_path / "x.yaml")
    paper = load_study("thigh2024")
    t = paper.training
    assert (t.arch, t.optimizer, t.lr, t.momentum, t.batch_size, t.epochs) == (
        "resnet18", "sgd", 1e-4, 0.9, 8, 50)
    assert t.freeze_backbone and t.weights == "imagenet" and paper.thigh["backbone"] == "weights"


# ---------------------------------------------------------------------------------------------
# the whole study on a tiny phantom


@pytest.mark.slow
def test_thigh_notebook_on_a_tiny_phantom(tmp_path):
    """Notebook 10 end to end: phantom and external cohorts, pretraining, every network, and a
    metrics.json with the sex-stratified networks, the random control and the external cohort."""
    torch.set_num_threads(1)
    raw = load_study("thigh-demo").to_dict()
    raw.update(name="thigh-tiny", folds=4, train_folds=[0])
    raw["data"] = {"source": "phantom", "subjects": 32, "seed": 1, "scale": 0.2}
    raw["training"].update(input_size=[32, 48], epochs=5, weights=None)
    raw["thigh"].update(pretrain_iterations=3, pretrain_batch_size=4, pretrain_slices=1,
                        external={"subjects": 6, "seed": 0})
    path = tmp_path / "thigh-tiny.yaml"
    path.write_text(json.dumps(raw))
    root = tmp_path / "runs"
    res = execute_run(RunSpec("thigh-tiny", "thigh", {"study": str(path), "runs_root": str(root)}),
                      root)
    assert res.status == "done", res.error
    m = json.loads((res.run_dir / "metrics.json").read_text())
    leg = m["measures"]["leg_strength"]
    # fold 0 of 4 holds 8 subjects; those with a leg-strength label are evaluated
    assert 0 < leg["pretrained"]["n"] <= 8 and 0 <= leg["pretrained"]["accuracy"] <= 1
    assert leg["random_backbone"]["n"] == leg["pretrained"]["n"]
    assert set(leg["sex_stratified"]) == {"male", "female"}
    assert m["external"]["label"] == "exercise" and 0 < m["external"]["n"] <= 6
    assert (res.run_dir / "backbone_fold_0.pt").is_file()
    preds = pd.read_csv(res.run_dir / "predictions.csv", dtype={"eid": str})
    assert set(preds["set"]) == {"test", "external"}
    assert set(preds.loc[preds["set"] == "external", "eid"].str.len()) == {8}
    table = pd.read_csv(res.run_dir / "thigh_function.csv")
    assert {"accuracy", "balanced_accuracy", "baseline_accuracy"} <= set(table.columns)
    # `biometry figures` of a thigh study: the finished study is reused, the table written
    figs = tmp_path / "figures"
    assert build_figures(str(path), runs_root=root, figures_root=figs, progress=False) == 0
    out = pd.read_csv(figs / "thigh-tiny" / "table_thigh_function.csv")
    assert len(out) == len(table) and (figs / "thigh-tiny" / "table_thigh_function.md").is_file()


def test_a_thigh_study_is_not_trained_by_the_per_field_batch():
    with pytest.raises(ValueError, match="biometry thigh --study thigh2024"):
        study_train_specs(load_study("thigh2024"))
