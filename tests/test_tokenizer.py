"""Tokenizer: round trip on the demo cohort, fit on train only, determinism, the grammar, bad inputs, training rows."""

import numpy as np
import polars as pl
import pytest

from synehr.core import RunConfig
from synehr.data import BIRTH, DEATH, events_frame, make_splits, read_meds, validate_events, write_meds
from synehr.demo import simulate_cohort
from synehr.tokenizer import (DEATH_ID, END_RECORD, GAP_BASE, GAP_TOKENS, KINDS, MIN_US, PAD, START_RECORD, YEAR_US,
                              EncodeError, Grammar, Vocab, canonical_order, check_sequences, decode, encode, encode_problems,
                              fit_vocab, gap_bucket, make_batches, read_tokens, value_bins, write_tokens)

N, SEED = 120, 7
LAB_Q = {"p01": .01, **{f"q{10 * i}": i / 10 for i in range(1, 10)}, "p99": .99}


def lab_stats(events) -> pl.DataFrame:
    "The cohort's lab statistics, recomputed here with polars quantiles (P1, deciles, P99, modal decimals)."
    v = pl.col("numeric_value").cast(pl.Float64)
    dec = pl.coalesce([pl.when(v.round(d).cast(pl.Float32) == pl.col("numeric_value")).then(pl.lit(d)) for d in range(7)])
    return (events.lazy().filter(pl.col("code").str.starts_with("LAB/"), pl.col("numeric_value").is_not_null())
            .group_by("code").agg(n=pl.len(), **{k: v.quantile(q, "linear") for k, q in LAB_Q.items()},
                                  decimals=dec.mode().min().cast(pl.Int32)).sort("code").collect())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "A demo MEDS dataset (already clean in the cohort's sense), its train split and lab statistics."
    ev = simulate_cohort(N, seed=SEED)
    splits = make_splits(ev["subject_id"].unique(), SEED)
    root = write_meds(tmp_path_factory.mktemp("tok") / "cohort", ev, splits, max_time=None)
    train = read_meds(root, "train", max_time=None).collect()
    return root, ev, splits, train, lab_stats(train)


@pytest.fixture(scope="module")
def vocab(data):
    root, _, _, _, ls = data
    return fit_vocab(root, ls, RunConfig())


def _first_admission_time(events):
    return events.filter(pl.col("code").str.starts_with("ADMISSION/")).group_by("subject_id").agg(pl.col("time").min()).sort("subject_id")


def test_fixed_ids_and_save_load(vocab, tmp_path):
    assert [vocab[t] for t in ("PAD", "START_RECORD", "END_RECORD", "START_VISIT", "END_VISIT", "DEATH")] == list(range(6))
    assert vocab.names(range(GAP_BASE, GAP_BASE + 14)) == list(GAP_TOKENS)
    assert vocab["AGE_0-4"] == 20 and vocab["AGE_>=115"] == 43
    vocab.save(tmp_path / "v.parquet"); vocab.save(tmp_path / "w.parquet")
    assert (tmp_path / "v.parquet").read_bytes() == (tmp_path / "w.parquet").read_bytes()
    assert Vocab.load(tmp_path / "v.parquet") == vocab
    assert "| lab |" in vocab._repr_markdown_()


