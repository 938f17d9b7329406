"""The project's exception tree (defined in :mod:`proxy.core.errors`, see its docstring)."""

from proxy.core.errors import (
    ConfigError,
    InvalidSyntheticEvent,
    ProxyError,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnreachable,
)

__all__ = [
    "ConfigError",
    "InvalidSyntheticEvent",
    "ProxyError",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamUnreachable",
]
