"""Evaluation of the thigh-function study: high/low classification against the larger class.

Input is the study's prediction table (one row per subject, network and evaluation set), as
:func:`biometry.learn.transfer` based runs write it into ``predictions.csv``:

``eid, fold, measure, group, backbone, set, sex, reference, prediction, probability, baseline``

* ``measure``: the functional measure the network classifies (``leg_strength`` ...);
* ``group``: the subjects the network was trained on: ``all``, ``male`` or ``female`` (sex-stratified
  networks; the high/low threshold is always the median of the whole cohort's training subjects);
* ``backbone``: ``pretrained`` (the study's weights) or ``random`` (the frozen random control);
* ``set``: ``test`` (the held-out subjects of the fold) or ``external`` (the external cohort,
  where ``reference`` is its own label, e.g. self-reported exercise);
* ``reference`` and ``prediction``: classes 0 (low) / 1 (high); ``probability``: P(high);
* ``baseline``: the larger class among the network's training subjects (external cohort: of
  its own labels), for ``train_majority_accuracy``.

Metrics come from scikit-learn: accuracy, balanced accuracy, ROC AUC. The *larger-class baseline*
(``baseline_accuracy``) is the share of the larger class among the evaluated subjects (the
"no-information rate"): the best a constant guess can score on them, so a network must beat it
to have learnt anything but the class balance. With a median split the training classes are
balanced and the larger class of the *training* subjects is close to a coin flip; the accuracy
of always predicting it is reported too (``train_majority_accuracy``), but the study is judged
against the stricter ``baseline_accuracy``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

#: columns of the prediction table
PREDICTION_COLUMNS = ("eid", "fold", "measure", "group", "backbone", "set", "sex", "reference",
                      "prediction", "probability", "baseline")
#: the columns that name one network's evaluation (rows of :func:`classification_table`)
KEYS = ("measure", "group", "backbone", "set")


def classification_metrics(reference, prediction, probability=None,
                           train_majority=None) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC and the larger-class baseline of one evaluation.

    Parameters
    ----------
    reference, prediction : (n,) classes 0/1.
    probability : (n,) P(class 1), for the AUC (NaN when only one class is present).
    train_majority : the larger class of the training subjects, per subject (n,) or one int,
        for ``train_majority_accuracy`` (NaN when None).

    Returns
    -------
    dict with n, accuracy, balanced_accuracy, auc, baseline_accuracy (share of the larger class
    of ``reference``), accuracy_over_baseline (percentage points), train_majority_accuracy,
    share_high (of the reference).
    """
    ref = np.asarray(reference, dtype=np.int64)
    pred = np.asarray(prediction, dtype=np.int64)
    if ref.shape != pred.shape:
        raise ValueError(f"reference {ref.shape} and prediction {pred.shape} differ in shape")
    n = len(ref)
    if n == 0:
        raise ValueError("no subjects to evaluate")
    two = len(np.unique(ref)) == 2
    acc = float(accuracy_score(ref, pred))
    share = float(ref.mean())
    base = max(share, 1.0 - share)
    train_acc = np.nan
    if train_majority is not None:
        majority = np.broadcast_to(np.asarray(train_majority, dtype=np.int64), ref.shape)
        train_acc = float(accuracy_score(ref, majority))
    auc = float(roc_auc_score(ref, probability)) if probability is not None and two else np.nan
    return {"n": int(n), "accuracy": acc,
            "balanced_accuracy": float(balanced_accuracy_score(ref, pred)) if two else np.nan,
            "auc": auc, "baseline_accuracy": base,
            "accuracy_over_baseline": 100.0 * (acc - base), "train_majority_accuracy": train_acc,
            "share_high": share}


def classification_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row of :func:`classification_metrics` per (measure, group, backbone, set), pooled over
    the folds that were trained (each row's own ``baseline``)."""
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"prediction table lacks column(s) {', '.join(missing)}")
    rows = []
    for key, t in predictions.groupby(list(KEYS), sort=True):
        m = classification_metrics(t["reference"], t["prediction"], t["probability"],
                                   t["baseline"].to_numpy())
        rows.append(dict(zip(KEYS, key, strict=True)) | m)
    return pd.DataFrame(rows)


def sex_breakdown(predictions: pd.DataFrame) -> pd.DataFrame:
    """Metrics of the whole-cohort networks within each sex (test set): how much of their
    accuracy is sex, compared with the sex-stratified networks' rows of
    :func:`classification_table`."""
    t = predictions[(predictions["group"] == "all") & (predictions["set"] == "test")]
    rows = []
    for (measure, backbone, sex), s in t.groupby(["measure", "backbone", "sex"], sort=True):
        m = classification_metrics(s["reference"], s["prediction"], s["probability"],
                                   s["baseline"].to_numpy())
        rows.append({"measure": measure, "backbone": backbone,
                     "sex": "male" if int(sex) == 1 else "female"} | m)
    return pd.DataFrame(rows)


def study_metrics(table: pd.DataFrame, measures: list[str]) -> dict:
    """The study's ``metrics.json``: per measure, the test-set rows of the whole-cohort network
    with the pretrained and the random backbone, the sex-stratified networks, and the external
    cohort where present."""

    def row(measure, group, backbone, set_="test"):
        t = table[(table["measure"] == measure) & (table["group"] == group)
                  & (table["backbone"] == backbone) & (table["set"] == set_)]
        return None if t.empty else {k: _plain(v) for k, v in t.iloc[0].items()
                                     if k not in KEYS}

    out: dict = {"measures": {}}
    for m in measures:
        out["measures"][m] = {
            "pretrained": row(m, "all", "pretrained"),
            "random_backbone": row(m, "all", "random"),
            "sex_stratified": {g: row(m, g, "pretrained") for g in ("male", "female")},
            "sex_stratified_random": {g: row(m, g, "random") for g in ("male", "female")},
        }
    ext = table[table["set"] == "external"]
    out["external"] = None if ext.empty else {
        "measure": str(ext.iloc[0]["measure"]), "backbone": str(ext.iloc[0]["backbone"]),
        **{k: _plain(v) for k, v in ext.iloc[0].items() if k not in KEYS}}
    return out


def best_measure(table: pd.DataFrame) -> str:
    """The measure whose whole-cohort pretrained network has the highest test balanced accuracy
    (the network the study applies to the external cohort)."""
    t = table[(table["group"] == "all") & (table["backbone"] == "pretrained")
              & (table["set"] == "test")]
    if t.empty:
        raise ValueError("no whole-cohort pretrained network on the test set")
    return str(t.sort_values(["balanced_accuracy", "measure"], ascending=[False, True],
                             na_position="last").iloc[0]["measure"])


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    return v
