"""The rule auditor: every rule fires on a hand-made violating timeline and not on its corrected twin (built from the
rule table, one pair per rule), zero errors on the demo cohort, a corrupted cohort caught with the right rule and
event, and bad input refused with the column named."""
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from synehr.data import BIRTH, DEATH, EVENT_SCHEMA
from synehr.demo import prefixes, simulate_cohort
from synehr.rules import (SCORES_SCHEMA, SUBSETS, VIOLATIONS_SCHEMA, AuditError, ERROR_FACTOR, _cap, audit_rule_table,
                          audit_rules, check_events, chunks, code_ranks, compile_rules, event_marks, icd10cm_rules,
                          pack_events)

T0 = datetime(2020, 1, 1, 8, 0)
RULES = audit_rule_table()
ROWS = {r["rule_id"]: r for r in RULES.iter_rows(named=True)}
GENERIC = {"ICD10CM/": "ICD10CM/R69", "ICD10PCS/": "ICD10PCS/5A1955Z", "ATC/": "ATC/N02BE01", "LAB/": "LAB/50931"}


def code_for(prefix: str) -> str:
    "A code that starts with `prefix` (the prefix itself, or a neutral code of the namespace)."
    return GENERIC.get(prefix, prefix)


def first(cell: str) -> str: return code_for(prefixes(cell)[0])


def lab_mid(lab: str) -> float:
    r = [x for x in ROWS.values() if x["kind"] == "lab_range" and x["lab_code"] == lab]
    return (r[0]["value"] + r[0]["value_hi"]) / 2 if r else 100.0


def matching(code: str, kind: str, field: str = "code_prefix"):
    return [r for r in ROWS.values() if r["kind"] == kind and r[field] and code.startswith(prefixes(r[field]))]


class Timeline:
    "One record: stays (start, end day), events (day, code, value), sex and whole-year age during 2020."
    def __init__(self, events=(), stays=((0, 4),), sex=None, age=40, discharge="DISCHARGE/HOME", death=None):
        self.events, self.stays, self.sex, self.age, self.discharge, self.death = list(events), list(stays), sex, age, discharge, death

    def complete(self, skip=()):
        "Add the codes that implies_code rules ask for in the same stay (except rules in `skip`); pick a sex the codes allow."
        for _ in range(3):
            for day, code, _v in list(self.events):
                for r in matching(code, "implies_code"):
                    if r["rule_id"] in skip: continue
                    same = [c for d, c, _ in self.events if self.stay_of(d) == self.stay_of(day)]
                    if not any(c.startswith(prefixes(r["other_code_prefix"])) for c in same):
                        self.events.append((day + 0.01, first(r["other_code_prefix"]), None))
        if self.sex is None:
            need = {r["sex"] for _, c, _ in self.events for r in matching(c, "sex_specific")}
            self.sex = need.pop() if len(need) == 1 else "F"
        return self

    def stay_of(self, day):
        return next((i for i, (a, b) in enumerate(self.stays) if a <= day <= b), None)

    def frame(self, sid: int) -> pl.DataFrame:
        birth = T0 - timedelta(days=365.25 * self.age + 100)
        rows = [(None, f"SEX/{self.sex}", None), (None, "RACE/WHITE", None), (birth, BIRTH, None)]
        for a, b in self.stays:
            rows += [(T0 + timedelta(days=a), "ADMISSION/URGENT", None), (T0 + timedelta(days=b), self.discharge, None)]
        for day, code, v in self.events:
            if code.startswith("LAB/") and v is None: v = lab_mid(code)
            rows.append((T0 + timedelta(days=day), code, v))
        if self.death is not None: rows.append((T0 + timedelta(days=self.death), DEATH, None))
        df = pl.DataFrame({"subject_id": [sid] * len(rows), "time": [r[0] for r in rows], "code": [r[1] for r in rows],
                           "numeric_value": [r[2] for r in rows]},
                          schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32})
        return df.with_columns(text_value=pl.lit(None, pl.String)).sort("subject_id", "time", nulls_last=False, maintain_order=True)


