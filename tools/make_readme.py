"""Write README.md from nbs/index.ipynb (markdown cells verbatim, visible code cells as python blocks, their text
outputs). nbdev's own `nbdev_readme` needs the Quarto binary, which cannot be installed from PyPI here; this keeps
README.md generated from the notebook all the same. `--check` exits 1 when README.md is out of date; `--results RUN`
first copies a pipeline run's summary (RUN/eval/summary.md) and stage times into the notebook's results cell."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            parts.append(src.strip())
            continue
        lines = src.splitlines()
        flags = {l.strip()[3:].strip() for l in lines if l.strip().startswith("#|")}
        if flags & {"hide", "include: false"}:
            continue
        code = "\n".join(l for l in lines if not l.strip().startswith("#|")).strip()
        if code and "echo: false" not in flags:
            parts.append(f"```python\n{code}\n```")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/markdown" in data:
                parts.append("".join(data["text/markdown"]).strip())
            elif out.get("output_type") == "stream" or "text/plain" in data:
                parts.append("```\n" + "".join(out.get("text", data.get("text/plain", ""))).rstrip() + "\n```")
    return "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n" + \
        "\n\n".join(p for p in parts if p) + "\n"


RESULTS_HEADING = "## Results of the demo run"


def set_results(run: Path) -> None:
    """Write the demo run's own numbers (RUN/eval/summary.md, written by the pipeline's evaluation stage) and its
    stage times into the results cell of nbs/index.ipynb: the README's results are produced by the pipeline, never typed."""
    import datetime
    import subprocess
    summary = (run / "eval" / "summary.md").read_text().strip()
    times = json.loads((run / "timings.json").read_text())
    cfg = (run / "config.yaml").read_text()
    subjects = next(l.split(":")[1].strip() for l in cfg.splitlines() if l.startswith("demo_subjects:"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    order = ["data", "cohort", "tokenizer", "knowledge", "model", "generate", "kde", "audit", "evaluate"]
    stage_line = ", ".join(f"{s} {times[s]:.0f} s" for s in order if s in times)
    import polars as pl
    scores = pl.read_parquet(run / "audit" / "scores.parquet")
    n, n_kept = scores["subject_id"].n_unique(), scores.filter("kept")["subject_id"].n_unique()
    top = (pl.read_parquet(run / "audit" / "violations.parquet").filter(pl.col("severity") == "error")
           .group_by("rule_id", "kind").agg(pl.col("subject_id").n_unique().alias("records")).sort("records", "rule_id", descending=[True, False]).head(4))
    audit_line = (f"The audit kept {n_kept:,} of {n:,} synthetic records. The error rules broken by the most records: "
                  + ", ".join(f"{r} ({k}, {m:,} records)" for r, k, m in top.iter_rows()) + " (`RUN/audit/violations.parquet`).")
    text = (f"{RESULTS_HEADING}\n\nWritten by the pipeline itself (`RUN/eval/summary.md` of `synehr run -p params/demo.yaml`, "
            f"{subjects} demo subjects; copied here by `python tools/make_readme.py --results runs/demo`; commit {commit}, "
            f"{datetime.date.today().isoformat()}, 2 CPU cores). Before/after: the post-processed synthetic records and the "
            f"ones the audit kept, each against the held-out split. The full tables are in `runs/demo/eval/report.md`.\n\n"
            f"{summary}\n\n{audit_line}\n\nStage times: {stage_line}; {sum(times.values()) / 60:.1f} minutes in all.")
    nb_path = ROOT / "nbs" / "index.ipynb"
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "markdown" and "".join(c["source"]).startswith(RESULTS_HEADING)]
    if len(cells) != 1: sys.exit(f"{nb_path}: want exactly one markdown cell starting with {RESULTS_HEADING!r}, found {len(cells)}")
    lines = text.split("\n")
    cells[0]["source"] = [l + "\n" for l in lines[:-1]] + [lines[-1]]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if "--results" in sys.argv:
        set_results(Path(sys.argv[sys.argv.index("--results") + 1]).resolve())
    text = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`")
    else:
        readme.write_text(text)
