"""Subject-level k-fold assignment, computed once per study and only read afterwards.

Every field of a study shares one ``splits.csv`` (columns ``eid``, ``fold``), so that each subject
has exactly one validation network per field and out-of-fold predictions of different fields can
be compared subject by subject. Repeat visits of one subject (e.g. the imaging visit, instance 2,
and the repeat imaging visit, instance 3, stored under different image ids) are kept in one fold by
giving them the same ``group``.

Repeat visits arrive from ``biometry prepare`` as ``<eid>`` (instance 2) and ``<eid>-<instance>``
(other instances): when no groups are given, :func:`visit_groups` groups them by the part before
the ``-``, so one person's scans never straddle folds.

Stratification (optional): ``strata`` (e.g. sex, or a binned target) makes the folds keep each
stratum's share, with :class:`sklearn.model_selection.StratifiedGroupKFold` (groups still kept
whole). How the file was made is recorded in a sidecar ``splits.json`` (method, folds, seed,
grouping, stratification); a caller that asks for another stratification of an existing file gets
an error naming it.

The file's rows are in canonical eid order (:func:`biometry.data.store.canonical_order`), so the
same subjects give the same bytes whatever order the prepared store holds them in.

Extension policy: :func:`load_or_create_splits` never re-assigns a subject. When the study gains
subjects that are not in the file, it raises unless ``extend=True``, in which case the new subjects
(whole groups) are appended (in eid order), each to the currently smallest fold, in a seeded
order; the existing rows are kept byte for byte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from biometry import fileio
from biometry.data.store import canonical_order


def visit_groups(eids: Sequence) -> list[str]:
    """The subject of each store key: ``"1234567-3"`` (a repeat visit) -> ``"1234567"``."""
    return [str(e).split("-", 1)[0] for e in eids]


def sidecar_path(path: str | os.PathLike) -> Path:
    """``splits.json`` beside ``splits.csv``: how the assignment was made."""
    return Path(path).with_suffix(".json")


def _as_str_list(eids: Sequence, what: str = "eids") -> list[str]:
    out = [str(e) for e in eids]
    seen: set[str] = set()
    dups = sorted({e for e in out if e in seen or seen.add(e)})
    if dups:
        raise ValueError(f"duplicated {what}: {', '.join(dups[:5])}"
                         f"{' ...' if len(dups) > 5 else ''}")
    return out


def _assign(group_sizes: np.ndarray, fold_sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Greedy balancing: visit groups in ``order``, largest first, each to the smallest fold."""
    sizes = fold_sizes.copy()
    folds = np.empty(len(group_sizes), dtype=np.int64)
    # stable sort of the shuffled order by decreasing size keeps the seeded order within a size
    visit = order[np.argsort(-group_sizes[order], kind="stable")]
    for g in visit:
        k = int(np.argmin(sizes))   # lowest fold index among the smallest: deterministic
        folds[g] = k
        sizes[k] += group_sizes[g]
    return folds


