"""``biometry run train``: bad input is one line on stderr before any training starts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from biometry.cli import main as cli
from biometry.data.store import Store


@pytest.fixture
def data_dir(tmp_path):
    """A prepared store of 24 subjects (projection only) and a fields table."""
    rng = np.random.default_rng(0)
    eids = [str(1000000 + i) for i in range(24)]
    store = Store.create(tmp_path / "prepared", ["projection"])
    store.append(eids, {"projection": rng.integers(0, 255, (24, 2, 256, 256), dtype=np.uint8)})
    vat = rng.normal(3, 1, 24)
    grip = np.full(24, np.nan)
    grip[:4] = 30.0  # only four subjects have grip strength
    pd.DataFrame({"eid": eids, "22407-2.0": vat, "47-2.0": grip}).to_csv(
        tmp_path / "fields.csv", index=False)
    return tmp_path


def _study(tmp_path, **over):
    raw = {"name": "t", "description": "test", "data": {"source": "ukb"}, "format": "projection",
           "fields": ["22407", "47"], "multi_field": False, "folds": 3, "split_seed": 0,
           "training": {"arch": "resnet18", "iterations": 2, "batch_size": 4,
                        "input_size": [16, 16], "lr_steps": [1]}}
    raw.update(over)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _run(argv, capsys):
    code = cli(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_preset(capsys):
    code, err = _run(["run", "train", "--study", "nosuchstudy"], capsys)
    assert code == 2 and "nosuchstudy" in err and "scirep2020" in err
    assert len(err.splitlines()) == 1


def test_field_not_in_catalogue(tmp_path, data_dir, capsys):
    code, err = _run(["run", "train", "--study", _study(tmp_path), "--fields", "99999",
                      "--data-dir", str(data_dir), "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and "99999" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_too_few_labelled_subjects(tmp_path, data_dir, capsys):
    code, err = _run(["run", "train", "--study", _study(tmp_path), "--data-dir", str(data_dir),
                      "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and "too few labelled" in err and "47 (4)" in err and "22407" not in err
    assert not (tmp_path / "runs" / "t" / "train").exists()


def test_store_without_the_format(tmp_path, data_dir, capsys):
    study = _study(tmp_path, format="fat_fraction_slices", fields=["22407"])
    code, err = _run(["run", "train", "--study", study, "--data-dir", str(data_dir),
                      "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and "fat_fraction_slices" in err and "biometry prepare" in err
    assert not (tmp_path / "runs" / "t" / "train").exists()
