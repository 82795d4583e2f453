"""Cohort stage: lab statistics fitted on train only, determinism, the cohort's guarantees, bad input, top-n and mapping counts."""
import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import meds
import polars as pl
import pytest

from synehr.cohort import (CohortReport, KEPT, REASONS, TOP_N_FIELDS, build_cohort, check_cohort, namespace_expr,
                           read_lab_stats)
from synehr.core import ConfigError, RunConfig
from synehr.data import BIRTH, DEATH, MEDSError, data_files, events_frame, make_splits, read_codes, read_meds, read_splits, write_meds
from synehr.demo import simulate_cohort

N, SEED = 200, 3


@pytest.fixture(scope="module")
def demo_events():
    return simulate_cohort(N, seed=SEED)


@pytest.fixture(scope="module")
def source(demo_events, tmp_path_factory):
    ev = demo_events
    return write_meds(tmp_path_factory.mktemp("src") / "demo", ev, make_splits(ev["subject_id"].unique(), SEED))


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    return build_cohort(source, tmp_path_factory.mktemp("out") / "cohort", RunConfig(seed=SEED, top_n_icd10cm=30))


def _files(root, skip_stats=True):
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file(): continue
        if p.name == "stats.json" and skip_stats:
            s = json.loads(p.read_text()); s.pop("seconds"); s.pop("source")
            out[str(p.relative_to(root))] = s
        else: out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _accounted(stats):
    e = stats["events"]
    return e["input"] == e["kept"] - sum(e["added"].values()) + sum(n for d in e["dropped"].values() for n in d.values())


# ---------------------------------------------------------------- fit sees only train
def _with_lab_values(events, splits, which, factor):
    "Scale the LAB values of the subjects in the splits `which`."
    sp = events.join(splits, on="subject_id", how="left", maintain_order="left")["split"]
    hit = pl.col("code").str.starts_with("LAB/") & sp.is_in(which)
    return events.with_columns(numeric_value=pl.when(hit).then(pl.col("numeric_value") * factor + 1).otherwise("numeric_value"))


def test_lab_stats_fitted_on_train_only(demo_events, built, tmp_path):
    splits = make_splits(demo_events["subject_id"].unique(), SEED)
    cfg = RunConfig(seed=SEED, top_n_icd10cm=30)
    other = _with_lab_values(demo_events, splits, ["tuning", "held_out"], 3.0)
    assert not other.equals(demo_events)
    r1 = build_cohort(write_meds(tmp_path / "a", other, splits), tmp_path / "ca", cfg)
    assert (r1.out / "lab_stats.parquet").read_bytes() == (built.out / "lab_stats.parquet").read_bytes()
    assert (r1.out / "coverage.parquet").read_bytes() == (built.out / "coverage.parquet").read_bytes()
    train = _with_lab_values(demo_events, splits, ["train"], 3.0)
    r2 = build_cohort(write_meds(tmp_path / "b", train, splits), tmp_path / "cb", cfg)
    assert not r2.lab_stats.equals(built.lab_stats)
    # the statistics are those of the written train split
    tr = read_meds(built.out, split="train").filter(pl.col("code") == "LAB/50983").collect()["numeric_value"].cast(pl.Float64)
    row = built.lab_stats.filter(pl.col("code") == "LAB/50983").row(0, named=True)
    assert row["n"] == len(tr)
    for k, q in (("p01", .01), ("q10", .1), ("q50", .5), ("q90", .9), ("p99", .99)):
        assert row[k] == pytest.approx(tr.quantile(q, "linear"))


