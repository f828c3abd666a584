import dataclasses
import json

import pytest
import yaml

from biometry.parallel import available_cores, local_cluster
from biometry.runs import batch
from biometry.runs.runner import RunSpec, run_dir_for
from conftest import write_notebook


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
    assert {"git_commit", "packages", "host", "device", "cpu", "cpu_capability"} <= prov.keys()
    failed = results[1]
    assert "asked to fail with 47" in failed.error and failed.notebook.is_file()
    assert batch.report(results) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and str(failed.notebook) in out
    # second pass: the finished run is skipped, only the failed one runs again
    again = batch.run_batch(specs, root=root, progress=False)
    assert [r.status for r in again] == ["skipped", "failed"]


def test_local_cluster_workers_start_without_dasks_malloc_trim():
    """Dask gives its workers MALLOC_TRIM_THRESHOLD_ (preparation ~1.4x, training ~1.7x slower
    here); the package's local clusters start theirs without it."""
    import os

    import dask
    from dask.distributed import Client

    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]
    with local_cluster(1) as cluster, Client(cluster) as client:
        assert client.submit(os.environ.get, "MALLOC_TRIM_THRESHOLD_", "unset").result() == "unset"
        assert client.submit(os.environ.get, "OMP_NUM_THREADS").result() == "1"  # Dask's others


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path):
    """Worker processes import a user's script again; one without `if __name__ == '__main__'`
    then starts a cluster inside each of them, which fails with Dask's "Nanny failed to start"
    under screens of tracebacks. The error the script ends with says what to change, alone."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from biometry.parallel import local_cluster\n"
                      "with local_cluster(1):\n    pass\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: 1 local Dask worker process(es) could not start")
    assert "if __name__ == '__main__':" in last and "workers=1" in last
    # the worker processes stop quietly: one traceback, the script's (there were 15)
    assert done.stderr.count("Traceback") == 1, done.stderr


def test_provenance_names_the_processor_generation(tmp_path):
    """Two virtual machines called alike ran the demo on different processor generations and
    gave other last digits: the processor's family and model numbers tell them apart."""
    from biometry.runs.runner import cpu_model

    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                   "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 25\n"
                   "model\t\t: 1\nmodel name\t: AMD EPYC\n")
    assert cpu_model(amd) == "AMD EPYC (family 26, model 2, stepping 1)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 48.00\nCPU implementer\t: 0x41\n")
    assert cpu_model(arm)  # no model name there: the machine's architecture, never empty
    assert cpu_model(tmp_path / "absent")


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


def test_thread_plan_gives_a_last_smaller_wave_the_cores_left():
    assert batch.thread_plan(3, 2, cores=2) == [1, 1, 2]  # the demo: 3 folds, 2 workers
    assert batch.thread_plan(4, 2, cores=2) == [1, 1, 1, 1]
    assert batch.thread_plan(5, 2, cores=8) == [4, 4, 4, 4, 8]
    assert batch.thread_plan(2, 1, cores=4) == [4, 4]
    assert batch.thread_plan(3, 4, cores=2) == [1, 1, 1]  # never below one thread
    assert batch.thread_plan(0, 2, cores=2) == []


@pytest.mark.slow
def test_a_local_batch_gives_each_kernel_its_share_of_the_cores(tmp_path):
    nb = write_notebook(tmp_path / "nb" / "threads.ipynb", 'run_dir = "."\nvalue = "x"',
                        ["import os\nfrom pathlib import Path\n"
                         "Path(run_dir, 'out.txt').write_text(os.environ.get('OMP_NUM_THREADS', '-'))"])
    specs = [_spec(nb, str(k), fold=k) for k in range(3)]
    root = tmp_path / "runs"
    plan = dict(zip(specs, batch.thread_plan(3, 2, cores=2), strict=True))
    results = batch.run_batch(specs[1:], root=root, workers=2, progress=False, threads=plan)
    assert [r.status for r in results] == ["done"] * 2
    # a run's count is its place in the whole plan (here: the last of three, alone in its wave)
    seen = [(run_dir_for(s, root) / "out.txt").read_text() for s in specs[1:]]
    assert seen == ["1", "2"]


def test_stages_side_by_side_wait_for_their_inputs():
    from biometry.config.study import load_study
    from biometry.runs import pipeline

    demo = load_study("demo")
    order = [pipeline.stage(s) for s in pipeline.default_stages(demo)]
    waits = pipeline.stage_waits(order)
    names = [st.name for st in order]
    assert names[0] == "train" and names[-1] == "figures"
    # training takes every core: nothing starts beside it, not even a stage that reads no run
    assert all("train" in waits[n] for n in names[1:])
    assert waits["release"] == {"train", "calibrate"}
    assert waits["feature-space"] == {"train"}
    # a figure notebook may read any stage's outputs
    assert waits["figures"] == set(names[:-1])
    # a stage left out (training already done) is not waited for
    later = pipeline.stage_waits([pipeline.stage(n) for n in ("evaluate", "figures")])
    assert later == {"evaluate": set(), "figures": {"evaluate"}}
    assert pipeline.stage("saliency").serial  # its fields share the registration's transforms


