"""One typed config, loaded from TOML and validated at start.

Every section and key is listed in `config.example.toml`. Unknown keys are errors (a typo must not silently
fall back to a default). A bad file raises :class:`ConfigError` naming the key; the CLI prints that one line
and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from yarl import URL

from proxy.core.errors import ConfigError
from proxy.core.events import (
    CHECKPOINT_TYPES,
    POLICY_TYPES,
    RESET_TYPES,
    USAGE_TYPES,
    AutoAfter,
    ResetStrategy,
    ResetTarget,
)
from proxy.core.policy import Policy
from proxy.core.session import SessionConfig
from proxy.core.swap import SwapConfig

# Real client events (both generations): a synthetic type must never shadow one.
REAL_CLIENT_EVENTS = frozenset(
    {
        "session.update",
        "transcription_session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "response.create",
        "response.cancel",
        "output_audio_buffer.clear",
    }
)

_CREDENTIAL_QUERY_KEYS = frozenset({"api-key", "api_key", "apikey", "key", "token", "access_token"})
_HEADER_VALUE = re.compile(r"[!-~]*")  # visible ASCII: an id, nothing that could split a header
_DNS_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _is_origin(value: str) -> bool:
    """scheme://host[:port] and nothing else, the way a browser sends its Origin header."""
    try:
        url = URL(value)
        return (
            bool(url.scheme and url.host)
            and url.raw_path in ("", "/")
            and not (url.query_string or url.fragment or url.user)
        )
    except ValueError:
        return False


def _is_host_name(value: str) -> bool:
    """A DNS name or an IP address (IPv6 with or without brackets), without a port; or "*"."""
    if value == "*" or _DNS_NAME.fullmatch(value):
        return True
    try:
        ipaddress.ip_address(value.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


UpstreamAuth = Literal["bearer", "api-key"]
RelayEngine = Literal["aiohttp", "protocol"]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert_file: str = ""  # both set: the listener speaks TLS (wss://), which the JS SDK requires
    tls_key_file: str = ""
    drain_seconds: float = 30.0
    workers: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "wss://api.openai.com/v1/realtime"
    connect_timeout_seconds: float = 10.0
    api_key_env: str = ""  # name of the environment variable holding the key; the key itself never goes here
    auth: UpstreamAuth = "bearer"
    # Billing pins: sent upstream as OpenAI-Organization / OpenAI-Project when set, in place of the client's.
    organization: str = ""
    project: str = ""
    max_session_seconds: float = 3300.0  # under OpenAI's 60-minute cap; 0: no cap
    warn_before_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    client_tokens_env: str = ""
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names, beside loopback ones, a key-holding proxy on loopback answers


@dataclass(frozen=True, slots=True)
class AdminConfig:
    port: int = 0  # 0: /healthz, /readyz and /metrics are served on the main port
    host: str = ""  # "": the listen host


@dataclass(frozen=True, slots=True)
class ResetConfig:
    event_types: tuple[str, ...] = RESET_TYPES
    checkpoint_event_types: tuple[str, ...] = CHECKPOINT_TYPES
    timeout_seconds: float = 10.0
    forward_internal_events: bool = False
    usage_event_types: tuple[str, ...] = USAGE_TYPES
    policy_event_types: tuple[str, ...] = POLICY_TYPES
    # The auto-reset policy every connection starts with (a `session.reset.policy` event changes its own).
    after: AutoAfter = "never"
    to: ResetTarget = "empty"
    max_input_tokens: int = 0
    max_items: int = 0
    strategy: ResetStrategy = "delete"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_bytes: int = 16 * 1024 * 1024  # one append may carry 15 MiB of audio
    max_held_events: int = 10_000
    max_held_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RelayConfig:
    # "protocol" (proxy/wire.py, the faster) or "aiohttp" (proxy/relay.py); both swap and roll over (core/swap.py).
    engine: RelayEngine = "protocol"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            reset_types=frozenset(self.reset.event_types),
            checkpoint_types=frozenset(self.reset.checkpoint_event_types),
            reset_timeout=self.reset.timeout_seconds,
            forward_internal_events=self.reset.forward_internal_events,
            max_held_events=self.limits.max_held_events,
            max_held_bytes=self.limits.max_held_bytes,
            usage_types=frozenset(self.reset.usage_event_types),
            policy_types=frozenset(self.reset.policy_event_types),
            policy=Policy(
                after=self.reset.after,
                to=self.reset.to,
                max_input_tokens=self.reset.max_input_tokens,
                max_items=self.reset.max_items,
            ),
        )

    def swap_config(self) -> SwapConfig:
        return SwapConfig(
            strategy=self.reset.strategy,
            max_session_seconds=self.upstream.max_session_seconds,
            warn_before_seconds=self.upstream.warn_before_seconds,
        )


