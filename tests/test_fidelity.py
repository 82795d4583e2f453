"""Fidelity metrics on constructed data with known answers: identical sets agree exactly, a shifted code, scaled time
gaps and a resampled bootstrap row are detected or reproduced, and bad input names the frame and the column."""

import numpy as np
import polars as pl
import pytest
from scipy import stats
from sklearn.metrics import r2_score

from synehr.data import read_meds
from synehr.demo import write_demo_cohort
from synehr.fidelity import (FidelityInputError, agreement, dist_stats, event_units, fidelity_report, prepare,
                             subject_weights, _code_index)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    a = read_meds(write_demo_cohort(d / "a", 60, seed=0), validate=False).collect()
    b = read_meds(write_demo_cohort(d / "b", 60, seed=1), validate=False).collect()
    return a, b


@pytest.fixture(scope="module")
def same(cohorts):
    a, _ = cohorts
    return fidelity_report(a, a, seed=0, n_boot=20)


def test_identical_sets_agree_exactly(same):
    m = same.metrics
    for fam in ("unigram", "same_visit_bigram", "seq_visit_bigram"):
        assert m[f"{fam}.r2"] == pytest.approx(1.0)
        for k in ("bias", "sd", "mae", "loa_lo", "loa_hi"): assert abs(m[f"{fam}.{k}"]) < 1e-15, (fam, k)
    for kind in ("binary", "count", "row_normalized"):
        assert m[f"prevalence.{kind}.r2"] == pytest.approx(1.0) and m[f"prevalence.{kind}.max_abs_prevalence_diff"] == 0
    for cat in ("icd10cm", "atc", "lab"):
        assert m[f"cooccurrence.{cat}.rel_frobenius"] == 0 and m[f"cooccurrence.{cat}.pearson"] == pytest.approx(1.0)
    for k in ("labs.ks_max", "time.event_gap.ks", "time.length_of_stay.ks", "time.inter_visit_gap.ks", "time.event_gap.emd_log10",
              "demographics.age.ks", "demographics.sex.tvd", "demographics.race.tvd", "record_length.ks", "visit_length.ks"):
        assert m[k] == 0, k
    assert all(isinstance(v, float) and np.isfinite(v) for v in m.values())


def test_bootstrap_resamples_subjects(same):
    "Identical inputs, independent resamples of each side: the replicates differ, so the intervals have width."
    m = same.metrics
    assert m["unigram.r2.ci_lo"] < m["unigram.r2.ci_hi"] < 1 and m["time.length_of_stay.ks.ci_hi"] > 0


