"""The realism critic: real vs real is indistinguishable (AUROC ~0.5), real vs shuffled records is separated (~1),
scores follow the judge contract and are out-of-fold for training records, same seed -> same scores, bad input is refused."""
import numpy as np
import polars as pl
import pytest

from synehr.cohort import build_cohort
from synehr.core import ConfigError, RunConfig, make_rng
from synehr.critic import (CriticConfig, auroc, critic_scores, load_critic, save_critic, to_records, train_critic)
from synehr.demo import simulate_cohort, write_demo_cohort
from synehr.rules import SCORES_SCHEMA
from synehr.tokenizer import fit_vocab, read_tokens, write_tokens

CFG = CriticConfig.tiny()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("critic")
    cfg = RunConfig(run_dir=str(tmp))
    build_cohort(write_demo_cohort(tmp/"input", 300, seed=0), tmp/"cohort", cfg)
    vocab = fit_vocab(tmp/"cohort", cfg=cfg)
    write_tokens(tmp/"cohort", tmp/"tokens", vocab, cfg, splits=("train",))
    return tmp, cfg, vocab, read_tokens(tmp/"tokens", "train")


def shuffled(tokens: pl.DataFrame, vocab, seed: int = 0) -> pl.DataFrame:
    "The records with every token after the first five (the header) and before END_RECORD in random order."
    r = to_records(tokens, vocab)
    rec = np.repeat(np.arange(r.n), r.lengths)
    pos = np.arange(len(r.vals)) - r.offs[rec]
    part = np.where(pos < 5, 0, np.where(pos == r.lengths[rec] - 1, 2, 1))
    vals = r.vals[np.lexsort((np.where(part == 1, make_rng(seed, "shuffle").random(len(r.vals)), pos), part, rec))]
    return pl.DataFrame({"subject_id": tokens["subject_id"] + 10**9, "token_ids": np.split(vals, r.offs[1:-1])},
                        schema={"subject_id": pl.Int64, "token_ids": pl.List(pl.Int32)})


@pytest.fixture(scope="module")
def fake(data):
    _, _, vocab, real = data
    syn = shuffled(real, vocab)
    return syn, train_critic(real, syn, vocab, seed=0, cfg=CFG)


def test_shuffle_keeps_token_counts(data):
    _, _, vocab, real = data
    s = shuffled(real[:20], vocab)
    assert s["token_ids"].list.sort().to_list() == real[:20]["token_ids"].list.sort().to_list()
    assert s["token_ids"].to_list() != real[:20]["token_ids"].to_list()


