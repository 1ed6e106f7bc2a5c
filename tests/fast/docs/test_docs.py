"""The docs against the code: what README.md and docs/*.md say must be true now.

- every name in ooidx/wire.py (addresses, message types, headers, record keys)
  is in docs/architecture.md, the addresses in its addresses table;
- its components table is ooidx.wire.COMPONENTS (name, pattern, listening,
  package), and its layers table names every module of the import-linter
  layers contract in pyproject.toml;
- its diagram is what scripts/architecture draws now;
- every link between the docs reaches a file and a heading that exist, and
  every repository path the docs name in code exists;
- nothing in the repository refers to a path outside it;
- every `ooidx ...` command in their shell blocks is one `ooidx` accepts;
- README.md stays short and keeps its two commands.

No broker, socket or subprocess: files are read and the diagram script is
loaded in process.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import tomllib
from typing import Dict, Iterator, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from ooidx import wire

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")
SCRIPT = os.path.join(ROOT, "scripts", "architecture")

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
#: Paths a doc may name in code that must exist in the checkout.
PATH = re.compile(r"^(?:magnet|ooidx|tests|scripts|etc|docs|bench|fuzz|twisted|\.ci)/[\w.@*/-]*$")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def docs() -> List[str]:
    """README.md and every page under docs/."""
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def section(text: str, title: str) -> str:
    """The body of the level-2 section C{title} (up to the next level-2 heading)."""
    match = re.search(r"^## " + re.escape(title) + r"[ \t]*$", text, re.M)
    if match is None:
        raise AssertionError(f"no section '## {title}'")
    rest = text[match.end():]
    following = re.search(r"^## ", rest, re.M)
    return rest[:following.start()] if following else rest


def table_rows(text: str) -> List[List[str]]:
    """The cells of every row of the Markdown tables in C{text}, header and rule left out."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows[1:] if rows else rows


def code_spans(text: str) -> List[str]:
    return CODE_SPAN.findall(FENCE.sub("", text))


def mentions(spans: List[str], value: str) -> bool:
    """Whether a code span is C{value}, or (a prefix such as C{pubsub.sub.} or
    C{dataset:}) starts it."""
    return any(s == value or (value[-1:] in ".:" and s.startswith(value)) for s in spans)


def wire_sections() -> Dict[str, List[Tuple[str, str]]]:
    """ooidx/wire.py's string constants by the section comment they stand under
    (C{# Addresses ---} and so on): section -> [(constant, value)]."""
    source = read(os.path.join(ROOT, "ooidx", "wire.py"))
    headings = [(i + 1, m.group(1).strip()) for i, line in enumerate(source.splitlines())
                for m in [re.match(r"# ([A-Z][\w ]+?) -{3,}", line)] if m]
    found: Dict[str, List[Tuple[str, str]]] = {}
    for node in ast.parse(source).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        value = getattr(node, "value", None)
        if len(targets) != 1 or not isinstance(targets[0], ast.Name) or not isinstance(value, ast.Constant):
            continue
        if not isinstance(value.value, str):
            continue
        under = [title for line, title in headings if line < node.lineno]
        found.setdefault(under[-1] if under else "", []).append((targets[0].id, value.value))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}-{n}")
    return out


class WireNamesTests(SynchronousTestCase):
    """docs/architecture.md names everything ooidx/wire.py does."""

    def test_sections_found(self) -> None:
        """The section comments of ooidx/wire.py are still there (else the tests below check nothing)."""
        sections = wire_sections()
        for title in ("Addresses", "Message types", "Headers", "Record keys in the attribute store"):
            self.assertIn(title, sections)
        self.assertIn(("CONTROL_FANOUT", wire.CONTROL_FANOUT), sections["Addresses"])

    def test_every_address_in_the_addresses_table(self) -> None:
        spans = code_spans(section(read(ARCHITECTURE), "Addresses"))
        missing = [f"{name} = {value!r}" for name, value in wire_sections()["Addresses"]
                   if not mentions(spans, value)]
        self.assertEqual(missing, [], "addresses of ooidx/wire.py missing from docs/architecture.md's table")

    def test_every_other_name(self) -> None:
        spans = code_spans(read(ARCHITECTURE))
        missing = [f"{name} = {value!r}" for title, names in wire_sections().items() if title != "Addresses"
                   for name, value in names if not mentions(spans, value)]
        self.assertEqual(missing, [], "names of ooidx/wire.py missing from docs/architecture.md")

    def test_mentions(self) -> None:
        """A prefix is found at the start of a span, a whole name only whole."""
        self.assertTrue(mentions(["pubsub.sub.NAME"], "pubsub.sub."))
        self.assertTrue(mentions(["dataset:"], "dataset:"))
        self.assertFalse(mentions(["notification.api"], "notification"))
        self.assertFalse(mentions(["x pubsub.sub.NAME"], "pubsub.sub."))


