"""The phantom cohort generator: synthetic whole-body Dixon MRI cohorts that look like a UKB
release, with their ground truth (see ``docs/phantom.md``). May import ``config`` and ``data``
(it writes UKB-style zips with ``data.ingest``); never ``learn``, ``analysis``, ``runs`` or ``cli``.

Public API
----------
generate_cohort(out_dir, n_subjects, seed, scale=1.0, workers=1, overwrite=False,
                station_format="nifti", progress=True, external=False, later_release_of=None,
                thigh_asymmetry=None, liver_fat_coupling=None) -> Path
make_subject(eid, seed, scale=1.0, stations=True, protocol="ukb", **population) -> Subject
fused_truth(subject) -> biometry.data.types.Volume
sample_fields(n, seed, scale=0.15, **population) -> (observed, truth) DataFrames, no images
    (population: the options of ``biometry.config.population``, e.g. liver_fat_coupling=0)
label_footprints(labels, spacing_y) -> {region: (256, 256) bool} in the projection's geometry
main(argv) -> int   (``biometry synth``)
"""

from biometry.phantom.anatomy import LABELS, fused_grid, station_grids
from biometry.phantom.cohort import (
    PHANTOM_VERSION,
    Subject,
    cohort_eids,
    fused_truth,
    make_subject,
    sample_fields,
    subject_seed,
)
from biometry.phantom.footprints import (
    REGIONS,
    label_footprints,
    label_projection,
    labels_split,
    read_labels,
    subject_footprints,
)
from biometry.phantom.measure import atlas_slices, field_columns, mri_atlas_fields
from biometry.phantom.writer import generate_cohort, main, write_nifti_gz

__all__ = [
    "LABELS",
    "PHANTOM_VERSION",
    "REGIONS",
    "Subject",
    "atlas_slices",
    "cohort_eids",
    "field_columns",
    "fused_grid",
    "fused_truth",
    "generate_cohort",
    "label_footprints",
    "label_projection",
    "labels_split",
    "main",
    "make_subject",
    "mri_atlas_fields",
    "read_labels",
    "sample_fields",
    "station_grids",
    "subject_footprints",
    "subject_seed",
    "write_nifti_gz",
]
