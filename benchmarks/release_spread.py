"""How often would a flawless system pass "the test metrics lie within the spread of the CV folds'
metrics"? And how well do a bundle's calibrated intervals cover a large later release?

A bundle of fold networks (the demo's: ``papermill_runs/demo/release/bundles/all``) is applied to
one large later release of its cohort (``--subjects``, default 4,000; phantom seed ``--seed``), so
that every member has a prediction for every subject of a pool drawn from exactly the cohort's
population. Then, ``--draws`` times (seeded): a "cohort" of ``--cohort-subjects`` pool subjects
split at random into the bundle's K folds, and a disjoint "release" of ``--release-subjects``.
Fold k's CV metric is member k on fold k's labelled subjects (member k never saw a pool subject,
as it never saw its validation fold); the release metrics are the members on the release. Nothing
is wrong by construction, so the share of draws in which a reading of the criterion holds is the
chance that a flawless system passes it. Readings: whose metric (every member / the members' mean /
the ensemble), which metrics (R² / R² and MAE), which spread (the folds' min-max, mean ± 1 SD,
mean ± 2 SD with ddof 1). The release stage's flags ``r2_within_cv`` and ``mae_within_cv`` are
"every member, R² and MAE, min-max".

Also the coverage of the bundle's calibrated 95 % intervals (the engine's ``F_lo95``, ``F_hi95``)
on the whole pool, with its standard error and the mean squared standardised error, and the chance
that a release of ``--release-subjects`` drawn from the pool has a field (and every field) in the
acceptance band 92-98 %. With ``--train`` (the module's training folder, e.g.
``papermill_runs/demo/train/all``): each member's mean squared standardised error on the pool
against the interval its calibration factor's sampling error allows (the factor is the mean raw
z² of the member's validation fold: bootstrapping that fold gives the spread of fitted over true
factor, and so of the pool's z² around 1).

Usage: ``python benchmarks/release_spread.py --bundle papermill_runs/demo/release/bundles/all
--cohort papermill_runs/demo/data/cohort [--train papermill_runs/demo/train/all]
[--subjects 4000] [--seed 21] [--draws 20000] [--out DIR]``; without ``--out`` the pool is written to a temporary folder and removed. Prints a
Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from biometry.analysis.stats import r2_mae_batched
from biometry.data.tables import references_from_fields_csv
from biometry.inference.bundle import load_bundle
from biometry.inference.engine import infer
from biometry.inference.export import oof_predictions
from biometry.inference.release import COVERAGE_BAND, member_arrays
from biometry.phantom import generate_cohort
from biometry.runs.runner import cpu_model

WHO = ("every member", "members' mean", "ensemble")
METRICS = ("R²", "R² and MAE")
SPREADS = ("min-max", "mean ± 1 SD", "mean ± 2 SD")


def pool_predictions(bundle_dir: Path, cohort: Path, out: Path, subjects: int, seed: int,
                     workers: int):
    """The bundle's members and engine output on a later release of ``cohort`` in ``out``."""
    bundle = load_bundle(bundle_dir)
    scale = json.loads((cohort / "cohort.json").read_text())["scale"]
    pool = out / "pool"
    generate_cohort(pool, subjects, seed, scale=scale, workers=workers, overwrite=True,
                    progress=True, later_release_of=cohort)
    res = infer([bundle], pool, out / "pred" / "predictions.csv", workers=workers,
                keep_members=True)
    refs = references_from_fields_csv(pool / "fields.csv", bundle.field_keys)
    refs.index = refs.index.astype(str)
    return bundle, res, refs


