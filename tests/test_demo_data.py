"""The demo's own data stages (phantom cohort, prepared store) are never reused once their inputs
changed: an edited ``data:`` block makes the cohort again, and a changed cohort the store from
scratch, so that the trainings see (and their identities record) the new data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from biometry.config.study import data_paths, load_study
from biometry.data.prepare import prepare
from biometry.data.store import Store
from biometry.runs.demo import make_data
from biometry.runs.pipeline import data_identity, prepare_splits

pytestmark = pytest.mark.slow


def _write_study(path, **data):
    study = {
        "name": "tinydata", "description": "the demo's data stages",
        "data": {"source": "phantom", "subjects": 6, "seed": 2, "scale": 0.2, **data},
        "format": "projection", "fields": ["21002"], "folds": 2, "split_seed": 0,
        "training": {"arch": "resnet18", "input_size": [32, 32], "iterations": 2,
                     "batch_size": 2, "lr_steps": [1], "translate_px": 0, "seed": 0,
                     "checkpoint_every": 1, "num_workers": 0},
    }
    path.write_text(yaml.safe_dump(study))
    return load_study(path)


def _arrays(store_dir):
    store = Store.open(store_dir)
    eids = sorted(store.eids)
    return eids, np.asarray(store.array("projection"))[store.rows(eids)]


def test_changed_data_make_the_cohort_and_the_store_again(tmp_path, capsys):
    yaml_path, root = tmp_path / "tinydata.yaml", tmp_path / "runs"
    study = _write_study(yaml_path)
    paths = data_paths(study, runs_root=root)
    make_data(study, root)
    prepare_splits(study, runs_root=root)  # what the first training stage does
    eids, before = _arrays(paths.prepared)
    assert len(eids) == 6
    ident_before = data_identity(study, runs_root=root)
    capsys.readouterr()

    # the same settings again: both stages reused, nothing rewritten
    index = (paths.prepared / "subjects.csv").read_bytes()
    make_data(study, root)
    out = capsys.readouterr().out
    assert out.count("already finished") == 2, out
    assert (paths.prepared / "subjects.csv").read_bytes() == index

    # a population option changes: the same subject ids, other livers, so other images
    study = _write_study(yaml_path, liver_fat_coupling=0.0)
    make_data(study, root)
    out = capsys.readouterr().out
    assert "tinydata/phantom: inputs changed" in out and "liver_fat_coupling" in out, out
    assert "made again" in out, out
    assert json.loads((paths.cohort / "cohort.json").read_text())["liver_fat_coupling"] == 0.0
    eids_after, after = _arrays(paths.prepared)
    assert eids_after == eids
    assert not np.array_equal(after, before)  # a resumed store would have kept the old images
    fresh = prepare(paths.cohort, tmp_path / "fresh", formats=["projection"], progress=False)
    assert fresh.failed.empty
    np.testing.assert_array_equal(after, _arrays(tmp_path / "fresh")[1])
    # what the trainings key on changed with it, so they run again
    changed = data_identity(study, runs_root=root)
    assert changed["fields_csv"] != ident_before["fields_csv"]
    assert changed["prepared_subjects"] != ident_before["prepared_subjects"]


    # an attempt of an older version (no recorded inputs), or one killed before it said which
    # cohort it prepared: the store cannot be trusted to match the cohort, and is made again
    run = root / "tinydata" / "prepare"
    (run / "params.yaml").unlink()
    (run / "done.json").unlink()
    (paths.prepared / "stale-marker").write_text("left by the old store")
    make_data(study, root)
    out = capsys.readouterr().out
    assert "made again" in out and "phantom: already finished" in out, out
    assert not (paths.prepared / "stale-marker").exists()
    np.testing.assert_array_equal(_arrays(paths.prepared)[1], after)

    # another seed: other subjects; the splits of the old ones go with the old store
    prepare_splits(study, runs_root=root)
    study = _write_study(yaml_path, seed=3)
    make_data(study, root)
    prepare_splits(study, runs_root=root)
    splits = pd.read_csv(paths.splits, dtype={"eid": str})
    new_eids = sorted(Store.open(paths.prepared).eids)
    assert sorted(splits["eid"]) == new_eids and not set(new_eids) & set(eids)
