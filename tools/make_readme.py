"""Write README.md from nbs/index.ipynb (markdown cells verbatim, visible code cells as python blocks, their text
outputs). nbdev's own `nbdev_readme` needs the Quarto binary, which cannot be installed from PyPI here; this keeps
README.md generated from the notebook all the same. `--check` exits 1 when README.md is out of date."""
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


if __name__ == "__main__":
    text = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`")
    else:
        readme.write_text(text)
