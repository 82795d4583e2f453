"""Build the documentation site `_docs/` from the notebooks in `nbs/`, offline.

`nbdev_docs` renders with Quarto, and Quarto cannot be installed here: PyPI's `quarto-cli` is a source package whose
build downloads the Quarto binary from GitHub, and no Debian or npm package ships it (nbdev itself, finding no
`quarto`, would try to `curl` an installer with `sudo`). So this script does the two halves of `nbdev_docs` itself:

1. nbdev's own notebook processors (`nbdev.processors.FilterDefaults`: front matter from the `# title` and
   `> description` cell, `#| export` source hidden and a `show_doc` entry for each exported name, `#| hide` cells
   dropped, links to documented names, ...) write processed notebooks to `_proc/`, as `nbdev_proc_nbs` would.
   One processor differs: nbdev's `exec_show_docs` re-runs every exported cell *and every cell that imports
   anything* (lesson cells included, see nbdev's FAQ) to get the objects to document. Here the objects come from the
   module the notebook exports (`synehr/<default_exp>.py`, which CI checks is exactly what the notebooks export),
   and only the `show_doc` cells run: the docs build never executes a lesson, and a signature naming a class
   defined further down the notebook resolves as it does in the module. nbdev also inserts the `show_doc` cells of
   one export cell in reverse order; here they keep the order of the definitions.
2. pandoc (the binary that the `pypandoc-binary` wheel ships) turns each processed notebook into an HTML page with
   the site's sidebar (nbdev's order: index first, then by file name), a contents list and `nbs/styles.css`.
   Quarto's cell options are honoured (`#| echo: false`, `#| output: false`, `#| include: false`,
   `#| output: asis`); pages show the outputs saved in the notebooks; nothing is executed and nothing is fetched
   (maths is MathML, no script or font comes from a CDN).

The site is written to a temporary folder and then swapped into `_docs/` whole. A notebook that fails is named with
its error, its page is left out and the script exits 1.
`python tools/build_docs.py [--workers N] [--reuse-proc]` (`--reuse-proc`: skip step 1, render the `_proc/` of the
last run; for working on the look).
"""
from __future__ import annotations

import argparse
import html
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- 1. nbdev processors
def _filter_cls():
    "nbdev's default processors, with `exec_show_docs` taking the objects from the exported module."
    from nbdev.config import get_config
    from nbdev.process import Processor
    from nbdev.processors import FilterDefaults, _default_exp, _show_docs, add_show_docs, cell_lang, exec_show_docs

    lib = get_config().lib_name

    class show_docs_in_order(Processor):
        "Put the `show_doc` cells that `add_show_docs` inserted after one export cell in the order of its definitions."
        def begin(self):
            cells, out, i = list(self.nb.cells), [], 0
            while i < len(cells):
                j = i
                while j < len(cells) and getattr(cells[j], "has_sd", False): j += 1
                if j > i: out.extend(reversed(cells[i:j])); i = j
                else: out.append(cells[i]); i += 1
            self.nb.cells = out

    class exec_show_docs_from_module(exec_show_docs):
        "`exec_show_docs` on the exported module's objects: only `show_doc` (and `#| exec_doc`) cells are run."
        def begin(self):
            super().begin()
            mod = _default_exp(self.nb)
            if not hasattr(self, "k") or not mod: return
            self.k.run_cell(f"import importlib as _il; _m = _il.import_module('{lib}.{mod}')\n"
                            "globals().update({k: v for k, v in vars(_m).items() if not k.startswith('__')})")
            if self.k.exc: raise RuntimeError(f"cannot import {lib}.{mod} to document it") from self.k.exc

        def __call__(self, cell):
            if cell.cell_type != "code" or not cell.source or cell_lang(cell) != "python": return
            if "exec_doc" in cell.directives_ or _show_docs(cell.parsed_()): return super().__call__(cell)

    class DocsFilter(FilterDefaults):
        def base_procs(self):
            procs = [exec_show_docs_from_module if p is exec_show_docs else p for p in super().base_procs()]
            return procs[:procs.index(add_show_docs) + 1] + [show_docs_in_order] + procs[procs.index(add_show_docs) + 1:]

    return DocsFilter


