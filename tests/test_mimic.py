"""The meds_etl MIMIC-IV adapter on a fixture made by the real meds_etl 0.3.11: mapping, counts, visits, MEDS output, errors."""
import json
import shutil
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from synehr.data import MEDSError, read_codes, read_meds, read_splits
from synehr.mimic import from_meds_etl_mimic, meds_etl_files

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "meds_etl_mimic"


@pytest.fixture(scope="module")
def source():
    return pl.read_parquet(FIXTURE / "data" / "*.parquet")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("mimic") / "meds"
    rep = from_meds_etl_mimic(FIXTURE, dst, seed=3)
    return rep, dst, read_meds(dst, max_time=None).collect()


def _src(source, prefix):
    return source.filter(pl.col("code").str.starts_with(prefix + "/"))


def test_output_is_valid_meds(converted):
    rep, dst, out = converted
    for f in sorted((dst / "data").rglob("*.parquet")):
        meds.DataSchema.validate(pq.read_table(f))
    meds.CodeMetadataSchema.validate(pq.read_table(dst / meds.code_metadata_filepath))
    meds.SubjectSplitSchema.validate(pq.read_table(dst / meds.subject_splits_filepath))
    meta = json.loads((dst / meds.dataset_metadata_filepath).read_text())
    assert (meta["dataset_name"], meta["dataset_version"]) == ("MIMIC-IV", "2.2")
    assert set(read_splits(dst)["subject_id"]) == set(out["subject_id"]) == set(range(10000001, 10000007))
    assert set(read_codes(dst)["code"]) == set(out["code"])


def test_codes_are_in_kit_namespaces(converted):
    _, _, out = converted
    ns = out.select(pl.when(pl.col("code").str.starts_with("MEDS_")).then(pl.col("code"))
                    .otherwise(pl.col("code").str.splitn("/", 2).struct.field("field_0")))["code"]
    assert set(ns) == {"MEDS_BIRTH", "MEDS_DEATH", "SEX", "RACE", "MARITAL_STATUS", "ADMISSION", "DISCHARGE", "ICD10CM",
                       "ICD10PCS", "ICD9CM", "ICD9PCS", "LAB", "NDC", "MEDICATION"}
    assert not out["code"].str.contains(r"^ICD.*\.").any()  # no dots left


def test_one_to_one_mappings_keep_subject_time_and_values(source, converted):
    _, _, out = converted
    key = ["subject_id", "time", "code"]
    for prefix, ns in (("ICD10CM", "ICD10CM"), ("ICD9CM", "ICD9CM"), ("ICD9Proc", "ICD9PCS"), ("ICD10PCS", "ICD10PCS"), ("NDC", "NDC")):
        want = (_src(source, prefix).select(key).with_columns(
            code=pl.lit(ns + "/") + pl.col("code").str.splitn("/", 2).struct.field("field_1").str.replace_all(".", "", literal=True))
            .unique().sort(key))
        got = out.filter(pl.col("code").str.starts_with(ns + "/")).select(key).sort(key)
        assert got.equals(want), prefix
    labs_in = _src(source, "MIMIC_IV_LABITEM").select("subject_id", "time", code=pl.col("code").str.replace("MIMIC_IV_LABITEM/", "LAB/"),
                                                      numeric_value="numeric_value", text_value="text_value").sort(key + ["numeric_value"])
    labs_out = out.filter(pl.col("code").str.starts_with("LAB/")).select(labs_in.columns).sort(key + ["numeric_value"])
    assert labs_out.equals(labs_in)
    assert sorted(labs_out["text_value"].drop_nulls()) == ["NEG", "___"]
    # only labs carry values (prescription doses are dropped)
    assert out.filter(~pl.col("code").str.starts_with("LAB/"), pl.col("numeric_value").is_not_null()).height == 0


def test_demographics(converted):
    _, _, out = converted
    static = out.filter(pl.col("time").is_null())
    assert static.filter(pl.col("code").str.starts_with("SEX/")).group_by("subject_id").len()["len"].to_list() == [1] * 6
    race = dict(static.filter(pl.col("code").str.starts_with("RACE/")).select("subject_id", "code").iter_rows())
    assert race == {10000001: "RACE/WHITE", 10000002: "RACE/WHITE", 10000003: "RACE/BLACK/AFRICAN AMERICAN",
                    10000005: "RACE/HISPANIC/LATINO - PUERTO RICAN", 10000006: "RACE/ASIAN"}
    mar = out.filter(pl.col("code").str.starts_with("MARITAL_STATUS/"))
    first_adm = out.filter(pl.col("code").str.starts_with("ADMISSION/")).group_by("subject_id").agg(adm=pl.col("time").min())
    j = mar.join(first_adm, on="subject_id")
    assert j.height == mar.height == 5 and (j["time"] == j["adm"]).all()
    assert dict(mar.select("subject_id", "code").iter_rows())[10000003] == "MARITAL_STATUS/SINGLE"
    assert out.filter(pl.col("code") == "MEDS_BIRTH").height == 6 and out.filter(pl.col("code") == "MEDS_DEATH").height == 3


