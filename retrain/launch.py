"""Launchers: where a training job runs (a local process, torchrun, a Kubernetes Job).

One contract across the three (docs/retraining.md): :meth:`Launcher.launch` starts the
entry point ``python -m retrain.job --spec SPEC --result RESULT`` and returns a
:class:`JobHandle`; the handle's :meth:`~JobHandle.record` is a JSON-able dict the
tracker persists, and :meth:`Launcher.attach` turns it back into a handle after the
daemon restarts, because a training run outlives the process that started it.

The job reports through its result (a JSON object ``{"status": "succeeded" | "failed",
"reason": ..., "model_version": ...}``), not through its exit code alone: "exited 0"
does not say which version was registered. A non-zero exit or a missing result is a
failure whose reason carries the last lines of the job's log, so the incident raised
for it says what went wrong without anyone opening a file.

A launcher enforces nothing about time: the tracker (retrain/jobs.py) owns the
budget and cancels a job that overruns it, so the three launchers time out alike.
(The Kubernetes Job's ``activeDeadlineSeconds`` is a backstop for a daemon that is
down, set a margin beyond the tracker's limit.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from retrain.spec import JobSpec

__all__ = [
    "FINAL_STATES",
    "JOB_STATES",
    "JobHandle",
    "JobNotFound",
    "JobStatus",
    "KubernetesLauncher",
    "LaunchError",
    "Launcher",
    "LocalJobHandle",
    "LocalLauncher",
    "TorchrunLauncher",
    "parse_result",
]

log = logging.getLogger(__name__)

JOB_STATES = ("pending", "running", "succeeded", "failed", "timed_out", "lost")
FINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "lost"})

#: How much of a log goes into a failure's reason: enough for a traceback's last frames
#: and its exception line, little enough for a webhook payload and a Slack message.
LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 8192


class LaunchError(RuntimeError):
    """A job could not be started (the command, the cluster API); nothing is running."""


class JobNotFound(LookupError):
    """A persisted handle record names a job this launcher cannot find or re-attach."""


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """What a handle knows about its job now.

    Args:
        state: one of :data:`JOB_STATES`; the last four are final.
        exit_code: the process's exit status when known (negative: killed by that
            signal, as in :mod:`subprocess`).
        reason: one line (plus a log tail for failures) saying why it is in this state.
        started_ms, finished_ms: as the launcher saw them (epoch ms), when known.
        result: the job's result object when it wrote one.
    """

    state: str
    exit_code: int | None = None
    reason: str = ""
    started_ms: int | None = None
    finished_ms: int | None = None
    result: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.state not in JOB_STATES:
            msg = f"job state must be one of {JOB_STATES}, got {self.state!r}"
            raise ValueError(msg)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@runtime_checkable
class JobHandle(Protocol):
    """One started job."""

    @property
    def job_id(self) -> str: ...

    def poll(self) -> JobStatus:
        """The job's state now; cheap enough to call every few seconds; never blocks long."""
        ...

    def cancel(self, reason: str) -> None:
        """Stop the job (idempotent); a later :meth:`poll` reports it finished."""
        ...

    def record(self) -> dict[str, Any]:
        """JSON-able: what :meth:`Launcher.attach` needs to find the job again."""
        ...


@runtime_checkable
class Launcher(Protocol):
    """Starts jobs and re-attaches to them."""

    def launch(self, spec: JobSpec, spec_path: Path, log_path: Path) -> JobHandle:
        """Start the entry point on ``spec_path`` (already written); raise LaunchError when it cannot."""
        ...

    def attach(self, job_id: str, record: Mapping[str, Any]) -> JobHandle:
        """A handle from what :meth:`JobHandle.record` returned, possibly in another process."""
        ...


# -- results and reasons ------------------------------------------------------------------


def parse_result(text: str) -> dict[str, Any]:
    """Decode and check a job's result; ValueError names what is wrong.

    Example:
        >>> parse_result('{"status": "succeeded", "model_version": "7"}')["model_version"]
        '7'
        >>> parse_result('{"status": "done"}')
        Traceback (most recent call last):
        ...
        ValueError: result status must be 'succeeded' or 'failed', got 'done'
    """
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"result is not JSON ({exc.msg} at {exc.pos}): {text[:200]!r}"
        raise ValueError(msg) from None
    if not isinstance(d, dict):
        msg = f"result must be a JSON object, got {type(d).__name__}"
        raise ValueError(msg)
    if d.get("status") not in ("succeeded", "failed"):
        msg = f"result status must be 'succeeded' or 'failed', got {d.get('status')!r}"
        raise ValueError(msg)
    if d.get("reason") is not None and not isinstance(d["reason"], str):
        msg = f"result reason must be a string, got {d['reason']!r}"
        raise ValueError(msg)
    return d


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _with_tail(reason: str, tail: str) -> str:
    return f"{reason}; log tail:\n{tail}" if tail else f"{reason} (the log is empty)"


