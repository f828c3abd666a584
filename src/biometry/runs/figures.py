"""``biometry figures`` / ``make figures``: regenerate a study's figures and tables.

One notebook per figure or table, named after its output (``notebooks/fig03_median_field.ipynb``
→ ``figures/<study>/fig03_median_field.pdf``/``.png``; tables as ``.csv`` and ``.md``). The
figure notebooks only read the plain-file outputs of the analysis stages (``04_agreement``,
``05_feature_space``), which this command runs first when they are missing. Outputs are
byte-identical when re-run on the same inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biometry.config.study import (
    default_figures_root,
    default_runs_root,
    load_study,
    resolve_study,
)
from biometry.runs.batch import report, run_batch
from biometry.runs.runner import RunSpec, execute_run, run_dir_for

#: figure notebooks, in the order they are built
FIGURE_NOTEBOOKS: tuple[str, ...] = (
    "fig02_umap",
    "fig03_median_field",
    "fig04_saliency",
    "fig_scatter_fields",
    "table1_field_metrics",
    "table2_dxa_mri",
    "stable5_bilateral_symmetry",
    "table_thigh_function",
    "table1_liver_fat",
    "fig02_liver_bland_altman",
    "fig_later_release",
)
#: the figure notebooks of a thigh-function study (a study with a ``thigh:`` block), which has
#: no per-field training runs: its figures read the ``thigh`` stage instead of 04/05
THIGH_FIGURES: tuple[str, ...] = ("table_thigh_function",)
#: figure notebooks that read the feature-space stage (left out for a one-field study)
FEATURE_SPACE_NOTEBOOKS: tuple[str, ...] = ("fig02_umap",)
#: figure notebooks of one kind of study: built only when the study has that block (a notebook
#: run by hand on another study says it has nothing to draw)
ONLY_WITH_BLOCK: dict[str, str] = {"table1_liver_fat": "liver", "fig02_liver_bland_altman": "liver",
                                   "fig_later_release": "release"}


def figure_notebooks(study) -> list[str]:
    """The figure notebooks that apply to a loaded study, in the order they are built."""
    several = len(study.fields) > 1  # a UMAP of the fields needs two of them
    return [nb for nb in FIGURE_NOTEBOOKS
            if (nb in THIGH_FIGURES) == bool(study.thigh)
            and (several or nb not in FEATURE_SPACE_NOTEBOOKS)
            and (nb not in ONLY_WITH_BLOCK or getattr(study, ONLY_WITH_BLOCK[nb]) is not None)]


def figures_dir_for(study, figures_root: str | Path | None = None) -> Path:
    """``<figures_root>/<study name>`` (``study``: a name, a YAML path or a loaded study); the
    root defaults to :func:`biometry.config.study.default_figures_root` (``figures/`` of the
    checkout for a preset, ``figures/`` beside a user's study file)."""
    s = resolve_study(study)
    return (Path(figures_root) if figures_root else default_figures_root(s)) / s.name


def figure_specs(study, runs_root: str | Path | None = None,
                 figures_root: str | Path | None = None) -> tuple[list[RunSpec], Path]:
    """The runs of a study's figure notebooks (always rebuilt: ``force``), and their folder."""
    loaded = resolve_study(study)
    runs_root = Path(runs_root) if runs_root else default_runs_root(loaded)
    out_dir = figures_dir_for(loaded, figures_root)
    common = {"study": str(loaded.path), "runs_root": str(runs_root), "out_dir": str(out_dir)}
    return [RunSpec(loaded.name, "figures", dict(common), field=nb, notebook=f"{nb}.ipynb")
            for nb in figure_notebooks(loaded)], out_dir


def build_figures(study: str, runs_root: str | Path | None = None,
                  figures_root: str | Path | None = None, progress: bool = True,
                  analyses: bool = True) -> int:
    """Run the analysis stages (unless ``analyses=False``: the caller just ran them) and every
    figure notebook; return the failure count."""
    loaded = load_study(study)
    name, study = loaded.name, str(loaded.path)
    runs_root = Path(runs_root) if runs_root else default_runs_root(loaded)
    common = {"study": study, "runs_root": str(runs_root)}
    if loaded.thigh:
        stages = ("thigh",)
    else:  # a one-field study (liver) has no feature space
        stages = ("agreement", "feature_space") if len(loaded.fields) > 1 else ("agreement",)
    for stage in stages if analyses or loaded.thigh else ():
        # the analyses are cheap next to training: re-run them so the figures match the runs
        # (the thigh study trains networks: run it only when it has not finished)
        res = execute_run(RunSpec(name, stage, dict(common)), runs_root, force=stage != "thigh")
        if res.status == "failed":
            report([res], stream=sys.stderr)
            return 1
    specs, out_dir = figure_specs(loaded, runs_root, figures_root)
    # figures are cheap and must reflect the current analysis outputs: always rebuild them
    results = run_batch(specs, root=runs_root, force=True, progress=progress)
    failed = report(results)
    print(f"figures and tables of {name} in {out_dir}")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="biometry figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="demo", help="preset name or study YAML (default demo)")
    ap.add_argument("--runs-root", help="root of run folders (default: papermill_runs/ of the "
                    "checkout for a preset, papermill_runs/ beside a study YAML of your own)")
    ap.add_argument("--figures-root", help="root of figure outputs (default: figures/ of the "
                    "checkout for a preset, figures/ beside a study YAML of your own)")
    a = ap.parse_args(argv)
    try:
        return 1 if build_figures(a.study, a.runs_root, a.figures_root) else 0
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"biometry figures: error: {exc}", file=sys.stderr)
        return 2


def stage_dir(study: str, stage: str, runs_root: str | Path | None = None) -> Path:
    """The run folder of a study-wide stage (``agreement``, ``feature_space``)."""
    s = load_study(study)
    return run_dir_for(RunSpec(s.name, stage), runs_root or default_runs_root(s))
