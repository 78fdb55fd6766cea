"""Configuration: one TOML file, environment overrides, secrets from files.

Every setting is a pydantic field with a description and bounds, and unknown keys are errors, so a typo in a
fleet-wide config is caught by `edged check-config` before it reaches a device instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_PATH = Path("/etc/edged/edged.toml")
ENV_PREFIX = "EDGED_"


def _default_state_dir() -> Path:
    """systemd's StateDirectory= when run as a service, else a per-user directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edged"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DeviceConfig(_Section):
    id: str = Field(
        default_factory=lambda: socket.gethostname().split(".")[0] or "edged",
        description="Device id: the MQTT topic level under the prefix; defaults to the hostname.",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
    )


class MqttConfig(_Section):
    host: str = Field("localhost", description="Broker host name or address.", min_length=1)
    port: int = Field(1883, description="Broker TCP port.", ge=1, le=65535)
    prefix: str = Field(
        "edged", description="First topic level of every edged topic.", min_length=1, pattern=r"^[^/+#]+$"
    )
    protocol: Literal["v5", "v311"] = Field("v5", description="MQTT protocol version.")
    client_id: str | None = Field(
        None, description="Stable client id; defaults to 'edged-<device id>'.", min_length=1, max_length=128
    )
    keepalive_s: int = Field(30, description="Keep-alive interval in seconds.", ge=5, le=3600)
    session_expiry_s: int = Field(
        86400,
        description="MQTT v5 Session Expiry Interval: how long the broker keeps our queued commands offline.",
        ge=0,
        le=2**32 - 1,
    )
    reconnect_min_s: float = Field(1.0, description="First reconnect delay.", gt=0, le=60)
    reconnect_max_s: float = Field(60.0, description="Largest reconnect delay (exponential backoff).", gt=0, le=3600)
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password (prefer password_file).")
    password_file: Path | None = Field(
        None,
        description="File holding the broker password; default $CREDENTIALS_DIRECTORY/mqtt_password if present.",
    )
    tls: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key for mutual TLS.")
    shared_group: str | None = Field(
        None,
        description="Also serve '$share/<group>/<prefix>/pool/cmd' so several devices split one workload.",
        pattern=r"^[^/+#]+$",
    )
    max_payload_bytes: int = Field(
        65536, description="Commands larger than this are refused with 'payload_too_large'.", ge=256, le=16 << 20
    )
    receive_maximum: int = Field(
        0,
        description="MQTT v5 Receive Maximum: commands the broker may have in flight to us at once; the rest wait "
        "at the broker. 0 = [limits] queue_size + worker threads, so a backlog is held by the broker, not "
        "answered 'busy'. A larger value lets overload reach the daemon and be answered 'busy' at once.",
        ge=0,
        le=65535,
    )

    def resolved_password(self) -> SecretStr | None:
        """The password from password_file, $CREDENTIALS_DIRECTORY, or the inline value, in that order."""
        candidates: list[Path] = []
        if self.password_file:
            candidates.append(self.password_file)
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            candidates.append(Path(cred_dir) / "mqtt_password")
        for path in candidates:
            if path.is_file():
                return SecretStr(path.read_text(encoding="utf-8").strip())
        if self.password_file:
            raise ConfigError([f"mqtt.password_file: {self.password_file} does not exist"])
        return self.password