def _final_status(*, exit_code: int | None, result_text: str | None, tail: str,
                  started_ms: int | None, finished_ms: int | None, where: str) -> JobStatus:
    """Combine the exit code and the result into the final status (the rules in the module doc).

    ``exit_code`` None means it is not known (a job that ended while no one was its
    parent); the result alone decides then.
    """
    def status(state: str, reason: str, result: Mapping[str, Any] | None = None) -> JobStatus:
        return JobStatus(state=state, exit_code=exit_code, reason=reason, started_ms=started_ms,
                         finished_ms=finished_ms, result=result)

    result: dict[str, Any] | None = None
    bad_result = ""
    if result_text is not None and result_text.strip():
        try:
            result = parse_result(result_text)
        except ValueError as exc:
            bad_result = str(exc)
    if result is not None and result["status"] == "failed":
        reason = result.get("reason") or "the job reported failure without a reason"
        if exit_code not in (None, 0):
            reason = f"{reason} ({_exit_text(exit_code)})"
        return status("failed", reason, result)
    if result is not None and exit_code in (None, 0):
        version = result.get("model_version")
        reason = result.get("reason") or (f"registered version {version}" if version is not None
                                          else "succeeded")
        return status("succeeded", reason, result)
    if result is not None:
        # Rank 0 reported success, yet the launcher (torchrun: another rank) failed. The
        # version may be registered; say so, but it is not a clean run.
        assert exit_code is not None
        return status("failed", _with_tail(
            f"{_exit_text(exit_code)} although the result says succeeded "
            f"(model_version {result.get('model_version')})", tail), result)
    if bad_result:
        return status("failed", _with_tail(f"{where}: {bad_result}", tail))
    if exit_code is None:
        return status("lost", _with_tail(f"{where} ended while no one watched and left no result", tail))
    if exit_code == 0:
        return status("failed", _with_tail(f"{where} exited 0 without writing a result", tail))
    return status("failed", _with_tail(f"{where} {_exit_text(exit_code)}", tail))


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (at most 8 KiB read from its end); "" when missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- local processes ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ProcInfo:
    state: str
    pgrp: int
    start_ticks: int


