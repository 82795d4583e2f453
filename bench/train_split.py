"""Benchmark: synehr.train's two training steps side by side: the fused step (one jitted call) and the split step (one jitted call per layer).

usage: python bench/train_split.py [--windows 8] [--steps 3]
The Coogee-size decoder and batches of bench/train.py (D 384, F 1024, 6 layers, batch 8x256, float32, the real tokens
only via unpad_batch; the batches with the most common computed-token count, so nothing compiles while timed). Both
sides run a whole training step (loss, gradient, clipping, AdamW), from the same parameters:
- fused: `synehr.train.make_train_step`, one jitted call (train uses it over several devices, or with scan_layers or
  remat);
- split: `synehr.train.make_split_train_step`, the embedding, each layer and the head + loss forward, each layer
  backward and the update in their own jitted calls (train's step on one device).
Why both exist: XLA's CPU runtime allocates each call's temporary buffer on a work-runner thread, whose glibc arena
cannot keep a block as large as the fused step's (about 550 MB here), so every fused step maps it afresh and faults its
pages in (synehr.core.tune_malloc); the split step's calls have small temporaries that the arenas keep and reuse.
Alternating windows in this process, the order swapped every window, synced on the updated parameters; ratio =
median over windows of fused time / split time (> 1: split is faster). Also page faults and system time per step
(getrusage) and the largest difference between the two sides' parameters after the first step. Writes
bench/results/train_split.json and appends rows to bench/README.md.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("SYNEHR_PROGRESS", "0")
os.environ.setdefault("SYNEHR_LOG_LEVEL", "WARNING")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


_common = _load("_common")
_train = _load("train")
median, record, save = _common.median, _common.record, _common.save

import numpy as np  # noqa: E402


def steps(cfg, seed: int = 0) -> dict:
    "name -> (step function, [params, opt_state]) for the fused and the split step, each from the same seeded parameters; and rest."
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from synehr.core import make_key
    from synehr.model import Decoder
    from synehr.train import make_split_train_step, make_train_step
    graphdef, params, rest = nnx.split(Decoder(cfg, rngs=nnx.Rngs(make_key(seed, "model"))), nnx.Param, ...)
    tx = _train.optimizer()
    return {name: (make(graphdef, tx), [jax.tree.map(jnp.copy, params), tx.init(params)])
            for name, make in (("fused", make_train_step), ("split", make_split_train_step))}, rest


def main(argv=None):
    import jax
    import jax.numpy as jnp
    from synehr.model import unpad_batch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    B, T = 8, 256
    V, data = _train.make_data(B, T, 40)
    cfg = _train.model_config(V, T)
    batches = [unpad_batch({k: v[i] for k, v in data.items()}) for i in range(len(data["tokens"]))]
    counts = [len(b["unpad_index"]) for b in batches]
    n_comp = max(set(counts), key=counts.count)
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b, c in zip(batches, counts) if c == n_comp]
    print(f"{len(batches)} batches of {n_comp} computed tokens", flush=True)
    sides, rest = steps(cfg)
    lr = np.float32(_train.LR)

    def run(name, b):
        step, state = sides[name]
        state[0], state[1], m = step(state[0], state[1], rest, b, None, lr)
        return m

    losses = {k: float(run(k, batches[0])["loss"]) for k in sides}
    dparam = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(sides["fused"][1][0]), jax.tree.leaves(sides["split"][1][0])))
    print(f"first step: loss {losses}; max |parameter difference| {dparam:.2e}", flush=True)
    for k in sides: run(k, batches[1]); jax.block_until_ready(sides[k][1][0])
    times = {k: [] for k in sides}; faults = {k: [] for k in sides}; system = {k: [] for k in sides}
    for w in range(a.windows):
        chunk = [batches[(2 + w * a.steps + i) % len(batches)] for i in range(a.steps)]
        for name in (list(sides) if w % 2 == 0 else list(sides)[::-1]):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for b in chunk: run(name, b)
            jax.block_until_ready(sides[name][1][0])
            dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            times[name].append(dt / a.steps); faults[name].append((r1.ru_minflt - r0.ru_minflt) / a.steps)
            system[name].append((r1.ru_stime - r0.ru_stime) / a.steps)
        print(f"window {w}: " + ", ".join(f"{k} {v[-1]:.3f} s/step ({faults[k][-1]:.0f} faults)" for k, v in times.items()), flush=True)
    paired = sorted(f / s for f, s in zip(times["fused"], times["split"]))
    ratio = median(paired)
    tok = B * T
    mode = os.environ.get("SYNEHR_MALLOC", "keep")
    extra = dict(step_seconds=times, faults_per_step={k: median(v) for k, v in faults.items()},
                 system_seconds_per_step={k: median(v) for k, v in system.items()}, window_ratios=paired,
                 first_losses=losses, max_param_difference=dparam, computed_tokens=n_comp, malloc=mode)
    print(f"paired ratios {[round(r, 3) for r in paired]}; median {ratio:.3f}; faults/step {extra['faults_per_step']}", flush=True)
    rec = record("train_split", f"training step (loss, gradient, clip, AdamW) of the Coogee-size decoder, batch {B}x{T} ({n_comp} computed tokens), "
                 f"float32, SYNEHR_MALLOC={mode}: make_split_train_step (one jitted call per layer) vs make_train_step (one jitted call); "
                 f"page faults per step {extra['faults_per_step']['split']:.0f} vs {extra['faults_per_step']['fused']:.0f}; "
                 f"ratio: median of {a.windows} windows' paired ratios ({min(paired):.2f}-{max(paired):.2f}); max |parameter difference| after one step {dparam:.1e}",
                 tok / median(times["split"]), "tokens/s", "fused (make_train_step)", tok / median(times["fused"]), ratio,
                 "report (> 1: split is faster)", a.windows, **extra)
    save("train_split", [rec])


if __name__ == "__main__":
    main()