def _convert(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotation; returns it in the dataclass's type."""
    choices = get_args(hint) if getattr(hint, "__origin__", None) is Literal else ()
    if choices:
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be a whole number, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, not {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, not {value!r}")
        return value
    if getattr(hint, "__origin__", None) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(key, f"must be a list of non-empty strings, not {value!r}")
        return tuple(value)
    raise ConfigError(key, f"unsupported type {hint!r}")  # pragma: no cover - a bug in this file


def _section(name: str, cls: type[Any], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(name, "must be a table, e.g. [" + name + "]")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(names))})")
        values[key] = _convert(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _validate_access(config: Config) -> None:
    """The keys that decide who may connect and whom the key bills: a typo here must not fail open or shut."""
    for key, pin in (
        ("upstream.organization", config.upstream.organization),
        ("upstream.project", config.upstream.project),
    ):
        if not _HEADER_VALUE.fullmatch(pin):
            raise ConfigError(key, f"must be an id such as 'org-...' or 'proj_...' (no spaces), not {pin!r}")
    for origin in config.auth.allowed_origins:
        if origin != "*" and not _is_origin(origin):
            raise ConfigError(
                "auth.allowed_origins",
                f'{origin!r} is not an origin: write scheme://host[:port], e.g. "https://app.example.com"',
            )
    for name in config.auth.allowed_hosts:
        if not _is_host_name(name):
            raise ConfigError(
                "auth.allowed_hosts",
                f'{name!r} is not a host name: write it without scheme or port, e.g. "proxy.internal"',
            )


def _validate(config: Config) -> None:
    listen = config.listen
    for key, port in (("listen.port", listen.port), ("admin.port", config.admin.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(key, "must be between 0 and 65535")
    if bool(listen.tls_cert_file) != bool(listen.tls_key_file):
        missing = "listen.tls_key_file" if listen.tls_cert_file else "listen.tls_cert_file"
        raise ConfigError(missing, "TLS needs both tls_cert_file and tls_key_file")
    for key, path in (("listen.tls_cert_file", listen.tls_cert_file), ("listen.tls_key_file", listen.tls_key_file)):
        if path and not Path(path).is_file():
            raise ConfigError(key, f"no such file: {path}")
    if listen.workers < 1:
        raise ConfigError("listen.workers", f"must be at least 1, not {listen.workers}")
    if listen.workers > 1 and listen.port == 0:
        raise ConfigError("listen.workers", "several workers share one port: set listen.port (not 0)")
    if listen.drain_seconds < 0:
        raise ConfigError("listen.drain_seconds", f"must be 0 or more, not {listen.drain_seconds}")
    if not listen.host.strip():
        raise ConfigError("listen.host", 'must name an address, e.g. "127.0.0.1" or "0.0.0.0" (all interfaces)')
    try:
        url = URL(config.upstream.url)
        host = url.host
    except ValueError as exc:
        raise ConfigError("upstream.url", f"not a valid URL: {exc}") from exc
    secret = sorted(k for k in url.query if k.lower() in _CREDENTIAL_QUERY_KEYS)
    if secret:
        raise ConfigError(
            "upstream.url", f"{secret[0]!r} in the URL: keys come from the environment, see [upstream] api_key_env"
        )
    if url.scheme not in ("ws", "wss", "http", "https") or not host:
        raise ConfigError(
            "upstream.url", f"must be a ws://, wss://, http:// or https:// URL with a host, not {config.upstream.url!r}"
        )
    _validate_access(config)
    positive = {
        "upstream.connect_timeout_seconds": config.upstream.connect_timeout_seconds,
        "reset.timeout_seconds": config.reset.timeout_seconds,
        "limits.max_message_bytes": config.limits.max_message_bytes,
        "limits.max_held_events": config.limits.max_held_events,
        "limits.max_held_bytes": config.limits.max_held_bytes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be greater than 0, not {value!r}")
    for key in ("reset.max_input_tokens", "reset.max_items"):
        if getattr(config.reset, key.removeprefix("reset.")) < 0:
            raise ConfigError(key, "must be 0 (off) or more")
    for key, seconds in (
        ("upstream.max_session_seconds", config.upstream.max_session_seconds),
        ("upstream.warn_before_seconds", config.upstream.warn_before_seconds),
    ):
        if seconds < 0:
            raise ConfigError(key, f"must be 0 or more, not {seconds!r}")
    if not config.reset.event_types:
        raise ConfigError("reset.event_types", "must name at least one event type")
    synthetic = (
        ("reset.event_types", "a reset", config.reset.event_types),
        ("reset.checkpoint_event_types", "a checkpoint", config.reset.checkpoint_event_types),
        ("reset.usage_event_types", "a usage", config.reset.usage_event_types),
        ("reset.policy_event_types", "a policy", config.reset.policy_event_types),
    )
    for i, (key, _, types) in enumerate(synthetic):
        clash = sorted(set(types) & REAL_CLIENT_EVENTS)
        if clash:
            raise ConfigError(key, f"{clash} is a Realtime API client event: the proxy would swallow it")
        for _, what, earlier in synthetic[:i]:
            overlap = set(types) & set(earlier)
            if overlap:
                raise ConfigError(key, f"{sorted(overlap)} is also {what} event type")


def config_from_dict(data: dict[str, Any]) -> Config:
    sections: dict[str, type[Any]] = get_type_hints(Config)
    values: dict[str, Any] = {}
    for name, value in data.items():
        cls = sections.get(name)
        if cls is None:
            raise ConfigError(name, f"unknown section (known: {', '.join(sorted(sections))})")
        values[name] = _section(name, cls, value)
    config = Config(**values)
    _validate(config)
    return config


def load_config(path: str | Path | None) -> Config:
    """The config from a TOML file, or the defaults when `path` is None."""
    if path is None:
        return config_from_dict({})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"the config file is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    return config_from_dict(data)