def test_fit_sees_only_train(data, vocab, tmp_path):
    root, ev, splits, train, ls = data
    # a held-out subject gets a new diagnosis and a new lab inside its first stay: the vocab must not change
    sid = splits.filter(pl.col("split") == "held_out")["subject_id"][0]
    t_adm = _first_admission_time(ev.filter(pl.col("subject_id") == sid))["time"][0]
    extra = events_frame({"subject_id": [sid, sid], "time": [t_adm, t_adm], "code": ["ICD10CM/Z9999", "LAB/99999"],
                          "numeric_value": [None, 1.0]})
    ev2 = pl.concat([ev, extra]).sort("subject_id", "time", nulls_last=False, maintain_order=True)
    root2 = write_meds(tmp_path / "c2", ev2, splits, max_time=None)
    assert fit_vocab(root2, ls) == vocab
    assert fit_vocab(train, ls) == vocab
    assert "ICD10CM/Z9999" not in vocab.codes and "LAB/99999" not in vocab.codes
    # ... and the unseen codes are counted UNK tokens when the held-out split is encoded
    rep0 = write_tokens(root, tmp_path / "tokens0", vocab, splits=["train", "held_out"])
    rep = write_tokens(root2, tmp_path / "tokens", vocab, splits=["train", "held_out"])
    assert sum(rep["train"]["unk_tokens"].values()) == 0
    diff = {c: rep["held_out"]["unk_tokens"][c] - n for c, n in rep0["held_out"]["unk_tokens"].items()}
    assert diff == {**dict.fromkeys(diff, 0), "ICD10CM": 1, "LAB": 1}
    assert rep["held_out"]["numeric_values_not_tokenized"] - rep0["held_out"]["numeric_values_not_tokenized"] == 1  # no bins
    _, report = decode(read_tokens(tmp_path / "tokens", "held_out"), vocab)
    _, report0 = decode(read_tokens(tmp_path / "tokens0", "held_out"), vocab)
    unk, unk0 = (r.filter(pl.col("kind") == "unk", pl.col("subject_id") == sid) for r in (report, report0))
    assert sorted(set(unk["token_id"].to_list()) - set(unk0["token_id"].to_list())) == sorted([vocab["UNK_ICD10CM"], vocab["UNK_LAB"]])
    assert (report["kind"] != "grammar").all() and len(unk) == len(unk0) + 2


