"""Imports run one way: a module imports only from its own layer or the layers below it, also
inside functions (docs/architecture.md, "Layers").

The layers are those of the import-linter contract in pyproject.toml (`lint-imports` checks them
too); this test reads every ``import`` in src/smelt with `ast`, function-level and TYPE_CHECKING
ones included, so plain pytest fails on an upward import and names its file and line.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "smelt"


def contract_layers() -> list[tuple[list[str], bool]]:
    """The layers contract of pyproject.toml, lowest first: ([module, ...], independent). Siblings
    are separated by ``:`` (may import each other) or ``|`` (may not); ``(name)``: optional."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    layers = []
    for entry in reversed(contract["layers"]):  # the contract lists the highest first
        sep = "|" if "|" in entry else ":"
        layers.append(([m.strip().strip("()") for m in entry.split(sep)], sep == "|" and sep in entry))
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    p = SRC.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported smelt module) for every import statement anywhere in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "smelt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 packages
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "smelt":
                continue
            for a in node.names:  # `from smelt.train import checkpoint` imports smelt.train.checkpoint
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if is_module(sub) else target))
    return list(dict.fromkeys(out))  # once per (line, module)


def layer_of(module: str, layers: list[tuple[list[str], bool]]) -> tuple[int, str] | None:
    """(layer index, the layer's module) for ``module``; the root package ``smelt`` is below all."""
    if module == "smelt":
        return -1, "smelt"
    for i, (members, _) in enumerate(layers):
        for m in members:
            if module == m or module.startswith(m + "."):
                return i, m
    return None


def violations(files: list[Path]) -> list[str]:
    layers = contract_layers()
    found = []
    for path in files:
        module = module_name(path)
        mine = layer_of(module, layers)
        rel = path.relative_to(ROOT)
        if mine is None:
            found.append(f"{rel}: {module} is in no layer (add it to [tool.importlinter] in pyproject.toml)")
            continue
        for line, target in imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            theirs = layer_of(target, layers)
            if theirs is None:
                found.append(f"{rel}:{line}: {module} imports {target}, which is in no layer")
            elif theirs[0] > mine[0]:
                found.append(f"{rel}:{line}: {module} ({mine[1]}) imports {target} ({theirs[1]}), a higher layer")
            elif theirs[0] == mine[0] >= 0 and theirs[1] != mine[1] and layers[mine[0]][1]:
                found.append(f"{rel}:{line}: {module} imports {target}: independent layers ({mine[1]} | {theirs[1]})")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    problems = violations(files)
    assert not problems, "upward imports (pass a callback instead):\n" + "\n".join(problems)


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = "def f():\n    from smelt.eval.runner import evaluate_in_training\n    import smelt.cli\n"
    assert imports(src, "smelt.train.trainer", False) == [(2, "smelt.eval.runner"), (3, "smelt.cli")]
    assert imports("from . import checkpoint\n", "smelt.train.trainer", False) == [(1, "smelt.train.checkpoint")]
    assert imports("from ..config import Recipe\n", "smelt.train.trainer", False) == [(1, "smelt.config")]
    layers = contract_layers()
    assert layer_of("smelt.train.trainer", layers) < layer_of("smelt.eval.runner", layers)  # type: ignore[operator]
    assert [m for m, _ in layers][0] == ["smelt.fsutil"] and [m for m, _ in layers][-1] == ["smelt.__main__"]
