"""The documentation site builds strictly and offline, documents what it lists, and says what the code says.

- ``mkdocs build --strict`` (docs/, mkdocs.yml; not ``--quiet``, which hides the warnings) with every socket
  connection refused: no warning at all, so no broken link or anchor, no
  page missing from the nav, no web font or remote inventory fetched;
- every name the API reference lists has a docstring, and every name of ``peftkit.__all__`` is listed;
- every registered method has its page, linked from the nav and from README.md's method table, and each page's
  options table equals the registry's defaults (``python tests/test_docs.py --write-options`` rewrites them).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from multiproc import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
OPTIONS_BLOCK = re.compile(r"<!-- options:begin (?P<method>[\w-]+) -->\n(?P<body>.*?)<!-- options:end -->", re.S)
# Fields of AdapterConfig that are not options a user sets per method.
NOT_OPTIONS = ("method", "architecture", "init", "optimizer", "schedule", "options")


# ------------------------------------------------------------------------------------------ the build

_NO_NETWORK = textwrap.dedent('''
    import socket

    def _refuse(self, address, *args, **kwargs):
        local = isinstance(address, tuple) and address and address[0] in ("127.0.0.1", "::1", "localhost")
        if isinstance(address, str) or local:
            return _connect(self, address, *args, **kwargs)
        raise OSError(f"tests/test_docs.py: the docs build tried to reach {address!r}")

    _connect = socket.socket.connect
    socket.socket.connect = _refuse
    socket.socket.connect_ex = lambda self, address: _refuse(self, address) or 0
    _getaddrinfo = socket.getaddrinfo
    def _no_lookup(host, *args, **kwargs):
        if host in (None, "localhost", "127.0.0.1", "::1"):
            return _getaddrinfo(host, *args, **kwargs)
        raise OSError(f"tests/test_docs.py: the docs build tried to resolve {host!r}")
    socket.getaddrinfo = _no_lookup
''')


def test_mkdocs_build_is_strict_and_offline(tmp_path):
    """The whole site builds with --strict while every outside connection raises; the pages link no web font."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):  # the docs extra: an error, never a skip
        assert importlib.util.find_spec(module), f"{module} is missing: pip install -c .ci/constraints.txt -e '.[docs]'"
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NO_NETWORK)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    start = time.perf_counter()
    # No --quiet: it raises mkdocs' log level to ERROR, so the warnings --strict counts are never emitted and a broken
    # anchor built "cleanly". Any WARNING line fails the test too, whichever logger printed it.
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(site)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert proc.returncode == 0 and not warnings, "\n".join(warnings) or output[-3000:]
    assert "Documentation built in" in output, output[-3000:]  # the build really ran, with its INFO log visible
    assert "tried to" not in proc.stderr, proc.stderr[-3000:]
    print(f"mkdocs build --strict: {seconds:.1f} s")
    pages = sorted(p.relative_to(DOCS).with_suffix(".html") for p in DOCS.rglob("*.md"))
    missing = [str(p) for p in pages if not (site / p).is_file()]
    assert not missing, f"pages not built: {missing}"
    for page in pages:
        html = (site / page).read_text()
        assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html, page
    reference = (site / "reference.html").read_text()
    assert 'id="peftkit.wrap"' in reference and 'id="peftkit.layer.AdapterLayer"' in reference


def test_the_guard_refuses_connections(tmp_path):
    """Negative control for the build test: with the guard, a connection to the outside fails."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NO_NETWORK)
    code = ("import socket\ntry:\n    socket.create_connection(('93.184.216.34', 80), timeout=1)\n"
            "except OSError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(guard)},
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert "the docs build tried to" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ the API reference

def _reference_entries() -> list[tuple[str, list[str] | None]]:
    """(identifier, members or None) of every ``::: identifier`` directive of docs/reference.md."""
    entries: list[tuple[str, list[str] | None]] = []
    in_members = False
    for line in (DOCS / "reference.md").read_text().splitlines():
        if line.startswith("::: "):
            entries.append((line[4:].strip(), None))
            in_members = False
        elif entries and re.match(r"^ {6}members:\s*$", line):
            entries[-1] = (entries[-1][0], [])
            in_members = True
        elif in_members and re.match(r"^ {8}- ", line):
            entries[-1][1].append(line.strip()[2:])
        else:
            in_members = False
    return entries


def _resolve(identifier: str):
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(identifier)


def _own_doc(obj) -> str:
    """The object's own docstring (a class's, not one inherited from a base class)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return (doc or "").strip()


