"""The deploy/ artifacts agree with each other and with the code they deploy.

Docker and a Kubernetes cluster cannot run on the development machines or in CI, so
nothing here starts a container. What can be checked without them is checked:
the files parse, every image is pinned, names and ports that one file gives and
another uses are the same, the driftloop configs load with the daemon's own loader,
every Kubernetes object deserialises strictly into the API client's models, the RBAC
Role covers every call retrain/launch.py makes, the dashboard and the alert rules
query only metrics monitor/metrics.py exports, and the tools that exist here
(amtool, systemd-analyze, kubectl's kustomize) accept their files. docs/deployment.md
says what is left unvalidated.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from monitor.config import Config, load_config
from monitor.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
SYSTEMD = DEPLOY / "systemd"
CONFIG_PATH = "/etc/driftloop/config.yaml"
DAEMON_DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
# CI installs what its tests need (.ci/run); there a missing tool is a failure, not a skip.
IN_CI = os.environ.get("CI") == "true"


def _need_tool(name: str, *, ci_required: bool) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found:
        return found
    if ci_required and IN_CI:
        pytest.fail(f"{name} is not installed, and CI=true requires it")
    pytest.skip(f"{name} is not installed on this machine")


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _load_text_config(text: str, tmp_path: Path, environ: dict[str, str] | None = None,
                      name: str = "config.yaml") -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, environ=environ or {})


def _env_names(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every ``*_env`` key of a loaded config that is set: (key path, variable name)."""
    if isinstance(node, msgspec.Struct):
        for field in msgspec.structs.fields(node):
            value = getattr(node, field.name)
            key = f"{where}.{field.name}" if where else field.name
            if field.name.endswith("_env") and isinstance(value, str):
                yield key, value
            else:
                yield from _env_names(value, key)
    elif isinstance(node, tuple | list):
        for i, item in enumerate(node):
            yield from _env_names(item, f"{where}[{i}]")


def _host_port(url_or_target: str, default_port: int | None = None) -> tuple[str, int]:
    if "://" not in url_or_target:
        url_or_target = f"tcp://{url_or_target}"
    parts = urlsplit(url_or_target)
    port = parts.port or default_port
    assert parts.hostname and port, f"no host:port in {url_or_target!r}"
    return parts.hostname, port


# -- Dockerfiles ---------------------------------------------------------------------


def _dockerfiles() -> list[Path]:
    return sorted(p for p in DOCKER.iterdir() if p.name.startswith("Dockerfile") or p.suffix == ".Dockerfile")


def _parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        instr, _, rest = full.partition(" ")
        out.append((instr.upper(), rest.strip()))
    assert not pending, f"{path}: the file ends inside a continued line"
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, args in instructions:
        if instr == "FROM":
            stages.append([])
        assert stages, f"{instr} before the first FROM"
        stages[-1].append((instr, args))
    return stages


