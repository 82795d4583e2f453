"""Benchmark: events/s and peak RSS of cohort + encode (build_cohort, fit_vocab, write_tokens) at two cohort sizes.

usage: python bench/tokenize.py [--quick]
The inputs (demo cohorts of about 2 and 10 million events; 0.13 and 0.6 million with --quick) are simulated and
written once, untimed. Each measured run is a fresh subprocess (its peak RSS is the run's), sizes alternate, and
the median of 3 runs (1 with --quick) is reported against the targets: >= 1 million events/s on this machine,
peak RSS < 4 GB, and memory flat as the cohort grows. CPU seconds (all threads of the stage) are recorded beside
the wall seconds, and so is the load average: on a shared machine they tell the work done from the waiting. Writes
bench/results/tokenize.json and appends rows to bench/README.md.
"""
import sys
from pathlib import Path

# keep bench/ off the import path: bench/tokenize.py (the name the issue asks for) would shadow the standard library's tokenize
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_common)
median, record, save = _common.median, _common.record, _common.save

TARGET_EVENTS_S = 1_000_000
TARGET_RSS_GB = 4.0
EVENTS_PER_SUBJECT = 208  # about, in the demo simulator


def generate(n_subjects: int, out: str) -> dict:
    "Simulate and write the demo input (untimed)."
    from synehr.data import make_splits, write_meds
    from synehr.demo import simulate_cohort
    ev = simulate_cohort(n_subjects, seed=0)
    write_meds(out, ev, make_splits(ev["subject_id"].unique(), 0), max_time=None)
    return {"subjects": n_subjects, "events": len(ev)}


def measure_cohort(src: str, out: str) -> dict:
    "The cohort stage alone (its own process, as in the pipeline): seconds and peak RSS."
    from synehr.cohort import build_cohort
    from synehr.core import RunConfig, RunDir
    run = RunDir(out)
    t0, c0 = time.perf_counter(), time.process_time()
    rep = build_cohort(src, run.cohort, RunConfig(run_dir=out))
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "phases": rep.stats.get("seconds"),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "load_avg_1min": os.getloadavg()[0]}


def measure_encode(out: str) -> dict:
    "The tokenizer stage alone: fit the vocab on train, encode every split; seconds and peak RSS."
    from synehr.core import RunConfig, RunDir
    from synehr.tokenizer import fit_vocab, write_tokens
    run, cfg = RunDir(out), RunConfig(run_dir=out)
    t0, c0 = time.perf_counter(), time.process_time()
    vocab = fit_vocab(run.cohort, cfg=cfg)
    vocab.save(run.tokenizer / "vocab.parquet")
    tok = write_tokens(run.cohort, run.tokens, vocab, cfg)
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "events": sum(r["events"] for r in tok.values()),
            "tokens": sum(r["tokens"] for r in tok.values()), "vocab": len(vocab),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "load_avg_1min": os.getloadavg()[0]}


