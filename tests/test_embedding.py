"""UMAP feature space: subject selection, leave-one-field-out, reproducibility."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biometry.analysis import embedding


def _table(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 2))
    data = {f"f{i}": latent @ rng.normal(size=2) + 0.1 * rng.normal(size=n) for i in range(5)}
    table = pd.DataFrame(data, index=pd.Index([f"{i:07d}" for i in range(n)], name="eid"))
    table.iloc[:7, 2] = np.nan
    return table


def test_standardise_and_bad_input():
    z = embedding.standardise(pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [10.0, 0.0, 5.0]}))
    assert np.allclose(z.mean(), 0) and np.allclose(z.std(ddof=0), 1)
    with pytest.raises(ValueError, match="constant field"):
        embedding.standardise(pd.DataFrame({"a": [1.0, 1.0], "b": [0.0, 1.0]}))
    with pytest.raises(ValueError, match="not in the table: zz"):
        embedding.feature_space(_table(), ["f0", "f1"], ["zz"])


@pytest.mark.slow  # the first UMAP fit compiles numba code (about 15 s)
def test_feature_space_is_reproducible_and_leaves_the_field_out():
    table = _table()
    keys = ["f0", "f1", "f2", "f3"]
    first = embedding.feature_space(table, keys, ["f2"], seed=3, n_neighbors=10)
    second = embedding.feature_space(table, keys, ["f2"], seed=3, n_neighbors=10)
    assert list(first) == ["f2"]
    for field in first:
        a, b = first[field], second[field]
        assert a.columns.tolist() == ["umap_1", "umap_2", "value"]
        assert len(a) == 193  # 7 subjects lack f2
        assert np.array_equal(a.to_numpy(), b.to_numpy())
        assert np.array_equal(a["value"].to_numpy(), table.loc[a.index, field].to_numpy())
        assert field not in a.attrs["features"]
    assert first["f2"].attrs["features"] == ["f0", "f1", "f3"]
    assert np.isfinite(first["f2"][["umap_1", "umap_2"]].to_numpy()).all()
