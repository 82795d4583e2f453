"""KDE post-processing: grids agree with scipy, samples follow the source distribution and stay in their bins,
bad configs name the variable and field, and the kit's post-processing leaves the tokens of a record unchanged."""

import numpy as np
import polars as pl
import pytest
from scipy import stats

from synehr.cohort import build_cohort
from synehr.core import RunConfig, make_key
from synehr.data import validate_events
from synehr.demo import write_demo_cohort
from synehr.kde import (KDEConfigError, KDEVariable, fit_kit_kde, gaps_table, generate_kde_grids, kde_cell_mass, kde_grid,
                        kde_postprocess, labs_table, patients_table, sample_from_kde_grid, visits_table)
from synehr.tokenizer import decode, encode, fit_vocab, read_tokens, value_bins, write_tokens

RANGE = {"method": "range", "n": 400}


def normal_grid(n=4000, seed=0, **kw):
    x = np.random.default_rng(seed).normal(0, 1, n)
    return kde_grid(pl.DataFrame({"x": x}), {"column": "x", "grid": {"method": "range", "n": 400, "start": -5.0, "stop": 5.0}, **kw})


def test_cell_mass_matches_scipy():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.gamma(2, 3, 700), rng.normal(30, 2, 300)]).round(1)
    cuts = np.linspace(-5, 50, 56)
    for rule in ("scott", "silverman", 0.3):
        ref = stats.gaussian_kde(x, bw_method=rule)
        want = np.array([ref.integrate_box_1d(a, b) for a, b in zip(cuts[:-1], cuts[1:])])
        np.testing.assert_allclose(kde_cell_mass(x, cuts[:-1], cuts[1:], rule), want, atol=1e-9)


def test_samples_match_a_known_distribution():
    "KS test against the true normal CDF, unrestricted and restricted to a bin (truncated normal)."
    g = normal_grid()
    assert g.columns == ["x_start", "x_end", "range_probability"]
    s = sample_from_kde_grid(g, make_key(0, "ks"), n=4000)
    assert stats.kstest(s, stats.norm.cdf).pvalue > 0.01
    lo, hi = 0.5, 1.5
    t = sample_from_kde_grid(g, make_key(0, "ks-bin"), n=3000, lo=lo, hi=hi)
    assert ((t >= lo) & (t <= hi)).all()
    trunc = lambda v: (stats.norm.cdf(v) - stats.norm.cdf(lo)) / (stats.norm.cdf(hi) - stats.norm.cdf(lo))
    assert stats.kstest(t, trunc).pvalue > 0.01
    assert stats.kstest(t, stats.uniform(lo, hi - lo).cdf).pvalue < 1e-6  # and it is not the uniform-in-bin draw


def test_samples_stay_in_their_bins_and_are_deterministic():
    g = normal_grid()
    rng = np.random.default_rng(2)
    edges = np.quantile(rng.normal(0, 1, 5000), np.linspace(0, 1, 11))
    k = rng.integers(0, 10, 20_000)
    lo, hi = edges[k], edges[k + 1]
    s, fb = sample_from_kde_grid(g, make_key(3, "bins"), n=len(k), lo=lo, hi=hi, return_fallback=True)
    assert not fb.any() and ((s >= lo) & (s <= hi)).all()
    assert np.array_equal(s, sample_from_kde_grid(g, make_key(3, "bins"), n=len(k), lo=lo, hi=hi))
    assert not np.array_equal(s, sample_from_kde_grid(g, make_key(4, "bins"), n=len(k), lo=lo, hi=hi))
    # bounds outside the grid: flagged, uniform inside the bounds
    s2, fb2 = sample_from_kde_grid(g, make_key(0), n=100, lo=10.0, hi=11.0, return_fallback=True)
    assert fb2.all() and ((s2 >= 10) & (s2 <= 11)).all()


