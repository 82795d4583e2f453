"""Privacy evaluation (nbs/10c_privacy.ipynb): known answers on constructed data, agreement with brute force, determinism, bad input."""
import numpy as np
import polars as pl
import pytest

from synehr.core import make_rng
from synehr.demo import simulate_cohort
from synehr.privacy import (PrivacyInputError, Records, adversarial_accuracy, attribute_inference, encode_records,
                            exact_copy_rate, fit_codes, knn_indices, membership_inference, nearest_distances, nnaar,
                            privacy_report, trajectory_keys)


def random_records(n, C, V, rng, density=0.15):
    "Random records with 1..V visits over C codes; few codes, so distances tie often."
    nv = rng.integers(1, V + 1, n)
    rows, visits, cols = [], [], []
    for r in range(n):
        for v in range(nv[r]):
            cs = np.flatnonzero(rng.random(C) < density)
            rows += [r] * len(cs); visits += [v] * len(cs); cols += list(cs)
    rows, visits, cols = np.array(rows, np.int64), np.array(visits, np.int32), np.array(cols, np.int32)
    return Records(np.arange(n, dtype=np.int64), nv.astype(np.int32), np.searchsorted(rows, np.arange(n + 1)).astype(np.int64),
                   visits, cols, tuple(f"C/{i}" for i in range(C)))


def brute(a: Records, b: Records, cap=None):
    "Visit-aligned Hamming distances by the definition: per visit the symmetric difference, padding visits empty."
    def sets(r):
        out = []
        for i in range(len(r)):
            vs = [set() for _ in range(r.n_visits[i])]
            for v, c in zip(r.visit[r.indptr[i]:r.indptr[i + 1]], r.col[r.indptr[i]:r.indptr[i + 1]]): vs[v].add(int(c))
            out.append(vs)
        return out
    A, B = sets(a), sets(b)
    D = np.zeros((len(A), len(B)))
    for i, p in enumerate(A):
        for j, q in enumerate(B):
            n = max(len(p), len(q))
            p_, q_ = p + [set()] * (n - len(p)), q + [set()] * (n - len(q))
            D[i, j] = sum(len(x ^ y) for x, y in zip(p_, q_))
    return D


@pytest.mark.parametrize("block", [5, 1024])
def test_nearest_equals_brute_force(block):
    rng = np.random.default_rng(3)
    a, b = random_records(37, 6, 5, rng), random_records(23, 6, 5, rng)
    D = brute(a, b)
    nn = nearest_distances(a, b, block=block)
    np.testing.assert_array_equal(nn.d_ab, D.min(1))
    np.testing.assert_array_equal(nn.d_ba, D.min(0))
    np.testing.assert_array_equal(D[np.arange(len(a)), nn.i_ab], nn.d_ab)  # ties: any nearest, but a nearest
    np.testing.assert_array_equal(D[nn.i_ba, np.arange(len(b))], nn.d_ba)
    assert (D.min(1)[:, None] == D).sum(1).max() > 1  # the data does have ties
    Daa = brute(a, a); np.fill_diagonal(Daa, np.inf)
    loo = nearest_distances(a, block=block)
    np.testing.assert_array_equal(loo.d_ab, Daa.min(1))
    assert (loo.i_ab != np.arange(len(a))).all()


def test_visit_cap_is_an_upper_bound_exact_below_it():
    rng = np.random.default_rng(5)
    a, b = random_records(20, 5, 9, rng), random_records(15, 5, 9, rng)
    exact = nearest_distances(a, b, visit_cap=64).d_ab
    np.testing.assert_array_equal(exact, brute(a, b).min(1))
    capped = nearest_distances(a, b, visit_cap=2).d_ab
    assert (capped >= exact).all() and (capped > exact).any()