class ModelsConfig(_Section):
    dir: Path | None = Field(
        None, description="Where GGUF files live; default $EDGED_MODELS_DIR or <state dir>/models."
    )
    router: str | None = Field(
        "gemma3-270m-q4km",
        description="Tier-1 router: a manifest name or a path to a .gguf file; empty to run without it.",
    )
    thinker: str | None = Field(
        "qwen2.5-coder-0.5b",
        description="Tier-2 thinker: a manifest name or a path to a .gguf file; empty to run without it.",
    )
    n_threads: int = Field(0, description="llama.cpp threads; 0 = physical cores.", ge=0, le=256)
    n_ctx: int = Field(
        4096, description="Context length of each loaded model (the prompt of a 50-tool set fits).", ge=256,
        le=131072,
    )
    n_batch: int = Field(64, description="Tokens per llama.cpp batch: requests are short; smaller saves memory.",
                         ge=8, le=4096)
    kv_cache_type: Literal["f16", "q8_0"] = Field(
        "q8_0", description="KV cache precision of the thinker; q8_0 halves its memory."
    )
    router_kv_cache_type: Literal["auto", "f16", "q8_0"] = Field(
        "auto", description="KV cache precision of the router (and of a model serving both roles). auto = what "
        "the manifest measured for the model, else q8_0: f16 for the Gemma 3 270M files keeps attention over a "
        "long tool prompt cheap (50 tools ~1.1x 3 tools per step, ~1.25x with q8_0) for ~36 MB at n_ctx 4096.",
    )
    use_mmap: bool = Field(
        False, description="Map weights from the file (pages shared with the page cache) instead of reading them.",
    )
    n_gpu_layers: int = Field(0, description="Layers offloaded to a GPU (needs a CUDA/Vulkan build).", ge=-1, le=1000)
    router_format: Literal["functiongemma", "qwen", "gemma3", "generic"] | None = Field(
        None, description="Prompt format of the router; default from the manifest or the GGUF's metadata."
    )
    min_confidence: float = Field(
        0.0, description="Below this confidence in its tool choice the router hands over (escalates).", ge=0, le=1
    )
    check_grounding: bool = Field(
        True, description="Escalate when a tier-1 call has a free-text value the request never mentioned, or the "
        "request needs an earlier step's result ('..., then the weather in her city')."
    )
    verify: bool = Field(True, description="Check each file's sha256 (cached by size and mtime) before loading.")

    @field_validator("router", "thinker", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", "none") else value


class ThinkerConfig(_Section):
    max_steps: int = Field(4, description="Tool-calling rounds per request before tier 2 gives up.", ge=1, le=16)
    max_tokens: int = Field(384, description="Tokens tier 2 may generate per request (thinking included).",
                            ge=16, le=8192)
    enable_thinking: bool = Field(False, description="Qwen3 thinking mode by default (commands may override).")
    temperature: float | None = Field(
        None, description="Sampling temperature; unset = Qwen3's recommendation (0.6 thinking, 0.7 otherwise).",
        ge=0, le=2,
    )
    seed: int = Field(-1, description="Sampling seed; -1 = random.", ge=-1, le=2**31 - 1)


class RemoteConfig(_Section):
    url: str | None = Field(
        None, description="Tier-3 OpenAI-compatible base URL, e.g. http://node:11434/v1; empty = no tier 3."
    )
    model: str = Field("qwen3:4b", description="Model name sent to the remote node.", min_length=1)
    api_key_file: Path | None = Field(None, description="File holding the bearer token for the remote node.")
    timeout_s: float = Field(30.0, description="Timeout of one remote request.", gt=0, le=600)
    on_offline: Literal["fallback", "queue"] = Field(
        "fallback", description="What to do with a tier-3 request while the node is unreachable."
    )
    queue_ttl_s: float = Field(
        3600.0, description="How long a queued command without its own deadline_ms waits in the outbox.",
        gt=0, le=30 * 86400,
    )
    ca_file: Path | None = Field(None, description="CA bundle that signed an https node's certificate.")
    max_steps: int = Field(4, description="Model turns per request (tool calls, then the answer).", ge=1, le=16)
    max_tokens: int = Field(512, description="Tokens the node may generate per turn.", ge=16, le=32768)
    temperature: float = Field(0.7, description="Sampling temperature sent to the node.", ge=0, le=2)
    failure_threshold: int = Field(
        3, description="Consecutive failures (probes or requests) that open the circuit breaker.", ge=1, le=100
    )
    probe_interval_s: float = Field(
        15.0, description="Seconds between health probes (GET <url>/models) while the node is up.", ge=0.5, le=3600
    )
    backoff_max_s: float = Field(
        60.0, description="Largest delay between probes while the node is down (exponential backoff).", ge=0.5,
        le=3600,
    )

    @field_validator("url", mode="before")
    @classmethod
    def _check_url(cls, value: Any) -> Any:
        if value in ("", "none", None):
            return None
        pattern = r"^https?://([^/\s:\[\]]+|\[[0-9A-Fa-f:.]+\])(:\d+)?(/\S*)?$"  # host name, IPv4 or [IPv6]
        if not isinstance(value, str) or not re.match(pattern, value):
            raise ValueError("expected http(s)://host[:port][/path], e.g. http://node:11434/v1")
        return value.rstrip("/")


class TelemetryConfig(_Section):
    interval_s: float = Field(30.0, description="Seconds between telemetry messages.", ge=0.5, le=86400)


class LimitsConfig(_Section):
    queue_size: int = Field(64, description="Commands waiting for a worker; beyond it, 'busy'.", ge=1, le=100000)
    deadline_ms: int = Field(30000, description="Default per-request deadline.", ge=10, le=3600_000)
    shutdown_grace_s: float = Field(10.0, description="Time to finish in-flight commands on SIGTERM.", ge=0, le=600)
    answered_cache: int = Field(
        10000, description="Recently answered ids kept to answer redeliveries without re-running.", ge=0, le=10**7
    )
    retry_after_ms: int = Field(1000, description="Retry hint sent with a 'busy' result.", ge=0, le=3600_000)
    reply_window: int = Field(
        32, description="Quick commands (direct calls) a worker takes off a backlog and answers together: their "
        "results are stored in one commit and published at once. A crash may send that many replies per worker "
        "again, or run again that many whose results were not stored yet (none of their replies was sent); "
        "1 = at most one per worker, at about 2/3 of the direct-call throughput.",
        ge=1, le=1024,
    )


class ToolsConfig(_Section):
    allow: list[str] | None = Field(
        None, description="Names of the tools this device may run; unset = every registered tool."
    )
    contacts_file: Path | None = Field(
        None, description="JSON list of contacts for search_contacts; default a small built-in list."
    )
    timeout_s: float = Field(5.0, description="Default timeout of one tool call.", gt=0, le=600)
    enable_debug_tools: bool = Field(
        False,
        description="Register fault-injection tools (debug_sleep: blocks a worker like a stuck inference). "
        "For tests only; never on a production device.",
    )


class StateConfig(_Section):
    dir: Path = Field(
        default_factory=_default_state_dir,
        description="Writable state: answered-id store, outbox, models by default.",
    )


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="'auto' renders for a terminal, JSON otherwise."
    )


