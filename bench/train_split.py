"""Benchmark (a design probe for issue 5): one jitted training gradient against the same gradient as one jitted call per layer.

usage: python bench/train_split.py [--windows 8] [--steps 3]
The Coogee-size decoder and batches of bench/train.py (D 384, F 1024, 6 layers, batch 8x256, float32, the real tokens
only via unpad_batch; the batches with the most common computed-token count, so nothing compiles while timed). Both
sides compute the loss and the gradient of every parameter (no optimiser):
- fused: `jax.value_and_grad(next_token_loss)` in one jitted call, as synehr.train's step does;
- split: the embedding, each of the L layers and the norm + head + loss each in its own jitted call returning its
  output and its VJP function (the residuals as the call's outputs); backward, one jitted call per VJP, last layer first.
Why: XLA's CPU runtime allocates one temporary buffer per call (about 550 MB for the fused gradient) on its
work-runner thread, whose glibc arena cannot hold a block that large, so every call maps it afresh and faults its
pages in (synehr.core.tune_malloc); per-layer calls have small temporaries that the arenas keep and reuse.
Alternating windows in this process, the order swapped every window; ratio = median over windows of fused time / split
time (> 1: split is faster). Also page faults and system time per step (getrusage) and the largest loss and gradient
difference between the two. Writes bench/results/train_split.json and appends rows to bench/README.md.
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


def gradients(cfg, seed: int = 0):
    "A seeded Decoder and its parameters, and the two gradient functions: (params, batch) -> (loss, grads as a list of leaves)."
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from synehr.core import make_key
    from synehr.model import Decoder, attention_mask, dense2d, next_token_loss
    model = Decoder(cfg, rngs=nnx.Rngs(make_key(seed, "model")))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    fused_vg = jax.jit(jax.value_and_grad(lambda p, b: next_token_loss(nnx.merge(graphdef, p, rest), b)[0]))

    def fused(p, b):
        loss, g = fused_vg(p, b)
        return loss, jax.tree.leaves(g)

    layers_def, _ = nnx.split(model.layers)

    @jax.jit
    def combine(g_head, g_embed, g_layers):  # the full gradient: head + embedding parts, the layers' stacked again
        total = jax.tree.map(lambda a, e: a + e, g_head, g_embed)
        total["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *g_layers)
        return total

    def computed(b, key): return b[key].reshape(-1)[b["unpad_index"]][None]

    def embed(p, b): return nnx.merge(graphdef, p, rest).embed_tokens(computed(b, "tokens"))

    def layer(lp, h, b):
        slots = jnp.arange(b["tokens"].shape[1])
        mask = attention_mask(b["segment_ids"], b["segment_ids"], slots, slots)
        return nnx.merge(layers_def, lp)(h, computed(b, "positions"), mask, None, None, (b["unpad_index"], b["unpad_slot"]))[0]

    def head_loss(p, h, b):
        m = nnx.merge(graphdef, p, rest)
        logits = dense2d(m.embed.attend, m.norm(h)).astype(jnp.float32)
        t, w = computed(b, "targets"), computed(b, "loss_mask").astype(jnp.float32)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
        return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)

    embed_fwd = jax.jit(lambda p, b: jax.vjp(lambda p: embed(p, b), p))
    layer_fwd = jax.jit(lambda lp, h, b: jax.vjp(lambda lp, h: layer(lp, h, b), lp, h))
    head_vg = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
    back = jax.jit(lambda f, g: f(g))

    def split(p, b):
        stacked = p["layers"]
        per_layer = [jax.tree.map(lambda x: x[i], stacked) for i in range(cfg.L)]
        h, f_embed = embed_fwd(p, b)
        fs = []
        for lp in per_layer:
            h, f = layer_fwd(lp, h, b); fs.append(f)
        loss, (g, gh) = head_vg(p, h, b)
        g_layers = [None] * cfg.L
        for i in reversed(range(cfg.L)):
            g_layers[i], gh = back(fs[i], gh)
        (g_embed,) = back(f_embed, gh)
        return loss, jax.tree.leaves(combine(g, g_embed, g_layers))

    return params, fused, split


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
    params, fused, split = gradients(cfg)
    (lf, gf), (ls, gs) = fused(params, batches[0]), split(params, batches[0])
    dloss = abs(float(lf) - float(ls))
    dgrad = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(gf, gs))
    scale = max(float(jnp.max(jnp.abs(x))) for x in gf)
    print(f"loss fused {float(lf):.6f} split {float(ls):.6f}; max |grad difference| {dgrad:.2e} (largest gradient {scale:.2e})", flush=True)
    sides = {"fused": fused, "split": split}
    for f in sides.values(): jax.block_until_ready(f(params, batches[1]))
    times = {k: [] for k in sides}; faults = {k: [] for k in sides}; system = {k: [] for k in sides}
    for w in range(a.windows):
        chunk = [batches[(2 + w * a.steps + i) % len(batches)] for i in range(a.steps)]
        for name in (list(sides) if w % 2 == 0 else list(sides)[::-1]):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for b in chunk: out = sides[name](params, b)
            jax.block_until_ready(out)
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
                 loss_difference=dloss, max_grad_difference=dgrad, computed_tokens=n_comp, malloc=mode)
    print(f"paired ratios {[round(r, 3) for r in paired]}; median {ratio:.3f}; faults/step {extra['faults_per_step']}", flush=True)
    rec = record("train_split", f"loss + gradient (no optimiser) of the Coogee-size decoder, batch {B}x{T} ({n_comp} computed tokens), "
                 f"float32, SYNEHR_MALLOC={mode}: one jitted call per layer (split) vs one jitted call (fused, as synehr.train's step); "
                 f"page faults per step {extra['faults_per_step']['split']:.0f} vs {extra['faults_per_step']['fused']:.0f}; "
                 f"ratio: median of {a.windows} windows' paired ratios ({min(paired):.2f}-{max(paired):.2f}); max |grad difference| {dgrad:.1e}",
                 tok / median(times["split"]), "tokens/s", "fused (one jitted call)", tok / median(times["fused"]), ratio,
                 "report (> 1: split is faster)", a.windows, **extra)
    save("train_split", [rec])


if __name__ == "__main__":
    main()
