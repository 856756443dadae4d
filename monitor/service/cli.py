"""The ``driftloop`` command.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one line on
stderr naming the file, key or variable).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from monitor.config import PROFILES, Config, ConfigError, load_config

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftloop",
        description="Keep a production recommender healthy: monitor, alert, retrain, promote.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", help="YAML config file (env DRIFTLOOP__* overrides)")
    run.add_argument("--profile", choices=sorted(PROFILES),
                     help="defaults under the config file: 'trial' shortens windows, bootstrap and "
                          "attribution so that a first look shows verdicts within minutes")
    status = sub.add_parser("status", help="print the running daemon's /status")
    status.add_argument("--config", "-c", help="YAML config file")
    check = sub.add_parser("check-config", help="validate the config and print it resolved")
    check.add_argument("--config", "-c", help="YAML config file")
    check.add_argument("--profile", choices=sorted(PROFILES), help="as for run")
    retrain = sub.add_parser("retrain", help="ask the running daemon to fine-tune MODEL now")
    retrain.add_argument("model", help="the registered model name")
    retrain.add_argument("--reason", default="asked by a person", help="why (kept with the decision)")
    retrain.add_argument("--who", default=None, help="who asks (default: $USER)")
    retrain.add_argument("--config", "-c", help="YAML config file")
    promote = sub.add_parser("promote", help="make VERSION of MODEL the champion (shows the evidence first)")
    promote.add_argument("model")
    promote.add_argument("version")
    promote.add_argument("--reason", default="promoted by a person")
    promote.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    promote.add_argument("--config", "-c", help="YAML config file")
    rollback = sub.add_parser("rollback", help="move MODEL's champion back to the previous version")
    rollback.add_argument("model")
    rollback.add_argument("--reason", default="rolled back by a person")
    rollback.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rollback.add_argument("--config", "-c", help="YAML config file")
    return parser


def _aliases(config: Config, args: argparse.Namespace) -> int:
    """``promote`` and ``rollback``: the same lock and history as the daemon's."""
    import getpass

    from connectors.registry import RegistryError
    from monitor.promotion import build_promoter
    from monitor.service import wiring
    from retrain.evaluate import REPORT_PATH
    from retrain.promote import CHAMPION, GATE_PATH, PREVIOUS, PromotionError

    if not config.mlflow.tracking_uri:
        print("driftloop: mlflow.tracking_uri is not set: there is no registry to move aliases in",
              file=sys.stderr)
        return EXIT_CONFIG
    _mlflow_credentials(config)
    registry = wiring.registry(config)
    assert registry is not None
    who = getpass.getuser()
    try:
        promoter, history = build_promoter(config, registry, owner=f"cli:{who}")
        champion = registry.version_by_alias(args.model, CHAMPION)
        previous = registry.version_by_alias(args.model, PREVIOUS)
        target = args.version if args.command == "promote" else previous
        print(f"{args.model}: champion={champion or 'unset'} previous={previous or 'unset'}")
        if args.command == "rollback" and previous is None:
            print(f"driftloop: {args.model} has no previous version to roll back to", file=sys.stderr)
            return 1
        for path, title in ((REPORT_PATH, "evaluation"), (GATE_PATH, "gate")):
            raw = registry.download_artifact(args.model, str(target), path)
            if raw is not None:
                print(f"--- {title} of v{target} ({path}) ---")
                print(json.dumps(json.loads(raw), indent=2)[:4000])
        action = (f"make v{target} the champion (v{champion} becomes previous)" if args.command == "promote"
                  else f"move the champion back from v{champion} to v{target}")
        if not args.yes:
            answer = input(f"{action}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing moved")
                return 1
        if args.command == "promote":
            moves = promoter.promote(args.model, args.version, who=who, why=args.reason,
                                     evidence={"via": "driftloop promote"})
        else:
            moves = promoter.rollback(args.model, who=who, why=args.reason,
                                      evidence={"via": "driftloop rollback"})
    except (PromotionError, RegistryError, ValueError) as exc:
        print(f"driftloop: {exc}", file=sys.stderr)
        return 1
    for m in moves:
        print(f"moved {m.alias}: {m.from_version} -> {m.to_version} ({m.why})")
    del history
    return 0


