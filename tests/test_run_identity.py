"""Run identity (issue 9 item 3): a finished run counts only for the inputs that made it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from biometry import fileio
from biometry.cli import main as cli
from biometry.config.study import load_study
from biometry.data.store import Store
from biometry.runs import pipeline
from biometry.runs.runner import RunSpec, changed_inputs, execute_run, is_finished, run_dir_for


@pytest.fixture
def user_study(tmp_path):
    """A study YAML with relative data paths, a prepared store of 30 subjects (one with a repeat
    visit) and its fields table."""
    rng = np.random.default_rng(0)
    eids = [str(1000000 + i) for i in range(29)] + ["1000000-3"]
    store = Store.create(tmp_path / "prepared", ["projection"])
    store.append(eids, {"projection": rng.integers(0, 255, (30, 2, 256, 256), dtype=np.uint8)})
    pd.DataFrame({"eid": eids[:29], "22407-2.0": rng.normal(3, 1, 29),
                  "31-0.0": rng.integers(0, 2, 29)}).to_csv(tmp_path / "fields.csv", index=False)
    raw = {"name": "mine", "description": "t", "format": "projection", "fields": ["22407"],
           "folds": 3, "data": {"source": "ukb", "fields_csv": "fields.csv",
                                "prepared": "prepared"},
           "training": {"arch": "resnet18", "iterations": 4, "lr_steps": [3], "lr": 1.0e-3,
                        "input_size": [16, 16], "batch_size": 4}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _pretend_trained(path):
    """Mark the study's training runs finished with their current identity, as execute_run does."""
    study = load_study(path)
    root = path.parent / "papermill_runs"
    pipeline.prepare_splits(study, runs_root=root)
    specs = pipeline.stage_specs(study, pipeline.stage("train"), root)
    for s in specs:
        fileio.write_json(run_dir_for(s, root) / "done.json", {"identity": s.identity})
    return specs, root


def test_changed_lr_stops_before_any_work(user_study, capsys):
    specs, root = _pretend_trained(user_study)
    assert len(specs) == 3
    before = sorted(p for p in root.rglob("*"))
    code = cli(["run", "train", "--study", str(user_study)])
    assert code == 0 and "3 already finished" in capsys.readouterr().out  # same inputs: reused
    user_study.write_text(user_study.read_text().replace("lr: 0.001", "lr: 0.0005"))
    code = cli(["run", "train", "--study", str(user_study)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "mine/train/22407/fold_0" in err and "and 2 more" in err
    assert "training.lr: 0.001 -> 0.0005" in err and "--redo-changed" in err
    assert sorted(p for p in root.rglob("*")) == before  # nothing was run or written


def test_a_changed_split_file_or_fields_table_is_a_change(user_study):
    specs, root = _pretend_trained(user_study)
    study = load_study(user_study)
    table = user_study.parent / "fields.csv"
    table.write_text(table.read_text().replace("1000003,", "1000003,9", 1))
    stale = pipeline.stale_training(pipeline.stage_specs(study, pipeline.stage("train"), root), root)
    assert len(stale) == 3 and stale[0][1] == ["fields_csv: old -> new"]


def test_visits_of_one_eid_share_a_fold_and_the_split_is_recorded(user_study):
    _pretend_trained(user_study)
    root = user_study.parent / "papermill_runs" / "mine"
    splits = pd.read_csv(root / "splits.csv", dtype={"eid": str}).set_index("eid")["fold"]
    assert splits["1000000"] == splits["1000000-3"]
    side = json.loads((root / "splits.json").read_text())
    assert side["folds"] == 3 and side["stratify"] is None and "visits" in side["groups"]


def test_later_stages_need_current_training_runs(user_study, capsys):
    code = cli(["run", "evaluate", "--study", str(user_study)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "mine/train/22407/fold_0" in err and "biometry run train" in err


def test_execute_run_redoes_a_run_whose_identity_changed(tmp_path, tiny_notebook):
    spec = RunSpec("s", "x", {"value": "a"}, notebook=str(tiny_notebook), identity={"lr": 1})
    assert execute_run(spec, tmp_path).status == "done"
    assert execute_run(spec, tmp_path).status == "skipped"
    run_dir = run_dir_for(spec, tmp_path)
    changed = RunSpec("s", "x", {"value": "b"}, notebook=str(tiny_notebook), identity={"lr": 2})
    assert not is_finished(run_dir, changed.identity)
    assert changed_inputs(run_dir, changed.identity) == ["lr: 1 -> 2"]
    assert execute_run(changed, tmp_path).status == "done"
    assert (run_dir / "out.txt").read_text() == "b:str"
    assert json.loads((run_dir / "done.json").read_text())["identity"] == {"lr": 2}


def test_a_field_missing_from_a_validation_fold_is_reported(user_study, capsys):
    _pretend_trained(user_study)  # writes splits.csv
    splits = pd.read_csv(user_study.parent / "papermill_runs" / "mine" / "splits.csv",
                         dtype={"eid": str})
    table = pd.read_csv(user_study.parent / "fields.csv", dtype={"eid": str})
    in_fold0 = table["eid"].isin(set(splits.loc[splits["fold"] == 0, "eid"]))
    table["47-2.0"] = np.where(in_fold0, 30.0, np.nan)  # grip strength only in fold 0
    assert in_fold0.sum() >= 6  # enough in total for 3 folds x 2: only the per-fold check can fail
    table.to_csv(user_study.parent / "fields.csv", index=False)
    user_study.write_text(user_study.read_text().replace("- '22407'", "- '22407'\n- '47'"))
    code = cli(["run", "train", "--study", str(user_study), "--redo-changed"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "too few labelled subjects in a validation fold" in err and "47 (per fold: [" in err
    assert "22407" not in err
