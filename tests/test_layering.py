"""moa_core is the library under the orchestration: it imports no Prefect, MLflow or DVC (README: Architecture)."""

from __future__ import annotations

import ast

from conftest import ROOT

ORCHESTRATION = ("prefect", "mlflow", "dvc")


def test_moa_core_imports_no_orchestration_package():
    offending = []
    for path in sorted((ROOT / "moa_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offending += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ORCHESTRATION]
    assert not offending, offending
