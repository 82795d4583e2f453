"""Benchmark: records/s of the rule auditor (synehr.rules.audit_rules) on 100k synthetic-like records, against the
slow polars reference synehr.demo.check_rules on the same events in the same run.

usage: python bench/audit_rules.py [--quick] [--records N]
The input (untimed) is the 2,000-subject demo cohort replicated to N records (100,000; 5,000 with --quick): each
copy gets new subject ids and all its times shifted by a random whole number of days (the same shift for a whole
record, so every rule still holds). One warm-up call compiles the kernel (its seconds are recorded apart); then
auditor and reference alternate, median of 3 runs (1 with --quick; --ref-runs 1 runs
the slow reference once, in the same process on the same input). The run also checks that the auditor's per-rule
units and violations equal the reference's on the whole input (chunking must not change a count). The grammar
check gets the run's vocabulary, as the pipeline's audit stage passes it (fitted untimed on the base cohort;
--fit-vocab times audit_rules fitting one on the audited events instead). Writes
bench/results/audit_rules.json and appends rows to bench/README.md.
"""
import sys
from pathlib import Path

# keep bench/ off the import path: bench/tokenize.py would shadow the standard library's tokenize
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
_spec = importlib.util.spec_from_file_location("bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_common)
median, record, save = _common.median, _common.record, _common.save

TARGET = "100k records audited in seconds (>= 10,000 records/s) and >= 10x check_rules"


def replicate(n_records: int, seed: int = 0):
    "The demo cohort replicated to n_records records, each copy time-shifted by whole days (untimed)."
    import numpy as np
    import polars as pl
    from synehr.demo import simulate_cohort
    base = simulate_cohort(2000, seed=seed)
    n_copies = -(-n_records // 2000)
    rng = np.random.default_rng(seed)
    shift = rng.integers(-365, 365, n_copies)
    parts = [base.with_columns(pl.col("subject_id") + c * 1_000_000, pl.col("time") + pl.duration(days=int(shift[c])))
             for c in range(n_copies)]
    ev = pl.concat(parts)
    keep = ev["subject_id"].unique().sort().head(n_records)
    return ev.filter(pl.col("subject_id").is_in(keep.implode())).sort("subject_id", "time", nulls_last=False, maintain_order=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 records, one run each (< 60 s)")
    ap.add_argument("--records", type=int, default=None, help="records to audit (default 100,000; 5,000 with --quick)")
    ap.add_argument("--runs", type=int, default=None, help="runs of each side (default 3; 1 with --quick)")
    ap.add_argument("--ref-runs", type=int, default=None, help="runs of check_rules (default: --runs; it takes minutes at 100k)")
    ap.add_argument("--no-save", action="store_true", help="print, do not write results")
    ap.add_argument("--fit-vocab", action="store_true", help="let audit_rules fit a vocabulary on the audited events (timed) instead of "
                    "passing the run's vocabulary as the pipeline does")
    a = ap.parse_args(argv)
    import polars as pl
    from synehr.demo import check_rules
    from synehr.rules import audit_rules
    n = a.records or (5_000 if a.quick else 100_000)
    n_runs = a.runs or (1 if a.quick else 3)
    ref_runs = min(a.ref_runs or n_runs, n_runs)
    t0 = time.perf_counter()
    ev = replicate(n)
    print(f"input: {n:,} records, {len(ev):,} events ({time.perf_counter() - t0:.1f} s, untimed)", flush=True)
    vocab = None
    if not a.fit_vocab:  # the run's vocabulary (the pipeline passes the one fitted on the train split): from the base cohort, untimed
        from synehr.cohort import fit_lab_stats
        from synehr.demo import simulate_cohort
        from synehr.tokenizer import fit_vocab
        base = simulate_cohort(2000, seed=0).with_columns(pl.lit(None, pl.String).alias("text_value"))
        vocab = fit_vocab(base, fit_lab_stats(base))
    t0 = time.perf_counter()
    audit_rules(ev.head(5000), vocab=vocab)  # compiles the kernel (the same shapes as every later chunk)
    compile_s = time.perf_counter() - t0
    ours, ref, audit, totals = [], [], None, None
    for i in range(n_runs):
        l0 = os.getloadavg()[0]
        t0 = time.perf_counter(); audit = audit_rules(ev, vocab=vocab); ours.append(time.perf_counter() - t0)
        if i < ref_runs: t0 = time.perf_counter(); totals = check_rules(ev); ref.append(time.perf_counter() - t0)
        print(f"run {i}: auditor {ours[-1]:.2f} s" + (f", check_rules {ref[-1]:.2f} s" if i < ref_runs else "") + f" (load {l0:.1f})", flush=True)
    cmp = totals.select("rule_id", "n_checked", ref_v=pl.col("n_checked") - pl.col("n_ok")).join(
        audit.totals.select("rule_id", mine_checked="n_checked", mine_v="n_violations"), on="rule_id", how="left")
    agree = bool(cmp.select(((pl.col("n_checked") == pl.col("mine_checked")) & (pl.col("ref_v") == pl.col("mine_v"))).all()).item())
    if not agree: print(cmp.filter((pl.col("n_checked") != pl.col("mine_checked")) | (pl.col("ref_v") != pl.col("mine_v"))))
    ours_s, ref_s = median(ours), median(ref)
    tag = " (--quick)" if a.quick else ""
    extra = dict(records=n, events=len(ev), compile_s=round(compile_s, 2), runs_s=[round(x, 2) for x in ours],
                 reference_runs_s=[round(x, 2) for x in ref], agrees_with_reference=agree,
                 violations=len(audit.violations), load_avg_1min=os.getloadavg()[0])
    recs = [record("audit_rules", f"records/s of audit_rules (98 rules + GRAMMAR, per-record scores and violations), {n:,} records / {len(ev):,} events{tag}"
                   f"{', vocabulary fitted inside (timed)' if a.fit_vocab else ', the run vocabulary given'}; "
                   f"per-rule counts equal check_rules: {agree}",
                   n / ours_s, "records/s", "synehr.demo.check_rules (polars, per-rule counts only)", n / ref_s, ref_s / ours_s,
                   TARGET, n_runs, reference_n_runs=ref_runs, **extra)]
    print(recs[0])
    if not a.no_save: save("audit_rules", recs)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