def _proc_info(pid: int) -> _ProcInfo | None:
    """Fields of /proc/<pid>/stat (proc(5)); None when there is no such process.

    ``comm`` (field 2) is in parentheses and may itself contain spaces and ")", so the
    fields are counted from the last ")": state is field 3, pgrp 5, starttime 22.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2:].split()
    return _ProcInfo(state=rest[0].decode(), pgrp=int(rest[2]), start_ticks=int(rest[19]))


def _boot_id() -> str | None:
    # A start time is counted from boot: after a reboot an equal (pid, start) pair may
    # be another process, so the boot id is part of a process's identity.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count).

    Zombies answer ``kill(0)`` until their parent reaps them, which for a job whose
    parent is gone may be never (a container whose PID 1 does not reap), so /proc is
    read where it exists.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        info = _proc_info(int(entry.name))
        if info is not None and info.pgrp == pgid and info.state not in ("Z", "X"):
            return True
    return False


class LocalJobHandle:
    """A job running as a local process group (the leader's pid is the group id).

    The process's identity is its pid plus its start time (and the boot id), read from
    /proc when it starts: a pid is recycled once the process is gone, and a handle that
    signalled a recycled pid would kill a stranger. Without /proc (not Linux) the pid
    alone is trusted, which is the weaker guarantee docs/retraining.md mentions.
    """

    def __init__(self, job_id: str, *, pid: int, start_ticks: int | None, boot_id: str | None,
                 result_path: Path, log_path: Path, started_ms: int, kind: str,
                 argv: Sequence[str] = (), grace_s: float = 10.0,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        self._job_id = job_id
        self.pid = pid
        self.start_ticks = start_ticks
        self.boot_id = boot_id
        self.result_path = Path(result_path)
        self.log_path = Path(log_path)
        self.started_ms = started_ms
        self.kind = kind
        self.argv = list(argv)
        self.grace_s = grace_s
        self._popen = popen
        self._exit_code: int | None = None
        self._exited = False
        self._cancelled: str | None = None
        self._final: JobStatus | None = None

    @property
    def job_id(self) -> str:
        return self._job_id

    def record(self) -> dict[str, Any]:
        return {"launcher": self.kind, "job_id": self._job_id, "pid": self.pid, "pgid": self.pid,
                "start_ticks": self.start_ticks, "boot_id": self.boot_id,
                "result_path": str(self.result_path), "log_path": str(self.log_path),
                "started_ms": self.started_ms, "argv": self.argv}

    def _is_ours(self) -> bool:
        """Whether the pid is still our job's process (alive or a zombie)."""
        if self._popen is not None:
            return not self._exited
        if self.boot_id is not None and _boot_id() not in (None, self.boot_id):
            return False
        info = _proc_info(self.pid)
        if info is None:
            return False
        return self.start_ticks is None or info.start_ticks == self.start_ticks

    def _reap(self) -> bool:
        """Collect the exit status if the process has ended; True when it has."""
        if self._exited:
            return True
        if self._popen is not None:
            code = self._popen.poll()
            if code is None:
                return False
            self._exited, self._exit_code = True, code
            return True
        if not self._is_ours():
            self._exited = True
            return True
        # Re-attached: the process is ours, but is it our child? It is when the same
        # process re-created its tracker (or the daemon is a subreaper); then only
        # waitpid turns the zombie into an exit code.
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            info = _proc_info(self.pid)
            if info is not None and info.state in ("Z", "X"):
                self._exited = True
            return self._exited
        if pid == 0:
            return False
        self._exited, self._exit_code = True, os.waitstatus_to_exitcode(status)
        return True

    def _read_result(self) -> str | None:
        try:
            return self.result_path.read_text()
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            return f"unreadable result file {self.result_path}: {exc}"

    def poll(self) -> JobStatus:
        if self._final is not None:
            return self._final
        if not self._reap():
            return JobStatus(state="running", started_ms=self.started_ms)
        where = f"job process {self.pid}"
        if self._cancelled is not None:
            status = JobStatus(state="failed", exit_code=self._exit_code, started_ms=self.started_ms,
                               finished_ms=_now_ms(), reason=f"cancelled: {self._cancelled}")
        else:
            status = _final_status(exit_code=self._exit_code, result_text=self._read_result(),
                                   tail=log_tail(self.log_path), started_ms=self.started_ms,
                                   finished_ms=_now_ms(), where=where)
            if status.state == "lost":
                status = dataclasses.replace(status, reason=_with_tail(
                    f"{where} is gone (exited, or the pid now belongs to another process) and left "
                    f"no result at {self.result_path}", log_tail(self.log_path)))
        # The leader is gone; whatever it left in its group (dataloader workers, torchrun
        # ranks) would keep holding GPU memory the next job needs.
        if self._exit_code is not None:
            self._kill_group(signal.SIGKILL)
        self._final = status
        return status

    def _kill_group(self, sig: signal.Signals) -> None:
        # Signal the group only while it can still be ours: either the leader is our
        # process, or we reaped it ourselves a moment ago (the group id stays reserved
        # while any member lives, so it cannot be a stranger's).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def cancel(self, reason: str) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; returns when it is gone."""
        if self._final is not None or self._cancelled is not None:
            return
        if self._reap():
            # It ended on its own just now: poll() reports how (and clears up its group);
            # if it ended unseen, its group id may be a stranger's by now.
            return
        self._cancelled = reason
        log.info("cancelling job", extra={"fields": {"job_id": self._job_id, "pid": self.pid,
                                                     "reason": reason}})
        self._kill_group(signal.SIGTERM)
        if not self._wait_gone(self.grace_s):
            self._kill_group(signal.SIGKILL)
            # SIGKILL cannot be caught; a few seconds covers a loaded machine and a
            # process in uninterruptible sleep (a GPU driver call) waking up.
            if not self._wait_gone(5.0):
                log.warning("job process group survived SIGKILL", extra={"fields": {
                    "job_id": self._job_id, "pgid": self.pid}})

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            # Gone means the leader reaped (ours) or gone (not ours) and no member of the
            # group running: members that are zombies already are for init to reap.
            if self._reap() and not _group_alive(self.pid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


class LocalLauncher:
    """Runs the entry point as a local process (the default; the job uses CUDA when present).

    The job gets its own session and process group (``start_new_session``): a signal to
    the daemon (Ctrl-C, SIGTERM on shutdown) does not reach it, so a job outlives a
    daemon restart and is re-attached afterwards; a cancel signals the whole group,
    children included. Under systemd set ``KillMode=process`` or stopping the service
    kills the jobs with it (docs/retraining.md).

    Args:
        python: the interpreter that runs the job.
        env: variables added to the daemon's environment for the job.
        module: the entry point module (tests point it at a stand-in).
        cwd: the job's working directory (None: the daemon's).
        grace_s: between SIGTERM and SIGKILL when cancelling.

    Example:
        >>> from retrain.spec import Trigger
        >>> t = Trigger(kind="manual", model="ctr", reason="r", at_ms=0, who="ana")
        >>> spec = JobSpec(job_id="j1", model="ctr", base_version="3", data_start_ms=0,
        ...                data_end_ms=1, store="/data", tracking_uri="http://mlflow", trigger=t)
        >>> LocalLauncher(python="python3").command(spec, Path("s.json"), Path("r.json"))
        ['python3', '-m', 'retrain.job', '--spec', 's.json', '--result', 'r.json']
    """

    kind = "local"
    #: Records of these launchers describe a local process group, whichever made them:
    #: a daemon reconfigured from torchrun to local still re-attaches its old jobs.
    _ATTACHABLE = ("local", "torchrun")

    def __init__(self, python: str = sys.executable, env: Mapping[str, str] | None = None, *,
                 module: str = "retrain.job", cwd: Path | None = None, grace_s: float = 10.0) -> None:
        if not module or not all(p.isidentifier() for p in module.split(".")):
            msg = f"module must be a dotted module name, got {module!r}"
            raise ValueError(msg)
        if grace_s < 0:
            msg = f"grace_s must be >= 0, got {grace_s}"
            raise ValueError(msg)
        self.python = python
        self.env = dict(env or {})
        self.module = module
        self.cwd = cwd
        self.grace_s = grace_s

    def command(self, spec: JobSpec, spec_path: Path, result_path: Path) -> list[str]:
        return [self.python, "-m", self.module, "--spec", str(spec_path), "--result", str(result_path)]

    @staticmethod
    def result_path(spec_path: Path) -> Path:
        """Where the job writes its result: beside its spec, one directory per job."""
        return Path(spec_path).with_name("result.json")

    def launch(self, spec: JobSpec, spec_path: Path, log_path: Path) -> LocalJobHandle:
        result_path = self.result_path(spec_path)
        # A result left by an earlier attempt would be read as this run's.
        result_path.unlink(missing_ok=True)
        argv = self.command(spec, spec_path, result_path)
        # The job inherits the daemon's environment (credentials for MLflow and the
        # store come from there); unbuffered output keeps the log tail current.
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "DRIFTLOOP_JOB_ID": spec.job_id}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as logf:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=self.cwd, env=env, close_fds=True)
        except OSError as exc:
            msg = f"cannot start job {spec.job_id}: {argv[0]}: {exc}"
            raise LaunchError(msg) from exc
        # Read right away: until we reap it, even an exited child keeps its /proc entry.
        info = _proc_info(popen.pid)
        log.info("job started", extra={"fields": {"job_id": spec.job_id, "pid": popen.pid,
                                                  "launcher": self.kind}})
        return LocalJobHandle(spec.job_id, pid=popen.pid,
                              start_ticks=None if info is None else info.start_ticks,
                              boot_id=_boot_id(), result_path=result_path, log_path=log_path,
                              started_ms=_now_ms(), kind=self.kind, argv=argv,
                              grace_s=self.grace_s, popen=popen)

    def attach(self, job_id: str, record: Mapping[str, Any]) -> LocalJobHandle:
        if record.get("launcher") not in self._ATTACHABLE:
            msg = (f"job {job_id}: a {record.get('launcher')!r} record cannot be attached by a "
                   f"{self.kind} launcher")
            raise JobNotFound(msg)
        try:
            return LocalJobHandle(
                job_id, pid=int(record["pid"]), start_ticks=record.get("start_ticks"),
                boot_id=record.get("boot_id"), result_path=Path(record["result_path"]),
                log_path=Path(record["log_path"]), started_ms=int(record["started_ms"]),
                kind=str(record["launcher"]), argv=record.get("argv", ()), grace_s=self.grace_s)
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"job {job_id}: unusable handle record {dict(record)!r}: {exc!r}"
            raise JobNotFound(msg) from None


