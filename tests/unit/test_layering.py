"""STYLE.md §1: a module imports only from rows below its own; only the connector imports vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "cachegen"
# Row of each top-level part of the library; a module may import its own part or any lower row.
ROWS = {"spec": 0, "config": 0, "errors": 0, "obs": 0, "model": 0, "codec": 1, "store": 1, "stream": 2, "connector": 3}
SIBLINGS_APART = {("codec", "store"), ("store", "codec")}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _library_modules():
    for path in sorted(ROOT.rglob("*.py")):
        if "_proto" in path.parts:
            continue
        relative = path.relative_to(ROOT.parent).with_suffix("")
        yield path, ".".join(relative.parts)


def test_imports_follow_the_rows():
    problems = []
    for path, module in _library_modules():
        own = _part(module)
        if own not in ROWS:
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ("server", "bench", "tests"):
                problems.append(f"{module} imports {name}: the library never imports the layers above it")
            if top == "vllm" and module != "cachegen.connector.vllm_v1":
                problems.append(f"{module} imports {name}: only cachegen.connector.vllm_v1 may import vllm")
            if top != "cachegen" or name == "cachegen":
                continue
            other = _part(name)
            if other == own or other not in ROWS:
                continue
            is_leaf_pair = ROWS[other] == ROWS[own] == 0  # the leaves may use one another
            if (ROWS[other] >= ROWS[own] and not is_leaf_pair) or (own, other) in SIBLINGS_APART:
                problems.append(f"{module} imports {name}: row {ROWS[other]} is not below row {ROWS[own]}")
    assert not problems, "\n".join(problems)


def test_every_library_part_has_a_row():
    parts = {_part(module) for _, module in _library_modules()} - {"", "__init__"}
    assert parts <= set(ROWS), f"give these parts a row in ROWS: {sorted(parts - set(ROWS))}"
