"""Subject-level k-fold splits: seeded, balanced, groups intact, persisted once."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from biometry.learn import splits


def _eids(n: int) -> list[str]:
    return [f"{1000000 + i:07d}" for i in range(n)]


def test_seeded_and_balanced():
    eids = _eids(100)
    a = splits.make_splits(eids, 7, seed=3)
    b = splits.make_splits(eids, 7, seed=3)
    c = splits.make_splits(eids, 7, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["fold"].equals(c["fold"])
    assert a["eid"].tolist() == eids
    counts = np.bincount(a["fold"], minlength=7)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 100
    # not simply sequential blocks: the first 15 eids land in several folds
    assert len(set(a["fold"][:15])) > 3


def test_groups_never_straddle_folds():
    rng = np.random.default_rng(0)
    subjects = [f"s{i}" for i in range(60)]
    eids, groups = [], []
    for s in subjects:                       # 1-3 visits per subject, separate image ids
        for v in range(int(rng.integers(1, 4))):
            eids.append(f"{s}_v{v}")
            groups.append(s)
    df = splits.make_splits(eids, 5, seed=1, groups=groups)
    df["group"] = groups
    assert (df.groupby("group")["fold"].nunique() == 1).all()
    counts = np.bincount(df["fold"], minlength=5)
    assert counts.max() - counts.min() <= 3    # balanced up to the largest group


def test_bad_input():
    with pytest.raises(ValueError, match="duplicated eids: 7"):
        splits.make_splits(["7", "8", 7], 2, seed=0)
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        splits.make_splits(_eids(4), 5, seed=0)


def test_persisted_and_only_read_afterwards(tmp_path):
    path = tmp_path / "study" / "splits.csv"
    eids = _eids(30)
    first = splits.load_or_create_splits(path, eids, 3, seed=0)
    assert path.is_file()
    back = splits.load_splits(path)
    pd.testing.assert_frame_equal(first, back)
    assert back["eid"].iloc[0] == "1000000" and back["eid"].map(type).eq(str).all()
    # a later call with another seed reads the file instead of recomputing
    again = splits.load_or_create_splits(path, eids[::-1], 3, seed=99)
    pd.testing.assert_frame_equal(again, first)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(ValueError, match="holds 3 folds but 4"):
        splits.load_or_create_splits(path, eids, 4, seed=0)
    with pytest.raises(ValueError, match="lacks 2 of the study's subjects"):
        splits.load_or_create_splits(path, eids + ["x1", "x2"], 3, seed=0)
    assert path.stat().st_mtime_ns == mtime


def test_extension_keeps_existing_assignments(tmp_path):
    path = tmp_path / "splits.csv"
    eids = _eids(30)
    first = splits.load_or_create_splits(path, eids, 3, seed=0)
    more = eids + [f"new{i}" for i in range(6)]
    ext = splits.load_or_create_splits(path, more, 3, seed=0, extend=True)
    pd.testing.assert_frame_equal(ext.iloc[:30].reset_index(drop=True), first)
    assert sorted(ext["eid"]) == sorted(more)
    assert np.bincount(ext["fold"]).tolist() == [12, 12, 12]
    pd.testing.assert_frame_equal(splits.load_splits(path), ext)


def test_fold_indices():
    eids = _eids(20)
    df = splits.make_splits(eids, 4, seed=0)
    order = eids[::-1]
    tr, va = splits.fold_indices(df, order, 2)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 20
    assert set(np.asarray(order)[va]) == set(df.loc[df.fold == 2, "eid"])
    with pytest.raises(ValueError, match="no fold"):
        splits.fold_indices(df, order + ["zzz"], 0)


def test_repeat_visits_grouped_by_default(tmp_path):
    eids = [str(1000000 + i) for i in range(40)] + [f"{1000000 + i}-3" for i in range(0, 40, 3)]
    df = splits.load_or_create_splits(tmp_path / "splits.csv", eids, 4, seed=2)
    fold = df.set_index("eid")["fold"]
    for i in range(0, 40, 3):  # instance 2 is "<eid>", instance 3 "<eid>-3": one person, one fold
        assert fold[str(1000000 + i)] == fold[f"{1000000 + i}-3"]
    assert splits.visit_groups(["123-3", "123", "45"]) == ["123", "123", "45"]


def test_stratified_splits_keep_each_stratum_share_and_are_recorded(tmp_path):
    rng = np.random.default_rng(4)
    eids = _eids(120)
    sex = (rng.random(120) < 0.25).astype(int)  # a minority of 30 or so
    path = tmp_path / "splits.csv"
    df = splits.load_or_create_splits(path, eids, 3, seed=0, strata=sex, stratify="31")
    per_fold = pd.crosstab(df["fold"], sex)
    # each fold holds a third of each sex, up to one subject
    assert (per_fold.max() - per_fold.min()).max() <= 1
    side = json.loads(splits.sidecar_path(path).read_text())
    assert side["method"] == "StratifiedGroupKFold" and side["stratify"] == "31"
    assert splits.make_splits(eids[::-1], 3, 0, strata=sex[::-1]).set_index("eid")["fold"].to_dict() \
        == df.set_index("eid")["fold"].to_dict()  # the input order does not matter
    with pytest.raises(ValueError, match="made with stratify='31', not '47'"):
        splits.load_or_create_splits(path, eids, 3, seed=0, strata=sex, stratify="47")