def _image_pin_problem(image: str) -> str | None:
    """Why ``image`` is not pinned, or None: a tag other than latest, or a digest."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{image!r} has no tag (it means latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"{image!r} is tagged latest"
    return None


def _flags_and_args(args: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words


def _dockerignore() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    # Exceptions ("!pattern") would need Docker's full matching rules; none are used.
    assert not any(p.startswith("!") for p in patterns)
    return patterns


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            p = pattern.strip("/")
            if fnmatch.fnmatchcase(prefix, p):
                return True
            if p.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], p[3:]):
                return True
    return False


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_the_dockerfile_parser_sees_instructions_and_stages() -> None:
    # The checks below are only as good as this parser: a continued RUN must not hide
    # the instructions after it, and every FROM starts a stage.
    instructions = _parse_dockerfile(DOCKER / "Dockerfile")
    names = [i for i, _ in instructions]
    assert names.count("FROM") == 2
    assert names[-2:] == ["ENTRYPOINT", "CMD"]
    assert "USER" in names and "HEALTHCHECK" in names
    assert _image_pin_problem("python") and _image_pin_problem("python:latest")
    assert _image_pin_problem("registry.local:5000/python") is not None
    assert _image_pin_problem("registry.local:5000/python:3.11.14-slim") is None


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_and_healthchecked(path: Path) -> None:
    stages = _stages(_parse_dockerfile(path))
    aliases: set[str] = set()
    for stage in stages:
        words = stage[0][1].split()
        image = words[0]
        if image not in aliases:
            assert _image_pin_problem(image) is None, f"{path.name}: {_image_pin_problem(image)}"
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2])
    final = stages[-1]
    names = [i for i, _ in final]
    starts = [k for k, name in enumerate(names) if name in ("CMD", "ENTRYPOINT")]
    assert starts, f"{path.name}: the final stage has no CMD or ENTRYPOINT"
    users = [args for name, args in final[:starts[0]] if name == "USER"]
    assert users, f"{path.name}: no USER before CMD/ENTRYPOINT: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: runs as {users[-1]!r}"
    assert not [a for n, a in final[starts[0]:] if n == "USER"], "USER after the entry point"
    checks = [args for name, args in final if name == "HEALTHCHECK"]
    assert checks and not checks[-1].upper().startswith("NONE"), f"{path.name}: no HEALTHCHECK"


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_copies_only_what_the_context_holds(path: Path) -> None:
    patterns = _dockerignore()
    copies = 0
    for instr, args in _parse_dockerfile(path):
        if instr not in ("COPY", "ADD"):
            continue
        flags, words = _flags_and_args(args)
        if "from" in flags:
            continue
        *sources, _dest = words
        for source in sources:
            copies += 1
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: not in the build context"
            assert not _ignored(source, patterns), f"{path.name}: COPY {source} is excluded by .dockerignore"
    if path.name in DAEMON_DOCKERFILES:
        assert copies >= 2


def test_dockerignore_matcher_is_not_vacuous() -> None:
    patterns = _dockerignore()
    assert _ignored("var/demo-1/mlflow", patterns)
    assert _ignored("monitor/__pycache__/x.pyc", patterns)
    assert _ignored(".venv", patterns)
    assert not _ignored("monitor/service/cli.py", patterns)


@pytest.mark.parametrize("name", DAEMON_DOCKERFILES)
def test_daemon_images_run_driftloop_on_the_mounted_config(name: str) -> None:
    final = _stages(_parse_dockerfile(DOCKER / name))[-1]
    entry = [_exec_form(a) for i, a in final if i == "ENTRYPOINT"][-1]
    cmd = [_exec_form(a) for i, a in final if i == "CMD"][-1]
    assert entry + cmd == ["driftloop", "run", "--config", CONFIG_PATH]
    healthcheck = [a for i, a in final if i == "HEALTHCHECK"][-1]
    env = " ".join(a for i, a in final if i == "ENV")
    url = re.search(r"DRIFTLOOP_HEALTH_URL=(\S+)", env)
    assert url and "DRIFTLOOP_HEALTH_URL" in healthcheck
    assert urlsplit(url.group(1)).path == "/healthz"
    assert len(_stages(_parse_dockerfile(DOCKER / name))) >= 2, "not multi-stage"


def test_image_bases_and_the_torch_index_argument() -> None:
    cpu = _stages(_parse_dockerfile(DOCKER / "Dockerfile"))
    cuda = _stages(_parse_dockerfile(DOCKER / "Dockerfile.cuda"))
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", cpu[-1][0][1].split()[0])
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-[\w.-]+", cuda[-1][0][1].split()[0])
    # The CPU wheel index is the builder's to give: no host is baked into the image.
    args = [a for stage in cpu for i, a in stage if i == "ARG" and a.startswith("TORCH_INDEX_URL")]
    assert args and args[0].partition("=")[2].strip('"\'') == ""


def test_training_image_user_is_the_launchers_run_as_user() -> None:
    from retrain.launch import KubernetesLauncher

    final = _stages(_parse_dockerfile(DOCKER / "Dockerfile.cuda"))[-1]
    user = [a for i, a in final if i == "USER"][-1].split(":")[0]
    assert int(user) == KubernetesLauncher("ns", "img").run_as_user


# -- compose -------------------------------------------------------------------------


@functools.cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts from the repository."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                out.append(((COMPOSE_DIR / volume["source"]).resolve(), volume["target"]))
            continue
        source, _, rest = volume.partition(":")
        if source.startswith((".", "/")):
            out.append(((COMPOSE_DIR / source).resolve(), rest.split(":")[0]))
    return out


def _mounted(service: str, target: str) -> Path:
    for host, container in _bind_mounts(_services()[service]):
        if container == target:
            return host
    raise AssertionError(f"compose service {service} mounts nothing at {target}")


def _daemon_service() -> str:
    built = [name for name, s in _services().items() if isinstance(s.get("build"), dict)
             and Path(s["build"].get("dockerfile", "")).name == "Dockerfile"]
    assert len(built) == 1, f"exactly one service must build deploy/docker/Dockerfile, got {built}"
    return built[0]


@functools.cache
def _compose_config() -> Config:
    return load_config(_mounted(_daemon_service(), CONFIG_PATH), environ={})


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def _default_interpolation(value: str) -> str:
    """``${VAR:-default}`` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def test_compose_images_are_pinned_or_built() -> None:
    for name, service in _services().items():
        build = service.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = (COMPOSE_DIR / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: builds from {dockerfile}, which does not exist"
            assert context == ROOT, f"{name}: the build context must be the repository root (.dockerignore)"
        else:
            assert "image" in service, f"{name}: neither image nor build"
        if "image" in service:
            problem = _image_pin_problem(service["image"])
            assert problem is None, f"{name}: {problem}"
    assert _services()["kafka"]["image"] == "apache/kafka:4.1.1"


def test_compose_depends_on_names_exist() -> None:
    names = set(_services())
    for name, service in _services().items():
        deps = service.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in names, f"{name} depends on {dep}, which is no service"
            assert dep != name


def test_compose_host_ports_are_unique() -> None:
    seen: dict[int, str] = {}
    for name, service in _services().items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                published = port.get("published")
            else:
                parts = str(port).split(":")
                published = parts[-2] if len(parts) >= 2 else None
            if published is None:
                continue
            assert int(published) not in seen, f"host port {published}: {seen.get(int(published))} and {name}"
            seen[int(published)] = name
    assert len(seen) >= 5


def test_every_file_compose_mounts_exists() -> None:
    count = 0
    for name, service in _services().items():
        for host, container in _bind_mounts(service):
            count += 1
            assert host.exists(), f"{name}: mounts {host} at {container}, which does not exist"
            assert ROOT in host.parents, f"{name}: mounts {host} from outside the repository"
    assert count >= 6


def test_prometheus_scrapes_the_daemon_on_its_configured_port() -> None:
    mounted = _mounted("prometheus", "/etc/prometheus/prometheus.yml")
    assert mounted == DEPLOY / "prometheus" / "prometheus.yml"
    prom = yaml.safe_load(mounted.read_text())
    job = [j for j in prom["scrape_configs"] if j["job_name"] == "driftloop"]
    assert len(job) == 1
    targets = [t for sc in job[0]["static_configs"] for t in sc["targets"]]
    config = _compose_config()
    assert targets == [f"{_daemon_service()}:{config.http.port}"]
    assert job[0].get("metrics_path", "/metrics") == "/metrics"
    # Another container reaches the daemon only if it listens beyond loopback, and the
    # scrape must not need the action token.
    assert config.http.host in ("0.0.0.0", "::")
    assert not config.http.protect_reads
    ports = [str(p).split(":")[-1] for p in _services()[_daemon_service()].get("ports", [])]
    assert str(config.http.port) in ports


def _listen_port(service: str, flag: str, default: int) -> int:
    for arg in _services()[service].get("command", []) or []:
        if str(arg).startswith(f"{flag}="):
            return int(str(arg).rsplit(":", 1)[1])
    return default


def test_alertmanager_sink_points_at_the_alertmanager_service() -> None:
    sinks = [s for s in _compose_config().alerts.sinks if s.type == "alertmanager"]
    assert len(sinks) == 1 and sinks[0].url
    port = _listen_port("alertmanager", "--web.listen-address", 9093)
    assert _host_port(sinks[0].url) == ("alertmanager", port)
    assert sinks[0].allow_http, "plain http to a non-loopback host is refused without allow_http"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"]
               for t in sc["targets"]]
    assert targets == [f"alertmanager:{port}"]
    assert _mounted("alertmanager", "/etc/alertmanager/alertmanager.yml") == \
        DEPLOY / "alertmanager" / "alertmanager.yml"


