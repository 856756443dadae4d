"""Credentials for the MLflow tracking server, from the ``mlflow`` config section.

MLflow's client takes its credentials only from environment variables, read per
request: ``MLFLOW_TRACKING_TOKEN`` (a bearer token), ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (basic auth, which wins over a token when both are set)
and ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (a CA bundle). Setting them in this process
therefore covers every registry call, on every thread, and every training job a
launcher starts from this process's environment (LocalLauncher, TorchrunLauncher).
A Kubernetes Job gets them from a Secret instead (docs/security.md).

The config names where the secret is (a variable or a file, never the value), so
the secret can come from a Kubernetes Secret mounted as a file and be rotated with
a restart, without the config file ever holding it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from connectors.http import read_secret

__all__ = ["MLFLOW_AUTH_VARIABLES", "apply_credentials", "resolve_credentials"]

TOKEN = "MLFLOW_TRACKING_TOKEN"
USERNAME = "MLFLOW_TRACKING_USERNAME"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"
CERT_PATH = "MLFLOW_TRACKING_SERVER_CERT_PATH"
#: Every variable `apply_credentials` may set or remove.
MLFLOW_AUTH_VARIABLES = (TOKEN, USERNAME, PASSWORD, CERT_PATH)


def resolve_credentials(settings: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """The MLflow variables the ``mlflow`` section asks for, with the secrets read.

    Args:
        settings: the ``mlflow`` config section (monitor.config.MlflowConfig).
        environ: where ``*_env`` keys are looked up.

    Raises:
        ValueError: a named variable is unset or a named file unreadable; the message
            names the config key (``mlflow.token_env: ...``).
    """
    out: dict[str, str] = {}
    token = read_secret("mlflow.token", settings.token_env, settings.token_file, environ)
    if token is not None:
        out[TOKEN] = token
    username = read_secret("mlflow.username", settings.username_env, settings.username_file, environ)
    password = read_secret("mlflow.password", settings.password_env, settings.password_file, environ)
    if username is not None and password is not None:
        out[USERNAME] = username
        out[PASSWORD] = password
    if settings.ca_file:
        out[CERT_PATH] = settings.ca_file
    return out


def apply_credentials(settings: Any, environ: Mapping[str, str] | None = None, *,
                      target: MutableMapping[str, str] | None = None) -> list[str]:
    """Resolves the ``mlflow`` section's credentials and sets them for MLflow's client.

    With credentials configured, the config wins over whatever MLflow variables the
    process inherited: a configured token removes an inherited username and password
    (which MLflow would prefer), and the other way round. With none configured,
    inherited variables are left alone, so an operator's ``MLFLOW_TRACKING_TOKEN``
    still works.

    Args:
        settings: the ``mlflow`` config section (monitor.config.MlflowConfig).
        environ: where ``*_env`` keys are looked up; default this process's environment.
        target: where the variables go; default this process's environment (what
            MLflow reads and launched jobs inherit).

    Returns:
        The names of the variables set (never their values: for a log line).

    Raises:
        ValueError: as `resolve_credentials`.
    """
    environ = os.environ if environ is None else environ
    target = os.environ if target is None else target
    values = resolve_credentials(settings, environ)
    if TOKEN in values or USERNAME in values:
        for name in (TOKEN, USERNAME, PASSWORD):
            if name not in values:
                target.pop(name, None)
    target.update(values)
    return sorted(values)
