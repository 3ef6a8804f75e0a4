"""The house rules, checked on the source: dvc.yaml's deps match the import graph, src/ uses
public framework APIs only, no module outgrows one concern, src/model.py is torch-only."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check_params", "preprocess", "train", "evaluate", "register")


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` (its imports run only when the file is a script)."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (inside functions too), but not in its
    `__main__` guard. `from src import tracking` counts as src.tracking."""
    tree = ast.parse(path.read_text())
    guards = {id(n) for n in ast.walk(tree) if _is_main_guard(n)}
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if id(node) in guards:
            skipped.update(id(n) for n in ast.walk(node))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def project_file(module: str) -> Path | None:
    """The file of a project module (src.x -> src/x.py), or None for anything else."""
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if module.startswith(("src.", "pipeline.")) and path.exists() else None


def import_closure(script: Path) -> set[str]:
    """The project files `script` runs: itself and every project module it imports, transitively,
    as paths relative to the repository."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(p for m in imported_modules(path) if (p := project_file(m)) is not None)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_runs_as_a_module_of_the_checkout_it_is_in(stage):
    """`python -m pipeline.<stage>` imports the src/ beside it (the cwd comes first on sys.path),
    so a queued or temp experiment runs its own copy's code, not the workspace's."""
    assert dvc_stages()[stage]["cmd"].split()[:3] == ["python", "-m", f"pipeline.{stage}"]


# Code a stage runs without importing it: the model file that MLflow stores with the logged
# model and runs at load time (models-from-code, passed to log_model by path).
BY_PATH = {"train": {"src/mlflow_model.py"}}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stages_deps_are_the_code_it_imports(stage):
    code = {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py")}
    assert code == import_closure(ROOT / "pipeline" / f"{stage}.py") | BY_PATH.get(stage, set())


def test_import_closure_follows_function_level_imports_and_skips_main_guards(tmp_path):
    """The checker itself: a function-level import counts, a __main__ guard's does not."""
    assert "src/preprocess.py" in import_closure(ROOT / "pipeline" / "train.py")  # in a function
    assert "src/summary.py" not in import_closure(ROOT / "src" / "model.py")  # in the guard


SRC = sorted((ROOT / "src").glob("*.py"))
# Private framework modules and probes, undocumented switches, and malloc tuning (issue 26).
FORBIDDEN = {
    r"\b_internal\b|\b_private\b": "a framework's private module",
    r"torch\.cpu\._is_|\bcpu\._is_": "torch's private CPU probes",
    r"\bRAY_TRAIN_[A-Z_]+|\bTHP_MEM_ALLOC_ENABLE\b": "an undocumented environment flag",
    r"\bctypes\b|\bmallopt\b": "glibc tuning through ctypes",
    r"NO_UPLOAD|get_storage\(\)": "writing into Ray's run folder behind its back",
    r"bucket_cap_mb": "a DDP setting used for a side effect",
    r"\bdef _[a-z]\w*\(self": None,  # checked below: no override of a framework's private method
}


@pytest.mark.parametrize("path", SRC, ids=lambda p: p.name)
def test_src_uses_public_framework_apis_only(path):
    text = path.read_text()
    for pattern, what in FORBIDDEN.items():
        if what is None:
            continue
        found = re.search(pattern, text)
        assert found is None, f"{path.name}: {what}: {found.group(0)!r}"
    tree = ast.parse(text)
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        bases = {ast.unparse(b) for b in cls.bases}
        project_bases = {
            b for b in bases if b in {c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
        }
        foreign = (
            bases
            - project_bases
            - {
                "object",
                "Exception",
                "KeyboardInterrupt",
                "BaseModel",
                "Section",
                "nn.Module",
                "ValueError",
            }
        )
        if not foreign:
            continue
        private = [
            f.name
            for f in cls.body
            if isinstance(f, ast.FunctionDef)
            and f.name.startswith("_")
            and not f.name.startswith("__")
        ]
        assert not private, f"{path.name}: {cls.name}({', '.join(bases)}) overrides {private}"


@pytest.mark.parametrize("path", SRC, ids=lambda p: p.name)
def test_no_module_outgrows_one_concern(path):
    assert len(path.read_text().splitlines()) <= 620, path.name


def test_the_model_imports_only_torch_and_the_standard_library():
    modules = {m.split(".")[0] for m in imported_modules(ROOT / "src" / "model.py")}
    foreign = {m for m in modules - {"torch", "__future__"} if m not in sys.stdlib_module_names}
    assert not foreign
    config = imported_modules(ROOT / "src" / "config.py")
    assert "src.model" in config  # the dependency goes one way: config -> model
