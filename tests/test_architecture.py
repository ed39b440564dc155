"""The package's shape: layers import only downwards, no cycles, no probing of families, a cheap import.

The layers are docs/architecture.md's; this test is where they are enforced. Each import names
the file and line it is on, so a failure says exactly what to move.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "genkit"

# module (or package) -> layer; the longest matching prefix decides
LAYERS = {
    "genkit.version": 0, "genkit.errors": 0, "genkit.rng": 0, "genkit.io": 0,
    "genkit.weights": 0, "genkit.config": 0, "genkit.progress": 0,
    "genkit.nn": 1, "genkit.data": 1, "genkit.samplers": 1,
    "genkit.families": 2,
    "genkit.runs": 3,
    "genkit.eval": 4, "genkit.interop": 4, "genkit.reflow": 4,
    "genkit.training": 5,
    "genkit.api": 6, "genkit": 6,  # the package itself is the API's lazy facade (PEP 562 __getattr__)
    "genkit.cli": 7, "genkit.__main__": 7,
}
# modules whose function-local genkit imports are the point: the lazy facade and the fast CLI
LAZY = {"genkit", "genkit.cli"}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    """The layer of a module: its longest prefix in LAYERS (the bare package is only itself)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    if module in LAYERS:
        return LAYERS[module]
    raise KeyError(f"{module} has no layer: add it to LAYERS and docs/architecture.md")


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported genkit module, line, inside a function) for every import in a module."""
    tree = ast.parse(path.read_text())
    local_lines = {node.lineno for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and target.startswith("genkit"):
                found.append((target, node.lineno, node.lineno in local_lines))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in modules():
        layer(module)


def test_no_import_goes_up_a_layer():
    bad = [f"{modules()[m].relative_to(PACKAGE.parent)}:{line}: {m} (L{layer(m)}) imports {t} (L{layer(t)})"
           for m, found in graph().items() for t, line, _ in found if layer(t) > layer(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    edges = {m: {t for t, _, _ in found} for m, found in graph().items()}
    assert cycles(edges) == []


def test_genkit_imports_are_at_module_top_level():
    """A function-local import of genkit code hides a dependency (or dodges a cycle); only the lazy
    facade and the CLI, which must start without torch, import inside functions."""
    bad = [f"{modules()[m].relative_to(PACKAGE.parent)}:{line}: {t}"
           for m, found in graph().items() if m not in LAZY for t, line, local in found if local]
    assert not bad, "function-local genkit imports:\n" + "\n".join(bad)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    pkg = tmp_path / "genkit"
    (pkg / "families").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "families" / "__init__.py").write_text("")
    (pkg / "runs.py").write_text("from genkit.families.base import Family\n")
    (pkg / "families" / "base.py").write_text("import os\n\ndef f():\n    from genkit.runs import load\n")
    known = modules(pkg)
    found = {m: imports(m, p, known) for m, p in known.items()}
    assert ("genkit.runs", 4, True) in found["genkit.families.base"]
    assert layer("genkit.families.base") < layer("genkit.runs")
    assert cycles({m: {t for t, _, _ in f} for m, f in found.items()}) == [["genkit.families.base", "genkit.runs"]]


# hasattr / getattr(obj, name, default): the places that look at a foreign object (argparse, YAML, torch
# exceptions), each with its reason. A family is never probed: its contract is genkit.families.base.
PROBES_ALLOWED = {
    ("genkit/config.py", "getattr(e, 'problem_mark', None)"): "PyYAML errors carry a mark only when located",
    ("genkit/config.py", "getattr(e, 'problem', None)"): "PyYAML errors carry a problem only when located",
    ("genkit/config.py", "getattr(tp, '__name__', str(tp))"): "typing constructs have no __name__",
    ("genkit/nn/text.py", "hasattr(model, 'token_embedding')"): "open_clip models with a HF text tower lack it",
}


def probes() -> list[tuple[str, str]]:
    """(file, code) of every hasattr(...) and three-argument getattr(...) in the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                    node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3)):
                out.append((str(path.relative_to(PACKAGE.parent)), ast.unparse(node)))
    return out


def test_nothing_is_probed_with_hasattr_or_a_getattr_default():
    unexplained = [p for p in probes() if p not in PROBES_ALLOWED]
    assert not unexplained, f"probes: {unexplained} (declare it in the Family contract instead)"
    assert len(probes()) == len(PROBES_ALLOWED)  # an allowance that is gone is removed too


def test_import_genkit_and_the_cli_load_no_torch():
    """`genkit --help`, `--version` and `recipes` start without torch (the CLI imports it per command)."""
    code = ("import sys, genkit, genkit.cli; "
            "assert 'torch' not in sys.modules and 'genkit.api' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


@pytest.mark.parametrize("argv", [["--version"], ["recipes"], ["train", "--help"]])
def test_fast_commands_do_not_import_torch(argv):
    code = ("import sys; from genkit.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, capture_output=True)
