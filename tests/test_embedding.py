"""UMAP feature space: subject selection, leave-one-field-out, reproducibility."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from biometry.analysis import embedding, evaluate
from biometry.phantom.cohort import sample_fields
from biometry.report import plots


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


@pytest.fixture(scope="module")
def phantom_fields(tmp_path_factory):
    """The field table of a 200-subject phantom cohort (no images are synthesised)."""
    root = tmp_path_factory.mktemp("fig2")
    observed, _ = sample_fields(200, 0, scale=0.15)
    (root / "cohort").mkdir()
    observed.to_csv(root / "cohort" / "fields.csv", index=False)
    return root


@pytest.mark.slow
def test_fig2_colours_by_sex_bmi_height_body_fat_each_left_out(phantom_fields):
    root = phantom_fields
    emb = evaluate.feature_space_tables("demo", root / "fs", data_dir=root / "cohort",
                                        runs_root=root / "runs")
    assert list(emb) == list(embedding.FIG2_FIELDS)
    for key, frame in emb.items():
        assert key not in frame.attrs["features"]  # removed before its own embedding
        assert frame.attrs["n"] == len(frame) and frame["value"].notna().all()
    # every other panel keeps the colour field of the others among its features
    assert "31" in emb["21001"].attrs["features"] and "12144" in emb["31"].attrs["features"]
    back = evaluate.read_feature_space(root / "fs")
    assert list(back) == list(emb)
    assert back["31"].attrs["n"] == emb["31"].attrs["n"]
    assert np.allclose(back["31"][["umap_1", "umap_2"]], emb["31"][["umap_1", "umap_2"]],
                       rtol=1e-5)
    # the two sexes lie apart: a subject's 5 nearest neighbours in the map share its sex
    sex = emb["31"]
    xy, label = sex[["umap_1", "umap_2"]].to_numpy(), sex["value"].to_numpy()
    knn = KNeighborsClassifier(n_neighbors=6).fit(xy, label)
    _, idx = knn.kneighbors(xy)
    purity = (label[idx[:, 1:]] == label[:, None]).mean()
    assert purity > 0.9, purity
    fig = plots.feature_space_figure(back)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("sex (31)") and f"N = {sex.attrs['n']}" in titles[0]
    assert any(t.startswith("BMI (21001)") for t in titles)
