"""Multi-field studies with several modules (MIMIR's four networks)."""

from __future__ import annotations

import pytest
import yaml

from biometry.analysis.evaluate import training_run_dirs
from biometry.config.study import StudyError, load_study
from biometry.runs.batch import study_train_specs


def test_mimir2021_trains_four_mean_variance_modules():
    study = load_study("mimir2021")
    assert list(study.modules) == ["body_composition", "organs", "anthropometry", "age"]
    assert sorted(k for v in study.modules.values() for k in v) == sorted(study.fields)
    assert study.modules["age"] == ("age",) and "22402" in study.modules["organs"]
    assert study.training.head == "mean_variance" and study.training.loss == "gaussian_nll"
    specs = study_train_specs(study)
    assert len(specs) == 4 * study.folds
    by_unit = {s.field: s.parameters["fields"] for s in specs if s.fold == 0}
    assert {k: tuple(v) for k, v in by_unit.items()} == dict(study.modules)
    assert len(study.networks()) == 4
    # evaluation, the module stages and the release stage read the modules' own run folders
    assert study.network_units() == list(study.modules)
    dirs = training_run_dirs(study, runs_root="/runs")
    assert {d.parent.name for d in dirs} == set(study.modules)
    assert len(dirs) == 4 * len(study.train_folds)
    assert load_study("demo").network_units() == ["all"]
    assert load_study("liver-demo").network_units() == ["22402"]


@pytest.mark.parametrize("modules, message", [
    ({"a": ["22407"]}, "field(s) 21002 belong to no module"),
    ({"a": ["22407", "21002"], "b": ["21002"]}, "field 21002 is in modules 'a' and 'b'"),
    ({"a": ["22407", "21002", "47"]}, "names field 47 that is not in fields"),
])
def test_modules_must_partition_the_fields(tmp_path, modules, message):
    raw = yaml.safe_load(open(load_study("demo").path))
    raw.update(name="mods", fields=["22407", "21002"], modules=modules)
    path = tmp_path / "mods.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_study(path)