def test_lab_stats_schema_and_decimals(built):
    ls = read_lab_stats(built.out)
    assert ls.columns == ["code", "n", "p01", *[f"q{10 * i}" for i in range(1, 10)], "p99", "decimals"]
    assert ls.schema["n"] == pl.Int64 and ls.schema["decimals"] == pl.Int32
    assert all(ls.schema[c] == pl.Float64 for c in ls.columns[2:-1])
    assert ls["code"].str.starts_with("LAB/").all() and ls["code"].is_sorted()
    q = ls.select(ls.columns[2:-1]).to_numpy()
    assert (q[:, 1:] >= q[:, :-1]).all()  # quantiles are monotone
    from synehr.demo import LAB_ITEMS  # the simulator rounds each lab to its MIMIC precision
    dec = dict(zip(ls["code"], ls["decimals"]))
    assert {c: dec[c] for c in dec} == {c: LAB_ITEMS[c][2] for c in dec}


# ---------------------------------------------------------------- determinism
def test_same_input_byte_identical(source, built, tmp_path):
    again = build_cohort(source, tmp_path / "again", RunConfig(seed=SEED, top_n_icd10cm=30))
    a, b = _files(built.out), _files(again.out)
    assert any(k.startswith("data/train/") for k in a)
    assert a == b


def test_chunking_does_not_change_output(source, built, tmp_path):
    small = build_cohort(source, tmp_path / "small", RunConfig(seed=SEED, top_n_icd10cm=30), chunk_events=2_000)
    assert len(data_files(small.out, "train")) > 1
    a, b = read_meds(small.out).collect(), read_meds(built.out).collect()
    key = ["subject_id"]
    assert a.sort(key, maintain_order=True).equals(b.sort(key, maintain_order=True))
    fa, fb = _files(small.out), _files(built.out)
    assert {k: v for k, v in fa.items() if not k.startswith("data/")} == {k: v for k, v in fb.items() if not k.startswith("data/")}


def test_splits_drawn_with_seed_when_missing(source, tmp_path):
    src = tmp_path / "nosplits"
    shutil.copytree(source, src)
    (src / meds.subject_splits_filepath).unlink()
    r0 = build_cohort(src, tmp_path / "s0", RunConfig(seed=0))
    r0b = build_cohort(src, tmp_path / "s0b", RunConfig(seed=0))
    r1 = build_cohort(src, tmp_path / "s1", RunConfig(seed=1))
    s0, s1 = read_splits(r0.out), read_splits(r1.out)
    assert s0.equals(read_splits(r0b.out)) and not s0.equals(s1)
    want = make_splits(read_meds(src).select("subject_id").unique().collect()["subject_id"], 0)
    assert s0.equals(want.sort("subject_id"))
    assert {k: v["subjects"] for k, v in r0.stats["splits"].items()} == {"train": 160, "tuning": 20, "held_out": 20}


# ---------------------------------------------------------------- the cohort's guarantees
def test_cohort_invariants(built, source):
    ev = read_meds(built.out).collect()  # validated like any MEDS input
    assert check_cohort(ev).height == 0
    s = built.stats
    assert _accounted(s) and s["events"]["kept"] == ev.height
    # structure of every subject
    per = ev.group_by("subject_id").agg(
        first=pl.col("code").head(2), n_static=pl.col("time").is_null().sum(), deaths=(pl.col("code") == DEATH).sum(),
        last=pl.col("code").last(), death_t=pl.col("time").filter(pl.col("code") == DEATH).first(), max_t=pl.col("time").max())
    assert per["n_static"].eq(2).all()
    assert per["first"].list.get(0).str.starts_with("SEX/").all() and per["first"].list.get(1).str.starts_with("RACE/").all()
    dead = per.filter(pl.col("deaths") > 0)
    assert dead.height > 0 and dead["deaths"].eq(1).all() and dead["last"].eq(DEATH).all() and (dead["death_t"] == dead["max_t"]).all()
    # only kept categories; top-n codes only
    assert ev.select(namespace_expr().is_in(KEPT).all()).item()
    kept_icd = set(built.coverage.filter(pl.col("category") == "ICD10CM", "kept")["code"])
    assert len(kept_icd) == 30 and set(ev.filter(pl.col("code").str.starts_with("ICD10CM/"))["code"]) == kept_icd
    # visits: admissions and discharges alternate, no overlap
    v = ev.filter(pl.col("code").str.starts_with("ADMISSION/") | pl.col("code").str.starts_with("DISCHARGE/"))
    v = v.with_columns(adm=pl.col("code").str.starts_with("ADMISSION/"))
    assert v.group_by("subject_id").agg(alt=(pl.col("adm") != pl.col("adm").shift(1)).slice(1).all(), first=pl.col("adm").first())\
        .select(pl.col("alt").all() & pl.col("first").all()).item()
    # labs have values and statistics
    labs = ev.filter(pl.col("code").str.starts_with("LAB/"))
    assert labs["numeric_value"].null_count() == 0
    assert set(labs["code"]) <= set(built.lab_stats["code"])
    # metadata: codes described where the input described them, splits of the written subjects
    codes = read_codes(built.out)
    assert set(codes["code"]) == set(ev["code"])
    sp = read_splits(built.out)
    for split in ("train", "tuning", "held_out"):
        ids = set(read_meds(built.out, split=split).select("subject_id").collect()["subject_id"])
        assert ids == set(sp.filter(pl.col("split") == split)["subject_id"])
    assert built.stats["splits"]["train"]["events"] == read_meds(built.out, split="train").collect().height


