"""Keyword parameters of a bgexp callable read from its source, without importing it.

The first, import-free pass of the config check (bgexp/training/validation.py) runs before torch,
OpenMM and Lightning are loaded (seconds on a busy machine), so that a misspelled key in a
`_target_` node (`+target.k_dimr=5`, `+flow.transform.n_couplingz=3`) is refused in about a
second. `static_parameters("bgexp.targets.DimerTarget")` parses the module files with `ast`,
follows re-exports (`from bgexp.targets.dimer import DimerTarget`, relative imports too) and
returns the keyword parameters of the class's `__init__` (or of the function, or the fields of a
dataclass). Whenever the answer cannot be read with certainty (not a bgexp target, no `__init__` of
its own, `**kwargs`, a decorator other than `dataclass`, an assignment) it returns None, and the
second pass, which imports the callable and reads `inspect.signature`, decides.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../bgexp
MAX_HOPS = 8  # re-exports followed before giving up


@lru_cache(maxsize=None)
def _module_ast(module: str) -> ast.Module | None:
    parts = module.split(".")
    if parts[0] != "bgexp":
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return ast.parse(path.read_text(), filename=str(path))
    return None


def _is_package(module: str) -> bool:
    return PACKAGE_ROOT.joinpath(*module.split(".")[1:], "__init__.py").is_file()


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _keywords(fn: ast.FunctionDef, skip_first: bool) -> set[str] | None:
    args = fn.args
    if args.kwarg is not None:
        return None
    positional = [*args.posonlyargs, *args.args][1 if skip_first else 0:]
    return {a.arg for a in [*positional, *args.kwonlyargs]} - {a.arg for a in args.posonlyargs}


def _dataclass_fields(cls: ast.ClassDef) -> set[str]:
    return {stmt.target.id for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and "ClassVar" not in ast.unparse(stmt.annotation)}


def _of_definition(node: ast.AST) -> set[str] | None:
    if isinstance(node, ast.FunctionDef):
        return None if node.decorator_list else _keywords(node, skip_first=False)
    if isinstance(node, ast.ClassDef):
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if decorators:
            if len(decorators) == 1 and decorators[0] in ("dataclass", "dataclasses.dataclass") and not node.bases:
                return _dataclass_fields(node)
            return None
        init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        return None if init is None or init.decorator_list else _keywords(init, skip_first=True)
    return None


def _binds(node: ast.AST, name: str) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.ClassDef)) and sub.name == name:
            return True
        if isinstance(sub, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in sub.names):
            return True
        if isinstance(sub, ast.Name) and sub.id == name and isinstance(sub.ctx, ast.Store):
            return True
    return False


def static_parameters(target: str) -> set[str] | None:
    """The keyword parameters of the bgexp callable `target` (a dotted path), or None when they
    cannot be read from the source with certainty (module docstring)."""
    if not isinstance(target, str) or not target.startswith("bgexp."):
        return None
    module, _, name = target.rpartition(".")
    for _ in range(MAX_HOPS):
        tree = _module_ast(module)
        if tree is None:
            return None
        found = None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found = ("definition", node)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        found = ("import", (_absolute(module, node), alias.name))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = ("other", None)
            elif isinstance(node, (ast.If, ast.Try, ast.With)) and _binds(node, name):
                found = ("other", None)  # bound conditionally: only an import can tell
        if found is None or found[0] == "other":
            return None
        if found[0] == "definition":
            return _of_definition(found[1])
        module, name = found[1]
    return None


__all__ = ["static_parameters"]
