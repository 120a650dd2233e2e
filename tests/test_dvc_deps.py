"""dvc.yaml knows the code: every stage lists as deps its stage module and every project module it imports,
so that `dvc repro` reruns exactly the stages a code change can affect."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import REPO

PACKAGES = ("netvlad_core", "stages")
#: what every command runs besides its own module: the error/warning wrapper and the option derivation. The
#: dispatchers (stages/cli.py, stages/launch.py) only route arguments and are not listed: changing them changes no
#: result.
COMMON = ("stages._common", "stages._options")


def module_file(module: str) -> Path | None:
    path = REPO.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every project module ``path`` imports, at the top or inside functions (``from x import y`` also counts
    ``x.y``, which is a module when ``y`` is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def code_closure(*modules: str) -> set[str]:
    """The project files that importing ``modules`` runs (their packages' ``__init__`` files included)."""
    files: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = module_file(name)
            if path is not None and name not in files:
                files[name] = path
                todo.extend(imported_modules(path, name))
    return {str(p.relative_to(REPO)) for p in files.values()}


def stage_specs() -> dict[str, tuple[str, list[str]]]:
    """{dvc stage name: (the netvlad command it runs, its deps)}."""
    out = {}
    for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = spec.get("do", spec)
        words = body["cmd"].split()
        words = words[words.index("netvlad") + 1:]
        command = words[3] if words[0] == "launch" else words[0]
        out[name] = (command, [str(d) for d in body.get("deps", [])])
    return out


def test_every_stage_lists_the_code_it_runs():
    from stages.cli import STAGES

    modules = dict(STAGES)
    for name, (command, deps) in stage_specs().items():
        needed = code_closure(f"stages.{modules[command]}", *COMMON)
        missing = sorted(f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {name!r} runs {missing} but does not list them as deps"
        listed_code = {d for d in deps if d.endswith(".py")}
        assert listed_code <= needed, f"dvc.yaml stage {name!r} lists code it does not run: {listed_code - needed}"


def test_the_closure_follows_imports_inside_functions():
    closure = code_closure("stages.evaluate")
    assert "netvlad_core/evaluation.py" in closure and "netvlad_core/retrieval.py" in closure
    assert "netvlad_core/mining.py" not in closure and "netvlad_core/training/loop.py" not in closure
    assert "netvlad_core/mining.py" in code_closure("stages.train")
