"""The audit stage's wiring: the LLM judge served by the run itself (judge_gguf) through llama.cpp on 127.0.0.1, with
the packaged SmolLM2-135M model (plumbing only), its shards resumed, and too few records refused with a clear error."""

import polars as pl
import pytest

from synehr.audit import _llm_scores, audit_stage
from synehr.core import RunConfig, RunDir
from synehr.data import read_codes, read_meds
from synehr.demo import write_demo_cohort
from synehr.judge import STATUSES, packaged_gguf
from synehr.rules import SCORES_SCHEMA


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    src = write_demo_cohort(tmp_path_factory.mktemp("audit") / "demo", 6, seed=5)
    ev = read_meds(src).collect()
    short = ev.filter(pl.int_range(pl.len()).over("subject_id") < 12)  # short timelines: short prompts on a CPU
    ids = short["subject_id"].unique().sort()
    return short.filter(pl.col("subject_id").is_in(ids.head(3).implode())), short.filter(pl.col("subject_id").is_in(ids.tail(3).implode())), read_codes(src)


def test_llm_judge_served_by_the_run(demo, tmp_path):
    try: gguf = packaged_gguf()
    except FileNotFoundError as e: pytest.fail(f"the test model is missing: {e}")
    synth, ref, codes = demo
    run = RunDir(tmp_path / "run")
    cfg = RunConfig(run_dir=str(run.root), judge_gguf=str(gguf), judge_max_records=2, seed=1)
    s, r = _llm_scores(run, cfg, synth, ref, codes)
    for frame, ev in ((s, synth), (r, ref)):
        assert frame.schema == pl.Schema(SCORES_SCHEMA) and frame.height == 2  # judge_max_records of each, drawn with the seed
        assert set(frame["subject_id"]) <= set(ev["subject_id"]) and set(frame["judge"]) == {"llm"}
        assert set(frame["status"]) <= set(STATUSES)
        ok = frame.filter(pl.col("status") == "ok")
        assert ok["score"].is_between(1, 10).all() and (ok["passed"] == (ok["score"] >= cfg.judge_threshold)).all()
    assert sorted(p.name for p in (run.audit / "judge").iterdir()) == ["reference", "synthetic"]
    # the same records again: every finished shard is reused (the server is started, asked nothing new)
    s2, r2 = _llm_scores(run, cfg, synth, ref, codes)
    assert s2.equals(s) and r2.equals(r)


def test_too_few_records_is_a_clear_error(tmp_path):
    from synehr.cohort import build_cohort
    from synehr.data import write_meds
    from synehr.tokenizer import fit_vocab
    run = RunDir(tmp_path / "run")
    cfg = RunConfig(run_dir=str(run.root))
    build_cohort(write_demo_cohort(run.input, 40, seed=0), run.cohort, cfg)
    fit_vocab(run.cohort, cfg=cfg).save(run.tokenizer / "vocab.parquet")
    ev = read_meds(run.cohort, "train").collect()
    one = ev.filter(pl.col("subject_id") == ev["subject_id"].min())
    write_meds(run.synthetic / "kde", one, pl.DataFrame({"subject_id": [one["subject_id"][0]], "split": ["train"]}), max_time=None)
    with pytest.raises(ValueError, match="1 synthetic records are too few to audit"):
        audit_stage(run, cfg)
