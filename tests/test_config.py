"""Configuration errors: one message naming the file, key or variable, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.config import ConfigError, load_config


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP__")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "monitor.service.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=60, check=False)


@pytest.mark.parametrize(("yaml_text", "env", "expected"), [
    ("kafka:\n  bootstrap_servrs: x:1\n", {}, "kafka.bootstrap_servrs: unknown key"),
    ("kafka:\n  max_poll_records: many\n", {}, "kafka.max_poll_records: Expected `int`, got `str`"),
    ("windows:\n  size_seconds: 1.5\n", {}, "windows.size_seconds: Expected `int`, got `float`"),
    ("kafka:\n  max_poll_records: 0\n", {}, "kafka.max_poll_records must be > 0, got 0"),
    ("kafka: [1, 2]\n", {}, "kafka: Expected `object`, got `array`"),
    ("nonsense: 1\n", {}, "nonsense: unknown key"),
    ("kafka:\n  start_from: middle\n", {}, "kafka.start_from: Invalid enum value 'middle'"),
    ("{}\n", {"DRIFTLOOP__HTTP__PORT": "eighty"},
     "environment variable DRIFTLOOP__HTTP__PORT: http.port: Expected `int`, got `str`"),
    ("{}\n", {"DRIFTLOOP__KAFKA__NOPE": "1"},
     "environment variable DRIFTLOOP__KAFKA__NOPE: kafka.nope: unknown key"),
    ("kafka: {\n", {}, "is not valid YAML"),
    ("instance_id: a--b\n", {}, "instance_id 'a--b' must not contain '--'"),
    ("retrain:\n  entry_module: my-job\n", {}, "retrain.entry_module must be a dotted module name"),
])
def test_bad_config_exits_2_with_one_message_naming_the_key(
        tmp_path: Path, yaml_text: str, env: dict[str, str], expected: str) -> None:
    cfg = tmp_path / "driftloop.yaml"
    cfg.write_text(yaml_text)
    proc = run_cli("run", "--config", str(cfg), env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    proc = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"driftloop: config file not found: {tmp_path / 'nope.yaml'}"


def test_environment_overrides_the_file_with_typed_values(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  group_id: from-file\n  max_poll_records: 10\n")
    config = load_config(cfg, environ={"DRIFTLOOP__KAFKA__MAX_POLL_RECORDS": "500",
                                       "DRIFTLOOP__WINDOWS__SIZE_SECONDS": "30"})
    assert config.kafka.group_id == "from-file"
    assert config.kafka.max_poll_records == 500
    assert config.windows.size_seconds == 30


def test_defaults_need_no_file() -> None:
    config = load_config(None, environ={})
    assert config.kafka.predictions_topic == "predictions"
    assert config.windows.size_seconds == 60


def test_window_that_does_not_divide_an_hour_is_rejected_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("windows:\n  size_seconds: 7\n")
    with pytest.raises(ConfigError, match=r"windows\.size_seconds"):
        load_config(cfg, environ={})


def test_check_config_prints_the_resolved_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("instance_id: box-1\n")
    proc = run_cli("check-config", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert '"instance_id": "box-1"' in proc.stdout


def test_the_trial_profile_shortens_the_first_verdicts_and_the_file_still_wins(tmp_path: Path) -> None:
    """A first look with the defaults showed no drift analysis for an hour and no label
    analysis for 1.5 hours; the trial profile brings both within minutes, consistently."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("windows:\n  size_seconds: 30\nmonitor:\n  performance:\n    alpha: 0.05\n")
    config = load_config(cfg, environ={"DRIFTLOOP__MONITOR__ATTRIBUTION_SECONDS": "90"}, profile="trial")
    m = config.monitor
    assert config.windows.size_seconds == 30  # the file wins
    assert m.attribution_seconds == 90  # and the environment
    assert m.performance.alpha == 0.05 and m.performance.period_seconds == 60  # merged, not replaced
    assert m.bootstrap_seconds <= 180 and m.performance.period_seconds <= 120
    # The first label verdict: a bootstrapped label reference, then one drop-test period.
    first_labels_s = m.bootstrap_seconds + m.attribution_seconds + m.performance.period_seconds
    assert first_labels_s <= 6 * 60
    default = load_config(None, environ={}).monitor
    assert (default.bootstrap_seconds + default.attribution_seconds
            + default.performance.period_seconds) > 60 * 60
    with pytest.raises(ConfigError, match="--profile 'nope'"):
        load_config(None, environ={}, profile="nope")


def test_check_config_applies_the_trial_profile(tmp_path: Path) -> None:
    proc = run_cli("check-config", "--profile", "trial")
    assert proc.returncode == 0, proc.stderr
    assert '"size_seconds": 10' in proc.stdout