class ComponentsTableTests(SynchronousTestCase):
    """docs/architecture.md's components table is the component table."""

    PATTERNS = {wire.WORKER: "worker queue", wire.FANOUT: "fanout", None: "no queue"}

    def rows(self) -> Dict[str, List[str]]:
        rows = table_rows(section(read(ARCHITECTURE), "Components"))
        return {row[0].strip("`"): row for row in rows}

    def test_same_components(self) -> None:
        self.assertEqual(sorted(self.rows()), sorted(wire.COMPONENT_NAMES))

    def test_pattern_listens_package(self) -> None:
        rows = self.rows()
        for spec in wire.COMPONENTS:
            row = rows.get(spec.name)
            if row is None:
                continue  # test_same_components says so
            _, pattern, listens, package = row[:4]
            self.assertEqual(pattern, self.PATTERNS[spec.pattern], spec.name)
            self.assertEqual(listens, "yes" if spec.listens else "no", spec.name)
            module = spec.implementation.partition(":")[0]
            package = package.strip("`")
            self.assertTrue(module == package or module.startswith(package + "."),
                            f"{spec.name}: {spec.implementation} is not in {package}")

    def test_layers_named(self) -> None:
        """Every module of the import-linter layers contract is in the layers table."""
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
        layers = [c for c in contracts if c["type"] == "layers"]
        self.assertTrue(layers)
        spans = code_spans(section(read(ARCHITECTURE), "Layers"))
        for contract in layers:
            for layer in contract["layers"]:
                for module in re.split(r"[|:]", layer):
                    self.assertIn(module.strip(), spans, f"layer {layer!r}")


class DiagramTests(SynchronousTestCase):
    """The diagram in docs/architecture.md is what scripts/architecture draws now."""

    def setUp(self) -> None:
        self.script = runpy.run_path(SCRIPT, run_name="architecture_script")

    def test_doc_holds_the_drawing(self) -> None:
        held = self.script["current"](read(ARCHITECTURE))
        self.assertTrue(held, "docs/architecture.md has no drawn diagram block")
        self.assertEqual(held, self.script["block"](self.script["draw"]()),
                         "the diagram is stale: run scripts/architecture --write")

    def test_every_component_drawn(self) -> None:
        drawn = self.script["draw"]()
        for name in wire.COMPONENT_NAMES:
            self.assertIn(f'        {name}["{name}<br/>', drawn)

    def test_a_flow_to_an_unknown_component_fails(self) -> None:
        """A component renamed in the table makes the script fail, naming the flow."""
        flows = self.script["FLOWS"] + (("proxyng", "thumbnailer", "render", "call"),)
        with self.assertRaises(SystemExit) as caught:
            self.script["draw"](wire.COMPONENTS, flows)
        self.assertIn("'thumbnailer' is not in ooidx.wire.COMPONENTS", str(caught.exception))

    def test_check_and_write(self) -> None:
        """replaced() swaps the block and nothing else; a doc without markers is refused."""
        begin, end = self.script["BEGIN"], self.script["END"]
        text = f"before\n{begin}\nold\n{end}\nafter\n"
        self.assertEqual(self.script["replaced"](text, "NEW\n"), f"before\n{begin}\nNEW\n{end}\nafter\n")
        self.assertEqual(self.script["current"]("no markers"), "")
        with self.assertRaises(SystemExit):
            self.script["replaced"]("no markers", "NEW\n")


class LinksAndPathsTests(SynchronousTestCase):
    """Links between the docs, and the repository paths they name, exist."""

    def links(self) -> Iterator[Tuple[str, str]]:
        for path in docs():
            for target in LINK.findall(FENCE.sub("", read(path))):
                yield path, target

    def test_links(self) -> None:
        broken = []
        for path, target in self.links():
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f"{os.path.relpath(path, ROOT)}: ({target})"
            if not resolved.startswith(ROOT + os.sep) or not os.path.exists(resolved):
                broken.append(f"{where}: no such file")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(read(resolved)):
                broken.append(f"{where}: no such heading")
        self.assertEqual(broken, [])

    def test_some_links_checked(self) -> None:
        self.assertGreater(len(list(self.links())), 20)

    def test_paths(self) -> None:
        missing = []
        for path in docs():
            for span in code_spans(read(path)):
                candidate = span.split(":", 1)[0]
                if not PATH.match(candidate):
                    continue
                if not glob.glob(os.path.join(ROOT, candidate)):
                    missing.append(f"{os.path.relpath(path, ROOT)}: `{span}`")
        self.assertEqual(missing, [])

    def test_slug(self) -> None:
        self.assertEqual(slug("TLS to the broker: `amqps://`"), "tls-to-the-broker-amqps")
        self.assertEqual(slug("Hot answers held at the proxy (issue 8)"), "hot-answers-held-at-the-proxy-issue-8")
        self.assertEqual(slug("How `twistd` finds `ooidx`"), "how-twistd-finds-ooidx")
        self.assertEqual(slug("route: proxy -> controller"), "route-proxy---controller")


