import json

import pytest
import yaml

from biometry.runs import batch
from biometry.runs.runner import RunSpec, run_dir_for


def _spec(nb, value, fail=False, fold=0):
    return RunSpec("s", "toy", {"value": value, "fail": fail}, field=value, fold=fold,
                   notebook=str(nb))


def test_run_folder_is_named_from_parameters(tmp_path):
    spec = RunSpec("scirep2020", "train", field="22407", fold=3)
    assert run_dir_for(spec, tmp_path) == tmp_path / "scirep2020/train/22407/fold_3"
    assert run_dir_for(RunSpec("demo", "agreement"), tmp_path) == tmp_path / "demo/agreement"


def test_batch_survives_a_failure_and_resumes(tmp_path, tiny_notebook, capsys):
    root = tmp_path / "runs"
    specs = [_spec(tiny_notebook, "22407"), _spec(tiny_notebook, "47", fail=True)]
    results = batch.run_batch(specs, root=root, progress=False)
    assert [r.status for r in results] == ["done", "failed"]
    ok_dir = run_dir_for(specs[0], root)
    # field ids stay strings through papermill
    assert (ok_dir / "out.txt").read_text() == "22407:str"
    params = yaml.safe_load((ok_dir / "params.yaml").read_text())
    assert params["parameters"]["value"] == "22407" and params["fold"] == 0
    prov = json.loads((ok_dir / "provenance.json").read_text())
    assert {"git_commit", "packages", "host", "device"} <= prov.keys()
    failed = results[1]
    assert "asked to fail with 47" in failed.error and failed.notebook.is_file()
    assert batch.report(results) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and str(failed.notebook) in out
    # second pass: the finished run is skipped, only the failed one runs again
    again = batch.run_batch(specs, root=root, progress=False)
    assert [r.status for r in again] == ["skipped", "failed"]


def test_train_specs_validate_fields_and_folds():
    class Study:
        name, folds, multi_field, network_name = "x", 3, False, "all"
        fields = ("22407", "21002")

    specs = batch.study_train_specs(Study, fields=["22407"], folds=[0, 2])
    assert [(s.field, s.fold) for s in specs] == [("22407", 0), ("22407", 2)]
    with pytest.raises(ValueError, match="out of range"):
        batch.study_train_specs(Study, folds=[5])
    with pytest.raises(KeyError, match="99999"):
        batch.study_train_specs(Study, fields=["99999"])
    with pytest.raises(ValueError, match="does not train 47"):
        batch.study_train_specs(Study, fields=["47"])


@pytest.mark.slow
def test_batch_on_a_local_dask_cluster(tmp_path, tiny_notebook):
    root = tmp_path / "runs"
    specs = [_spec(tiny_notebook, "22407"), _spec(tiny_notebook, "47", fail=True)]
    results = batch.run_batch(specs, root=root, workers=2, progress=False)
    assert [r.status for r in results] == ["done", "failed"]
    assert (run_dir_for(specs[0], root) / "out.txt").read_text() == "22407:str"


def test_jobqueue_cluster_from_study_settings():
    pytest.importorskip("dask_jobqueue")
    cluster = batch.make_jobqueue_cluster({
        "kind": "slurm", "cores": 8, "memory": "64GB", "walltime": "24:00:00", "queue": "gpu",
        "job_extra_directives": ["--gres=gpu:1"], "jobs": 2})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "--gres=gpu:1" in script and "24:00:00" in script
    with pytest.raises(ValueError, match="unknown jobqueue kind"):
        batch.make_jobqueue_cluster({"kind": "mainframe"})


def test_figures_are_the_ones_a_study_can_draw():
    """`biometry figures` builds a notebook only for a study that has what it draws: the liver
    table and panels for a `liver:` block, the later-release figure for a `release:` block, the
    UMAP for two fields or more, the thigh table for a thigh study and nothing else there."""
    from biometry.config.study import load_study
    from biometry.runs.figures import FIGURE_NOTEBOOKS, figure_notebooks

    demo = figure_notebooks(load_study("demo"))  # release: yes, liver: no
    assert "fig_later_release" in demo and "fig02_umap" in demo
    assert not {"table1_liver_fat", "fig02_liver_bland_altman", "table_thigh_function"} & set(demo)
    liver = figure_notebooks(load_study("liver-demo"))  # one field, a liver block, no release
    assert {"table1_liver_fat", "fig02_liver_bland_altman"} <= set(liver)
    assert "fig02_umap" not in liver and "fig_later_release" not in liver
    assert figure_notebooks(load_study("thigh-demo")) == ["table_thigh_function"]
    scirep = figure_notebooks(load_study("scirep2020"))
    assert scirep == [nb for nb in FIGURE_NOTEBOOKS if nb in scirep]  # the build order is kept
    assert "fig_later_release" not in scirep and "fig04_saliency" in scirep