def test_shifted_code_tops_the_prevalence_difference(cohorts):
    a, _ = cohorts
    code = "ATC/B01AB01"
    subs = a.filter(pl.col("code") == code)["subject_id"].unique().sort()
    drop = subs[: len(subs) // 2]
    b = a.filter(~((pl.col("code") == code) & pl.col("subject_id").is_in(drop.implode())))
    rep = fidelity_report(a, b, seed=0, n_boot=10)
    p = rep.tables["prevalence"].filter(pl.col("matrix") == "binary").row(0, named=True)
    assert p["max_diff_code"] == code and p["max_abs_prevalence_diff"] == pytest.approx(len(drop) / a["subject_id"].n_unique())
    assert rep.tables["prevalence_diffs"]["code"][0] == code
    assert rep.metrics["prevalence.binary.r2"] < 1 and rep.metrics["unigram.r2"] < 1


def _scale_times(ev: pl.DataFrame, k: float) -> pl.DataFrame:
    "Every gap after a subject's first admission multiplied by k (birth and the first admission stay)."
    a0 = pl.col("time").filter(pl.col("code").str.starts_with("ADMISSION/")).min().over("subject_id")
    return ev.with_columns(time=pl.when(pl.col("time") >= a0).then(a0 + (pl.col("time") - a0) * k).otherwise(pl.col("time")))


def test_scaled_time_gaps_are_detected(cohorts):
    a, _ = cohorts
    rep = fidelity_report(a, _scale_times(a, 2), seed=0, n_boot=10)
    m = rep.metrics
    for fam in ("length_of_stay", "inter_visit_gap"):
        assert m[f"time.{fam}.delta_median_log10"] == pytest.approx(np.log10(2), abs=1e-3)
        assert m[f"time.{fam}.ks"] > 0.15 and m[f"time.{fam}.emd_log10"] == pytest.approx(np.log10(2), abs=1e-3)
    assert m["time.event_gap.ks"] > 0.1 and abs(m["time.event_gap.delta_median_log10"] - np.log10(2)) < 0.1
    assert m["demographics.age.ks"] == 0 and m["unigram.r2"] == pytest.approx(1.0)


def test_independent_sample_ci_brackets_point(cohorts):
    a, b = cohorts
    rep = fidelity_report(a, b, seed=3, n_boot=40)
    m = rep.metrics
    for k in ("record_length.delta_mean", "visit_length.delta_mean", "time.length_of_stay.delta_median_log10", "demographics.age.delta_mean"):
        assert m[f"{k}.ci_lo"] <= m[k] <= m[f"{k}.ci_hi"], k
    assert 0.5 < m["unigram.r2"] < 1


def test_deterministic_with_seed(cohorts):
    a, b = cohorts
    r1, r2, r3 = (fidelity_report(a, b, seed=s, n_boot=8) for s in (5, 5, 6))
    assert r1.metrics == r2.metrics
    assert r1.metrics["unigram.r2.ci_lo"] != r3.metrics["unigram.r2.ci_lo"] and r1.metrics["unigram.r2"] == r3.metrics["unigram.r2"]


def test_bigram_units_match_a_python_loop(cohorts):
    a, _ = cohorts
    ev = a.filter(pl.col("subject_id").is_in(a["subject_id"].unique().sort()[:12].implode()))
    ci = _code_index([ev])
    u = event_units(ev, ci)
    V, idx = ci.height, dict(zip(ci["code"], ci["cidx"]))
    same, seq = {}, {}
    for s, g in ev.filter(pl.col("time").is_not_null()).sort("time", maintain_order=True).group_by("subject_id", maintain_order=True):
        visits, cur = [], None
        for code in g["code"]:
            if code.startswith("ADMISSION/"): cur = set(); visits.append(cur)
            elif cur is not None and code in idx: cur.add(idx[code])
        for v in visits:
            for i in v:
                for j in v:
                    if i < j: same[i * V + j] = same.get(i * V + j, 0) + 1
        for v, w in zip(visits, visits[1:]):
            for i in v:
                for j in w: seq[i * V + j] = seq.get(i * V + j, 0) + 1
    for m, want in ((u.same_pair, same), (u.seq_pair, seq)):
        tot = np.asarray(m.sum(0)).ravel()
        assert {int(k): int(tot[k]) for k in np.flatnonzero(tot)} == want


def test_agreement_known_answer():
    r = np.array([[0.1, 0.2, 0.3, 0.4]]); s = np.array([[0.15, 0.2, 0.25, 0.4]])
    a = agreement(r, s)
    d = s[0] - r[0]
    assert a["r2"][0] == pytest.approx(r2_score(r[0], s[0]))
    assert a["bias"][0] == pytest.approx(d.mean()) and a["sd"][0] == pytest.approx(d.std(ddof=1))
    assert a["loa_hi"][0] == pytest.approx(d.mean() + 1.96 * d.std(ddof=1)) and a["mae"][0] == pytest.approx(0.025)
    assert a["max_abs_diff"][0] == pytest.approx(0.05) and a["pct_within_loa"][0] == 100


def test_weighted_distances_match_scipy_and_a_resample():
    rng = np.random.default_rng(0)
    xr, xs = rng.normal(0, 1, 300).round(1), rng.normal(0.3, 1.2, 200).round(1)  # rounded: ties
    ir, is_ = rng.integers(0, 50, 300), rng.integers(0, 40, 200)
    wr, ws = subject_weights(50, 3, 0, "r"), subject_weights(40, 3, 0, "s")
    st = dist_stats(xr, ir, xs, is_, wr, ws)
    assert st["ks"][0] == pytest.approx(stats.ks_2samp(xr, xs).statistic)
    assert st["wasserstein"][0] == pytest.approx(stats.wasserstein_distance(xr, xs))
    assert st["real_q50"][0] == np.quantile(xr, 0.5, method="inverted_cdf")
    b = 2  # replicate 2 equals the explicit resample: each subject's values repeated by its weight
    rr, ss = np.repeat(xr, wr[b][ir].astype(int)), np.repeat(xs, ws[b][is_].astype(int))
    assert st["ks"][b] == pytest.approx(stats.ks_2samp(rr, ss).statistic)
    assert st["wasserstein"][b] == pytest.approx(stats.wasserstein_distance(rr, ss))
    assert st["synth_mean"][b] == pytest.approx(ss.mean()) and st["real_sd"][b] == pytest.approx(rr.std(ddof=1))
    assert st["synth_q75"][b] == np.quantile(ss, 0.75, method="inverted_cdf")


def test_bad_input_names_frame_and_column(cohorts):
    a, _ = cohorts
    with pytest.raises(FidelityInputError, match=r"synthetic: missing column\(s\) \['numeric_value'\]"):
        fidelity_report(a, a.drop("numeric_value"))
    with pytest.raises(FidelityInputError, match="real: no ADMISSION"):
        fidelity_report(a.filter(~pl.col("code").str.starts_with("ADMISSION/")), a)
    with pytest.raises(FidelityInputError, match="real: column 'code' has 1 null"):
        prepare(a.with_columns(code=pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("code"))), a)
    with pytest.raises(FidelityInputError, match="critic_auroc: auroc must be a finite number"):
        fidelity_report(a, a, n_boot=0, critic_auroc=1.5)


def test_critic_hook_and_figures(cohorts, tmp_path):
    a, b = cohorts
    rep = fidelity_report(a, b, seed=0, n_boot=0, critic_auroc={"auroc": 0.62, "ci_lo": 0.55, "ci_hi": 0.7}, figures_dir=tmp_path)
    assert rep.metrics["critic.auroc"] == 0.62 and rep.metrics["critic.auroc.ci_hi"] == 0.7
    assert set(rep.figures) == {"probabilities", "prevalence", "cooccurrence", "labs", "time", "demographics"}
    for p in rep.figures.values(): assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp")) and "critic.auroc" in rep._repr_markdown_()
