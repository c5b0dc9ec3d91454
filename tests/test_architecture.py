"""The layers of ARCHITECTURE.md: no module imports a layer above its own (function-level
imports included), adapters import no method, selection or patch code, and the core loads
neither plotting nor table libraries."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = {"tokendrop": "tokendrop", "eval": "tokendrop.eval", "adapters": "tokendrop.adapters"}
# bottom to top; a module belongs to the first layer one of whose prefixes it starts with
LAYERS = [
    (
        "base",
        (
            "tokendrop.layout",
            "tokendrop.scoring",
            "tokendrop.selection",
            "tokendrop.registry",
            "tokendrop.checks",
            "tokendrop.compaction",
            "tokendrop.family",
        ),
    ),
    ("methods", ("tokendrop.method",)),
    ("adapters", ("tokendrop.adapters",)),
    ("patch", ("tokendrop.patch", "tokendrop.pruning")),
    ("integrations", ("tokendrop.integrations",)),
    ("evaluation", ("tokendrop.eval",)),
    ("command line", ("tokendrop.cli", "tokendrop.__main__")),
]
HARNESSES = "harnesses"  # every other module of the package: between the integrations and evaluation
ORDER = ["base", "methods", "adapters", "patch", "integrations", HARNESSES, "evaluation", "command line"]
CORE = ("base", "methods", "adapters", "patch")  # what a user who only patches a model loads


def layer(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return HARNESSES


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


def upward_imports(sources) -> list[str]:
    """`module imports target` for every import of a known module from a layer above its own;
    the package root only re-exports, lazily, and stands outside the layers."""
    sources = list(sources)
    known = {name for name, _, _ in sources}
    return [
        f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        for name, path, is_package in sources
        if name != "tokendrop"
        for target in imports(name, path, is_package)
        if target in known and target != "tokendrop" and ORDER.index(layer(target)) > ORDER.index(layer(name))
    ]


def test_every_module_has_a_layer_and_the_listed_ones_exist():
    names = {name for name, _, _ in modules()}
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), f"{prefix} names no module"


def test_no_module_imports_a_layer_above_its_own():
    upward = upward_imports(modules())
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    "module, planted",
    [
        ("tokendrop.adapters.llava_next", "from tokendrop.patch import patch"),
        ("tokendrop.method.hired", "from ..adapters import adapter_for"),
        ("tokendrop.selection", "from .method import METHODS"),
        ("tokendrop.patch", "from .integrations import vllm"),
        ("tokendrop.profiler", "from .eval import sweep"),
    ],
)
def test_a_planted_upward_import_is_caught(module, planted, tmp_path):
    sources = []
    for name, path, is_package in modules():
        if name == module:
            path = tmp_path / path.name
            path.write_text(planted + "\n")
        sources.append((name, path, is_package))
    upward = upward_imports(sources)
    assert upward and all(line.startswith(f"{module} (") for line in upward), upward


def test_adapters_import_no_method_selection_or_patch_code():
    forbidden = ("tokendrop.method", "tokendrop.selection", "tokendrop.patch", "tokendrop.pruning")
    found = [
        f"{name} imports {target}"
        for name, path, is_package in modules()
        if layer(name) == "adapters"
        for target in imports(name, path, is_package)
        if target.startswith(forbidden)
    ]
    assert not found, "\n".join(found)


def test_the_core_loads_no_plotting_or_table_library():
    heavy = []
    for name, path, is_package in modules():
        if layer(name) in CORE and name != "tokendrop":
            heavy += [
                f"{name} imports {t}"
                for t in imports(name, path, is_package)
                if t.split(".")[0] in ("matplotlib", "rich", "datasets")
            ]
    assert not heavy, "\n".join(heavy)
