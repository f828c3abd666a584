"""Agreement statistics by their contract names (DESIGN.md): ``icc``, ``limits_of_agreement``,
``agreement`` (and the baseline).

The implementation lives in :mod:`biometry.analysis.stats`; this module only names its public API
under the path that users and the design document rely on.
"""

from __future__ import annotations

from biometry.analysis.stats import (
    BASELINE_COVARIATES,
    agreement,
    classification,
    icc,
    limits_of_agreement,
    linear_baseline,
    pearson_r,
)

__all__ = ["BASELINE_COVARIATES", "agreement", "classification", "icc", "limits_of_agreement",
           "linear_baseline", "pearson_r"]
