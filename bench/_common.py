"""Shared plumbing of the benchmarks: result records in DESIGN.md's format, the JSON file and the README table row."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def machine() -> str:
    """CPU model and core count of this machine (what the numbers were measured on)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall seconds of one call, and its result."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    return float(statistics.median(xs))


def record(name: str, what: str, value: float, unit: str, baseline: str, baseline_value: float, ratio: float,
           target: str, n_runs: int, **extra) -> dict:
    """One benchmark measurement in DESIGN.md's format."""
    return {"name": name, "what": what, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "target": target, "n_runs": n_runs,
            "machine": machine(), "commit": commit(), "date": _dt.date.today().isoformat(), **extra}


def save(name: str, records: dict | list[dict]) -> Path:
    """Write bench/results/NAME.json (atomically) and append one row per record to bench/README.md's table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    os.replace(tmp, path)
    rows = records if isinstance(records, list) else [records]
    with open(BENCH / "README.md", "a") as f:
        for r in rows:
            f.write(f"| {r['date']} | {r['commit']} | {r['name']} | {r['what']} | {r['value']:.4g} | {r['unit']} | "
                    f"{r['baseline']} | {r['baseline_value']:.4g} | {r['ratio']:.3g} | {r['target']} | {r['machine']} |\n")
    return path
