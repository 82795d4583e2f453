"""synehr.train: loss decreases, exact resume after a SIGKILL, early stopping, padding, 1 vs 4 devices, bad input."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _devices import run_on_devices
from synehr.cohort import build_cohort
from synehr.core import ConfigError, RunConfig, make_key
from synehr.demo import write_demo_cohort
from synehr.model import Decoder, ModelConfig, next_token_loss, unpad_batch
from synehr.tokenizer import Vocab, fit_vocab, make_batches, read_tokens, write_tokens
from synehr.train import TrainConfig, load_model, read_metrics, train_stage

ROOT = Path(__file__).resolve().parent.parent
CTX = 64


def make_run(root: Path) -> tuple[Path, RunConfig]:
    "A 100-subject demo run directory up to the tokens (context 64)."
    cfg = RunConfig(run_dir=str(root), demo_subjects=100, context_len=CTX)
    build_cohort(write_demo_cohort(root / "input", cfg.demo_subjects, seed=0), root / "cohort", cfg)
    vocab = fit_vocab(root / "cohort", cfg=cfg)
    vocab.save(root / "tokenizer" / "vocab.parquet")
    write_tokens(root / "cohort", root / "tokens", vocab, cfg)
    return root, cfg


def copy_run(src: Path, dst: Path) -> Path:
    "A fresh copy of a run directory without its model."
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model", "figures"))
    return dst


def tiny_model(run: Path, **kw) -> ModelConfig:
    return ModelConfig.tiny(V=len(Vocab.load(run / "tokenizer" / "vocab.parquet")), T=CTX, **kw)


def params_of(run: Path) -> dict:
    with np.load(run / "model" / "params.npz") as z: return dict(z)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("train") / "run")


@pytest.fixture(scope="module")
def full(demo, tmp_path_factory):
    "An uninterrupted tiny run of 40 steps (evaluations and checkpoints every 10)."
    run = copy_run(demo[0], tmp_path_factory.mktemp("full") / "run")
    res = train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny())
    return run, res


def test_loss_decreases_and_outputs(full):
    run, res = full
    V = len(Vocab.load(run / "tokenizer" / "vocab.parquet"))
    lines = read_metrics(run / "model" / "metrics.jsonl")
    tr = [m["loss"] for m in lines if m["split"] == "train"]
    ev = [m["loss"] for m in lines if m["split"] == "tuning"]
    assert len(tr) == 40 and len(ev) == 4
    assert tr[0] == pytest.approx(math.log(V), abs=0.3)            # untrained: about uniform over the vocabulary
    assert np.mean(tr[-5:]) < np.mean(tr[:5]) - 1.5
    assert ev[-1] < ev[0] and res.best_loss == min(ev) and res.best_loss < math.log(V) - 1.5
    assert all(np.isfinite(m["grad_norm"]) and m["n_tokens"] > 0 for m in lines if m["split"] == "train")
    cats = lines[-1]["per_category"]
    assert {"ICD10CM", "LAB", "VALUE", "end_record"} <= set(cats)
    assert sum(c["n_tokens"] for c in cats.values()) == lines[-1]["n_tokens"]
    assert sum(c["loss"] * c["n_tokens"] for c in cats.values()) / lines[-1]["n_tokens"] == pytest.approx(lines[-1]["loss"], rel=1e-6)
    for f in ("params.npz", "model_config.json", "train_config.json", "summary.json", "metrics.jsonl", "ckpt"):
        assert (run / "model" / f).exists(), f
    assert (run / "figures" / "train_loss.png").stat().st_size > 5000
    # the saved parameters are the best evaluation's: re-evaluating them gives the best loss
    model = load_model(run / "model")
    b = make_batches(read_tokens(run / "tokens", "tuning"), CTX, seed=0, batch_size=8)
    g, state = nnx.split(model)
    f = jax.jit(lambda st, bb: next_token_loss(nnx.merge(g, st), bb)[1])
    tot = n = 0.0
    for i in range(len(b["tokens"])):
        aux = f(state, {k: jnp.asarray(v[i]) for k, v in b.items()})
        tot += float(aux["loss"]) * float(aux["n_tokens"]); n += float(aux["n_tokens"])
    assert tot / n == pytest.approx(res.best_loss, rel=1e-5)


def test_resume_after_sigkill(demo, full, tmp_path):
    "A run killed from outside (SIGKILL) in the middle of training resumes to the uninterrupted run's parameters."
    run = copy_run(demo[0], tmp_path / "run")
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_train as t; t.killable_run({str(run)!r})")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "model" / "metrics.jsonl"
    try:
        while p.poll() is None and not (metrics.exists() and any(m["step"] >= 23 for m in read_metrics(metrics))):
            time.sleep(0.02)
        assert p.poll() is None, p.stderr.read()[-3000:]
        p.kill()
    finally:
        p.wait()
    assert not (run / "model" / "params.npz").exists()
    written = max(m["step"] for m in read_metrics(metrics))
    res = train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny())
    assert res.resumed_from == 20 < written and res.steps == 40      # steps 21.. were logged but not checkpointed
    a, b = params_of(full[0]), params_of(run)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)   # bit for bit
    assert read_metrics(metrics) == read_metrics(full[0] / "model" / "metrics.jsonl")  # no step twice, same values
    # a finished run resumes to itself; another config is refused
    again = train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny())
    assert again.resumed_from == 40 and again.best_loss == res.best_loss
    with pytest.raises(ConfigError, match="another model/training config"):
        train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny(lr=1e-3))


def killable_run(run):
    "The tiny run, each step after the 20th slowed by 0.05 s so that the test can kill it mid-run."
    import time
    import synehr.train as T
    make = T.make_train_step
    def slow_make(*a, **k):
        f, n = make(*a, **k), [0]
        def g(*args):
            n[0] += 1
            if n[0] > 20: time.sleep(0.05)
            return f(*args)
        return g
    T.make_train_step = slow_make
    train_stage(run, RunConfig(run_dir=str(run), demo_subjects=100, context_len=CTX), tiny_model(Path(run)), TrainConfig.tiny())


def test_early_stopping(demo, tmp_path):
    run = copy_run(demo[0], tmp_path / "run")
    res = train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny(eval_every=4, patience=2, min_delta=10.0))
    assert (res.steps, res.best_step, res.stopped_early) == (12, 4, True)
    ev = [m for m in read_metrics(run / "model" / "metrics.jsonl") if m["split"] == "tuning"]
    assert [m["step"] for m in ev] == [4, 8, 12] and all(m["best_loss"] == ev[0]["loss"] for m in ev)
    # patience 0: never stops
    res0 = train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny(steps=8, eval_every=4, patience=0, min_delta=10.0), resume=False)
    assert (res0.steps, res0.stopped_early) == (8, False)


def test_padding_does_not_affect_loss_or_gradient(demo):
    run = demo[0]
    cfg = tiny_model(run)
    model = Decoder(cfg, rngs=nnx.Rngs(make_key(0, "model")))
    b = make_batches(read_tokens(run / "tokens", "train"), CTX, seed=0, batch_size=4)
    b = {k: np.concatenate([v[0], np.zeros((3, CTX), v.dtype)]) for k, v in b.items()}   # 4 rows, 3 empty rows
    rng = np.random.default_rng(1)
    p = {k: v.copy() for k, v in b.items()}
    p["tokens"][4:] = rng.integers(1, cfg.V, (3, CTX)); p["targets"][4:] = rng.integers(1, cfg.V, (3, CTX))
    # garbage in the padding positions of the real rows too
    pad = ~b["loss_mask"][:4].astype(bool)
    assert pad.any()
    p["tokens"][:4][pad] = rng.integers(1, cfg.V, pad.sum()); p["targets"][:4][pad] = rng.integers(1, cfg.V, pad.sum())
    g, params, rest = nnx.split(model, nnx.Param, ...)
    f = jax.jit(jax.value_and_grad(lambda pr, bb: next_token_loss(nnx.merge(g, pr, rest), bb)[0]))
    (l0, g0), (l1, g1) = f(params, jax.tree.map(jnp.asarray, b)), f(params, jax.tree.map(jnp.asarray, p))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)): np.testing.assert_allclose(y, x, atol=1e-7)
    # train's one-device path computes the real tokens only (unpad_batch): same loss and gradients, garbage or not
    for q in (16, 64):
        u = unpad_batch(p, q)
        assert len(u["unpad_index"]) < 7 * CTX
        l2, g2 = f(params, jax.tree.map(jnp.asarray, u))
        np.testing.assert_allclose(float(l2), float(l0), rtol=1e-6)
        for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)): np.testing.assert_allclose(y, x, atol=1e-7)


def device_losses(run, out_path=None, steps=6):
    "Train and tuning losses of a short tiny run over all devices (a fresh model dir under `run`)."
    run = Path(run)
    shutil.rmtree(run / "model", ignore_errors=True)
    res = train_stage(run, RunConfig(run_dir=str(run), demo_subjects=100, context_len=CTX), tiny_model(run),
                      TrainConfig.tiny(steps=steps, eval_every=3), resume=False)
    lines = read_metrics(run / "model" / "metrics.jsonl")
    out = {"n_devices": len(jax.devices()), "train": [m["loss"] for m in lines if m["split"] == "train"],
           "tuning": [m["loss"] for m in lines if m["split"] == "tuning"], "best": res.best_loss}
    if out_path: Path(out_path).write_text(json.dumps(out))
    return out


def test_same_losses_on_1_and_4_devices(demo, tmp_path):
    one = device_losses(copy_run(demo[0], tmp_path / "one"))
    assert one["n_devices"] == 1
    four_run = copy_run(demo[0], tmp_path / "four")
    run_on_devices(4, "test_train", f"device_losses({str(four_run)!r}, {str(tmp_path / 'four.json')!r})")
    four = json.loads((tmp_path / "four.json").read_text())
    assert four["n_devices"] == 4 and len(four["train"]) == 6
    np.testing.assert_allclose(four["train"], one["train"], rtol=2e-5)
    np.testing.assert_allclose(four["tuning"], one["tuning"], rtol=2e-5)


def test_bf16_trains(demo, tmp_path):
    run = copy_run(demo[0], tmp_path / "run")
    train_stage(run, demo[1], tiny_model(run), TrainConfig.tiny(steps=10, eval_every=5, bf16=True))
    lines = [m["loss"] for m in read_metrics(run / "model" / "metrics.jsonl") if m["split"] == "train"]
    assert all(np.isfinite(lines)) and lines[-1] < lines[0]
    assert json.loads((run / "model" / "model_config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(run / "model").embed.embedding[...].dtype == jnp.float32   # parameters stay float32


def test_bad_input(demo, tmp_path):
    src, cfg = demo
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        train_stage(tmp_path / "empty", cfg, train_cfg=TrainConfig.tiny())
    run = copy_run(src, tmp_path / "notokens")
    shutil.rmtree(run / "tokens")
    with pytest.raises(FileNotFoundError, match=r"tokens/train\.parquet"):
        train_stage(run, cfg, train_cfg=TrainConfig.tiny())
    # tokens encoded with a larger vocabulary than the one in RUN/tokenizer
    run = copy_run(src, tmp_path / "mismatch")
    v = Vocab.load(run / "tokenizer" / "vocab.parquet")
    Vocab(v.table.head(len(v) - 5), v.gap_threshold_min, v.value_bins).save(run / "tokenizer" / "vocab.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet: token id \d+ of subject \d+ is outside the vocabulary"):
        train_stage(run, cfg, train_cfg=TrainConfig.tiny())
    run = copy_run(src, tmp_path / "wrongV")
    with pytest.raises(ConfigError, match="ModelConfig.V=10"):
        train_stage(run, cfg, ModelConfig.tiny(V=10, T=CTX), TrainConfig.tiny())
    with pytest.raises(FileNotFoundError, match="hierarchy.npy"):
        train_stage(run, cfg, tiny_model(run, use_hierarchy=True), TrainConfig.tiny())
    (run / "knowledge").mkdir()
    np.save(run / "knowledge" / "hierarchy.npy", np.zeros((7, 4), np.float32))
    with pytest.raises(ValueError, match=r"hierarchy.npy: expected one row per vocabulary token"):
        train_stage(run, cfg, tiny_model(run, use_hierarchy=True), TrainConfig.tiny())
    with pytest.raises(ConfigError, match="context_len 64 exceeds"):
        train_stage(run, cfg, tiny_model(run).__class__.tiny(V=tiny_model(run).V, T=32), TrainConfig.tiny())
    for bad in (dict(batch_size=0), dict(lr=-1.0), dict(patience=-1), dict(bf16="no")):
        with pytest.raises(ConfigError): TrainConfig(**bad)


def test_knowledge_fusion_trains(demo, tmp_path):
    "Hierarchy and semantic vectors from RUN/knowledge are fused, their widths taken from the files, and saved with the model."
    run = copy_run(demo[0], tmp_path / "run")
    V = tiny_model(run).V
    (run / "knowledge").mkdir()
    rng = np.random.default_rng(0)
    np.save(run / "knowledge" / "hierarchy.npy", rng.normal(size=(V, 6)).astype(np.float32))
    np.save(run / "knowledge" / "semantic.npy", rng.normal(size=(V, 10)).astype(np.float32))
    res = train_stage(run, demo[1], tiny_model(run, use_hierarchy=True, use_semantic=True), TrainConfig.tiny(steps=10, eval_every=10))
    assert np.isfinite(res.best_loss)
    m = load_model(run / "model")
    assert (m.cfg.Eh, m.cfg.Es) == (6, 10)
    np.testing.assert_array_equal(np.asarray(m.semantic.vectors[...]), np.load(run / "knowledge" / "semantic.npy"))
