"""synehr.model: causality, segment isolation, jit, KV cache, remat, knowledge fusion, dtypes, 1 vs 4 devices."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _devices import run_on_devices
from synehr.core import ConfigError
from synehr.model import (Decoder, Knowledge, ModelConfig, attention_mask, count_params, cpu_kernels, data_mesh, decode_step,
                          extend, init_cache, next_token_loss, prefill, replicate, shard_batch, unpad_batch)


def packed_batch(lengths, T, V, seed=0, rows=1):
    "A make_batches-style batch: each row packs segments of `lengths` then padding; targets = next token in segment."
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (rows, T)).astype(np.int32)
    seg = np.zeros((rows, T), np.int32)
    pos = np.zeros((rows, T), np.int32)
    c = 0
    for s, n in enumerate(lengths, 1):
        seg[:, c:c + n], pos[:, c:c + n] = s, np.arange(n)
        c += n
    tokens[seg == 0] = 0
    nxt = np.roll(tokens, -1, axis=1)
    mask = (seg > 0) & (np.roll(seg, -1, axis=1) == seg) & (np.arange(T) < T - 1)
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.where(mask, nxt, 0)), "loss_mask": jnp.asarray(mask),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def logits_of(model, b, key=None):
    return model(b["tokens"], b["positions"], b["segment_ids"], key=key)


# eager calls of a scanned model re-trace and re-compile the layer scan; tests call jitted versions
fwd = nnx.jit(logits_of)
loss_fn = nnx.jit(next_token_loss)
loss_and_grad = nnx.jit(nnx.value_and_grad(next_token_loss, has_aux=True))
jit_prefill, jit_extend, jit_decode = nnx.jit(prefill), nnx.jit(extend), nnx.jit(decode_step)


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg):
    return Decoder(cfg, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- config

def test_config_roundtrip_and_errors(cfg):
    for c in (cfg, ModelConfig.coogee(V=123, dtype="bfloat16", remat=True, use_semantic=True)):
        assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    c = ModelConfig.coogee(V=10)
    assert (c.D, c.F, c.L, c.H, c.K, c.T, c.Dh, c.G, c.tie_embeddings) == (384, 1024, 6, 6, 2, 2048, 64, 3, True)
    for kw, msg in [({"H": 4, "K": 3}, "not a multiple of K"), ({"D": 30, "H": 4}, "not a multiple of H"),
                    ({"D": 12, "H": 4, "K": 2}, "must be even"), ({"dropout": 1.0}, "dropout"), ({"L": 0}, "L must be >= 1"),
                    ({"dtype": "float16"}, "dtype must be one of"), ({"remat": 1}, "remat must be bool")]:
        with pytest.raises(ConfigError, match=msg): ModelConfig.tiny(**kw)
    with pytest.raises(ConfigError, match="unknown keys"): ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": 3})


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"use_hierarchy": True, "use_semantic": True, "K": 1}])
def test_param_count_matches_formula(kw):
    c = ModelConfig.tiny(**kw)
    m = Decoder(c, rngs=nnx.Rngs(0), hierarchy=np.zeros((c.V, c.Eh)) if c.use_hierarchy else None,
                semantic=np.zeros((c.V, c.Es)) if c.use_semantic else None)
    assert count_params(m) == c.n_params == m.param_counts()["total"]
    assert "parameters" in m._repr_markdown_() and f"{c.n_params:,}" in c._repr_markdown_()


def test_coogee_param_count():
    c = ModelConfig.coogee(V=4096)
    assert count_params(nnx.eval_shape(lambda: Decoder(c, rngs=nnx.Rngs(0)))) == c.n_params == 384 * 4096 + 9_442_176
    ck = ModelConfig.coogee(V=4096, use_hierarchy=True, use_semantic=True)
    m = nnx.eval_shape(lambda: Decoder(ck, rngs=nnx.Rngs(0), hierarchy=jnp.zeros((4096, 384)), semantic=jnp.zeros((4096, 768))))
    assert count_params(m) == ck.n_params == c.n_params + 2 * 385 + 384 * (384 + 768)


# ---------------------------------------------------------------- structure of attention

def jacobian_by_step(model, b):
    "J[t, t'] = |d (logits[t] . w) / d embedding[t']| for row 0 of `b`."
    T = b["tokens"].shape[1]
    seg = b["segment_ids"][:1]
    mask = attention_mask(seg, seg, jnp.arange(T), jnp.arange(T))
    w_V = jax.random.normal(jax.random.key(9), (model.cfg.V,))
    graphdef, state = nnx.split(model)
    f = lambda e: nnx.merge(graphdef, state, copy=True).forward(e, b["positions"][:1], mask)[0][0] @ w_V
    jac_TxTx1xTxD = jax.jit(jax.jacrev(f))(model.embed_tokens(b["tokens"][:1]))
    return np.abs(np.asarray(jac_TxTx1xTxD)).sum(-1)[:, 0]


@pytest.mark.parametrize("kw", [{}, {"K": 4}, {"K": 1, "tie_embeddings": False}])
def test_causality_through_gradients(kw):
    c = ModelConfig.tiny(**kw)
    m = Decoder(c, rngs=nnx.Rngs(1))
    J = jacobian_by_step(m, packed_batch([12], 12, c.V))
    assert (np.triu(J, 1) == 0).all(), "a logit depends on a later input"
    assert (J[np.tril_indices(len(J))] > 0).all()


def test_segments_isolated_in_gradients(model):
    b = packed_batch([5, 4, 3], 14, model.cfg.V)  # 5 + 4 + 3 tokens, 2 padding
    seg = np.asarray(b["segment_ids"][0])
    J = jacobian_by_step(model, b)
    same = (seg[:, None] == seg[None, :]) & np.tril(np.ones((14, 14), bool))
    assert (J[~same] == 0).all() and (J[same] > 0).all()


def test_segment_isolation_and_packed_equals_alone(model, cfg):
    b = packed_batch([5, 6], 14, cfg.V, seed=1)
    out = fwd(model, b)
    # change patient A's tokens: patient B's logits do not move, A's do
    b2 = {**b, "tokens": b["tokens"].at[0, :5].set((b["tokens"][0, :5] + 7) % cfg.V)}
    out2 = fwd(model, b2)
    np.testing.assert_allclose(out2[0, 5:11], out[0, 5:11], atol=1e-6)
    assert not np.allclose(out2[0, :5], out[0, :5])
    # patient B packed after A gives the logits of B alone in its own row (positions restart at 0)
    alone = nnx.jit(lambda m, t, p: m(t, p))(model, b["tokens"][:, 5:11], b["positions"][:, 5:11])
    np.testing.assert_allclose(out[0, 5:11], alone[0], atol=1e-5)
    # padding tokens never influence real tokens
    b3 = {**b, "tokens": b["tokens"].at[0, 11:].set(3)}
    np.testing.assert_allclose(fwd(model, b3)[0, :11], out[0, :11], atol=1e-6)


def test_jit_matches_eager(model, cfg):
    b = packed_batch([7, 5], 16, cfg.V, rows=2)
    np.testing.assert_allclose(fwd(model, b), logits_of(model, b), atol=1e-5)
    l1, a1 = next_token_loss(model, b)
    (l2, a2), g2 = loss_and_grad(model, b)
    chex.assert_trees_all_close((l1, a1), (l2, a2), rtol=1e-5)
    chex.assert_tree_all_finite((l1, a1, g2))


def test_remat_same_outputs_and_grads(cfg):
    b = packed_batch([9, 6], 16, cfg.V, rows=2)
    m0, m1 = Decoder(cfg, rngs=nnx.Rngs(3)), Decoder(ModelConfig.tiny(remat=True), rngs=nnx.Rngs(3))
    chex.assert_trees_all_equal(nnx.state(m0), nnx.state(m1))
    np.testing.assert_allclose(fwd(m0, b), fwd(m1, b), atol=1e-6)
    chex.assert_trees_all_close(loss_and_grad(m0, b), loss_and_grad(m1, b), atol=1e-6)


# ---------------------------------------------------------------- loss, dropout, dtypes

def test_loss_masks_padding_and_matches_manual(model, cfg):
    b = packed_batch([6, 5], 14, cfg.V)
    loss, aux = loss_fn(model, b)
    logp = jax.nn.log_softmax(fwd(model, b))
    m = np.asarray(b["loss_mask"])
    manual = -np.take_along_axis(np.asarray(logp), np.asarray(b["targets"])[..., None], -1)[..., 0][m].mean()
    np.testing.assert_allclose(loss, manual, rtol=1e-5)
    assert int(aux["n_tokens"]) == 5 + 4 and 0 <= float(aux["accuracy"]) <= 1
    b2 = {**b, "tokens": b["tokens"].at[0, 11:].set(9), "targets": b["targets"].at[0, 11:].set(9)}
    np.testing.assert_allclose(loss_fn(model, b2)[0], loss, rtol=1e-6)
    empty = {**b, "loss_mask": jnp.zeros_like(b["loss_mask"])}
    assert float(loss_fn(model, empty)[0]) == 0.0
    with pytest.raises(ValueError, match="batch lacks"): next_token_loss(model, {"tokens": b["tokens"]})


def test_dropout_only_with_key(cfg):
    b = packed_batch([10], 12, cfg.V)
    m = Decoder(ModelConfig.tiny(dropout=0.3), rngs=nnx.Rngs(0))
    base = fwd(m, b)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    d1 = fwd(m, b, k1)
    np.testing.assert_array_equal(d1, fwd(m, b, k1))
    assert not np.allclose(d1, base) and not np.allclose(d1, fwd(m, b, k2))
    np.testing.assert_array_equal(fwd(m, b), base)
    l_drop, _ = nnx.jit(next_token_loss)(m, b, k1)
    assert float(l_drop) != float(loss_fn(m, b)[0])
    m0 = Decoder(cfg, rngs=nnx.Rngs(0))  # dropout 0: a key changes nothing
    np.testing.assert_array_equal(fwd(m0, b, k1), fwd(m0, b))


def unpadded_loss_and_grads(dropout: float, key=None):
    "Loss and gradients of a tiny model on a packed 2-row batch computed on its real tokens only (unpad_batch)."
    b = unpad_batch({k: np.asarray(v) for k, v in packed_batch([9, 6], 20, 64, rows=2).items()}, 8)
    m = Decoder(ModelConfig.tiny(dropout=dropout), rngs=nnx.Rngs(0))
    (loss, _), g = nnx.jit(nnx.value_and_grad(next_token_loss, has_aux=True))(m, jax.tree.map(jnp.asarray, b), key)
    return float(loss), np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(g, nnx.Param))])


def print_unpadded_loss_and_grads():
    "For the subprocess of test_kernels_fall_back_to_xla: whether the kernels run, then the loss and a gradient digest."
    loss, g = unpadded_loss_and_grads(0.0)
    print(json.dumps({"kernels": cpu_kernels(), "loss": loss, "g": g[:50].tolist(), "g_norm": float(np.linalg.norm(g))}))


def test_kernels_fall_back_to_xla(tmp_path):
    "A compiler that fails leaves no library behind, warns, and the model runs in XLA with the kernels' results."
    if Path("/proc/cpuinfo").exists():  # built wherever there is a compiler and the CPU has AVX2 and FMA
        flags = set(Path("/proc/cpuinfo").read_text().split())
        assert cpu_kernels() == (os.environ.get("SYNEHR_CPU_KERNELS", "1") != "0" and shutil.which(os.environ.get("CXX") or "g++") is not None
                                 and {"avx2", "fma"} <= flags)
    env = {**os.environ, "SYNEHR_CPU_KERNELS": "1", "CXX": "false", "SYNEHR_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_model as t; t.print_unpadded_loss_and_grads()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "could not build the CPU kernels" in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kernels"] is False and list(tmp_path.iterdir()) == []  # the failed build's temporary file is gone
    loss, g = unpadded_loss_and_grads(0.0)
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(out["g"], g[:50], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["g_norm"], np.linalg.norm(g), rtol=1e-5)


def test_kernel_attention_dropout_in_the_model():
    "On the real tokens only, attention dropout runs in the kernel: one key, one result; another key or none, others."
    k1 = jax.random.key(1)
    l1, g1 = unpadded_loss_and_grads(0.3, k1)
    l1b, g1b = unpadded_loss_and_grads(0.3, k1)
    assert l1 == l1b and np.array_equal(g1, g1b)
    l2, _ = unpadded_loss_and_grads(0.3, jax.random.key(2))
    l0, _ = unpadded_loss_and_grads(0.3, None)
    assert len({l1, l2, l0}) == 3 and np.isfinite(g1).all()


def test_bfloat16_compute(cfg):
    b = packed_batch([10, 5], 16, cfg.V, rows=2)
    m32 = Decoder(cfg, rngs=nnx.Rngs(0))
    m16 = Decoder(ModelConfig.tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    out16 = fwd(m16, b)
    assert out16.dtype == jnp.float32 and m16.embed.embedding.dtype == jnp.float32
    chex.assert_tree_all_finite(out16)
    np.testing.assert_allclose(out16, fwd(m32, b), atol=0.05)
    (loss, _), g = loss_and_grad(m16, b)
    chex.assert_tree_all_finite((loss, g))
    assert abs(float(loss) - float(loss_fn(m32, b)[0])) < 0.02


# ---------------------------------------------------------------- knowledge fusion

def test_fusion_shapes_and_frozen_vectors(cfg):
    c = ModelConfig.tiny(use_hierarchy=True, use_semantic=True)
    hier, sem = np.random.default_rng(0).normal(size=(c.V, c.Eh)), np.random.default_rng(1).normal(size=(c.V, c.Es))
    m = Decoder(c, rngs=nnx.Rngs(0), hierarchy=hier, semantic=sem)
    plain = Decoder(cfg, rngs=nnx.Rngs(0))
    b = packed_batch([10, 5], 16, c.V, rows=2)
    assert fwd(m, b).shape == fwd(plain, b).shape == (2, 16, c.V)
    assert count_params(m) - count_params(plain) == (c.Eh + c.Es) * c.D + 2 * (c.D + 1)
    assert m.param_counts()["frozen knowledge"] == c.V * (c.Eh + c.Es)
    assert not np.allclose(m.embed_tokens(b["tokens"]), m.embed(b["tokens"]))
    # no gradient reaches the vectors, even when asked for every variable
    g_all = nnx.jit(nnx.grad(lambda m: next_token_loss(m, b)[0], argnums=nnx.DiffState(0, ...)))(m)
    assert float(jnp.abs(g_all["hierarchy"]["vectors"][...]).sum()) == 0.0
    assert float(jnp.abs(g_all["hierarchy"]["proj"]["kernel"][...]).sum()) > 0.0
    # an optimizer over nnx.Param (what the training stage builds) updates the projections and not the vectors
    grads = nnx.filter_state(g_all, nnx.Param)
    assert "vectors" not in grads["semantic"]
    before = jax.tree.map(np.asarray, nnx.state(m))
    opt = nnx.Optimizer(m, optax.adamw(1e-2), wrt=nnx.Param)
    nnx.jit(lambda opt, m, g: opt.update(m, g))(opt, m, grads)
    after = nnx.state(m)
    np.testing.assert_array_equal(after["hierarchy"]["vectors"][...], hier.astype(np.float32))
    np.testing.assert_array_equal(after["semantic"]["vectors"][...], before["semantic"]["vectors"][...])
    assert not np.allclose(after["hierarchy"]["proj"]["kernel"][...], before["hierarchy"]["proj"]["kernel"][...])
    assert set(nnx.state(m, Knowledge)) == {"hierarchy", "semantic"}


def test_fusion_errors():
    c = ModelConfig.tiny(use_hierarchy=True)
    with pytest.raises(ValueError, match="no hierarchy vectors"): Decoder(c, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected width Eh=8"): Decoder(c, rngs=nnx.Rngs(0), hierarchy=np.zeros((c.V, 5)))
    with pytest.raises(ValueError, match=r"expected shape \[V=64"): Decoder(c, rngs=nnx.Rngs(0), hierarchy=np.zeros((10, 8)))
    with pytest.raises(ValueError, match="use_semantic is False"): Decoder(c, rngs=nnx.Rngs(0), hierarchy=np.zeros((c.V, 8)), semantic=np.zeros((c.V, 12)))
    m = Decoder(ModelConfig.tiny(T=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceed the context length T=8"): m(jnp.zeros((1, 9), jnp.int32))


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("kw", [{}, {"K": 4}, {"K": 1}, {"tie_embeddings": False, "use_hierarchy": True, "remat": True}])
def test_cache_matches_full_forward(kw):
    c = ModelConfig.tiny(**kw)
    m = Decoder(c, rngs=nnx.Rngs(2), hierarchy=np.random.default_rng(0).normal(size=(c.V, c.Eh)) if c.use_hierarchy else None)
    B, T, P = 3, 20, 7
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, c.V)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    full = nnx.jit(lambda m, t: m(t))(m, tokens)
    cache = init_cache(c, B, max_len=24)
    out, cache = jit_prefill(m, cache, tokens[:, :P], pos[:, :P])
    outs = [out]
    for t in range(P, T):
        lg, cache = jit_decode(m, cache, tokens[:, t:t + 1], pos[:, t:t + 1])
        outs.append(lg[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4)
    assert int(cache.index) == T and cache.k.shape == (c.L, B, c.K, c.Dh, 24) and cache.v.shape == (c.L, B, c.K, 24, c.Dh)
    # a step that donates the cache (as the sampler will) gives the same logits
    donating = nnx.jit(decode_step, donate_argnums=1)
    lg, _ = donating(m, init_cache(c, B, 24), tokens[:, :1], pos[:, :1])
    np.testing.assert_allclose(lg, full[:, 0], atol=1e-4)
    chex.assert_tree_all_finite(cache)


def test_cache_left_padded_prompts_and_chunks(model, cfg):
    "Rows with prompts of different lengths, left-padded with segment 0, continue exactly like the unpadded rows."
    T = 12
    tokens = jax.random.randint(jax.random.key(6), (2, T), 1, cfg.V)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)  # both rows unpadded
    S = T + 3
    cache = init_cache(cfg, 2, S)
    P = 5  # prompt length of both rows
    ptok = jnp.stack([jnp.concatenate([tokens[0, :P], jnp.zeros(3, jnp.int32)]), jnp.concatenate([jnp.zeros(3, jnp.int32), tokens[1, :P]])])
    pseg = jnp.array([[1] * P + [0] * 3, [0] * 3 + [1] * P])
    ppos = jnp.array([list(range(P)) + [0] * 3, [0] * 3 + list(range(P))])
    out, cache = jit_prefill(model, cache, ptok, ppos, pseg)
    np.testing.assert_allclose(out[1, 3:], full[1, :P], atol=1e-4)
    np.testing.assert_allclose(out[0, :P], full[0, :P], atol=1e-4)
    # row 0's trailing padding must not leak into its next tokens: row 0 continues after padding slots too
    for t in range(P, T):
        lg, cache = jit_decode(model, cache, tokens[:, t:t + 1], jnp.full((2, 1), t))
        np.testing.assert_allclose(lg, full[:, t], atol=1e-4)
    # chunked prefill (3 tokens at a time) equals the full pass
    cache = init_cache(cfg, 2, T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    chunks = []
    for s in range(0, T, 3):
        lg, cache = jit_extend(model, cache, tokens[:, s:s + 3], pos[:, s:s + 3])
        chunks.append(lg)
    np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-4)
    with pytest.raises(ValueError, match="KV cache overflow"): extend(model, cache, tokens[:, :1], pos[:, :1])


def test_cache_under_jit_loop(model, cfg):
    "decode_step inside one jitted lax.fori_loop (traced cache index) gives the full-forward logits."
    T, P = 10, 4
    tokens = jax.random.randint(jax.random.key(7), (2, T), 0, cfg.V)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)

    @nnx.jit
    def run(model, tokens):
        cache = init_cache(cfg, 2, T)
        _, cache = prefill(model, cache, tokens[:, :P], jnp.broadcast_to(jnp.arange(P), (2, P)))
        def body(t, carry):
            cache, out = carry
            tok = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
            lg, cache = decode_step(model, cache, tok, jnp.full((2, 1), t))
            return cache, out.at[:, t].set(lg)
        return jax.lax.fori_loop(P, T, body, (cache, jnp.zeros((2, T, cfg.V))))[1]
    np.testing.assert_allclose(run(model, tokens)[:, P:], full[:, P:], atol=1e-4)


def test_cache_bfloat16(cfg):
    c = ModelConfig.tiny(dtype="bfloat16")
    m = Decoder(c, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(8), (2, 10), 0, c.V)
    full = nnx.jit(lambda m, t: m(t))(m, tokens)
    cache = init_cache(c, 2, 10)
    assert cache.k.dtype == jnp.bfloat16
    out, cache = jit_prefill(m, cache, tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)))
    outs = [out]
    for t in range(4, 10):
        lg, cache = jit_decode(m, cache, tokens[:, t:t + 1], jnp.full((2, 1), t))
        outs.append(lg[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=0.05)


# ---------------------------------------------------------------- devices

def sharded_outputs(out_path=None):
    "Logits, loss and gradient norm of the tiny model on an 8-row batch sharded over all devices."
    cfg = ModelConfig.tiny()
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rows = [packed_batch(l, 16, cfg.V, seed=i) for i, l in enumerate([[16], [9, 7], [5, 5, 4], [12]] * 2)]
    batch = {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}
    mesh = data_mesh()
    sb = shard_batch(batch, mesh)
    nnx.update(model, replicate(nnx.state(model), mesh))
    logits = fwd(model, sb)
    (loss, _), g = loss_and_grad(model, sb)
    assert len(logits.addressable_shards) == len(jax.devices())
    if len(jax.devices()) > 1: assert logits.sharding.spec[0] == "data" and logits.addressable_shards[0].data.shape[0] == 8 // len(jax.devices())
    out = {"n_devices": len(jax.devices()), "logits": np.asarray(logits), "loss": float(loss), "grad_norm": float(optax.tree.norm(g))}
    if len(jax.devices()) > 1:
        with pytest.raises(ValueError, match="not a multiple of"): shard_batch({"x": jnp.ones((6, 2))}, mesh)
    if out_path: np.savez(out_path, **out)
    return out


def test_same_logits_on_1_and_4_devices(tmp_path):
    one = sharded_outputs()
    assert one["n_devices"] == 1
    run_on_devices(4, "test_model", f"sharded_outputs({str(tmp_path / 'four.npz')!r})")
    four = np.load(tmp_path / "four.npz")
    assert int(four["n_devices"]) == 4
    np.testing.assert_allclose(four["logits"], one["logits"], atol=1e-5)
    np.testing.assert_allclose(float(four["loss"]), one["loss"], rtol=1e-5)
    np.testing.assert_allclose(float(four["grad_norm"]), one["grad_norm"], rtol=1e-4)


def test_per_row_cache_index(model, cfg):
    "Per-row next slots: equal rows behave as the shared index; a row restarted at slot 0 with a new segment forgets its past."
    T = 10
    tokens = jax.random.randint(jax.random.key(11), (2, T), 1, cfg.V)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    shared, rows = init_cache(cfg, 2, 16), init_cache(cfg, 2, 16, per_row=True)
    assert rows.index.shape == (2,)
    for t in range(T):
        a, shared = jit_decode(model, shared, tokens[:, t:t + 1], jnp.full((2, 1), t))
        b, rows = jit_decode(model, rows, tokens[:, t:t + 1], jnp.full((2, 1), t))
        np.testing.assert_allclose(b, a, atol=1e-5)
        np.testing.assert_allclose(b, full[:, t], atol=1e-4)
    # row 1 starts a new record at slot 0 (segment 2) while row 0 goes on at slot T: row 1 sees only its new tokens
    rows = rows.replace(index=jnp.array([T, 0], jnp.int32))
    fresh = full[1, 0]  # the logits of a record whose first token is tokens[1, 0]
    seg = jnp.array([[1], [2]], jnp.int32)
    pos = jnp.array([[T], [0]])
    nxt = jnp.stack([tokens[0, 0], tokens[1, 0]])[:, None]
    lg, rows = jax.jit(decode_step)(model, rows, nxt, pos, seg)
    np.testing.assert_allclose(lg[1], fresh, atol=1e-4)
    assert rows.index.tolist() == [T + 1, 1]


def test_scanned_and_unrolled_layers_agree():
    "scan_layers only changes how the same stacked parameters are run: logits, cache and gradients agree."
    import dataclasses
    cfg_u = ModelConfig.tiny(V=50, L=3)
    cfg_s = dataclasses.replace(cfg_u, scan_layers=True)
    mu, ms = Decoder(cfg_u, rngs=nnx.Rngs(3)), Decoder(cfg_s, rngs=nnx.Rngs(3))
    x = jax.random.randint(jax.random.key(4), (2, 12), 1, 50)
    np.testing.assert_allclose(mu(x), ms(x), atol=1e-5)
    gu = nnx.grad(lambda m: m(x).sum())(mu)
    gs = nnx.grad(lambda m: m(x).sum())(ms)
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gs)): np.testing.assert_allclose(a, b, atol=1e-4)
    cu, cs = init_cache(cfg_u, 2, 16), init_cache(cfg_s, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    (lu, cu), (ls, cs) = extend(mu, cu, x, pos), extend(ms, cs, x, pos)
    np.testing.assert_allclose(lu, ls, atol=1e-5)
    np.testing.assert_allclose(cu.k, cs.k, atol=1e-5)
