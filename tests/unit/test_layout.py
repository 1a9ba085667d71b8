"""The package's import graph (docs/architecture.md): no cycles between folders or modules, and
the package's own modules imported at module level (inside functions only heavy third-party
packages), read from the source with ast."""

import ast
import os
from collections import defaultdict

import pytest

import megarlhf

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(megarlhf.__file__))
# Modules that may still import megarlhf modules inside functions: the CLI commands (they load
# their implementation when run, so `megarlhf --help` stays fast), and modules under
# concurrent change when this test was written (the rollout engines, the rollout worker and the
# demo; models/, weights/, platform/), to be cleaned once those changes land.
LAZY_OK = ("megarlhf.commands.", "megarlhf.demo", "megarlhf.rollout", "megarlhf.models.",
           "megarlhf.weights.", "megarlhf.platform", "megarlhf.workers.rollout_worker")


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(os.path.join(ROOT, "megarlhf")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _graph():
    mods = _modules()
    edges, lazy = defaultdict(set), []
    for name, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        in_func = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if not t.startswith("megarlhf"):
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                edges[name].add(t)
                if id(node) in in_func:
                    lazy.append((name, t, node.lineno))
    return mods, edges, lazy


def _cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def test_no_import_cycles_between_modules_or_folders():
    """If this fails, two modules (or two folders) import each other, directly or through
    others: the layout no longer has a direction (docs/architecture.md)."""
    mods, edges, _ = _graph()
    assert _cycles(mods, {k: {v for v in vs if v != k} for k, vs in edges.items()}) == []
    folders = defaultdict(set)
    for a, bs in edges.items():
        folders[_folder(a)] |= {_folder(b) for b in bs if _folder(b) != _folder(a)}
    assert _cycles({_folder(m) for m in mods}, folders) == []


def test_own_modules_are_imported_at_module_level():
    """If this fails, a module imports one of the package's own modules inside a function
    (hiding a dependency or a cycle); only heavy third-party packages are imported lazily."""
    _, _, lazy = _graph()
    bad = [f"{m} imports {t} (line {line})" for m, t, line in lazy
           if not m.startswith(LAZY_OK)]
    assert bad == []