def test_report_loads_and_renders(built):
    again = CohortReport.load(built.out)
    assert again.stats == built.stats and again.coverage.equals(built.coverage)
    md = built._repr_markdown_()
    assert "| train |" in md and "ICD10CM" in md and "below_top_n" in md
    assert set(built.dropped()["reason"]) <= set(REASONS)


# ---------------------------------------------------------------- bad input
def _timeline(rows, sid=1):
    rows = [r + (None,) * (3 - len(r)) for r in rows]
    return events_frame({"subject_id": [sid] * len(rows), "time": [r[0] for r in rows], "code": [r[1] for r in rows],
                         "numeric_value": [r[2] for r in rows]}).sort("subject_id", "time", nulls_last=False, maintain_order=True)


def _d(day, h=0): return datetime(2020, 1, day, h)


BASE = [(None, "SEX/F"), (datetime(1960, 1, 1), BIRTH), (_d(1), "ADMISSION/URGENT"), (_d(2), "LAB/50912", 1.0),
        (_d(3), "ICD10CM/E119"), (_d(3), "DISCHARGE/HOME")]


def _write(root, frames, splits=None):
    ev = pl.concat(frames)
    return write_meds(root, ev, splits if splits is not None else
                      pl.DataFrame({"subject_id": ev["subject_id"].unique().sort(), "split": "train"}))


def test_events_before_birth_and_nan_are_errors(tmp_path):
    root = _write(tmp_path / "src", [_timeline(BASE)])
    f = data_files(root)[0]
    ev = pl.read_parquet(f)
    ev.with_columns(time=pl.when(pl.col("code") == "LAB/50912").then(datetime(1950, 1, 1)).otherwise("time")) \
      .sort("subject_id", "time", nulls_last=False).write_parquet(f)
    with pytest.raises(MEDSError, match=r"0\.parquet: column 'time': event before the subject's MEDS_BIRTH: row 1 \(subject_id=1\)"):
        build_cohort(root, tmp_path / "out", RunConfig())
    ev.with_columns(numeric_value=pl.when(pl.col("code") == "LAB/50912").then(float("nan")).otherwise("numeric_value")).write_parquet(f)
    with pytest.raises(MEDSError, match=r"column 'numeric_value': non-finite value .*row 3 \(subject_id=1\)"):
        build_cohort(root, tmp_path / "out", RunConfig())
    assert not (tmp_path / "out").exists()