class TorchrunLauncher(LocalLauncher):
    """Runs the entry point under torchrun on this machine, one process per GPU.

    The command is ``python -m torch.distributed.run --standalone --nproc-per-node N -m
    retrain.job --spec ... --result ...``: ``--standalone`` runs the rendezvous on
    localhost with a free port, so nothing is configured. Every rank runs the entry
    point; only rank 0 (the ``RANK`` environment variable torchrun sets) logs to MLflow,
    registers the model and writes the result, so there is one run and one version.
    torchrun exits non-zero when any rank fails, which makes the job failed even if
    rank 0 had reported success. Cancel signals the whole group: the agent and every
    rank.

    Args:
        nproc_per_node: processes (GPUs) to use.
        python: the interpreter (torch must be importable in it).
        env, module, cwd, grace_s: as for :class:`LocalLauncher`.
    """

    kind = "torchrun"

    def __init__(self, nproc_per_node: int, python: str = sys.executable,
                 env: Mapping[str, str] | None = None, *, module: str = "retrain.job",
                 cwd: Path | None = None, grace_s: float = 30.0) -> None:
        if nproc_per_node < 1:
            msg = f"nproc_per_node must be >= 1, got {nproc_per_node}"
            raise ValueError(msg)
        super().__init__(python, env, module=module, cwd=cwd, grace_s=grace_s)
        self.nproc_per_node = nproc_per_node

    def command(self, spec: JobSpec, spec_path: Path, result_path: Path) -> list[str]:
        return [self.python, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(self.nproc_per_node),
                "-m", self.module, "--spec", str(spec_path), "--result", str(result_path)]


# -- Kubernetes --------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SPEC_MOUNT = "/spec"
_RESULT_PATH = "/dev/termination-log"
_CONTAINER = "train"


def _kubernetes() -> Any:
    """The kubernetes package, imported on first use: it is the optional extra."""
    try:
        import kubernetes
    except ImportError as exc:
        msg = ("the Kubernetes launcher needs the kubernetes client: "
               "pip install 'driftloop[kubernetes]'")
        raise ImportError(msg) from exc
    return kubernetes


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8]


def _dns_name(prefix: str, job_id: str) -> str:
    """A DNS-1123 label (the Job's name, <= 63: the controller copies it into a label).

    Lossy (uppercase, "_", ".", too long): a digest of the job id is appended so two
    job ids never share a name.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    name = f"{prefix}-{slug}"
    if slug == job_id and len(name) <= 63:
        return name
    return f"{name[:54].rstrip('-')}-{_digest(job_id)}"


def _label_value(value: str) -> str:
    """A valid label value for ``value`` (<= 63, alphanumeric ends), digest-suffixed when changed."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)
    if clean == value and len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    return f"{clean[:54].strip('-_.')}-{_digest(value)}".lstrip("-_.")


def _get(obj: Any, *names: str) -> Any:
    """Attribute path through API objects that may be missing at any level."""
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return obj


