"""The aiohttp app: accept a client's upgrade on any path, dial the upstream first, then relay.

The upstream is opened *before* the client's upgrade completes, so a refusal (401, 403, 404, 429, ...)
reaches the client as that HTTP status and body, and an unreachable upstream as a 502 with a one-line reason,
instead of a socket that opens and closes at once.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
import weakref
from collections.abc import Sequence
from typing import Protocol

import aiohttp
import structlog
from aiohttp import WSCloseCode, hdrs, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, MultiDict, MultiMapping
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from proxy import wire
from proxy.auth import (
    Secrets,
    config_warnings,
    host_refusal,
    load_secrets,
    refusal,
    token_refusal,
    upstream_credentials,
)
from proxy.config import Config
from proxy.core.errors import ConfigError, UpstreamRefused, UpstreamUnreachable
from proxy.core.replay import Dial
from proxy.metrics import SHARED_SYNC_SECONDS, Metrics
from proxy.relay import Relay, RelayStats
from proxy.upstream import client_session as upstream_client_session
from proxy.upstream import open_upstream

log = structlog.get_logger("proxy.server")


def upstream_url(configured: str, client_query: MultiMapping[str], drop: Sequence[str] = ()) -> str:
    """The configured URL with the client's query merged in; keys pinned in the configured URL win.

    Only the query is taken from the client: scheme, host, port and path are always the configured ones, so
    a client cannot point the proxy elsewhere.
    """
    base = URL(configured)
    pinned = base.query
    merged: MultiDict[str] = MultiDict((k, v) for k, v in client_query.items() if k not in pinned and k not in drop)
    merged.extend(pinned)
    scheme = {"http": "ws", "https": "wss"}.get(base.scheme, base.scheme)
    return str(base.with_scheme(scheme).with_query(merged))


def offered_subprotocols(request: web.Request) -> list[str]:
    return [
        p.strip() for v in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ()) for p in v.split(",") if p.strip()
    ]


def _json_refusal(status: int, code: str, message: str) -> web.Response:
    """A refusal by the proxy itself, shaped like the API's own HTTP errors."""
    body = {"error": {"type": "invalid_request_error", "code": code, "message": message, "param": None}}
    return web.json_response(body, status=status)


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not _is_upgrade(request):
        return web.Response(
            status=426, text="this is a Realtime API WebSocket proxy: connect with a WebSocket client\n"
        )
    # Bound in this request's context: every line logged while serving it (ours, aiohttp's) names it.
    structlog.contextvars.bind_contextvars(conn=secrets.token_hex(4))
    conn_log = log.bind(path=request.path)
    if state.draining:
        return _draining(state)
    state.busy += 1
    state.idle.clear()
    try:
        return await _serve(request, state, conn_log)
    finally:
        state.busy -= 1
        if state.busy == 0:
            state.idle.set()


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def _refuse(request: web.Request, conn_log: structlog.stdlib.BoundLogger, status: int, message: str) -> web.Response:
    if _is_upgrade(request):  # the metric counts refused sessions, not refused scrapes
        request.app[STATE].metrics.clients_refused.labels(str(status)).inc()
    conn_log.info("client_refused", status=status, reason=message)
    return _json_refusal(status, "proxy_unauthorized" if status == 401 else "proxy_forbidden", message)


