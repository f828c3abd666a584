"""Shared test fixtures: tiny notebooks, isolated run roots."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from biometry import phantom
from biometry.analysis.evaluate import evaluate_field
from biometry.data.prepare import prepare
from biometry.data.tables import references_from_fields_csv
from biometry.learn.splits import make_splits, save_splits

os.environ.setdefault("MPLBACKEND", "Agg")


def write_notebook(path: Path, parameters: str, body: list[str]) -> Path:
    """A notebook with one ``parameters`` cell and plain code cells, no outputs."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(src) for src in body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny_notebook(tmp_path: Path) -> Path:
    """A notebook that writes its parameters to ``run_dir/out.txt`` and fails when ``fail``."""
    return write_notebook(
        tmp_path / "nb" / "tiny.ipynb",
        'run_dir = "."\nvalue = "x"\nfail = False',
        ["from pathlib import Path\nPath(run_dir, 'out.txt').write_text(f'{value}:{type(value).__name__}')",
         "if fail:\n    raise ValueError(f'asked to fail with {value}')"],
    )


EXPLORE_FIELDS = ["22407", "21002", "22405"]


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    """A tiny study whose runs have finished, built without training (a few seconds).

    16 phantom subjects at scale 0.2, prepared; ``train/all/fold_<k>/predictions.csv`` holds
    reference + seeded noise for three fields (a ``variance`` for 21002 only); the evaluation
    stage has run for 22407 only; an aggregated saliency map exists for 22407 only. So each field
    exercises a different mix of present and missing stages. Returns (study yaml, runs root).
    """
    root = tmp_path_factory.mktemp("finished")
    runs = root / "runs"
    study = {"name": "explore_tiny", "description": "a finished tiny study for the explorer",
             "data": {"source": "phantom", "subjects": 16, "seed": 3, "scale": 0.2},
             "format": "projection", "fields": EXPLORE_FIELDS, "multi_field": True, "folds": 2,
             "split_seed": 0,
             "training": {"arch": "resnet18", "input_size": [32, 32], "head": "regression",
                          "loss": "mse", "optimizer": "adam", "lr": 1e-3, "batch_size": 8,
                          "iterations": 4, "lr_steps": [3], "translate_px": 2, "seed": 0,
                          "checkpoint_every": 2, "num_workers": 0}}
    path = root / "explore_tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    base = runs / "explore_tiny"
    cohort = phantom.generate_cohort(base / "data" / "cohort", 16, 3, scale=0.2, progress=False)
    prepare(cohort, base / "data" / "prepared", formats=["projection"], workers=1,
            progress=False)
    refs = references_from_fields_csv(cohort / "fields.csv", EXPLORE_FIELDS)
    refs.index = refs.index.astype(str)
    splits = make_splits(refs.index, 2, seed=0)
    save_splits(splits, base / "splits.csv")
    fold = splits.set_index("eid")["fold"]
    rng = np.random.default_rng(0)
    for k in (0, 1):
        rows = []
        for key in EXPLORE_FIELDS:
            ref = refs[key].dropna()
            ref = ref[fold.loc[ref.index] == k]
            sd = float(refs[key].std())
            pred = ref + rng.normal(0, 0.2 * sd, len(ref))
            var = np.full(len(ref), (0.2 * sd) ** 2) if key == "21002" else np.full(len(ref), np.nan)
            rows.append(pd.DataFrame({"eid": ref.index, "fold": k, "field": key,
                                      "reference": ref.to_numpy(), "prediction": pred.to_numpy(),
                                      "variance": var}))
        run = base / "train" / "all" / f"fold_{k}"
        run.mkdir(parents=True)
        pd.concat(rows).to_csv(run / "predictions.csv", index=False)
        (run / "done.json").write_text("{}")  # a finished run: the evaluation reads only those
    evaluate_field(str(path), "22407", base / "evaluate" / "22407", runs_root=runs)
    saliency = base / "saliency" / "22407"
    saliency.mkdir(parents=True)
    yy, xx = np.mgrid[0:32, 0:64]
    np.save(saliency / "aggregate_female.npy", np.exp(-((yy - 16) ** 2 + (xx - 20) ** 2) / 50.0))
    return path, runs
