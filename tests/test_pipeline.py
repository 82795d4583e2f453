"""The pipeline as a user runs it: `synehr run` on the CI parameters, end to end, and parameter errors up front."""
import ast
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from synehr.core import RunConfig
from synehr.data import read_meds, read_splits
from synehr.pipeline import STAGES, main

ROOT = Path(__file__).resolve().parent.parent


def _parameters_cell(nb_path: Path) -> dict:
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: want exactly one parameters cell, got {len(cells)}"
    tree = ast.parse("".join(cells[0]["source"]))
    return {t.targets[0].id: ast.literal_eval(t.value) for t in tree.body if isinstance(t, ast.Assign)}


def test_ci_params_are_the_notebook_defaults():
    nb = _parameters_cell(ROOT / "nbs" / "20_pipeline.ipynb")
    assert nb == yaml.safe_load((ROOT / "params" / "ci.yaml").read_text())
    assert set(nb) == set(RunConfig().to_dict()), "parameters cell and RunConfig fields differ"
    assert RunConfig.from_dict(nb) == RunConfig()


def test_every_params_file_is_a_valid_config():
    for p in sorted((ROOT / "params").glob("*.yaml")):
        RunConfig.from_yaml(p)


def _skipped(nb_path: Path) -> set:
    "The stages an executed pipeline notebook reports as up to date (skipped)."
    text = "".join("".join(o.get("text", "")) for c in json.loads(nb_path.read_text())["cells"] for o in c.get("outputs", []))
    return {s for s in STAGES if f"stage {s}: up to date" in text}


def test_cli_run_ci_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [shutil.which("synehr") or "synehr", "run", "-p", str(ROOT / "params" / "ci.yaml"), "-o", str(out)]
    # a run killed (SIGKILL, as a crash or an out-of-memory kill would) while the model trains ...
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (out / "stages" / "knowledge.json").exists():
            assert p.poll() is None, "the pipeline ended before the knowledge stage finished"
            assert time.monotonic() - t0 < 900, "the knowledge stage did not finish in 15 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (out / "stages" / "model.json").exists()
    # ... is resumed by running the same command again: the finished stages are skipped, the rest run
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run finished: {out}" in r.stdout
    assert _skipped(out / "20_pipeline.ipynb") == {"data", "cohort", "tokenizer", "knowledge"}
    assert (out / "20_pipeline.ipynb").exists() and (out / "config.yaml").exists()
    cfg = RunConfig.from_yaml(out / "config.yaml")
    assert cfg.run_dir == str(out) and cfg.demo_subjects == 300
    events = read_meds(out / "input").collect()
    assert events["subject_id"].n_unique() == 300
    splits = read_splits(out / "input")
    assert splits.group_by("split").len().sort("split")["len"].to_list() == [30, 240, 30]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(STAGES) and min(timings.values()) > 0
    # cohort: the same subjects and splits, every dropped event accounted for in stats.json
    cohort = read_meds(out / "cohort").collect()
    assert read_splits(out / "cohort").sort("subject_id").equals(splits.sort("subject_id"))
    stats = json.loads((out / "cohort" / "stats.json").read_text())
    ev = stats["events"]
    dropped = sum(n for per_category in ev["dropped"].values() for n in per_category.values())
    assert ev["input"] == events.height and ev["input"] - dropped + sum(ev["added"].values()) == ev["kept"] == cohort.height
    # tokenizer: one sequence per subject of each split, all in the vocabulary, every one starting a record
    from synehr.tokenizer import Vocab, read_tokens, check_sequences
    vocab = Vocab.load(out / "tokenizer" / "vocab.parquet")
    for split, n in (("train", 240), ("tuning", 30), ("held_out", 30)):
        tok = read_tokens(out / "tokens", split)
        assert tok.height == n and check_sequences(tok, vocab).height == 0
    # knowledge: both embeddings aligned row for row with the vocabulary, PAD zero, real codes non-zero
    import numpy as np
    hier, sem = np.load(out / "knowledge" / "hierarchy.npy"), np.load(out / "knowledge" / "semantic.npy")
    assert hier.shape[0] == sem.shape[0] == len(vocab) and sem.shape[1] == 384
    assert not sem[0].any() and not hier[0].any()
    code_rows = vocab.table.filter(pl.col("code").str.starts_with("ICD10CM/"))["token_id"].to_numpy()
    assert hier[code_rows].any(axis=1).all() and sem[code_rows].any(axis=1).all()
    # model: trained, its best tuning loss below the untrained log V, knowledge fused
    summary = json.loads((out / "model" / "summary.json").read_text())
    assert summary["best_loss"] < np.log(len(vocab)) - 1
    mcfg = json.loads((out / "model" / "model_config.json").read_text())
    assert mcfg["use_hierarchy"] and mcfg["use_semantic"] and mcfg["V"] == len(vocab)
    # generation: every record accounted for; finished ones decoded to a MEDS dataset the meds schema accepts
    from synehr.generate import read_generated
    raw = read_generated(out / "synthetic" / "raw")
    assert raw.height == 48 and raw["subject_id"].min() >= 10**9
    synth = read_meds(out / "synthetic" / "meds", max_time=None).collect()
    assert set(synth["subject_id"].unique()) == set(raw.filter("finished")["subject_id"])
    post = read_meds(out / "synthetic" / "kde", max_time=None).collect()
    # KDE moves values and times, not events (equal results redrawn to one value at one time merge into one row)
    assert post.join(synth.select("subject_id", "code").unique(), on=["subject_id", "code"], how="anti").height == 0
    assert 0 <= synth.height - post.height <= 0.01 * synth.height
    assert (out / "figures" / "train_loss.png").stat().st_size > 10_000
    assert (out / "figures" / "cohort_coverage.png").stat().st_size > 10_000
    assert (out / "figures" / "rgcn_link_prediction.png").stat().st_size > 10_000
    # audit: every post-processed record scored by the rules and the critic; the kept ones are exactly those passing both
    scores = pl.read_parquet(out / "audit" / "scores.parquet")
    n_post = post["subject_id"].n_unique()
    assert scores.group_by("judge").len().sort("judge").rows() == [("critic", n_post), ("rules", n_post)]
    kept = scores.group_by("subject_id").agg(pl.col("passed").all()).filter("passed")["subject_id"]
    audited = read_meds(out / "synthetic" / "audited", max_time=None).collect()
    assert set(audited["subject_id"].unique()) == set(kept) == set(scores.filter("kept")["subject_id"])
    effects = pl.read_parquet(out / "audit" / "effects.parquet")
    assert {"rules score", "critic score", "rule violations"} <= set(effects["measure"]) and set(effects["stage"]) == {"before", "after"}
    # evaluation: finite metrics for both sets and the seed's comparison, and a report that names them
    import math
    doc = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(doc["sets"]) == {"before audit", "after audit", "seed_way"} or (len(kept) < 2 and set(doc["sets"]) == {"before audit", "seed_way"})
    for name, m in doc["sets"].items():
        assert m and all(math.isfinite(v) for v in m.values()), name
    for key in ("fidelity.unigram.r2", "utility.n_evaluated", "privacy.mia_f1", "privacy.copy_rate_synthetic"):
        assert key in doc["sets"]["before audit"], key
    assert "## Headline" in (out / "eval" / "report.md").read_text()
    assert main(["report", str(out)]) == 0
    # a stage whose marker is gone (killed before it finished) runs again, and only it and the stages after it;
    # the run is deterministic, so it writes the same records
    (out / "stages" / "kde.json").unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _skipped(out / "20_pipeline.ipynb") == {"data", "cohort", "tokenizer", "knowledge", "model", "generate"}
    assert read_meds(out / "synthetic" / "kde", max_time=None).collect().equals(post)