def test_real_vs_real_is_indistinguishable(data):
    "Two disjoint halves of the real train split: the held-out AUROC is 0.5 up to sampling noise."
    _, _, vocab, real = data
    perm = make_rng(0, "halves").permutation(real.height)
    a, b = real[np.sort(perm[:real.height // 2])], real[np.sort(perm[real.height // 2:])]
    c = train_critic(a, b, vocab, seed=0, cfg=CFG)
    n1, n0 = a.height, b.height
    sd = np.sqrt((n0 + n1 + 1) / (12 * n0 * n1))  # standard deviation of the AUROC when both classes come from one distribution
    assert abs(c.auroc_heldout - 0.5) < 4 * sd, (c.auroc_heldout, sd)
    sc = critic_scores(c, b, vocab)
    assert sc["passed"].mean() > 0.9                   # a perfect generator keeps (nearly) all its records
    assert sc["score"].is_between(2.5, 7.5).mean() > 0.9  # and its scores sit around 5


def test_shuffled_records_are_separated(data, fake):
    _, _, vocab, real = data
    syn, c = fake
    assert c.auroc_heldout > 0.95 and c.auroc_ci[0] > 0.9
    assert critic_scores(c, syn, vocab)["passed"].mean() < 0.1
    assert critic_scores(c, real, vocab)["passed"].mean() > 0.9
    assert c.ece < 0.1


def test_scores_follow_the_contract(data, fake):
    tmp, cfg, vocab, real = data
    syn, c = fake
    sc = critic_scores(c, syn.sample(fraction=1.0, shuffle=True, seed=1), vocab)
    assert sc.schema == pl.Schema(SCORES_SCHEMA)
    assert sc["subject_id"].to_list() == sorted(syn["subject_id"].to_list())
    assert (sc["judge"] == "critic").all() and (sc["status"] == "ok").all()
    assert sc["score"].is_between(0, 10).all() and c.oof["p_real"].is_between(0, 1).all()
    # training records are scored out-of-fold: by the model that did not see them, as during training
    oof = c.oof.filter(label="synthetic").sort("subject_id")
    np.testing.assert_allclose(sc["score"].to_numpy(), 10 * oof["p_real"].to_numpy(), atol=1e-6)
    assert sc["reasons"].str.contains("out-of-fold").all()
    # the threshold decides passed
    assert (critic_scores(c, syn, vocab, threshold=0.0)["passed"]).all()
    # fresh MEDS events: encoded, scored by the mean of the fold models; an unencodable record gets encode_error
    ev = simulate_cohort(12, seed=5)
    broken = ev["subject_id"][3]
    ev = ev.filter((pl.col("subject_id") != broken) | (pl.col("code") != "MEDS_BIRTH"))
    fs = critic_scores(c, ev, vocab)
    assert fs.height == 12 and fs.schema == pl.Schema(SCORES_SCHEMA)
    row = fs.filter(subject_id=broken).row(0, named=True)
    assert (row["score"], row["passed"], row["status"]) == (None, False, "encode_error") and "MEDS_BIRTH" in row["reasons"]
    assert fs.filter(status="ok")["reasons"].str.contains("mean of 3 fold models").all()


def test_same_seed_same_scores(data, fake, tmp_path):
    _, _, vocab, real = data
    syn, c = fake
    small = CriticConfig.tiny(max_epochs=3)
    a, b = (train_critic(real[:60], syn[:60], vocab, seed=0, cfg=small) for _ in range(2))
    assert a.oof.equals(b.oof) and a.history.equals(b.history)
    assert critic_scores(a, syn, vocab).equals(critic_scores(b, syn, vocab))
    other = train_critic(real[:60], syn[:60], vocab, seed=1, cfg=small)
    assert not np.array_equal(other.oof["fold"].to_numpy(), a.oof["fold"].to_numpy())
    assert not np.allclose(other.oof["logit"].to_numpy(), a.oof["logit"].to_numpy())
    # saved and loaded: the same scores
    loaded = load_critic(save_critic(c, tmp_path/"critic"))
    assert critic_scores(loaded, syn, vocab).equals(critic_scores(c, syn, vocab))
    assert loaded.auroc_heldout == c.auroc_heldout and loaded.history.equals(c.history) and loaded.oof.equals(c.oof)


def test_auroc_known_answers():
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert auroc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([1, 0, 0], [0.4, 0.3, 0.5]) == 0.5


def test_bad_input_is_refused(data, fake):
    tmp, cfg, vocab, real = data
    syn, c = fake
    with pytest.raises(ValueError, match="synthetic records: no records"):
        train_critic(real, syn.clear(), vocab, cfg=CFG)
    with pytest.raises(ValueError, match="need at least 6"):
        train_critic(real, syn[:4], vocab, cfg=CFG)
    bad = syn[:30].with_columns(pl.col("token_ids").list.concat(pl.lit([len(vocab)], dtype=pl.List(pl.Int32))))
    with pytest.raises(ValueError, match=f"subject {bad['subject_id'][0]} has token id {len(vocab)} outside the vocabulary"):
        train_critic(real, bad, vocab, cfg=CFG)
    with pytest.raises(ValueError, match="appears in more than one row"):
        critic_scores(c, pl.concat([syn[:3], syn[:1]]), vocab)
    with pytest.raises(ValueError, match="trained with another vocabulary"):
        critic_scores(c, syn, fit_vocab(tmp/"cohort", cfg=cfg.replace(value_bins="per_lab")))
    with pytest.raises(ValueError, match="needs columns"):
        critic_scores(c, pl.DataFrame({"subject_id": [1], "tokens": [[1, 2]]}), vocab)
    with pytest.raises(ConfigError, match="CriticConfig.folds"):
        CriticConfig(folds=2)
    with pytest.raises(FileNotFoundError, match="critic.json not found"):
        load_critic(tmp/"no_critic")