def _ms(value: Any) -> int | None:
    """An API timestamp (datetime, or an RFC 3339 string from a raw response) as epoch ms."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(value.timestamp() * 1000)


def _api_status(exc: BaseException) -> int | None:
    # Duck-typed so the fake APIs of the tests need not import kubernetes.
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _path_get(manifest: Mapping[str, Any], path: str) -> Any:
    cur: Any = manifest
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            idx = int(part[1:-1])
            cur = cur[idx] if isinstance(cur, list) and idx < len(cur) else None
        else:
            cur = cur.get(part) if isinstance(cur, Mapping) else None
    return cur


class KubernetesJobHandle:
    """A job running as a Kubernetes Job (its ConfigMap holds the spec)."""

    def __init__(self, launcher: KubernetesLauncher, job_id: str, *, name: str, config_map: str,
                 selector: str, log_path: Path | None, started_ms: int) -> None:
        self._launcher = launcher
        self._job_id = job_id
        self.name = name
        self.config_map = config_map
        self.selector = selector
        self.log_path = log_path
        self.started_ms = started_ms
        self._cancelled: str | None = None
        self._final: JobStatus | None = None

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def namespace(self) -> str:
        return self._launcher.namespace

    def record(self) -> dict[str, Any]:
        return {"launcher": "kubernetes", "job_id": self._job_id, "namespace": self.namespace,
                "name": self.name, "config_map": self.config_map, "selector": self.selector,
                "log_path": None if self.log_path is None else str(self.log_path),
                "started_ms": self.started_ms}

    def poll(self) -> JobStatus:
        """Map the Job's conditions to a status (transient API errors propagate: retry later)."""
        if self._final is not None:
            return self._final
        batch, _ = self._launcher.apis()
        try:
            job = batch.read_namespaced_job_status(self.name, self.namespace)
        except Exception as exc:
            if _api_status(exc) != 404:
                raise
            if self._cancelled is not None:
                return self._finish(JobStatus(state="failed", reason=f"cancelled: {self._cancelled}",
                                              started_ms=self.started_ms, finished_ms=_now_ms()))
            return self._finish(JobStatus(
                state="lost", started_ms=self.started_ms, finished_ms=_now_ms(),
                reason=f"Kubernetes Job {self.namespace}/{self.name} not found (deleted by someone, "
                       f"or by ttlSecondsAfterFinished before the daemon saw it finish)"))
        started = _ms(_get(job, "status", "start_time")) or self.started_ms
        conditions = {str(_get(c, "type")): c for c in (_get(job, "status", "conditions") or [])
                      if str(_get(c, "status")) == "True"}
        failed = conditions.get("Failed")
        complete = conditions.get("Complete")
        if failed is None and complete is None:
            if (_get(job, "status", "active") or 0) > 0 and _get(job, "status", "ready") != 0:
                return JobStatus(state="running", started_ms=started)
            return JobStatus(state="pending", started_ms=started, reason=self._waiting_reason())
        exit_code, message, pod = self._terminated()
        tail = self._fetch_log(pod) if (failed is not None or exit_code not in (None, 0)) else ""
        if failed is not None:
            finished = _ms(_get(failed, "last_transition_time")) or _now_ms()
            why = f"{_get(failed, 'reason')}: {_get(failed, 'message')}"
            if _get(failed, "reason") == "DeadlineExceeded":
                return self._finish(JobStatus(
                    state="timed_out", exit_code=exit_code, started_ms=started, finished_ms=finished,
                    reason=_with_tail(f"Kubernetes Job {self.name} exceeded its activeDeadlineSeconds "
                                      f"({why})", tail)))
            status = _final_status(exit_code=exit_code if exit_code is not None else 1,
                                   result_text=_json_or_none(message), tail=tail or (message or ""),
                                   started_ms=started, finished_ms=finished,
                                   where=f"Kubernetes Job {self.name} failed ({why}), its pod")
            if self._cancelled is not None:
                status = dataclasses.replace(status, state="failed", reason=f"cancelled: {self._cancelled}")
            return self._finish(status)
        finished = _ms(_get(job, "status", "completion_time")) or _now_ms()
        return self._finish(_final_status(
            exit_code=exit_code if exit_code is not None else 0, result_text=_json_or_none(message),
            tail=tail or (message or ""), started_ms=started, finished_ms=finished,
            where=f"Kubernetes Job {self.name}'s pod"))

    def _finish(self, status: JobStatus) -> JobStatus:
        self._final = status
        return status

    def _pods(self) -> list[Any]:
        _, core = self._launcher.apis()
        pods = _get(core.list_namespaced_pod(self.namespace, label_selector=self.selector), "items") or []
        # The newest pod is the one that ran last (backoffLimit > 0 makes several).
        return sorted(pods, key=lambda p: _ms(_get(p, "metadata", "creation_timestamp")) or 0)

    def _container_status(self, pod: Any) -> Any:
        for cs in _get(pod, "status", "container_statuses") or []:
            if _get(cs, "name") == _CONTAINER:
                return cs
        return None

    def _terminated(self) -> tuple[int | None, str | None, Any]:
        """Exit code and termination message (the job's result) of the newest pod.

        API errors propagate: a finished Job judged without its pod's message would be
        reported failed for good, where the next poll would have found the result.
        """
        pods = self._pods()
        if not pods:
            return None, None, None
        pod = pods[-1]
        term = _get(self._container_status(pod), "state", "terminated")
        return _get(term, "exit_code"), _get(term, "message"), pod

    def _waiting_reason(self) -> str:
        try:
            pods = self._pods()
        except Exception:
            return ""
        if not pods:
            return "no pod yet"
        waiting = _get(self._container_status(pods[-1]), "state", "waiting")
        if waiting is None:
            return str(_get(pods[-1], "status", "phase") or "")
        return f"{_get(waiting, 'reason')}: {_get(waiting, 'message') or ''}".rstrip(": ")

    def _fetch_log(self, pod: Any) -> str:
        """The pod log's tail, also copied to the local log file for people without kubectl."""
        if pod is None:
            return ""
        _, core = self._launcher.apis()
        try:
            text = core.read_namespaced_pod_log(_get(pod, "metadata", "name"), self.namespace,
                                                container=_CONTAINER, tail_lines=200)
        except Exception as exc:
            log.warning("cannot read the job's log", extra={"fields": {"job_id": self._job_id,
                                                                       "error": repr(exc)}})
            return ""
        text = text if isinstance(text, str) else str(text)
        if self.log_path is not None:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self.log_path.write_text(text)
            except OSError:
                pass
        return "\n".join(text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])

    def cancel(self, reason: str) -> None:
        """Delete the Job (its pods get SIGTERM, then SIGKILL after their grace period)."""
        if self._final is not None or self._cancelled is not None:
            return
        self._cancelled = reason
        batch, core = self._launcher.apis()
        log.info("cancelling Kubernetes job", extra={"fields": {"job_id": self._job_id, "name": self.name,
                                                                "reason": reason}})
        try:
            batch.delete_namespaced_job(self.name, self.namespace, propagation_policy="Background")
        except Exception as exc:
            if _api_status(exc) != 404:
                raise
        # Normally garbage-collected with its owner, the Job; deleted here in case setting
        # the owner failed at launch.
        try:
            core.delete_namespaced_config_map(self.config_map, self.namespace)
        except Exception as exc:
            if _api_status(exc) != 404:
                log.warning("cannot delete the job's ConfigMap", extra={"fields": {
                    "job_id": self._job_id, "config_map": self.config_map, "error": repr(exc)}})
        self._final = JobStatus(state="failed", reason=f"cancelled: {reason}", started_ms=self.started_ms,
                                finished_ms=_now_ms())


