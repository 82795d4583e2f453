"""MEDS input/output: every validation rule on a real file, atomic writes, round trip and determinism."""
import hashlib
from datetime import datetime
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from synehr.data import BIRTH, MEDSError, events_frame, make_splits, read_meds, read_splits, write_meds, data_files


@pytest.fixture
def good():
    return events_frame({
        "subject_id": [1, 1, 1, 1, 1, 1, 2, 2, 2],
        "time": [None, "1960-03-01", "2020-05-01 10:00", "2020-05-01 12:00", "2020-05-01 12:00", "2020-05-04 09:00",
                 None, "1975-01-01", "2019-02-02 08:00"],
        "code": ["SEX/F", BIRTH, "ADMISSION/EW EMER.", "ICD10CM/E119", "LAB/50912", "DISCHARGE/HOME",
                 "SEX/M", BIRTH, "ATC/A10BA02"],
        "numeric_value": [None, None, None, None, 1.4, None, None, None, None]})


def _write_raw(tmp_path, df, name="0.parquet"):
    """A MEDS dataset folder whose one data file holds `df` exactly as given (no validation on the way in)."""
    f = tmp_path / "ds" / "data" / "train" / name
    f.parent.mkdir(parents=True)
    df.write_parquet(f)
    return tmp_path / "ds", f


def _set(df, col, i, value):
    vals = df[col].to_list()
    vals[i] = value
    return df.with_columns(pl.Series(col, vals, dtype=df.schema[col]))