def test_identical_records_distance_zero_and_duplicates_within_a_set():
    rng = np.random.default_rng(0)
    a = random_records(10, 8, 3, rng)
    dup = a.take(np.r_[np.arange(10), [4]])  # record 4 twice
    loo = nearest_distances(dup).d_ab
    assert loo[4] == 0 and loo[10] == 0
    np.testing.assert_array_equal(nearest_distances(a, a).d_ab, np.zeros(10))


@pytest.fixture(scope="module")
def cohort():
    ev = simulate_cohort(400, seed=0)
    ids = make_rng(0, "test-privacy").permutation(ev["subject_id"].unique().sort().to_numpy())
    return ev.filter(pl.col("subject_id").is_in(ids[:200])), ev.filter(pl.col("subject_id").is_in(ids[200:]))


@pytest.fixture(scope="module")
def reports(cohort):
    members, non_members = cohort
    independent = simulate_cohort(200, seed=7)  # a perfect generator that saw nobody
    copies = members.with_columns(subject_id=pl.col("subject_id") + 10**8)
    return (privacy_report(members, non_members, independent, seed=0, n_boot=100),
            privacy_report(members, non_members, copies, seed=0, n_boot=100))


def test_random_split_is_chance(reports):
    m = reports[0].metrics
    # 200 + 200 candidates: SE(accuracy) ~ 0.025, SE(AUROC) ~ 0.03; 0.1 is more than 3 standard errors
    for k in ("mia_accuracy", "mia_f1", "mia_auroc", "mia_record_accuracy", "mia_record_auroc"):
        assert abs(m[k] - 0.5) < 0.1, (k, m[k])
    assert m["mia_accuracy_lo"] < 0.5 < m["mia_accuracy_hi"] or abs(m["mia_accuracy"] - 0.5) < 0.05
    assert abs(m["nnaar"]) < 0.15  # two adversarial accuracies over 200 records each: SE of the difference about 0.04
    assert abs(m["aia_f1_gain"]) < 0.1
    assert m["copy_rate_synthetic"] < 0.05 and m["dcr_synthetic_below_holdout_p05"] < 0.12
    assert m["dcr_synthetic_median"] > 0


def test_copies_are_detected(reports):
    m = reports[1].metrics
    assert m["copy_rate_synthetic"] == 1.0 and m["dcr_synthetic_median"] == 0 and m["dcr_synthetic_zero"] == 1.0
    assert m["mia_accuracy"] > 0.95 and m["mia_auroc"] > 0.97 and m["mia_precision"] > 0.95
    assert m["aia_synthetic_f1"] == 1.0 and m["aia_f1_gain"] > 0.3
    assert m["nnaar_aa_train"] == 0.0 and m["nnaar"] > 0.3
    assert m["dcr_synthetic_below_holdout_p05"] == 1.0


def test_metrics_finite_stable_names_and_deterministic(cohort, reports):
    a, b = reports
    assert set(a.metrics) == set(b.metrics)
    assert all(isinstance(v, float) and np.isfinite(v) for v in a.metrics.values())
    members, non_members = cohort
    again = privacy_report(members, non_members, simulate_cohort(200, seed=7), seed=0, n_boot=100)
    assert {k: v for k, v in again.metrics.items() if k != "seconds"} == {k: v for k, v in a.metrics.items() if k != "seconds"}
    other = privacy_report(members, non_members, simulate_cohort(200, seed=7), seed=1, n_boot=100)
    assert other.metrics["mia_accuracy_lo"] != a.metrics["mia_accuracy_lo"]  # the seed drives the bootstrap
    assert "PrivacyReport" in a._repr_markdown_()


def test_membership_inference_known_answers():
    t = membership_inference(np.zeros(50), np.arange(1, 51, dtype=float), seed=0, n_boot=20)
    v = dict(zip(t["metric"], t["value"]))
    assert v["accuracy"] == 1 and v["f1"] == 1 and v["auroc"] == 1
    t = membership_inference(np.arange(1, 51, dtype=float), np.zeros(50), seed=0, n_boot=20)  # members farther: attack inverted
    v = dict(zip(t["metric"], t["value"]))
    assert v["accuracy"] == 0 and v["auroc"] == 0
    t = membership_inference(np.ones(30), np.ones(30), seed=0, n_boot=20)  # all tied: nobody below the median, AUROC 0.5
    v = dict(zip(t["metric"], t["value"]))
    assert v["positive_rate"] == 0 and v["auroc"] == 0.5 and v["accuracy"] == 0.5


