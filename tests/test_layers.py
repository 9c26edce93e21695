"""The floors only look down: base package -> conversion -> benchmarks (and the command line).

Two checks: every import statement in the source (lazy ones inside functions included) names
only its own floor or lower ones; and each module imported alone in a fresh interpreter pulls in
no higher floor.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE, CONVERSION, BENCHMARKS = (
    "crowdplay_minari",
    "crowdplay_minari.conversion",
    "crowdplay_minari.benchmarks",
)
FLOOR_FOLDERS = {BASE: REPO / "crowdplay_minari", CONVERSION: REPO / "conversion"}
FLOOR_FOLDERS[BENCHMARKS] = REPO / "benchmarks"
ORDER = (BASE, CONVERSION, BENCHMARKS)


def _floor(module: str) -> str | None:
    """The floor a `crowdplay_minari...` module lives on (None: not ours)."""
    if module != BASE and not module.startswith(BASE + "."):
        return None
    for floor in (BENCHMARKS, CONVERSION):
        if module == floor or module.startswith(floor + "."):
            return floor
    return BASE


def _modules(floor: str) -> dict[str, Path]:
    folder = FLOOR_FOLDERS[floor]
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join((floor, *parts))
        if _floor(name) == floor and parts[-1:] != ("__main__",):
            found[name] = path
    return found


ALL_MODULES = {name: path for floor in ORDER for name, path in _modules(floor).items()}


def _imported_names(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append((node.lineno, target))
            # `from crowdplay_minari import conversion` imports the floor by attribute.
            names += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return names


def test_the_floors_are_found() -> None:
    assert {"crowdplay_minari.loading", "crowdplay_minari.raw.reader"} <= set(ALL_MODULES)
    assert "crowdplay_minari.conversion.convert" in ALL_MODULES
    assert "crowdplay_minari.benchmarks.offline_atari.scheduling" in ALL_MODULES
    assert "crowdplay_minari.benchmarks.cli" in ALL_MODULES


def test_no_import_climbs_to_a_higher_floor() -> None:
    climbing = []
    for module, path in ALL_MODULES.items():
        own = ORDER.index(_floor(module))
        for line, target in _imported_names(module, path):
            floor = _floor(target)
            if floor is not None and ORDER.index(floor) > own and target in ALL_MODULES:
                climbing.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not climbing, "imports that climb up a floor:\n" + "\n".join(climbing)


def test_every_import_of_our_own_modules_names_one_that_exists() -> None:
    """Lazy imports inside functions run only on their path: a wrong one (a relative import
    counted one level short) would fail a user, not the import-time checks."""
    missing = []
    for module, path in ALL_MODULES.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
            else:
                continue
            if _floor(target) is not None and target not in ALL_MODULES:
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("crowdplay_minari"))))
"""


def _loaded_by(module: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, f"importing {module} failed:\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("floor", [BASE, CONVERSION])
def test_each_module_alone_pulls_in_no_higher_floor(floor: str) -> None:
    modules = sorted(_modules(floor))
    higher = ORDER[ORDER.index(floor) + 1 :]
    with ThreadPoolExecutor(2) as pool:
        loaded = dict(zip(modules, pool.map(_loaded_by, modules), strict=True))
    offenders = {
        module: [m for m in names if _floor(m) in higher]
        for module, names in loaded.items()
        if any(_floor(m) in higher for m in names)
    }
    assert not offenders, offenders
    assert all(module in names for module, names in loaded.items())
