"""The layer contract (pyproject.toml, `[tool.importlinter]`) holds, and it would catch an upward import.

Why in the suite: docs/ARCHITECTURE.md draws the layers; this keeps the drawing true, since CI runs pytest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [{m.strip() for m in layer.split("|")} for layer in contract["layers"]]


def test_lint_imports_keeps_the_layer_contract() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_the_contract_rejects_an_upward_import() -> None:
    """The same layers, checked on the real import graph plus one import from the bottom layer to the stages:
    grimp (the engine of lint-imports) must report exactly that dependency as illegal."""
    graph = grimp.build_graph("mopd")
    layers = [grimp.Layer(*sorted(layer), independent=True) for layer in _layers()]
    assert not graph.find_illegal_dependencies_for_layers(layers=layers, containers={"mopd"})
    graph.add_import(importer="mopd.core.batch", imported="mopd.stages.run")
    illegal = graph.find_illegal_dependencies_for_layers(layers=layers, containers={"mopd"})
    assert {(d.importer, d.imported) for d in illegal} == {("mopd.core", "mopd.stages")}


def test_every_top_level_module_is_in_a_layer() -> None:
    """`exhaustive`: a new top-level module or package of mopd that no layer names fails the contract."""
    named = set().union(*_layers())
    found = {p.stem for p in (ROOT / "src" / "mopd").iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("__")}
    assert found - named == set()
