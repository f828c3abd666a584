"""The liver study (MICCAI 2020): what ``notebooks/07_liver_fat.ipynb`` calls.

Dataset A (subjects with the reference 22402) has the network's out-of-fold predictions from the
study's cross-validation (``train`` runs); a network trained on all of A predicts dataset B (no
reference); the multi-atlas baseline (:mod:`biometry.analysis.atlas`) measures A and a seeded
random subset C of B, with a linear correction fitted on A. The comparison
(:mod:`biometry.analysis.liver`) gives the paper's Table 1, the Bland-Altman panels of Fig. 2 and
the subjects whose reference looks implausible. See ``docs/liver.md``.

Files written into the run folder: ``liver_fat.csv`` (eid, dataset, reference, network,
atlas_raw, atlas and the atlas QC), ``comparison.csv``/``.md`` (Table 1), ``outliers.csv``,
``templates.csv``, ``metrics.json`` (correction, templates, seconds per subject), and the final
network in ``final/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from biometry import fileio
from biometry.analysis import atlas, liver
from biometry.analysis.evaluate import study_predictions
from biometry.config.study import data_paths, resolve_study
from biometry.data.prepare import phantom_spacing
from biometry.learn.cv import train_final
from biometry.phantom import LABELS

FIELD = "22402"


def template_masks(study, cohort: Path, eids: list[str]) -> tuple[dict[str, Path], int | None]:
    """Liver masks of candidate templates: eid -> NIfTI file, and the liver's label value.

    Phantom studies use the generator's truth labels (label 8); real data the files
    ``<masks_dir>/<eid>_liver.nii.gz`` named by the study's ``liver.masks_dir`` (any non-zero
    voxel is liver). Subjects without a file are no candidates.
    """
    cfg = atlas.AtlasConfig.from_dict(study.liver, where=f"{study.name}: liver")
    if (study.data or {}).get("source") == "phantom":
        folder, pattern, label = cohort / "truth" / "labels", "{}_labels.nii.gz", LABELS["liver"]
    else:
        if not cfg.masks_dir:
            raise ValueError(f"{study.name}: liver.masks_dir must name the folder of template "
                             f"liver masks (<eid>_liver.nii.gz) for real data")
        folder, pattern, label = Path(cfg.masks_dir), "{}_liver.nii.gz", None
    found = {e: folder / pattern.format(e) for e in eids if (folder / pattern.format(e)).is_file()}
    return found, label


def run_liver_study(study, run_dir: str | Path, runs_root=None, data_dir=None,
                    progress: bool = True, log=print) -> dict:
    """Run the liver study's network-on-B, atlas and comparison steps; write the outputs.

    Needs the study's cross-validation (``biometry run train``) to have finished. Returns the
    contents of ``metrics.json``.
    """
    study = resolve_study(study)
    cfg = atlas.AtlasConfig.from_dict(study.liver, where=f"{study.name}: liver")
    run_dir = Path(run_dir)
    paths = data_paths(study, data_dir, runs_root)

    cv = study_predictions(study, runs_root)
    cv = cv[cv["field"].astype(str) == FIELD]
    if cv.empty:
        raise FileNotFoundError(f"{study.name}: no cross-validated predictions of {FIELD}; run "
                                f"the study's training first")
    a = pd.DataFrame({"eid": cv["eid"].astype(str), "dataset": "A",
                      "reference": cv["reference"], "network": cv["prediction"]})

    t0 = time.perf_counter()
    b_pred = train_final(study, FIELD, run_dir / "final", data_dir=data_dir, runs_root=runs_root,
                         progress=progress)
    seconds_network = time.perf_counter() - t0
    b = pd.DataFrame({"eid": b_pred["eid"].astype(str), "dataset": "B", "reference": np.nan,
                      "network": b_pred["prediction"]})
    c_eids = set(liver.comparison_subset(b["eid"], cfg.comparison_size, cfg.comparison_seed))
    b.loc[b["eid"].isin(c_eids), "dataset"] = "C"
    values = pd.concat([a, b], ignore_index=True)

    # templates: varied liver shapes among the subjects of A that have a mask
    masks, label = template_masks(study, paths.cohort, sorted(a["eid"]))
    desc = atlas.mask_descriptors(masks, label)
    chosen = atlas.choose_templates(desc, min(cfg.templates, len(desc)))
    images = Path(cfg.images_dir) if cfg.images_dir else paths.cohort
    spacing = phantom_spacing(images) if images.is_dir() else None
    templates = atlas.load_templates(images, {e: masks[e] for e in chosen}, cfg, spacing,
                                     label, log=log)
    targets = sorted(values.loc[values["dataset"].isin(["A", "C"]), "eid"])
    t0 = time.perf_counter()
    qc = atlas.run_atlas(images, targets, templates, cfg, spacing, log=log)
    seconds_atlas = time.perf_counter() - t0
    values = values.merge(qc, on="eid", how="left")
    in_a = values["dataset"] == "A"
    correction = atlas.fit_correction(values.loc[in_a, "atlas_raw"],
                                      values.loc[in_a, "reference"])
    values["atlas"] = atlas.apply_correction(values["atlas_raw"], correction)
    values = values.sort_values(["dataset", "eid"], kind="stable").reset_index(drop=True)
    cols = ["eid", "dataset", "reference", "network", "atlas", "atlas_raw", "mask_voxels",
            "mask_ml", "metric_mean", "metric_worst", "templates_used", "seconds", "error"]
    values = values[cols]

    table = liver.comparison_table(values)
    outliers = liver.reference_outliers(values)
    fileio.write_csv(run_dir / "liver_fat.csv", values)
    fileio.write_table(table, run_dir / "comparison")
    fileio.write_csv(run_dir / "outliers.csv", outliers[["eid", "reference", "network", "atlas"]])
    fileio.write_csv(run_dir / "templates.csv", desc.assign(chosen=desc["eid"].isin(chosen)))
    n_atlas = len(targets)
    metrics = {
        "field": FIELD, "atlas": cfg.to_dict(), "correction": correction,
        "templates": [t.eid for t in templates],
        "n": {k: int((values["dataset"] == k).sum()) for k in ("A", "B", "C")},
        "atlas_failed": [e for e in values["error"].dropna() if e],
        "seconds_per_subject": {
            "atlas": seconds_atlas / max(n_atlas, 1),
            # training on A plus inference on B, per subject of B (CV runs not included)
            "network_train_and_predict": seconds_network / max(len(b), 1)},
        "comparison": table.to_dict(orient="records"),
        "outliers": outliers["eid"].tolist(),
    }
    fileio.write_json(run_dir / "metrics.json", metrics)
    return metrics
