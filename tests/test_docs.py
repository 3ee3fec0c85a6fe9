"""The README and the manual in docs/: links that resolve, and a code map that names every module.

No PostgreSQL needed: these read files.  The link check follows what GitHub
renders: relative links ``[text](path)`` and ``[text](path#anchor)``, the
anchor being the slug GitHub gives a heading (lower case, punctuation dropped,
spaces to hyphens, ``-1``, ``-2`` for repeats).
"""

from __future__ import annotations

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "threadpool_proxy")
ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[str]:
    docs = os.path.join(REPO, "docs")
    return [os.path.join(REPO, "README.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))


def _prose_lines(text: str):
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before repeats are numbered)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)    # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _FENCE.match(line.lstrip()):
                fenced = not fenced
                continue
            match = None if fenced else _HEADING.match(line.rstrip("\n"))
            if match is None:
                continue
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path: str) -> list[str]:
    """Relative links of ``path`` whose file, or heading anchor, does not exist."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems = []
    for line in _prose_lines(text):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):       # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(resolved):
                problems.append(f"{target}: no such file {os.path.relpath(resolved, REPO)}")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                problems.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, REPO)}")
    return problems


def package_modules() -> list[str]:
    return sorted(name for name in os.listdir(PACKAGE) if name.endswith(".py"))


def architecture_rows() -> list[str]:
    """The module names in docs/architecture.md's table, in its order (a row may name several)."""
    names = []
    with open(ARCHITECTURE, encoding="utf-8") as f:
        for line in f:
            if line.startswith("| `"):
                first_cell = line.split("|")[1]
                names += re.findall(r"`([\w]+\.py)`", first_cell)
    return names


def package_imports(module: str) -> set[str]:
    """The package's modules ``module`` imports at run time (at the top or inside a function)."""
    with open(os.path.join(PACKAGE, module), encoding="utf-8") as f:
        return imports_of(f.read(), module, set(package_modules()))


def imports_of(source: str, module: str, modules: set[str]) -> set[str]:
    """Which of ``modules`` the source of ``module`` imports at run time."""
    tree = ast.parse(source)
    type_only = set()                              # under "if TYPE_CHECKING:": never imported at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0] + ".py")
            else:                                  # from . import x, y: those that are modules
                found.update(a.name + ".py" for a in node.names if a.name + ".py" in modules)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "threadpool_proxy" and len(parts) > 1:
                    found.add(parts[1] + ".py")
    found.discard(module)
    return found


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Pool modes (`session`)\n\n## Pool modes (`session`)\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n"
                    "[ok](other.md#pool-modes-session) [ok too](other.md#pool-modes-session-1) [self](#page)\n"
                    "[gone](missing.md) [no heading](other.md#no-such-heading) [web](https://example.org/x)\n"
                    "`[in code](missing-too.md)`\n"
                    "```\n[in a block](missing-three.md)\n```\n")
    assert broken_links(str(page)) == [
        "missing.md: no such file " + os.path.relpath(str(tmp_path / "missing.md"), REPO),
        "other.md#no-such-heading: no heading #no-such-heading in "
        + os.path.relpath(str(tmp_path / "other.md"), REPO),
    ]


def test_architecture_names_every_module():
    listed = architecture_rows()
    assert sorted(set(listed)) == package_modules()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert "prepared.py" in listed and "stopping.py" in listed


def test_architecture_lists_modules_in_import_order():
    """Each module imports only modules above it in docs/architecture.md: no import cycles."""
    order = architecture_rows()
    position = {name: i for i, name in enumerate(order)}
    wrong = []
    for module in order:
        for imported in sorted(package_imports(module)):
            if position.get(imported, len(order)) >= position[module]:
                wrong.append(f"{module} imports {imported}, listed below it")
    assert wrong == []


def test_the_import_check_sees_every_kind_of_import_but_type_checking_ones():
    source = ("from typing import TYPE_CHECKING\n"
              "from . import config as config_mod, __version__\n"
              "from .pool import BackendIdlePool\n"
              "import threadpool_proxy.stats\n"
              "if TYPE_CHECKING:\n"
              "    from .server import ProxyServer\n"
              "def later():\n"
              "    from .metrics import local_figures\n")
    modules = {"config.py", "pool.py", "stats.py", "server.py", "metrics.py", "relay.py"}
    assert imports_of(source, "relay.py", modules) == {"config.py", "pool.py", "stats.py", "metrics.py"}


def test_readme_keeps_the_two_commands_and_the_test_command_ci_runs():
    """.ci/run runs exactly the README's test command: ``tox``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```sh\n(.*?)```", section, re.S).group(1).splitlines()
    assert [c.split("#")[0].strip() for c in commands] == [
        "pip install . && python -m threadpool_proxy --demo",
        "pip install tox && tox",
    ]
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci_commands = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == "tox"


def test_readme_minimal_configuration_loads(tmp_path):
    """The README's minimal configuration is a valid file that says what its comments say."""
    from threadpool_proxy import config as config_mod
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## A minimal configuration", 1)[1].split("\n## ", 1)[0]
    path = tmp_path / "proxy.yaml"
    path.write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = config_mod.load(str(path))
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 6432)
    assert config.pool_mode == "transaction"
    assert config.pool_size == 20
    assert config.auth_type == "passthrough"
    entry = config.databases["app"]
    assert (entry.host, entry.port) == ("127.0.0.1", 5432)
