"""The shape of the package: layers, sizes and the few import rules the layers rely on.

The layers themselves (imports only point down) are an import-linter contract in
pyproject.toml, checked by ``lint-imports`` in ``make test``; the test here runs it too, so a
plain ``pytest`` catches a wrong-way import as well.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zoo"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
LARGE_BY_NATURE = {"zoo/testing/hub_server.py"}  # a whole Hub-compatible HTTP server


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imported_modules(tree: ast.AST) -> set[str]:
    """Modules imported at run time (``if TYPE_CHECKING:`` blocks are for annotations only)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_lower_layers_never_import_higher_ones():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (make test installs it)")
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and _name(path) not in LARGE_BY_NATURE:
                    long.append(f"{_name(path)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_no_module_holds_more_than_one_job():
    large = [f"{_name(path)} ({n} lines)" for path in _modules()
             if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
             and _name(path) not in LARGE_BY_NATURE]
    assert large == []


def test_the_core_layer_imports_nothing_above_it():
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        imported = _imported_modules(ast.parse(path.read_text(encoding="utf-8")))
        upward = {name for name in imported
                  if name.startswith("zoo.") and not name.startswith("zoo.core")}
        assert not upward, (_name(path), upward)


def test_importing_the_core_and_plugin_layers_loads_no_torch():
    # What keeps `import zoo` and `zoo list` fast: specs, errors, paths, the registry.
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                     for layer in ("core", "plugins") for path in (PACKAGE / layer).glob("*.py"))
    code = ("import sys\n" + "".join(f"import {name}\n" for name in modules)
            + "heavy = sorted(m for m in ('torch', 'timm', 'huggingface_hub', 'numpy') "
            "if m in sys.modules)\nprint(heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_modules_inside_zoo_import_from_the_defining_module_not_the_package_root():
    # `from zoo import x` inside zoo/ would hide a layer crossing from import-linter (the root
    # package re-exports names from every layer).
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "zoo" and node.level == 0:
                offenders.append(f"{_name(path)}:{node.lineno}")
    assert offenders == []


def test_only_the_hub_modules_import_huggingface_hub():
    allowed = {"zoo/weights/_hf.py", "zoo/persist/hub.py", "zoo/persist/card.py",
               "zoo/testing/hub_server.py"}
    users = {_name(path) for path in _modules()
             if any(name.split(".")[0] == "huggingface_hub"
                    for name in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))))}
    assert users <= allowed, users - allowed
