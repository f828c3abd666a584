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

from biometry.config.paths import figures_dir
from biometry.config.study import load_study
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
)


def figures_dir_for(study: str, figures_root: str | Path | None = None) -> Path:
    return (Path(figures_root) if figures_root else figures_dir()) / study


def build_figures(study: str, runs_root: str | Path | None = None,
                  figures_root: str | Path | None = None, progress: bool = True) -> int:
    """Run the analysis stages (if needed) and every figure notebook; return the failure count."""
    name = load_study(study).name
    common = {"study": study, "runs_root": str(runs_root) if runs_root else None}
    for stage in ("agreement", "feature_space"):
        # the analyses are cheap next to training: re-run them so the figures match the runs
        res = execute_run(RunSpec(name, stage, dict(common)), runs_root, force=True)
        if res.status == "failed":
            report([res], stream=sys.stderr)
            return 1
    out_dir = figures_dir_for(name, figures_root)
    specs = [RunSpec(name, "figures", {**common, "out_dir": str(out_dir)}, field=nb,
                     notebook=f"{nb}.ipynb") for nb in FIGURE_NOTEBOOKS]
    # figures are cheap and must reflect the current analysis outputs: always rebuild them
    results = run_batch(specs, root=runs_root, force=True, progress=progress)
    failed = report(results)
    print(f"figures and tables of {name} in {out_dir}")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="biometry figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="demo", help="preset name or study YAML (default demo)")
    ap.add_argument("--runs-root", help="root of run folders (default papermill_runs/)")
    ap.add_argument("--figures-root", help="root of figure outputs (default figures/)")
    a = ap.parse_args(argv)
    try:
        return 1 if build_figures(a.study, a.runs_root, a.figures_root) else 0
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"biometry figures: error: {exc}", file=sys.stderr)
        return 2


def stage_dir(study: str, stage: str, runs_root: str | Path | None = None) -> Path:
    """The run folder of a study-wide stage (``agreement``, ``feature_space``)."""
    return run_dir_for(RunSpec(load_study(study).name, stage), runs_root)