def test_workers_come_from_the_study_unless_given():
    from biometry.config.study import load_study
    from biometry.runs import pipeline

    demo = load_study("demo")
    assert pipeline.resolve_workers(demo, 3) == 3
    assert pipeline.resolve_workers(demo) == min(2, available_cores())
    assert pipeline.resolve_workers(load_study("scirep2020")) == 1
    # runs that go to a cluster's jobs are not capped at this machine's cores
    on_slurm = dataclasses.replace(demo, dispatch={"workers": 64, "jobqueue": {"kind": "slurm"}})
    assert pipeline.resolve_workers(on_slurm) == 64
    assert batch.job_threads({"kind": "slurm", "cores": 8, "processes": 2}) == 4
    assert batch.job_threads({"kind": "slurm"}) is None and batch.job_threads(None) is None
    with pytest.raises(ValueError, match="--workers must be at least 1, got 0"):
        pipeline.resolve_workers(demo, 0)
    two = dataclasses.replace(demo, dispatch={"workers": "two"})
    with pytest.raises(ValueError, match=r"demo\.yaml: dispatch\.workers must be a whole number"):
        pipeline.resolve_workers(two)


def _spans(root, stage):
    """(start, end) of each run of ``stage`` that ran, from the timed notebook's span.txt."""
    return [tuple(float(v) for v in p.read_text().split())
            for p in sorted((root / "s" / stage).glob("*/span.txt"))]


@pytest.mark.slow
def test_stages_side_by_side_start_after_what_they_read(tmp_path):
    from biometry.config.study import load_study
    from biometry.runs import pipeline

    nb = write_notebook(tmp_path / "nb" / "timed.ipynb",
                        'run_dir = "."\nvalue = "x"\nfail = False\nsleep = 0.0',
                        ["import time\nfrom pathlib import Path\nt0 = time.time()\n"
                         "time.sleep(sleep)\n"
                         "Path(run_dir, 'span.txt').write_text(f'{t0} {time.time()}')",
                         "if fail:\n    raise ValueError(f'asked to fail with {value}')"])
    a = pipeline.Stage("a", None, "field")
    b = pipeline.Stage("b", None, "study", needs=("a",))
    c = pipeline.Stage("c", None, "field", serial=True)
    d = pipeline.Stage("d", None, "study", needs=("c",))
    counts = {"a": 2, "b": 1, "c": 2, "d": 1}

    def run(root, failing=None):
        def specs_of(st):
            return [RunSpec("s", st.name, {"value": f"{st.name}{i}", "sleep": 1.0,
                                           "fail": st.name == failing},
                            field=str(i), notebook=str(nb)) for i in range(counts[st.name])]
        pipeline.run_side_by_side(load_study("demo"), [a, b, c, d], root, workers=2,
                                  log=lambda _line: None, specs_of=specs_of)

    root = tmp_path / "ok"
    run(root)
    spans = {name: _spans(root, name) for name in counts}
    assert {k: len(v) for k, v in spans.items()} == counts
    assert min(s for s, _ in spans["b"]) >= max(e for _, e in spans["a"])
    assert min(s for s, _ in spans["d"]) >= max(e for _, e in spans["c"])
    (s0, e0), (s1, e1) = sorted(spans["c"])
    assert s1 >= e0  # a serial stage's runs never overlap
    # a failed stage: what reads it never starts, and the batch says which stage failed
    root = tmp_path / "failed"
    with pytest.raises(pipeline.RunsFailed, match="stage a"):
        run(root, failing="a")
    assert len(_spans(root, "a")) == 2 and _spans(root, "b") == []


def test_demo_passes_its_roots_to_the_study_run(tmp_path, monkeypatch):
    """`biometry demo --runs-root R --figures-root F`: the stages get both (figures used to land in
    the checkout's figures/ whatever --runs-root said)."""
    import pandas as pd

    from biometry.runs import demo

    seen = {}
    monkeypatch.setattr(demo, "make_data", lambda study, root, force=False: None)
    monkeypatch.setattr(demo, "run_study", lambda study, root, **kw: seen.update(root=root, **kw))
    monkeypatch.setattr(demo, "summary_table", lambda study, root: pd.DataFrame({"field": []}))
    assert demo.main(["--runs-root", str(tmp_path / "r"), "--figures-root",
                      str(tmp_path / "f"), "--workers", "1"]) == 0
    assert seen["root"] == tmp_path / "r" and seen["figures_root"] == str(tmp_path / "f")
    assert (tmp_path / "r" / "demo" / "summary" / "summary.csv").is_file()


def test_a_notebook_given_by_path_is_not_overwritten_by_its_run(tmp_path, tiny_notebook):
    """The executed copy goes into the run folder: with an absolute notebook path it used to
    replace the source, which a second run beside it then read half-written (NotJSONError)."""
    from biometry.runs.runner import execute_run

    before = tiny_notebook.read_bytes()
    res = execute_run(RunSpec("s", "x", {"value": "a"}, notebook=str(tiny_notebook)), tmp_path)
    assert res.status == "done" and res.notebook == res.run_dir / "tiny.ipynb"
    assert res.notebook.is_file() and tiny_notebook.read_bytes() == before
