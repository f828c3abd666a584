"""Same seed, same numbers: results do not depend on the order in which workers finish (issue 17).

``prepare`` with two workers commits each chunk when the client sees it complete, so the store's
row order records scheduling. The test forces two opposite completion orders, checks that the two
stores really hold their rows in different orders, trains the same tiny study on each and requires
byte-identical ``splits.csv``, ``predictions.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dask.distributed import LocalCluster

from biometry.data import prepare as prep
from biometry.data.store import Store, canonical_order
from biometry.learn.cv import train_fold
from biometry.learn.splits import load_or_create_splits
from biometry.phantom.writer import generate_cohort

FIELDS = ["22407", "21002", "22405"]


def _completion_order(reverse: bool):
    """A stand-in for ``dask.distributed.as_completed`` that waits for every chunk, then hands
    them to ``prepare`` in submission order or in reverse: two workers "finishing" in opposite
    orders, deterministically."""
    def fake(futures):
        futures = list(futures)
        for fut in futures:
            fut.result()
        return futures[::-1] if reverse else futures
    return fake


def _study(root):
    study = {
        "name": "tiny", "description": "reproducibility test",
        "data": {"source": "phantom", "subjects": 8, "seed": 5, "scale": 0.15},
        "format": "projection", "fields": FIELDS, "multi_field": True, "folds": 2,
        "split_seed": 0,
        "training": {"arch": "resnet18", "input_size": [32, 32], "head": "regression",
                     "loss": "mse", "optimizer": "adam", "lr": 1e-3, "batch_size": 4,
                     "iterations": 3, "lr_steps": [2], "translate_px": 2, "seed": 0,
                     "checkpoint_every": 0, "num_workers": 0},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.slow
def test_results_do_not_depend_on_the_order_workers_finish(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cohort = generate_cohort(tmp_path / "cohort", 8, seed=5, scale=0.15, progress=False)
    study = _study(tmp_path)
    outputs = {}
    # two Dask workers (threads of this process: no process start-up, so the test stays fast),
    # reached through prepare's scheduler path
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        for reverse in (False, True):
            runs = tmp_path / f"runs_{'reversed' if reverse else 'forward'}"
            data = runs / "tiny" / "data"
            shutil.copytree(cohort, data / "cohort")
            monkeypatch.setattr(prep, "as_completed", _completion_order(reverse))
            result = prep.prepare(data / "cohort", data / "prepared", formats=["projection"],
                                  scheduler=cluster.scheduler_address, chunk_size=2,
                                  progress=False)
            assert result.n_done == 8 and result.ok
            run_dir = runs / "tiny" / "train" / "all" / "fold_0"
            train_fold(str(study), "all", 0, run_dir, runs_root=runs, progress=False)
            outputs[reverse] = (Store.open(data / "prepared"), runs / "tiny", run_dir)

    (store_a, study_a, run_a), (store_b, study_b, run_b) = outputs[False], outputs[True]
    # the two stores hold the same subjects in different row orders: the test tests something
    assert sorted(store_a.eids) == sorted(store_b.eids)
    assert store_a.eids != store_b.eids
    for name in ("splits.csv",):
        assert (study_a / name).read_bytes() == (study_b / name).read_bytes(), name
    for name in ("predictions.csv", "metrics.json"):
        assert (run_a / name).read_bytes() == (run_b / name).read_bytes(), name
    pred = pd.read_csv(run_a / "predictions.csv", dtype={"eid": str, "field": str})
    assert len(pred) > 0 and pred["prediction"].notna().all()


def test_canonical_order_is_by_eid_whatever_the_input_order():
    eids = ["1000003", "1000001-3", "1000002", "1000001"]
    order = canonical_order(eids)
    assert [eids[i] for i in order] == ["1000001", "1000001-3", "1000002", "1000003"]
    rng = np.random.default_rng(0)
    shuffled = [eids[i] for i in rng.permutation(len(eids))]
    assert [shuffled[i] for i in canonical_order(shuffled)] == [eids[i] for i in order]


def test_splits_file_rows_do_not_depend_on_the_eid_order(tmp_path):
    eids = [f"{1000000 + 7 * i % 31:07d}" for i in range(20)]
    a = load_or_create_splits(tmp_path / "a.csv", eids, 3, seed=1)
    b = load_or_create_splits(tmp_path / "b.csv", eids[::-1], 3, seed=1)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert a["eid"].tolist() == sorted(eids)
    pd.testing.assert_frame_equal(a, b)