class MqttToolConfig(_Section):
    name: str = Field(description="Tool name as models and clients see it.", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    description: str = Field(description="What the tool does, for the models.", min_length=1, max_length=1000)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments (object of string/integer/number/boolean properties, enums).",
    )
    topic: str = Field(
        description="Topic template, e.g. 'zigbee2mqtt/{room}_light/set'; arguments may not hold '/', '+', '#'.",
        min_length=1,
    )
    payload: Any = Field(
        None,
        description="Payload template: a JSON value whose strings may hold {arg}; a string exactly '{arg}' "
        "becomes the argument's JSON value. A top-level string is sent as plain text. Default: the arguments.",
    )
    qos: Literal[0, 1] = Field(1, description="QoS of the command message.")
    retain: bool = Field(False, description="Publish the command retained.")
    confirm_topic: str | None = Field(
        None, description="Topic template on which the device publishes its new state; unset = no confirmation."
    )
    confirm_match: dict[str, Any] | None = Field(
        None, description="Fields (templates) the confirmation's JSON must hold, e.g. {state = '{state}'}."
    )
    confirm_timeout_s: float = Field(3.0, description="Wait this long for the confirmation.", gt=0, le=300)
    examples: list[dict[str, Any]] = Field(
        default_factory=list, description="Few-shot examples for untrained models: {request, arguments} tables."
    )

    @model_validator(mode="after")
    def _check(self) -> MqttToolConfig:
        from edged.tools.mqtt_tools import check_tool_config

        check_tool_config(self)
        return self


class TriggerCondition(_Section):
    field: str = Field(description="Dotted path of a field of the JSON payload, e.g. 'temperature'.", min_length=1)
    op: Literal["==", "!=", ">", ">=", "<", "<="] = Field("==", description="Comparison.")
    value: str | float | bool = Field(description="Value to compare the field with.")


class TriggerCall(_Section):
    name: str = Field(description="Tool to call.", min_length=1, max_length=128)
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="Argument templates ({topic}, {payload}, {topic.N}, JSON fields)."
    )


