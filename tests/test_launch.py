"""Launchers (retrain/launch.py): real processes for local and torchrun, the Kubernetes
client's own models for manifests, and an injected fake API for Kubernetes calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from retrain.launch import (
    JobNotFound,
    JobStatus,
    KubernetesLauncher,
    LaunchError,
    LocalJobHandle,
    LocalLauncher,
    TorchrunLauncher,
    _group_alive,
    _proc_info,
    parse_result,
)
from retrain.spec import JobSpec, Trigger

REPO = Path(__file__).resolve().parents[1]


def make_spec(job_id: str = "job-1", *, budget_s: float = 1800.0, model: str = "ctr",
              **params: object) -> JobSpec:
    trigger = Trigger(kind="manual", model=model, reason="test", at_ms=0, who="tester")
    return JobSpec(job_id=job_id, model=model, base_version="3", data_start_ms=0, data_end_ms=3_600_000,
                   store="/data/feedback", tracking_uri="http://mlflow:5000", trigger=trigger,
                   params=params, budget_s=budget_s)


def local(**kw: Any) -> LocalLauncher:
    return LocalLauncher(module="tests.fake_jobs", cwd=REPO, **kw)


def start(launcher: LocalLauncher, tmp_path: Path, spec: JobSpec) -> LocalJobHandle:
    d = tmp_path / spec.job_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "spec.json").write_text(spec.to_json())
    return launcher.launch(spec, d / "spec.json", d / "job.log")


def wait_until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def finish(handle: Any, timeout_s: float = 15.0) -> JobStatus:
    box: list[JobStatus] = []

    def done() -> bool:
        box[:] = [handle.poll()]
        return box[0].finished

    wait_until(done, timeout_s)
    return box[0]


def alive(pid: int) -> bool:
    info = _proc_info(pid)
    return info is not None and info.state not in ("Z", "X")


# -- results ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("not json", "not JSON"),
    ("[1]", "JSON object"),
    ('{"status": "ok"}', "'ok'"),
    ('{"status": "failed", "reason": 3}', "reason must be a string"),
])
def test_bad_results_are_rejected_naming_the_problem(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_result(text)


# -- local processes ------------------------------------------------------------------------

def test_local_success_reports_the_result(tmp_path: Path) -> None:
    h = start(local(), tmp_path, make_spec(behaviour="succeed", sleep_s=0.2, model_version="12"))
    assert h.poll().state == "running"
    s = finish(h)
    assert (s.state, s.exit_code) == ("succeeded", 0)
    assert s.result is not None and s.result["model_version"] == "12"
    assert s.reason == "registered version 12"
    assert "fake job job-1 rank 0: succeed" in (tmp_path / "job-1" / "job.log").read_text()
    assert h.poll() is s  # final status is sticky


def test_local_nonzero_exit_is_failed_with_the_log_tail(tmp_path: Path) -> None:
    s = finish(start(local(), tmp_path, make_spec(behaviour="fail_exit")))
    assert (s.state, s.exit_code) == ("failed", 3)
    assert "exited with code 3" in s.reason
    assert "ValueError: the fake job failed on purpose" in s.reason


def test_local_crash_is_failed_with_the_signal_and_log_tail(tmp_path: Path) -> None:
    s = finish(start(local(), tmp_path, make_spec(behaviour="crash")))
    assert s.state == "failed"
    assert s.exit_code == -signal.SIGKILL
    assert "killed by SIGKILL" in s.reason and "about to be killed" in s.reason


def test_local_reported_failure_keeps_the_jobs_reason(tmp_path: Path) -> None:
    s = finish(start(local(), tmp_path, make_spec(behaviour="report_failed")))
    assert s.state == "failed"
    assert s.reason == "only 12 clean rows, at least 1000 needed (exited with code 1)"
    assert s.result is not None and s.result["status"] == "failed"


def test_a_stale_result_from_an_earlier_attempt_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "job-1").mkdir()
    (tmp_path / "job-1" / "result.json").write_text('{"status": "succeeded", "model_version": "1"}')
    s = finish(start(local(), tmp_path, make_spec(behaviour="fail_exit")))
    assert s.state == "failed"


def test_cancel_kills_the_whole_group_even_when_sigterm_is_ignored(tmp_path: Path) -> None:
    h = start(local(grace_s=0.3), tmp_path, make_spec(behaviour="hang", ignore_term=True))
    child_file = tmp_path / "job-1" / "child.pid"
    wait_until(child_file.exists)
    child = int(child_file.read_text())
    assert alive(child) and _group_alive(h.pid)
    t0 = time.monotonic()
    h.cancel("past budget")
    assert time.monotonic() - t0 < 5
    assert not _group_alive(h.pid)
    assert _proc_info(h.pid) is None  # the leader, our child, is reaped
    assert not alive(child)

    def group_gone() -> bool:
        try:
            os.killpg(h.pid, 0)
        except ProcessLookupError:
            return True
        return False

    # The orphaned grandchild is a zombie until init reaps it; then the group is no more.
    wait_until(group_gone, 10)
    s = h.poll()
    assert s.state == "failed" and s.reason == "cancelled: past budget"
    assert s.exit_code == -signal.SIGKILL  # SIGTERM was ignored; the grace ran out


def test_reattached_handle_sees_a_running_job_finish(tmp_path: Path) -> None:
    launcher = local()
    first = start(launcher, tmp_path, make_spec(behaviour="succeed", sleep_s=1.0))
    record = json.loads(json.dumps(first.record()))  # what the store keeps
    again = launcher.attach("job-1", record)
    assert again.poll().state == "running"
    s = finish(again)
    assert s.state == "succeeded" and s.result is not None
    assert first._popen is not None
    first._popen.poll()  # the re-attached handle reaped it; let the Popen know


def test_a_recycled_pid_is_lost_and_never_signalled(tmp_path: Path) -> None:
    launcher = local()
    h = start(launcher, tmp_path, make_spec(behaviour="succeed", sleep_s=0))
    record = h.record()
    finish(h)
    # Another process now holds "our" pid: same pid, another start time.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                start_new_session=True)
    try:
        record.update(pid=stranger.pid, pgid=stranger.pid)
        (tmp_path / "job-1" / "result.json").unlink()
        again = launcher.attach("job-1", record)
        s = again.poll()
        assert s.state == "lost"
        assert f"process {stranger.pid} is gone" in s.reason
        again.cancel("should not touch the stranger")
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_an_unknown_pid_is_lost(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {"launcher": "local", "job_id": "job-1", "pid": gone.pid, "pgid": gone.pid,
              "start_ticks": 1, "boot_id": None, "result_path": str(tmp_path / "result.json"),
              "log_path": str(tmp_path / "job.log"), "started_ms": 0}
    s = local().attach("job-1", record).poll()
    assert s.state == "lost" and s.exit_code is None


def test_a_job_that_ended_unseen_is_judged_by_its_result(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text('{"status": "succeeded", "model_version": "4"}')
    record = {"launcher": "local", "job_id": "job-1", "pid": 2**22 + 17, "start_ticks": 1,
              "result_path": str(tmp_path / "result.json"), "log_path": str(tmp_path / "job.log"),
              "started_ms": 0}
    s = local().attach("job-1", record).poll()
    assert s.state == "succeeded" and s.result is not None and s.result["model_version"] == "4"


def test_attach_refuses_another_launchers_record() -> None:
    with pytest.raises(JobNotFound, match="'kubernetes'"):
        local().attach("job-1", {"launcher": "kubernetes", "name": "x"})
    with pytest.raises(JobNotFound, match="unusable handle record"):
        local().attach("job-1", {"launcher": "local"})


def test_launch_of_a_missing_interpreter_is_a_launch_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="no-such-python"):
        start(LocalLauncher(python=str(tmp_path / "no-such-python")), tmp_path, make_spec())


def test_local_launcher_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="'retrain job'"):
        LocalLauncher(module="retrain job")
    with pytest.raises(ValueError, match="-1"):
        LocalLauncher(grace_s=-1)
    with pytest.raises(ValueError, match="nproc_per_node"):
        TorchrunLauncher(0)


def test_torchrun_command_shape() -> None:
    cmd = TorchrunLauncher(4, python="py").command(make_spec(), Path("s.json"), Path("r.json"))
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                   "-m", "retrain.job", "--spec", "s.json", "--result", "r.json"]


def test_torchrun_runs_every_rank_and_rank_zero_reports(tmp_path: Path) -> None:
    launcher = TorchrunLauncher(2, module="tests.fake_jobs", cwd=REPO)
    s = finish(start(launcher, tmp_path, make_spec(behaviour="succeed", model_version="9")), 60)
    assert s.state == "succeeded" and s.result is not None and s.result["model_version"] == "9"
    text = (tmp_path / "job-1" / "job.log").read_text()
    assert "rank 0: succeed" in text and "rank 1: succeed" in text


# -- Kubernetes: manifests ------------------------------------------------------------------

def launcher_k8s(**kw: Any) -> KubernetesLauncher:
    return KubernetesLauncher("ml-training", "registry.example/driftloop:1.2", **kw)


def test_manifest_validates_against_the_client_models_and_requests_gpus() -> None:
    k = launcher_k8s(gpus=2, node_selector={"gpu": "h100"},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     credentials_secret="driftloop-credentials", cpu="8", memory="32Gi")
    m = k.render(make_spec(budget_s=1800.5))
    job = k.validate(m)
    c = job.spec.template.spec.containers[0]
    assert c.image == "registry.example/driftloop:1.2"
    assert c.command == ["python", "-m", "retrain.job", "--spec", "/spec/spec.json",
                         "--result", "/dev/termination-log"]
    assert c.resources.limits == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "32Gi"}
    assert c.env_from[0].secret_ref.name == "driftloop-credentials"
    assert job.spec.active_deadline_seconds == 1801 + 300
    assert job.spec.backoff_limit == 0 and job.spec.ttl_seconds_after_finished == 86400
    assert job.spec.template.spec.security_context.run_as_non_root is True
    assert job.spec.template.spec.restart_policy == "Never"
    assert job.spec.template.spec.volumes[0].config_map.name == f"{m['metadata']['name']}-spec"
    assert job.spec.template.spec.tolerations[0].key == "nvidia.com/gpu"
    labels = job.metadata.labels
    assert labels["app.kubernetes.io/name"] == "driftloop"
    assert labels["driftloop.io/job-id"] == "job-1" and labels["driftloop.io/model"] == "ctr"
    assert job.spec.template.metadata.labels == labels


def test_awkward_job_ids_make_valid_distinct_names() -> None:
    k = launcher_k8s()
    a = k.render(make_spec("Job_A.2026-01-01T00" + "x" * 100, model="CTR model/v2"))
    b = k.render(make_spec("job_a.2026-01-01T00" + "x" * 100))
    assert a["metadata"]["name"] != b["metadata"]["name"]
    for m in (a, b):
        k.validate(m)
        assert len(m["metadata"]["name"]) <= 63
        assert all(len(v) <= 63 for v in m["metadata"]["labels"].values())
    assert a["metadata"]["annotations"]["driftloop.io/job-id"].startswith("Job_A.")


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    m = launcher_k8s().render(make_spec())
    cur: Any = m
    for p in path[:-1]:
        cur = cur[p]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return m


CONTAINER = ["spec", "template", "spec", "containers", 0]


@pytest.mark.parametrize("path, value, needle", [
    ([*CONTAINER, "image"], KeyError, r"spec\.template\.spec\.containers\[0\]\.image"),
    ([*CONTAINER, "image"], "", r"containers\[0\]\.image"),
    ([*CONTAINER, "command"], "python -m retrain.job", r"containers\[0\]\.command must be a list"),
    (["spec", "backoffLimit"], "zero", r"spec\.backoffLimit must be an integer"),
    (["spec", "activeDeadlineSeconds"], True, r"spec\.activeDeadlineSeconds"),
    (["spec", "template", "spec", "containers"], [], r"containers must be a non-empty list"),
    (["spec", "template", "spec", "restartPolicy"], "Always", "restartPolicy"),
    (["metadata", "name"], "Not_A_DNS_Name", "metadata.name"),
    (["kind"], "Deployment", "kind"),
    ([*CONTAINER, "resources", "limits"], ["nvidia.com/gpu"], r"resources\.limits"),
    ([*CONTAINER, "volumeMounts", 0, "name"], "nope", "'nope' names no volume"),
    # Below our own checks: the client's models name the field.
    ([*CONTAINER, "env", 0, "name"], KeyError, "name"),
])
def test_invalid_manifests_fail_validation_naming_the_field(path: list[Any], value: Any,
                                                            needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        launcher_k8s().validate(_broken(path, value))


def test_launcher_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="'ML_Training'"):
        KubernetesLauncher("ML_Training", "img")
    with pytest.raises(ValueError, match="image"):
        KubernetesLauncher("ml", "")
    with pytest.raises(ValueError, match="gpus"):
        KubernetesLauncher("ml", "img", gpus=-1)


def test_missing_kubernetes_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    k = launcher_k8s()
    m = k.render(make_spec())  # rendering needs no client
    with pytest.raises(ImportError, match=r"driftloop\[kubernetes\]"):
        k.validate(m)


# -- Kubernetes: calls against an injected fake API -------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def ns(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(**kw)


class FakeBatch:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.job: Any = None
        self.fail_create: Exception | None = None

    def create_namespaced_job(self, namespace: str, body: Any) -> Any:
        self.calls.append(("create_namespaced_job", (namespace, body), {}))
        if self.fail_create is not None:
            raise self.fail_create
        return ns(metadata=ns(uid="uid-123", name=body.metadata.name))

    def read_namespaced_job_status(self, name: str, namespace: str) -> Any:
        self.calls.append(("read_namespaced_job_status", (name, namespace), {}))
        if self.job is None:
            raise ApiError(404)
        return self.job

    def delete_namespaced_job(self, name: str, namespace: str, **kw: Any) -> None:
        self.calls.append(("delete_namespaced_job", (name, namespace), kw))
        self.job = None


class FakeCore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.pods: list[Any] = []
        self.log = "line 1\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory\n"

    def create_namespaced_config_map(self, namespace: str, body: Any) -> None:
        self.calls.append(("create_namespaced_config_map", (namespace, body), {}))

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any) -> None:
        self.calls.append(("patch_namespaced_config_map", (name, namespace, body), {}))

    def delete_namespaced_config_map(self, name: str, namespace: str) -> None:
        self.calls.append(("delete_namespaced_config_map", (name, namespace), {}))

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        self.calls.append(("list_namespaced_pod", (namespace,), {"label_selector": label_selector}))
        return ns(items=self.pods)

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> str:
        self.calls.append(("read_namespaced_pod_log", (name, namespace), kw))
        return self.log


def pod(*, exit_code: int | None, message: str | None = None, waiting: str | None = None) -> Any:
    state = ns(terminated=None if exit_code is None else ns(exit_code=exit_code, message=message),
               waiting=None if waiting is None else ns(reason=waiting, message="back-off pulling"))
    return ns(metadata=ns(name="driftloop-job-1-abcde", creation_timestamp=None),
              status=ns(phase="Pending" if waiting else "Succeeded",
                        container_statuses=[ns(name="train", state=state)]))


def job_status(*, active: int = 0, ready: int | None = None, conditions: tuple[Any, ...] = ()) -> Any:
    return ns(status=ns(active=active, ready=ready, conditions=list(conditions), start_time=None,
                        completion_time=None))


def cond(type_: str, reason: str = "", message: str = "") -> Any:
    return ns(type=type_, status="True", reason=reason, message=message, last_transition_time=None)


@pytest.fixture
def k8s(tmp_path: Path) -> tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]:
    batch, core = FakeBatch(), FakeCore()
    k = launcher_k8s(batch_api=batch, core_api=core)
    spec = make_spec()
    (tmp_path / "spec.json").write_text(spec.to_json())
    h = k.launch(spec, tmp_path / "spec.json", tmp_path / "job.log")
    return k, batch, core, h


def test_kubernetes_launch_creates_the_config_map_then_the_job_then_owns_it(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any], tmp_path: Path) -> None:
    import kubernetes

    k, batch, core, h = k8s
    (name, (namespace, cm), _), (pname, (cm_name, _, patch), _) = core.calls
    assert (name, namespace, pname) == ("create_namespaced_config_map", "ml-training",
                                        "patch_namespaced_config_map")
    assert cm.data["spec.json"] == (tmp_path / "spec.json").read_text()
    assert cm.metadata.name == cm_name == "driftloop-job-1-spec"
    assert patch["metadata"]["ownerReferences"][0] == {
        "apiVersion": "batch/v1", "kind": "Job", "name": "driftloop-job-1", "uid": "uid-123",
        "blockOwnerDeletion": False, "controller": False}
    (_, (namespace, body), _), = batch.calls
    assert namespace == "ml-training"
    sent = kubernetes.client.ApiClient().sanitize_for_serialization(body)
    assert sent == k.render(make_spec())
    assert h.record()["name"] == "driftloop-job-1"
    assert h.record()["selector"] == "driftloop.io/job-id=job-1"


def test_kubernetes_poll_maps_conditions(k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]) -> None:
    k, batch, core, h = k8s
    core.pods = [pod(exit_code=None, waiting="ImagePullBackOff")]
    batch.job = job_status(active=1, ready=0)
    s = h.poll()
    assert s.state == "pending" and "ImagePullBackOff" in s.reason
    batch.job = job_status(active=1, ready=1)
    assert h.poll().state == "running"
    core.pods = [pod(exit_code=0, message=json.dumps({"status": "succeeded", "model_version": "5"}))]
    batch.job = job_status(conditions=(cond("Complete"),))
    s = h.poll()
    assert (s.state, s.exit_code) == ("succeeded", 0)
    assert s.result is not None and s.result["model_version"] == "5"
    again = k.attach("job-1", h.record())
    assert again.poll().state == "succeeded"


def test_kubernetes_failed_job_reports_the_pod_log(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any], tmp_path: Path) -> None:
    _, batch, core, h = k8s
    # FallbackToLogsOnError: the message is the log's tail, not a result.
    core.pods = [pod(exit_code=1, message="RuntimeError: CUDA out of memory")]
    batch.job = job_status(conditions=(cond("Failed", "BackoffLimitExceeded", "Job has reached the "
                                                                            "specified backoff limit"),))
    s = h.poll()
    assert (s.state, s.exit_code) == ("failed", 1)
    assert "BackoffLimitExceeded" in s.reason and "CUDA out of memory" in s.reason
    assert "CUDA out of memory" in (tmp_path / "job.log").read_text()


def test_kubernetes_reported_failure_keeps_the_jobs_reason(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]) -> None:
    _, batch, core, h = k8s
    core.pods = [pod(exit_code=1, message=json.dumps({"status": "failed", "reason": "one class only"}))]
    batch.job = job_status(conditions=(cond("Failed", "BackoffLimitExceeded"),))
    s = h.poll()
    assert s.state == "failed" and s.reason.startswith("one class only")


def test_kubernetes_deadline_exceeded_is_timed_out(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]) -> None:
    _, batch, _, h = k8s
    batch.job = job_status(conditions=(cond("Failed", "DeadlineExceeded", "Job was active longer than "
                                                                         "specified deadline"),))
    s = h.poll()
    assert s.state == "timed_out" and "activeDeadlineSeconds" in s.reason


def test_kubernetes_missing_job_is_lost(k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]) -> None:
    _, batch, _, h = k8s
    batch.job = None
    s = h.poll()
    assert s.state == "lost" and "not found" in s.reason


def test_kubernetes_transient_api_errors_propagate(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _, batch, _, h = k8s

    def boom(name: str, namespace: str) -> Any:
        raise ApiError(503)

    monkeypatch.setattr(batch, "read_namespaced_job_status", boom)
    with pytest.raises(ApiError):
        h.poll()


def test_kubernetes_cancel_deletes_the_job_and_its_config_map(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]) -> None:
    _, batch, core, h = k8s
    batch.job = job_status(active=1, ready=1)
    h.cancel("past budget")
    assert ("delete_namespaced_job", ("driftloop-job-1", "ml-training"),
            {"propagation_policy": "Background"}) in batch.calls
    assert ("delete_namespaced_config_map", ("driftloop-job-1-spec", "ml-training"), {}) in core.calls
    s = h.poll()
    assert s.state == "failed" and s.reason == "cancelled: past budget"


def test_kubernetes_job_creation_failure_removes_the_config_map(tmp_path: Path) -> None:
    batch, core = FakeBatch(), FakeCore()
    batch.fail_create = ApiError(403)
    k = launcher_k8s(batch_api=batch, core_api=core)
    (tmp_path / "spec.json").write_text(make_spec().to_json())
    with pytest.raises(LaunchError, match="cannot create Kubernetes Job ml-training/driftloop-job-1"):
        k.launch(make_spec(), tmp_path / "spec.json", tmp_path / "job.log")
    assert core.calls[-1] == ("delete_namespaced_config_map", ("driftloop-job-1-spec", "ml-training"), {})


def test_kubernetes_attach_checks_the_record(
        k8s: tuple[KubernetesLauncher, FakeBatch, FakeCore, Any]) -> None:
    k, _, _, h = k8s
    with pytest.raises(JobNotFound, match="'local'"):
        k.attach("job-1", {"launcher": "local", "pid": 1})
    with pytest.raises(JobNotFound, match="namespace"):
        k.attach("job-1", {**h.record(), "namespace": "other"})
