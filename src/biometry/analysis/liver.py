"""The liver study's three-way comparison (MICCAI 2020, Table 1 and Fig. 2): reference (22402),
network and multi-atlas baseline, and the subjects where the reference looks implausible.

Datasets: A = subjects with a reference (10-fold CV of the network; the atlas correction is
fitted here); B = subjects without one (the network trained on all of A predicts them);
C = a seeded random subset of B on which the atlas also runs. Every number comes from
:mod:`biometry.analysis.stats` (one implementation of each metric).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from biometry.analysis import stats
from biometry.analysis.atlas import FATTY_LIVER_PERCENT

#: (truth, other, dataset) of the paper's Table 1, in its order
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("reference", "network", "A"),
    ("reference", "atlas", "A"),
    ("atlas", "network", "A"),
    ("atlas", "network", "C"),
)


def comparison_subset(eids_b: Sequence[str], n: int, seed: int) -> list[str]:
    """The random comparison subset C of dataset B: ``min(n, len(B))`` eids, sorted, seeded."""
    pool = sorted(map(str, eids_b))
    rng = np.random.default_rng(int(seed))
    take = rng.choice(len(pool), size=min(int(n), len(pool)), replace=False) if pool else []
    return sorted(pool[i] for i in take)


def comparison_table(values: pd.DataFrame, threshold: float = FATTY_LIVER_PERCENT
                     ) -> pd.DataFrame:
    """Table 1: one row per comparison of :data:`COMPARISONS`, the first-named as truth.

    ``values``: one row per subject with ``dataset`` ("A", "B", "C") and the columns
    ``reference``, ``network``, ``atlas`` (%, NaN where not measured). Returns ``truth, other,
    dataset, n, mae, r2, bias, loa_low, loa_high, auc, sensitivity, specificity, n_positive``
    (differences are other − truth; classification at ``threshold`` %). A comparison whose
    truth holds one class only gets NaN classification numbers.
    """
    rows = []
    for truth, other, ds in COMPARISONS:
        sub = values[values["dataset"] == ds][[truth, other]].dropna()
        row = {"truth": truth, "other": other, "dataset": ds, "n": len(sub)}
        if len(sub) >= stats.MIN_PAIRS and np.ptp(sub[truth]) > 0:
            a = stats.agreement(sub[truth], sub[other])
            row.update({k: a[k] for k in ("mae", "r2", "bias", "loa_low", "loa_high")})
            try:
                c = stats.classification(sub[truth], sub[other], threshold)
                row.update({k: c[k] for k in ("auc", "sensitivity", "specificity",
                                               "n_positive")})
            except ValueError:  # one class only in the truth: no AUC
                pass
        rows.append(row)
    cols = ["truth", "other", "dataset", "n", "mae", "r2", "bias", "loa_low", "loa_high", "auc",
            "sensitivity", "specificity", "n_positive"]
    return pd.DataFrame(rows).reindex(columns=cols)


def reference_outliers(values: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The ``n`` subjects of A where network and atlas agree with each other, not the reference.

    Score = |reference − mean(network, atlas)| − |network − atlas|: large when both methods
    sit together far from the reference. Returns ``eid, reference, network, atlas, score``,
    highest score first (ties by eid).
    """
    sub = values[values["dataset"] == "A"].dropna(subset=["reference", "network", "atlas"])
    out = sub[["eid", "reference", "network", "atlas"]].copy()
    out["score"] = ((out["reference"] - (out["network"] + out["atlas"]) / 2).abs()
                    - (out["network"] - out["atlas"]).abs())
    out = out.sort_values(["score", "eid"], ascending=[False, True], kind="stable")
    return out.head(int(n)).reset_index(drop=True)