def other(sex): return "M" if sex == "F" else "F"


def pair(r: dict) -> tuple:
    "A timeline that breaks rule `r` and its corrected twin."
    k, rel, rid = r["kind"], r["relation"], r["rule_id"]
    a = first(r["code_prefix"]) if r["code_prefix"] else None
    b = first(r["other_code_prefix"]) if r["other_code_prefix"] else None
    op, v = r["op"], r["value"]
    if k == "sex_specific":
        return Timeline([(1, a, None)], sex=other(r["sex"])), Timeline([(1, a, None)], sex=r["sex"])
    if k == "age_specific":
        lo, hi = r["min_age"], r["max_age"]
        return Timeline([(1, a, None)], age=hi + 5 if hi < 100 else lo - 5), Timeline([(1, a, None)], age=(lo + hi) // 2)
    if k == "lab_range":
        lab, good = r["lab_code"], (r["value"] + r["value_hi"]) / 2
        extra = []
        for d in matching(lab, "derived_lab", "lab_code"):  # keep a derived lab consistent with its inputs
            if d["relation"] == "friedewald":
                hdl, tg = 50.0, 100.0
                extra = [(1, c, x) for c, x in zip(prefixes(d["other_code_prefix"]), (good + hdl + tg / 5, hdl, tg))]
        return Timeline([(1, lab, r["value_hi"] * 2 + 1)] + extra), Timeline([(1, lab, good)] + extra)
    bad_lab, good_lab = {"<": (v * 0.5, v * 2), "<=": (v * 0.5, v * 2), ">": (v * 1.2, v * 0.8), ">=": (v * 1.2, v * 0.8)}.get(op, (None, None)) \
        if v is not None else (None, None)
    if k == "contraindication":
        if r["lab_code"]:
            return Timeline([(1, a, None), (1.5, r["lab_code"], bad_lab)]), Timeline([(1, a, None), (1.5, r["lab_code"], good_lab)])
        return Timeline([(1, a, None), (1.5, b, None)]), Timeline([(1, a, None)])
    if k == "implies_code":
        return Timeline([(1, a, None)]), Timeline([(1, a, None), (1.5, b, None)])
    if k == "excludes":
        return Timeline([(1, a, None), (1.5, b, None)]), Timeline([(1, a, None)])
    if k == "implies_lab":
        lab = r["lab_code"]
        if op == "rise>=":
            return (Timeline([(1, a, None), (1.2, lab, 1.0), (2, lab, 1.0 + v / 2)], sex=r["sex"]),
                    Timeline([(1, a, None), (1.2, lab, 1.0), (2, lab, 1.0 + 2 * v)], sex=r["sex"]))
        return Timeline([(1, a, None), (1.5, lab, good_lab)], sex=r["sex"]), Timeline([(1, a, None), (1.5, lab, bad_lab)], sex=r["sex"])
    if k == "derived_lab":
        ins, y = prefixes(r["other_code_prefix"]), r["lab_code"]
        if rel == "mdrd_egfr":
            f = 175.0 * 1.0 ** -1.154 * 40 ** -0.203 * 0.742
            vals = {ins[0]: 1.0}
        elif rel == "anion_gap":
            vals = dict(zip(ins, (140.0, 100.0, 24.0))); f = 16.0
        else:
            vals = dict(zip(ins, (200.0, 50.0, 100.0))); f = 130.0
        draw = lambda yv: [(1, c, x) for c, x in vals.items()] + [(1, y, yv)]
        return Timeline(draw(f + 10 * v), sex="F"), Timeline(draw(round(f)), sex="F")
    if k == "temporal":
        if rel == "last":
            return Timeline(stays=[(0, 4), (30, 34)], death=10), Timeline(stays=[(0, 4)], death=10)
        if rel == "same_time":
            return Timeline(discharge="DISCHARGE/DIED"), Timeline(discharge="DISCHARGE/DIED", death=4)
        if rel == "discharge_after_admission":
            return Timeline(stays=[(0, 0)]), Timeline(stays=[(0, 4)])
        if rel == "no_overlap":
            return Timeline(stays=[(0, 4), (2, 6)]), Timeline(stays=[(0, 4), (5, 9)])
        if rel == "within_visit":
            return Timeline([(10, a, None)]), Timeline([(1, a, None)])
        if rel == "once":
            return Timeline([(1, a, None), (31, a, None)], stays=[(0, 4), (30, 34)]), Timeline([(1, a, None)], stays=[(0, 4), (30, 34)])
        if rel == "none_after":
            return (Timeline([(1, a, None), (31, b, None)], stays=[(0, 4), (30, 34)]),
                    Timeline([(1, a, None), (1.5, b, None)], stays=[(0, 4), (30, 34)]))
        if rel == "min_gap_days":
            return (Timeline([(1, a, None), (31, a, None)], stays=[(0, 4), (30, 34)]),
                    Timeline([(1, a, None), (v + 21, a, None)], stays=[(0, 4), (v + 20, v + 24)]))
    raise AssertionError(f"no timeline for rule {rid} ({k}/{rel})")


@pytest.fixture(scope="module")
def pairs():
    "Every rule's violating timeline (odd subject ids) and its twin (even), audited together in one call."
    frames, ids = [], {}
    for n, (rid, r) in enumerate(ROWS.items()):
        bad, good = pair(r)
        frames += [bad.complete(skip={rid}).frame(2 * n + 1), good.complete().frame(2 * n + 2)]
        ids[rid] = (2 * n + 1, 2 * n + 2)
    # the grammar: a record without MEDS_BIRTH, and its twin
    g_bad = Timeline().complete().frame(9001).filter(pl.col("code") != BIRTH)
    frames += [g_bad, Timeline().complete().frame(9002)]
    ids["GRAMMAR"] = (9001, 9002)
    ev = pl.concat(frames)
    return ids, ev, audit_rules(ev)


def fired(audit, sid, rid):
    return audit.violations.filter((pl.col("subject_id") == sid) & (pl.col("rule_id") == rid))


@pytest.mark.parametrize("rid", list(ROWS) + ["GRAMMAR"])
def test_every_rule_fires_on_its_violation_not_on_the_twin(pairs, rid):
    ids, ev, audit = pairs
    bad, good = ids[rid]
    assert len(fired(audit, bad, rid)) >= 1, f"{rid} did not fire on its violating timeline"
    assert len(fired(audit, good, rid)) == 0, f"{rid} fired on its corrected twin: {fired(audit, good, rid)['detail'].to_list()}"


def test_twins_are_clean(pairs):
    "The corrected twins break no error rule at all (so each violating timeline isolates its rule's error)."
    ids, ev, audit = pairs
    twins = [g for _, g in ids.values()]
    errs = audit.violations.filter(pl.col("subject_id").is_in(twins) & (pl.col("severity") == "error"))
    assert errs.is_empty(), errs.select("subject_id", "rule_id", "code", "detail")
    s = audit.scores.filter(pl.col("subject_id").is_in(twins))
    assert s["passed"].all()


def test_every_kind_and_icd_list_is_covered(pairs):
    "The pairs cover every kind and relation of the table and every derived ICD-10-CM rule."
    ids, _, _ = pairs
    kinds = {(r["kind"], r["relation"] if r["kind"] == "temporal" else None) for r in ROWS.values()}
    assert len(kinds) == 8 + 8
    assert set(icd10cm_rules()["rule_id"]) <= set(ids)


def test_anchor_event_is_the_offending_one(pairs):
    ids, ev, audit = pairs
    bad, _ = ids["CI01"]
    v = fired(audit, bad, "CI01")
    assert v["code"].to_list() == ["ATC/A10BA02"] and v["severity"].to_list() == ["error"]
    assert "LAB/50920 < 30" in v["detail"][0]
    bad, _ = ids["TM01"]
    v = fired(audit, bad, "TM01")  # the first event after the death: the second admission
    assert v["code"].to_list() == ["ADMISSION/URGENT"] and v["time"][0] == T0 + timedelta(days=30)
    bad, _ = ids["SEX02"]
    assert "the record's sex: F" in fired(audit, bad, "SEX02")["detail"][0]


def test_scores_follow_the_contract(pairs):
    ids, ev, audit = pairs
    s = audit.scores
    assert s.schema == pl.Schema(SCORES_SCHEMA) and audit.violations.schema == pl.Schema(VIOLATIONS_SCHEMA)
    assert s["subject_id"].to_list() == sorted(ev["subject_id"].unique().to_list())
    assert (s["judge"] == "rules").all() and (s["status"] == "ok").all()
    per = audit.per_record.join(s, on="subject_id")
    assert (per["passed"] == (per["n_error"] == 0)).all()
    expect = 10 * ERROR_FACTOR ** per["n_error"].cast(pl.Float64) * 0.95 ** per["n_warning"].cast(pl.Float64)
    assert np.allclose(per["score"].to_numpy(), expect.to_numpy(), atol=1e-3)
    n = audit.violations.group_by("subject_id").len()
    assert per.join(n, on="subject_id", how="left").select((pl.col("len").fill_null(0) == pl.col("n_violations")).all()).item()
    bad, _ = ids["CI01"]
    assert s.filter(pl.col("subject_id") == bad)["reasons"][0].startswith("errors: CI01 x1")


def test_warnings_do_not_fail_a_record(pairs):
    ids, _, audit = pairs
    bad, _ = ids["IL03"]
    assert fired(audit, bad, "IL03")["severity"].to_list() == ["warning"]
    row = audit.scores.filter(pl.col("subject_id") == bad)
    assert row["passed"][0] and 9 < row["score"][0] < 10


def test_chunk_size_does_not_change_the_verdict(pairs):
    "Chunks bound records and stays (the kernel's per-record and per-stay tables are sized by them): any chunking, same audit."
    _, ev, _ = pairs
    many = Timeline([(10 * k + 1, "ICD10CM/R69", None) for k in range(40)], stays=[(10 * k, 10 * k + 4) for k in range(40)])
    ev = pl.concat([ev, many.complete().frame(9100)])
    p = pack_events(ev)
    rt = compile_rules(audit_rule_table(), p.codes)
    marks = event_marks(rt, p)
    for n in (64, 256):
        parts = chunks(p, n, marks)
        assert all(j - i <= _cap(E) and p.n_adm[i:j].sum() <= _cap(E) and p.offsets[j] - p.offsets[i] <= E for i, j, E in parts)
        assert all(rt.subsets[k][p.code[p.offsets[i]:p.offsets[j]]].sum() <= _cap(E, d) for i, j, E in parts for k, d in SUBSETS.items())
        assert max(E for *_, E in parts) >= 16 * 40  # the 40-stay record: alone, in a chunk big enough for its stays
    ref = audit_rules(ev)
    assert ref.per_record.filter(pl.col("subject_id") == 9100)["n_error"].item() == 0
    for n in (64, 256):
        a = audit_rules(ev, chunk_events=n)
        assert a.violations.equals(ref.violations) and a.totals.equals(ref.totals) and a.scores.equals(ref.scores)


@pytest.fixture(scope="module")
def demo():
    return simulate_cohort(300, 0)


def test_demo_cohort_has_no_error_violations(demo):
    audit = audit_rules(demo)
    assert audit.per_record["n_error"].sum() == 0
    assert audit.scores["passed"].all() and len(audit.scores) == 300
    assert audit.totals.filter(pl.col("severity") == "warning")["ok"].all()  # warnings hold at the cohort level
    again = audit_rules(demo)
    assert again.violations.equals(audit.violations) and again.scores.equals(audit.scores)


def test_corrupted_demo_is_caught_with_rule_and_event(demo):
    male = demo.filter(pl.col("code").str.starts_with("ICD10CM/N40"))["subject_id"][0]
    dead = demo.filter(pl.col("code") == DEATH)
    sid, t_death = dead["subject_id"][0], dead["time"][0]
    after = pl.DataFrame({"subject_id": [sid], "time": [t_death + timedelta(days=2)], "code": ["LAB/50931"], "numeric_value": [110.0],
                          "text_value": [None]}, schema=EVENT_SCHEMA)
    ev = pl.concat([demo.with_columns(pl.when((pl.col("subject_id") == male) & (pl.col("code") == "SEX/M")).then(pl.lit("SEX/F"))
                                      .otherwise("code").alias("code")), after]).sort("subject_id", "time", nulls_last=False, maintain_order=True)
    audit = audit_rules(ev)
    v = audit.violations
    sex = v.filter((pl.col("subject_id") == male) & (pl.col("rule_id") == "SEX02"))
    assert len(sex) == demo.filter((pl.col("subject_id") == male) & pl.col("code").str.contains("^ICD10CM/(C61|N40|Z8546)")).height
    assert sex["code"].str.starts_with("ICD10CM/").all()
    tm = v.filter((pl.col("subject_id") == sid) & (pl.col("rule_id") == "TM01"))
    assert tm.select("time", "code").rows() == [(t_death + timedelta(days=2), "LAB/50931")]
    assert len(v.filter((pl.col("subject_id") == sid) & (pl.col("rule_id") == "GRAMMAR"))) == 1
    broken = set(v.filter(pl.col("severity") == "error")["subject_id"])
    assert broken == {male, sid}
    assert not audit.scores.filter(pl.col("subject_id").is_in([male, sid]))["passed"].any()


def test_bad_input_names_the_column(demo):
    small = demo.head(50)
    with pytest.raises(AuditError, match="missing column 'numeric_value'"): audit_rules(small.drop("numeric_value"))
    with pytest.raises(AuditError, match="column 'time' has type String"): audit_rules(small.with_columns(pl.col("time").cast(pl.String)))
    with pytest.raises(AuditError, match="column 'code' has type Int"): audit_rules(small.with_columns(pl.lit(1).alias("code")))
    with pytest.raises(AuditError, match="column 'code' has 1 null value.*subject_id=10000001"):
        audit_rules(small.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise("code").alias("code")))
    with pytest.raises(AuditError, match="expected a polars DataFrame"): audit_rules(small.to_dicts())


