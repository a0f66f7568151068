"""Built-ins are written like third-party plugins: every module under plugins/ (and the example
package examples/ftk-sharegpt) imports from ftk only the documented public surface
(docs/plugins/versions.md), wherever the import is (module level or inside a function). And ftk
itself has no import cycles at module level."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PUBLIC = {"ftk", "ftk.hookspecs", "ftk.components", "ftk.errors", "ftk.io", "ftk.testing", "ftk.loaderkit", "ftk.losses", "ftk.attention"}
PLUGIN_MODULES = sorted([*(ROOT / "plugins").rglob("*.py"),
                         *(ROOT / "examples" / "ftk-sharegpt" / "ftk_sharegpt").rglob("*.py")])
CORE = ROOT / "core"  # the package ftk


def ftk_imports(tree: ast.AST, nodes=None) -> list[tuple[int, str]]:
    """(line, module) of every ``import ftk...`` / ``from ftk... import`` among ``nodes`` (default:
    anywhere in ``tree``); ``from ftk import x`` counts as ``ftk.x`` when x is a module of ftk."""
    modules = {p.stem for p in CORE.glob("*.py")}
    out = []
    for node in (ast.walk(tree) if nodes is None else nodes):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name == "ftk" or a.name.startswith("ftk.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ftk":
                out += [(node.lineno, f"ftk.{a.name}" if a.name in modules else "ftk") for a in node.names]
            elif node.module.startswith("ftk."):
                out.append((node.lineno, node.module))
    return out


def test_public_surface_is_the_one_versions_md_names():
    text = (ROOT / "docs" / "plugins" / "versions.md").read_text()
    line = re.search(r"Keep to the public surface: (.*?)\. Anything else", text, re.S).group(1)
    named = set(re.findall(r"`(ftk(?:\.\w+)?)`", line)) | {"ftk", "ftk.hookspecs"}  # ftk.hookimpl lives there
    named.discard("ftk.hookimpl")
    assert named == PUBLIC, named ^ PUBLIC


@pytest.mark.parametrize("path", PLUGIN_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_modules_import_only_the_public_api(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bad = [f"{path.relative_to(ROOT)}:{line}: {mod}" for line, mod in ftk_imports(tree) if mod not in PUBLIC]
    assert not bad, "outside the public surface (docs/plugins/versions.md):\n" + "\n".join(bad)


def test_the_checks_see_the_builtin_loaders():
    names = {p.name for p in PLUGIN_MODULES}
    assert {"data_alpaca.py", "data_custom.py", "data_dailydialog.py", "loader.py"} <= names
    tree = ast.parse("from ftk.data import iter_records\ndef f():\n    from ftk import data\n")
    assert [m for _, m in ftk_imports(tree)] == ["ftk.data", "ftk.data"]


def _type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> list[ast.AST]:
    """Statements run when the module is imported: the body, and inside module-level if/try blocks
    (not ``if TYPE_CHECKING:``), but never inside a function or class body."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If) and not _type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for p in sorted(CORE.glob("*.py")):
        name = "ftk" if p.stem == "__init__" else f"ftk.{p.stem}"
        tree = ast.parse(p.read_text(encoding="utf-8"), str(p))
        graph[name] = {m for _, m in ftk_imports(tree, module_level_imports(tree))} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_ftk_has_no_import_cycles_at_module_level():
    graph = import_graph()
    assert "ftk.data" in graph and "ftk.loaderkit" in graph["ftk.data"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle at module level: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("import ftk.io\nif TYPE_CHECKING:\n    import ftk.run\ntry:\n    from ftk import data\n"
                     "except ImportError:\n    pass\ndef f():\n    import ftk.train\n")
    assert [m for _, m in ftk_imports(tree, module_level_imports(tree))] == ["ftk.io", "ftk.data"]


def test_loaderkit_imports_nothing_heavy():
    # plugin modules may import the kit at module level; every ftk command imports plugin modules
    import subprocess
    import sys

    code = ("import sys, ftk.loaderkit; "
            "print(sorted(m for m in ('numpy', 'torch', 'transformers', 'datasets', 'pyarrow') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_ftk_data_keeps_the_old_names():
    import ftk.data
    import ftk.loaderkit

    for name in ftk.loaderkit.__all__:
        assert getattr(ftk.data, name) is getattr(ftk.loaderkit, name), name


# -- docs/plugins/loaderkit.md documents every public name of the kit with its exact signature ----
LOADERKIT_MD = ROOT / "docs" / "plugins" / "loaderkit.md"


def kit_signatures() -> dict[str, str]:
    """name -> ``name(params)`` as the docs write it: parameters and defaults, no annotations."""
    import inspect

    import ftk.loaderkit as kit

    out = {}
    for name in kit.__all__:
        obj = getattr(kit, name)
        if not callable(obj):
            continue
        sig = inspect.signature(obj)
        sig = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                          return_annotation=sig.empty)
        out[name] = f"{name}{sig}"
    return out


def kit_sections() -> dict[str, str]:
    parts = re.split(r"^## (.*)$", LOADERKIT_MD.read_text(), flags=re.M)
    return {h[1:-1]: body for h, body in zip(parts[1::2], parts[2::2]) if h.startswith("`") and h.endswith("`")}


def test_every_kit_name_is_documented_with_its_signature():
    import ftk.loaderkit as kit

    documented = kit_sections()
    for name, sig in kit_signatures().items():
        assert sig in documented, f"docs/plugins/loaderkit.md lacks a heading `## \\`{sig}\\``"
        assert "```python" in documented[sig], f"loaderkit.md: {name} has no example"
    stale = set(documented) - set(kit_signatures().values())
    assert not stale, f"loaderkit.md documents what the kit does not have (or with another signature): {stale}"
    text = LOADERKIT_MD.read_text()
    for name in kit.__all__:
        assert f"`{name}`" in text or f"`{name}(" in text, name
    assert set(kit.__all__) == {n for n in vars(kit) if not n.startswith("_") and n.isupper()} | set(kit_signatures())
    assert "(loaderkit.md)" in (ROOT / "docs" / "plugins" / "README.md").read_text()


@pytest.mark.parametrize("n", range(len(re.findall(r"```python\n", LOADERKIT_MD.read_text()))))
def test_loaderkit_doc_example_runs(n):
    code = re.findall(r"```python\n(.*?)```", LOADERKIT_MD.read_text(), re.S)[n]
    exec(compile(code, f"{LOADERKIT_MD}:example {n}", "exec"), {"__name__": f"loaderkit_doc_{n}"})  # noqa: S102
