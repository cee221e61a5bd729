"""The tree as a newcomer reads it: no import cycle inside calm_jax, no module of it over 500 lines,
and README's map of the code naming every module and package of calm_jax that exists (and none
that does not). Reads the files only; nothing is imported."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "calm_jax")
MAX_LINES = 500
# Older than the rule, and not split by the change that made it: they may shrink, not grow.
GRANDFATHERED = {"calm_jax.config": 537, "calm_jax.model": 524}


def _modules() -> dict[str, str]:
    """{dotted name: file} of every module of calm_jax (a package by its __init__.py)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def _runtime_imports(tree: ast.Module, name: str, is_package: bool, modules) -> set[str]:
    """The calm_jax modules `name` imports when it is imported: statements at module level (also
    inside module-level if/try, not under `if TYPE_CHECKING`), not inside functions or classes."""
    found = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(part)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import sub` imports the submodule sub
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)

    visit(tree.body)
    return {m for m in found if m in modules and m != name}


def test_calm_jax_has_no_import_cycle():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[name] = _runtime_imports(tree, name, path.endswith("__init__.py"), modules)
    assert graph["calm_jax.composition.cross_attention"] >= {"calm_jax.composition.config", "calm_jax.model"}
    state, stack = {}, []

    def walk(node):  # depth-first; a node met again while on the stack closes a cycle
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_no_calm_jax_module_is_over_500_lines():
    long = {name: n for name, path in _modules().items()
            if (n := sum(1 for _ in open(path))) > GRANDFATHERED.get(name, MAX_LINES)}
    assert not long, f"split these by job (more than {MAX_LINES} lines): {long}"


def test_readme_map_names_every_calm_jax_module_and_nothing_else():
    readme = open(os.path.join(ROOT, "README.md")).read()
    named = set(re.findall(r"calm_jax/([A-Za-z_]+)(?:\.py|/)", readme))
    top = {n[:-3] if n.endswith(".py") else n for n in os.listdir(PACKAGE)
           if (n.endswith(".py") and n != "__init__.py") or os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))}
    assert top - named == set(), f"README's map does not name calm_jax/{sorted(top - named)}"
    assert named - top == set(), f"README names calm_jax/{sorted(named - top)}, which does not exist"