def make_splits(eids: Sequence, n_folds: int, seed: int,
                groups: Sequence | None = None, strata: Sequence | None = None) -> pd.DataFrame:
    """Assign subjects to ``n_folds`` folds, seeded, balanced, never splitting a group.

    Parameters
    ----------
    eids : (N,) subject or image ids (converted to str; must be unique).
    n_folds : number of folds K (>= 2).
    seed : seed of the random assignment.
    groups : optional (N,) group label per eid (e.g. the subject's eid for each visit); all eids of
        one group get the same fold. Default: every eid is its own group.
    strata : optional (N,) stratum per eid (sex, a binned target; missing values may be their own
        stratum); the folds then keep each stratum's share (``StratifiedGroupKFold``, shuffled with
        ``seed``, on the eids in sorted order so that the input order does not matter).

    Returns
    -------
    DataFrame with columns ``eid`` (str) and ``fold`` (int, 0..K-1), in the order of ``eids``.
    Fold sizes differ by at most one when there are no groups (by at most the largest group with).
    """
    eids = _as_str_list(eids)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    groups = eids if groups is None else [str(g) for g in groups]
    if len(groups) != len(eids):
        raise ValueError(f"groups has {len(groups)} entries for {len(eids)} eids")
    labels, inverse = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    if len(labels) < n_folds:
        raise ValueError(f"{len(labels)} subjects (groups) cannot fill {n_folds} folds")
    if strata is not None:
        strata = [str(v) for v in strata]
        if len(strata) != len(eids):
            raise ValueError(f"strata has {len(strata)} entries for {len(eids)} eids")
        order = np.argsort(np.asarray(eids, dtype=object), kind="stable")
        cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold = np.empty(len(eids), dtype=np.int64)
        y = np.asarray(strata, dtype=object)[order]
        g = np.asarray(groups, dtype=object)[order]
        for k, (_train, test) in enumerate(cv.split(np.zeros(len(eids)), y, g)):
            fold[order[test]] = k
        return pd.DataFrame({"eid": eids, "fold": fold})
    sizes = np.bincount(inverse, minlength=len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    group_fold = _assign(sizes, np.zeros(n_folds, dtype=np.int64), order)
    return pd.DataFrame({"eid": eids, "fold": group_fold[inverse].astype(np.int64)})


def save_splits(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``splits.csv`` (eid, fold) atomically."""
    _check_frame(df, str(path))
    return fileio.write_csv(path, df[["eid", "fold"]])


def load_splits(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``splits.csv``; eids stay strings. Raises ``ValueError`` naming the file if malformed."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"eid": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a splits table ({exc})") from exc
    _check_frame(df, str(path))
    return df[["eid", "fold"]].astype({"eid": str, "fold": np.int64})


def _check_frame(df: pd.DataFrame, where: str) -> None:
    if list(df.columns[:2]) != ["eid", "fold"]:
        raise ValueError(f"{where}: expected columns eid, fold; got {list(df.columns)}")
    if df["eid"].isna().any() or df["eid"].astype(str).duplicated().any():
        dup = df["eid"][df["eid"].astype(str).duplicated()].astype(str).tolist()[:3]
        raise ValueError(f"{where}: missing or duplicated eids {dup}")
    if not pd.api.types.is_integer_dtype(df["fold"]) or (df["fold"] < 0).any():
        raise ValueError(f"{where}: fold must be non-negative integers")


def load_or_create_splits(path: str | os.PathLike, eids: Sequence, n_folds: int, seed: int,
                          groups: Sequence | None = None, extend: bool = False,
                          strata: Sequence | None = None,
                          stratify: str | None = None) -> pd.DataFrame:
    """The study's splits: read ``path`` if it exists, else make them and save them there.

    An existing file is never rewritten except by ``extend=True`` (see the module docstring).
    ``groups`` defaults to :func:`visit_groups`. ``strata`` and its name ``stratify`` (e.g.
    ``"31"``) stratify a new file; the sidecar ``splits.json`` records how it was made, and an
    existing file recorded with another ``stratify`` raises (pass ``stratify=None`` to only read).

    Raises
    ------
    ValueError
        The file has another number of folds than ``n_folds``, or lacks some of ``eids`` and
        ``extend`` is False (the message names the file and the first missing eids).
    """
    path = Path(path)
    eids = _as_str_list(eids)
    grouped = groups is None
    groups = visit_groups(eids) if groups is None else groups
    if not path.exists():
        df = _in_eid_order(make_splits(eids, n_folds, seed, groups, strata if stratify else None))
        save_splits(df, path)
        fileio.write_json(sidecar_path(path), {
            "method": "StratifiedGroupKFold" if stratify else "seeded greedy balance of groups",
            "folds": int(n_folds), "seed": int(seed), "stratify": stratify,
            "groups": "visits of one eid (<eid>-<instance>)" if grouped else "given",
            "n_eids": len(eids), "n_groups": len(set(groups))})
        return df
    side = sidecar_path(path)
    if stratify is not None and side.is_file():
        made = read_sidecar(side).get("stratify")
        if made != stratify:
            raise ValueError(f"{path} was made with stratify={made!r}, not {stratify!r} (see "
                             f"{side}); delete both to re-split (every fold changes)")
    df = load_splits(path)
    k_file = int(df["fold"].max()) + 1 if len(df) else 0
    if k_file != n_folds:
        raise ValueError(f"{path} holds {k_file} folds but {n_folds} were asked for; use another "
                         f"splits file (or delete this one, which changes every fold)")
    known = set(df["eid"])
    new = [e for e in eids if e not in known]
    if not new:
        return df
    if not extend:
        raise ValueError(f"{path} lacks {len(new)} of the study's subjects (e.g. "
                         f"{', '.join(new[:3])}); pass extend=True to append them to the "
                         f"smallest folds without moving anyone")
    df = extend_splits(df, eids, seed, groups)
    save_splits(df, path)
    return df


def read_sidecar(path: Path) -> dict:
    """The sidecar's mapping ({} when unreadable)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def extend_splits(df: pd.DataFrame, eids: Sequence, seed: int,
                  groups: Sequence | None = None) -> pd.DataFrame:
    """Append the eids not yet in ``df`` to the folds, smallest fold first; existing rows kept.

    A new eid whose group already has a fold in ``df`` joins that fold.
    """
    eids = _as_str_list(eids)
    groups = eids if groups is None else [str(g) for g in groups]
    group_of = dict(zip(eids, groups, strict=True))
    n_folds = int(df["fold"].max()) + 1
    fold_of_group = {group_of[e]: f for e, f in zip(df["eid"], df["fold"], strict=True)
                     if e in group_of}
    known = set(df["eid"])
    new = [e for e in eids if e not in known]
    rows, pending = [], []
    for e in new:
        g = group_of[e]
        if g in fold_of_group:
            rows.append((e, fold_of_group[g]))
        else:
            pending.append(e)
    if pending:
        labels, inverse = np.unique(np.asarray([group_of[e] for e in pending], dtype=object),
                                    return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(labels))
        fold_sizes = np.bincount(np.concatenate([df["fold"].to_numpy(),
                                                 [f for _e, f in rows]]).astype(np.int64),
                                 minlength=n_folds)
        order = np.random.default_rng([seed, len(df)]).permutation(len(labels))
        gf = _assign(sizes, fold_sizes, order)
        rows += [(e, int(gf[i])) for e, i in zip(pending, inverse, strict=True)]
    added = pd.DataFrame(rows, columns=["eid", "fold"]).astype({"eid": str, "fold": np.int64})
    return pd.concat([df, _in_eid_order(added)], ignore_index=True)


def _in_eid_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in canonical eid order, so that ``splits.csv`` does not depend on the input order."""
    return df.iloc[canonical_order(df["eid"])].reset_index(drop=True)


def fold_indices(splits: pd.DataFrame, eids: Sequence, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions into ``eids`` of the training (other folds) and validation (``fold``) subjects.

    Raises ``ValueError`` naming eids that have no fold in ``splits``.
    """
    eids = [str(e) for e in eids]
    fold_of = dict(zip(splits["eid"].astype(str), splits["fold"], strict=True))
    missing = [e for e in eids if e not in fold_of]
    if missing:
        raise ValueError(f"{len(missing)} eids have no fold in the splits (e.g. "
                         f"{', '.join(missing[:3])})")
    folds = np.array([fold_of[e] for e in eids], dtype=np.int64)
    if fold not in set(folds.tolist()):
        raise ValueError(f"fold {fold} is empty or not in the splits (folds "
                         f"{sorted(set(folds.tolist()))})")
    return np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
