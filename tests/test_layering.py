"""DESIGN.md: the import graph is one-way. The math never imports the network and
the network never imports the math; interop maps (state dicts, configs, folders) and imports nothing
above it; no import cycle between modules (top-level imports) or between units (lazy imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import ddpmkit

SRC = Path(ddpmkit.__file__).parent
MATH = {"ddpmkit.schedules", "ddpmkit.distributions", "ddpmkit.diffusion", "ddpmkit.respace",
        "ddpmkit.sampling", "ddpmkit.chains", "ddpmkit.analytic", "ddpmkit.dpm_solver"}
ABOVE_INTEROP = ("ddpmkit.models", "ddpmkit.convert", "ddpmkit.train", "ddpmkit.training",
                 "ddpmkit.evaluate", "ddpmkit.cli", "ddpmkit.figures", "ddpmkit.charts", "ddpmkit.images",
                 "ddpmkit.reproduce", "ddpmkit.config", "ddpmkit.checkpoint", "ddpmkit.sample_folder",
                 "ddpmkit.gamma_file")


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in SRC.rglob("*.py")}


def imports(module: str, *, top_level_only: bool = False) -> set[str]:
    """The ddpmkit modules ``module`` imports (``from pkg import submodule`` counts as the submodule)."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddpmkit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs if subs else {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ddpmkit")}
    return (out & MODULES.keys()) - {module}


def _unit(module: str) -> str:
    """A package below ddpmkit (nn, data, interop, ...) is one unit; a top-level module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(v: str, path: list[str]) -> None:
        state[v] = "open"
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    return cycles


def test_the_math_and_the_network_never_import_each_other():
    for m in MODULES:
        if m in MATH:
            assert not {i for i in imports(m) if i.startswith("ddpmkit.nn")}, m
        if m.startswith("ddpmkit.nn"):
            assert not imports(m) & MATH, m


def test_interop_imports_nothing_above_it():
    for m in MODULES:
        if m.startswith("ddpmkit.interop"):
            upward = {i for i in imports(m) if i.startswith(ABOVE_INTEROP)}
            assert not upward, f"{m} imports {upward}"


def test_no_import_cycle():
    top = {m: imports(m, top_level_only=True) - {"ddpmkit"} for m in MODULES}
    top = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in top.items()}
    assert _cycles(top) == []
    units: dict[str, set[str]] = {}
    for m in MODULES:
        if m != "ddpmkit":  # the package root re-exports the public API
            deps = {_unit(i) for i in imports(m)} - {_unit(m), "ddpmkit"}
            units.setdefault(_unit(m), set()).update(deps)
    assert _cycles(units) == []


def test_no_import_cycle_between_modules_lazy_imports_included():
    """E.g. nn.folder <-> nn.unet, once closed by a lazy import inside a function."""
    graph = {m: {i for i in imports(m) if not m.startswith(i + ".")} - {"ddpmkit"} for m in MODULES
             if m != "ddpmkit"}
    assert _cycles(graph) == []


def test_the_checker_sees_an_upward_import_and_a_cycle():
    assert "ddpmkit.diffusion" in imports("ddpmkit.sampling")
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_no_function_in_src_is_over_60_lines():
    """No function anywhere in src/ddpmkit over 60 lines, the training loop (train._loop) at most 100."""
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > (100 if (m, node.name) == ("ddpmkit.train", "_loop") else 60):
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, long
    assert "ddpmkit.training.step" in MODULES and "ddpmkit.train" in MODULES


def test_no_module_in_src_is_over_700_lines():
    """One concept per module: none past 700 lines."""
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 700}
    assert not big, big


def test_accel_imports_torch_only():
    """The speed wrappers know neither the math nor the network."""
    assert imports("ddpmkit.accel") == set()
    tree = ast.parse(MODULES["ddpmkit.accel"].read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "collections", "typing", "torch"}, roots


def test_the_samplers_and_chains_call_only_public_methods_of_the_diffusion():
    """One public API (the design guide's point 8): no ``diffusion._...`` outside ddpmkit.diffusion."""
    private = []
    for m in ("ddpmkit.sampling", "ddpmkit.chains", "ddpmkit.analytic", "ddpmkit.dpm_solver"):
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in ("diffusion", "chain")):
                private.append(f"{m}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not private, private
