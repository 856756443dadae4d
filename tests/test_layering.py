"""The dependency rules of docs/architecture.md, checked on the source, package by package.

Each package says which packages it may import, and the pure ones also which standard
modules they may not (I/O, the clock, logging): a new module is held to its package's
rule the moment it exists, with no list of files to keep up to date.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: package -> the driftloop packages its modules may import (itself always).
ALLOWED: dict[str, set[str]] = {
    "monitor.stats": set(),
    "monitor.detectors": {"monitor.stats"},
    "connectors": set(),
    "retrain": {"connectors", "monitor.stats", "monitor.detectors"},
    # The stages: the pure leaves, the edges, the training side; never the service
    # that wires them, the demo or the testbed.
    "monitor": {"monitor.stats", "monitor.detectors", "connectors", "retrain"},
    "monitor.service": {"monitor", "monitor.stats", "monitor.detectors", "connectors", "retrain"},
    "monitor.testbed": {"monitor", "monitor.stats", "monitor.detectors", "connectors", "retrain"},
    "monitor.demo": {"monitor", "monitor.stats", "monitor.detectors", "monitor.service", "monitor.testbed",
                     "connectors", "retrain"},
}
#: Pure packages: numbers in, numbers out. No Kafka, no files, no network, no clock, no logging.
PURE = ("monitor.stats", "monitor.detectors")
#: The stages that are pure too, beside the analysis that does their I/O.
PURE_STAGES = ("monitor.incidents", "monitor.join", "monitor.stalls", "monitor.windows")
FORBIDDEN_IN_PURE = {"connectors", "kafka", "sqlite3", "socket", "http", "urllib", "httpx", "requests",
                     "mlflow", "subprocess", "time", "datetime", "logging", "threading", "os",
                     "pyarrow.parquet", "pyarrow.ipc"}
OURS = ("monitor", "retrain", "connectors")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in OURS:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), path))
    return out


def _package(module: str) -> str:
    """The most specific package of ALLOWED that holds ``module``."""
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_each_module_imports_only_what_its_package_may(module: str, path: Path) -> None:
    package = _package(module)
    allowed = ALLOWED[package] | {package}
    bad = sorted(n for n in _imports(path) if n.split(".", 1)[0] in OURS and _package(n) not in allowed)
    assert not bad, f"{module} ({package}) imports {bad}; {package} may import {sorted(allowed)}"


@pytest.mark.parametrize(("module", "path"), [(m, p) for m, p in _modules()
                                              if _package(m) in PURE or m in PURE_STAGES])
def test_pure_modules_do_no_io_read_no_clock_and_log_nothing(module: str, path: Path) -> None:
    bad = sorted(n for n in _imports(path)
                 if n in FORBIDDEN_IN_PURE or n.split(".", 1)[0] in FORBIDDEN_IN_PURE)
    assert not bad, f"{module} imports {bad}"


def test_every_package_has_a_rule() -> None:
    assert {_package(m) for m, _ in _modules()} <= set(ALLOWED)
    assert {p for p in ALLOWED if (REPO / p.replace(".", "/")).is_dir()} == set(ALLOWED)


#: The demo's simulated recommender is not driftloop: it loads the registered model with
#: ``mlflow.pyfunc.load_model``, as a recommender does.
RECOMMENDER_STAND_INS = {"monitor.testbed.world"}


def test_only_connectors_import_mlflow() -> None:
    """MLflow's client stays behind connectors/registry.py."""
    bad = {m: sorted(n for n in _imports(p) if n.split(".", 1)[0] == "mlflow")
           for m, p in _modules() if not m.startswith("connectors") and m not in RECOMMENDER_STAND_INS}
    assert not {k: v for k, v in bad.items() if v}
