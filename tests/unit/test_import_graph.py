"""The package's import graph: dependencies point down the layers, and no module imports one
that (directly or not) imports it back. Every import counts, including those inside functions.

Layers, bottom first (a module may import its own layer or any below it):

0. ``core`` (errors, run directories, parameter roles, telemetry collections), ``parallel.axes`` (axis names)
1. ``config`` (schema, profiles, sizing), ``data.tokenizer`` (config checks vocabulary sizes)
2. ``parallel`` (mesh, distributed), ``data``
3. ``quant`` (pure numerics; ``quant.hlo_check`` reads HLO text)
4. ``layers``
5. ``platform`` (backends, environment, native kernels)
6. ``model``
7. ``train``, ``generate``, ``serve`` (scheduler; the HTTP server imports its framework lazily)
8. ``tools``
9. ``ablate``
10. ``cli``, ``__main__``, the package's top-level API (``api``)
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "tfm_jax"

RANKS = {
    "tfm_jax.core": 0, "tfm_jax.parallel.axes": 0,
    "tfm_jax.config": 1, "tfm_jax.data.tokenizer": 1,
    "tfm_jax.parallel": 2, "tfm_jax.data": 2,
    "tfm_jax.quant": 3,
    "tfm_jax.quant.hlo_check": 3,      # HLO text only: imports no tfm_jax module
    "tfm_jax.layers": 4,
    "tfm_jax.platform": 5,
    "tfm_jax.model": 6,
    "tfm_jax.train": 7, "tfm_jax.generate": 7, "tfm_jax.serve": 7,
    "tfm_jax.tools": 8, "tfm_jax.hf": 8,
    "tfm_jax.ablate": 9,
    "tfm_jax.cli": 10, "tfm_jax.__main__": 10, "tfm_jax": 10, "tfm_jax.api": 10,
}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if any(part in ("configs", "experiments") for part in rel.parts):
            continue
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in mods:
                        deps.add(full)
                    elif base in mods:
                        deps.add(base)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        deps.add(alias.name)
        deps.discard(name)
        graph[name] = deps
    return graph


def rank(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in RANKS:
            return RANKS[key]
    raise KeyError(module)


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if not any(
        m == k or m.startswith(k + ".") for k in RANKS)]
    assert not missing, f"modules outside the layer table: {missing}"


def test_imports_point_down():
    graph = import_graph()
    up = sorted(f"{m} (layer {rank(m)}) imports {d} (layer {rank(d)})"
                for m, deps in graph.items() for d in deps
                if rank(d) > rank(m) and not (m == "tfm_jax" or m.startswith("tfm_jax.__")))
    assert not up, "imports that point up:\n" + "\n".join(up)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected
