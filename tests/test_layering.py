"""The dependency direction of DESIGN.md section 1, checked on the source.

``monitor -> retrain -> connectors``, never back; and the statistical cores import
nothing that does I/O, so every rule in them is testable with plain arrays.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Pure cores: numbers in, numbers out. No Kafka, no files, no network, no clock.
CORES = ["monitor/profile.py", "monitor/drift.py", "monitor/performance.py",
         "monitor/sequential.py", "monitor/incidents.py", "monitor/join.py",
         "monitor/labels.py", "monitor/windows.py", "monitor/live.py"]
#: Composition roots may wire everything (STYLE.md section 2): the training job's entry
#: point builds the new version's reference with the monitor's profile code.
COMPOSITION_ROOTS = {"retrain/job.py"}
IO_MODULES = {"connectors", "kafka", "sqlite3", "socket", "http", "urllib", "httpx", "requests",
              "mlflow", "subprocess", "time", "datetime", "pyarrow.parquet", "pyarrow.ipc"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("package, forbidden", [
    ("connectors", {"monitor", "retrain"}),
    ("retrain", {"monitor"}),
])
def test_dependencies_point_one_way(package: str, forbidden: set[str]) -> None:
    bad = {str(p.relative_to(REPO)): sorted(n for n in _imports(p) if _top(n) in forbidden)
           for p in (REPO / package).rglob("*.py")
           if str(p.relative_to(REPO)) not in COMPOSITION_ROOTS}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("core", CORES)
def test_statistical_cores_do_no_io(core: str) -> None:
    names = _imports(REPO / core)
    bad = sorted(n for n in names if n in IO_MODULES or _top(n) in IO_MODULES)
    assert not bad, f"{core} imports {bad}"


#: The demo's simulated recommender is not driftloop: it loads the registered model with
#: ``mlflow.pyfunc.load_model``, as a recommender does.
RECOMMENDER_STAND_INS = {"monitor/simulate.py"}


def test_only_connectors_import_mlflow() -> None:
    """MLflow's client stays behind connectors/registry.py (STYLE.md section 7)."""
    bad = {str(p.relative_to(REPO)): sorted(n for n in _imports(p) if _top(n) == "mlflow")
           for pkg in ("monitor", "retrain") for p in (REPO / pkg).rglob("*.py")
           if str(p.relative_to(REPO)) not in RECOMMENDER_STAND_INS}
    assert not {k: v for k, v in bad.items() if v}