def test_strata_value_counts_and_filters():
    df = pl.DataFrame({"grp": ["a"] * 6 + ["b"] * 4 + [None] * 2, "v": [1, 1, 2, 2, 2, 9, 5, 5, 5, 5, 3, 3],
                       "w": [1, 1, 1, 1, 1, None, 1, 1, 1, 1, 1, 1], "kind": ["x", "y", "x", "x", "z", "x", "x", "x", "y", "x", "x", "x"]})
    g = kde_grid(df, {"column": "v", "method": "value_counts", "stratify_by": ["grp"],
                      "filter": {"kind": ["x", "y"], "w": {"not_null": True}}})
    assert g.columns == ["grp", "v", "probability"]
    got = {(r["grp"], r["v"]): r["probability"] for r in g.iter_rows(named=True)}
    assert got == {(None, 3): 1.0, ("a", 1): 0.5, ("a", 2): 0.5, ("b", 5): 1.0}  # z and the null w filtered out
    eq = kde_grid(df, {"column": "v", "method": "value_counts", "filter": {"kind": "y"}})
    assert dict(eq.iter_rows()) == {1: 0.5, 5: 0.5}
    strata = pl.DataFrame({"grp": ["a"] * 500 + ["b"] * 500 + [None] * 10 + ["c"]})
    s, fb = sample_from_kde_grid(g, make_key(0, "vc"), strata=strata, return_fallback=True)
    assert set(s[:500]) == {1.0, 2.0} and set(s[500:1000]) == {5.0} and set(s[1000:1010]) == {3.0}
    assert fb.tolist() == [False] * 1010 + [True] and np.isnan(s[-1])  # an unknown stratum without bounds: NaN, flagged
    # value_counts with bounds includes both ends
    b = sample_from_kde_grid(g, make_key(1), strata=strata[:500], lo=2.0, hi=2.0)
    assert set(b) == {2.0}


def test_fine_bins_threshold_and_modulo():
    x = np.r_[np.full(10, 0.5), np.full(3, 1.5), np.full(10, 2.5), np.full(10, 3.5), np.full(10, 4.5)]
    df = pl.DataFrame({"x": x})
    g = kde_grid(df, {"column": "x", "grid": {"method": "fine_bins", "step": 1.0, "threshold": 5}, "bandwidth": 0.05})
    assert g["x_start"].to_list() == [0.0, 2.0, 3.0, 4.0]  # the cell with 3 observations is dropped
    g2 = kde_grid(df, {"column": "x", "grid": {"method": "fine_bins", "step": 1.0, "modulo": 2}, "bandwidth": 0.05})
    assert g2["x_start"].to_list() == [0.0, 2.0, 4.0]
    s = sample_from_kde_grid(g, make_key(0), n=2000)
    assert not ((s >= 1) & (s < 2)).any()  # no mass where the cell was dropped


def test_joint_grid_and_sampling():
    rng = np.random.default_rng(5)
    xy = rng.multivariate_normal([0, 10], [[1, 0.8], [0.8, 4]], 3000)
    g = kde_grid(pl.DataFrame({"a": xy[:, 0], "b": xy[:, 1]}), {"column": ["a", "b"], "method": "kde_joint", "grid": [
        {"method": "arange", "start": -5, "stop": 5, "step": 0.25}, {"method": "range", "n": 40, "lo_q": 0.0, "hi_q": 1.0}]})
    assert g.columns == ["a_start", "a_end", "b_start", "b_end", "range_probability"]
    np.testing.assert_allclose(g["range_probability"].sum(), 1.0)
    s = sample_from_kde_grid(g, make_key(0, "joint"), n=4000)
    assert s.shape == (4000, 2)
    np.testing.assert_allclose(s.mean(0), xy.mean(0), atol=0.15)
    rho, rho_real = np.corrcoef(s.T)[0, 1], np.corrcoef(xy.T)[0, 1]  # about 0.4
    assert abs(rho - rho_real) < 0.08  # the joint keeps the correlation (a product of marginals would give 0); smoothing shrinks it a bit
    with pytest.raises(ValueError, match="one-column grids"):
        sample_from_kde_grid(g, make_key(0), n=3, lo=0.0)


