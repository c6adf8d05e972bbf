"""The layered house (DESIGN.md §4) stays true: imports point down, nothing private crosses a
package, rooms stay small and say what they hold."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mstore_lightning"
MAX_LINES = 600
# Packages whose code may touch only its own objects' private members (as the facade's users do).
NO_PRIVATE_ATTRS = ("analytics", "reports", "facade", "cli")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "import-linter is not installed: pip install -e '.[test]'"
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True)


def part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else ""


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_the_import_contract_holds():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("store/layout.py", "from mstore_lightning.analytics import ranking"),
        ("core/quant.py", "import zarr"),
        ("capture/hooks.py", "def late():\n    from mstore_lightning.facade import open_store"),
    ],
)
def test_a_reversed_import_breaks_the_contract(tmp_path, module, line):
    # A copy of the package with one import pointing up (or out of core): the contract must fail.
    shutil.copytree(PKG, tmp_path / "mstore_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "mstore_lightning" / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout


def test_no_private_name_crosses_a_package():
    crossings = []
    for path in modules():
        here = part(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith(PKG.name)
            ):
                there = (node.module.split(".") + [""])[1]
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                if there != here and private:
                    crossings.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {private}")
            if here in NO_PRIVATE_ATTRS and isinstance(node, ast.Attribute):
                owner = node.value
                mine = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
                if node.attr.startswith("_") and not node.attr.startswith("__") and not mine:
                    crossings.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}")
    assert crossings == []


def test_every_module_is_small_and_every_package_says_what_it_holds():
    big = [f"{p.relative_to(ROOT)}: {len(p.read_text().splitlines())}" for p in modules()]
    assert [b for b in big if int(b.rsplit(" ", 1)[1]) > MAX_LINES] == []
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring saying what lives there"