def _patch_showdoc():
    """Three fixes to nbdev's `show_doc`, in the docs worker only.
    - A class whose metaclass defines `__call__` (every flax NNX module) would be shown with the metaclass's
      `(*args: Any, **kwargs: Any)`, whose string annotations do not even resolve (NameError): show its `__init__`.
    - The source link's line number is looked up by the bare name (`f`), but an object imported from its module is
      named `synehr.mod.f`: look that up without the module prefix.
    - The docstring's first line is set in italics as `*line*`, so a `*` in it (`x / rms(x) * scale`) ends the
      italics early and leaves a stray asterisk: escape the `*`s outside code spans."""
    import fastcore.docments as fd
    import nbdev.doclinks as dl
    if getattr(fd.signature, "_synehr_docs", False): return
    sig0, lineno0 = fd.signature, dl._lineno

    def signature(sym, *args, **kwargs):
        if isinstance(sym, type) and type(sym).__call__ is not type.__call__ and "__init__" in dir(sym):
            sig = sig0(sym.__init__, *args, **kwargs)
            return sig.replace(parameters=list(sig.parameters.values())[1:])
        return sig0(sym, *args, **kwargs)

    def _lineno(sym, fname):
        line = lineno0(sym, fname)
        mod = fname[:-3].replace("/", ".") + "." if fname and fname.endswith(".py") else None
        if line is None and mod and isinstance(sym, str) and sym.startswith(mod): line = lineno0(sym[len(mod):], fname)
        return line

    def _ital_first(s: str) -> str:
        lead, first, rest = re.match(r"(\s*)([^\n]*)(.*)", s, re.S).groups()
        first = "".join(p if p.startswith("`") else p.replace("*", r"\*") for p in re.split(r"(`[^`]*`)", first)).rstrip()
        return f"{lead}*{first}*{rest}" if first.strip() else s

    signature._synehr_docs = True
    fd.signature, dl._lineno, fd._ital_first = signature, _lineno, _ital_first


def process_notebook(src: str, dst: str) -> str | None:
    "Run the processors on one notebook (in a worker process); the error text, or None."
    try:
        os.chdir(ROOT)
        os.environ["IN_TEST"] = "1"  # as nbdev's own worker (serve_drv) sets it
        from execnb.nbio import read_nb, write_nb
        _patch_showdoc()
        nb = read_nb(src)
        _filter_cls()()(nb)
        write_nb(nb, dst)
    except BaseException as e:  # reported with the notebook's name by the caller
        import traceback
        return "".join(traceback.format_exception(e))[-3000:]


# ---------------------------------------------------------------------------------------------------- 2. pandoc pages
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _src(x) -> str: return "".join(x) if isinstance(x, list) else (x or "")


def _fence(text: str, cls: str = "") -> str:
    "A fenced block longer than any backtick run inside `text`."
    n = max([3] + [len(m) + 1 for m in re.findall(r"`{3,}", text)])
    return f"{'`' * n}{cls}\n{text.rstrip()}\n{'`' * n}"


def _options(source: str) -> tuple[dict, str]:
    "Quarto cell options (`#| key: value` lines at the top) and the code without them."
    opts, lines = {}, source.splitlines()
    while lines and (m := _DIRECTIVE.match(lines[0])):
        opts[m.group(1)] = m.group(2).strip("'\"").lower()
        lines.pop(0)
    return opts, "\n".join(lines).strip("\n")


def _output_md(out: dict, asis: bool) -> tuple[str, bool]:
    "One output as pandoc markdown, and whether it belongs in the cell's box (markdown and `asis` text do not)."
    kind = out.get("output_type")
    if kind == "stream":
        text = _ANSI.sub("", _src(out.get("text")))
        return (text, False) if asis else (f"::: {{.cell-output .cell-output-{out.get('name', 'stdout')}}}\n{_fence(text)}\n:::", True)
    if kind == "error":
        return "::: {.cell-output .cell-output-error}\n" + _fence(_ANSI.sub("", "\n".join(out.get("traceback", [])))) + "\n:::", True
    data = out.get("data", {})
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            b64 = _src(data[mime]).replace("\n", "")
            return f'::: {{.cell-output-display}}\n```{{=html}}\n<img src="data:{mime};base64,{b64}" alt="output">\n```\n:::', True
    if "image/svg+xml" in data:
        return "::: {.cell-output-display}\n" + _fence(_src(data["image/svg+xml"]), "{=html}") + "\n:::", True
    if "text/markdown" in data: return _src(data["text/markdown"]), False
    if "text/html" in data:
        return "::: {.cell-output-display}\n" + _fence(_src(data["text/html"]), "{=html}") + "\n:::", True
    if "text/plain" in data:
        return "::: {.cell-output .cell-output-display}\n" + _fence(_ANSI.sub("", _src(data["text/plain"]))) + "\n:::", True
    return "", True