class TriggerConfig(_Section):
    name: str = Field(description="Trigger name (logs, telemetry, result topic).", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    topic: str = Field(description="Topic filter to subscribe, e.g. 'sensors/+/temperature'.", min_length=1)
    query: str | None = Field(
        None, description="Request template run through the models: {topic}, {payload}, {topic.N}, JSON fields."
    )
    call: TriggerCall | None = Field(None, description="A direct tool call instead of a query (no model).")
    when: TriggerCondition | None = Field(None, description="Run only when this holds for the JSON payload.")
    debounce_s: float = Field(
        30.0, description="After a run, ignore further matching messages for this long.", ge=0, le=86400
    )
    rate_per_min: float = Field(6.0, description="Sustained runs per minute (token bucket).", gt=0, le=6000)
    burst: int = Field(3, description="Runs allowed back to back (token bucket size).", ge=1, le=1000)
    qos: Literal[0, 1] = Field(0, description="QoS of the subscription.")
    ignore_retained: bool = Field(True, description="Skip retained (stale) readings delivered at subscribe time.")
    result_topic: str | None = Field(
        None, description="Where results go; default <prefix>/<device>/triggers/<name>.", pattern=r"^[^+#\x00]+$"
    )
    deadline_ms: int | None = Field(None, description="Deadline of each run; default [limits] deadline_ms.", ge=10)

    @model_validator(mode="after")
    def _check(self) -> TriggerConfig:
        from edged.triggers import check_trigger_config

        check_trigger_config(self)
        return self


class HomeAssistantConfig(_Section):
    enabled: bool = Field(False, description="Publish Home Assistant MQTT discovery configs for this device.")
    discovery_prefix: str = Field(
        "homeassistant", description="Home Assistant's discovery prefix.", pattern=r"^[^/+#]+$"
    )
    node_id: str | None = Field(
        None, description="Node id in discovery topics; default the device id.", pattern=r"^[A-Za-z0-9_-]+$"
    )


class Config(_Section):
    device: DeviceConfig = Field(default_factory=DeviceConfig, description="This device.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Local GGUF models.")
    thinker: ThinkerConfig = Field(default_factory=ThinkerConfig, description="Tier-2 thinker.")
    remote: RemoteConfig = Field(default_factory=RemoteConfig, description="Tier-3 remote node.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Telemetry.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Queues, deadlines, shutdown.")
    tools: ToolsConfig = Field(default_factory=ToolsConfig, description="Tools.")
    state: StateConfig = Field(default_factory=StateConfig, description="State directory.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    mqtt_tools: list[MqttToolConfig] = Field(default_factory=list, description="Tools that act over MQTT.")
    triggers: list[TriggerConfig] = Field(default_factory=list, description="Sensor messages that start requests.")
    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery."
    )

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edged-{self.device.id}"

    @property
    def models_dir(self) -> Path:
        if self.models.dir:
            return self.models.dir
        if os.environ.get("EDGED_MODELS_DIR"):
            return Path(os.environ["EDGED_MODELS_DIR"])
        return self.state.dir / "models"

    def topic(self, leaf: str) -> str:
        return f"{self.mqtt.prefix}/{self.device.id}/{leaf}"


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one 'location: message' line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """EDGED_<SECTION>__<KEY>=value pairs as a nested dict; JSON values (lists, numbers) are parsed."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_names(environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """(section, key) -> the EDGED_<SECTION>__<KEY> variable that set it, to name it in error messages."""
    names: dict[tuple[str, str], str] = {}
    for name in environ:
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
            names[(section, key)] = name
    return names


def format_validation_error(
    err: ValidationError, source: str, env_names: Mapping[tuple[str, str], str] | None = None
) -> list[str]:
    """One 'source: location: message' line per error; the source is the variable when one set the value."""
    lines = []
    env_names = env_names or {}
    for item in err.errors():
        parts = [str(part) for part in item["loc"]]
        loc = ".".join(parts)
        where = source
        if len(parts) >= 2 and (parts[0], parts[1]) in env_names:
            where = f"environment {env_names[(parts[0], parts[1])]}"
        elif len(parts) == 1:
            from_env = sorted(name for (section, _), name in env_names.items() if section == parts[0])
            if from_env:
                where = f"environment {', '.join(from_env)}"
        lines.append(f"{where}: {loc}: {item['msg']}")
    return lines


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None, *, required: bool = False
) -> Config:
    """Read the TOML file (if any), overlay EDGED_* environment variables and validate.

    A missing file at the default path means "run on defaults"; a missing file named explicitly is an error.
    """
    environ = os.environ if environ is None else environ
    source = str(path or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    file_path = path or DEFAULT_CONFIG_PATH
    if file_path.exists():
        try:
            data = tomllib.loads(file_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{source}: cannot read: {exc}"]) from exc
    elif path is not None or required:
        raise ConfigError([f"{source}: no such file"])
    data = _merge(data, _env_overrides(environ))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, _env_names(environ))) from exc
    try:
        config.mqtt.resolved_password()
    except ConfigError as exc:
        raise ConfigError([f"{source}: {line}" for line in exc.errors]) from exc
    key_file = config.remote.api_key_file
    if config.remote.url and key_file is not None and not key_file.is_file():
        raise ConfigError([f"{source}: remote.api_key_file: {key_file} does not exist"])
    return config
