"""``make demo``: the whole loop on one machine, from drift to a promoted model and recovered CTR.

What runs, all real and all local (docs/demo.md has the story and how to read the report):

* a single-node Kafka (`monitor.testbed.local_kafka.LocalKafka`) and an MLflow tracking server
  with SQLite and local artifacts (`monitor.testbed.local_mlflow.LocalMlflow`), both under the
  run directory ``var/demo-<seed>/``;
* a webhook receiver (an ``http.server`` thread) that checks each alert's Standard
  Webhooks signature and prints it, one line per alert;
* the daemon, ``python -m monitor.service.cli run --config FILE``, with a configuration that
  compresses time (2 s windows, labels final 6 s after a prediction, 20 s drop-test
  periods, a retraining window of 20 s) and fine-tuning enabled;
* the simulated recommender (`monitor.testbed.world`): a champion trained by the real job
  on exploration logs, then live slates scored by ``models:/ctr@champion``, a stable
  phase, and covariate plus concept drift that cost the champion about 40% of its CTR.

The daemon detects the drift and the drop, alerts, fine-tunes on the fresh feedback and
registers a challenger; the challenger is promoted; the recommender notices the alias
move, serves the new version, and the CTR recovers. At the end the demo prints the
timeline, writes ``report.html`` and ``report.png`` into the run directory, stops every
process it started (also on Ctrl-C or a failure), and prints the command that opens the
MLflow UI on what was recorded.

Promotion is the daemon's (docs/promotion.md): its gate judges each registered challenger
on the job's paired evaluation and moves ``champion``; the demo only watches the alias and
reports the gate's decision, including a "keep".
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import html
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MODEL = "ctr"
#: The environment variable through which the daemon gets the webhook's signing secret
#: (docs/alerts.md: secrets never sit in the config file).
SECRET_ENV = "DRIFTLOOP_DEMO_WEBHOOK_SECRET"
TOPICS = {"predictions": "predictions", "feedback": "feedback", "dead_letter": "driftloop.dead-letter"}

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# -- the compressed-time configuration --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """One run of the loop. The defaults are the demo's; docs/demo.md explains each.

    Args:
        seed: the world, the traffic, the clicks and every training run.
        rate: impressions (prediction events) per second.
        window_seconds: the daemon's windows.
        attribution_seconds: feedback counts within this long after its prediction.
        period_seconds: matured traffic pooled per drop test.
        stable_periods: drop-test periods of stable traffic before the drift.
        retrain_window_seconds: the training data: the newest matured stretch.
        serve_after_switch_seconds: how long the new champion serves before the end.
        deadline_seconds: the loop gives up this long after the onset.
        recovery_share: CTR recovered = a 5 s CTR of the new champion at this share of
            the pre-drift CTR. 0.8: the fine-tuned model gets 90-98% of it back (bench/demo.py),
            so a mark near that would be met by noise, or not at all.
    """

    seed: int = 1
    rate: float = 500.0
    window_seconds: int = 2
    attribution_seconds: int = 6
    period_seconds: int = 20
    stable_periods: int = 2
    retrain_window_seconds: int = 20
    serve_after_switch_seconds: float = 20.0
    deadline_seconds: float = 200.0
    recovery_share: float = 0.8
    status_every_seconds: float = 5.0

    def __post_init__(self) -> None:
        w = self.window_seconds
        if w <= 0 or 3600 % w:
            msg = f"window_seconds must divide 3600, got {w}"
            raise ValueError(msg)
        for name in ("attribution_seconds", "period_seconds", "retrain_window_seconds"):
            v = getattr(self, name)
            if v <= 0 or v % w:
                msg = f"{name} must be a positive multiple of window_seconds {w}, got {v}"
                raise ValueError(msg)

    @property
    def stable_seconds(self) -> int:
        return self.period_seconds * self.stable_periods



def daemon_config(spec: LoopSpec, *, kafka: str, topics: dict[str, str], tracking_uri: str, data_dir: Path,
                  http_port: int, receiver_url: str, group_id: str) -> dict[str, Any]:
    """The daemon's configuration, with time compressed about 100-fold (docs/demo.md)."""
    w = spec.window_seconds
    return {
        "instance_id": "demo",
        "kafka": {"bootstrap_servers": kafka, "group_id": group_id,
                  "predictions_topic": topics["predictions"], "feedback_topic": topics["feedback"],
                  "dead_letter_topic": topics["dead_letter"],
                  "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
        # Windows of 2 s; an event may be 1 s late; a quiet partition holds nothing back
        # for more than a window.
        "windows": {"size_seconds": w, "allowed_lateness_seconds": 1, "idle_timeout_seconds": w},
        "checkpoint": {"interval_seconds": 0.5},
        "storage": {"data_dir": str(data_dir)},
        "http": {"host": "127.0.0.1", "port": http_port},
        "mlflow": {"tracking_uri": tracking_uri},
        "monitor": {
            "label_types": ["click"], "attribution_seconds": spec.attribution_seconds,
            "bootstrap_seconds": spec.period_seconds, "resolve_after": 3,
            "labels_stall_seconds": 5 * spec.period_seconds,
            # ~1000 impressions a window: enough for the chi-square tests. PSI 0.2 is the
            # usual "significant shift" mark; the drift here is far beyond it, and a
            # fine-tuned model's own slates shift its scores by less.
            "drift": {"min_rows": 400, "psi_threshold": 0.2, "k": 3, "m": 5},
            "performance": {
                "period_seconds": spec.period_seconds, "k": 1, "m": 1, "alpha": 0.001,
                # A model is judged on the items it chose itself: its live AUC and
                # calibration differ from its holdout's by the selection (docs/demo.md),
                # so only large changes of those count here; the CTR test is the one
                # that matters, at its default 5%.
                "min_auc_drop": 0.2, "min_calibration_change": 0.3,
                # Log loss moves with the click rate itself: a model whose slates win more
                # clicks has a higher log loss than its holdout's, rate for rate no worse.
                "min_log_loss_increase": None},
            # The per-event CUSUM would page within a second of matured labels, and a
            # retrain started then would train on the stable world (docs/demo.md).
            "sequential": {"enabled": False},
        },
        "alerts": {
            "group_wait_seconds": 1, "poll_seconds": 0.5, "backoff_initial_seconds": 0.5,
            "backoff_max_seconds": 5,
            # info: promotions and rollbacks are notifications, not pages.
            "sinks": [{"name": "demo-receiver", "type": "webhook", "url": receiver_url,
                       "secret_env": SECRET_ENV, "min_severity": "info"}],
        },
        "retrain": {
            "enabled": True,
            # Drift pages; a measured drop retrains, so the data window lies after the onset.
            "incident_kinds": ["performance_drop"],
            # One run per demo: the next automatic one could not come before the end.
            "cooldown_seconds": 300, "min_fresh_labels": 2000,
            "window_seconds": spec.retrain_window_seconds, "budget_seconds": 150,
            "min_rows": 2000, "device": "cpu", "launcher": "local", "seed": spec.seed,
            # Fine-tuning a small drifted window: many large steps for an epoch or two, and
            # early stopping keeps the best (the champion's architecture is kept). Measured
            # over 10 draws of the window: holdout AUC gain 0.17-0.27 over the champion;
            # batches of 256 gave 0.09-0.26, and one run in eight fell short of the gate.
            "params": {"lr": 0.02, "batch_size": 128, "max_epochs": 6, "patience": 2},
        },
        "promotion": {
            # The previous champion's live rate, which the new one is watched against after
            # a promotion: its last 20 s of traffic, the drifted world, not the stable one.
            "baseline_events": int(spec.rate * 20),
            # Watch the new champion for about a minute of traffic.
            "watch_events": int(spec.rate * 60),
            "poll_seconds": 2.0,
            # The latency guardrail times both models in the job, in turns, at
            # ~5 ms per 1,000 rows; beside the recommender, Kafka and the daemon on two cores
            # that varies twofold for the very same architecture (measured: 4.8 vs 10.0 ms,
            # and the gate kept a challenger 0.26 AUC better as "too slow").
            "max_latency_ratio": 5.0,
        },
        "logging": {"level": "INFO"},
    }


# -- the webhook receiver ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReceivedAlert:
    at_ms: int
    transition: str
    kind: str
    fingerprint: str
    severity: str
    version: str | None
    summary: str


class AlertReceiver:
    """An on-call endpoint: verifies each request's signature, prints each alert."""

    def __init__(self, secret: str, echo: Echo, clock: Callable[[], float] = time.time) -> None:
        from connectors.alerts import decode_signing_keys

        self._keys = decode_signing_keys(secret)
        self.alerts: list[ReceivedAlert] = []
        self.rejected = 0
        self._lock = threading.Lock()
        self._echo = echo
        self._clock = clock
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._receive(self.headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-receiver",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/driftloop"

    def _receive(self, headers: Any, body: bytes) -> int:
        from connectors.alerts import SignatureError, verify

        try:
            verify(self._keys, headers, body)
            items = json.loads(body)["data"]["alerts"]
        except (SignatureError, ValueError, KeyError, TypeError) as exc:
            with self._lock:
                self.rejected += 1
            self._echo(f"  receiver: rejected a request: {exc}")
            return 401
        now = int(self._clock() * 1000)
        for a in items:
            alert = ReceivedAlert(now, str(a.get("transition")), str(a.get("kind")),
                                  str(a.get("fingerprint")), str(a.get("severity")), a.get("model_version"),
                                  str(a.get("summary") or ""))
            with self._lock:
                self.alerts.append(alert)
            self._echo(f"  ALERT {alert.transition:<9} {alert.severity:<8} {alert.fingerprint}: "
                       f"{alert.summary[:110]}")
        return 204

    def received(self) -> list[ReceivedAlert]:
        with self._lock:
            return list(self.alerts)

    def __enter__(self) -> AlertReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- child processes --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child process with its output in a log file, stopped by signal, then killed."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log_path = name, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log, env=env,
                                         stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout_s``; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=30)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _get_json(url: str, timeout: float = 3.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


def _cancel_running_jobs(jobs_db: Path, group_id: str, echo: Echo) -> None:
    """Training jobs run in sessions of their own (they outlive a daemon restart by
    design, docs/retraining.md); at the end of the demo they must not outlive it."""
    if not jobs_db.exists():
        return
    from retrain.jobs import SqliteJobStore
    from retrain.launch import LocalLauncher

    store = SqliteJobStore(jobs_db, group_id=group_id)
    try:
        for r in store.jobs():
            if r.state in ("pending", "running") and r.handle:
                echo(f"  cancelling training job {r.job_id}")
                with contextlib.suppress(Exception):
                    LocalLauncher().attach(r.job_id, r.handle).cancel("the demo is stopping")
    finally:
        store.close()


# -- the loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
    """What one run of the loop saw; `timeline` and the report are made from it."""

    spec: LoopSpec
    workdir: Path
    config: dict[str, Any]
    bootstrap: Any = None
    stats: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    incidents: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    first_seen: dict[str, int] = dataclasses.field(default_factory=dict)
    alerts: list[ReceivedAlert] = dataclasses.field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: (wall ms, version, who): every move of the champion alias seen.
    champion_moves: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    daemon_exit: int | None = None
    problem: str | None = None

    @property
    def onset_ms(self) -> int | None:
        return next((int(e["onset_ms"]) for e in self.events if e.get("event") == "onset"), None)

    def serving(self) -> list[tuple[int, str]]:
        """(wall ms, version) of every model the recommender started serving."""
        return [(int(e["ts"]), str(e["version"])) for e in self.events if e.get("event") == "serving"]


def _read_stats(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                (events if "event" in d else rows).append(d)
    return rows, events


def _window_ctr(rows: list[dict[str, Any]], since_s: float) -> tuple[float | None, int]:
    imp = sum(r["impressions"] for r in rows if r["t"] >= since_s)
    clicks = sum(r["clicks"] for r in rows if r["t"] >= since_s)
    return (clicks / imp if imp else None), imp


def run_loop(spec: LoopSpec, *, workdir: Path, kafka: str, tracking_uri: str, model: str = MODEL,
             topics: dict[str, str] | None = None, group_id: str = "driftloop-demo",
             oracle: Path | None = None, echo: Echo = _print) -> LoopResult:
    """Bootstrap a champion, then run the daemon and the recommender until the new
    champion has served ``spec.serve_after_switch_seconds`` (or the deadline passes).

    Kafka and MLflow are the caller's (the demo starts its own; the test and the
    benchmark share theirs), so that this function is the same loop everywhere. Every
    process it starts is stopped before it returns, also when it raises.
    """
    from connectors.registry import ModelRegistry
    from monitor.testbed import world as simulate

    topics = topics or TOPICS
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    world = simulate.World(simulate.WorldSpec(seed=spec.seed))
    policy = simulate.SlatePolicy()
    registry = ModelRegistry(tracking_uri)
    daemon: Child | None = None
    sim: Child | None = None
    with AlertReceiver(secret, echo) as receiver:
        config = daemon_config(spec, kafka=kafka, topics=topics, tracking_uri=tracking_uri,
                               data_dir=workdir / "driftloop", http_port=port, receiver_url=receiver.url,
                               group_id=group_id)
        result = LoopResult(spec=spec, workdir=workdir, config=config)
        config_path = workdir / "driftloop.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP__")}
        env[SECRET_ENV] = secret
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            echo(f"starting the daemon: driftloop run --config {config_path} (http://127.0.0.1:{port}/status)")
            daemon = Child("daemon", [sys.executable, "-m", "monitor.service.cli", "run", "--config",
                                      str(config_path)], workdir / "daemon.log", env)
            echo("training the first champion with the real job (python -m retrain.job) on "
                 "exploration logs of the stable world ...")
            t0 = time.time()
            result.bootstrap = simulate.bootstrap_champion(
                world, policy, tracking_uri=tracking_uri, model=model, workdir=workdir / "bootstrap",
                attribution_s=spec.attribution_seconds, click_delay_s=simulate.ServeSpec.click_delay_s,
                seed=spec.seed)
            b = result.bootstrap
            echo(f"  {model} v{b.version} registered in {time.time() - t0:.0f}s (holdout AUC "
                 f"{b.metrics.get('holdout_auc', float('nan')):.3f}); alias champion set by the demo "
                 f"(the first champion has nothing to beat); its shadow CTR {b.reference_ctr:.3f}")
            result.champion_moves.append((int(time.time() * 1000), b.version, "bootstrap"))
            deadline = time.monotonic() + 90
            while not _ready(port):
                if not daemon.alive() or time.monotonic() > deadline:
                    msg = f"the daemon did not become ready:\n{daemon.tail()}"
                    raise RuntimeError(msg)
                time.sleep(0.5)
            stats_path = workdir / "simulator-stats.jsonl"
            stats_path.unlink(missing_ok=True)
            argv = [sys.executable, "-m", "monitor.testbed.world", "serve", "--kafka", kafka,
                    "--tracking-uri", tracking_uri, "--model", model, "--seed", str(spec.seed),
                    "--predictions-topic", topics["predictions"], "--feedback-topic", topics["feedback"],
                    "--rate", str(spec.rate), "--stable-seconds", str(spec.stable_seconds),
                    "--align-seconds", str(spec.window_seconds),
                    "--max-seconds", str(spec.stable_seconds + spec.deadline_seconds + 30),
                    "--stats", str(stats_path)]
            if oracle is not None:
                argv += ["--oracle", str(oracle)]
            echo(f"starting the recommender: {spec.rate:.0f} impressions/s, "
                 f"drift after {spec.stable_seconds}s")
            sim = Child("simulator", argv, workdir / "simulator.log", env)
            _watch(spec, result, port=port, registry=registry, model=model, sim=sim, daemon=daemon,
                   stats_path=stats_path, echo=echo)
        finally:
            if sim is not None:
                sim.stop(30)
            if daemon is not None:
                result.daemon_exit = daemon.stop(60)
            _cancel_running_jobs(workdir / "driftloop" / "jobs" / "jobs.db", group_id, echo)
            result.alerts = receiver.received()
            if (workdir / "simulator-stats.jsonl").exists():
                result.stats, result.events = _read_stats(workdir / "simulator-stats.jsonl")
    return result


def _watch(spec: LoopSpec, result: LoopResult, *, port: int, registry: Any, model: str, sim: Child,
           daemon: Child, stats_path: Path, echo: Echo) -> None:
    """Poll everything once a second until the new champion has served long enough."""
    champion = result.bootstrap.version
    next_line = time.monotonic() + spec.status_every_seconds
    announced: set[str] = set()
    gated: set[str] = set()
    while True:
        time.sleep(1.0)
        now_ms = int(time.time() * 1000)
        if not daemon.alive():
            result.problem = f"the daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}"
            return
        if not sim.alive():
            result.problem = f"the recommender exited ({sim.proc.returncode}):\n{sim.tail()}"
            return
        rows, events = _read_stats(stats_path)
        result.stats, result.events = rows, events
        status = _get_json(f"http://127.0.0.1:{port}/status")
        if status:
            _observe(result, status, now_ms)
            for iid, inc in result.incidents.items():
                if iid not in announced and inc.get("status") == "firing":
                    announced.add(iid)
                    echo(f"  daemon: INCIDENT {inc['severity']} {inc['fingerprint']}")
        with contextlib.suppress(Exception):  # a registry blip: look again next second
            current = registry.version_by_alias(model, "champion")
            if current is not None and current != champion:
                result.champion_moves.append((now_ms, current, "daemon"))
                echo(f"  registry: {model}@champion moved v{champion} -> v{current}")
                champion = current
        challenger = _latest_challenger(result)
        if challenger is not None and challenger != champion and challenger not in gated:
            decision = _gate_decision(registry, model, challenger)
            if decision is not None:
                gated.add(challenger)
                echo(f"  daemon's gate on v{challenger}: {decision[0]}: {decision[1]}")
                if decision[0] == "keep":
                    result.problem = f"the daemon's gate kept the champion: {decision[1]}"
                    return
        if time.monotonic() >= next_line:
            next_line += spec.status_every_seconds
            echo(_status_line(result, status, rows))
        failed = [j for j in result.jobs.values() if j.get("state") in ("failed", "timed_out", "lost")]
        if failed and not challenger:
            # The cooldown holds any further run back past the end of the demo.
            job = failed[0]
            result.problem = f"the training job {job['job_id']} {job['state']}: {job.get('reason')}"
            return
        serving = result.serving()
        switched = [ms for ms, v in serving if v != result.bootstrap.version]
        if switched and now_ms - switched[0] >= spec.serve_after_switch_seconds * 1000:
            return
        onset = result.onset_ms
        if onset is not None and now_ms - onset > spec.deadline_seconds * 1000:
            result.problem = (f"no recovery within {spec.deadline_seconds:.0f}s of the onset "
                              f"(champion v{champion}, serving {serving[-1][1] if serving else '?'})")
            return


def _observe(result: LoopResult, status: dict[str, Any], now_ms: int) -> None:
    incidents = status.get("incidents") or {}
    for inc in [*incidents.get("firing", []), *incidents.get("recently_resolved", [])]:
        result.incidents[inc["id"]] = inc
        result.first_seen.setdefault(inc["id"], now_ms)
    for job in ((status.get("retrain") or {}).get("recent_jobs") or []):
        result.jobs[job["job_id"]] = job


def _gate_decision(registry: Any, model: str, version: str) -> tuple[str, str] | None:
    """The daemon's gate decision on a challenger, from its run's tags (docs/promotion.md):
    ``(promote | keep, reason)``, or None while there is none."""
    try:
        run_id = registry.version_run_id(model, version)
        tags = {} if run_id is None else registry.run_data(run_id)["tags"]
    except Exception:  # a registry blip: ask again next second
        return None
    gate = tags.get("driftloop.gate")
    return None if gate is None else (str(gate), str(tags.get("driftloop.gate_reason", "")))


def _latest_challenger(result: LoopResult) -> str | None:
    """The version the newest successful training job registered."""
    done = [j for j in result.jobs.values() if j.get("state") == "succeeded" and j.get("version")]
    return str(max(done, key=lambda j: j.get("finished_ms") or 0)["version"]) if done else None


def _status_line(result: LoopResult, status: dict[str, Any] | None, rows: list[dict[str, Any]]) -> str:
    onset = result.onset_ms
    now = time.time()
    phase = "starting" if not rows else rows[-1]["phase"]
    when = f"onset{(now * 1000 - onset) / 1000:+4.0f}s" if onset else "        "
    serving = result.serving()
    ctr, imp = _window_ctr(rows, now - 6)
    firing = [i for i in result.incidents.values() if i.get("status") == "firing"]
    jobs = (status or {}).get("retrain") or {}
    running = [j["job_id"] for j in jobs.get("running", [])]
    done = [f"{j['state']}:v{j.get('version')}" for j in result.jobs.values()
            if j.get("state") not in ("pending", "running")]
    jobs_text = " ".join([*(f"running:{j}" for j in running), *done]) or "none"
    return (f"[{when}] phase={phase:<7} serving=v{serving[-1][1] if serving else '?'} "
            f"ctr(5s)={'  -  ' if ctr is None else f'{ctr:.3f}'} ({imp} imp) "
            f"incidents firing={len(firing)} jobs: {jobs_text}")


# -- the timeline -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Moment:
    name: str
    at_ms: int | None
    detail: str = ""


def ctr_figures(result: LoopResult) -> dict[str, float | None]:
    """Measured CTRs: before the drift (after a 4 s warm-up), of the champion after it,
    and of the new champion after the switch (after 3 s), plus the oracle's where known.

    The ``*_expected`` figures average the true click probability of what was shown
    instead of counting the clicks drawn from it: a few thousand impressions put a
    Bernoulli spread of about 0.007 on a realised CTR of 0.13, as large as the effects a
    short run compares, while the expected CTR moves only with the traffic itself."""
    rows, onset = result.stats, result.onset_ms
    switch = next((ms for ms, v in result.serving() if v != getattr(result.bootstrap, "version", None)), None)
    if not rows or onset is None:
        return dict.fromkeys(("pre_drift", "drifted", "drifted_expected", "recovered",
                              "recovered_expected", "oracle_expected"))

    def ctr(lo: float, hi: float, key: str = "clicks") -> float | None:
        sel = [r for r in rows if lo <= r["t"] * 1000 < hi]
        imp = sum(r["impressions"] for r in sel)
        if not imp:
            return None
        if key == "oracle_p":
            if any(r.get("oracle_p") is None for r in sel):
                return None
            return sum(r["oracle_p"] for r in sel) / imp
        return sum(r[key] for r in sel) / imp

    start = rows[0]["t"] * 1000 + 4000
    end = rows[-1]["t"] * 1000 + 1000
    after = (switch + 3000) if switch else None
    return {
        "pre_drift": ctr(start, onset),
        "drifted": ctr(onset + 2000, switch or end),
        "drifted_expected": ctr(onset + 2000, switch or end, "p"),
        "recovered": ctr(after, end) if after else None,
        "recovered_expected": ctr(after, end, "p") if after else None,
        "oracle_expected": ctr(after, end, "oracle_p") if after else None,
    }


def recovery_ms(result: LoopResult, share: float) -> int | None:
    """End of the first 5 s after the switch whose CTR is at ``share`` of the pre-drift CTR."""
    pre = ctr_figures(result)["pre_drift"]
    switch = next(((ms, v) for ms, v in result.serving() if v != getattr(result.bootstrap, "version", None)),
                  None)
    if pre is None or switch is None:
        return None
    rows = [r for r in result.stats if r["t"] * 1000 >= switch[0] and str(r["version"]) == switch[1]]
    for i in range(len(rows)):
        sel = [r for r in rows[i:] if r["t"] < rows[i]["t"] + 5]
        if sel[-1]["t"] < rows[i]["t"] + 4:
            return None
        imp = sum(r["impressions"] for r in sel)
        if imp and sum(r["clicks"] for r in sel) / imp >= share * pre:
            return int((sel[-1]["t"] + 1) * 1000)
    return None


def timeline(result: LoopResult) -> list[Moment]:
    """The story of the run in wall-clock time; ``None`` where it did not happen."""
    onset = result.onset_ms
    seen = sorted(((result.first_seen[i], result.incidents[i]) for i in result.first_seen),
                  key=lambda x: x[0])
    # Promotions, rollbacks and failed jobs are incidents too, but not findings about traffic.
    findings = ("feature_drift", "prediction_drift", "data_quality", "performance_drop")
    false_alarms = [inc for at, inc in seen if inc["kind"] in findings and (onset is None or at < onset)]
    drift = [(at, inc) for at, inc in seen if inc["kind"] in ("feature_drift", "prediction_drift")
             and onset is not None and at >= onset]
    drop = [(at, inc) for at, inc in seen if inc["kind"] == "performance_drop" and onset is not None
            and at >= onset]
    firing_alerts = [a for a in result.alerts if a.transition == "firing" and a.kind in findings
                     and (onset is None or a.at_ms >= onset)]
    jobs = sorted(result.jobs.values(), key=lambda j: j.get("started_ms") or 0)
    job = jobs[0] if jobs else None
    moves = [m for m in result.champion_moves if m[2] != "bootstrap"]
    boot = getattr(result.bootstrap, "version", None)
    switch = next(((ms, v) for ms, v in result.serving() if v != boot), None)
    out = [Moment("drift onset", onset, "older users arrive and tastes change")]
    if false_alarms:
        out.append(Moment("false alarm before onset", result.first_seen[false_alarms[0]["id"]],
                          false_alarms[0]["fingerprint"]))
    out += [
        Moment("first drift detection", drift[0][0] if drift else None,
               drift[0][1]["fingerprint"] if drift else ""),
        Moment("first drop detection", drop[0][0] if drop else None,
               drop[0][1]["fingerprint"] if drop else ""),
        Moment("first alert received", firing_alerts[0].at_ms if firing_alerts else None,
               firing_alerts[0].fingerprint if firing_alerts else ""),
        Moment("retrain start", job.get("started_ms") if job else None, job["job_id"] if job else ""),
        Moment("retrain end", job.get("finished_ms") if job else None,
               f"{job['state']}, v{job.get('version')}" if job and job.get("finished_ms") else ""),
        Moment("promotion", moves[0][0] if moves else None,
               f"v{moves[0][1]} by the {moves[0][2]}" if moves else ""),
        Moment("new champion served", switch[0] if switch else None, f"v{switch[1]}" if switch else ""),
        Moment("recovery", recovery_ms(result, result.spec.recovery_share),
               f"5 s CTR >= {result.spec.recovery_share:.0%} of the pre-drift CTR"),
    ]
    # A rollback by the daemon's live watch, or a second promotion, is part of the story too.
    out += [Moment("champion moved again", ms, f"v{v} by the {who}") for ms, v, who in moves[1:]]
    # In order of time; what never happened last, in the order of the story.
    return sorted(out, key=lambda m: (m.at_ms is None, m.at_ms or 0))


def print_timeline(result: LoopResult, echo: Echo = _print) -> None:
    onset = result.onset_ms
    echo("\ntimeline (seconds after the drift onset)")
    for m in timeline(result):
        when = "   never" if m.at_ms is None else (
            f"{(m.at_ms - onset) / 1000:+8.1f}" if onset is not None else "       ?")
        echo(f"  {when}  {m.name:<26} {m.detail}")
    c = ctr_figures(result)

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    echo(f"\nCTR: before the drift {fmt(c['pre_drift'])}, champion after it {fmt(c['drifted'])} "
         f"(expected {fmt(c['drifted_expected'])}), new champion {fmt(c['recovered'])} "
         f"(expected {fmt(c['recovered_expected'])})")


# -- the report -------------------------------------------------------------------------


def write_report(result: LoopResult, out_dir: Path, mlflow_command: str) -> tuple[Path, Path]:
    """``report.png`` (CTR by served version, drift scores, the timeline's events) and
    ``report.html`` (that picture, the timeline, incidents, alerts, jobs, the config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    onset = result.onset_ms or (result.stats[0]["t"] * 1000 if result.stats else 0)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, height_ratios=[3, 2])
    bins: dict[str, dict[int, list[float]]] = {}
    for r in result.stats:
        b = int((r["t"] * 1000 - onset) // 2000) * 2
        acc = bins.setdefault(str(r["version"]), {}).setdefault(b, [0, 0, 0.0])
        acc[0] += r["impressions"]
        acc[1] += r["clicks"]
        acc[2] += r["p"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (version, series) in enumerate(sorted(bins.items())):
        xs = sorted(series)
        ax.plot(xs, [series[x][1] / series[x][0] for x in xs], ".-", color=colors[i % len(colors)],
                lw=1, ms=3, label=f"v{version}: measured CTR (2 s)")
        ax.plot(xs, [series[x][2] / series[x][0] for x in xs], "-", color=colors[i % len(colors)],
                lw=2, alpha=0.35, label=f"v{version}: expected CTR (true model)")
    c = ctr_figures(result)
    if c["pre_drift"]:
        ax.axhline(c["pre_drift"], color="grey", ls=":", lw=1, label="pre-drift CTR")
    ax.set_ylabel("CTR of the served slates")
    ax.set_title(f"driftloop demo, seed {result.spec.seed}: CTR by served model version")
    for _, inc in sorted(result.incidents.items()):
        if inc["kind"] not in ("feature_drift", "prediction_drift"):
            continue
        pts = [(h[0], h[1]) for h in inc.get("history", []) if h[1] is not None]
        if pts:
            bx.plot([(t - onset) / 1000 for t, _ in pts], [v for _, v in pts], ".-", lw=1, ms=3,
                    label=f"{inc['subject']} ({inc['kind']}) PSI")
    psi = result.config["monitor"]["drift"]["psi_threshold"]
    bx.axhline(psi, color="grey", ls=":", lw=1, label=f"PSI threshold {psi}")
    bx.set_ylabel("PSI vs the version's reference")
    bx.set_xlabel("seconds after the drift onset")
    shown = [m for m in timeline(result) if m.at_ms is not None]
    for i, m in enumerate(shown):
        x = (m.at_ms - onset) / 1000  # type: ignore[operator]
        for axis in (ax, bx):
            axis.axvline(x, color="black", lw=0.6, alpha=0.4)
        # Staggered, because detection, alert and retrain start can be a second apart.
        ax.annotate(f"{i + 1}. {m.name}", (x, 0.99 - 0.055 * (i % 6)), xycoords=("data", "axes fraction"),
                    fontsize=7, va="top", ha="left", xytext=(2, 0), textcoords="offset points",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.legend(fontsize=7, loc="lower left")
    if bx.has_data():
        bx.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    page = out_dir / "report.html"
    page.write_text(_report_html(result, mlflow_command), encoding="utf-8")
    return page, png


def _report_html(result: LoopResult, mlflow_command: str) -> str:
    e = html.escape
    onset = result.onset_ms

    def rel(ms: int | None) -> str:
        if ms is None:
            return "never"
        return f"{(ms - onset) / 1000:+.1f} s" if onset else "?"

    c = ctr_figures(result)
    rows_t = "".join(f"<tr><td>{e(m.name)}</td><td>{rel(m.at_ms)}</td><td>{e(m.detail)}</td></tr>"
                     for m in timeline(result))
    rows_i = "".join(
        f"<tr><td>{e(i['fingerprint'])}</td><td>{e(i['severity'])}</td><td>{e(i['status'])}</td>"
        f"<td>{rel(result.first_seen.get(k))}</td><td>{e(i.get('summary') or '')}</td></tr>"
        for k, i in sorted(result.incidents.items(), key=lambda kv: result.first_seen.get(kv[0], 0)))
    rows_a = "".join(f"<tr><td>{rel(a.at_ms)}</td><td>{e(a.transition)}</td><td>{e(a.fingerprint)}</td>"
                     f"<td>{e(a.summary)}</td></tr>" for a in result.alerts)
    rows_j = "".join(f"<tr><td>{e(j['job_id'])}</td><td>{e(str(j.get('state')))}</td>"
                     f"<td>{rel(j.get('started_ms'))}</td><td>{rel(j.get('finished_ms'))}</td>"
                     f"<td>{e(str(j.get('version')))}</td></tr>" for j in result.jobs.values())

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    title = f"driftloop demo, seed {result.spec.seed}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{padding:2px 8px;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body><h1>driftloop demo, seed {result.spec.seed}</h1>
<p>{e(result.problem or "The loop closed: drift detected, alerted, fine-tuned, promoted, recovered.")}</p>
<p>CTR before the drift {fmt(c["pre_drift"])}; of the champion after it {fmt(c["drifted"])};
of the new champion {fmt(c["recovered"])}. Times are seconds after the drift onset. How to read
this page: docs/demo.md.</p>
<img src="report.png" style="max-width:100%">
<h2>Timeline</h2><table><tr><th>event</th><th>when</th><th>what</th></tr>{rows_t}</table>
<h2>Incidents</h2><table><tr><th>fingerprint</th><th>severity</th><th>status</th><th>seen</th>
<th>summary</th></tr>{rows_i}</table>
<h2>Alerts received by the webhook</h2><table><tr><th>when</th><th>transition</th><th>incident</th>
<th>summary</th></tr>{rows_a}</table>
<h2>Training jobs</h2><table><tr><th>job</th><th>state</th><th>start</th><th>end</th><th>version</th></tr>
{rows_j}</table>
<h2>The runs and versions in MLflow</h2><pre>{e(mlflow_command)}</pre>
<h2>The daemon's configuration</h2><pre>{e(yaml.safe_dump(result.config, sort_keys=False))}</pre>
</body></html>"""


# -- make demo --------------------------------------------------------------------------


@contextlib.contextmanager
def local_services(run_dir: Path, echo: Echo) -> Iterator[tuple[str, str]]:
    """A Kafka broker and an MLflow server under ``run_dir``, started side by side."""
    from monitor.testbed.local_kafka import LocalKafka, create_topics
    from monitor.testbed.local_mlflow import LocalMlflow

    kafka = LocalKafka(run_dir / "kafka")
    mlflow = LocalMlflow(run_dir / "mlflow")
    echo("starting a local Kafka (KRaft, single node) and an MLflow server (SQLite, local artifacts) ...")
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fk, fm = pool.submit(kafka.start), pool.submit(mlflow.start)
            bootstrap, uri = fk.result(), fm.result()
        create_topics(bootstrap, {TOPICS["predictions"]: 4, TOPICS["feedback"]: 4, TOPICS["dead_letter"]: 1})
        echo(f"  Kafka {bootstrap}, MLflow {uri}")
        yield bootstrap, uri
    finally:
        with contextlib.suppress(Exception):
            mlflow.stop()
        with contextlib.suppress(Exception):
            kafka.stop()


def mlflow_ui_command(run_dir: Path) -> str:
    """The server LocalMlflow ran, again (runs hold ``mlflow-artifacts:/`` URIs, which
    only a server with ``--serve-artifacts`` resolves; ``mlflow ui --default-artifact-root``
    would show the runs but not their artifacts)."""
    d = (run_dir / "mlflow").resolve()
    mlflow = Path(sys.executable).with_name("mlflow")
    return (f"{mlflow} server --backend-store-uri sqlite:///{d}/mlflow.db --serve-artifacts "
            f"--artifacts-destination {d}/artifacts --host 127.0.0.1 --port 5000\n"
            f"# then open http://127.0.0.1:5000 (model 'ctr', experiment 'driftloop/ctr')\n"
            f"# or: deploy/mlflow/mlflow.sh start {run_dir}/mlflow")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitor.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1, help="varies the world, the traffic and the clicks")
    ap.add_argument("--run-dir", type=Path, help="default var/demo-<seed> (emptied first)")
    ap.add_argument("--rate", type=float, default=LoopSpec.rate, help="impressions per second")
    args = ap.parse_args(argv)
    spec = LoopSpec(seed=args.seed, rate=args.rate)
    run_dir = (args.run_dir or REPO / "var" / f"demo-{args.seed}").resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.time()
    _print(f"driftloop demo, seed {args.seed}: everything lives in {run_dir}")
    result: LoopResult | None = None
    try:
        with local_services(run_dir, _print) as (kafka, uri):
            result = run_loop(spec, workdir=run_dir, kafka=kafka, tracking_uri=uri)
        _print("every process the demo started is stopped")
    except KeyboardInterrupt:
        _print("\ninterrupted: every process the demo started is stopped")
        return 130
    if result.problem:
        _print(f"\nPROBLEM: {result.problem}")
    print_timeline(result)
    command = mlflow_ui_command(run_dir)
    page, png = write_report(result, run_dir, command)
    _print(f"\nreport: {page}\n        {png}")
    _print(f"\nopen the MLflow UI on the results:\n  {command.replace(chr(10), chr(10) + '  ')}")
    _print(f"\ndemo took {time.time() - t0:.0f}s")
    return 1 if result.problem else 0


if __name__ == "__main__":
    sys.exit(main())
