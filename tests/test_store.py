"""The prepared store: create, append, reopen, memory-map, no rewrite, crash safety."""

from __future__ import annotations

import numpy as np
import pytest

from biometry.data import store as store_mod
from biometry.data.store import PartedArray, Store

FORMATS = {"a": ((2, 4, 5), "uint8"), "b": ((1, 3, 3), "uint8")}


def chunk(first: int, n: int) -> tuple[list[str], dict[str, np.ndarray], list[dict]]:
    """Subjects first..first+n-1 whose arrays are filled with their own number."""
    eids = [str(1000 + i) for i in range(first, first + n)]
    arrays = {name: np.stack([np.full(shape, i % 256, np.uint8) for i in range(first, first + n)])
              for name, (shape, _dt) in FORMATS.items()}
    qc = [{"eid": e, "status": "ok", "stage": "done", "error": "", "seam": 0.1 * k}
          for k, e in enumerate(eids)]
    return eids, arrays, qc


def test_create_append_reopen_and_memory_map(tmp_path):
    st = Store.create(tmp_path / "s", FORMATS)
    assert len(st) == 0 and st.array("a").shape == (0, 2, 4, 5)
    st.append(*chunk(0, 3))
    one = st.array("a")
    assert isinstance(one, np.memmap) and one.shape == (3, 2, 4, 5)
    st.append(*chunk(3, 2))
    st.append([], {}, qc_rows=[{"eid": "9999", "status": "failed", "stage": "load",
                                "error": "InputError: x.nii.gz truncated"}])
    again = Store.open(tmp_path / "s")
    assert again.eids == [str(1000 + i) for i in range(5)]
    arr = again.array("a")
    assert isinstance(arr, PartedArray) and arr.shape == (5, 2, 4, 5)
    assert [int(arr[i][0, 0, 0]) for i in range(5)] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(arr[[4, 0, 3]][:, 0, 0, 0], [4, 0, 3])
    np.testing.assert_array_equal(arr[1:4][:, 1, 2, 3], [1, 2, 3])
    full = again.load("b")
    assert full.shape == (5, 1, 3, 3) and list(full[:, 0, 0, 0]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(again.rows(["1003", "1001"]), [3, 1])
    with pytest.raises(KeyError, match="9999"):
        again.rows(["9999"])
    assert again.has("a") and not again.has("c")
    assert set(again.qc["status"]) == {"ok", "failed"}
    assert again.failed()["eid"].tolist() == ["9999"]
    assert again.done() == set(again.eids) | {"9999"}
    assert again.done(retry_failed=True) == set(again.eids)
    assert again.qc.loc[again.qc["eid"] == "1001", "seam"].item() == pytest.approx(0.1)


def test_single_part_load_reads_everything(tmp_path):
    st = Store.create(tmp_path / "s", FORMATS)
    st.append(*chunk(0, 4))
    np.testing.assert_array_equal(st.load("a"), np.asarray(st.array("a")))


def test_append_does_not_rewrite_existing_parts(tmp_path):
    st = Store.create(tmp_path / "s", FORMATS)
    st.append(*chunk(0, 3))
    first = sorted((tmp_path / "s").glob("*/part-*.npy"))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in first}
    st.append(*chunk(3, 3))
    for p, (mtime, ino, data) in before.items():
        assert (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) == (mtime, ino, data)
    assert len(list((tmp_path / "s").glob("*/part-*.npy"))) == 2 * len(first)


def test_crash_mid_append_leaves_complete_subjects_only(tmp_path, monkeypatch):
    st = Store.create(tmp_path / "s", FORMATS)
    st.append(*chunk(0, 2))

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed")

    # killed after the part files were written but before the index was replaced
    monkeypatch.setattr(store_mod, "write_csv", crash)
    with pytest.raises(KeyboardInterrupt):
        st.append(*chunk(2, 3))
    monkeypatch.undo()
    # killed while writing one array file: only a temporary file remains
    (tmp_path / "s" / "a" / ".tmp-half.npy").write_bytes(b"\x93NUMPY garbage")
    reopened = Store.open(tmp_path / "s")
    assert reopened.eids == ["1000", "1001"]
    assert reopened.array("a").shape == (2, 2, 4, 5)
    assert reopened.load("b")[:, 0, 0, 0].tolist() == [0, 1]
    # the next append skips the orphaned part number and commits normally
    part = reopened.append(*chunk(2, 3))
    assert part == "part-00002.npy"
    assert Store.open(tmp_path / "s").load("a")[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_bad_input_is_refused(tmp_path):
    st = Store.create(tmp_path / "s", FORMATS)
    eids, arrays, qc = chunk(0, 2)
    with pytest.raises(ValueError, match="needs"):
        st.append(eids, {"a": arrays["a"].astype(np.float32), "b": arrays["b"]})
    with pytest.raises(ValueError, match="missing"):
        st.append(eids, {"a": arrays["a"]})
    st.append(eids, arrays, qc)
    with pytest.raises(ValueError, match="already stored"):
        st.append(eids, arrays)
    with pytest.raises(FileExistsError):
        Store.create(tmp_path / "s", FORMATS)
    with pytest.raises(ValueError, match="formats"):
        Store.create(tmp_path / "s", {"a": ((2, 4, 5), "uint8")}, exist_ok=True)
    assert Store.create(tmp_path / "s", FORMATS, exist_ok=True).eids == eids
    with pytest.raises(FileNotFoundError, match="not a prepared store"):
        Store.open(tmp_path / "nothing")


def test_create_from_format_names(tmp_path):
    st = Store.create(tmp_path / "s", ["projection", "fat_fraction_slices"])
    assert st.formats["projection"].shape == (2, 256, 256)
    assert st.formats["fat_fraction_slices"].shape == (1, 176, 376)
    with pytest.raises(KeyError, match="bogus"):
        Store.create(tmp_path / "t", ["bogus"])
