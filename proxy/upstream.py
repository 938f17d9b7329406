"""Dialing the upstream WebSocket with aiohttp's client.

Why aiohttp and not websockets here (measured with bench/, see docs/development.md): its frame reader and writer are
compiled, it hands TEXT frames over as bytes (`decode_text=False`) and writes bytes as TEXT (`send_frame`), so
a frame crosses the proxy without a decode or an encode; and it masks client frames without a system call
per frame. The one thing it does not expose is the body of a refused handshake, which we must pass on (a
401 or 429 body tells the client why): a response class keeps it for the dial that asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp import ClientWSTimeout, WSServerHandshakeError

from proxy.core.errors import UpstreamRefused, UpstreamUnreachable

MAX_REFUSAL_BODY = 64 * 1024
# What of an upstream refusal is worth passing on with its status and body.
REFUSAL_HEADERS = frozenset(
    {"content-type", "retry-after", "x-request-id", "openai-organization", "openai-processing-ms"}
)
# Set by the response of a refused handshake, read by the dial that made it (same task, same context).
_refusal_body: ContextVar[bytes] = ContextVar("_refusal_body", default=b"")


class _KeepRefusalBody(aiohttp.ClientResponse):
    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        response = await super().start(connection)
        if self.status != 101 and (self.content_length or 0) <= MAX_REFUSAL_BODY:
            try:
                _refusal_body.set((await self.content.read(MAX_REFUSAL_BODY + 1))[:MAX_REFUSAL_BODY])
            except (aiohttp.ClientError, OSError):
                _refusal_body.set(b"")
        return response


class _UpstreamWebSocket(aiohttp.ClientWebSocketResponse):
    """aiohttp 3.14 re-arms a client socket's heartbeat timer when data (the peer's answering close frame) arrives
    after the socket closed, and the timer keeps the whole connection reachable for `heartbeat` seconds more:
    with our close-first path that is every session's sockets and buffers, 20-30 s after it ended. Never re-arm
    a closed socket."""

    def _reset_heartbeat(self) -> None:
        if not self.closed:
            super()._reset_heartbeat()


def client_session() -> aiohttp.ClientSession:
    """One session per proxy process: it only dials WebSockets, so no pool is kept warm."""
    return aiohttp.ClientSession(
        # Every open upstream WebSocket holds one of the connector's connections for its whole life: the
        # default limit (100 in all, per host too) would cap the proxy at 100 sessions. Capacity is bounded by
        # what clients open, not here.
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        response_class=_KeepRefusalBody,
        ws_response_class=_UpstreamWebSocket,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
        auto_decompress=False,
    )


async def open_upstream(
    session: aiohttp.ClientSession,
    url: str,
    headers: Sequence[tuple[str, str]],
    subprotocols: Sequence[str],
    *,
    max_message_bytes: int,
    connect_timeout: float,
) -> aiohttp.ClientWebSocketResponse[bool]:
    """Dial the upstream; raises UpstreamRefused or UpstreamUnreachable (never anything else on failure)."""
    _refusal_body.set(b"")
    try:
        async with asyncio.timeout(connect_timeout):
            return await session.ws_connect(
                url,
                headers=list(headers),
                protocols=tuple(subprotocols),
                max_msg_size=max_message_bytes,
                # The official SDK turns compression off too: base64 audio barely compresses, and the CPU and
                # latency would be paid on every frame.
                compress=0,
                autoclose=True,
                autoping=True,
                heartbeat=20.0,  # keeps idle upstream sessions alive through NATs and load balancers
                timeout=ClientWSTimeout(ws_close=5.0),
                decode_text=False,
            )
    except WSServerHandshakeError as exc:
        if exc.status == 101:  # a 101 with a bad accept key or upgrade header: not a refusal
            raise UpstreamUnreachable(f"upstream handshake failed: {exc.message}") from exc
        keep = [(k, v) for k, v in (exc.headers or {}).items() if k.lower() in REFUSAL_HEADERS]
        raise UpstreamRefused(exc.status, keep, _refusal_body.get()) from exc
    except TimeoutError as exc:
        raise UpstreamUnreachable(f"upstream did not answer within {connect_timeout:g} s") from exc
    except aiohttp.InvalidURL as exc:
        raise UpstreamUnreachable(f"upstream URL is invalid: {exc}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UpstreamUnreachable(f"upstream unreachable: {reason}") from exc
