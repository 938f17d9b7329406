"""The aiohttp app: accept a client's upgrade on any path, dial the upstream first, then relay.

The upstream is opened *before* the client's upgrade completes, so a refusal (401, 403, 404, 429, ...)
reaches the client as that HTTP status and body, and an unreachable upstream as a 502 with a one-line reason,
instead of a socket that opens and closes at once.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import cast

import structlog
from aiohttp import WSCloseCode, hdrs, web
from multidict import CIMultiDict, MultiDict, MultiMapping
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol
from yarl import URL

from proxy.config import Config
from proxy.core.errors import UpstreamRefused, UpstreamUnreachable
from proxy.relay import Relay

log = structlog.get_logger("proxy.server")

CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
OPEN_SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse[bool]]] = web.AppKey("open_sockets")

# The headers the Realtime API (OpenAI and Azure) reads; nothing else of the client's goes upstream.
FORWARDED_HEADERS = ("Authorization", "OpenAI-Beta", "OpenAI-Organization", "OpenAI-Project", "api-key")
# What of an upstream refusal is worth passing on with its status and body.
REFUSAL_HEADERS = ("Content-Type", "Retry-After", "x-request-id", "openai-organization", "openai-processing-ms")
_REFUSAL_LOWER = {h.lower() for h in REFUSAL_HEADERS}

_connection_ids = itertools.count(1)


def upstream_url(configured: str, client_query: MultiMapping[str]) -> str:
    """The configured URL with the client's query merged in; keys pinned in the configured URL win.

    Only the query is taken from the client: scheme, host, port and path are always the configured ones, so
    a client cannot point the proxy elsewhere.
    """
    base = URL(configured)
    pinned = base.query
    merged: MultiDict[str] = MultiDict((k, v) for k, v in client_query.items() if k not in pinned)
    merged.extend(pinned)
    scheme = {"http": "ws", "https": "wss"}.get(base.scheme, base.scheme)
    return str(base.with_scheme(scheme).with_query(merged))


def offered_subprotocols(request: web.Request) -> list[str]:
    return [
        p.strip() for v in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ()) for p in v.split(",") if p.strip()
    ]


async def open_upstream(
    url: str, headers: Sequence[tuple[str, str]], subprotocols: Sequence[str], config: Config
) -> ClientConnection:
    """Dial the upstream; raises UpstreamRefused or UpstreamUnreachable (never anything else on failure)."""
    try:
        return await connect(
            url,
            additional_headers=list(headers),
            subprotocols=[cast(Subprotocol, p) for p in subprotocols] or None,
            max_size=config.limits.max_message_bytes,
            # The official SDK turns compression off too: audio is base64 of noise-like data, and the CPU and
            # latency cost on every frame would be ours.
            compression=None,
            open_timeout=config.upstream.connect_timeout_seconds,
            user_agent_header=None,
        )
    except InvalidStatus as exc:
        response = exc.response
        keep = [(k, v) for k, v in response.headers.raw_items() if k.lower() in _REFUSAL_LOWER]
        raise UpstreamRefused(response.status_code, keep, bytes(response.body or b"")) from exc
    except InvalidURI as exc:
        raise UpstreamUnreachable(f"upstream URL is invalid: {exc}") from exc
    except InvalidHandshake as exc:
        raise UpstreamUnreachable(f"upstream handshake failed: {exc}") from exc
    except TimeoutError as exc:
        raise UpstreamUnreachable(
            f"upstream did not answer within {config.upstream.connect_timeout_seconds:g} s"
        ) from exc
    except OSError as exc:
        raise UpstreamUnreachable(f"upstream unreachable: {exc.strerror or exc}") from exc


async def handle(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        return web.Response(
            status=426, text="this is a Realtime API WebSocket proxy: connect with a WebSocket client\n"
        )
    conn_log = log.bind(conn=next(_connection_ids), path=request.path)
    url = upstream_url(config.upstream.url, request.query)
    headers = [(name, value) for name in FORWARDED_HEADERS for value in request.headers.getall(name, ())]
    offered = offered_subprotocols(request)
    try:
        upstream = await open_upstream(url, headers, offered, config)
    except UpstreamRefused as exc:
        conn_log.info("upstream_refused", status=exc.status)
        return web.Response(status=exc.status, body=exc.body, headers=CIMultiDict(exc.headers))
    except UpstreamUnreachable as exc:
        conn_log.warning("upstream_unreachable", reason=exc.reason)
        return web.Response(status=502, text=exc.reason + "\n")

    selected = upstream.subprotocol
    ws = web.WebSocketResponse(
        protocols=(selected,) if selected else (),
        max_msg_size=config.limits.max_message_bytes,
        compress=False,
        decode_text=False,
        autoping=True,
    )
    try:
        await ws.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    sockets = request.app[OPEN_SOCKETS]
    sockets.add(ws)
    relay = Relay(ws, upstream, config.session_config())
    conn_log.info("connection_open")
    try:
        await relay.run()
    finally:
        sockets.discard(ws)
        stats = relay.stats
        conn_log.info(
            "connection_closed",
            upstream_session=relay.session.upstream_session_id,
            frames_up=stats.frames_up,
            frames_down=stats.frames_down,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            resets=stats.resets,
            client_close_code=stats.client_close_code,
            upstream_close_code=stats.upstream_close_code,
        )
    return ws


async def _close_sockets(app: web.Application) -> AsyncIterator[None]:
    sockets: weakref.WeakSet[web.WebSocketResponse[bool]] = weakref.WeakSet()
    app[OPEN_SOCKETS] = sockets
    yield
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"proxy shutting down") for ws in list(sockets)),
        return_exceptions=True,
    )


def create_app(config: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(_close_sockets)
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


class ProxyServer:
    """The proxy on a real socket; for tests, the demo and the CLI. Port 0 picks a free port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app = create_app(config)
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        self.port = 0

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen.host, self.config.listen.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    @property
    def url(self) -> str:
        return f"ws://{self.config.listen.host}:{self.port}/v1/realtime"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