def _daemon_url(config: Config, path: str) -> str:
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.http.port}{path}"


def _config_error(message: str) -> SystemExit:
    print(f"driftloop: {message}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def _mlflow_credentials(config: Config) -> None:
    """MLflow's client and the jobs launched from here authenticate with the configured secret."""
    from connectors.mlflow_auth import apply_credentials

    try:
        apply_credentials(config.mlflow, os.environ)
    except ValueError as exc:
        raise _config_error(str(exc)) from None


def _http_token(config: Config) -> str | None:
    from connectors.http import read_secret

    try:
        return read_secret("http.token", config.http.token_env, config.http.token_file, os.environ)
    except ValueError as exc:
        raise _config_error(str(exc)) from None


def _call_daemon(config: Config, path: str, body: dict[str, Any] | None = None) -> int:
    """GET (no body) or POST ``path`` on the running daemon and print its JSON answer."""
    from connectors.http import bearer_header

    url = _daemon_url(config, path)
    headers = bearer_header(_http_token(config))
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(json.dumps(json.load(resp), indent=2))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        if exc.code == 401:
            detail += (" (set http.token_env or http.token_file to the daemon's token)" if not headers.get(
                "Authorization") else " (the token from http.token_env/token_file is not the daemon's)")
        print(f"driftloop: the daemon refused: {exc.code} {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"driftloop: no daemon answering at {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _secure_daemon(config: Config) -> Any:
    """Reads every secret the daemon needs before it starts; returns its ``on_ready`` hook.

    A missing variable or unreadable file is a configuration error (exit 2) here,
    not a crash in the main loop at the first Kafka connection.
    """
    from connectors.kafka import client_security

    try:
        kafka_security = client_security(config.kafka, os.environ)
    except ValueError as exc:
        raise _config_error(str(exc)) from None
    token = _http_token(config)
    _mlflow_credentials(config)

    def on_ready(daemon: Any) -> None:
        # Before run(): the server does not serve and the producer has not connected yet.
        daemon.http.action_token = token
        daemon.http.protect_reads = config.http.protect_reads
        daemon.dead_letters.use_security(kafka_security)

    return on_ready


def _load(path: str | None, profile: str | None = None) -> Config:
    try:
        return load_config(path, profile=profile)
    except ConfigError as exc:
        print(f"driftloop: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = getattr(args, "profile", None)
    config = _load(args.config, profile)
    if args.command == "check-config":
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(config)).decode())
        return 0
    if args.command in ("promote", "rollback"):
        return _aliases(config, args)
    if args.command == "retrain":
        import getpass

        return _call_daemon(config, "/retrain", {"model": args.model, "reason": args.reason,
                                                 "who": args.who or getpass.getuser()})
    if args.command == "status":
        return _call_daemon(config, "/status")
    on_ready = _secure_daemon(config)
    from connectors.logs import setup_logging
    from monitor.service.daemon import run_daemon

    setup_logging(config.logging.level)
    if profile is not None:
        import logging

        logging.getLogger("monitor.service.cli").warning(
            f"profile {profile!r}: short durations for a first look, not production statistics",
            extra={"fields": {"windows.size_seconds": config.windows.size_seconds,
                              "monitor.bootstrap_seconds": config.monitor.bootstrap_seconds,
                              "monitor.attribution_seconds": config.monitor.attribution_seconds,
                              "monitor.stats.performance.period_seconds":
                                  config.monitor.performance.period_seconds}})
    # `kill -USR1 <pid>` prints every thread's stack to stderr: the first thing to
    # look at when a daemon seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return run_daemon(config, on_ready=on_ready)
    except ConfigError as exc:  # settings only checkable when wiring (secrets in the environment)
        print(f"driftloop: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