@pytest.mark.parametrize("yaml_text, fragment", [
    ("seed: 1\nsubjects: 5\n", "unknown config key(s) ['subjects']"),
    ("seed: one\n", "'seed' must be int"),
    ("data: /no/such/meds\n", "config field 'data'"),
    ("split_fractions: [0.5, 0.5, 0.5]\n", "summing to 1"),
])
def test_bad_params_fail_before_any_work(tmp_path, capsys, yaml_text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    assert main(["run", "-p", str(p), "-o", str(tmp_path / "run")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_validate_command(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 1
    assert "not a MEDS dataset" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["keep", "one-arena", "system"])
def test_kernel_gets_the_malloc_settings(tmp_path, monkeypatch, setting):
    "The pipeline's notebook kernel starts with the glibc malloc settings SYNEHR_MALLOC names in its environment (core.malloc_env)."
    import nbformat
    import papermill as pm
    from synehr.pipeline import _local_kernel_manager
    monkeypatch.setenv("SYNEHR_MALLOC", setting)
    for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"): monkeypatch.delenv(k, raising=False)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, synehr.core as c\nprint([os.environ.get(k) for k in ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')], c.MALLOC_TUNED)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "probe.ipynb")
    (tmp_path / "sock").mkdir(mode=0o700)
    out = pm.execute_notebook(str(tmp_path / "probe.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                              kernel_manager_class=_local_kernel_manager(tmp_path / "sock"))
    text = out.cells[0].outputs[0]["text"].strip()
    assert text == ("[None, '0', '2147483647'] True" if setting == "keep" else "['1', '0', '2147483647'] True" if setting == "one-arena"
                    else "[None, None, None] False"), text