def notebook_markdown(nb: dict) -> tuple[dict, str]:
    "A processed notebook as (front matter, pandoc markdown)."
    meta, parts = {}, []
    for cell in nb["cells"]:
        source = _src(cell.get("source"))
        if cell["cell_type"] == "raw":
            m = re.match(r"^\s*---\n(.*?)\n---\s*$", source, re.S)
            if m and not meta: meta = yaml.safe_load(m.group(1)) or {}
            continue
        if cell["cell_type"] == "markdown":
            parts.append(source)
            continue
        opts, code = _options(source)
        if opts.get("include") == "false": continue
        # (markdown, inside the cell's box?): markdown outputs (show_doc's) stay outside, so that their headings
        # are sections of the page and entries of its contents list, as Quarto makes them
        chunks = []
        if code.strip() and opts.get("echo") != "false": chunks.append((_fence(code, "python"), True))
        if opts.get("output") != "false":
            chunks += [c for c in (_output_md(out, opts.get("output") == "asis") for out in cell.get("outputs", [])) if c[0]]
        for boxed, group in itertools.groupby(chunks, key=lambda c: c[1]):
            text = "\n\n".join(c[0] for c in group)
            parts.append("::: {.cell}\n" + text + "\n:::" if boxed else text)
    return meta, "\n\n".join(parts) + "\n"


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="nbdev processors + pandoc (tools/build_docs.py)">
$if(description)$<meta name="description" content="$description$">$endif$
<title>$pagetitle$ – @@SITE@@</title>
<link rel="stylesheet" href="styles.css">
$if(highlighting-css)$<style>
$highlighting-css$
</style>$endif$
</head>
<body>
<header class="navbar"><a class="brand" href="index.html">@@SITE@@</a><span class="tagline">@@TAGLINE@@</span>
<a class="repo" href="@@REPO@@">source</a></header>
<div class="layout">
<nav class="sidebar" aria-label="pages">@@SIDEBAR@@</nav>
<main class="content">
<header class="page-title"><h1>$title$</h1>
$if(description)$<p class="description">$description$</p>$endif$
</header>
$body$
</main>
$if(toc)$<nav class="toc" aria-label="on this page"><h2>On this page</h2>
$table-of-contents$
</nav>$endif$
</div>
</body>
</html>
"""


def pandoc_path() -> str:
    try:
        import pypandoc
        return pypandoc.get_pandoc_path()
    except (ImportError, OSError):
        if p := shutil.which("pandoc"): return p
        sys.exit("pandoc not found: pip install pypandoc-binary (a dev requirement in settings.ini)")


def render_page(pandoc: str, template: Path, meta: dict, md: str) -> str:
    title = str(meta.get("title") or "")
    args = [pandoc, "--from=markdown", "--to=html5", "--standalone", f"--template={template}", "--mathml",
            "--toc", "--toc-depth=3", "--columns=1000", "--syntax-highlighting=pygments", "--section-divs",
            f"--metadata=pagetitle:{title}"]
    front = yaml.safe_dump({k: meta[k] for k in ("title", "description") if meta.get(k)}, allow_unicode=True)
    res = subprocess.run(args, input=f"---\n{front}---\n\n{md}", capture_output=True, text=True)
    if res.returncode: raise RuntimeError(f"pandoc failed: {res.stderr.strip()}")
    if res.stderr.strip(): print(res.stderr.strip(), file=sys.stderr)
    return res.stdout


def sidebar_html(pages: list[tuple[str, str, str]], current: str) -> str:
    items = []
    for page, title, desc in pages:
        cls = ' class="active" aria-current="page"' if page == current else ""
        items.append(f'<li><a href="{page}"{cls} title="{html.escape(desc, quote=True)}">{html.escape(title)}</a></li>')
    return "<ul>\n" + "\n".join(items) + "\n</ul>"


def local_links(text: str, site_url: str, nb_pages: dict[str, str]) -> str:
    "Links to the published site and to notebooks become links between the local pages."
    if site_url: text = text.replace(f'href="{site_url.rstrip("/")}/', 'href="')
    def nb_link(m):
        page = nb_pages.get(Path(m.group(1)).name)
        return f'href="{page}{m.group(2) or ""}"' if page else m.group(0)
    return re.sub(r'href="([^"#:]+\.ipynb)(#[^"]*)?"', nb_link, text)


# ------------------------------------------------------------------------------------------------------------- main
def _try(f, *args):
    try: return f(*args), None
    except RuntimeError as e: return None, str(e)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes for step 1")
    ap.add_argument("--reuse-proc", action="store_true", help="skip the processors; render the last run's _proc/")
    args = ap.parse_args(argv)
    t0 = time.time()
    os.chdir(ROOT)
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    cfg = get_config()
    nbs, proc, docs = cfg.nbs_path, cfg.config_path / "_proc", cfg.doc_path
    sources = sorted(nbglob(nbs, func=Path, file_glob="*.ipynb"), key=lambda p: ("" if p.name == "index.ipynb" else "1", p.name))
    if not sources: sys.exit(f"no notebooks in {nbs}")
    dsts = [proc / s.relative_to(nbs) for s in sources]
    if args.reuse_proc:
        errors = {s: None if d.exists() else f"{d.relative_to(ROOT)} missing (run without --reuse-proc)" for s, d in zip(sources, dsts)}
    else:
        shutil.rmtree(proc, ignore_errors=True)
        for d in dsts: d.parent.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import build_docs  # the workers (fresh "spawn" processes, no forked jax state) find the function by this name
        with ProcessPoolExecutor(max(1, args.workers), mp_context=get_context("spawn")) as ex:
            errors = dict(zip(sources, ex.map(build_docs.process_notebook, map(str, sources), map(str, dsts))))
    failed = {s: e for s, e in errors.items() if e}
    for s, e in failed.items(): print(f"== docs: {s.relative_to(ROOT)} could not be processed:\n{e}", file=sys.stderr)
    t1 = time.time()

    import json
    pandoc, built = pandoc_path(), []
    tmp = docs.with_name(docs.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    template = tmp / "_template.html"
    template.write_text(_TEMPLATE)
    for s, d in zip(sources, dsts):
        if s in failed: continue
        meta, md = notebook_markdown(json.loads(d.read_text()))
        page = str(meta.get("output-file") or Path(s.name.lower()).with_suffix(".html"))
        if page in {b[1] for b in built}:  # nbdev names 12_pipeline and 20_pipeline both pipeline.html
            other = next(b[0].name for b in built if b[1] == page)
            page = Path(s.name.lower()).with_suffix(".html").name
            print(f"== docs: {s.name} would also be {meta['output-file']} (as {other}); it is {page}", file=sys.stderr)
        meta.setdefault("title", s.stem)
        built.append((s, page, meta, md))
    pages = [(page, str(meta["title"]), str(meta.get("description") or "")) for _, page, meta, _ in built]
    nb_pages = {s.name: page for s, page, _, _ in built}
    site_url = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}"
    fill = {"@@SITE@@": html.escape(cfg.get("title", cfg.lib_name)), "@@TAGLINE@@": html.escape(cfg.get("description", "")),
            "@@REPO@@": html.escape(cfg.get("git_url", ""))}
    with ThreadPoolExecutor(max(1, args.workers)) as ex:  # one pandoc process per page
        rendered = list(ex.map(lambda b: _try(render_page, pandoc, template, b[2], b[3]), built))
    for (s, page, meta, md), (out, err) in zip(built, rendered):
        if err:
            failed[s] = err; print(f"== docs: {s.relative_to(ROOT)}: {err}", file=sys.stderr); continue
        for k, v in fill.items(): out = out.replace(k, v)
        out = out.replace("@@SIDEBAR@@", sidebar_html(pages, page))
        (tmp / page).write_text(local_links(out, site_url, nb_pages))
    template.unlink()
    if (nbs / "styles.css").exists(): shutil.copy2(nbs / "styles.css", tmp / "styles.css")
    shutil.rmtree(docs, ignore_errors=True)
    tmp.rename(docs)
    if failed:
        print(f"== docs: {len(failed)} of {len(sources)} notebooks failed, their pages are missing from "
              f"{docs.relative_to(ROOT)}/: {', '.join(s.name for s in failed)}", file=sys.stderr)
        return 1
    print(f"== docs: {len(built)} pages in {docs.relative_to(ROOT)}/ "
          f"(processors {t1 - t0:.0f} s, pandoc {time.time() - t1:.0f} s, total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
