"""The training job end to end against a real MLflow tracking server.

A simulated world's predictions and delayed clicks are written into a real feedback
store; the job (``python -m retrain.job``, in its own process as a launcher runs it)
reads, cleans and splits them, trains, logs and registers; the registered model is
then loaded by alias in a fresh process and scores a DataFrame.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from connectors.registry import REFERENCE_PATH, REFERENCE_TAG, ModelRegistry
from retrain.evaluate import REPORT_PATH, EvaluationReport
from retrain.job import ALIAS, TAG_JOB, TAG_TRIGGER, TAG_WINDOW
from retrain.promote import Gate
from retrain.spec import JobSpec, Trigger
from tests.ctr_world import World, write_store
from tests.mlflow_fixtures import unique_model_name

REPO = Path(__file__).resolve().parents[1]
HOUR = 3_600_000
#: Small and quick: the reference model's defaults are for real traffic.
PARAMS = {"max_epochs": 6, "batch_size": 512, "hidden": [32, 16], "embedding_dim": 8,
          "buckets": 4096, "patience": 2, "lr": 0.01}


def spec(tmp: Path, uri: str, model: str, window: tuple[int, int], **kw: object) -> JobSpec:
    args: dict[str, object] = {
        "job_id": f"job-{model}-{kw.pop('n', 1)}", "model": model, "base_version": None,
        "data_start_ms": window[0], "data_end_ms": window[1], "store": str(tmp / "store"),
        "tracking_uri": uri, "params": PARAMS, "seed": 7, "budget_s": 300.0, "min_rows": 1000,
        "trigger": Trigger(kind="incident", model=model, reason="click rate dropped", at_ms=window[1],
                           incident_id=f"performance_drop/{model}/click_rate@{window[1]}",
                           incident_kind="performance_drop")}
    args.update(kw)
    return JobSpec(**args)  # type: ignore[arg-type]


def run_job_process(tmp: Path, s: JobSpec) -> tuple[int, dict[str, object], str]:
    spec_path = tmp / f"{s.job_id}.json"
    result_path = tmp / f"{s.job_id}.result.json"
    spec_path.write_text(s.to_json())
    proc = subprocess.run([sys.executable, "-m", "retrain.job", "--spec", str(spec_path),
                           "--result", str(result_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, json.loads(result_path.read_text()), proc.stderr


def test_a_job_registers_a_version_with_its_metadata_that_scores_by_alias_in_a_fresh_process(
        mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    window = write_store(tmp_path / "store", World(seed=1), rows=12_000, seed=1, model=model)
    rc, result, stderr = run_job_process(tmp_path, spec(tmp_path, mlflow_server, model, window))
    assert rc == 0, stderr[-3000:]
    assert result["status"] == "succeeded"
    version = str(result["model_version"])

    registry = ModelRegistry(mlflow_server)
    assert registry.version_by_alias(model, ALIAS) == version
    tags = registry.version_tags(model, version) or {}
    assert tags[TAG_JOB] == f"job-{model}-1"
    assert json.loads(tags[TAG_TRIGGER])["incident_kind"] == "performance_drop"
    assert tags[TAG_WINDOW] == f"{window[0]}-{window[1]}"
    assert tags[REFERENCE_TAG] == REFERENCE_PATH
    assert 0.5 < float(tags["driftloop.holdout_auc"]) <= 1.0

    run = registry.run_data(str(result["run_id"]))
    assert run["status"] == "FINISHED"
    assert run["params"]["trigger"] == "incident" and run["params"]["data.holdout"] != "0"
    assert run["params"]["clean.rows_in"] == "12000"
    assert int(run["params"]["clean.duplicate_predictions"]) == 0
    history = registry.metric_history(str(result["run_id"]), "val_loss")
    assert len(history) >= 2 and [s for s, _ in history] == sorted(s for s, _ in history)
    window_doc = json.loads(registry.download_artifact(model, version, "data/window.json") or b"{}")
    assert window_doc["start_ms"] == window[0] and window_doc["sizes"]["holdout"] > 0
    reference = json.loads(registry.reference_json(model, version) or "{}")
    assert "f.age" in reference["profile"]["numeric"] and reference["source"].startswith("training:")

    # The evaluation report of a first model: no champion, so no paired tests.
    report = EvaluationReport.from_json(registry.download_artifact(model, version, REPORT_PATH) or b"")
    assert report.champion is None and report.auc_test is None and report.logloss_test is None
    assert report.rows == window_doc["sizes"]["holdout"] and 0 < report.positives < report.rows
    assert report.window.start_ms == window_doc["holdout_start_ms"] <= report.window.end_ms < window[1]
    assert report.challenger.auc == pytest.approx(float(tags["driftloop.holdout_auc"]), rel=1e-5)
    # The counts the calibration ratio is made of, which the gate's interval needs.
    c = report.challenger
    assert (c.positives, c.rows) == (report.positives, report.rows)
    assert float(tags["driftloop.holdout_positives"]) == report.positives
    expected_tag = float(tags["driftloop.holdout_expected_positives"])
    assert c.expected_positives == pytest.approx(expected_tag, rel=1e-5)
    assert c.calibration == pytest.approx(report.positives / c.expected_positives)  # type: ignore[operator]
    assert (report.challenger.size_bytes or 0) > 10_000 and (report.challenger.latency_ms_per_1000 or 0) > 0
    assert report.challenger.ndcg_at_k is None  # the simulated recommender sends no request ids
    assert run["metrics"]["eval.auc"] == pytest.approx(report.challenger.auc)

    # A recommender: a fresh process that knows only the tracking URI and the alias.
    script = textwrap.dedent(f"""
        import json, mlflow, pandas as pd
        mlflow.set_tracking_uri({mlflow_server!r})
        m = mlflow.pyfunc.load_model("models:/{model}@{ALIAS}")
        df = pd.DataFrame({{"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i9999"],
                            "age": [30.0, 51.0, None], "device": ["ios", "web", None],
                            "category": ["c1", "c2", "c3"]}})
        print(json.dumps([float(x) for x in m.predict(df)]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)


def test_fine_tuning_on_a_shifted_world_beats_the_champion_there(mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    old = write_store(tmp_path / "store", World(seed=3), rows=15_000, seed=3, model=model)
    rc, first, stderr = run_job_process(tmp_path, spec(tmp_path, mlflow_server, model, old))
    assert rc == 0, stderr[-3000:]
    champion = str(first["model_version"])
    ModelRegistry(mlflow_server).set_alias(model, "champion", champion)

    new = write_store(tmp_path / "store", World(seed=3, shift=0.8), rows=15_000, seed=4,
                      start_ms=old[1] + HOUR, model=model)
    rc, second, stderr = run_job_process(
        tmp_path, spec(tmp_path, mlflow_server, model, new, n=2, base_version=champion))
    assert rc == 0, stderr[-3000:]
    m = second["metrics"]
    assert isinstance(m, dict)
    # The same holdout (the newest slice of the shifted world) scores both models.
    assert m["holdout_auc"] > m["champion_holdout_auc"] + 0.03, m
    assert m["holdout_log_loss"] < m["champion_holdout_log_loss"], m
    registry = ModelRegistry(mlflow_server)
    assert registry.version_by_alias(model, ALIAS) == str(second["model_version"])
    assert registry.version_by_alias(model, "champion") == champion  # promotion is not the job's

    # The evaluation report: the challenger against the base version, paired on one holdout.
    report = EvaluationReport.from_json(
        registry.download_artifact(model, str(second["model_version"]), REPORT_PATH) or b"")
    assert report.champion is not None and report.champion_version == champion
    assert report.auc_test is not None and report.logloss_test is not None
    assert report.auc_test.diff == pytest.approx(m["holdout_auc"] - m["champion_holdout_auc"], abs=1e-6)
    assert report.auc_test.p_one_sided < 0.01 and report.auc_test.se > 0
    assert report.logloss_test.diff < 0 and report.logloss_test.ci_high < 0
    # A warm start keeps the architecture: the same size, give or take the config's digits.
    assert report.champion.size_bytes == pytest.approx(report.challenger.size_bytes, rel=0.01)
    assert (report.champion.latency_ms_per_1000 or 0) > 0
    assert m["eval.auc_diff"] == pytest.approx(report.auc_test.diff)
    assert m["eval.auc_p"] == pytest.approx(report.auc_test.p_one_sided)
    assert m["eval.logloss_diff"] == pytest.approx(report.logloss_test.diff)
    run = registry.run_data(str(second["run_id"]))
    assert run["metrics"]["eval.auc_diff"] == pytest.approx(report.auc_test.diff)
    decision = Gate().decide(report)  # what the promoter will decide on
    assert decision.promote, decision.reason


@pytest.mark.parametrize("case", ["empty", "too_small"])
def test_a_window_that_is_empty_or_too_small_fails_cleanly(mlflow_server: str, tmp_path: Path,
                                                           case: str) -> None:
    model = unique_model_name("ctr")
    window = write_store(tmp_path / "store", World(seed=5), rows=300, seed=5, model=model)
    if case == "empty":
        window = (window[1] + 10 * HOUR, window[1] + 11 * HOUR)
    rc, result, _ = run_job_process(tmp_path, spec(tmp_path, mlflow_server, model, window))
    assert rc == 1 and result["status"] == "failed"
    assert result["code"] == ("empty_window" if case == "empty" else "too_few_rows")
    assert "min_rows" in str(result["reason"]) or case == "empty"
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.search_model_versions(f"name='{model}'") == []
    run = ModelRegistry(mlflow_server).run_data(str(result["run_id"]))
    assert run["status"] == "FAILED" and run["tags"]["driftloop.failure"] == result["code"]


def test_a_run_whose_loss_goes_nan_registers_nothing_and_says_why(mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    window = write_store(tmp_path / "store", World(seed=6), rows=5_000, seed=6, model=model)
    rc, result, _ = run_job_process(tmp_path, spec(tmp_path, mlflow_server, model, window,
                                                   params={**PARAMS, "lr": 1e30}))
    assert rc == 1 and result["status"] == "failed" and result["code"] == "non_finite_loss"
    assert "epoch" in str(result["reason"])
    assert MlflowClient(tracking_uri=mlflow_server).search_model_versions(f"name='{model}'") == []
    assert ModelRegistry(mlflow_server).run_data(str(result["run_id"]))["status"] == "FAILED"