BAD = [
    ({"column": "x", "grid": RANGE, "colour": 1}, "colour"),
    ({"column": "x", "method": "kde", "grid": RANGE}, "method"),
    ({"grid": RANGE}, "column"),
    ({"column": "x", "grid": {"method": "range"}}, "grid"),
    ({"column": "x", "grid": {"method": "range", "n": "ten"}}, "grid"),
    ({"column": "x", "grid": {"method": "linear", "n": 3}}, "grid"),
    ({"column": "x", "grid": {"method": "custom", "cuts": [3, 2, 1]}}, "grid"),
    ({"column": "x", "grid": {"method": "arange", "start": 0, "stop": 1, "step": -1}}, "grid"),
    ({"column": "x", "grid": {"method": "fine_bins", "step": 1, "threshold": -1}}, "grid"),
    ({"column": "x", "grid": RANGE, "bandwidth": "wide"}, "bandwidth"),
    ({"column": "x", "grid": RANGE, "bandwidth": -1}, "bandwidth"),
    ({"column": "x", "grid": RANGE, "filter": {"y": None}}, "filter"),
    ({"column": "x", "grid": RANGE, "filter": {"y": {"gt": 3}}}, "filter"),
    ({"column": "x", "grid": RANGE, "stratify_by": "x"}, "stratify_by"),
    ({"column": "x", "grid": RANGE, "min_count": 0}, "min_count"),
    ({"column": "x", "grid": RANGE, "data_source": 3}, "data_source"),
    ({"column": "x", "method": "kde_joint", "grid": [RANGE, RANGE]}, "column"),
    ({"column": ["x", "y"], "method": "kde_joint", "grid": RANGE}, "grid"),
    ({"column": ["x", "y"], "method": "kde_joint", "grid": [RANGE, {"method": "range", "n": 0}]}, r"grid\[1\]"),
]


