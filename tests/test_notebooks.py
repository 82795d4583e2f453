"""One pytest test per library notebook: executes it the way `nbdev_test` does (cells flagged slow/gpu skipped)."""
from configparser import ConfigParser
from pathlib import Path

import pytest
import nbdev.test as nbt

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
cfg = ConfigParser(delimiters=["="])
cfg.read(ROOT / "settings.ini")
SKIP_FLAGS = cfg["DEFAULT"].get("tst_flags", "").split()

# pipeline notebooks (2N_*) are papermill-driven and run end to end in test_pipeline.py
notebooks = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("2"))


def test_notebooks_found():
    assert {"00_core.ipynb", "01_data.ipynb", "index.ipynb"} <= {p.name for p in notebooks}


@pytest.mark.parametrize("nb", notebooks, ids=[p.stem for p in notebooks])
def test_notebook(nb):
    ok, secs = nbt.test_nb(nb, skip_flags=SKIP_FLAGS, do_print=False, showerr=True)
    assert ok, f"{nb.name} failed (see stderr for the cell and traceback)"