def _child(*args) -> dict:
    env = {**os.environ, "SYNEHR_LOG_LEVEL": "WARNING", "SYNEHR_PROGRESS": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode: raise RuntimeError(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one run each (< 60 s)")
    ap.add_argument("--generate", nargs=2, metavar=("N_SUBJECTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--cohort", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--encode", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.generate: print(json.dumps(generate(int(a.generate[0]), a.generate[1]))); return
    if a.cohort: print(json.dumps(measure_cohort(*a.cohort))); return
    if a.encode: print(json.dumps(measure_encode(a.encode))); return
    sizes = {"small": 600, "large": 3_000} if a.quick else {"small": 9_700, "large": 48_500}
    n_runs = 1 if a.quick else 3
    with tempfile.TemporaryDirectory(prefix="synehr_bench_tok") as d:
        inputs = {k: {**_child("--generate", str(n), f"{d}/{k}"), "src": f"{d}/{k}"} for k, n in sizes.items()}
        for k, i in inputs.items(): print(f"input {k}: {i['subjects']:,} subjects, {i['events']:,} events", flush=True)
        runs = {k: [] for k in sizes}
        for r in range(n_runs):
            for k in sizes:  # alternate the sizes; each stage in its own process, as the pipeline runs them
                out = f"{d}/run_{k}_{r}"
                c = _child("--cohort", inputs[k]["src"], out)
                e = _child("--encode", out)
                runs[k].append({"cohort_s": c["seconds"], "encode_s": e["seconds"], "cohort_cpu_s": c["cpu_s"], "encode_cpu_s": e["cpu_s"],
                                "cohort_rss": c["peak_rss_gb"],
                                "encode_rss": e["peak_rss_gb"], "load": (c["load_avg_1min"] + e["load_avg_1min"]) / 2,
                                "tokens": e["tokens"], "vocab": e["vocab"], "cohort_phases": c["phases"]})
                m, ev = runs[k][-1], inputs[k]["events"]
                print(f"run {r} {k}: cohort {m['cohort_s']:.1f} s (cpu {m['cohort_cpu_s']:.1f} s, {m['cohort_rss']:.2f} GB) + encode "
                      f"{m['encode_s']:.1f} s (cpu {m['encode_cpu_s']:.1f} s, {m['encode_rss']:.2f} GB) = "
                      f"{ev / (m['cohort_s'] + m['encode_s']) / 1e6:.2f} M events/s; load {m['load']:.1f}",
                      flush=True)
    recs, tag = [], " (--quick)" if a.quick else ""
    for k in sizes:
        ev, rs = inputs[k]["events"], runs[k]
        total, enc = median([m["cohort_s"] + m["encode_s"] for m in rs]), median([m["encode_s"] for m in rs])
        common = {"events": ev, "subjects": inputs[k]["subjects"], "load_avg_1min": [round(m["load"], 2) for m in rs]}
        recs.append(record("tokenize", f"cohort + encode throughput, {ev / 1e6:.2f}M-event demo cohort{tag}", round(ev / total), "events/s",
                           "target", TARGET_EVENTS_S, round(ev / total / TARGET_EVENTS_S, 3), ">= 1e6 events/s on 2 cores", n_runs,
                           runs_s=[round(m["cohort_s"] + m["encode_s"], 2) for m in rs], cohort_s=round(median([m["cohort_s"] for m in rs]), 2),
                           encode_s=round(enc, 2), cohort_cpu_s=round(median([m["cohort_cpu_s"] for m in rs]), 2),
                           encode_cpu_s=round(median([m["encode_cpu_s"] for m in rs]), 2), cohort_phases_s=rs[0]["cohort_phases"], **common))
        recs.append(record("tokenize", f"encode only (fit_vocab + write_tokens), {ev / 1e6:.2f}M-event demo cohort{tag}", round(ev / enc),
                           "events/s", "target", TARGET_EVENTS_S, round(ev / enc / TARGET_EVENTS_S, 3), ">= 1e6 events/s on 2 cores",
                           n_runs, tokens=rs[0]["tokens"], vocab=rs[0]["vocab"], **common))
        for stage in ("cohort", "encode"):
            rss = median([m[f"{stage}_rss"] for m in rs])
            recs.append(record("tokenize", f"peak RSS of the {stage} stage, {ev / 1e6:.2f}M-event demo cohort{tag}", round(rss, 3), "GB",
                               "target", TARGET_RSS_GB, round(TARGET_RSS_GB / rss, 3), "< 4 GB, flat as the cohort grows", n_runs,
                               runs_gb=[round(m[f"{stage}_rss"], 3) for m in rs], **common))
    growth = inputs["large"]["events"] / inputs["small"]["events"]
    for stage in ("cohort", "encode"):
        small, large = (median([m[f"{stage}_rss"] for m in runs[k]]) for k in sizes)
        recs.append(record("tokenize", f"peak RSS growth of the {stage} stage for {growth:.1f}x the events (large / small){tag}",
                           round(large / small, 3), "x", "events ratio", round(growth, 3), round(growth / (large / small), 3),
                           "flat (close to 1x)", n_runs))
    path = save("tokenize", recs)
    print(f"wrote {path}")
    for r in recs: print(f"  {r['what']}: {r['value']:,} {r['unit']} (ratio {r['ratio']})")


if __name__ == "__main__":
    main()