BAD_CASES = {
    # name: (mutation, column, message fragment, row, subject)
    "missing column": (lambda d: d.drop("numeric_value"), "numeric_value", "missing column", None, None),
    "extra column": (lambda d: d.with_columns(unit=pl.lit("mg/dL")), "unit", "unexpected column", None, None),
    "wrong dtype": (lambda d: d.with_columns(pl.col("subject_id").cast(pl.String)), "subject_id", "has type String", None, None),
    "null subject": (lambda d: _set(d, "subject_id", 6, None), "subject_id", "null values", 6, None),
    "null code": (lambda d: _set(d, "code", 3, None), "code", "null values", 3, 1),
    "malformed code": (lambda d: _set(d, "code", 3, " ICD10CM/E119"), "code", "malformed code", 3, 1),
    "malformed ICD10CM": (lambda d: _set(d, "code", 3, "ICD10CM/E11.9"), "code", "malformed ICD10CM code", 3, 1),
    "malformed ICD10PCS": (lambda d: _set(d, "code", 3, "ICD10PCS/0DTJ4Z"), "code", "malformed ICD10PCS code", 3, 1),
    "malformed ATC": (lambda d: _set(d, "code", 8, "ATC/A10BA2"), "code", "malformed ATC code", 8, 2),
    "NaN value": (lambda d: _set(d, "numeric_value", 4, float("nan")), "numeric_value", "non-finite", 4, 1),
    "infinite value": (lambda d: _set(d, "numeric_value", 4, float("inf")), "numeric_value", "non-finite", 4, 1),
    "unsorted times": (lambda d: _set(d, "time", 5, datetime(2020, 4, 1)), "time", "not sorted", 5, 1),
    "unsorted subjects": (lambda d: pl.concat([d.slice(6), d.head(6)]), "subject_id", "not sorted", 3, 1),
    "static row after timed row": (lambda d: pl.concat([d.head(6), d.slice(7, 1), d.slice(6, 1), d.slice(8)]), "time", "not sorted", 7, 2),
    "duplicate row": (lambda d: pl.concat([d.head(5), d.slice(4)]), "code", "duplicate row", 5, 1),
    "two births": (lambda d: _set(d, "code", 2, BIRTH), "code", "more than one MEDS_BIRTH", 1, 1),
    "event before birth": (lambda d: _set(d, "time", 8, datetime(1970, 1, 1)).pipe(lambda x: x), "time", "before the subject's MEDS_BIRTH", 8, 2),
    "event in the future": (lambda d: _set(d, "time", 8, datetime(2999, 1, 1)), "time", "in the future", 8, 2),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_file_names_file_column_row_subject(tmp_path, good, case):
    mutate, column, fragment, row, subject = BAD_CASES[case]
    bad = mutate(good)
    if case == "event before birth":  # keep subject 2 sorted: its only timed event moves before its birth
        bad = pl.concat([good.head(7), bad.slice(8), good.slice(7, 1)])
        row = 7
    root, f = _write_raw(tmp_path, bad)
    with pytest.raises(MEDSError) as e:
        read_meds(root).collect()
    msg = str(e.value)
    assert msg.startswith(str(f)), msg
    assert f"column '{column}'" in msg and fragment in msg, msg
    assert e.value.source == str(f) and e.value.column == column
    if row is not None:
        assert e.value.rows[0] == row, msg
        assert f"row {row}" in msg
    if subject is not None:
        assert e.value.subjects[0] == subject and f"subject_id={subject}" in msg, msg


def test_good_file_reads_back_identical(tmp_path, good):
    root, _ = _write_raw(tmp_path, good)
    assert read_meds(root).collect().equals(good)


def test_future_check_can_be_disabled_for_date_shifted_data(tmp_path, good):
    shifted = good.with_columns(pl.col("time").dt.offset_by("100y"))
    root, _ = _write_raw(tmp_path, shifted)
    with pytest.raises(MEDSError, match="in the future"):
        read_meds(root).collect()
    assert read_meds(root, max_time=None).collect().height == len(good)


def test_write_meds_round_trip_and_meds_schema(tmp_path, good):
    splits = make_splits([1, 2], seed=0, fractions=(0.5, 0.5, 0.0))
    root = write_meds(tmp_path / "ds", good, splits, dataset_name="t")
    back = read_meds(root).collect().sort("subject_id", maintain_order=True)
    assert back.equals(good)
    for f in data_files(root):
        meds.DataSchema.validate(pq.read_table(f))
    meds.SubjectSplitSchema.validate(pq.read_table(root / meds.subject_splits_filepath))
    meds.CodeMetadataSchema.validate(pq.read_table(root / meds.code_metadata_filepath))
    assert read_splits(root).sort("subject_id").equals(splits.sort("subject_id"))


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_meds_is_deterministic(tmp_path, good):
    splits = make_splits([1, 2], seed=0, fractions=(0.5, 0.5, 0.0))
    a = _digest(write_meds(tmp_path / "a", good, splits))
    b = _digest(write_meds(tmp_path / "b", good, splits))
    assert a == b and len(a) == 5


@pytest.mark.parametrize("break_it", ["events", "splits"])
def test_failed_write_leaves_previous_dataset_intact(tmp_path, good, break_it):
    splits = make_splits([1, 2], seed=0, fractions=(0.5, 0.5, 0.0))
    root = write_meds(tmp_path / "ds", good, splits)
    before = _digest(root)
    bad_events = _set(good, "numeric_value", 4, float("nan")) if break_it == "events" else good
    bad_splits = splits.head(1) if break_it == "splits" else splits
    with pytest.raises(MEDSError):
        write_meds(root, bad_events, bad_splits)
    assert _digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left behind


def test_shards_keep_subjects_whole(tmp_path, good):
    many = pl.concat([good.with_columns(pl.col("subject_id") + 10 * k) for k in range(6)])
    root = write_meds(tmp_path / "ds", many, make_splits(many["subject_id"], seed=1), shards=2)
    seen = {}
    for f in data_files(root):
        for s in pl.read_parquet(f)["subject_id"].unique():
            assert s not in seen, f"subject {s} in {seen.get(s)} and {f}"
            seen[s] = f
    assert read_meds(root).collect().height == many.height


def test_not_a_meds_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a MEDS dataset"):
        read_meds(tmp_path)
