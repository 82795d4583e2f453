"""The docs build (tools/build_docs.py): nbdev's processors document the exported module without executing a lesson,
and the pages keep Quarto's cell options, a contents entry per documented name and links between local pages.
The whole site is built by .ci/run's docs step; these are the parts a silent regression would hide."""
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_docs  # noqa: E402


def _cell(kind, src, outputs=None):
    c = {"cell_type": kind, "metadata": {}, "source": src}
    if kind == "code": c.update(outputs=outputs or [], execution_count=None)
    return c


def _nb(cells):
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def test_processors_document_the_module_and_execute_no_lesson(tmp_path):
    from synehr.core import make_key
    ran = tmp_path / "lesson_ran"
    nb = _nb([
        _cell("markdown", "# tiny\n\n> A notebook made by the test."),
        _cell("code", "#| default_exp core"),
        # a stand-in body: the page must show the module's make_key (its real docstring), never this source
        _cell("code", '#| export\ndef make_key(seed, name):\n    "STAND-IN DOCSTRING"\n    return None'),
        _cell("code", "#| hide\nHIDDEN_MARKER = 1"),
        # a lesson that mixes an import with work: nbdev's exec_show_docs would run it, this build must not
        _cell("code", f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\nLESSON_MARKER = 2"),
    ])
    src, dst = tmp_path / "00_tiny.ipynb", tmp_path / "proc.ipynb"
    src.write_text(json.dumps(nb))
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import build_docs; " \
           f"err = build_docs.process_notebook({str(src)!r}, {str(dst)!r}); print(err or ''); sys.exit(1 if err else 0)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not ran.exists(), "the docs build executed a lesson cell"
    meta, md = build_docs.notebook_markdown(json.loads(dst.read_text()))
    assert meta["title"] == "tiny" and meta["description"] == "A notebook made by the test."
    assert meta["output-file"] == "tiny.html"  # nbdev's page name: numeric prefix dropped
    assert "### make_key" in md and make_key.__doc__.splitlines()[0] in md
    assert "STAND-IN" not in md and "HIDDEN_MARKER" not in md and "default_exp" not in md
    assert "LESSON_MARKER = 2" in md  # the lesson's source is shown, as written
    assert "synehr/core.py#L" in md and "#LNone" not in md  # source link with a line number


def test_page_keeps_cell_options_toc_and_outputs(tmp_path):
    shown_doc = "---\n\n### shown_fn\n\n```python\ndef shown_fn(x)\n```\n\n*Does a thing.*"
    nb = _nb([
        _cell("raw", "---\ntitle: page\ndescription: what it is\noutput-file: page.html\n---\n"),
        _cell("markdown", "## Section one\n\nSee [the other](01_other.ipynb#part) and [a name](https://synehr.github.io/synehr/core.html#make_key)."),
        _cell("code", "#| echo: false\n#| output: asis\nshow_doc(shown_fn)",
              [{"output_type": "execute_result", "data": {"text/markdown": shown_doc, "text/plain": "x"}, "metadata": {}, "execution_count": None}]),
        _cell("code", "#| include: false\nNOT_ON_THE_PAGE = 1"),
        _cell("code", "#| output: false\nprint('QUIET OUTPUT')", [{"output_type": "stream", "name": "stdout", "text": "QUIET OUTPUT\n"}]),
        _cell("code", "print(1 + 1)", [{"output_type": "stream", "name": "stdout", "text": "2\n"}]),
    ])
    meta, md = build_docs.notebook_markdown(nb)
    assert "show_doc(shown_fn)" not in md and "NOT_ON_THE_PAGE" not in md and md.count("QUIET OUTPUT") == 1
    page = build_docs.render_page(build_docs.pandoc_path(), _template(tmp_path), meta, md)
    page = build_docs.local_links(page, "https://synehr.github.io/synehr", {"01_other.ipynb": "other.html"})
    assert '<h1>page</h1>' in page and "what it is" in page
    assert 'href="#shown_fn"' in page and 'id="shown_fn"' in page  # a contents entry for the documented name
    assert 'href="other.html#part"' in page and 'href="core.html#make_key"' in page and "synehr.github.io" not in page
    assert '<div class="cell-output cell-output-stdout">\n<pre><code>2</code></pre>' in page
    assert "print" in page and "<script" not in page  # highlighted code; nothing to fetch or run


def _template(tmp_path):
    t = tmp_path / "template.html"
    t.write_text(build_docs._TEMPLATE)
    return t


def test_sidebar_marks_the_current_page():
    html = build_docs.sidebar_html([("index.html", "synehr", "home"), ("core.html", "core", "a <b> & c")], "core.html")
    assert '<a href="core.html" class="active" aria-current="page" title="a &lt;b&gt; &amp; c">core</a>' in html
    assert '<a href="index.html" title="home">synehr</a>' in html


def test_docstring_italics_survive_an_asterisk():
    # nbdev sets the docstring's first line as *line*; a bare `*` in it would end the italics early
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import build_docs; build_docs._patch_showdoc(); " \
           "import fastcore.docments as fd; print(repr(fd._ital_first('x / rms(x) * scale, `a*b` kept \\nmore * here')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == repr("*x / rms(x) \\* scale, `a*b` kept*\nmore * here")
