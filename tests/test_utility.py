"""Utility (TSTR vs TRTR): labels on a hand-made timeline, chapter ranges against the ICD-10-CM package, the pipeline end
to end on the demo cohort (a perfect generator keeps utility, a useless one loses it), determinism, degenerate and bad input."""
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from synehr.core import make_rng
from synehr.data import BIRTH, DEATH
from synehr.demo import simulate_cohort
from synehr.utility import (TABLE_SCHEMA, TASKS, LSTMConfig, UtilityError, featurize, fit_features, fit_predict_bilstm, icd10_chapters,
                            label_matrix, stay_table, task_samples, utility_report)

TINY = LSTMConfig(D=8, H=8, steps=60, B=32)


def _t(d, h=0): return datetime(2020, 1, 1) + timedelta(days=d, hours=h)


def toy():
    "Subject 1: 2.5-day stay (J18.9, I10), readmitted 10 days later, dies 29 h in (I21.4). Subject 2: one 20-day stay, home."
    rows = [(1, None, "SEX/M", None), (1, _t(-61 * 365), BIRTH, None), (1, _t(0), "ADMISSION/EW EMER.", None), (1, _t(0, 5), "LAB/50912", 1.1),
            (1, _t(2, 12), "DISCHARGE/HOME", None), (1, _t(2, 12), "ICD10CM/I10", None), (1, _t(2, 12), "ICD10CM/J189", None),
            (1, _t(12, 12), "ADMISSION/URGENT", None), (1, _t(12, 13), "LAB/50912", 3.5), (1, _t(13, 17), "DISCHARGE/DIED", None),
            (1, _t(13, 17), "ICD10CM/I214", None), (1, _t(13, 17), DEATH, None),
            (2, None, "SEX/F", None), (2, _t(-40 * 365), BIRTH, None), (2, _t(100), "ADMISSION/ELECTIVE", None), (2, _t(100, 2), "ATC/A10BA02", None),
            (2, _t(120), "DISCHARGE/HOME", None), (2, _t(120), "ICD10CM/E119", None)]
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}, orient="row")


def test_labels_on_a_known_timeline():
    ev = toy()
    assert stay_table(ev)["los_class"].to_list() == [2, 1, 9]
    assert task_samples(ev, "mortality").select("subject_id", "stay", "y").rows() == [(1, 1, 0), (1, 2, 1), (2, 1, 0)]
    assert task_samples(ev, "mortality", window_h=30)["stay"].to_list() == [1, 1]  # died before the cutoff: no sample
    assert task_samples(ev, "readmission").select("subject_id", "stay", "y").rows() == [(1, 1, 1)]  # subject 2 censored
    assert task_samples(ev, "readmission", readmit_days=5)["y"].to_list() == [0]
    assert task_samples(ev, "los")["y"].to_list() == [2, 1, 9]
    phen = task_samples(ev, "phenotype")
    assert phen["y"].to_list() == [[8]] and label_matrix(phen, "phenotype").sum() == 1
    # no leakage: the death stay at 24 h sees the first stay's diagnoses, not its own outcome or diagnosis
    m = task_samples(ev, "mortality")
    space = fit_features(ev, m)
    X, _, _ = featurize(space, ev, m)
    row = {space.tokens[j] for j in X[1].indices}
    assert {"ICD10CM/J189", "ADMISSION/URGENT", "AGE/60", "SEX/M"} <= row
    assert not row & {"DISCHARGE/DIED", DEATH, "ICD10CM/I214"}


def test_chapter_ranges_match_the_icd10cm_package():
    cm = pytest.importorskip("simple_icd_10_cm")
    cats = [c for c in cm.get_all_codes(with_dots=False) if cm.is_category(c)]
    want = {f"ICD10CM/{c}": cm.get_ancestors(c)[-1] for c in cats}
    got = dict(icd10_chapters(list(want)).rows())
    assert len(cats) > 1500 and got == want
    assert icd10_chapters(["ATC/A10BA02", "ICD10CM/", None]).height == 0


@pytest.fixture(scope="module")
def demo():
    real = simulate_cohort(200, seed=0)
    ids = real["subject_id"].unique().sort().to_numpy()
    test_ids = make_rng(0, "split").permutation(ids)[:100]
    tr, te = real.filter(~pl.col("subject_id").is_in(test_ids)), real.filter(pl.col("subject_id").is_in(test_ids))
    synth = simulate_cohort(100, seed=1).with_columns(pl.col("subject_id") + 1_000_000)  # an independent sample: a perfect generator
    return tr, te, synth


def test_end_to_end_perfect_generator_keeps_utility(demo, tmp_path):
    tr, te, synth = demo
    rep = utility_report(tr, te, synth, seed=0, tasks=("phenotype",), models=("logreg", "bilstm"), n_boot=50,
                         lstm=TINY, figures_dir=tmp_path)
    t = rep.table
    assert dict(t.schema) == TABLE_SCHEMA and t.height == 2 * 2
    ok = t.filter(pl.col("status") == "ok")
    assert (ok.filter(pl.col("task") == "phenotype").height == 4)
    p = ok.filter(pl.col("task") == "phenotype", pl.col("model") == "logreg")
    assert p["auroc"].min() > 0.65  # there is signal: chronic conditions recur
    assert 0.85 < p.filter(pl.col("setting") == "TSTR")["ratio_auroc"][0] < 1.15
    assert (ok["auroc_lo"] <= ok["auroc"]).all() and (ok["auroc"] <= ok["auroc_hi"]).all()
    assert all(np.isfinite(v) for v in rep.metrics.values())
    assert "utility/phenotype/logreg/ratio_auroc" in rep.metrics
    assert all((tmp_path / f"{n}.png").read_bytes()[:4] == b"\x89PNG" for n in ("utility_auroc", "utility_ratio"))
    assert "TSTR" in rep._repr_markdown_()
    rep.save(tmp_path / "out")
    assert pl.read_parquet(tmp_path / "out" / "utility.parquet").equals(t)