@web.middleware
async def rebinding_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request on the main port, upgrade or admin route, is checked for a DNS-rebinding Host first."""
    state = request.app[STATE]
    reason = host_refusal(state.config, state.secrets, request.headers.get(hdrs.HOST))
    if reason is not None:
        return _refuse(request, log.bind(path=request.path), 403, reason)
    return await handler(request)


def _draining(state: ServerState) -> web.Response:
    state.metrics.clients_refused.labels("503").inc()
    return _json_refusal(503, "proxy_draining", "the proxy is shutting down; connect again")


async def _serve(
    request: web.Request, state: ServerState, conn_log: structlog.stdlib.BoundLogger
) -> web.StreamResponse:
    config = state.config
    offered = offered_subprotocols(request)
    refused = refusal(config, state.secrets, request.headers, offered)
    if refused is not None:
        return _refuse(request, conn_log, *refused)
    # With an injected key the client's own credentials are dropped, the Azure browser form (?api-key=) too.
    url = upstream_url(config.upstream.url, request.query, drop=("api-key",) if state.secrets.upstream_key else ())
    headers, protocols = upstream_credentials(config, state.secrets, request.headers, offered)
    dial = Dial(url, tuple(headers), tuple(protocols))  # a spare is dialed the same way
    started = time.perf_counter()  # not loop.time(): uvloop's moves in whole milliseconds
    if config.relay.engine == "protocol":
        return await _serve_wire(request, state, conn_log, dial, started)
    try:
        upstream = await state.connect(dial)
    except (UpstreamRefused, UpstreamUnreachable) as exc:
        return _dial_failed(state, conn_log, exc)
    state.metrics.upstream_connect_seconds.observe(time.perf_counter() - started)
    if state.draining:  # the drain began while we dialed: this session would outlive it
        await upstream.close(code=WSCloseCode.GOING_AWAY)
        return _draining(state)

    selected = upstream.protocol
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
        await upstream.close(code=WSCloseCode.GOING_AWAY)
        raise
    state.sockets.add(ws)
    relay = Relay(
        ws,
        upstream,
        state.session_config,
        metrics=state.metrics,
        log=conn_log,
        client_transport=request.transport,
        swap=state.swap_config,
        dial=dial,
        connect=state.connect,
    )
    await _run_relay(relay, ws, state, started)
    return ws


async def _serve_wire(
    request: web.Request,
    state: ServerState,
    conn_log: structlog.stdlib.BoundLogger,
    dial: Dial,
    started: float,
) -> web.StreamResponse:
    """The same session over the Protocol relay (proxy/wire.py): dial, then aiohttp's upgrade, then the socket."""
    config = state.config
    try:
        upstream = await state.wire_connect(dial)
    except (UpstreamRefused, UpstreamUnreachable) as exc:
        return _dial_failed(state, conn_log, exc)
    state.metrics.upstream_connect_seconds.observe(time.perf_counter() - started)
    if state.draining:
        upstream.abort()
        return _draining(state)
    try:
        response, transport, tail = await wire.upgrade(request, upstream.protocol)
    except BaseException:
        upstream.abort()
        raise
    relay = wire.WireRelay(
        state.session_config,
        max_message_bytes=config.limits.max_message_bytes,
        metrics=state.metrics,
        log=conn_log,
        swap=state.swap_config,
        dial=dial,
        connect=state.wire_connect,
    )
    relay.start(transport, tail, request.protocol, upstream)
    state.sockets.add(relay)
    await _run_relay(relay, relay, state, started)
    return response


async def _run_relay(relay: Relay | wire.WireRelay, socket: Closable, state: ServerState, started: float) -> None:
    """One connection's relay, either engine, from its `connection_open` line to its `connection_closed` one."""
    relay.log.info("connection_open", upstream_connect_ms=round((time.perf_counter() - started) * 1000, 3))
    try:
        await relay.run()
    finally:
        state.sockets.discard(socket)
        _log_closed(relay.log, relay.stats, started)


def _dial_failed(
    state: ServerState, conn_log: structlog.stdlib.BoundLogger, exc: UpstreamRefused | UpstreamUnreachable
) -> web.Response:
    """A refusal passes on as its status and body; an unreachable upstream is a 502 with a one-line reason."""
    if isinstance(exc, UpstreamRefused):
        state.metrics.upstream_failures.labels(str(exc.status)).inc()
        conn_log.info("upstream_refused", status=exc.status)
        return web.Response(status=exc.status, body=exc.body, headers=CIMultiDict(exc.headers))
    state.metrics.upstream_failures.labels("unreachable").inc()
    conn_log.warning("upstream_unreachable", reason=exc.reason)
    return web.Response(status=502, text=exc.reason + "\n")