def test_every_name_in_the_api_reference_has_a_docstring():
    entries = _reference_entries()
    assert len(entries) >= 8, entries
    undocumented = []
    for identifier, members in entries:
        obj = _resolve(identifier)
        if not _own_doc(obj):
            undocumented.append(identifier)
        for member in members or []:
            value = getattr(obj, member)
            if not _own_doc(value):
                undocumented.append(f"{identifier}.{member}")
        if inspect.isclass(obj):  # a class listed whole: its public methods too
            undocumented += [f"{identifier}.{name}" for name, value in vars(obj).items()
                             if not name.startswith("_") and inspect.isfunction(value) and not _own_doc(value)]
    assert not undocumented, f"listed in docs/reference.md without a docstring: {undocumented}"


def test_the_api_reference_lists_all_of_peftkit_all():
    import peftkit

    listed = dict(_reference_entries())["peftkit"]
    assert sorted(listed) == sorted(peftkit.__all__), set(listed) ^ set(peftkit.__all__)


# ------------------------------------------------------------------------------------------ method pages

def _fmt(value) -> str:
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def render_options(method: str) -> str:
    """The options table of ``method``'s page: the common options with the preset's defaults, then each
    component's own options, read from the registry."""
    from peftkit import registry
    from peftkit.config import AdapterConfig

    preset = registry.get_method(method)
    rows = ["| option | default | belongs to |", "|---|---|---|"]
    for f in dataclasses.fields(AdapterConfig):
        if f.name in NOT_OPTIONS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = preset.defaults.get(f.name, default)
        preset_default = " (preset default)" if f.name in preset.defaults else ""
        rows.append(f"| `{f.name}` | {_fmt(default)} | common{preset_default} |")
    for axis in registry.AXES:
        component = registry.get_component(axis, getattr(preset, axis))
        for name, default in component.default_options().items():
            default = preset.defaults.get(name, default)
            rows.append(f"| `{name}` | {_fmt(default)} | {axis} `{component.name}` |")
    return "\n".join(rows) + "\n"


def _method_pages() -> dict[str, Path]:
    from peftkit import registry

    return {name: DOCS / "methods" / f"{name}.md" for name in registry.methods()}


def test_every_method_has_a_page_in_the_nav_and_the_readme():
    nav = (REPO / "mkdocs.yml").read_text()
    readme = (REPO / "README.md").read_text()
    for name, page in _method_pages().items():
        assert page.is_file(), f"{name}: no page {page.relative_to(REPO)}"
        assert f"methods/{name}.md" in nav, f"{name}: its page is not in mkdocs.yml's nav"
        assert f"](docs/methods/{name}.md)" in readme, f"{name}: README.md's method table does not link its page"
        text = page.read_text()
        for section in ("## What it is", "## The math", "## Options and defaults", "## What was tested and measured",
                        "## When to choose it", "## Known limits"):
            assert section in text, f"{page.name}: no section {section!r}"


def test_method_pages_show_the_registry_defaults():
    stale = []
    for name, page in _method_pages().items():
        blocks = {m["method"]: m["body"] for m in OPTIONS_BLOCK.finditer(page.read_text())}
        assert list(blocks) == [name], f"{page.name}: expected one options block for {name}, found {list(blocks)}"
        if blocks[name] != render_options(name):
            stale.append(name)
    assert not stale, f"options tables differ from the registry: {stale}; run python tests/test_docs.py --write-options"


def test_render_options_reads_the_preset_defaults():
    """The generated table carries the preset's own defaults and component options (so a wrong table fails)."""
    table = render_options("lora-ga")
    assert "| `rslora` | `True` | common (preset default) |" in table
    assert "| `alpha` | `16.0` | common (preset default) |" in table
    assert '| `direction` | `"ArB2r"` | init `lora-ga` |' in table
    assert "| `r` | `10` | common (preset default) |" in render_options("elalora")


# ------------------------------------------------------------------------------------------ README ↔ docs

def test_readme_is_short_and_links_into_existing_docs_pages():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 15, links
    missing = sorted({link for link in links if not (REPO / link).is_file()})
    assert not missing, f"README.md links to missing docs pages: {missing}"


def _write_options() -> None:
    for name, page in _method_pages().items():
        text = page.read_text()
        new = OPTIONS_BLOCK.sub(lambda m: f"<!-- options:begin {m['method']} -->\n{render_options(m['method'])}"
                                "<!-- options:end -->", text)
        if new != text:
            page.write_text(new)
            print(f"rewrote the options table of {page.relative_to(REPO)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-options"]:
        _write_options()
    else:
        sys.exit("usage: python tests/test_docs.py --write-options")
