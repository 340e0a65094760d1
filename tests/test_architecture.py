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


def module_graph() -> dict[str, set[str]]:
    """nanoseek module -> the nanoseek modules it imports (a package's __init__ is not a target: its
    re-exports are a convenience for users, not a dependency of the package's own modules)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    targets = {m for m, p in files.items() if p.name != "__init__.py"}
    return {m: {t for t in imported_modules(p) if t in targets and t != m} for m, p in files.items()}


def test_no_import_cycles_between_modules():
    graph, done, path = module_graph(), set(), []

    def visit(m: str) -> None:
        path.append(m)
        for n in sorted(graph[m]):
            assert n not in path, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in done:
                visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        if m not in done:
            visit(m)


def test_parallel_and_train_meet_only_at_the_shared_step():
    # parallel builds on train's split step (step.py), FLOP count (metrics.py) and checkpoint publishing
    # (checkpoint.py: atomic rename, manifest, pruning); of train, only the trainer reaches parallel
    # (lazily, under torchrun). Module-level direction: step, metrics, checkpoint <- parallel <- trainer.
    graph = module_graph()
    down = {t for m, ts in graph.items() if m.startswith("nanoseek.parallel") for t in ts
            if t.startswith("nanoseek.train")}
    up = {m for m, ts in graph.items() if m.startswith("nanoseek.train")
          and any(t.startswith("nanoseek.parallel") for t in ts)}
    assert down <= {"nanoseek.train.step", "nanoseek.train.metrics", "nanoseek.train.checkpoint"}, down
    assert up <= {"nanoseek.train.trainer"}, up