def test_useless_generator_is_detected(demo):
    tr, te, synth = demo
    dx = pl.col("code").str.starts_with("ICD10CM/")
    codes = synth.filter(dx)["code"].to_numpy()
    shuffled = synth.with_row_index("r").join(
        synth.with_row_index("r").filter(dx).with_columns(pl.Series("code", make_rng(3, "t").permutation(codes))).select("r", "code"),
        on="r", how="left", suffix="_s").select("subject_id", "time", pl.coalesce("code_s", "code").alias("code"), "numeric_value")
    assert shuffled.filter(dx).height == synth.filter(dx).height and not shuffled["code"].equals(synth["code"])
    rep = utility_report(tr, te, shuffled, seed=0, tasks=("phenotype",), models=("logreg",), n_boot=20)
    trtr, tstr = (rep.table.filter(pl.col("setting") == s)["auroc"][0] for s in ("TRTR", "TSTR"))
    assert abs(tstr - 0.5) < 0.08 and trtr - tstr > 0.15


def test_deterministic_and_degenerate(demo):
    tr, te, synth = demo
    no_deaths = synth.filter(~pl.col("code").is_in(["DISCHARGE/DIED", DEATH]))
    a = utility_report(tr, te, no_deaths, seed=5, tasks=("mortality", "los"), models=("logreg",), n_boot=20)
    b = utility_report(tr, te, no_deaths, seed=5, tasks=("mortality", "los"), models=("logreg",), n_boot=20)
    assert a.table.equals(b.table) and a.metrics == b.metrics
    m = a.table.filter(pl.col("task") == "mortality", pl.col("setting") == "TSTR").row(0, named=True)
    assert m["status"] == "not_evaluable" and "0 positive(s)" in m["reason"] and m["auroc"] is None
    assert not any(k.startswith("utility/mortality/logreg/TSTR") for k in a.metrics)
    rng = np.random.default_rng(0)
    # the shapes of the end-to-end phenotype run (10 visits, 22 chapters, vocabulary padded to 256): no new compile
    x, L, Y = (rng.random((40, 10, 200)) < 0.05).astype(np.float32), rng.integers(1, 11, 40).astype(np.int32), rng.integers(0, 2, (40, 22))
    s1, l1 = fit_predict_bilstm(x, L, Y, x[:7], L[:7], softmax=False, cfg=TINY, seed=1)
    s2, l2 = fit_predict_bilstm(x, L, Y, x[:7], L[:7], softmax=False, cfg=TINY, seed=1)
    s3, _ = fit_predict_bilstm(x, L, Y, x[:7], L[:7], softmax=False, cfg=TINY, seed=2)
    assert np.array_equal(s1, s2) and np.array_equal(l1, l2) and not np.array_equal(s1, s3) and s1.shape == (7, 22)
    assert l1[-10:].mean() < l1[:10].mean()


def test_bad_input_is_named(demo):
    tr, te, synth = demo
    with pytest.raises(UtilityError, match="synth: missing MEDS column"):
        utility_report(tr, te, synth.drop("code"), seed=0)
    with pytest.raises(UtilityError, match="share 100 subject"):
        utility_report(te, te, synth, seed=0)
    with pytest.raises(UtilityError, match="unknown model"):
        utility_report(tr, te, synth, seed=0, models=("svm",))
    with pytest.raises(UtilityError, match="real_test: no events"):
        utility_report(tr, te.clear(), synth, seed=0)
    with pytest.raises(UtilityError, match="expected a polars DataFrame"):
        utility_report(tr, "held_out.parquet", synth, seed=0)


def test_fast_multi_hot_equals_the_per_visit_path(demo):
    "featurize's multi-hot from first token times (binary searches over sorted runs) equals the one built from every event."
    tr, te, _ = demo
    ids = tr["subject_id"].unique().sort()
    dx0 = tr.filter(pl.col("subject_id") == ids[0], pl.col("code").str.starts_with("ICD10CM/"), pl.col("time").is_not_null()).sort("time")["code"][0]
    odd = pl.DataFrame({"subject_id": [ids[0], ids[0], ids[1]], "code": [dx0, "SEX/F", "SEX/F"]}).with_columns(
        pl.col("subject_id").cast(tr.schema["subject_id"]))  # a static code that is also timed; a repeated static row
    odd = tr.clear().join(odd, on=["subject_id", "code"], how="right").select(tr.columns)
    tr2 = pl.concat([tr, odd]).filter(~((pl.col("subject_id") == ids[2]) & (pl.col("code") == BIRTH)))  # a subject without a birth
    for task in TASKS:
        s_tr, s_te = task_samples(tr2, task), task_samples(te, task)
        space = fit_features(tr2, s_tr)
        for ev, s in ((tr2, s_tr), (te, s_te), (te.filter(pl.col("subject_id") % 3 != 0), s_te)):  # the last lacks a third of the samples' subjects
            fast, _, lens = featurize(space, ev, s)
            full, _, lens_full = featurize(space, ev, s, sequences=True)
            assert fast.shape == full.shape and (fast != full).nnz == 0 and np.array_equal(lens, lens_full), task
            assert fast.nnz > 0 and fast.data.max() == 1
        assert set(space.tokens) >= {dx0, "SEX/F", "SEX/M"}