class InsideTheRepositoryTests(SynchronousTestCase):
    """Nothing in the repository points at a path outside it (a clone has only the repository)."""

    # Spelled in pieces, so that this file does not find itself.
    OUTSIDE = re.compile("|".join((r"\.\./" + "shared", "DESIGN" + r"\.md", "/" + "work/")))
    SKIP_DIRS = {"__pycache__", "var", "venv", "build", "dist", "_trial_temp", "node_modules", "corpus", "artifacts",
                 "corpus-run"}
    TEXT = (".py", ".md", ".toml", ".cfg", ".yaml", ".yml", ".txt", ".service", ".sh", ".html", ".js", ".css")

    def files(self) -> Iterator[str]:
        for top, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in self.SKIP_DIRS and not d.endswith(".egg-info")
                       and (not d.startswith(".") or d == ".ci")]
            for name in names:
                path = os.path.join(top, name)
                if name.endswith(self.TEXT) or os.path.basename(top) in ("scripts", ".ci"):
                    yield path

    def test_no_outside_path(self) -> None:
        found = []
        for path in self.files():
            try:
                text = read(path)
            except UnicodeDecodeError:
                continue
            for match in self.OUTSIDE.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{os.path.relpath(path, ROOT)}:{line}: {match.group(0)}")
        self.assertEqual(found, [])

    def test_the_pattern(self) -> None:
        self.assertTrue(self.OUTSIDE.search("See `../" + "shared/DESIGN" + ".md` for the map"))
        self.assertIsNone(self.OUTSIDE.search("docs/architecture.md, ../var/ooidx"))


class ReadmeTests(SynchronousTestCase):
    """README.md: short, with its two commands."""

    def test_short(self) -> None:
        self.assertLessEqual(len(read(os.path.join(ROOT, "README.md")).splitlines()), 150)

    def test_two_commands(self) -> None:
        readme = read(os.path.join(ROOT, "README.md"))
        for command in ("python3 -m venv .venv && .venv/bin/pip install -e . && "
                        ".venv/bin/twistd -n ooidx --config etc/dx.yaml\n",
                        "```sh\nscripts/test\n```", "`scripts/test --fast`"):
            self.assertTrue(command in readme, f"README.md lacks {command!r}")
        self.assertTrue(os.access(os.path.join(ROOT, "scripts", "test"), os.X_OK))
        self.assertTrue(os.path.exists(os.path.join(ROOT, "etc", "dx.yaml")))


class CommandsTests(SynchronousTestCase):
    """Every C{ooidx ...} line of the docs' shell blocks parses as C{ooidx} parses it."""

    SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)
    COMMAND = re.compile(r"^(?:\S*/)?ooidx (.*)$")

    def commands(self) -> Iterator[Tuple[str, List[str]]]:
        for path in docs():
            for block in self.SHELL_BLOCK.findall(read(path)):
                for line in block.splitlines():
                    match = self.COMMAND.match(line.split("  #")[0].strip())
                    if match:
                        yield os.path.relpath(path, ROOT), shlex.split(match.group(1))

    def refused(self, argv: List[str]) -> str:
        """What C{ooidx}'s parser says of C{argv}: "" if it takes it."""
        from ooidx.cli import parser
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser().parse_args(argv)
        except SystemExit:
            return errors.getvalue().strip().splitlines()[-1]
        return ""

    def test_commands_parse(self) -> None:
        commands = list(self.commands())
        self.assertGreater(len(commands), 8)
        bad = [f"{path}: ooidx {' '.join(argv)}: {why}" for path, argv in commands for why in [self.refused(argv)] if why]
        self.assertEqual(bad, [])

    def test_a_wrong_command_is_refused(self) -> None:
        self.assertIn("invalid choice", self.refused(["datasets", "frobnicate", "sst"]))
        self.assertTrue(self.refused(["nosuchcommand"]))