def test_mlflow_url_points_at_the_mlflow_service() -> None:
    uri = _compose_config().mlflow.tracking_uri
    assert uri is not None
    host, port = _host_port(uri)
    assert host in _services()
    mlflow = _services()[host]
    entry = _exec_form([a for i, a in _parse_dockerfile(ROOT / mlflow["build"]["dockerfile"])
                        if i == "ENTRYPOINT"][-1])
    assert entry[:2] == ["mlflow", "server"]
    assert int(entry[entry.index("--port") + 1]) == port
    env = _environment(mlflow)
    # MLflow >= 3.5 refuses Host headers it does not know: the daemon's must be allowed.
    assert f"{host}:{port}" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    backend = urlsplit(_default_interpolation(env["MLFLOW_BACKEND_STORE_URI"]))
    assert backend.scheme.startswith("postgresql") and backend.hostname in _services()
    artifacts = urlsplit(env["MLFLOW_ARTIFACTS_DESTINATION"])
    assert artifacts.scheme == "s3"
    init = " ".join(_services()["minio-init"]["command"])
    assert f"local/{artifacts.hostname}" in init, "the artifact bucket is not created"
    assert _host_port(env["MLFLOW_S3_ENDPOINT_URL"])[0] == "minio"


def test_kafka_postgres_and_secrets_match_the_daemon_config() -> None:
    config = _compose_config()
    kafka_env = _environment(_services()["kafka"])
    advertised = {_host_port(u) for u in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for server in config.kafka.bootstrap_servers.split(","):
        assert _host_port(server) in advertised
    topics = " ".join(_services()["kafka-init"]["command"])
    k = config.kafka
    for topic in (k.predictions_topic, k.feedback_topic, k.dead_letter_topic):
        assert topic in re.split(r"[\s;]+", topics), f"kafka-init does not create {topic}"
    assert config.storage.state_url
    state = urlsplit(config.storage.state_url)
    assert (state.hostname, state.port) == ("postgres", 5432)
    init = _mounted("postgres", "/docker-entrypoint-initdb.d/10-driftloop.sh").read_text()
    backend = _environment(_services()["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    mlflow_db = urlsplit(_default_interpolation(backend))
    for url in (state, mlflow_db):
        assert f"CREATE DATABASE {url.path.lstrip('/')} OWNER {url.username};" in init
    env = _environment(_services()[_daemon_service()])
    for key, var in _env_names(config):
        assert var in env, f"{key} names {var}, which the daemon's container does not set"
    if state.password is None:
        assert "PGPASSWORD" in env
    health = urlsplit(env["DRIFTLOOP_HEALTH_URL"])
    assert (health.port, health.path) == (config.http.port, "/healthz")
    assert _mounted(_daemon_service(), CONFIG_PATH) == COMPOSE_DIR / "driftloop.yaml"


# -- driftloop configs ---------------------------------------------------------------


def _configmap_config_text() -> str:
    (cm,) = [d for d in _yaml_docs(K8S / "base" / "configmap.yaml") if d["kind"] == "ConfigMap"]
    return cm["data"]["config.yaml"]


@pytest.mark.parametrize("source", ["compose/driftloop.yaml", "systemd/config.yaml",
                                    "k8s/base/configmap.yaml"])
def test_shipped_driftloop_configs_load(source: str, tmp_path: Path) -> None:
    if source.startswith("k8s/"):
        config = _load_text_config(_configmap_config_text(), tmp_path)
    else:
        config = load_config(DEPLOY / source, environ={})
    assert config.storage.data_dir == "/var/lib/driftloop"
    assert config.mlflow.tracking_uri
    assert config.storage.state_url and config.storage.state_url.startswith("postgresql://")
    # A password in a file that check-config prints would be a leak.
    assert urlsplit(config.storage.state_url).password is None


def test_the_config_loader_rejects_what_the_shipped_files_might_get_wrong(tmp_path: Path) -> None:
    # The load test above is only meaningful if a wrong key or value fails.
    from monitor.config import ConfigError

    text = _configmap_config_text()
    with pytest.raises(ConfigError, match="unknown key"):
        _load_text_config(text.replace("launcher: kubernetes", "launchr: kubernetes"), tmp_path)
    with pytest.raises(ConfigError, match="token"):
        _load_text_config(text.replace("token_env: DRIFTLOOP_HTTP_TOKEN", ""), tmp_path)


# -- Grafana and Prometheus rules ----------------------------------------------------


@functools.cache
def _exported_metrics() -> dict[str, frozenset[str]]:
    """Series name -> label names, for every metric the daemon's registry exports."""
    metrics = Metrics()
    out: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        # prometheus_client keeps a metric's label names only in this attribute.
        labels = getattr(value, "_labelnames", None)
        kind = getattr(value, "_type", None)
        name = getattr(value, "_name", None)
        if labels is None or name is None:
            continue
        names = {"counter": [f"{name}_total"], "gauge": [name],
                 "histogram": [f"{name}_bucket", f"{name}_count", f"{name}_sum"],
                 "summary": [name, f"{name}_count", f"{name}_sum"]}[kind]
        for n in names:
            out[n] = frozenset(labels) | ({"le"} if n.endswith("_bucket") else set())
    # The same names through the registry's public interface, so a change in the
    # attributes read above cannot silently empty the set.
    families = {m.name for m in metrics.registry.collect()}
    assert families and all(any(n == f or n.startswith(f + "_") for f in families) for n in out)
    assert {n.removesuffix("_total") for n in out if n.endswith("_total")} <= families | {
        n for n in out}
    return out


_METRIC_RE = re.compile(r"\b(driftloop_[a-z0-9_]+)\b")
_BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER_RE = re.compile(r"\{([^}]*)\}")


def _check_promql(expr: str, where: str, *, allowed: frozenset[str] = frozenset()) -> None:
    known = _exported_metrics()
    names = set(_METRIC_RE.findall(expr))
    unknown = names - set(known)
    assert not unknown, f"{where}: {sorted(unknown)} are not exported by monitor.metrics.Metrics"
    if not names:
        words = set(re.findall(r"\b[a-z_]+\b", expr))
        assert words & allowed, f"{where}: queries no driftloop metric: {expr}"
        return
    # instance and job are the target labels Prometheus attaches to every scraped series.
    labels = set().union(*(known[n] for n in names)) | {"instance", "job"}
    used = {label.strip() for group in _BY_RE.findall(expr) for label in group.split(",") if label.strip()}
    for group in _MATCHER_RE.findall(expr):
        used |= {m.group(1) for m in re.finditer(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", group)}
    assert used <= labels, f"{where}: labels {sorted(used - labels)} are on none of {sorted(names)}"


def _dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _dashboard_panels(panel.get("panels", []))


@functools.cache
def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "driftloop.json").read_text())


def test_promql_check_is_not_vacuous() -> None:
    _check_promql("sum by (topic) (rate(driftloop_events_in_total[5m]))", "ok")
    with pytest.raises(AssertionError, match="not exported"):
        _check_promql("rate(driftloop_events_total[5m])", "typo")
    with pytest.raises(AssertionError, match="labels"):
        _check_promql("sum by (sink) (rate(driftloop_events_in_total[5m]))", "label")
    with pytest.raises(AssertionError, match="no driftloop metric"):
        _check_promql("rate(node_cpu_seconds_total[5m])", "foreign")


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = _dashboard()
    exprs = []
    for panel in _dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
            _check_promql(target["expr"], f"panel {panel.get('title')!r}")
    used = {n for e in exprs for n in _METRIC_RE.findall(e)}
    must_show = {"driftloop_events_in_total", "driftloop_dead_letter_total", "driftloop_consumer_lag",
                 "driftloop_windows_closed_total", "driftloop_kafka_commit_seconds_bucket",
                 "driftloop_incidents_firing", "driftloop_analysis_lag_seconds",
                 "driftloop_alert_outbox_depth", "driftloop_incident_transitions_total"}
    assert must_show <= used, f"the dashboard lacks {sorted(must_show - used)}"
    ids = [p["id"] for p in _dashboard_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_dashboard_provisioning_matches_compose() -> None:
    (source,) = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    uids = {t["datasource"]["uid"] for p in _dashboard_panels(_dashboard()["panels"])
            for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    host, port = _host_port(source["url"])
    assert host == "prometheus" and host in _services()
    assert port == _listen_port("prometheus", "--web.listen-address", 9090)
    (provider,) = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "driftloop.yaml").read_text())["providers"]
    assert _mounted("grafana", provider["options"]["path"]) == DEPLOY / "grafana" / "dashboards"
    assert _mounted("grafana", "/etc/grafana/provisioning") == DEPLOY / "grafana" / "provisioning"


def test_prometheus_config_structure_and_rules() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert set(prom) <= {"global", "alerting", "rule_files", "scrape_configs"}
    jobs = [j["job_name"] for j in prom["scrape_configs"]]
    assert len(jobs) == len(set(jobs))
    for job in prom["scrape_configs"]:
        for sc in job["static_configs"]:
            assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in sc["targets"]), sc
    rules_dir = _mounted("prometheus", "/etc/prometheus/rules")
    files: list[Path] = []
    for pattern in prom["rule_files"]:
        assert pattern.startswith("/etc/prometheus/rules/")
        files += sorted(rules_dir.glob(pattern.removeprefix("/etc/prometheus/rules/")))
    assert files, "rule_files match no file in deploy/prometheus/rules"
    alerts = []
    for path in files:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                alerts.append(rule["alert"])
                assert rule["labels"]["severity"] in ("warning", "critical")
                assert "summary" in rule["annotations"]
                _check_promql(rule["expr"], f"rule {rule['alert']}", allowed=frozenset({"up"}))
    assert len(alerts) == len(set(alerts)) and "DriftloopDown" in alerts


def test_promtool_accepts_the_prometheus_files() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus); the structure test above still ran")
    for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([promtool, "check", "config", "--syntax-only",
                           str(DEPLOY / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_amtool_accepts_alertmanager_yml() -> None:
    amtool = _need_tool("amtool", ci_required=True)
    proc = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# -- Kubernetes ----------------------------------------------------------------------


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _k8s_files() for d in _yaml_docs(p)]


def _objects(kind: str, files: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    return [d for p, d in _k8s_objects() if d.get("kind") == kind
            and (files is None or str(p.relative_to(K8S)) in files)]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


_PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "date": (str,),
               "datetime": (str,)}


@functools.cache
def _required_fields(klass: type) -> frozenset[str]:
    """The attributes a model refuses to be None: how the generated client marks required."""
    import kubernetes.client

    cfg = kubernetes.client.Configuration()
    cfg.client_side_validation = True
    inst = klass.__new__(klass)
    inst.local_vars_configuration = cfg
    required = set()
    for attr in klass.openapi_types:
        try:
            setattr(inst, attr, None)
        except ValueError:
            required.add(attr)
    return frozenset(required)


def _strict_errors(value: Any, type_name: str, path: str) -> list[str]:
    """Unknown fields, missing required fields and wrong types, against the client's models.

    The client's own deserialiser (< 37, which the project pins) drops unknown fields
    silently, so a misspelt ``livenesProbe`` would pass it and never probe anything.
    """
    import kubernetes.client

    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in _strict_errors(v, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith(("dict(", "dict[")):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        inner = type_name[type_name.index(",") + 1:-1].strip()
        return [e for k, v in value.items() for e in _strict_errors(v, inner, f"{path}.{k}")]
    if type_name == "object":
        return []
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and (
            type_name == "bool" or not isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    klass = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object, got {value!r}"]
    by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            errors += _strict_errors(item, klass.openapi_types[by_json[key]], f"{path}.{key}")
    for attr in sorted(_required_fields(klass)):
        if klass.attribute_map[attr] not in value:
            errors.append(f"{path}.{klass.attribute_map[attr]}: required by {type_name}")
    return errors


def _model_name(obj: dict[str, Any]) -> str:
    version = str(obj["apiVersion"]).rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + obj["kind"]


def test_strict_validator_rejects_typos_missing_fields_and_wrong_types() -> None:
    good = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 8080}]}]}}
    assert _strict_errors(good, _model_name(good), "Pod") == []
    typo = json.loads(json.dumps(good))
    typo["spec"]["containers"][0]["livenesProbe"] = {}
    assert any("livenesProbe: unknown field" in e for e in _strict_errors(typo, "V1Pod", "Pod"))
    missing = json.loads(json.dumps(good))
    del missing["spec"]["containers"][0]["name"]
    assert any("name: required" in e for e in _strict_errors(missing, "V1Pod", "Pod"))
    wrong = json.loads(json.dumps(good))
    wrong["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    assert any("expected int" in e for e in _strict_errors(wrong, "V1Pod", "Pod"))


@pytest.mark.parametrize("path", _k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_objects_validate_against_the_client_models(path: Path) -> None:
    pytest.importorskip("kubernetes")
    import kubernetes.client

    docs = _yaml_docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        name = _model_name(doc)
        assert hasattr(kubernetes.client, name), f"{path}: no client model {name} for {doc.get('apiVersion')}"
        where = f"{path.name}:{doc['kind']}/{doc.get('metadata', {}).get('name')}"
        errors = _strict_errors(doc, name, where)
        assert not errors, "\n".join(errors)
        assert doc["metadata"].get("namespace") in (None, "driftloop") or doc["kind"] == "Namespace"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "driftloop", f"{where}: no namespace"


def test_kustomizations_list_every_manifest_except_the_job_template() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        for resource in data["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization}: {resource} does not exist"
            if target.is_file():
                listed.add(target)
    unlisted = {p.resolve() for p in _k8s_files()} - listed
    assert unlisted == {(K8S / "training-job-template.yaml").resolve()}


def test_kustomize_builds_both_layouts() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the manifests were still validated one by one")
    expected = {"deploy/k8s": "Deployment", "deploy/k8s/scale-out": "StatefulSet"}
    for directory, workload in expected.items():
        proc = subprocess.run([kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d]
        assert workload in kinds and ({"Deployment", "StatefulSet"} - {workload}).isdisjoint(kinds)
        assert {"Namespace", "Role", "RoleBinding", "ConfigMap", "Secret", "Service"} <= set(kinds)


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(d["kind"], d) for d in _objects("Deployment") + _objects("StatefulSet")]


def _daemon_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "driftloop"]
    return container


def _container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return found


def _workload_environ(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's literal and downward-API variables, as they are in a pod of that name."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name
    return env


def _workload_config(workload: dict[str, Any], tmp_path: Path) -> Config:
    container = _daemon_container(workload)
    args = container.get("args", [])
    config_file = args[args.index("--config") + 1]
    mount = [m for m in container["volumeMounts"] if config_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mount) == 1, f"{config_file} is on no mounted volume"
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount[0]["name"]]
    cm = _one("ConfigMap", volume["configMap"]["name"])
    text = cm["data"][config_file.removeprefix(mount[0]["mountPath"].rstrip("/") + "/")]
    name = f"{workload['metadata']['name']}-0"
    return _load_text_config(text, tmp_path, _workload_environ(container, name))


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_probes_hit_healthz_and_readyz_on_the_configured_port(kind: str, tmp_path: Path) -> None:
    (workload,) = _objects(kind)
    container = _daemon_container(workload)
    config = _workload_config(workload, tmp_path)
    assert container["args"] == ["run", "--config", CONFIG_PATH]
    probes = (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz"))
    for probe, path in probes:
        if probe == "startupProbe" and probe not in container:
            continue
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{kind} {probe} asks {get['path']}"
        assert _container_port(container, get["port"]) == config.http.port
    assert config.http.host in ("0.0.0.0", "::"), "the kubelet's probes come from outside the pod"
    spec = workload["spec"]["template"]["spec"]
    # SIGTERM's checkpoint needs longer than the default 30 s grace in the worst case.
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert spec["securityContext"]["runAsNonRoot"] is True
    labels = workload["spec"]["template"]["metadata"]["labels"]
    for service in _objects("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert _container_port(container, port["targetPort"]) == config.http.port


def test_every_workload_has_a_stable_unique_instance_id(tmp_path: Path) -> None:
    (deployment,) = _objects("Deployment")
    config = _workload_config(deployment, tmp_path / "d")
    assert deployment["spec"]["replicas"] == 1
    # Two pods under one instance_id (a rolling update's overlap) would fence each other
    # out of the consumer group and fight over the spill files.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert config.instance_id and not config.cluster.enabled
    (sts,) = _objects("StatefulSet")
    config = _workload_config(sts, tmp_path / "s")
    assert config.instance == f"{sts['metadata']['name']}-0", "each pod must be its own instance"
    assert config.cluster.enabled and sts["spec"]["replicas"] > 1
    assert config.storage.state_url, "replicas on several nodes cannot share a SQLite state store"
    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    data_mount = [m["name"] for m in _daemon_container(sts)["volumeMounts"]
                  if m["mountPath"] == config.storage.data_dir]
    assert data_mount and data_mount[0] in claims, "the data directory must be on a per-pod volume"


def test_credentials_the_config_names_are_in_the_secret(tmp_path: Path) -> None:
    for kind, workload in _workloads():
        config = _workload_config(workload, tmp_path / kind)
        container = _daemon_container(workload)
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert refs, f"{kind}: no Secret in envFrom"
        provided = {v["name"] for v in container.get("env", [])}
        for ref in refs:
            secret = _one("Secret", ref)
            provided |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
        names = dict(_env_names(config))
        assert names, "the config names no credential variable"
        for key, var in names.items():
            assert var in provided, f"{kind}: {key} names {var}, which neither the Secret nor env sets"
        if config.storage.state_url and urlsplit(config.storage.state_url).password is None:
            assert "PGPASSWORD" in provided


def _launcher_api_calls() -> set[str]:
    source = (ROOT / "retrain" / "launch.py").read_text()
    return set(re.findall(r"\b(?:batch|core)\.((?:create|read|list|delete|patch|replace)_namespaced_\w+)\(",
                          source))


def _rule_for(method: str) -> tuple[str, str, str]:
    """The (apiGroup, resource, verb) an API client method needs."""
    import kubernetes.client

    m = re.fullmatch(r"(create|read|list|delete|patch|replace)_namespaced_([a-z_]+?)(?:_(status|log))?",
                     method)
    assert m, method
    verb = {"read": "get", "replace": "update"}.get(m.group(1), m.group(1))
    resource = m.group(2).replace("_", "") + "s" + (f"/{m.group(3)}" if m.group(3) else "")
    if hasattr(kubernetes.client.BatchV1Api, method):
        return "batch", resource, verb
    assert hasattr(kubernetes.client.CoreV1Api, method), f"{method} is on neither BatchV1Api nor CoreV1Api"
    return "", resource, verb


def test_the_role_covers_what_the_kubernetes_launcher_calls(tmp_path: Path) -> None:
    pytest.importorskip("kubernetes")
    calls = _launcher_api_calls()
    assert {"create_namespaced_job", "read_namespaced_pod_log", "create_namespaced_config_map"} <= calls
    needed = {_rule_for(c) for c in calls}
    assert ("", "pods/log", "get") in needed and ("batch", "jobs/status", "get") in needed
    (deployment,) = _objects("Deployment")
    config = _workload_config(deployment, tmp_path)
    namespace = config.retrain.kubernetes.namespace
    roles = [r for r in _objects("Role") if r["metadata"]["namespace"] == namespace]
    assert len(roles) == 1, f"one Role in {namespace}, the training namespace"
    granted = {(g, r, v) for rule in roles[0]["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert not [x for x in granted if "*" in x], "wildcards grant more than the launcher needs"
    missing = needed - granted
    assert not missing, f"the Role lacks {sorted(missing)}"
    # Beyond the launcher's calls, reads of the same resources only.
    extra = granted - needed
    assert {r for _, r, _ in extra} <= {r for _, r, _ in needed}
    assert {v for _, _, v in extra} <= {"get", "list", "watch"}, sorted(extra)
    accounts = {w["spec"]["template"]["spec"]["serviceAccountName"] for _, w in _workloads()}
    (binding,) = [b for b in _objects("RoleBinding") if b["roleRef"]["name"] == roles[0]["metadata"]["name"]]
    assert binding["roleRef"]["kind"] == "Role"
    bound = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
    for account in accounts:
        _one("ServiceAccount", account)
        assert ("ServiceAccount", account, deployment["metadata"]["namespace"]) in bound


def test_the_rule_mapping_is_not_vacuous() -> None:
    pytest.importorskip("kubernetes")
    assert _rule_for("read_namespaced_job_status") == ("batch", "jobs/status", "get")
    assert _rule_for("patch_namespaced_config_map") == ("", "configmaps", "patch")
    assert _rule_for("list_namespaced_pod") == ("", "pods", "list")


def test_training_service_account_and_job_template_match_the_launcher(tmp_path: Path) -> None:
    pytest.importorskip("kubernetes")
    from monitor.retraining import build_launcher
    from retrain.spec import JobSpec

    (deployment,) = _objects("Deployment")
    config = _workload_config(deployment, tmp_path)
    k = config.retrain.kubernetes
    assert config.retrain.enabled and config.retrain.launcher == "kubernetes"
    account = _one("ServiceAccount", k.service_account)
    assert account["metadata"]["namespace"] == k.namespace
    assert account.get("automountServiceAccountToken") is False, "the trainer needs no API token"
    docs = _yaml_docs(K8S / "training-job-template.yaml")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec = JobSpec.from_json(cm["data"]["spec.json"])
    launcher = build_launcher(config)
    # The daemon's own launcher, on the daemon's own config, renders exactly this file.
    assert job == launcher.render(spec)
    assert cm == launcher.render_config_map(spec, cm["data"]["spec.json"])
    launcher.validate(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(k.gpus) and k.gpus >= 1
    assert container["image"] == k.image
    assert pod["serviceAccountName"] == k.service_account
    assert (spec.device, spec.trainer, spec.budget_s) == (config.retrain.device, config.retrain.trainer,
                                                          config.retrain.budget_seconds)
    assert spec.tracking_uri == config.mlflow.tracking_uri and spec.store == config.storage.store_url


# -- systemd -------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; systemd allows a key more than once."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: {line!r} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for k, v in unit["Service"] if k == key]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(s|min|m)?", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


@pytest.mark.parametrize("name", ["driftloop.service", "driftloop@.service"])
def test_systemd_unit_restarts_hardens_and_stops_gracefully(name: str) -> None:
    unit = _unit(SYSTEMD / name)
    one = {k: v for k, v in unit["Service"]}
    assert one["Restart"] == "always"
    assert one["User"] not in ("root", "0")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "KillSignal": "SIGTERM", "KillMode": "process"}.items():
        assert one.get(key) == value, f"{name}: {key}={one.get(key)}"
    assert _seconds(one["TimeoutStopSec"]) >= 60
    assert _values(unit, "EnvironmentFile"), "secrets need an EnvironmentFile"
    assert shlex.split(one["ExecStart"])[1:] == ["run", "--config", CONFIG_PATH]
    config = load_config(SYSTEMD / "config.yaml", environ={})
    rw = " ".join(_values(unit, "ReadWritePaths")).split()
    data_dir = Path(config.storage.data_dir)
    assert any(data_dir == Path(p) or Path(p) in data_dir.parents for p in rw), \
        f"{name}: ProtectSystem=strict leaves {data_dir} read-only"
    assert "multi-user.target" in dict(unit["Install"])["WantedBy"]


def test_systemd_env_example_sets_what_the_config_names() -> None:
    config = load_config(SYSTEMD / "config.yaml", environ={})
    lines = (SYSTEMD / "driftloop.env.example").read_text().splitlines()
    assigned = {ln.partition("=")[0] for ln in lines if ln and not ln.startswith("#")}
    for key, var in _env_names(config):
        assert var in assigned, f"{key} names {var}, missing from driftloop.env.example"
    assert "PGPASSWORD" in assigned


@pytest.mark.parametrize(("name", "instance"), [("driftloop.service", "driftloop.service"),
                                                ("driftloop@.service", "driftloop@0.service")])
def test_systemd_analyze_verifies_the_unit(name: str, instance: str, tmp_path: Path) -> None:
    tool = _need_tool("systemd-analyze", ci_required=True)
    # verify refuses an ExecStart whose binary does not exist, and /opt/driftloop is
    # where an installation puts it, not this checkout: a copy runs /bin/true instead,
    # everything else byte for byte.
    text = (SYSTEMD / name).read_text()
    copy, n = re.subn(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    assert n == 1
    (tmp_path / name).write_text(copy)
    proc = subprocess.run([tool, "verify", f"./{instance}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    # verify exits 0 on an unknown or unparsable directive and only warns: any output fails.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    bad = copy.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    (tmp_path / name).write_text(bad)
    proc = subprocess.run([tool, "verify", f"./{instance}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert "Unknown key" in proc.stdout + proc.stderr, "verify no longer reports unknown keys"


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    tool = _need_tool("systemd-analyze", ci_required=True)
    copy = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", (SYSTEMD / "driftloop.service").read_text(),
                  flags=re.M)
    (tmp_path / "driftloop.service").write_text(copy)
    proc = subprocess.run([tool, "security", "--offline=yes", "./driftloop.service"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"Overall exposure level for driftloop\.service: ([\d.]+)", proc.stdout + proc.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security report: {proc.stderr.strip()[:200]}")
    # 10 is an unhardened service; the directives above bring it to about 3.5 (the
    # network and the GPU devices stay reachable by design).
    assert float(m.group(1)) <= 4.5, proc.stdout