@pytest.mark.parametrize("entry,field", BAD)
def test_bad_configs_name_variable_and_field(entry, field, tmp_path):
    with pytest.raises(KDEConfigError, match=rf"'heart_rate', field '{field}'"):
        generate_kde_grids(pl.DataFrame({"x": [1.0], "y": [2.0]}), {"heart_rate": entry}, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_data_names_variable_and_field(tmp_path):
    tables = {"visits": pl.DataFrame({"los": [1.0, 2.0], "kind": ["a", "b"]})}
    ok = {"column": "los", "grid": RANGE, "data_source": "visits"}
    for change, field, msg in (({"data_source": "patients"}, "data_source", "not one of the tables"),
                               ({"column": "age"}, "column", "not in the 'visits' table"),
                               ({"column": "kind"}, "column", "needs a numeric column"),
                               ({"filter": {"ward": 1}}, "filter", "not in the 'visits' table")):
        with pytest.raises(KDEConfigError, match=rf"'los', field '{field}': .*{msg}"):
            generate_kde_grids(tables, {"los": {**ok, **change}}, tmp_path)
    with pytest.raises(KDEConfigError, match="variable name"):
        KDEVariable.from_dict("../x", ok)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    "The demo cohort as the pipeline builds it, its vocab, train tokens and fitted grids."
    tmp = tmp_path_factory.mktemp("kde")
    cfg = RunConfig(run_dir=str(tmp))
    build_cohort(write_demo_cohort(tmp / "input", 150, seed=3), tmp / "cohort", cfg)
    vocab = fit_vocab(tmp / "cohort", cfg=cfg)
    write_tokens(tmp / "cohort", tmp / "tokens", vocab, cfg, splits=("train",))
    paths = fit_kit_kde(tmp / "cohort", vocab, tmp / "kde", cfg, num_cores=2)
    return tmp, vocab, read_tokens(tmp / "tokens", "train"), paths


def test_kit_grids_are_written_deterministically(kit, tmp_path):
    tmp, vocab, _, paths = kit
    assert sorted(p.name for p in (tmp / "kde").iterdir()) == ["grid_lab_value_kde.parquet", "grid_time_gap_kde.parquet", "kde_config.json"]
    again = fit_kit_kde(tmp / "cohort", vocab, tmp_path, num_cores=1)
    for k in paths: assert again[k].read_bytes() == paths[k].read_bytes()
    g = pl.read_parquet(paths["lab_value"])
    np.testing.assert_allclose(g.group_by("code").agg(pl.col("range_probability").sum())["range_probability"].to_numpy(), 1.0)


def test_kit_postprocess_keeps_tokens_order_and_bins(kit):
    tmp, vocab, tokens, _ = kit
    uniform, _ = decode(tokens, vocab, seed=1)
    post, rep = kde_postprocess(uniform, vocab, tmp / "kde", make_key(1, "kde"))
    validate_events(post, "kde", max_time=None)
    assert encode(post, vocab)["token_ids"].to_list() == tokens["token_ids"].to_list()  # same bins, buckets, order, age, year
    assert post["code"].to_list() == uniform["code"].to_list()
    assert post["time"].is_null().to_list() == uniform["time"].is_null().to_list()
    assert post.filter(pl.col("code").str.starts_with("MEDS_BIRTH") | pl.col("code").str.starts_with("MARITAL_STATUS/"))["time"].equals(
        uniform.filter(pl.col("code").str.starts_with("MEDS_BIRTH") | pl.col("code").str.starts_with("MARITAL_STATUS/"))["time"])
    lab = pl.col("code").str.starts_with("LAB/")
    u, p = uniform.filter(lab), post.filter(lab)
    e = vocab.edges[[vocab.code_to_id[c] for c in u["code"].to_list()]]
    assert (value_bins(u["numeric_value"].to_numpy(), e) == value_bins(p["numeric_value"].to_numpy(), e)).all()
    assert (u["numeric_value"] != p["numeric_value"]).mean() > 0.3 and rep.labs > 0.9 * u.height and rep.gaps > 0
    g_u, g_p = gaps_table(uniform), gaps_table(post)
    assert g_u["bucket"].to_list() == g_p["bucket"].to_list() and (g_u["gap_min"] != g_p["gap_min"]).mean() > 0.5
    again, _ = kde_postprocess(uniform, vocab, tmp / "kde", make_key(1, "kde"))
    assert again.equals(post)


def test_kit_postprocess_moves_toward_the_real_distribution(kit):
    "On the train split's own tokens, KDE draws are closer (KS) to the real values than the uniform-in-bin draws."
    tmp, vocab, tokens, _ = kit
    from synehr.data import read_meds
    from synehr.kde import ks_distance
    train = read_meds(tmp / "cohort", "train", validate=False).collect()
    uniform, _ = decode(tokens, vocab, seed=2)
    post, _ = kde_postprocess(uniform, vocab, tmp / "kde", make_key(2, "kde"))
    r, u, k = (gaps_table(x).filter(context="between")["gap_min"].to_numpy() for x in (train, uniform, post))
    assert ks_distance(r, k) < ks_distance(r, u)
    rl, ul, kl = (labs_table(x) for x in (train, uniform, post))
    better = [ks_distance(*(t.filter(code=c)["numeric_value"].to_numpy() for t in (rl, kl))) <=
              ks_distance(*(t.filter(code=c)["numeric_value"].to_numpy() for t in (rl, ul))) + 0.01
              for c in rl["code"].unique().to_list()]
    assert np.mean(better) > 0.8


def test_tables(kit):
    tmp, *_ = kit
    from synehr.data import read_meds
    ev = read_meds(tmp / "cohort", "train", validate=False).collect()
    v, p = visits_table(ev), patients_table(ev)
    assert v.height == ev.filter(pl.col("code").str.starts_with("ADMISSION/")).height
    assert (v["los_hours"] >= 0).all() and v["days_since_prev"].drop_nulls().min() >= 0
    assert v.filter(pl.col("visit") == 1)["days_since_prev"].null_count() == p.height
    assert p["n_visits"].sum() == v.height and set(p["sex"].unique()) <= {"F", "M"}
