"""No import circle anywhere in revq_ray, lazy (function-level) imports included: the package is a pyramid,
and its layers are the ones docs/ARCHITECTURE.md states (its layer table is parsed here).

At e163450 train/loop.py imported train/driver.py (inside a function) while the driver imported the loop.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

PKG = Path(__file__).resolve().parents[1] / "revq_ray"
ARCHITECTURE = PKG.parent / "docs" / "ARCHITECTURE.md"
NO_ROW = "docs/ARCHITECTURE.md"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


@functools.cache
def _import_graph() -> dict[str, frozenset[str]]:
    return {m: frozenset(d) for m, d in _parse_import_graph().items()}


def import_graph() -> dict[str, set[str]]:
    """module -> the revq_ray modules it imports anywhere in its body (names resolved to their module)."""
    return {m: set(d) for m, d in _import_graph().items()}


def _parse_import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("revq_ray"):
                    graph[m].add(resolve(t))
        graph[m] -= {m, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_in_revq_ray():
    graph = import_graph()
    assert "revq_ray.train.plan" in graph["revq_ray.train.driver"]  # the graph sees real edges
    assert cycles(graph) == []


# ------------------------------------------------------------------------------------------- the layers
def unit_of(module: str) -> str:
    """The row of docs/ARCHITECTURE.md's layer table a module belongs to: ``revq_ray.train.loop`` ->
    ``train``, ``revq_ray.tokenizer`` -> ``tokenizer``, the package ``revq_ray`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def documented_layers(text: str) -> dict[str, tuple[int, set[str]]]:
    """The layer table of docs/ARCHITECTURE.md: unit -> (layer, the units its row says it imports).

    Rows look like ``| 8 | `train/` | `config` `core` ... | what it owns |``."""
    rows: dict[str, tuple[int, set[str]]] = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|([^|]*)\|", line)
        if m:
            name = m.group(2).removesuffix("/").removesuffix(".py")
            rows[name] = (int(m.group(1)), set(re.findall(r"`([^`]+)`", m.group(3))))
    return rows


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded onto the table's units (imports inside one unit left out)."""
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(unit_of(m), set()).update(unit_of(d) for d in deps)
    return {u: deps - {u} for u, deps in out.items()}


def layer_violations(units: dict[str, set[str]], layers: dict[str, tuple[int, set[str]]]) -> list[str]:
    """Every arrow from a unit to one of the same or a higher layer, and every unit without a row."""
    bad = [f"{u} has no row in the layer table of {NO_ROW}" for u in sorted(units) if u not in layers]
    for u, deps in sorted(units.items()):
        for d in sorted(deps):
            if u in layers and d in layers and layers[d][0] >= layers[u][0]:
                up = f"{u} (layer {layers[u][0]}) imports {d} (layer {layers[d][0]})"
                bad.append(f"{up}, not a lower layer")
    return bad


def test_the_layer_check_finds_an_upward_import():
    layers = {"core": (2, set()), "train": (8, {"core"}), "tokenizer": (6, set())}
    assert layer_violations({"core": set(), "train": {"core"}}, layers) == []
    assert layer_violations({"core": {"train"}, "train": {"core"}}, layers) == [
        "core (layer 2) imports train (layer 8), not a lower layer"
    ]
    assert layer_violations({"new": set()}, layers) == [f"new has no row in the layer table of {NO_ROW}"]
    text = "| 8 | `train/` | `config` `core` | the loop |\n| 6 | `tokenizer.py` | | bundles |"
    assert documented_layers(text) == {"train": (8, {"config", "core"}), "tokenizer": (6, set())}


def test_imports_follow_the_documented_layers():
    layers = documented_layers(ARCHITECTURE.read_text())
    units = unit_graph(import_graph())
    assert len(layers) >= 15, f"the layer table of {ARCHITECTURE} was not found"
    assert layer_violations(units, layers) == []
    stale = [u for u in layers if u not in units]
    assert stale == [], f"rows of {ARCHITECTURE} name units that do not exist: {stale}"


def test_the_documented_arrows_are_the_real_ones():
    layers = documented_layers(ARCHITECTURE.read_text())
    units = unit_graph(import_graph())
    differ = {
        u: {"documented": sorted(layers[u][1]), "in the code": sorted(units[u])}
        for u in units
        if u in layers and layers[u][1] != units[u]
    }
    assert differ == {}, f"update the imports column of {ARCHITECTURE}"