def spread_draws(means: dict[str, np.ndarray], refs: dict[str, np.ndarray], n_cohort: int,
                 n_release: int, draws: int, seed: int) -> dict[tuple, np.ndarray]:
    """(draws, fields) booleans per reading ``(who, metrics, spread)``: the criterion held."""
    keys = list(means)
    k_folds = next(iter(means.values())).shape[0]
    n = len(next(iter(refs.values())))
    if n_cohort + n_release > n:
        raise ValueError(f"the pool has {n} subjects, fewer than cohort + release "
                         f"({n_cohort} + {n_release})")
    rng = np.random.default_rng(seed)
    out = {r: np.zeros((draws, len(keys)), bool)
           for r in itertools.product(WHO, METRICS, SPREADS)}
    for d in range(draws):
        perm = rng.permutation(n)
        folds = np.array_split(perm[:n_cohort], k_folds)
        release = perm[n_cohort:n_cohort + n_release]
        for j, key in enumerate(keys):
            y, p = refs[key], means[key]
            cv = np.array([[v[0] for v in r2_mae_batched(y[i], p[f][i][None])] for f, i in
                           enumerate(fo[np.isfinite(y[fo])] for fo in folds)])  # (K, 2)
            i = release[np.isfinite(y[release])]
            members = np.stack(r2_mae_batched(y[i], p[:, i]), axis=1)  # (K, 2)
            ens = np.array([v[0] for v in r2_mae_batched(y[i], p[:, i].mean(0)[None])])
            values = {"every member": members, "members' mean": members.mean(0, keepdims=True),
                      "ensemble": ens[None]}
            mu, sd = cv.mean(0), cv.std(0, ddof=1)
            bounds = {"min-max": (cv.min(0), cv.max(0)), "mean ± 1 SD": (mu - sd, mu + sd),
                      "mean ± 2 SD": (mu - 2 * sd, mu + 2 * sd)}
            for who, spread in itertools.product(WHO, SPREADS):
                lo, hi = bounds[spread]
                inside = np.all((lo <= values[who]) & (values[who] <= hi), axis=0)  # (2,)
                out[(who, "R²", spread)][d, j] = inside[0]
                out[(who, "R² and MAE", spread)][d, j] = inside.all()
    return out


def coverage_table(pred: pd.DataFrame, refs: dict[str, np.ndarray], n_release: int, draws: int,
                   seed: int) -> tuple[pd.DataFrame, float]:
    """Per field: n, coverage, its SE, mean z², P(in band) for a release of ``n_release``;
    and P(every field in band)."""
    rows, hits = [], {}
    for key, y in refs.items():
        ok = np.isfinite(y)
        hit = (pred[f"{key}_lo95"].to_numpy() <= y) & (y <= pred[f"{key}_hi95"].to_numpy())
        z2 = (y - pred[f"{key}_mean"].to_numpy()) ** 2 / pred[f"{key}_var"].to_numpy()
        c = float(hit[ok].mean())
        hits[key] = np.where(ok, hit, np.nan)
        rows.append({"field": key, "n": int(ok.sum()), "coverage": c,
                     "se": float(np.sqrt(c * (1 - c) / ok.sum())),
                     "mean_z2": float(z2[ok].mean())})
    rng = np.random.default_rng(seed)
    band = np.zeros((draws, len(refs)), bool)
    for d in range(draws):
        idx = rng.choice(len(pred), n_release, replace=False)
        for j, h in enumerate(hits.values()):
            v = h[idx]
            band[d, j] = COVERAGE_BAND[0] <= np.nanmean(v) <= COVERAGE_BAND[1]
    table = pd.DataFrame(rows).assign(p_in_band=band.mean(0))
    return table, float(band.all(1).mean())


