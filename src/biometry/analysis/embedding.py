"""The cohort's feature space: UMAP of the fields (Sci Rep 2020, Fig. 2).

For each highlighted field the embedding is computed *without* that field and coloured by it, so
that a smooth colour gradient (or, for sex, two separate groups) shows that the other fields carry
its information. :data:`FIG2_FIELDS` are the paper's four: sex, BMI, height and body-fat
percentage.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

#: Fig. 2's colour fields: sex, BMI, height, body-fat percentage (DXA total tissue fat %)
FIG2_FIELDS: tuple[str, ...] = ("31", "21001", "12144", "23281")
#: how sex is drawn: discrete colours with these labels
SEX_CATEGORIES = {0.0: "female", 1.0: "male"}


def standardise(table: pd.DataFrame) -> pd.DataFrame:
    """Z-score each column (mean 0, SD 1 with ddof=0); a constant column raises ``ValueError``."""
    sd = table.std(ddof=0)
    constant = sd.index[sd == 0].tolist()
    if constant:
        raise ValueError(f"cannot standardise constant field(s): {', '.join(map(str, constant))}")
    return (table - table.mean()) / sd


def umap_embedding(x: np.ndarray, seed: int = 0, n_neighbors: int = 15,
                   min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP of the rows of ``x`` (n_samples, n_features), reproducible for a fixed seed.

    ``init="pca"`` with ``random_state`` is bit-identical run to run (the spectral init is not on
    disconnected graphs, lmcinnes/umap#544); ``random_state`` forces a single thread.
    """
    import umap  # heavy (numba JIT at import, ~10 s cold): only when an embedding is made

    if x.shape[0] <= n_neighbors:
        raise ValueError(f"UMAP with n_neighbors={n_neighbors} needs more than {n_neighbors} "
                         f"subjects, got {x.shape[0]}")
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, n_components=2,
                        init="pca", random_state=seed, n_jobs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*")
        return np.asarray(reducer.fit_transform(x), dtype=float)


def feature_space(table: pd.DataFrame, keys, highlight: list[str], seed: int = 0,
                  n_neighbors: int = 15, min_dist: float = 0.1) -> dict[str, pd.DataFrame]:
    """UMAP embeddings of the subjects, one per highlighted field left out and used for colour.

    Parameters
    ----------
    table : DataFrame indexed by eid
        Field values (any units), one column per field key.
    keys : iterable of str
        The fields that span the feature space.
    highlight : list of str
        Fields to colour by; each is removed from the features of its own embedding (it need not
        be among ``keys``).
    seed : int
        UMAP ``random_state``.
    n_neighbors, min_dist :
        UMAP parameters.

    Returns
    -------
    dict
        ``{field: DataFrame}`` in the order of ``highlight``; each frame is indexed by eid (sorted)
        with columns ``umap_1``, ``umap_2`` and ``value`` (the highlighted field, in its unit).
        Each embedding uses the subjects with every one of its features and the highlighted
        field present; their number is in ``.attrs["n"]``, the features in
        ``.attrs["features"]``.
    """
    keys = [str(k) for k in keys]
    highlight = [str(h) for h in highlight]
    columns = list(dict.fromkeys(keys + highlight))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"feature_space: field(s) not in the table: {', '.join(missing)}")
    numeric = table[columns].apply(pd.to_numeric, errors="coerce").sort_index(kind="stable")
    out = {}
    for field in highlight:
        features = [k for k in keys if k != field]
        if len(features) < 2:
            raise ValueError(f"feature_space: fewer than two fields left after removing {field}")
        # per panel: the subjects with every feature and the coloured field (a field that only
        # a minority has, e.g. DXA, must not shrink the other panels)
        complete = numeric[features + [field]].dropna()
        if complete.empty:
            raise ValueError(f"feature_space: no subject has all of {', '.join(features)} "
                             f"and {field}")
        xy = umap_embedding(standardise(complete[features]).to_numpy(float), seed=seed,
                            n_neighbors=n_neighbors, min_dist=min_dist)
        frame = pd.DataFrame({"umap_1": xy[:, 0], "umap_2": xy[:, 1],
                              "value": complete[field].to_numpy(float)}, index=complete.index)
        frame.attrs.update({"field": field, "n": len(frame), "features": features})
        out[field] = frame
    return out