def test_empty_input_and_a_record_without_events():
    from synehr.data import empty_events
    a = audit_rules(empty_events())
    assert a.scores.is_empty() and a.scores.schema == pl.Schema(SCORES_SCHEMA) and a.violations.is_empty()
    ev = pl.DataFrame({"subject_id": [1, 1], "time": [None, None], "code": ["SEX/F", "RACE/WHITE"], "numeric_value": [None, None],
                       "text_value": [None, None]}, schema=EVENT_SCHEMA)
    a = audit_rules(ev)  # only static rows: the grammar refuses it (no birth), no clinical rule has anything to check
    assert a.violations.select("rule_id", "detail").rows() == [("GRAMMAR", "no MEDS_BIRTH")]
    assert a.scores.select("score", "passed").rows() == [(10 * ERROR_FACTOR, False)]


def test_code_ranks_split_across_threads_agree():
    "The codes' ranks come out the same however many threads share the pass (a code only the last part holds included)."
    base = simulate_cohort(2000, seed=0)
    last = pl.int_range(pl.len()) == 6 * base.height - 10
    ev = check_events(pl.concat([base.with_columns(pl.col("subject_id") + k * 10**6) for k in range(6)])
                      .with_columns(pl.when(last).then(pl.lit("ZZZ/only-here")).otherwise("code").alias("code")))
    one = code_ranks(ev, workers=1)
    assert one.dtype.categories.to_list() == sorted(ev["code"].unique().to_list())
    assert (np.asarray(one.dtype.categories.to_list())[one.to_physical().to_numpy()] == ev["code"].to_numpy()).all()
    for k in (2, 3):
        got = code_ranks(ev, workers=k)
        assert got.dtype == one.dtype and got.to_physical().equals(one.to_physical())
