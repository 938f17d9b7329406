"""One typed config, loaded from TOML and validated at start.

Every section and key is listed in `config.example.toml`. Unknown keys are errors (a typo must not silently
fall back to a default). A bad file raises :class:`ConfigError` naming the key; the CLI prints that one line
and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from yarl import URL

from proxy.core.errors import ConfigError
from proxy.core.events import CHECKPOINT_TYPES, RESET_TYPES
from proxy.core.session import SessionConfig

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8765


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "wss://api.openai.com/v1/realtime"
    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class ResetConfig:
    event_types: tuple[str, ...] = RESET_TYPES
    checkpoint_event_types: tuple[str, ...] = CHECKPOINT_TYPES
    timeout_seconds: float = 10.0
    forward_internal_events: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_bytes: int = 16 * 1024 * 1024  # one append may carry 15 MiB of audio
    max_held_events: int = 10_000
    max_held_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            reset_types=frozenset(self.reset.event_types),
            checkpoint_types=frozenset(self.reset.checkpoint_event_types),
            reset_timeout=self.reset.timeout_seconds,
            forward_internal_events=self.reset.forward_internal_events,
            max_held_events=self.limits.max_held_events,
            max_held_bytes=self.limits.max_held_bytes,
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
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, not {value!r}")
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


def _validate(config: Config) -> None:
    if not 0 <= config.listen.port <= 65535:
        raise ConfigError("listen.port", "must be between 0 and 65535")
    url = URL(config.upstream.url)
    if url.scheme not in ("ws", "wss", "http", "https") or not url.host:
        raise ConfigError("upstream.url", f"must be a ws:// or wss:// URL with a host, not {config.upstream.url!r}")
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
    if not config.reset.event_types:
        raise ConfigError("reset.event_types", "must name at least one event type")
    overlap = set(config.reset.event_types) & set(config.reset.checkpoint_event_types)
    if overlap:
        raise ConfigError("reset.checkpoint_event_types", f"{sorted(overlap)} is also a reset event type")


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
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    return config_from_dict(data)
