"""The package's layering, as docs/explanation/architecture.md states it, checked on the source.

Every ``import`` / ``from ... import`` of a microseg module anywhere in a module (top level and
inside functions alike) is an edge; an edge may only point to a lower layer, or stay inside one
module or one sub-package (``microseg.data.cache`` -> ``microseg.data.layout``). Modules of an
independent layer do not import one another. No cycle anywhere, sub-packages included. A module
the layers do not name fails the test, so a new module is placed on purpose.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import microseg

PACKAGE = Path(microseg.__file__).parent

LAYERS: list[tuple[bool, tuple[str, ...]]] = [
    # (independent, modules), top first; a name stands for the module or the package.
    (True, ("__main__",)),
    (True, ("cli",)),
    (True, ("demo",)),
    (True, ("reporting",)),
    (True, ("experiments",)),
    (True, ("training", "evaluation")),
    (True, ("inference", "stats")),
    (True, ("runs",)),
    (True, ("data", "models")),
    (True, ("losses", "metrics")),
    (True, ("core",)),
]
"""The layers, top first. docs/explanation/architecture.md lists the same."""


def module_files() -> dict[str, Path]:
    """Dotted name relative to the package ("data.cache", "losses" for losses/__init__.py) -> file."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The microseg modules that module ``name`` imports anywhere in its body (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["microseg", *filter(None, package.split("."))]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "microseg" or target.startswith("microseg."):
                relative = target.removeprefix("microseg").removeprefix(".")
                # "import microseg.data.cache" also runs microseg.data: the longest known module named
                while relative not in known:
                    relative = relative.rpartition(".")[0]
                if relative != name:
                    found.add(relative)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def top_name(module: str) -> str:
    return module.split(".")[0]


def layer_of(module: str) -> int | None:
    for index, (_, names) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(top_name(module), pattern) for pattern in names):
            return index
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if m and layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/explanation/architecture.md): {unplaced}"


def test_imports_only_go_down():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            if not module or not target or top_name(module) == top_name(target):
                continue  # the package face, or inside one module or sub-package
            here, there = layer_of(module), layer_of(target)
            if here is None or there is None:
                continue  # reported by test_every_module_has_a_layer
            if there < here or (there == here and LAYERS[here][0]):
                wrong.append(f"microseg.{module} -> microseg.{target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_package_face_imports_nothing_of_the_package():
    assert import_graph()[""] == set()


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module], path = 1, path + [module]
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(f"microseg.{m}" for m in path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path)
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "def f():\n    from microseg.data import cache\n    import microseg.losses.afl as afl\nfrom . import errors\n"
    )
    known = {"", "data", "data.cache", "losses", "losses.afl", "errors", "probe"}
    assert imported_modules("probe", source, known) == {"data", "data.cache", "losses.afl", "", "errors"}


def test_the_trainer_names_no_loss():
    """training/ hands every loss the statistics it declares (`microseg.losses.base`): no loss is named there."""
    from microseg.losses import LOSSES

    for path in sorted((PACKAGE / "training").glob("*.py")):
        tree = ast.parse(path.read_text())
        compared = [
            c for node in ast.walk(tree) if isinstance(node, ast.Compare) for c in (node.left, *node.comparators)
        ]
        named = {c.value for c in compared if isinstance(c, ast.Constant) and c.value in LOSSES}
        assert not named, f"training/{path.name} tells losses apart by name: {sorted(named)}"


def test_the_architecture_page_lists_these_layers():
    """docs/explanation/architecture.md's numbered list: the same modules per layer, top first, `|`
    between the modules of an independent layer and `,` where they may import one another."""
    page = (PACKAGE.parent / "docs" / "explanation" / "architecture.md").read_text()
    listed = re.findall(r"^\d+\. (.*)$", page.split("## Layers", 1)[1], flags=re.M)
    written = [("," not in line, tuple(name.rstrip("/") for name in re.findall(r"`([^`]+)`", line))) for line in listed]
    assert written == LAYERS


def test_only_the_command_line_sits_at_the_top():
    """microseg/ holds the command line (cli, demo, __main__) and packages; every other module is in a package."""
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py", "demo.py"]
    assert all(
        (folder / "__init__.py").is_file()
        for folder in PACKAGE.iterdir()
        if folder.is_dir() and folder.name != "__pycache__"
    )