def test_exactly_one_discharge_per_admission(source, converted):
    rep, _, out = converted
    adm_src = _src(source, "MIMIC_IV_Admission").sort("subject_id", "time")
    adm = out.filter(pl.col("code").str.starts_with("ADMISSION/")).sort("subject_id", "time")
    dis = out.filter(pl.col("code").str.starts_with("DISCHARGE/")).sort("subject_id", "time")
    assert adm.height == dis.height == adm_src.height == 8
    assert dis.select("subject_id", "time").equals(adm_src.select("subject_id", time="end"))
    loc = dict(zip(zip(dis["subject_id"], dis["time"].dt.strftime("%Y-%m-%d")), dis["code"]))
    assert loc[(10000002, "2161-03-09")] == "DISCHARGE/DIED"  # from the location row
    assert loc[(10000006, "2180-11-05")] == "DISCHARGE/DIED"  # no location row, died that day
    assert loc[(10000003, "2145-01-11")] == "DISCHARGE/UNKNOWN"  # no location row, alive
    assert loc[(10000005, "2155-06-10")] == "DISCHARGE/HOME"  # death months later does not matter
    assert rep.discharges == {"location": 6, "died": 1, "unknown": 1}


def test_every_source_row_is_counted(source, converted):
    rep, _, out = converted
    p = rep.prefixes
    assert rep.rows_in == source.height == int(p["rows_in"].sum())
    assert rep.rows_out == out.height == int(p["rows_out"].sum())
    by = {r["prefix"]: r for r in p.iter_rows(named=True)}
    counts = source.group_by(pl.col("code").str.splitn("/", 2).struct.field("field_0").alias("prefix")).len()
    for prefix, n in counts.iter_rows():
        assert by[prefix]["rows_in"] == n, prefix
    for prefix in ("MIMIC_IV_ITEM", "MIMIC_IV_Transfer", "MIMIC_IV_Service", "MIMIC_IV_OMR", "HCPCS", "HCFA",
                   "MIMIC_IV_Insurance", "MIMIC_IV_Language", "MIMIC_IV_Admission_Location", "MIMIC_IV_MicrobiologyTest"):
        assert (by[prefix]["action"], by[prefix]["rows_out"], by[prefix]["dropped"]) == ("dropped", 0, by[prefix]["rows_in"])
    assert rep.drops == {"malformed": 0, "no_time": 0, "before_birth": 0, "duplicate": 1}
    assert by["ICD10CM"]["rows_in"] - by["ICD10CM"]["rows_out"] == 1
    saved = json.loads((Path(rep.dest) / "metadata" / "adapter_report.json").read_text())
    assert saved["rows_out"] == rep.rows_out and len(saved["prefixes"]) == p.height
    assert "AdapterReport" in rep._repr_markdown_()


def test_deterministic_and_seeded(tmp_path, converted):
    _, dst, _ = converted
    from_meds_etl_mimic(FIXTURE, tmp_path / "a", seed=3)
    for f in sorted((dst / "data").rglob("*.parquet")):
        assert f.read_bytes() == (tmp_path / "a" / f.relative_to(dst)).read_bytes()
    assert read_splits(tmp_path / "a").equals(read_splits(dst))


def test_bad_rows_are_dropped_and_counted(tmp_path, source):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    for f in (src / "data").glob("*.parquet"): f.unlink()
    birth = source.filter(pl.col("code") == "MEDS_BIRTH", pl.col("subject_id") == 10000004)["time"].item()
    extra = source.filter(pl.col("subject_id") == 10000004).head(1).with_columns(
        code=pl.lit("ICD10CM/not a code"), time=birth)  # malformed ICD-10-CM
    early = source.filter(pl.col("subject_id") == 10000004, pl.col("code").str.starts_with("MIMIC_IV_LABITEM")).head(1).with_columns(
        time=birth.replace(year=birth.year - 1))  # a lab before birth
    pl.concat([source, extra, early]).sort("subject_id", "time").write_parquet(src / "data" / "data_0.parquet")
    rep = from_meds_etl_mimic(src, tmp_path / "out")
    assert rep.drops == {"malformed": 1, "no_time": 0, "before_birth": 1, "duplicate": 1}
    assert rep.rows_in == source.height + 2


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.drop("end"), "column 'end': missing column"),
    (lambda df: df.drop("code"), "column 'code': missing column"),
    (lambda df: df.with_columns(pl.col("subject_id").cast(pl.String)), "column 'subject_id': has type String, expected an integer"),
    (lambda df: df.with_columns(pl.col("numeric_value").cast(pl.String)), "column 'numeric_value': has type String"),
    (lambda df: df.with_columns(code=pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise("code")),
     "column 'code': null values: row 7 (subject_id="),
])
def test_broken_source_errors_name_file_column_row(tmp_path, mutate, message):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    f = src / "data" / "data_1.parquet"
    mutate(pl.read_parquet(f)).write_parquet(f)
    with pytest.raises(MEDSError, match="data_1.parquet") as e:
        from_meds_etl_mimic(src, tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_not_a_meds_etl_folder(tmp_path):
    with pytest.raises(MEDSError, match="no parquet files"):
        meds_etl_files(tmp_path)
    shutil.copytree(FIXTURE, tmp_path / "other")
    (tmp_path / "other" / "metadata" / "dataset.json").write_text(json.dumps({"etl_name": "MEDS_transforms"}))
    with pytest.raises(MEDSError, match="etl_name.*not a meds_etl MIMIC-IV output"):
        meds_etl_files(tmp_path / "other")


def test_keep_unmapped_keeps_other_prefixes_verbatim(tmp_path, source, converted):
    rep, _, _ = converted
    rep2 = from_meds_etl_mimic(FIXTURE, tmp_path / "all", seed=3, keep_unmapped=True)
    out = read_meds(tmp_path / "all", max_time=None).collect()
    assert out.filter(pl.col("code").str.starts_with("MIMIC_IV_ITEM/")).height == _src(source, "MIMIC_IV_ITEM").height
    assert not out["code"].str.starts_with("MIMIC_IV_Discharge_Location/").any()
    assert rep2.rows_out - rep.rows_out == int(rep.prefixes.filter(pl.col("action") == "dropped")["rows_in"].sum())
