"""What the package declares and installs: runtime dependencies the daemon imports."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DAEMON_TREES = ("tlshd", "supervisor", "workers")
# Distribution name -> top-level module it provides.
MODULE_OF = {"pyopenssl": "OpenSSL"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for tree in DAEMON_TREES:
        for path in (REPO / tree).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_daemon() -> None:
    imported = _imported_top_levels()
    runtime = [_dist_name(r) for r in PYPROJECT["project"]["dependencies"]]
    assert runtime, "no runtime dependencies parsed"
    unused = [d for d in runtime if MODULE_OF.get(d, d) not in imported]
    assert not unused, f"declared but never imported by {DAEMON_TREES}: {unused}"


def test_pyroute2_is_a_test_oracle_only() -> None:
    runtime = [_dist_name(r) for r in PYPROJECT["project"]["dependencies"]]
    test_extras = [_dist_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]]
    assert "pyroute2" not in runtime and "pyroute2" in test_extras
    assert "pyroute2" not in _imported_top_levels()