def _json_or_none(message: str | None) -> str | None:
    # With terminationMessagePolicy FallbackToLogsOnError a crashed job's message is its
    # log's tail, not a result: only a JSON object is taken for one.
    if message and message.lstrip().startswith("{"):
        return message
    return None


class KubernetesLauncher:
    """Submits each job as a Kubernetes ``batch/v1`` Job that requests GPUs.

    The spec travels in a ConfigMap the launcher creates (mounted at ``/spec``) and the
    result comes back as the container's termination message: the entry point writes
    it to ``/dev/termination-log`` (at most 4 KiB, which a result is far below), so no
    shared volume is needed. The ConfigMap is owned by the Job and goes with it when
    ``ttlSecondsAfterFinished`` removes it. RBAC and the rendered manifest:
    docs/retraining.md.

    Args:
        namespace: where Jobs and ConfigMaps are created.
        image: the training image (driftloop with torch and CUDA).
        gpus: ``nvidia.com/gpu`` to request (0: a CPU job).
        service_account: the pod's service account (for workload identity to the
            object store; its token is not mounted, the trainer needs no API access).
        node_selector, tolerations: where GPU pods may run (GPU nodes are commonly
            tainted ``nvidia.com/gpu:NoSchedule``).
        credentials_secret: a Secret whose keys become the job's environment (MLflow
            and object-store credentials); None: none.
        env: plain environment variables for the job.
        cpu, memory: requests = limits for the container, when given.
        backoff_limit: pod retries; 0 because a failed fine-tune is reported, not
            retried blindly (the policy decides about another run).
        ttl_seconds_after_finished: how long a finished Job (and its pod's logs)
            stays for inspection.
        deadline_margin_s: added to the spec's budget for ``activeDeadlineSeconds``,
            beyond the tracker's own margin so the tracker normally cancels first.
        run_as_user: the non-root uid (``runAsNonRoot`` needs a numeric one unless the
            image declares it).
        name_prefix: Jobs are named ``<prefix>-<job id>``.
        batch_api, core_api: ``BatchV1Api``/``CoreV1Api`` objects; None builds them on
            first use from the in-cluster config, else ~/.kube/config.

    Example:
        >>> from retrain.spec import Trigger
        >>> t = Trigger(kind="manual", model="ctr", reason="r", at_ms=0, who="ana")
        >>> spec = JobSpec(job_id="j1", model="ctr", base_version="3", data_start_ms=0,
        ...                data_end_ms=1, store="s3://b/fs", tracking_uri="http://mlflow", trigger=t)
        >>> m = KubernetesLauncher("ml", "registry/driftloop:1").render(spec)
        >>> m["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        {'nvidia.com/gpu': '1'}
    """

    kind = "kubernetes"

    def __init__(self, namespace: str, image: str, *, gpus: int = 1,
                 service_account: str = "driftloop-trainer",
                 node_selector: Mapping[str, str] | None = None,
                 tolerations: Sequence[Mapping[str, Any]] = (),
                 credentials_secret: str | None = None, env: Mapping[str, str] | None = None,
                 cpu: str | None = None, memory: str | None = None, backoff_limit: int = 0,
                 ttl_seconds_after_finished: int = 86400, deadline_margin_s: int = 300,
                 run_as_user: int = 10001, name_prefix: str = "driftloop",
                 batch_api: Any = None, core_api: Any = None) -> None:
        if not _DNS_LABEL.match(namespace):
            msg = f"namespace must be a DNS-1123 label, got {namespace!r}"
            raise ValueError(msg)
        if not image or not isinstance(image, str):
            msg = f"image must be a non-empty image reference, got {image!r}"
            raise ValueError(msg)
        if gpus < 0:
            msg = f"gpus must be >= 0, got {gpus}"
            raise ValueError(msg)
        if backoff_limit < 0 or ttl_seconds_after_finished < 0 or deadline_margin_s < 0:
            msg = (f"backoff_limit {backoff_limit}, ttl_seconds_after_finished "
                   f"{ttl_seconds_after_finished} and deadline_margin_s {deadline_margin_s} must be >= 0")
            raise ValueError(msg)
        if not _DNS_LABEL.match(name_prefix) or len(name_prefix) > 30:
            msg = f"name_prefix must be a DNS-1123 label of at most 30 characters, got {name_prefix!r}"
            raise ValueError(msg)
        self.namespace = namespace
        self.image = image
        self.gpus = gpus
        self.service_account = service_account
        self.node_selector = dict(node_selector or {})
        self.tolerations = [dict(t) for t in tolerations]
        self.credentials_secret = credentials_secret
        self.env = dict(env or {})
        self.cpu = cpu
        self.memory = memory
        self.backoff_limit = backoff_limit
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.deadline_margin_s = deadline_margin_s
        self.run_as_user = run_as_user
        self.name_prefix = name_prefix
        self._batch = batch_api
        self._core = core_api

    def apis(self) -> tuple[Any, Any]:
        """The (BatchV1Api, CoreV1Api) pair, built on first use when not injected."""
        if self._batch is None or self._core is None:
            k8s = _kubernetes()
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:
                k8s.config.load_kube_config()
            self._batch = self._batch or k8s.client.BatchV1Api()
            self._core = self._core or k8s.client.CoreV1Api()
        return self._batch, self._core

    def names(self, spec: JobSpec) -> tuple[str, str]:
        """The Job's and its ConfigMap's names."""
        name = _dns_name(self.name_prefix, spec.job_id)
        return name, f"{name[:58]}-spec"

    def labels(self, spec: JobSpec) -> dict[str, str]:
        return {"app.kubernetes.io/name": "driftloop", "app.kubernetes.io/component": "training",
                "app.kubernetes.io/managed-by": "driftloop",
                "driftloop.io/job-id": _label_value(spec.job_id),
                "driftloop.io/model": _label_value(spec.model)}

    def render(self, spec: JobSpec) -> dict[str, Any]:
        """The Job manifest for ``spec`` (a plain dict, as ``kubectl apply`` would take it)."""
        name, config_map = self.names(spec)
        labels = self.labels(spec)
        limits: dict[str, str] = {}
        requests: dict[str, str] = {}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        if self.cpu:
            limits["cpu"] = requests["cpu"] = self.cpu
        if self.memory:
            limits["memory"] = requests["memory"] = self.memory
        resources: dict[str, Any] = {"limits": limits}
        if requests:
            resources["requests"] = requests
        env = [{"name": "DRIFTLOOP_JOB_ID", "value": spec.job_id}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
        env += [{"name": k, "value": v} for k, v in sorted(self.env.items())]
        container: dict[str, Any] = {
            "name": _CONTAINER,
            "image": self.image,
            "command": ["python", "-m", "retrain.job", "--spec", f"{_SPEC_MOUNT}/spec.json",
                        "--result", _RESULT_PATH],
            "env": env,
            "resources": resources,
            "volumeMounts": [{"name": "spec", "mountPath": _SPEC_MOUNT, "readOnly": True},
                             {"name": "scratch", "mountPath": "/tmp"}],
            "terminationMessagePath": _RESULT_PATH,
            # A job that dies before writing its result still says why: the log's tail
            # becomes the message.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
        if self.credentials_secret:
            container["envFrom"] = [{"secretRef": {"name": self.credentials_secret}}]
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "serviceAccountName": self.service_account,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": self.run_as_user,
                                "fsGroup": self.run_as_user,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "spec", "configMap": {"name": config_map}},
                        # /tmp and the torch/triton caches; the image's root stays untouched.
                        {"name": "scratch", "emptyDir": {}}],
        }
        if self.node_selector:
            pod_spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in self.tolerations]
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels,
                         "annotations": {"driftloop.io/job-id": spec.job_id,
                                         "driftloop.io/trigger": spec.trigger.kind}},
            "spec": {
                "backoffLimit": self.backoff_limit,
                # The cluster's backstop for a job the daemon no longer watches.
                "activeDeadlineSeconds": math.ceil(spec.budget_s) + self.deadline_margin_s,
                "ttlSecondsAfterFinished": self.ttl_seconds_after_finished,
                "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
            },
        }

    def render_config_map(self, spec: JobSpec, spec_json: str) -> dict[str, Any]:
        _, config_map = self.names(spec)
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": config_map, "namespace": self.namespace, "labels": self.labels(spec)},
                "data": {"spec.json": spec_json}}

    def validate(self, manifest: Mapping[str, Any]) -> Any:
        """Check a Job manifest; return it as the client's ``V1Job``.

        Two layers: our own checks of the fields a training Job cannot do without (the
        client's models leave ``image`` optional, and older clients accept a string
        where a list belongs), then deserialisation into ``V1Job`` by the client
        itself, which checks every field's type (pydantic, in clients >= 37).

        Raises:
            ValueError: naming the field, e.g. ``spec.template.spec.containers[0].image``.
        """
        checks: list[tuple[str, Any, str]] = [
            ("apiVersion", lambda v: v == "batch/v1", "must be 'batch/v1'"),
            ("kind", lambda v: v == "Job", "must be 'Job'"),
            ("metadata.name", lambda v: isinstance(v, str) and bool(_DNS_LABEL.match(v)),
             "must be a DNS-1123 label of at most 63 characters"),
            ("spec.template.spec.restartPolicy", lambda v: v in ("Never", "OnFailure"),
             "must be 'Never' or 'OnFailure' (a Job's pods do not restart Always)"),
            ("spec.template.spec.containers", lambda v: isinstance(v, list) and len(v) > 0,
             "must be a non-empty list"),
        ]
        for key in ("spec.backoffLimit", "spec.activeDeadlineSeconds", "spec.ttlSecondsAfterFinished"):
            checks.append((key, lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                        and v >= 0), "must be an integer >= 0"))
        self._check(manifest, checks)
        containers = _path_get(manifest, "spec.template.spec.containers")
        volumes = {_get(v, "name") for v in (_path_get(manifest, "spec.template.spec.volumes") or [])}
        for i, _ in enumerate(containers):
            p = f"spec.template.spec.containers[{i}]"
            self._check(manifest, [
                (p, lambda v: isinstance(v, Mapping), "must be an object"),
                (f"{p}.name", lambda v: isinstance(v, str) and bool(_DNS_LABEL.match(v)),
                 "must be a DNS-1123 label"),
                (f"{p}.image", lambda v: isinstance(v, str) and bool(v.strip()),
                 "must be a non-empty image reference"),
                (f"{p}.command", lambda v: v is None or (isinstance(v, list)
                                                          and all(isinstance(a, str) for a in v)),
                 "must be a list of strings"),
                (f"{p}.args", lambda v: v is None or (isinstance(v, list)
                                                       and all(isinstance(a, str) for a in v)),
                 "must be a list of strings"),
            ])
            for kind in ("limits", "requests"):
                q = f"{p}.resources.{kind}"
                self._check(manifest, [(q, lambda v: v is None or (isinstance(v, Mapping) and all(
                    isinstance(x, str | int) and not isinstance(x, bool) for x in v.values())),
                    "must map resource names to quantities")])
            for j, mount in enumerate(_get(containers[i], "volumeMounts") or []):
                if _get(mount, "name") not in volumes:
                    msg = (f"Job manifest: {p}.volumeMounts[{j}].name {_get(mount, 'name')!r} "
                           f"names no volume in spec.template.spec.volumes")
                    raise ValueError(msg)
        return self._deserialize(manifest, "V1Job")

    @staticmethod
    def _check(manifest: Mapping[str, Any], checks: Sequence[tuple[str, Any, str]]) -> None:
        for path, ok, what in checks:
            value = _path_get(manifest, path)
            if not ok(value):
                msg = f"Job manifest: {path} {what}, got {value!r}"
                raise ValueError(msg)

    @staticmethod
    def _deserialize(body: Mapping[str, Any], klass: str) -> Any:
        client = _kubernetes().client.ApiClient()
        text = json.dumps(body)
        # The client's public deserialize() takes a response: an object with ``.data``
        # up to release 36, (text, type, content type) from 37 on.
        params = list(inspect.signature(client.deserialize).parameters)
        try:
            if len(params) >= 3:
                return client.deserialize(text, klass, "application/json")

            class _Response:
                data = text

            return client.deserialize(_Response(), klass)
        except (ValueError, TypeError) as exc:
            errors = getattr(exc, "errors", None)
            if callable(errors):
                # pydantic: the location is relative to the nested model it names.
                first = errors()[0]
                where = ".".join(str(x) for x in first.get("loc", ()))
                msg = (f"Job manifest: {getattr(exc, 'title', klass)}.{where}: {first.get('msg')} "
                       f"(got {first.get('input')!r})")
            else:
                msg = f"Job manifest does not deserialise as {klass}: {exc}"
            raise ValueError(msg) from None

    def launch(self, spec: JobSpec, spec_path: Path, log_path: Path) -> KubernetesJobHandle:
        """Create the ConfigMap, then the Job, then make the Job own the ConfigMap.

        The spec is read from ``spec_path`` so the cluster runs the very bytes the
        daemon recorded. A Job that cannot be created takes its ConfigMap with it.
        """
        manifest = self.render(spec)
        job = self.validate(manifest)
        cm = self._deserialize(self.render_config_map(spec, Path(spec_path).read_text()), "V1ConfigMap")
        name, config_map = self.names(spec)
        batch, core = self.apis()
        try:
            core.create_namespaced_config_map(self.namespace, cm)
        except Exception as exc:
            msg = f"cannot create ConfigMap {self.namespace}/{config_map} for job {spec.job_id}: {exc}"
            raise LaunchError(msg) from exc
        try:
            created = batch.create_namespaced_job(self.namespace, job)
        except Exception as exc:
            try:
                core.delete_namespaced_config_map(config_map, self.namespace)
            except Exception:
                log.warning("cannot delete the ConfigMap of a Job that failed to start",
                            extra={"fields": {"config_map": config_map}})
            msg = f"cannot create Kubernetes Job {self.namespace}/{name} for job {spec.job_id}: {exc}"
            raise LaunchError(msg) from exc
        uid = _get(created, "metadata", "uid")
        if uid:
            owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
                     "blockOwnerDeletion": False, "controller": False}
            try:
                core.patch_namespaced_config_map(config_map, self.namespace,
                                                 {"metadata": {"ownerReferences": [owner]}})
            except Exception as exc:
                # Harmless but for the leak: cancel() deletes the ConfigMap by name.
                log.warning("cannot make the Job own its ConfigMap", extra={"fields": {
                    "config_map": config_map, "error": repr(exc)}})
        log.info("Kubernetes job created", extra={"fields": {"job_id": spec.job_id, "name": name,
                                                             "namespace": self.namespace}})
        selector = f"driftloop.io/job-id={self.labels(spec)['driftloop.io/job-id']}"
        return KubernetesJobHandle(self, spec.job_id, name=name, config_map=config_map, selector=selector,
                                   log_path=Path(log_path), started_ms=_now_ms())

    def attach(self, job_id: str, record: Mapping[str, Any]) -> KubernetesJobHandle:
        if record.get("launcher") != "kubernetes":
            msg = (f"job {job_id}: a {record.get('launcher')!r} record cannot be attached by a "
                   f"kubernetes launcher")
            raise JobNotFound(msg)
        if record.get("namespace") != self.namespace:
            msg = (f"job {job_id} runs in namespace {record.get('namespace')!r}, this launcher "
                   f"watches {self.namespace!r}")
            raise JobNotFound(msg)
        try:
            return KubernetesJobHandle(
                self, job_id, name=str(record["name"]), config_map=str(record["config_map"]),
                selector=str(record["selector"]),
                log_path=None if record.get("log_path") is None else Path(record["log_path"]),
                started_ms=int(record["started_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"job {job_id}: unusable handle record {dict(record)!r}: {exc!r}"
            raise JobNotFound(msg) from None
