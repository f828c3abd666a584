"""The README's "Using it" block, run verbatim in an empty folder outside the checkout (issue 16),
then the learning rate changed in the study YAML (issue 9: the old runs are never reported as
finished). Through the `biometry` command only, as a user would paste it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from biometry.config.paths import repo_root

pytestmark = pytest.mark.slow


def using_it_block(readme: Path) -> list[str]:
    """The command lines of the first ```bash block under "## Using it"."""
    text = readme.read_text()
    section = text.split("\n## Using it", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"{readme}: no ```bash block under '## Using it'"
    return [ln for ln in match.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    exe = shutil.which("biometry")
    if exe is None:  # not installed as a console script here: a shim that runs this interpreter
        shim = tmp_path / "bin" / "biometry"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m biometry.cli "$@"\n')
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    src = str(repo_root() / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _sh(line: str, cwd: Path, env: dict[str, str], timeout: int = 3600):
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")  # an empty folder outside the checkout
    env = _env(folder.parent)
    lines = using_it_block(repo_root() / "README.md")
    for line in lines:
        out = _sh(line, folder, env)
        assert out.returncode == 0, f"README line failed: {line}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return folder, env, lines


def test_block_uses_study_new_and_study_run():
    lines = using_it_block(repo_root() / "README.md")
    assert any(ln.startswith("biometry study new ") for ln in lines)
    assert any(ln.startswith("biometry study run ") for ln in lines)


def test_walkthrough_ends_with_figures_beside_the_study(walkthrough):
    folder, _env_, _lines = walkthrough
    figures = folder / "figures" / "mystudy"
    for name in ("table1_field_metrics.csv", "fig03_median_field.png", "fig02_umap.png"):
        assert (figures / name).is_file(), f"{name} missing from {sorted(os.listdir(figures))}"
    assert (folder / "papermill_runs" / "mystudy" / "train" / "all" / "fold_1" / "done.json").is_file()
    assert not (repo_root() / "papermill_runs" / "mystudy").exists()  # nothing in the checkout
    table = pd.read_csv(figures / "table1_field_metrics.csv", dtype={"field": str}).set_index("field")
    # the baseline beside the network, and for sex (a 0/1 field) AUC and accuracy, no MAPE
    assert table["baseline_r2"].notna().all() and table["baseline_mae"].notna().all()
    assert 0.0 <= table.loc["31", "auc"] <= 1.0 and 0.0 <= table.loc["31", "accuracy"] <= 1.0
    assert pd.isna(table.loc["31", "mape"]) and "thresholded" in table.loc["31", "mape_note"]
    assert pd.notna(table.loc["21002", "mape"])
    # weight from age, sex and height: the baseline explains a good part of it on the phantom
    assert table.loc["21002", "baseline_r2"] > 0.2


def test_changed_lr_is_never_reported_finished(walkthrough):
    folder, env, _lines = walkthrough
    study = folder / "mystudy.yaml"
    text = study.read_text()
    assert "lr: 0.001" in text
    study.write_text(text.replace("lr: 0.001", "lr: 0.0005"))
    out = _sh("biometry study run --study mystudy.yaml", folder, env, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "mystudy/train/all/fold_" in err[0]
    assert "training.lr: 0.001 -> 0.0005" in err[0] and "--redo-changed" in err[0]
    assert "already finished" not in out.stdout
