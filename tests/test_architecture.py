"""The layers of ARCHITECTURE.md: no module imports a layer above its own (function-level
imports included), and the core loads neither plotting nor table libraries."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
FOLDERS = {"tokendrop": "tokendrop", "eval": "tokendrop.eval", "adapters": "tokendrop.adapters"}
CORE = (
    "tokendrop.patch",
    "tokendrop.method",
    "tokendrop.selection",
    "tokendrop.scoring",
    "tokendrop.layout",
    "tokendrop.registry",
    "tokendrop.adapters",
)
COMMAND_LINE = ("tokendrop.cli", "tokendrop.__main__")


def layer(module: str) -> int:
    """0 core, 1 harnesses, 2 evaluation, 3 command line."""
    if module == "tokendrop" or module.startswith(COMMAND_LINE):
        return 3 if module != "tokendrop" else 0  # the package root only re-exports, lazily
    if module.startswith("tokendrop.eval"):
        return 2
    return 0 if module.startswith(CORE) else 1


def modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            yield name, path, path.name == "__init__.py"


def imports(name: str, path: Path, is_package: bool):
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                target = node.module
            else:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)  # `from . import x` names a module


def test_no_module_imports_a_layer_above_its_own():
    known = {name for name, _, _ in modules()}
    upward = []
    for name, path, is_package in modules():
        for target in imports(name, path, is_package):
            if target in known and layer(target) > layer(name) and name != "tokendrop":
                upward.append(f"{name} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_core_loads_no_plotting_or_table_library():
    heavy = []
    for name, path, is_package in modules():
        if layer(name) == 0 and name != "tokendrop":
            heavy += [
                f"{name} imports {t}"
                for t in imports(name, path, is_package)
                if t.split(".")[0] in ("matplotlib", "rich", "datasets")
            ]
    assert not heavy, "\n".join(heavy)
