"""Benchmark: the full privacy evaluation (privacy_report) on 20k members, 20k non-members and 20k synthetic records.

usage: python bench/privacy.py [--quick]
Inputs (untimed): three demo cohorts from the simulator (members seed 0, non-members seed 1) and a synthetic set of
simulator records (seed 2) with a tenth replaced by perturbed copies of members (a leaky part for the attacks to
find); 1,000 of each with --quick. Measured: the wall seconds of one whole `privacy_report` (MIA with 200 bootstrap
resamples, attribute inference, NNAAR, DCR, exact copies) against the target (the whole 20k x 20k evaluation, of
which privacy is one part, within 2 minutes), and the nearest-neighbour search alone against references in the same
run on the same records: scikit-learn's NearestNeighbors (brute force) on the flattened visit-major multi-hots, with
squared Euclidean distance (equal to the visit-aligned Hamming distance on 0/1 vectors, and the fastest exact
brute-force metric it has: BLAS matrix products), and the seed's Python loops over visit sets. Both sides alternate,
median of 3 runs (1 with --quick). Writes bench/results/privacy.json and appends rows to bench/README.md.
"""
import sys
from pathlib import Path

# keep bench/ off the import path: bench/tokenize.py would shadow the standard library's tokenize
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_common)
median, record, save = _common.median, _common.record, _common.save

TARGET_S = 120.0


def inputs(n: int):
    "Members, non-members and synthetic events (untimed)."
    import polars as pl
    from synehr.core import make_rng
    from synehr.demo import simulate_cohort
    members, non_members, synth = (simulate_cohort(n, seed=s) for s in (0, 1, 2))
    ids = members["subject_id"].unique().sort().to_numpy()
    leak = make_rng(0, "bench-privacy").choice(ids, n // 10, replace=False)
    copies = members.filter(pl.col("subject_id").is_in(leak))
    u = make_rng(1, "bench-privacy").random(copies.height)
    copies = copies.filter(~(pl.col("code").str.starts_with("LAB/") & (pl.Series(u) < 0.1))).with_columns(subject_id=pl.col("subject_id") + 10**8)
    keep = synth["subject_id"].unique().sort().to_numpy()[: n - n // 10]
    synth = pl.concat([synth.filter(pl.col("subject_id").is_in(keep)), copies])
    return members, non_members, synth


def seed_loops(P, Q):
    "The seed's nearest distance: Python loops over visit sets (evaluation/privacy.py, _nearest_distance_to_pool)."
    out = []
    for p in P:
        best = float("inf")
        for q in Q:
            d = sum(len(a ^ b) for a, b in zip(p, q))
            longer = p if len(p) > len(q) else q
            d += sum(len(v) for v in longer[min(len(p), len(q)):])
            best = min(best, d)
        out.append(best)
    return out


def visit_sets(r, i):
    "Record i as the seed holds it: a list of visit code sets."
    lo, hi = r.indptr[i], r.indptr[i + 1]
    return [set(r.col[lo:hi][r.visit[lo:hi] == v].tolist()) for v in range(r.n_visits[i])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 records per set, one run each (< 60 s)")
    ap.add_argument("--no-save", action="store_true", help="print the results only")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    from sklearn.neighbors import NearestNeighbors
    from synehr.privacy import encode_records, fit_codes, nearest_distances, privacy_report

    n, runs, n_q, n_seed = (1000, 1, 300, 20) if args.quick else (20000, 3, 2000, 40)
    t0 = time.perf_counter()
    members, non_members, synth = inputs(n)
    print(f"inputs: {n} subjects per set, {members.height + non_members.height + synth.height:,} events ({time.perf_counter() - t0:.1f} s, untimed)", flush=True)

    # the whole evaluation; the first run includes the kernels' compilation
    rep_s = []
    for _ in range(runs):
        t = time.perf_counter(); rep = privacy_report(members, non_members, synth, seed=0, n_boot=200); rep_s.append(time.perf_counter() - t)
        print(f"privacy_report: {rep_s[-1]:.1f} s", flush=True)
    m = rep.metrics

    # nearest-neighbour search alone: n_q member queries against every synthetic record, ours vs sklearn vs the seed's loops
    vocab = fit_codes(members, non_members, synth)
    A, S = encode_records(members, vocab).take(np.arange(n_q)), encode_records(synth, vocab)
    V = int(max(A.n_visits.max(), S.n_visits.max()))
    xa, xs = A.dense(np.arange(len(A)), V), S.dense(np.arange(len(S)), V)
    ours_s, sk_s = [], []
    nearest_distances(A, S)  # compiled
    for _ in range(max(runs, 3) if not args.quick else 1):
        t = time.perf_counter(); d_ours = nearest_distances(A, S).d_ab; ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        d_sk = NearestNeighbors(n_neighbors=1, algorithm="brute", metric="euclidean").fit(xs).kneighbors(xa)[0][:, 0] ** 2
        sk_s.append(time.perf_counter() - t)
    agree = float(np.max(np.abs(d_ours - np.rint(d_sk))))
    P, Q = [visit_sets(A, i) for i in range(n_seed)], [visit_sets(S, i) for i in range(len(S))]
    t = time.perf_counter(); d_seed = seed_loops(P, Q); seed_s = time.perf_counter() - t
    assert np.array_equal(np.asarray(d_seed, float), d_ours[:n_seed]), "the seed's loops disagree with nearest_distances"
    pairs = len(A) * len(S)
    ours_rate, sk_rate, seed_rate = pairs / median(ours_s), pairs / median(sk_s), n_seed * len(S) / seed_s
    load = os.getloadavg()[0]
    extra = {"load_avg_1min": load, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    what = f"{n:,} members / {n:,} non-members / {n:,} synthetic"
    recs = [
        record("privacy", f"full privacy_report (MIA + 200 bootstraps, attribute inference, NNAAR, DCR, copies), {what}", median(rep_s), "s",
               "target", TARGET_S, TARGET_S / median(rep_s), "whole 20k x 20k evaluation (privacy one part) < 120 s", runs,
               runs_s=rep_s, metrics={k: m[k] for k in ("mia_accuracy", "mia_auroc", "aia_f1_gain", "nnaar", "copy_rate_synthetic",
                                                        "dcr_synthetic_below_holdout_p05")}, **extra),
        record("privacy", f"nearest visit-aligned Hamming distance, {len(A):,} member queries x {len(S):,} synthetic (V {V}, C {S.C}); "
               f"max abs(ours - sklearn) = {agree:g}", ours_rate, "pairs/s",
               "sklearn NearestNeighbors brute, squared euclidean on flattened multi-hots", sk_rate, ours_rate / sk_rate,
               ">= 1x the sklearn brute-force reference", len(ours_s), ours_s=ours_s, sklearn_s=sk_s, **extra),
        record("privacy", f"nearest visit-aligned Hamming distance vs the seed's Python loops ({n_seed} queries x {len(S):,} synthetic)",
               ours_rate, "pairs/s", "seed: Python loops over visit sets", seed_rate, ours_rate / seed_rate, "report", 1,
               seed_s=seed_s, **extra)]
    for r in recs: print(f"{r['what']}: {r['value']:.4g} {r['unit']} (baseline {r['baseline_value']:.4g}, ratio {r['ratio']:.3g})")
    if not args.no_save: print(save("privacy", recs))


if __name__ == "__main__":
    main()
