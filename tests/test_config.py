"""Configuration: defaults, the TOML file, EDGED_* overrides, errors with locations, secrets kept secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.config import Config, ConfigError, load_config
from tests.conftest import MOSQUITTO, REPO, Broker, Daemon, free_port

SECRET = "s3cr3t-Pa55word-xyzzy"


def _edged(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "edged", *args], env={**base, **(env or {})}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(None, {})  # /etc/edged/edged.toml is absent on a test machine: defaults
    assert isinstance(config, Config)
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.prefix) == ("localhost", 1883, "edged")
    assert config.mqtt.protocol == "v5" and config.mqtt.shared_group is None
    assert config.device.id  # the hostname
    assert config.client_id == f"edged-{config.device.id}"
    assert config.topic("cmd") == f"edged/{config.device.id}/cmd"
    assert config.limits.queue_size == 64 and config.telemetry.interval_s == 30.0
    assert config.remote.url is None


def test_every_field_has_a_description() -> None:
    def walk(model: type, where: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{where}.{name}")
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                missing += walk(field.annotation, f"{where}.{name}")
        return missing

    assert walk(Config, "config") == []


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text(
        '[device]\nid = "kitchen-pi"\n'
        '[mqtt]\nhost = "broker.lan"\nport = 8883\nprefix = "home"\nshared_group = "g1"\n'
        '[models]\nrouter = "/opt/models/r.gguf"\nthinker = ""\n'
        '[remote]\nurl = "http://node:11434/v1"\n'
        '[tools]\nallow = ["add_numbers"]\n'
    )
    config = load_config(path, {})
    assert config.device.id == "kitchen-pi"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.prefix) == ("broker.lan", 8883, "home")
    assert config.topic("status") == "home/kitchen-pi/status"
    assert config.models.router == "/opt/models/r.gguf" and config.models.thinker is None
    assert config.remote.url == "http://node:11434/v1"
    assert config.tools.allow == ["add_numbers"]


def test_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text('[mqtt]\nport = 1999\nhost = "from-file"\n')
    env = {"EDGED_MQTT__PORT": "1884", "EDGED_MODELS__ROUTER": "/x.gguf", "EDGED_TOOLS__ALLOW": '["get_weather"]',
           "EDGED_LIMITS__QUEUE_SIZE": "3", "EDGED_MODELS_DIR": "/not/a/section", "OTHER": "1"}
    config = load_config(path, env)
    assert config.mqtt.port == 1884  # the environment wins over the file
    assert config.mqtt.host == "from-file"  # and leaves the rest of the section alone
    assert config.models.router == "/x.gguf"
    assert config.tools.allow == ["get_weather"]
    assert config.limits.queue_size == 3
    assert load_config(None, {"EDGED_MQTT__PORT": "1884"}).mqtt.port == 1884
    assert load_config(None, {"EDGED_MODELS__ROUTER": ""}).models.router is None


def test_errors_name_their_location(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[mqtt]\nport = 70000\nbogus = 1\n[limits]\nqueue_size = 0\n[nosuch]\nx = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    errors = info.value.errors
    assert len(errors) == 4, errors
    assert any(e.startswith(f"{path}: mqtt.port: ") and "65535" in e for e in errors)
    assert any(e.startswith(f"{path}: mqtt.bogus: ") and "Extra inputs" in e for e in errors)
    assert any(e.startswith(f"{path}: limits.queue_size: ") for e in errors)
    assert any(e.startswith(f"{path}: nosuch: ") and "Extra inputs" in e for e in errors)


def test_errors_from_the_environment_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"EDGED_MQTT__PORT": "http", "EDGED_MQTT__PROTOCOL": "v4"})
    errors = sorted(info.value.errors)
    assert errors[0].startswith("environment EDGED_MQTT__PORT: mqtt.port: ")
    assert errors[1].startswith("environment EDGED_MQTT__PROTOCOL: mqtt.protocol: ")


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[mqtt\nport = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, {})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", {})


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[device]\nid = "d1"\n[mqtt]\nport = 1884\n')
    ok = _edged("check-config", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "1884" in ok.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "many"\nprefx = "typo"\n[device]\nid = "has space"\n')
    res = _edged("check-config", str(bad))
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert any(f"{bad}: mqtt.port: " in line for line in lines), res.stderr
    assert any(f"{bad}: mqtt.prefx: " in line and "Extra inputs" in line for line in lines), res.stderr
    assert any(f"{bad}: device.id: " in line for line in lines), res.stderr
    assert "Traceback" not in res.stderr

    missing = _edged("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_run_refuses_a_bad_config_with_the_same_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = 0\n[telemetry]\nevery = 5\n')
    check = _edged("check-config", str(bad))
    t0 = time.monotonic()
    run = _edged("run", "--config", str(bad), timeout=20)
    assert time.monotonic() - t0 < 15
    assert run.returncode == check.returncode != 0
    assert run.stderr.strip() == check.stderr.strip()
    assert f"{bad}: mqtt.port: " in run.stderr and f"{bad}: telemetry.every: " in run.stderr
    env_run = _edged("run", env={"EDGED_MQTT__PORT": "99999"}, timeout=20)
    assert env_run.returncode != 0 and "EDGED_MQTT__PORT: mqtt.port: " in env_run.stderr


def test_password_from_file_and_credentials_directory(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text(SECRET + "\n")
    config = load_config(None, {"EDGED_MQTT__USERNAME": "u", "EDGED_MQTT__PASSWORD_FILE": str(pw_file)})
    secret = config.mqtt.resolved_password()
    assert secret is not None and secret.get_secret_value() == SECRET

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-credentials\n")
    old = os.environ.get("CREDENTIALS_DIRECTORY")
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)
    try:
        secret = load_config(None, {}).mqtt.resolved_password()
        assert secret is not None and secret.get_secret_value() == "from-credentials"
    finally:
        if old is None:
            del os.environ["CREDENTIALS_DIRECTORY"]
        else:
            os.environ["CREDENTIALS_DIRECTORY"] = old

    with pytest.raises(ConfigError, match="password_file"):
        load_config(None, {"EDGED_MQTT__PASSWORD_FILE": str(tmp_path / "absent")})


def test_password_never_in_repr_or_dump(tmp_path: Path) -> None:
    config = load_config(None, {"EDGED_MQTT__PASSWORD": SECRET, "EDGED_MQTT__USERNAME": "u"})
    assert config.mqtt.password is not None and config.mqtt.password.get_secret_value() == SECRET
    for text in (repr(config), str(config), repr(config.mqtt), config.model_dump_json(), str(config.model_dump())):
        assert SECRET not in text
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[mqtt]\npassword = "{SECRET}"\nport = "x"\n')
    res = _edged("check-config", str(bad))
    assert res.returncode != 0 and "mqtt.port" in res.stderr
    assert SECRET not in res.stderr + res.stdout


@pytest.mark.mqtt
def test_daemon_authenticates_with_a_password_file_and_never_logs_it(tmp_path: Path) -> None:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwd = workdir / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "edge", SECRET], check=True, capture_output=True)
    passwd.chmod(0o600)
    as_root = "user root\n" if os.geteuid() == 0 else ""  # as root, mosquitto drops to 'mosquitto': keep access
    broker = Broker(free_port(), workdir, extra_conf=f"allow_anonymous false\npassword_file {passwd}\n{as_root}")
    broker.start()
    try:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "mqtt_password").write_text(SECRET + "\n")
        d = Daemon(broker, tmp_path, "authdev", {
            "EDGED_MQTT__USERNAME": "edge", "CREDENTIALS_DIRECTORY": str(creds), "EDGED_LOG__LEVEL": "debug",
        })
        d.start()  # reaches "ready" only if the broker accepted the password
        wrong = Daemon(broker, tmp_path, "wrongdev", {
            "EDGED_MQTT__USERNAME": "edge", "EDGED_MQTT__PASSWORD": "not-it",
        })
        wrong.start(wait_ready=False)
        wrong.wait_log("mqtt_connect_refused", timeout=15)
        wrong.stop()
        assert d.stop() == 0
        for daemon in (d, wrong):
            text = daemon.log_path.read_text()
            assert text and SECRET not in text
    finally:
        broker.stop()