def test_adversarial_accuracy_and_knn():
    assert adversarial_accuracy(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3)) == 0.0
    assert adversarial_accuracy(np.array([2., 0]), np.ones(2), np.array([2., 2]), np.ones(2)) == 0.75
    rng = np.random.default_rng(1)
    t, r = (rng.random((30, 12)) < 0.3).astype(np.float32), (rng.random((50, 12)) < 0.3).astype(np.float32)
    D = t.sum(1)[:, None] + r.sum(1)[None] - 2 * t @ r.T
    idx = knn_indices(t, r, k=4, block=8)
    np.testing.assert_array_equal(np.take_along_axis(D, idx, 1), np.sort(D, 1)[:, :4])


def test_attribute_inference_copies_recover_everything():
    rng = np.random.default_rng(2)
    a = random_records(40, 30, 2, rng, density=0.3)
    per = attribute_inference(a, a, known=np.arange(10), k=1)
    assert per["fp"].sum() == 0 and per["fn"].sum() == 0


def test_exact_copies_and_trajectory_keys():
    rng = np.random.default_rng(4)
    a = random_records(20, 6, 3, rng)
    ka = trajectory_keys(a)
    assert exact_copy_rate(trajectory_keys(a.take([3, 5, 5])), ka) == 1.0
    changed = Records(a.subject_id, a.n_visits + 1, a.indptr, a.visit, a.col, a.codes)  # one more (empty) visit: not a copy
    assert exact_copy_rate(trajectory_keys(changed), ka) == 0.0


def test_bad_input(cohort):
    members, non_members = cohort
    with pytest.raises(PrivacyInputError, match="synthetic: missing column"):
        privacy_report(members, non_members, members.drop("time"))
    with pytest.raises(PrivacyInputError, match="non_members: no events"):
        privacy_report(members, non_members.head(0), members)
    with pytest.raises(PrivacyInputError, match="synthetic: no subject has a visit"):
        privacy_report(members, non_members, members.filter(~pl.col("code").str.starts_with("ADMISSION/")))
    with pytest.raises(PrivacyInputError, match="expected a polars DataFrame"):
        privacy_report(members, non_members, "runs/x/synthetic")
    vocab = fit_codes(members.filter(pl.col("code").str.starts_with("LAB/") | pl.col("code").str.starts_with("ADMISSION/")))
    with pytest.raises(PrivacyInputError, match=r"code '.+' \(subject \d+\) is not in the vocabulary"):
        encode_records(members, vocab, name="members")
    rng = np.random.default_rng(0)
    with pytest.raises(PrivacyInputError, match="equally large"):
        nnaar(random_records(5, 3, 2, rng), random_records(4, 3, 2, rng), random_records(5, 3, 2, rng))


def test_records_without_visits_are_counted_not_scored(cohort):
    members, non_members = cohort
    synth = simulate_cohort(60, seed=11)
    no_visit = synth["subject_id"].unique().sort()[:5].to_list()
    synth = synth.filter(~(pl.col("subject_id").is_in(no_visit) & pl.col("code").str.starts_with("ADMISSION/")))
    m = privacy_report(members.filter(pl.col("subject_id").is_in(members["subject_id"].unique().sort()[:60].to_list())),
                       non_members.filter(pl.col("subject_id").is_in(non_members["subject_id"].unique().sort()[:60].to_list())), synth, seed=0, n_boot=10).metrics
    assert m["n_synthetic_without_visits"] == 5 and m["n_synthetic"] == 55 and m["n_synthetic_used"] == 55
    assert m["n_mia"] == 60 and m["n_nnaar"] == 55
