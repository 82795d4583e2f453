"""Sampling under the grammar: batch == one by one, grammar of every record, greedy == a cache-free reference, resume, MEDS out."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from flax import nnx

from _devices import run_on_devices
from synehr.cohort import build_cohort
from synehr.core import RunConfig, make_key
from synehr.demo import write_demo_cohort
from synehr.generate import (GrammarArrays, allowed_tokens, generate, prompt_states, read_generated, real_headers, row_keys,
                             sample_tokens, stamp_at_discharge, stream_tokens, to_meds)
from synehr.model import Decoder, ModelConfig
from synehr.tokenizer import END_RECORD, PAD, START_RECORD, Grammar, check_sequences, fit_vocab, read_tokens, write_tokens


def build(d):
    "A 120-subject demo cohort, its vocabulary and tokens under d, and a tiny seeded decoder: the same everywhere."
    cfg = RunConfig(run_dir=str(d))
    build_cohort(write_demo_cohort(d / "input", 120, seed=0), d / "cohort", cfg)
    vocab = fit_vocab(d / "cohort", cfg=cfg)
    write_tokens(d / "cohort", d / "tokens", vocab, cfg)
    model = Decoder(ModelConfig.tiny(V=len(vocab), T=160), rngs=nnx.Rngs(make_key(0, "model")))
    return d, vocab, model, read_tokens(d / "tokens", "train")


@pytest.fixture(scope="module")
def setup(tmp_path_factory): return build(tmp_path_factory.mktemp("gen"))


def generated_on_all_devices(d):
    "generate() over all devices of this process (sharded batches on several, continuous batching on one) -> the records."
    d = Path(d)
    _, vocab, model, real = build(d)
    generate(model, vocab, real_headers(real, vocab, 10, seed=2), d / "raw", seed=3, batch_size=4, part_size=8, max_len=96)
    out = read_generated(d / "raw").with_columns(n_devices=pl.lit(len(jax.devices())))
    out.write_parquet(d / "records.parquet")
    return out


def _prefix_ok(seq, vocab):
    "Every token allowed after the ones before it (a record cut by the length limit is a valid prefix)."
    g = Grammar.from_vocab(vocab)
    s, prev = g.start, -1
    for t in seq:
        s = int(g.step(np.array([s]), np.array([prev]), np.array([t]))[0])
        if s < 0: return False
        prev = t
    return True


def _mixed_prompts(real, vocab):
    "Headers with and without a marital token (different lengths, so left padding is exercised) and a bare START_RECORD."
    h = real_headers(real, vocab, 1, seed=3)[0]
    assert vocab.tokens[h[4]].startswith("MARITAL_STATUS_")
    return [h, np.delete(h, 4), np.array([START_RECORD])]  # the marital token is optional in the grammar


def test_batch_equals_rows_one_by_one(setup):
    d, vocab, model, real = setup
    prompts = _mixed_prompts(real, vocab) * 2
    keys = row_keys(7, np.arange(len(prompts)))
    batch = sample_tokens(model, vocab, prompts, keys, max_len=120)
    for i, p in enumerate(prompts):
        one = sample_tokens(model, vocab, [p], keys[i:i + 1], max_len=120)
        got = batch.tokens[i]
        np.testing.assert_array_equal(one.tokens[0], got)
    # rows with equal prompts but different keys differ: the key is per row
    k = len(prompts) // 2
    assert not np.array_equal(batch.tokens[0], batch.tokens[k])


def test_every_record_follows_the_grammar(setup):
    d, vocab, model, real = setup
    prompts = real_headers(real, vocab, 24, seed=1)
    s = sample_tokens(model, vocab, prompts, row_keys(1, np.arange(24)), max_len=160, top_p=0.98, top_k=50)
    recs = [r[r != PAD] for r in s.tokens]
    done = [r for r, f in zip(recs, s.finished) if f]
    assert len(done) >= 5, "an untrained tiny model should still finish some records"
    assert check_sequences(done, vocab).height == 0
    assert all(_prefix_ok(r, vocab) for r in recs)
    for r, f in zip(recs, s.finished):  # END_RECORD exactly once, last, only in finished rows
        assert (r == END_RECORD).sum() == int(f) and (not f or r[-1] == END_RECORD)
    assert not vocab.is_unk[np.concatenate(recs)].any()


def test_greedy_matches_a_cache_free_reference(setup):
    "temperature 0 == argmax of the full (uncached) forward pass under the same grammar mask, step by step."
    d, vocab, model, real = setup
    p = real_headers(real, vocab, 1, seed=0)[0]
    s = sample_tokens(model, vocab, [p], row_keys(0, [0]), max_len=40, temperature=0)
    ga = GrammarArrays.from_vocab(vocab)
    g = Grammar.from_vocab(vocab)
    seq, st = list(p), int(prompt_states(vocab, [p])[0])
    fwd = nnx.jit(lambda m, x: m(x))
    while len(seq) < 40 and seq[-1] != END_RECORD:
        row = np.zeros((1, 40), np.int32); row[0, :len(seq)] = seq  # causal: the padding after it changes nothing
        logits = fwd(model, jnp.asarray(row))[0, len(seq) - 1]
        ok = allowed_tokens(ga, jnp.array([st]), jnp.array([seq[-1]]))[0]
        nxt = int(jnp.argmax(jnp.where(ok, logits, -jnp.inf)))
        st = int(g.step(np.array([st]), np.array([seq[-1]]), np.array([nxt]))[0])
        seq.append(nxt)
    got = s.tokens[0]
    np.testing.assert_array_equal(got[got != PAD], np.array(seq))
    cold = sample_tokens(model, vocab, [p], row_keys(5, [0]), max_len=40, temperature=1e-6, top_p=1.0)
    np.testing.assert_array_equal(cold.tokens, s.tokens)


def test_top_p_small_is_greedy_and_bad_settings_fail(setup):
    d, vocab, model, real = setup
    p = [real_headers(real, vocab, 1, seed=0)[0]]
    g = sample_tokens(model, vocab, p, row_keys(0, [0]), max_len=40, temperature=0)
    np.testing.assert_array_equal(sample_tokens(model, vocab, p, row_keys(9, [0]), max_len=40, top_p=1e-6).tokens, g.tokens)
    with pytest.raises(ValueError, match="exceeds the model's context"): sample_tokens(model, vocab, p, row_keys(0, [0]), max_len=999)
    with pytest.raises(ValueError, match="top_p"): sample_tokens(model, vocab, p, row_keys(0, [0]), max_len=40, top_p=0)
    with pytest.raises(ValueError, match="prompt 0: token 'END_RECORD' at position 1"):
        sample_tokens(model, vocab, [[START_RECORD, END_RECORD]], row_keys(0, [0]), max_len=40)


def test_generate_resumes_and_is_deterministic(setup, tmp_path):
    d, vocab, model, real = setup
    prompts = real_headers(real, vocab, 10, seed=2)
    a = generate(model, vocab, prompts, tmp_path / "a", seed=4, batch_size=3, part_size=4, max_len=96)
    assert (a.n, a.parts) == (10, 3) and a.finished + a.hit_length_limit == 10
    generate(model, vocab, prompts, tmp_path / "b", seed=4, batch_size=3, part_size=4, max_len=96)
    for k in range(3):
        assert (tmp_path / "a" / f"part-{k:05d}.parquet").read_bytes() == (tmp_path / "b" / f"part-{k:05d}.parquet").read_bytes()
    full = read_generated(tmp_path / "a")
    (tmp_path / "a" / "part-00002.parquet").unlink()
    (tmp_path / "a" / "part-00000.parquet").unlink()
    generate(model, vocab, prompts, tmp_path / "a", seed=4, batch_size=3, part_size=4, max_len=96)
    assert read_generated(tmp_path / "a").equals(full)
    # rows and part size do not change the records: each record's key depends on its number only
    generate(model, vocab, prompts, tmp_path / "c", seed=4, batch_size=5, part_size=10, max_len=96)
    assert read_generated(tmp_path / "c").equals(full)
    with pytest.raises(ValueError, match="other settings"):
        generate(model, vocab, prompts, tmp_path / "a", seed=5, batch_size=3, part_size=4, max_len=96)


def test_to_meds_valid_and_diagnoses_at_discharge(setup, tmp_path):
    d, vocab, model, real = setup
    generate(model, vocab, real_headers(real, vocab, 16, seed=6), tmp_path / "raw", seed=6, batch_size=8, max_len=160)
    raw = read_generated(tmp_path / "raw")
    events, report = to_meds(raw, vocab, seed=0)
    assert set(events["subject_id"].unique()) == set(raw.filter("finished")["subject_id"])
    assert report.filter(pl.col("kind") == "length")["subject_id"].sort().to_list() == raw.filter(~pl.col("finished"))["subject_id"].sort().to_list()
    dx = events.filter(pl.col("code").str.starts_with("ICD10CM/"))
    dis = events.filter(pl.col("code").str.starts_with("DISCHARGE/"))
    assert dx.height and dx.join(dis, on=["subject_id", "time"], how="semi").height == dx.height
    kept, _ = to_meds(raw, vocab, seed=0, stamp=())
    assert kept.filter(pl.col("code").str.starts_with("ICD10CM/")).join(dis, on=["subject_id", "time"], how="anti").height > 0


def test_stamp_at_discharge_moves_only_those_codes():
    ev = pl.DataFrame({"subject_id": [1] * 6, "time": pl.Series([None, "2020-01-01 08:00", "2020-01-01 09:00", "2020-01-01 10:00",
                                                                   "2020-01-02 12:00", "2020-01-02 12:00"]).str.to_datetime(),
                       "code": ["SEX/F", "ADMISSION/URGENT", "ICD10CM/E119", "ATC/A10BA02", "LAB/50912", "DISCHARGE/HOME"],
                       "numeric_value": [None, None, None, None, 1.0, None], "text_value": [None] * 6},
                      schema_overrides={"numeric_value": pl.Float32, "text_value": pl.String})
    out = stamp_at_discharge(ev)
    assert out["code"].to_list() == ["SEX/F", "ADMISSION/URGENT", "ATC/A10BA02", "LAB/50912", "ICD10CM/E119", "DISCHARGE/HOME"]
    assert out.filter(pl.col("code") == "ICD10CM/E119")["time"].item() == ev["time"][5]
    assert out.filter(pl.col("code") == "ATC/A10BA02")["time"].item() == ev["time"][3]


def test_stream_equals_batch_and_keeps_rows_busy(setup):
    "Continuous batching: the same records as sampling all at once, in fewer steps than batches of the same rows."
    d, vocab, model, real = setup
    prompts = real_headers(real, vocab, 12, seed=8)
    keys = row_keys(8, np.arange(12))
    st = stream_tokens(model, vocab, prompts, keys, rows=4, max_len=120)
    ref = sample_tokens(model, vocab, prompts, keys, max_len=120)
    np.testing.assert_array_equal(st.tokens, ref.tokens)
    np.testing.assert_array_equal(st.finished, ref.finished)
    batched = sum(sample_tokens(model, vocab, prompts[i:i + 4], keys[i:i + 4], max_len=120).steps + len(prompts[i]) for i in (0, 4, 8))
    assert st.steps < batched
    assert not vocab.is_unk[st.tokens].any() and check_sequences([r[r != PAD] for r, f in zip(st.tokens, st.finished) if f], vocab).height == 0


def test_generate_same_records_on_1_and_4_devices(tmp_path):
    "The batch split over 4 devices (sample_tokens on a mesh) samples the very records one device does (continuous batching)."
    one = generated_on_all_devices(tmp_path / "one")
    assert one["n_devices"][0] == 1
    run_on_devices(4, "test_generate", f"generated_on_all_devices({str(tmp_path / 'four')!r})")
    four = pl.read_parquet(tmp_path / "four" / "records.parquet")
    assert four["n_devices"][0] == 4 and four.height == one.height == 10
    assert four.drop("n_devices").equals(one.drop("n_devices"))
    assert one["token_ids"].list.len().n_unique() > 1  # records of different lengths: rows stopped at different steps
