"""The code's floors. The model (vlaserve.model) stands on the interface alone; serving (the rest of
vlaserve, and the runner entry points in the model repository) stands on the model; export stands beside
serving and uses both. No import runs from serving or the model to export."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SERVING = sorted((ROOT / "vlaserve").rglob("*.py")) + sorted((ROOT / "model_repository").rglob("model.py"))
MODEL = sorted((ROOT / "vlaserve" / "model").glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_import_runs_from_serving_to_export():
    up = {str(p.relative_to(ROOT)): sorted(m for m in imported(p) if m.split(".")[0] == "export") for p in SERVING}
    assert not {k: v for k, v in up.items() if v}


def test_the_model_stands_on_the_interface_alone():
    allowed = {"vlaserve.interface", "vlaserve.errors"}
    for path in MODEL:
        ours = {m for m in imported(path) if m.split(".")[0] in ("vlaserve", "export", "loadtest", "benchmarks")}
        assert {m for m in ours if not m.startswith("vlaserve.model")} <= allowed, path


def test_the_ground_floor_imports_only_itself():
    ground = {"vlaserve.interface", "vlaserve.errors", "vlaserve.manifest"}
    for name in ground:
        path = ROOT / f"{name.replace('.', '/')}.py"
        ours = {m for m in imported(path) if m.split(".")[0] in ("vlaserve", "export", "loadtest", "benchmarks")}
        assert ours - {"vlaserve"} <= ground, path


def test_serving_imports_with_export_unimportable():
    """The serving side imports, and its runtime rebuilds the model, with no ``export`` package at all."""
    code = (
        "import sys; sys.modules['export'] = None\n"  # any `import export...` now raises ImportError
        "import vlaserve.server, vlaserve.runner, vlaserve.runtimes, vlaserve.value_check, vlaserve.repository\n"
        "import vlaserve.guard, vlaserve.health, vlaserve.status, vlaserve.client, vlaserve.mps_check, vlaserve.spec\n"
        "from vlaserve.model.policy import build_policy\n"
        "from vlaserve.model.presets import get_preset\n"
        "from vlaserve.model.parity import compare\n"
        "build_policy(get_preset('tiny', 2))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
