"""The import rules of docs/architecture.md: the model is reference maths and imports none of the
packages that wrap it (checkpoint format, kernels, inference, training, RL, FP8, parallelism)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanoseek"
OUTSIDE_THE_MODEL = ("nanoseek.hf", "nanoseek.kernels", "nanoseek.infer", "nanoseek.train", "nanoseek.rl",
                     "nanoseek.fp8", "nanoseek.parallel", "nanoseek.data")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_model_imports_nothing_that_wraps_it():
    files = sorted((PACKAGE / "model").glob("*.py"))
    assert len(files) >= 6
    for path in files:
        bad = [m for m in imported_modules(path) if m.startswith(OUTSIDE_THE_MODEL)]
        assert not bad, f"{path.name} imports {bad}"


def test_kernels_touch_the_model_only_through_their_module_swaps():
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        model_imports = [m for m in imported_modules(path) if m.startswith("nanoseek.model")]
        assert path.name == "modules.py" or not model_imports, f"{path.name} imports {model_imports}"
        assert not [m for m in imported_modules(path) if m.startswith(("nanoseek.infer", "nanoseek.train"))]
