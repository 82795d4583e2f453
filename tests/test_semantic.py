"""synehr.semantic: our Flax BERT on a tiny random checkpoint (round trip, a NumPy reference, padding) and on the real
all-MiniLM-L6-v2 checkpoint (similarity order, numbers from the PyTorch reference), token texts, the cached embeddings."""
import datetime as dt
import json

import chex
import numpy as np
import polars as pl
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from scipy.special import erf

from synehr.semantic import (BertConfig, CheckpointError, bert_params, checkpoint_digest, default_checkpoint, encode_texts,
                             load_bert, read_weights, semantic_embeddings, token_texts, write_tiny_checkpoint)

# First 5 dims of all-MiniLM-L6-v2's (mean-pooled, L2-normalised) vector of this sentence, computed by the PyTorch
# reference (torch 2.13.0+cpu, transformers 5.23.0 BertModel) in `python bench/bert.py` (bench/results/bert.json,
# "known_answer"); not typed in by hand.
KNOWN_TEXT = "Type 2 diabetes mellitus without complications"
KNOWN_FIRST5 = [0.027942, 0.015394, 0.003538, 0.11272, -0.0688]


def naive_bert(w, ids, cfg):
    "Mean-pooled BERT of one unpadded sentence in float64 NumPy, on BertModel-named tensors."
    g = lambda n: w[n].astype(np.float64)
    ln = lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.eps) * g(p + ".weight") + g(p + ".bias")
    lin = lambda x, p: x @ g(p + ".weight").T + g(p + ".bias")
    T = len(ids)
    h = ln(g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[:T]
           + g("embeddings.token_type_embeddings.weight")[0], "embeddings.LayerNorm")
    for i in range(cfg.L):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(h, p + f"attention.self.{n}").reshape(T, cfg.H, cfg.Dh).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(cfg.Dh)
        a = np.exp(s - s.max(-1, keepdims=True)); a /= a.sum(-1, keepdims=True)
        h = ln(h + lin((a @ v).transpose(1, 0, 2).reshape(T, cfg.D), p + "attention.output.dense"), p + "attention.output.LayerNorm")
        u = lin(h, p + "intermediate.dense")
        h = ln(h + lin(0.5 * u * (1 + erf(u / np.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
    x = h.mean(0)
    return x / np.linalg.norm(x) if cfg.normalize else x


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_bert(tiny_dir)


@pytest.fixture(scope="module")
def minilm():
    return load_bert()


SENTS = ["type 2 diabetes mellitus without complications", "delivery", "chronic kidney disease", "death of the patient"]


def test_tiny_round_trip_matches_numpy_reference(tiny_dir, tiny):
    model, tok, cfg = tiny
    assert cfg == BertConfig.tiny()
    w = load_file(str(tiny_dir / "model.safetensors"))
    x = encode_texts(SENTS, model, tok)
    assert x.shape == (len(SENTS), cfg.D) and x.dtype == np.float32
    chex.assert_tree_all_finite(x)
    for s, xi in zip(SENTS, x):
        np.testing.assert_allclose(xi, naive_bert(w, tok.encode(s).ids, cfg), atol=2e-5)
    # the loaded parameters are the file's tensors (kernels transposed, layers stacked)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(p["layers"]["q"]["kernel"][1], w["encoder.layer.1.attention.self.query.weight"].T)
    np.testing.assert_array_equal(p["embeddings"]["norm"]["bias"], w["embeddings.LayerNorm.bias"])


def test_padding_invariance_and_determinism(tiny, minilm):
    for model, tok, _ in (tiny, minilm):
        alone = encode_texts(["delivery"], model, tok)[0]
        long = "type 2 diabetes mellitus with diabetic chronic kidney disease " * 4  # another, longer bucket
        batch = encode_texts([long, "delivery", "death"] * 5, model, tok, batch_size=8)
        for r in (1, 4, 13): np.testing.assert_allclose(batch[r], alone, atol=2e-6)
        assert encode_texts(SENTS, model, tok).tobytes() == encode_texts(SENTS, model, tok).tobytes()


def test_pad_ids_are_never_seen_and_jit_agrees(tiny):
    model, _, cfg = tiny
    ids = np.array([[2, 10, 11, 12, 3, 0, 0, 0], [2, 20, 3, 0, 0, 0, 0, 0]], np.int32)
    mask = (np.arange(8) < np.array([[5], [3]])).astype(np.int32)
    noisy = np.where(mask > 0, ids, np.random.default_rng(0).integers(0, cfg.V, ids.shape)).astype(np.int32)
    ref = model.pool(ids, mask)
    np.testing.assert_allclose(model.pool(noisy, mask), ref, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, i, k: m.pool(i, k))(model, ids, mask), ref, atol=1e-5)
    assert model(ids, mask).shape == (2, 8, cfg.D)


def test_checkpoint_name_variants_load(tiny_dir, tiny, tmp_path):
    "ClinicalBERT-style names: a `bert.` prefix, TF-era LayerNorm gamma/beta, an MLM head; same model."
    w = load_file(str(tiny_dir / "model.safetensors"))
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in w.items()}
    renamed["cls.predictions.bias"] = np.zeros(BertConfig.tiny().V, np.float32)
    d = tmp_path / "variant"
    d.mkdir()
    for f in ("config.json", "vocab.txt", "tokenizer_config.json"): (d / f).write_text((tiny_dir / f).read_text())
    save_file(renamed, str(d / "model.safetensors"))
    model, tok, _ = load_bert(d)
    np.testing.assert_array_equal(encode_texts(SENTS, model, tok), encode_texts(SENTS, *tiny[:2]))


def test_bad_checkpoints_fail_clearly(tiny_dir, tmp_path):
    cfg = BertConfig.tiny()
    w = read_weights(tiny_dir)
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): encoder.layer.0.output.LayerNorm.weight"):
        bert_params({k: v for k, v in w.items() if k != "encoder.layer.0.output.LayerNorm.weight"}, cfg)
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): encoder.layer.9.output.dense.bias"):
        bert_params({**w, "encoder.layer.9.output.dense.bias": w["encoder.layer.0.output.dense.bias"]}, cfg)
    with pytest.raises(CheckpointError, match=r"wrong shape: embeddings.word_embeddings.weight \(128, 32\) \(expected \(256, 32\)\)"):
        bert_params(w, BertConfig.tiny(V=256))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only pytorch_model.bin"):
        load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_hf(), "model_type": "roberta"}))
    with pytest.raises(CheckpointError, match="model_type 'roberta' is not 'bert'"):
        BertConfig.from_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_bert(tmp_path / "nowhere")


