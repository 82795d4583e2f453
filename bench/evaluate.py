"""Benchmark: the whole evaluation (synehr.evaluate.evaluate: fidelity, utility, privacy) of 20k synthetic records
against 20k real reference records (and 20k real training records as utility's TRTR side and privacy's members).

usage: python bench/evaluate.py [--quick] [--runs N] [--extra-runs N] [--models logreg [logreg,hgb ...]]
Inputs (untimed): three simulator cohorts (train seed 0, reference seed 1, synthetic seed 2; 1,000 each with
--quick). Measured: wall seconds of one `evaluate` call with every family (bootstrap 100, figures written), against
the target of 2 minutes; per-family seconds, the 1-minute load average and the peak RSS are recorded beside it.
Each --models entry is one utility model set, timed in its own row: by default the pipeline's (RunConfig's
utility_models, logistic regression: the target row, median of 3 runs, 1 with --quick; --runs overrides), then
logistic regression + HistGradientBoosting (1 run; --extra-runs overrides). Writes bench/results/evaluate.json and
appends a row per model set to bench/README.md.
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
import tempfile  # noqa: E402
import time  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_common)
median, record, save = _common.median, _common.record, _common.save

TARGET_S = 120.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", default=None, help="utility model sets, each comma-separated (the seed's BiLSTM: add bilstm); "
                    "default: the pipeline's, then logreg,hgb")
    ap.add_argument("--runs", type=int, default=None, help="timed runs of the first model set (default 3, 1 with --quick)")
    ap.add_argument("--extra-runs", type=int, default=1, help="timed runs of each further model set")
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import polars as pl
    from synehr.core import RunConfig
    from synehr.demo import simulate_cohort
    n, runs = (1000, 1) if a.quick else (20000, 3)
    runs = a.runs or runs
    train, ref, synth = (simulate_cohort(n, seed=s) for s in (0, 1, 2))
    ref = ref.with_columns(pl.col("subject_id") + 10**8)  # the simulator numbers every cohort from the same id: keep the sets disjoint
    synth = synth.with_columns(pl.col("subject_id") + 10**9)
    sets = [tuple(m.split(",")) for m in a.models] if a.models else [tuple(RunConfig().utility_models), ("logreg", "hgb")]
    recs = [measure(train, ref, synth, n, models, runs if k == 0 else a.extra_runs, default=models == tuple(RunConfig().utility_models))
            for k, models in enumerate(sets)]
    print(save("evaluate", recs))


def measure(train, ref, synth, n: int, models: tuple, runs: int, default: bool) -> dict:
    from synehr.evaluate import evaluate
    secs, fam, loads = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            rep = evaluate(train, ref, {"synthetic": synth}, seed=0, n_boot=100, figures_dir=d, utility_kw={"models": models})
            secs.append(time.perf_counter() - t0)
            fam.append(rep.seconds["synthetic"])
            loads.append(os.getloadavg()[0])
        print(f"run: {secs[-1]:.1f} s " + ", ".join(f"{k} {v:.1f} s" for k, v in fam[-1].items()) + f" (load {loads[-1]:.2f})", flush=True)
    s = median(secs)
    per = {k: round(median([f[k] for f in fam]), 2) for k in fam[0]}
    return record("evaluate", f"full evaluation (fidelity + utility [{'+'.join(models)}{', the pipeline default' if default else ''}] + privacy), "
                  f"{n:,} synthetic x {n:,} real (+ {n:,} train), bootstrap 100; per family {per}", s, "s", "target", TARGET_S, TARGET_S / s,
                  "<= 120 s on this machine", runs, models=list(models), per_family_s=per, runs_s=secs, runs_per_family_s=fam,
                  load_avg_1min=loads[secs.index(min(secs, key=lambda x: abs(x - s)))], load_avg_1min_runs=loads,
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


if __name__ == "__main__":
    main()
