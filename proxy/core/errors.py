"""The project's one exception tree.

    ProxyError
     ├── ConfigError             a bad config file or value; names the key (exit code 2)
     ├── InvalidSyntheticEvent   a malformed session.reset / session.checkpoint; names the param
     └── UpstreamError           the upstream could not be opened
          ├── UpstreamRefused      it answered the handshake with an HTTP status (401, 404, 429, ...)
          └── UpstreamUnreachable  no handshake happened at all (DNS, refused, timeout, TLS)

It lives in core because core raises one of them and core imports nothing of ours from outside itself;
everything else imports the tree from here (re-exported as ``proxy.errors``).
"""

from __future__ import annotations


class ProxyError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(ProxyError):
    """A config key is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key
        self.problem = problem


class InvalidSyntheticEvent(ProxyError):
    """A synthetic client event that cannot be run; becomes an `error` event for the client."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class UpstreamError(ProxyError):
    """The upstream WebSocket could not be opened."""


class UpstreamRefused(UpstreamError):
    """The upstream answered the handshake with a non-101 HTTP status."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"upstream refused the handshake with HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


class UpstreamUnreachable(UpstreamError):
    """No handshake took place: the reason is one line for the client's 502."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