def test_empty_subject_and_missing_demographics_are_dropped_and_counted(tmp_path):
    root = _write(tmp_path / "src", [_timeline(BASE), _timeline([(None, "SEX/M"), (None, "RACE/WHITE")], 2),
                                     _timeline([(None, "SEX/M"), (datetime(1970, 1, 1), BIRTH)], 3),
                                     _timeline([b for b in BASE if b[1] != "SEX/F"], 4)])
    r = build_cohort(root, tmp_path / "out", RunConfig())
    assert r.stats["subjects"] == {"input": 4, "kept": 1, "dropped": {"subject_no_birth": 1, "subject_no_sex": 1, "subject_no_visit": 1}}
    assert r.stats["events"]["dropped"]["subject_no_birth"] == {"RACE": 1, "SEX": 1}
    assert r.stats["events"]["added"] == {"RACE/UNKNOWN": 1}
    assert _accounted(r.stats)
    ev = read_meds(r.out).collect()
    assert ev["subject_id"].unique().to_list() == [1] and "RACE/UNKNOWN" in ev["code"].to_list()


def test_unknown_codes_counted_per_namespace(tmp_path):
    rows = [*BASE, (_d(2, 3), "LOINC/2160-0", 1.0), (_d(2, 4), "FOO/x"), (_d(2, 5), "FOO/y"), (_d(2, 6), "ICD9CM/4280")]
    r = build_cohort(_write(tmp_path / "src", [_timeline(rows)]), tmp_path / "out", RunConfig())
    assert r.stats["events"]["dropped"]["unknown_code"] == {"FOO": 2, "LOINC": 1}
    assert r.stats["events"]["dropped"]["unmapped"] == {"ICD9CM": 1}
    assert r.stats["mapping"]["ICD9CM"] == {"events": 1, "mapped": 0, "unmapped": 1, "top_unmapped": {"ICD9CM/4280": 1}}
    assert _accounted(r.stats)


def test_bad_visits_dropped_and_counted(tmp_path):
    rows = [*BASE,
            (_d(2, 12), "ADMISSION/EW EMER."), (_d(5), "DISCHARGE/HOME"),   # overlaps the first visit
            (_d(8), "DISCHARGE/HOME"), (_d(9), "ADMISSION/ELECTIVE"),       # discharge before admission
            (_d(10), "ADMISSION/URGENT"), (_d(10, 5), "LAB/50912", 2.0), (_d(11), "DISCHARGE/HOME"),
            (_d(15), "ATC/A10BA02"),                                       # between visits
            (_d(20), DEATH), (_d(21), "ADMISSION/URGENT"), (_d(22), "DISCHARGE/HOME"),  # after death
            (_d(25), "ADMISSION/URGENT")]                                  # never discharged
    r = build_cohort(_write(tmp_path / "src", [_timeline(rows)]), tmp_path / "out", RunConfig())
    s = r.stats
    assert s["visits"] == {"input": 6, "kept": 2, "dropped": {"visit_after_death": 1, "visit_bad_order": 1, "visit_overlap": 1, "visit_unpaired": 1}}
    assert s["events"]["dropped"]["visit_overlap"] == {"ADMISSION": 1, "DISCHARGE": 1}
    assert s["events"]["dropped"]["outside_visit"] == {"ATC": 1}
    ev = read_meds(r.out).collect()
    assert check_cohort(ev).height == 0
    assert ev["code"].to_list() == ["SEX/F", "RACE/UNKNOWN", BIRTH, "ADMISSION/URGENT", "LAB/50912", "ICD10CM/E119", "DISCHARGE/HOME",
                                    "ADMISSION/URGENT", "LAB/50912", "DISCHARGE/HOME", DEATH]


