"""A user's study file: absolute study path, data paths relative to the YAML's folder, outputs
beside it, `biometry study new` from a preset, lr_steps inside the iteration count (issue 9
items 2 and 4, issue 16 item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from biometry.cli import main as cli
from biometry.config.paths import runs_dir
from biometry.config.study import (
    StudyError,
    data_paths,
    default_figures_root,
    default_runs_root,
    load_study,
    with_iterations,
)

RAW = {"name": "mine", "description": "t", "format": "projection", "fields": ["22407"],
       "folds": 2, "data": {"source": "ukb", "fields_csv": "cohort/fields.csv",
                            "prepared": "prepared"},
       "training": {"arch": "resnet18", "iterations": 10, "lr_steps": [8]}}


def _write(folder: Path, **over) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump({**RAW, **over}))
    return path


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    _write(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    study = load_study("mine.yaml")  # relative to the working directory at load time
    monkeypatch.chdir(tmp_path)  # a notebook runs elsewhere: nothing may depend on cwd now
    assert study.path == tmp_path / "project" / "mine.yaml"
    paths = data_paths(study)
    assert paths.fields_csv == tmp_path / "project" / "cohort" / "fields.csv"
    assert paths.prepared == tmp_path / "project" / "prepared"
    assert paths.splits == tmp_path / "project" / "papermill_runs" / "mine" / "splits.csv"
    assert default_runs_root(study) == tmp_path / "project" / "papermill_runs"
    assert default_figures_root(study) == tmp_path / "project" / "figures"
    assert default_runs_root(load_study("demo")) == runs_dir()  # presets: the checkout's
    assert data_paths(study, runs_root=tmp_path / "elsewhere").splits.parent == tmp_path / "elsewhere" / "mine"


def test_lr_steps_beyond_the_iterations_are_rejected(tmp_path):
    with pytest.raises(StudyError, match=r"lr_steps \[5000\].*iterations=300.*never fire"):
        load_study(_write(tmp_path, training={"arch": "resnet18", "iterations": 300,
                                              "lr_steps": [5000]}))


def test_an_iterations_override_scales_lr_steps():
    base = load_study("scirep2020").training
    assert (base.iterations, base.lr_steps) == (6000, (5000,))
    short = with_iterations(base, 300)
    assert (short.iterations, short.lr_steps) == (300, (250,))  # lr/10 for the last 1/6 still
    with pytest.raises(StudyError, match="iterations must be >= 1"):
        with_iterations(base, 0)


def test_study_new_from_a_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code = cli(["study", "new", "mystudy", "--from", "scirep2020", "--fields-csv",
                "data/fields.csv", "--prepared", "data/prepared", "--fields", "22407", "21002",
                "--iterations", "300", "--out", "studies"])
    out = capsys.readouterr().out
    assert code == 0 and "next: biometry study run --study" in out
    path = tmp_path / "studies" / "mystudy.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["data"] == {"source": "ukb", "fields_csv": "../data/fields.csv",
                           "prepared": "../data/prepared"}  # relative to the new file
    study = load_study(path)
    assert study.name == "mystudy" and study.fields == ("22407", "21002")
    assert study.training.iterations == 300 and study.training.lr_steps == (250,)
    assert study.training.arch == "resnet50" and study.folds == 7  # the rest is the preset's
    assert data_paths(study).fields_csv == tmp_path / "data" / "fields.csv"
    # an existing file is not replaced silently
    code = cli(["study", "new", "mystudy", "--from", "scirep2020", "--fields-csv", "x.csv",
                "--prepared", "p", "--out", "studies"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "exists" in err and "--overwrite" in err and len(err.splitlines()) == 1


def test_a_preset_without_data_says_how_to_start_a_study(capsys):
    code = cli(["run", "train", "--study", "scirep2020", "--fields", "22407"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "fields_csv" in err and "biometry study new mystudy --from scirep2020" in err


def test_study_new_keeps_only_the_chosen_fields_in_per_field_blocks(tmp_path, monkeypatch):
    """The demo preset aggregates saliency for 22405, 22403, 22402: a study of other fields
    started from it has no saliency block (it would name fields the study does not train)."""
    monkeypatch.chdir(tmp_path)
    assert cli(["study", "new", "a", "--from", "demo", "--fields-csv", "f.csv", "--prepared", "p",
                "--fields", "21002", "31"]) == 0
    assert "saliency" not in yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert cli(["study", "new", "b", "--from", "demo", "--fields-csv", "f.csv", "--prepared", "p",
                "--fields", "21002", "22405"]) == 0
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["saliency"]["fields"] == ["22405"]
