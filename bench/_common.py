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
    "The short HEAD commit, with '+dirty' when tracked files other than the benchmarks' own outputs differ from it."
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/README.md", ":!bench/results"],
                               cwd=BENCH.parent, capture_output=True).returncode == 1
        return head + ("+dirty" if dirty else "")
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


def matmul_peak(seconds: float = 2.0) -> dict:
    """This machine's measured float32 matmul rate (GFLOP/s): the best of torch (if importable) and XLA over a few
    large square and decoder-shaped products, each repeated for about `seconds`. A ceiling for any float32
    transformer step here: training and decoding are mostly matmuls, so neither side of a ratio can run faster."""
    import numpy as np
    shapes = [(2048, 2048, 2048), (1024, 1024, 1024), (2048, 384, 1024), (2048, 1024, 384)]
    out = {}

    def best(fn, m, k, n):
        fn()  # warm up (compiles on the XLA side)
        t_end, rates = time.perf_counter() + seconds / len(shapes), []
        while time.perf_counter() < t_end or len(rates) < 3:
            t0 = time.perf_counter(); fn(); rates.append(2 * m * k * n / (time.perf_counter() - t0) / 1e9)
        return max(rates)
    rng = np.random.default_rng(0)
    try:
        import torch
        out["torch"] = max(best(lambda a=torch.from_numpy(rng.standard_normal((m, k), np.float32)),
                                b=torch.from_numpy(rng.standard_normal((k, n), np.float32)): a @ b, m, k, n) for m, k, n in shapes)
    except ImportError:
        pass
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda a, b: a @ b)
    out["xla"] = max(best(lambda a=jnp.asarray(rng.standard_normal((m, k), np.float32)),
                          b=jnp.asarray(rng.standard_normal((k, n), np.float32)): f(a, b).block_until_ready(), m, k, n)
                     for m, k, n in shapes)
    out["peak"] = max(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def decoder_flops(D: int, F: int, L: int, H: int, K: int, V: int, context: int) -> dict:
    """Matmul FLOPs of a Llama-style decoder per token: `forward` (2 x weights + attention over `context` positions,
    the whole causal square counted, as dense kernels compute it) and `train` (forward + backward = 3 x forward)."""
    hd = D // H
    weights = L * (D * D + 2 * D * K * hd + D * D + 3 * D * F) + D * V  # q, k, v, o, gate/up/down, head
    attn = L * 2 * 2 * context * D  # q.k and p.v over the context
    fwd = 2 * weights + attn
    return {"weights": weights, "forward": fwd, "train": 3 * fwd}