def _log_closed(log: structlog.stdlib.BoundLogger, stats: RelayStats, started: float) -> None:
    log.info(
        "connection_closed",
        duration_s=round(time.perf_counter() - started, 3),
        frames_up=stats.frames_up,
        frames_down=stats.frames_down,
        bytes_up=stats.bytes_up,
        bytes_down=stats.bytes_down,
        resets=stats.resets,
        upstream_switches=stats.upstream_switches,
        client_close_code=stats.client_close_code,
        upstream_close_code=stats.upstream_close_code,
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return web.Response(status=503, text="draining\n")
    return web.Response(text="ready\n")


async def metrics_route(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def main_port_metrics_route(request: web.Request) -> web.Response:
    """/metrics beside the WebSocket endpoint: where clients must show a token, so must a scraper.

    /healthz and /readyz stay open there (a probe carries no token, and they tell only up and ready).
    """
    state = request.app[STATE]
    unauthorized = token_refusal(state.secrets, request.headers)
    if unauthorized is not None:
        return _refuse(request, log.bind(path=request.path), 401, unauthorized)
    return await metrics_route(request)


class Closable(Protocol):
    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


class ServerState:
    """Everything one proxy (one process) shares between its connections."""

    def __init__(self, config: Config, secrets: Secrets) -> None:
        self.config = config
        self.secrets = secrets
        self.session_config = config.session_config()
        self.swap_config = config.swap_config()
        self.metrics = Metrics()
        self.draining = False
        # Open sessions, told to close on shutdown: aiohttp WebSockets, or the Protocol relays (proxy/wire.py).
        self.sockets: weakref.WeakSet[Closable] = weakref.WeakSet()
        self.busy = 0  # sessions being served or dialed: the drain waits for none to be left
        self.idle = asyncio.Event()
        self.idle.set()
        self._client_session: aiohttp.ClientSession | None = None

    def client_session(self) -> aiohttp.ClientSession:
        """The aiohttp client session upstream dials use (made on first use: it needs the running loop)."""
        if self._client_session is None:
            self._client_session = upstream_client_session()
        return self._client_session

    async def connect(self, dial: Dial) -> aiohttp.ClientWebSocketResponse[bool]:
        """Open an upstream session (a client's first, or a spare) as `dial` says."""
        return await open_upstream(
            self.client_session(),
            dial.url,
            dial.headers,
            dial.subprotocols,
            max_message_bytes=self.config.limits.max_message_bytes,
            connect_timeout=self.config.upstream.connect_timeout_seconds,
        )

    async def wire_connect(self, dial: Dial) -> wire.Upstream:
        """The same, for the Protocol relay (proxy/wire.py)."""
        return await wire.dial(
            dial.url, dial.headers, dial.subprotocols, connect_timeout=self.config.upstream.connect_timeout_seconds
        )

    async def close(self) -> None:
        if self._client_session is not None:
            await self._client_session.close()


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown: aiohttp waits for open handlers after this, so open sessions must be told to end here."""
    sockets = list(app[STATE].sockets)
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"proxy shutting down") for ws in sockets),
        return_exceptions=True,
    )


def _add_admin_routes(app: web.Application, *, main_port: bool) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", main_port_metrics_route if main_port else metrics_route)


def create_app(state: ServerState, *, admin_routes: bool = True) -> web.Application:
    app = web.Application(middlewares=[rebinding_guard])
    app[STATE] = state
    app.on_shutdown.append(_close_sockets)
    if admin_routes:
        _add_admin_routes(app, main_port=True)
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.listen.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.listen.tls_cert_file, config.listen.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("listen.tls_cert_file", f"cannot load the certificate and key: {exc}") from exc
    return context


class ProxyServer:
    """The proxy on real sockets: for the CLI, tests and the demo. Port 0 picks a free port."""

    def __init__(self, config: Config, secrets: Secrets | None = None, *, reuse_port: bool = False) -> None:
        self.config = config
        self.state = ServerState(config, secrets if secrets is not None else load_secrets(config))
        self._ssl = _ssl_context(config)
        self._reuse_port = reuse_port
        admin_port = config.admin.port
        self.app = create_app(self.state, admin_routes=admin_port == 0)
        # By shutdown every session was told to close (on_shutdown); handlers need only moments after that.
        self._runners = [web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=5.0)]
        if admin_port:
            admin = web.Application()
            admin[STATE] = self.state
            _add_admin_routes(admin, main_port=False)
            self._runners.append(web.AppRunner(admin, handle_signals=False, access_log=None, shutdown_timeout=5.0))
        self.port = 0
        self.admin_port = 0
        self._metrics_sync: asyncio.Task[None] | None = None

    async def _sync_metrics(self) -> None:
        """With workers: publish the open connections' counts for the other workers' scrapes, now and then."""
        while True:
            await asyncio.sleep(SHARED_SYNC_SECONDS)
            self.state.metrics.sync()

    async def start(self) -> int:
        listen = self.config.listen
        main, *admin = self._runners
        await main.setup()
        await web.TCPSite(
            main, listen.host, listen.port, ssl_context=self._ssl, reuse_port=self._reuse_port or None
        ).start()
        self.port = int(main.addresses[0][1])
        self.admin_port = self.port
        for runner in admin:
            await runner.setup()
            admin_host = self.config.admin.host or listen.host
            await web.TCPSite(runner, admin_host, self.config.admin.port, reuse_port=self._reuse_port or None).start()
            self.admin_port = int(runner.addresses[0][1])
        self.log_config_warnings()
        if self.state.metrics.shared_dir is not None:
            self._metrics_sync = asyncio.create_task(self._sync_metrics(), name="metrics-sync")
        return self.port

    def log_config_warnings(self) -> None:
        for warning in config_warnings(self.config, self.state.secrets):
            log.warning("config_warning", problem=warning)

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self.config.listen.host}:{self.port}/v1/realtime"

    async def drain(self, seconds: float) -> None:
        """Refuse new sessions and report not-ready; give open sessions `seconds` to end on their own."""
        self.state.draining = True
        log.info("draining", open_sessions=len(self.state.sockets), drain_seconds=seconds)
        try:
            await asyncio.wait_for(self.state.idle.wait(), seconds)
        except TimeoutError:
            log.info("drain_timeout", closing_sessions=len(self.state.sockets))

    async def stop(self) -> None:
        """Close what is still open with 1001 (going away), then the listeners."""
        if self._metrics_sync is not None:
            self._metrics_sync.cancel()
            await asyncio.gather(self._metrics_sync, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()
        await self.state.close()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