def test_default_checkpoint_files():
    d = default_checkpoint()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"): assert (d / f).is_file(), f
    cfg = BertConfig.from_checkpoint(d)
    assert (cfg.D, cfg.L, cfg.pooling, cfg.normalize) == (384, 6, "mean", True)


def test_minilm_known_answer_and_similarity(minilm):
    model, tok, _ = minilm
    x = encode_texts([KNOWN_TEXT, "Type 2 diabetes mellitus with diabetic chronic kidney disease", "Delivery"], model, tok)
    np.testing.assert_allclose(x[0, :5], KNOWN_FIRST5, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[1, 0] > sim[1, 2], sim


def toy_vocab():
    from synehr.cohort import fit_lab_stats
    from synehr.core import RunConfig
    from synehr.tokenizer import fit_vocab
    d = lambda day, h=0: dt.datetime(2150, 1, day, h)
    rows = [(1, None, "SEX/F", None), (1, None, "RACE/WHITE", None), (1, dt.datetime(2080, 5, 1), "MEDS_BIRTH", None),
            (1, d(1), "ADMISSION/URGENT", None), (1, d(1, 2), "ICD10CM/E119", None), (1, d(1, 3), "LAB/50912", 1.1),
            (1, d(3), "DISCHARGE/HOME", None), (2, None, "SEX/M", None), (2, None, "RACE/BLACK", None),
            (2, dt.datetime(2070, 5, 1), "MEDS_BIRTH", None), (2, d(5), "ADMISSION/URGENT", None), (2, d(5, 1), "LAB/50912", 2.0),
            (2, d(9), "DISCHARGE/DIED", None), (2, d(9), "MEDS_DEATH", None)]
    ev = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32},
                      orient="row")
    from synehr.codes import describe_codes
    return fit_vocab(ev, fit_lab_stats(ev), RunConfig()).table.select("token", "kind", "code").rows(), describe_codes(ev["code"])


def test_token_texts_cover_the_tokenizer_vocab():
    rows, descs = toy_vocab()
    tt = token_texts(rows, descs)
    assert tt["token"].to_list() == [r[0] for r in rows]
    assert tt.filter(pl.col("source") == "fallback").height == 0, tt.filter(pl.col("source") == "fallback")
    assert tt.filter(pl.col("text").is_null())["token"].to_list() == ["PAD"]
    t = dict(zip(tt["token"], tt["text"]))
    assert t["ICD10CM_E119"] == "Type 2 diabetes mellitus without complications"
    assert t["_15m-1h"] == "A time gap of 15 minutes to 1 hour between events"
    assert t["_Q1"] == "A laboratory test result in the lowest tenth of its values"
    assert len(set(tt["text"].drop_nulls())) == tt["text"].drop_nulls().len()  # every token distinguishable
    with pytest.raises(ValueError, match="vocab row 1"):
        token_texts([("PAD", "pad", None), ("X", 3, None)])


def test_semantic_embeddings_cache(tiny_dir, tmp_path):
    rows, descs = toy_vocab()
    cache = tmp_path / "knowledge" / "semantic.npy"
    x = semantic_embeddings(rows, descs, checkpoint=tiny_dir, cache=cache)
    assert x.shape == (len(rows), BertConfig.tiny().D) and x.dtype == np.float32
    assert np.flatnonzero(~x.any(axis=1)).tolist() == [0]  # PAD
    first = cache.read_bytes()
    np.save(cache, np.full_like(x, 5.0))  # a planted marker: a cache hit returns it
    assert semantic_embeddings(rows, descs, checkpoint=tiny_dir, cache=cache)[3, 3] == 5.0
    # another special text: recomputed, the same bytes as before except that token's row
    y = semantic_embeddings(rows, descs, {"END_VISIT": "Discharge from hospital"}, checkpoint=tiny_dir, cache=cache)
    j = [r[0] for r in rows].index("END_VISIT")
    np.testing.assert_array_equal(np.delete(y, j, 0), np.delete(x, j, 0))
    assert not np.allclose(y[j], x[j])
    # back to the original inputs: byte-identical to the first write
    semantic_embeddings(rows, descs, checkpoint=tiny_dir, cache=cache)
    assert cache.read_bytes() == first
    # another checkpoint (other weights): another digest, recomputed
    other = write_tiny_checkpoint(tmp_path / "other", seed=4)
    assert checkpoint_digest(other) != checkpoint_digest(tiny_dir)
    z = semantic_embeddings(rows, descs, checkpoint=other, cache=cache)
    assert not np.allclose(z[1:], x[1:])
    assert json.loads(cache.with_suffix(".json").read_text())["rows"] == len(rows)
