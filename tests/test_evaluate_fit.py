"""Evaluation that fits the field (issue 9 items 4 and 5), on constructed predictions with
hand-computed answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from biometry.analysis import evaluate, results, stats


def _preds(field, ref, pred, fold=0):
    return pd.DataFrame({"eid": [f"{i:07d}" for i in range(len(ref))], "fold": fold,
                         "field": field, "reference": ref, "prediction": pred})


def test_table1_carries_baseline_thresholds_and_mape_only_where_meaningful():
    weight = np.array([60.0, 70, 80, 90, 100])
    sex = np.array([0.0, 0, 1, 1, 1, 0])
    score = np.array([0.1, 0.6, 0.7, 0.9, 0.4, 0.2])  # one false positive, one false negative
    liver = np.array([0.5, 1.0, 2.0, 8.0, 20.0])
    preds = pd.concat([_preds("21002", weight, weight + [2, -2, 2, -2, 2]),
                       _preds("31", sex, score), _preds("22402", liver, liver * 1.1)])
    base = pd.Series(weight + 5, index=[f"{i:07d}" for i in range(5)])
    table = results.field_metrics(preds, baselines={"21002": base}).set_index("field")
    w = table.loc["21002"]
    assert w["mae"] == pytest.approx(2.0) and w["baseline_mae"] == pytest.approx(5.0)
    assert w["baseline_r2"] == pytest.approx(1 - 25 * 5 / 1000)
    assert w["mape"] == pytest.approx(np.mean(2 / weight) * 100) and w["mape_note"] == ""
    s = table.loc["31"]
    assert pd.isna(s["mape"]) and "thresholded" in s["mape_note"]
    assert s["threshold"] == 0.5 and s["accuracy"] == pytest.approx(4 / 6)
    assert s["sensitivity"] == pytest.approx(2 / 3) and s["specificity"] == pytest.approx(2 / 3)
    assert s["auc"] == pytest.approx(8 / 9)  # 8 of the 9 positive-negative pairs ordered right
    assert pd.isna(table.loc["22402", "mape"])  # liver fat near 0 %: no MAPE
    assert table.loc["22402", "threshold"] == 5.5 and table.loc["22402", "auc"] == 1.0
    assert pd.isna(table.loc["31", "baseline_r2"])  # no baseline given for sex here


def test_mape_meaningful():
    assert stats.mape_meaningful([60, 70, 80, 90])
    assert not stats.mape_meaningful([0, 1, 1, 0])  # a 0/1 label
    assert not stats.mape_meaningful([-1.0, 2, 3, 4])  # crosses zero
    near_zero = np.r_[np.full(10, 0.01), np.full(90, 3.0)]  # 5th percentile far below median
    assert not stats.mape_meaningful(near_zero)


def test_classification_runs_are_scored_as_classifiers():
    labels = np.array([0, 0, 0, 0, 1, 1])
    prob = np.array([0.2, 0.3, 0.6, 0.1, 0.9, 0.4])
    out = stats.classification_run(labels, prob)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert out["auc"] == pytest.approx(7 / 8) and out["baseline_accuracy"] == pytest.approx(4 / 6)
    assert out["class_counts"] == "0:4 1:2"
    three = stats.classification_run([0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2])  # class indices
    assert three["accuracy"] == pytest.approx(4 / 6) and np.isnan(three["auc"])
    assert three["n_classes"] == 3
    table = results.field_metrics(_preds("47", labels, prob), head="classification")
    assert "r2" not in table.columns and table.loc[0, "balanced_accuracy"] == out["balanced_accuracy"]


@pytest.fixture
def study_with_runs(tmp_path):
    raw = {"name": "s", "description": "t", "format": "projection", "fields": ["22407"],
           "folds": 2, "data": {"source": "ukb", "fields_csv": "f.csv", "prepared": "p"},
           "training": {"arch": "resnet18", "iterations": 4, "lr_steps": [3]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    rng = np.random.default_rng(1)
    for k in (0, 1):
        run = tmp_path / "papermill_runs" / "s" / "train" / "22407" / f"fold_{k}"
        run.mkdir(parents=True)
        ref = rng.normal(3, 1, 10)
        _preds("22407", ref, ref + 0.1, k).assign(
            eid=[f"{k}{i:06d}" for i in range(10)]).to_csv(run / "predictions.csv", index=False)
        (run / "done.json").write_text("{}")
    # a field dropped from the study, left over from an earlier definition
    old = tmp_path / "papermill_runs" / "s" / "train" / "47" / "fold_0"
    old.mkdir(parents=True)
    _preds("47", [1.0, 2, 3], [1.0, 2, 3]).to_csv(old / "predictions.csv", index=False)
    (old / "done.json").write_text("{}")
    return path


def test_tables_read_only_the_current_study_and_every_fold(study_with_runs):
    preds = evaluate.study_predictions(study_with_runs)
    assert set(preds["field"]) == {"22407"} and len(preds) == 20
    (study_with_runs.parent / "papermill_runs" / "s" / "train" / "22407" / "fold_1"
     / "done.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 training run\(s\) not finished "
                                                r"\(train/22407/fold_1"):
        evaluate.study_predictions(study_with_runs)