def test_margin_clamps_and_counts(tmp_path):
    rows = [*BASE, (_d(1) - timedelta(hours=2), "LAB/50912", 3.0), (_d(3, 4), "LAB/50912", 1.5), (_d(9), "LAB/50912", 1.5)]
    root = _write(tmp_path / "src", [_timeline(rows)])
    strict = build_cohort(root, tmp_path / "strict", RunConfig())
    assert strict.stats["events"]["dropped"]["outside_visit"] == {"LAB": 3}
    loose = build_cohort(root, tmp_path / "loose", RunConfig(), margin=timedelta(hours=6))
    assert loose.stats["events"]["dropped"]["outside_visit"] == {"LAB": 1} and loose.stats["events"]["clamped"] == {"LAB": 2}
    ev = read_meds(loose.out).collect()
    assert check_cohort(ev).height == 0
    assert ev.filter(pl.col("code") == "LAB/50912")["time"].to_list() == [_d(1), _d(2), _d(3)]


def test_death_inside_a_visit_moves_to_its_end(tmp_path):
    rows = [*BASE[:-1], (_d(2, 1), DEATH), BASE[-1]]
    ev = read_meds(build_cohort(_write(tmp_path / "src", [_timeline(rows)]), tmp_path / "out", RunConfig()).out).collect()
    assert ev["code"].to_list()[-2:] == ["DISCHARGE/HOME", DEATH] and ev["time"][-1] == _d(3)


def test_config_and_split_errors(tmp_path, source):
    with pytest.raises(ConfigError, match="top_n_lab"): build_cohort(source, tmp_path / "x", RunConfig(top_n_lab=0))
    root = _write(tmp_path / "src", [_timeline(BASE), _timeline(BASE, 2)], pl.DataFrame({"subject_id": [1, 2], "split": ["train", "tuning"]}))
    sp = root / meds.subject_splits_filepath
    pl.DataFrame({"subject_id": [1], "split": ["train"]}).write_parquet(sp)
    with pytest.raises(MEDSError, match=r"subject_splits.parquet: column 'subject_id': 1 subject\(s\) with events but no split"):
        build_cohort(root, tmp_path / "x", RunConfig())
    (tmp_path / "map.csv").write_text("icd9,icd10\n4280,not a code\n")
    with pytest.raises(MEDSError, match=r"map.csv: column 'icd10': target is neither an ICD10CM nor an ICD10PCS code: row 0"):
        build_cohort(root, tmp_path / "x", RunConfig(icd9_map=str(tmp_path / "map.csv")))


def test_no_subject_left_and_split_subjects_are_errors(tmp_path):
    root = _write(tmp_path / "src", [_timeline([(None, "SEX/M"), (datetime(1970, 1, 1), BIRTH)])])
    with pytest.raises(MEDSError, match=r"no subject is left in the cohort \(dropped: \{'subject_no_visit': 1\}\)"):
        build_cohort(root, tmp_path / "out", RunConfig())
    assert not (tmp_path / "out").exists()
    root = _write(tmp_path / "src2", [_timeline(BASE), _timeline(BASE, 2)])
    late = _timeline([(_d(20), "ADMISSION/URGENT"), (_d(21), "DISCHARGE/HOME")])
    (root / "data" / "tuning").mkdir()
    late.write_parquet(root / "data" / "tuning" / "0.parquet")  # subject 1 again, in another file
    with pytest.raises(MEDSError, match=r"a subject's events are not contiguous .*subject_id=1"):
        build_cohort(root, tmp_path / "out", RunConfig())


