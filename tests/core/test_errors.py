"""The project's one exception tree: each error carries what its handler needs."""

from __future__ import annotations

from proxy.core.errors import (
    ConfigError,
    InvalidSyntheticEvent,
    ProxyError,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnreachable,
)


def test_the_tree_has_the_documented_shape() -> None:
    """Every error is a ProxyError; refused and unreachable are both UpstreamErrors."""
    assert issubclass(ProxyError, Exception)
    for cls in (ConfigError, InvalidSyntheticEvent, UpstreamError):
        assert cls.__bases__ == (ProxyError,)
    for cls in (UpstreamRefused, UpstreamUnreachable):
        assert cls.__bases__ == (UpstreamError,)


def test_config_error_names_the_key() -> None:
    """A ConfigError's message names the key and the problem, both also kept as attributes."""
    exc = ConfigError("listen.port", "must be an integer")
    assert str(exc) == "config error: listen.port: must be an integer"
    assert exc.key == "listen.port" and exc.problem == "must be an integer"


def test_invalid_synthetic_event_keeps_param_and_message() -> None:
    """An InvalidSyntheticEvent carries the param (possibly None) and the message for the client's error."""
    exc = InvalidSyntheticEvent("to", "bad to")
    assert str(exc) == "bad to" and exc.param == "to" and exc.message == "bad to"
    assert InvalidSyntheticEvent(None, "m").param is None


def test_upstream_refused_keeps_the_http_answer() -> None:
    """UpstreamRefused keeps status, headers and body so the client can be shown the same answer."""
    exc = UpstreamRefused(401, [("content-type", "application/json")], b'{"error":{}}')
    assert str(exc) == "upstream refused the handshake with HTTP 401"
    assert exc.status == 401
    assert exc.headers == [("content-type", "application/json")]
    assert exc.body == b'{"error":{}}'


def test_upstream_unreachable_keeps_the_reason() -> None:
    """UpstreamUnreachable's reason is its one-line message for the client's 502."""
    exc = UpstreamUnreachable("connect timeout")
    assert str(exc) == "connect timeout" and exc.reason == "connect timeout"