def test_round_trip(data, vocab):
    _, _, _, train, _ = data
    enc = encode(train, vocab)
    assert enc["problem"].null_count() == len(enc)
    dec, report = decode(enc, vocab, seed=3)
    assert len(report) == 0
    validate_events(dec, max_time=None)
    can = canonical_order(train, vocab)
    # codes and order exact
    assert dec["subject_id"].equals(can["subject_id"]) and dec["code"].equals(can["code"])
    assert (dec["time"].is_null() == can["time"].is_null()).all()
    # values inside their bins
    labs = can["code"].str.starts_with("LAB/").to_numpy()
    edges = vocab.edges[vocab.ids(can.filter(labs)["code"].str.replace("/", "_"))]
    assert (value_bins(dec.filter(labs)["numeric_value"].to_numpy(), edges) ==
            value_bins(can.filter(labs)["numeric_value"].to_numpy(), edges)).all()
    assert (dec["numeric_value"].is_null() == can["numeric_value"].is_null()).all()
    # times inside their bins: each gap between consecutive visit events, the age and the year of the first admission
    def gaps(df):
        body = df.filter(pl.col("time").is_not_null(), pl.col("code") != BIRTH, ~pl.col("code").str.starts_with("MARITAL_STATUS/"))
        return body.select("subject_id", "code", gap=pl.col("time").diff().dt.total_microseconds(),
                           same=pl.col("subject_id") == pl.col("subject_id").shift(1))
    g0, g1 = gaps(can), gaps(dec)
    assert g0["code"].equals(g1["code"])
    m = g0["same"].fill_null(False).to_numpy()
    a, b = g0["gap"].to_numpy()[m], g1["gap"].to_numpy()[m]
    code = g0["code"].to_numpy()[m]
    between = np.char.startswith(code.astype(str), "ADMISSION/") | (code == DEATH) & (b > 0)
    tokened = between | ((a >= vocab.gap_threshold_min * MIN_US) & (a > 0))
    assert (gap_bucket(a[tokened]) == gap_bucket(b[tokened])).all()
    assert (b[~tokened] < vocab.gap_threshold_min * MIN_US).all() and (b >= 0).all()
    t0, t1 = _first_admission_time(can), _first_admission_time(dec)
    assert (t0["time"].dt.year() == t1["time"].dt.year()).all()
    birth = lambda df: df.filter(pl.col("code") == BIRTH).sort("subject_id")["time"]
    age = lambda t, bt: ((t - bt).dt.total_microseconds() // (5 * YEAR_US)).clip(0, 23)
    assert age(t0["time"], birth(can)).equals(age(t1["time"], birth(dec)))
    # and the strongest form: re-encoding the decoded events gives the same tokens
    assert encode(dec, vocab)["token_ids"].equals(enc["token_ids"])


UNSEEN = ["LAB/99999", "LAB/12345", "ICD10CM/ZZ9", "ICD10PCS/0ZZZZZZ", "ATC/Z99ZZ99", "ADMISSION/ODD", "DISCHARGE/ODD",
          "RACE/ODD", "SEX/X", "MARITAL_STATUS/ODD", "WEIRD/THING"]


@pytest.mark.parametrize("seed", [0, 1])
def test_accepted_records_are_grammatical(seed):
    "Every record `encode` accepts becomes a grammatical sequence, even from corrupted events with unseen codes of every kind; `encode_problems` gives the same verdict without tokens (the rule auditor's grammar check relies on both)."
    ev = simulate_cohort(400, seed=seed)
    vocab = fit_vocab(ev, lab_stats(ev), RunConfig())
    rng = np.random.default_rng(seed)
    n, codes = len(ev), ev["code"].unique().to_numpy()
    code = np.where(rng.random(n) < 0.004, rng.choice(codes, n), ev["code"].to_numpy())  # a code where another was
    odd = rng.random(n) < 0.004
    code = np.where(odd, rng.choice(UNSEEN, n), code)  # codes the vocabulary has never seen
    value = np.where(odd & (rng.random(n) < 0.5), rng.normal(0, 100, n), ev["numeric_value"].to_numpy())
    days = np.where(rng.random(n) < 0.003, rng.integers(-20, 20, n), 0)  # events moved in time
    bad = (ev.with_columns(code=pl.Series(code), numeric_value=pl.Series(value, dtype=pl.Float32),
                           time=pl.col("time") + pl.duration(days=pl.Series(days)))
           .sort("subject_id", "time", nulls_last=False, maintain_order=True))
    enc = encode(bad, vocab)
    accepted = enc.filter(pl.col("problem").is_null())
    assert 0.3 * len(enc) < len(accepted) < 0.9 * len(enc)  # both verdicts are well represented
    assert len(check_sequences(accepted.select("subject_id", "token_ids"), vocab)) == 0
    assert encode_problems(bad, vocab).equals(enc.select("subject_id", "problem"))
    assert encode_problems(ev, vocab)["problem"].null_count() == ev["subject_id"].n_unique()


def test_code_dtypes_encode_alike(data, vocab):
    "String, Categorical and Enum codes (the rule auditor passes an Enum over the cohort's codes, with unseen ones) give the same tokens."
    _, _, _, train, _ = data
    ref = encode(train, vocab)
    extra = pl.DataFrame({"code": ["ICD10CM/ZZZ_UNSEEN", "ATC/ZZZ_UNSEEN"]})  # categories no event uses, and codes outside the vocabulary
    odd = train.head(400).with_columns(pl.when(pl.int_range(pl.len()) % 97 == 5).then(pl.lit("ICD10CM/Q999")).otherwise("code").alias("code"))
    for df in (train, odd):
        want = encode(df, vocab)
        cats = pl.concat([df.select("code"), extra])["code"].unique().sort()
        for dt in (pl.Categorical, pl.Enum(cats)):
            got = encode(df.with_columns(pl.col("code").cast(dt)), vocab)
            assert got.equals(want), dt
    assert ref.height == train["subject_id"].n_unique()


@pytest.mark.parametrize("threshold", [0, 60])
def test_round_trip_options(data, threshold):
    _, _, _, train, ls = data
    v = fit_vocab(train, ls, RunConfig(value_bins="per_lab", gap_threshold_min=threshold))
    enc = encode(train, v)
    assert len(check_sequences(enc, v)) == 0
    dec, report = decode(enc, v, seed=1)
    assert len(report) == 0 and dec["code"].equals(canonical_order(train, v)["code"])
    assert encode(dec, v)["token_ids"].equals(enc["token_ids"])
    # per-lab value tokens belong to their lab: another lab's value token is a grammar error
    seq = enc["token_ids"][0].to_numpy().copy()
    i = int(np.flatnonzero(v.kind[seq] == KINDS.index("value"))[0])
    seq[i] = v.value_base[v.value_base >= 0][0] if v.value_base[seq[i - 1]] != v.value_base[v.value_base >= 0][0] else seq[i] + 10
    bad = check_sequences([seq], v)
    assert bad["position"].to_list() == [i] and "does not belong" in bad["reason"][0]


def test_determinism(data, vocab, tmp_path):
    root = data[0]
    write_tokens(root, tmp_path / "a", vocab)
    write_tokens(root, tmp_path / "b", vocab, rows=997, workers=1)  # other chunking, one thread
    for split in ("train", "tuning", "held_out"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() != b""
        assert read_tokens(tmp_path / "a", split).equals(read_tokens(tmp_path / "b", split))
    write_tokens(root, tmp_path / "c", vocab)
    assert (tmp_path / "a" / "train.parquet").read_bytes() == (tmp_path / "c" / "train.parquet").read_bytes()
    toks = read_tokens(tmp_path / "a", "train")
    d1, d2, d3 = decode(toks, vocab, seed=5)[0], decode(toks, vocab, seed=5)[0], decode(toks, vocab, seed=6)[0]
    assert d1.equals(d2) and not d1["time"].equals(d3["time"])
    # a record decodes the same alone as in a batch
    alone = decode(toks[3:4], vocab, seed=5)[0]
    assert alone.equals(d1.filter(pl.col("subject_id") == toks["subject_id"][3]))
    b1, b2 = make_batches(toks, 64, seed=2), make_batches(toks, 64, seed=2)
    assert all((b1[k] == b2[k]).all() for k in b1)


def _check_naive(seq, g, V):
    if len(seq) == 0: return 0
    s, prev = g.start, -1
    for i, t in enumerate(seq):
        if not 0 <= t < V: return i
        s2 = g.step(np.array([s]), np.array([prev]), np.array([t]))[0]
        if s2 < 0: return i
        s, prev = s2, t
    return None if s == g.accept else len(seq)


def test_grammar_checks_every_sequence(data, vocab, tmp_path):
    root = data[0]
    write_tokens(root, tmp_path, vocab)
    seqs = []
    for split in ("train", "tuning", "held_out"):
        toks = read_tokens(tmp_path, split)
        assert len(check_sequences(toks, vocab)) == 0
        seqs += [np.asarray(s) for s in toks["token_ids"].to_list()]
    # the vectorized check agrees with a token-by-token walk of the state machine on broken copies
    g, rng, broken = Grammar.from_vocab(vocab), np.random.default_rng(0), []
    for s in seqs * 3:
        s, r = s.copy(), rng.integers(0, 7)
        if r == 1: s[rng.integers(0, len(s))] = rng.integers(0, len(vocab))
        elif r == 2: s = s[:rng.integers(0, len(s))]
        elif r == 3: s = np.delete(s, rng.integers(0, len(s)))
        elif r == 4: s = np.r_[s, PAD, PAD]
        elif r == 5: s = np.r_[s[:5], s[5:][rng.permutation(len(s) - 5)]]
        elif r == 6: s = np.insert(s, rng.integers(1, len(s)), s[rng.integers(0, len(s))])
        broken.append(s)
    found = check_sequences(broken, vocab)
    want = {i: p for i, s in enumerate(broken) if (p := _check_naive(s, g, len(vocab))) is not None}
    assert dict(zip(found["subject_id"].to_list(), found["position"].to_list())) == want
    assert len(want) > len(seqs)
    # the masks the sampler will use allow exactly the transitions the check accepts
    masks = g.token_masks()
    s = seqs[0]
    state = g.start
    for t in s:
        assert masks[state, t]
        state = g.table[state, g.kind[t]]
    assert state == g.accept and masks[state].tolist() == [i == PAD for i in range(len(vocab))]


def _frame(rows):
    return events_frame(dict(zip(["subject_id", "time", "code", "numeric_value"], map(list, zip(*rows)))))


BASE = [(1, None, "SEX/F", None), (1, None, "RACE/WHITE", None), (1, "1960-01-01", BIRTH, None),
        (1, "2020-03-01 08:00", "ADMISSION/ELECTIVE", None), (1, "2020-03-01 09:00", "LAB/50912", 1.1),
        (1, "2020-03-03 10:00", "DISCHARGE/HOME", None)]


@pytest.mark.parametrize("rows,problem", [
    (BASE[:3], "no visit (no ADMISSION)"),
    (BASE[:2] + [(1, "1950-01-01", "ADMISSION/ELECTIVE", None)] + BASE[2:3] + BASE[4:], "event before MEDS_BIRTH"),
    (BASE[:4] + [(1, "2020-03-01 09:00", "LAB/50912", float("nan"))] + BASE[5:], "LAB event without a finite numeric_value"),
    (BASE[:4] + [(1, "2020-03-01 09:00", "LAB/50912", None)] + BASE[5:], "LAB event without a finite numeric_value"),
    (BASE[:5] + [(1, "2020-03-02 00:00", "ADMISSION/URGENT", None)] + BASE[5:] + [(1, "2020-03-04 00:00", "DISCHARGE/HOME", None)],
     "ADMISSION while a visit is open (overlapping visits)"),
    (BASE + [(1, "2020-03-04 00:00", "ICD10CM/I10", None)], "clinical event outside a visit"),
    (BASE[:5], "visit without a DISCHARGE"),
    (BASE[1:], "no SEX row"),
    (BASE + [(1, "2020-03-05 00:00", DEATH, None), (1, "2020-03-06 00:00", DEATH, None)], "more than one MEDS_DEATH"),
    (BASE[:5] + [(1, "2020-03-02 00:00", DEATH, None)] + BASE[5:], "MEDS_DEATH inside a visit before its DISCHARGE"),
])
def test_bad_inputs_are_named(vocab, rows, problem):
    out = encode(_frame(rows + [(2, r[1], r[2], r[3]) for r in BASE]), vocab)  # subject 2 is fine
    assert out["problem"].to_list() == [problem, None]
    assert out["token_ids"][0] is None and len(out["token_ids"][1]) > 0


def test_bad_inputs_special_cases(data, vocab, tmp_path):
    # unsorted input is an error naming the row; an unknown namespace is an UNK_CODE token, not an error
    with pytest.raises(ValueError, match="not sorted by time"): encode(_frame(BASE[::-1]), vocab)
    with pytest.raises(ValueError, match="not sorted by subject_id"): encode(_frame([(2, *r[1:]) for r in BASE] + BASE), vocab)
    unk = encode(_frame(BASE[:5] + [(1, "2020-03-01 09:30", "XYZ/1", None)] + BASE[5:]), vocab)
    assert vocab["UNK_CODE"] in unk["token_ids"][0].to_list() and unk["problem"][0] is None
    # a death at the discharge closes the stay: [DEATH] END_VISIT; a later one comes after a gap
    for t, tail in (("2020-03-03 10:00", ["DISCHARGE_HOME", "DEATH", "END_VISIT", "END_RECORD"]),
                    ("2020-04-03 10:00", ["DISCHARGE_HOME", "END_VISIT", "_1mt-3mt", "DEATH", "END_RECORD"])):
        seq = encode(_frame(BASE + [(1, t, DEATH, None)]), vocab)["token_ids"][0].to_list()
        assert vocab.names(seq[-len(tail):]) == tail
    # a discharge and a readmission in the same minute: the first stay closes first (the cohort's order)
    same = BASE + [(1, "2020-03-03 10:00", "ADMISSION/URGENT", None), (1, "2020-03-04 10:00", "DISCHARGE/HOME", None)]
    seq = vocab.names(encode(_frame(same), vocab)["token_ids"][0].to_list())
    assert seq[-9:] == ["DISCHARGE_HOME", "END_VISIT", "_<=5m", "START_VISIT", "ADMISSION_URGENT", "_12h-1d", "DISCHARGE_HOME",
                        "END_VISIT", "END_RECORD"]  # 24 h is the right-inclusive edge of _12h-1d
    # write_tokens stops on a subject that breaks the contract, naming it, and leaves no file behind
    root, ev, splits, _, _ = data
    sid = splits.filter(pl.col("split") == "tuning")["subject_id"][0]
    t_adm = _first_admission_time(ev.filter(pl.col("subject_id") == sid))["time"][0]
    bad = pl.concat([ev, events_frame({"subject_id": [sid], "time": [t_adm], "code": ["ADMISSION/URGENT"]})])
    bad = bad.sort("subject_id", "time", nulls_last=False, maintain_order=True)
    root2 = write_meds(tmp_path / "bad", bad, splits, max_time=None)
    with pytest.raises(EncodeError, match=f"subject_id={sid}: ADMISSION while a visit is open"):
        write_tokens(root2, tmp_path / "tokens", vocab)
    assert not (tmp_path / "tokens" / "tuning.parquet").exists()


def test_decode_reports_broken_sequences(data, vocab):
    enc = encode(data[3], vocab)
    s = enc["token_ids"][0].to_numpy()
    seqs = [s, s[:-1], np.r_[s[:3], s[4:]], np.r_[s, 9999], [], np.r_[s[:-1], DEATH_ID, END_RECORD]]
    events, report = decode(seqs, vocab)
    assert events["subject_id"].unique().to_list() == [0]
    assert report["subject_id"].to_list() == [1, 2, 3, 4, 5] and (report["kind"] == "grammar").all()
    r = dict(zip(report["subject_id"].to_list(), report["reason"].to_list()))
    assert "without END_RECORD" in r[1] and "not allowed in state 'race'" in r[2] and "not in the vocabulary" in r[3]
    assert r[4] == "empty sequence" and "DEATH (death) not allowed in state 'between_visits'" in r[5]


def test_make_batches(data, vocab):
    enc = encode(data[3], vocab)
    seqs = [np.asarray(s) for s in enc["token_ids"].to_list()]
    L = 128
    b = make_batches(enc, L, "segments", seed=0)
    R = len(b["tokens"])
    assert all(v.shape == (R, L) for v in b.values())
    # every segment is a contiguous slice of one record, with its next tokens as targets: attention never crosses records
    text = [" ".join(map(str, s.tolist())) for s in seqs]
    n_seg = 0
    for r in range(R):
        for sgm in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
            m = b["segment_ids"][r] == sgm
            assert (b["positions"][r][m] == np.arange(m.sum())).all() and b["loss_mask"][r][m].all()
            piece = " ".join(map(str, np.r_[b["tokens"][r][m], b["targets"][r][m][-1]].tolist()))
            assert any(piece in t for t in text)
            n_seg += 1
    assert n_seg == sum(-(-(len(s) - 1) // L) for s in seqs)
    assert int(b["loss_mask"].sum()) == sum(len(s) - 1 for s in seqs)
    assert (b["tokens"][~b["loss_mask"]] == PAD).all() and (b["segment_ids"][~b["loss_mask"]] == 0).all()
    # dense: the seed's stream, every record followed by PAD, positions 0..L-1 in every row
    d = make_batches(enc, L, "dense", seed=0)
    stream = np.r_[d["tokens"][:, :].ravel()[d["loss_mask"].ravel()], d["targets"].ravel()[d["loss_mask"].ravel()][-1:]]
    assert sorted(stream[stream != PAD].tolist()) == sorted(np.concatenate(seqs).tolist())
    assert (d["positions"] == np.arange(L)).all() and (stream == START_RECORD).sum() == len(seqs)
    assert make_batches(enc, L, batch_size=4)["segment_ids"].shape[1:] == (4, L)
    with pytest.raises(ValueError, match="packing"): make_batches(enc, L, "ragged")