# ---------------------------------------------------------------- top n and mapping
def test_top_n_keeps_most_frequent_train_codes(demo_events, source, tmp_path):
    r = build_cohort(source, tmp_path / "out", RunConfig(seed=SEED, top_n_icd10cm=5, top_n_lab=3, top_n_atc=4, top_n_icd10pcs=2))
    train = read_meds(source, split="train").collect()
    ev = read_meds(r.out).collect()
    for cat, n in (("ICD10CM", 5), ("LAB", 3), ("ATC", 4), ("ICD10PCS", 2)):
        counts = (train.filter(pl.col("code").str.starts_with(cat + "/")).group_by("code").len()
                  .sort(["len", "code"], descending=[True, False]))
        assert set(ev.filter(pl.col("code").str.starts_with(cat + "/"))["code"]) == set(counts["code"].head(n)), cat
        st = r.stats["categories"][cat]
        assert st["top_n"] == n and st["codes_kept"] == n and st["codes_train"] == counts.height
        assert st["coverage_train"] == pytest.approx(counts["len"].head(n).sum() / counts["len"].sum(), abs=1e-6)
    lost = sum(r.stats["events"]["dropped"].get(k, {}).get(c, 0) for k in ("below_top_n", "not_in_train") for c in TOP_N_FIELDS)
    assert lost == sum(1 for c in read_meds(source).collect()["code"] if c.split("/")[0] in TOP_N_FIELDS) - \
        sum(1 for c in ev["code"] if c.split("/")[0] in TOP_N_FIELDS)
    cov = r.coverage
    assert cov.columns == ["category", "code", "count", "rank", "kept", "coverage"]
    assert cov.group_by("category").agg(ok=pl.col("coverage").is_sorted() & (pl.col("coverage").last() == 1.0))["ok"].all()


def test_icd9_and_drug_mapping_counts(demo_events, tmp_path):
    ev = demo_events
    icd = ev.filter(pl.col("code").str.starts_with("ICD10CM/")).head(300)
    foreign = pl.concat([icd.head(100).with_columns(code=pl.lit("ICD9CM/428.0")), icd.slice(100, 50).with_columns(code=pl.lit("ICD9CM/V5867")),
                         icd.slice(150, 50).with_columns(code=pl.lit("ICD9PCS/3893")), icd.slice(200, 40).with_columns(code=pl.lit("MEDICATION/MetFORMIN")),
                         icd.slice(240, 30).with_columns(code=pl.lit("NDC/00002771501")), icd.slice(270, 30).with_columns(code=pl.lit("NDC/99999999999"))])
    all_ev = pl.concat([ev, foreign]).unique(maintain_order=True).sort("subject_id", "time", nulls_last=False, maintain_order=True)
    n_extra = all_ev.height - ev.height
    src = write_meds(tmp_path / "src", all_ev, make_splits(all_ev["subject_id"].unique(), SEED))
    (tmp_path / "icd9.csv").write_text("icd9,icd10\n4280,I50.9\nICD9PCS/3893,ICD10PCS/02HV33Z\n4280,I110\n")
    (tmp_path / "drugs.csv").write_text("drug,atc\nmetformin,A10BA02\nNDC/00002771501,ATC/A10AB01\n")
    r = build_cohort(src, tmp_path / "out", RunConfig(icd9_map=str(tmp_path / "icd9.csv"), drug_map=str(tmp_path / "drugs.csv")))
    m = r.stats["mapping"]
    n = lambda code: all_ev.filter(pl.col("code") == code).height
    assert m["ICD9CM"] == {"events": n("ICD9CM/428.0") + n("ICD9CM/V5867"), "mapped": n("ICD9CM/428.0"), "unmapped": n("ICD9CM/V5867"),
                           "top_unmapped": {"ICD9CM/V5867": n("ICD9CM/V5867")}}
    assert m["ICD9PCS"]["unmapped"] == 0 and m["ICD9PCS"]["mapped"] == n("ICD9PCS/3893")
    assert m["MEDICATION"] == {"events": n("MEDICATION/MetFORMIN"), "mapped": n("MEDICATION/MetFORMIN"), "unmapped": 0, "top_unmapped": {}}
    assert m["NDC"]["unmapped"] == n("NDC/99999999999") and m["NDC"]["mapped"] == n("NDC/00002771501")
    assert sum(v["events"] for v in m.values()) == n_extra
    out = read_meds(r.out).collect()
    assert not out["code"].str.contains("ICD9|NDC|MEDICATION").any()
    assert "ICD10CM/I509" in out["code"].to_list() and "ICD10PCS/02HV33Z" in out["code"].to_list()
    assert _accounted(r.stats) and check_cohort(out).height == 0
