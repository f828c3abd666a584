"""The package's rooms and the arrows allowed between them (docs/architecture.md).

Walks every module of ``src/biometry`` with ``ast`` (nothing is imported) and fails on an import
that points up the house, on a private name imported across modules, and on function-level imports
beyond the few that are commented as optional or heavy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "biometry"

#: room -> the rooms it may import (itself included). ``runs`` orchestrates everything below it;
#: only ``cli`` sits above ``runs``.
BELOW_RUNS = {"base", "config", "data", "phantom", "learn", "analysis", "inference", "report"}
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "config": {"base", "config"},
    "data": {"base", "config", "data"},
    "phantom": {"base", "config", "data", "phantom"},
    "learn": {"base", "config", "data", "learn"},
    "analysis": {"base", "config", "data", "analysis"},
    "inference": {"base", "config", "data", "learn", "analysis", "inference"},
    "report": {"base", "config", "data", "analysis", "report"},
    "runs": BELOW_RUNS | {"runs"},
    "cli": BELOW_RUNS | {"runs", "cli"},
}
#: top-level modules: the shared base, and the two contract entry points of DESIGN.md
TOP_LEVEL = {"biometry": "base", "biometry.errors": "base", "biometry.fileio": "base",
             "biometry.parallel": "base",
             "biometry.cli": "cli", "biometry.formats": "data", "biometry.stats": "analysis"}
MAX_FUNCTION_IMPORTS = 10


def room_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    if parts[0] != "biometry" or len(parts) < 2 or parts[1] not in ALLOWED:
        raise ValueError(f"module {module} is in no room: add it to a subpackage or TOP_LEVEL")
    return parts[1]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def biometry_imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module, names, inside a function) for every import of a biometry module."""
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    inner = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "biometry":
                    yield node.lineno, alias.name, [], id(node) in inner
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "biometry":
                continue
            names = [a.name for a in node.names]
            # ``from biometry.config import fields`` imports the module biometry.config.fields
            for name in names:
                sub = f"{target}.{name}"
                if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                        (PACKAGE.parent / sub.replace(".", "/")).is_dir():
                    yield node.lineno, sub, [], id(node) in inner
                else:
                    yield node.lineno, target, [name], id(node) in inner


def forbidden_arrows(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        src_room = room_of(module)
        for line, target, _names, _inner in biometry_imports(tree, module, path.name == "__init__.py"):
            dst_room = room_of(target)
            if dst_room not in ALLOWED[src_room]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {src_room} -> {dst_room} "
                           f"({module} imports {target})")
    return bad


def private_imports(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target, names, _inner in biometry_imports(tree, module, path.name == "__init__.py"):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                bad.append(f"{path.relative_to(root.parent)}:{line}: imports {private} from {target}")
    return bad


def function_level_imports(root: Path = PACKAGE) -> list[tuple[str, bool]]:
    """(location, has a comment) for each import statement inside a function body."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    text = lines[node.end_lineno - 1]
                    found.append((f"{path.relative_to(root.parent)}:{node.lineno}", "#" in text))
    return sorted(set(found))


def test_every_module_is_in_a_room():
    for path in PACKAGE.rglob("*.py"):
        room_of(module_name(path))


def test_no_import_points_up_the_house():
    assert forbidden_arrows() == []


def test_the_arrow_check_fails_on_a_forbidden_arrow(tmp_path):
    """The check itself: a data module that imports the runs room is caught, with its line."""
    pkg = tmp_path / "biometry"
    for sub in ("", "data", "runs"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "runs" / "runner.py").write_text("X = 1\n")
    (pkg / "data" / "store.py").write_text("import numpy\n\nfrom biometry.runs.runner import X\n")
    bad = forbidden_arrows(pkg)
    assert len(bad) == 1 and "data -> runs" in bad[0] and "store.py:3" in bad[0]
    (pkg / "data" / "store.py").write_text("def f():\n    from ..runs import runner\n")
    assert "data -> runs" in forbidden_arrows(pkg)[0]
    (pkg / "data" / "store.py").write_text("from biometry.data import formats\n")
    (pkg / "data" / "formats.py").write_text("")
    assert forbidden_arrows(pkg) == []


def test_no_private_name_crosses_a_module():
    assert private_imports() == []


def test_function_level_imports_are_few_and_commented():
    found = function_level_imports()
    uncommented = [loc for loc, commented in found if not commented]
    assert uncommented == [], "a function-level import needs a comment saying why it is there"
    assert len(found) <= MAX_FUNCTION_IMPORTS, [loc for loc, _ in found]


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_says_what_lives_there(room):
    if room in ("base", "cli"):
        return
    init = PACKAGE / room / "__init__.py"
    assert init.is_file(), f"{room}/ has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and "import" in doc.lower(), f"{room}/__init__.py must say what lives there and what it may import"
