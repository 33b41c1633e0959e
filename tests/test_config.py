"""Configuration: the commented example is the defaults, environment overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from fleetgate.config import EXAMPLE, Config, ConfigError, load_config

FLEETGATE = Path(sys.executable).with_name("fleetgate")


def test_example_file_states_the_defaults() -> None:
    assert msgspec.convert(tomllib.loads(EXAMPLE), Config, strict=False) == Config()


def test_file_and_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fleetgate.toml"
    path.write_text('[bus]\ndriver = "redis"\n[limits]\nidle_timeout_s = 60\n')
    env = {"FLEETGATE_LIMITS__IDLE_TIMEOUT_S": "120", "FLEETGATE_MQTT__ENABLED": "true", "OTHER": "x"}
    config = load_config(path, env)
    assert config.bus.driver == "redis"
    assert config.limits.idle_timeout_s == 120.0
    assert config.mqtt.enabled is True
    assert config.listeners == Config().listeners


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[bus]\ndriver = 'kafka'\n", {}, "driver"),
        ("[nosuch]\nx = 1\n", {}, "nosuch"),
        ("", {"FLEETGATE_LIMITS__MAX_FRAME": "big"}, "max_frame"),
        ("[limits\n", {}, "fleetgate.toml"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    path = tmp_path / "fleetgate.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert needle in str(info.value)


def test_config_example_command() -> None:
    out = subprocess.run([str(FLEETGATE), "config", "--example"], capture_output=True, text=True, check=True)
    assert out.stdout == EXAMPLE


def test_gateway_command_requires_redis() -> None:
    out = subprocess.run([str(FLEETGATE), "gateway"], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert out.returncode == 2 and "needs Redis" in out.stderr