def factor_precision(members: pd.DataFrame, refs: dict[str, np.ndarray], eids: list[str],
                     oof: pd.DataFrame, folds: list[int], boot: int = 4000, seed: int = 0
                     ) -> pd.DataFrame:
    """Per field and member: its fold's n, the member's mean calibrated z² on the pool, and the
    95 % interval of that z² implied by the sampling error of its fold-fitted factor."""
    rng = np.random.default_rng(seed)
    rows = []
    for key, y in refs.items():
        means, variances = member_arrays(members, key, eids)
        ok = np.isfinite(y)
        z2 = ((y[ok] - means[:, ok]) ** 2 / variances[:, ok]).mean(axis=1)
        for k, fold in enumerate(folds):
            o = oof[(oof["field"].astype(str) == key) & (oof["fold"] == fold)
                    & oof["reference"].notna()]
            raw = ((o["reference"] - o["prediction"]) ** 2 / o["variance"]).to_numpy(float)
            ratio = raw[rng.integers(0, len(raw), (boot, len(raw)))].mean(axis=1) / raw.mean()
            lo, hi = 1 / np.percentile(ratio, 97.5), 1 / np.percentile(ratio, 2.5)
            rows.append({"field": key, "member": k, "fold_n": len(raw), "pool_z2": z2[k],
                         "lo": lo, "hi": hi, "inside": bool(lo <= z2[k] <= hi)})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle of fold networks")
    ap.add_argument("--cohort", type=Path, required=True, help="the phantom cohort it was trained on")
    ap.add_argument("--train", type=Path, default=None,
                    help="the module's training folder (fold_<k>/predictions.csv): adds the "
                         "calibration factors' precision")
    ap.add_argument("--subjects", type=int, default=4000, help="subjects of the pool")
    ap.add_argument("--seed", type=int, default=21, help="the pool's phantom seed")
    ap.add_argument("--cohort-subjects", type=int, default=None,
                    help="subjects split into folds per draw (default: the cohort's)")
    ap.add_argument("--release-subjects", type=int, default=400)
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the pool here (default: a "
                    "temporary folder, removed)")
    a = ap.parse_args()
    n_cohort = a.cohort_subjects or json.loads((a.cohort / "cohort.json").read_text())["n_subjects"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        bundle, res, refs_table = pool_predictions(a.bundle, a.cohort, out, a.subjects, a.seed,
                                                   a.workers)
        t_pool = time.perf_counter() - t0
        eids = [str(e) for e in res.predictions["eid"]]
        keys = list(bundle.field_keys)
        means = {k: member_arrays(res.members, k, eids)[0] for k in keys}
        refs = {k: refs_table[k].reindex(eids).to_numpy(float) for k in keys}
        pred = res.predictions.assign(eid=lambda t: t["eid"].astype(str)).set_index("eid")
        members = res.members
    t1 = time.perf_counter()
    held = spread_draws(means, refs, n_cohort, a.release_subjects, a.draws, seed=0)
    cover, p_all_band = coverage_table(pred, refs, a.release_subjects, a.draws, seed=0)
    t_sim = time.perf_counter() - t1
    literal = held[("every member", "R² and MAE", "min-max")]
    names = dict(zip(bundle.field_keys, bundle.field_names))
    k = len(bundle.members)
    lines = [f"### How often a flawless system passes the folds' spread ({dt.date.today()})", "",
             f"`python benchmarks/release_spread.py --bundle {a.bundle} --cohort {a.cohort} "
             + (f"--train {a.train} " if a.train else "")
             + f"--subjects {a.subjects} --seed {a.seed} --draws {a.draws}`; {cpu_model()}; pool "
             f"prepared and predicted in {t_pool / 60:.1f} min, {a.draws:,} draws in "
             f"{t_sim:.0f} s. {len(eids)} pool subjects; each draw: a cohort of {n_cohort} in "
             f"{k} folds and a disjoint release of {a.release_subjects}.", "",
             "| field | n in pool | P(every member in min-max, R² and MAE) | coverage 95 % "
             "(SE) | mean z² | P(coverage in 92-98 %) at n = "
             f"{a.release_subjects} |", "|---|---|---|---|---|---|"]
    for j, row in cover.iterrows():
        key = row["field"]
        lines.append(f"| {key} {names.get(key, '')} | {row['n']} | {literal[:, j].mean():.3f} | "
                     f"{row['coverage']:.3f} ({row['se']:.3f}) | {row['mean_z2']:.2f} | "
                     f"{row['p_in_band']:.3f} |")
    lines += ["", f"Every field's coverage in 92-98 % at n = {a.release_subjects}: "
                  f"P = {p_all_band:.3f}.", "",
              f"| reading (whose metric, which metrics, which spread) | P(all {len(keys)} fields "
              f"pass) | fields passing, mean of {len(keys)} |", "|---|---|---|"]
    for (who, metrics, spread), v in held.items():
        lines.append(f"| {who}, {metrics}, {spread} | {v.all(1).mean():.4f} | "
                     f"{v.sum(1).mean():.2f} |")
    if a.train is not None:
        folds = list(bundle.meta.get("members_from_folds", range(k)))
        prec = factor_precision(members, refs, eids, oof_predictions(a.train), folds)
        lines += ["", "Each member's mean calibrated z² on the pool, and the 95 % interval its "
                      "fold-fitted factor's sampling error allows (fold n in brackets): "
                      f"{int(prec['inside'].sum())} of {len(prec)} inside.", "",
                  "| field | " + " | ".join(f"member {j}" for j in range(k)) + " |",
                  "|---|" + "---|" * k]
        for key, g in prec.groupby("field", sort=False):
            lines.append(f"| {key} | " + " | ".join(
                f"{r.pool_z2:.2f} in [{r.lo:.2f}, {r.hi:.2f}] ({r.fold_n})"
                for r in g.itertuples()) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
