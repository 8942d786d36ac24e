"""The house, drawn from the imports: dependencies point one way.

``sora2 → flows → tasks → nanophoto``; the simulator stands beside the client
and reads only its contract; ``nanophoto`` imports nothing from Prefect.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
# What each package may import, of ours (and whether Prefect).
ALLOWED: Final = {
    "nanophoto": {"nanophoto"},
    "nanophoto_simulator": {"nanophoto_simulator", "nanophoto"},
    "tasks": {"tasks", "nanophoto"},
    "flows": {"flows", "tasks", "nanophoto"},
    "deployments": {"deployments", "flows", "tasks", "nanophoto"},
    "sora2": {"sora2", "flows", "tasks", "nanophoto", "nanophoto_simulator"},
}
PREFECT_FREE: Final = {"nanophoto", "nanophoto_simulator"}


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level names each module of ``package`` imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_no_import_runs_back_up() -> None:
    ours = set(ALLOWED)
    for package, allowed in ALLOWED.items():
        for module, names in imports_of(package).items():
            wrong = (names & ours) - allowed
            assert not wrong, f"{module} imports {sorted(wrong)}"


def test_the_client_and_the_simulator_import_nothing_from_prefect() -> None:
    for package in PREFECT_FREE:
        for module, names in imports_of(package).items():
            assert "prefect" not in names, f"{module} imports prefect"
