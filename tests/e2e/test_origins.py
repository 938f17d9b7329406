"""Who may spend the injected key, over real sockets: browser origins, DNS rebinding, billing headers, admin routes.

Browsers send `Origin` on every WebSocket upgrade and apply no CORS to it; the SDKs and server-side apps send
none. So with a key injected, an unlisted Origin is refused before any upstream dial, and no Origin passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect

from proxy.auth import Secrets
from proxy.config import config_from_dict
from proxy.server import ProxyServer
from proxy.simulator import SimulatorConfig
from tests.e2e.test_sidecar import refused_status, start, url

KEY = Secrets(upstream_key="sk-real")
BROWSER: Any = {"origin": "https://evil.example", "subprotocols": ["realtime"]}
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
Logs = Callable[[], list[dict[str, Any]]]


class CountingUpstream:
    """A TCP listener standing in for the upstream: counts the handshakes it gets and refuses each with a 503."""

    def __init__(self) -> None:
        self.connections = 0
        self.url = ""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()
        await writer.wait_closed()


@asynccontextmanager
async def counting_upstream() -> AsyncIterator[CountingUpstream]:
    upstream = CountingUpstream()
    server = await asyncio.start_server(upstream._accept, "127.0.0.1", 0)
    upstream.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime"
    async with server:
        yield upstream


async def session_created(target: str, **kwargs: Any) -> str | None:
    """Connect, read the first event (session.created), and return the subprotocol the proxy selected."""
    async with connect(target, **kwargs) as ws:
        assert orjson.loads(await ws.recv())["type"] == "session.created"
        return ws.subprotocol


# --- origins --------------------------------------------------------------------------------------------------


async def test_browser_handshake_is_refused_before_any_upstream_dial_when_the_key_is_injected() -> None:
    """Key injected, no allowed_origins: a browser's upgrade gets 403 and nothing is dialed; an SDK's is dialed."""
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(counting_upstream())
        _, proxy = await start(stack, secrets=KEY, upstream={"url": upstream.url})
        status, body = await refused_status(url(proxy), **BROWSER)
        assert status == 403 and body["error"]["code"] == "proxy_forbidden"
        assert "evil.example" in body["error"]["message"] and "allowed_origins" in body["error"]["message"]
        assert upstream.connections == 0
        # The same proxy does dial for a client without Origin (and passes on the stand-in upstream's 503).
        status, _ = await refused_status(url(proxy))
        assert status == 503 and upstream.connections == 1


async def test_listed_origin_connects_with_the_realtime_subprotocol_and_unlisted_ones_do_not() -> None:
    """Key injected, the browser's origin listed: the same browser-shaped handshake opens a session."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(
            stack,
            SimulatorConfig(api_key="sk-real"),
            secrets=KEY,
            auth={"allowed_origins": ["https://App.example/", "https://evil.example:8443"]},
        )
        listed: Any = {**BROWSER, "origin": "https://app.example"}
        assert await session_created(url(proxy), **listed) == "realtime"
        status, _ = await refused_status(url(proxy), **BROWSER)  # another port is another origin
        assert status == 403
        assert len(sim.sessions) == 1 and sim.sessions[0].headers["Authorization"] == "Bearer sk-real"
        assert "Origin" not in sim.sessions[0].headers  # never forwarded: the upstream sees the proxy only


async def test_sdk_shaped_handshake_without_origin_connects_with_the_defaults() -> None:
    """Key injected, defaults otherwise: an SDK-shaped client (Bearer header, no Origin) opens a session."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(stack, SimulatorConfig(api_key="sk-real"), secrets=KEY)
        assert await session_created(url(proxy), additional_headers={"Authorization": "Bearer unused"}) is None
        assert sim.sessions[0].headers.getall("Authorization") == ["Bearer sk-real"]


async def test_star_admits_any_origin_and_says_so_at_start(json_logs: Logs) -> None:
    """allowed_origins = ["*"] with an injected key: any browser connects, and start-up logs a config_warning
    (so does allowed_hosts = ["*"], which turns the rebinding check off)."""
    async with AsyncExitStack() as stack:
        star = {"allowed_origins": ["*"], "allowed_hosts": ["*"]}
        _, proxy = await start(stack, SimulatorConfig(api_key="sk-real"), secrets=KEY, auth=star)
        assert await session_created(url(proxy), **BROWSER) == "realtime"
    warnings = [line for line in json_logs() if line["event"] == "config_warning"]
    assert [w["level"] for w in warnings] == ["warning", "warning"]
    assert warnings[0]["problem"].startswith('allowed_origins = ["*"] with an injected upstream key')
    assert warnings[1]["problem"].startswith('allowed_hosts = ["*"] with an injected upstream key')


async def test_without_an_injected_key_an_empty_list_still_checks_nothing() -> None:
    """Clients bringing their own key: allowed_origins = [] keeps meaning no check (the page spends its own key)."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(stack)
        assert await session_created(url(proxy), **BROWSER) == "realtime"
        assert len(sim.sessions) == 1


# --- DNS rebinding --------------------------------------------------------------------------------------------


async def test_a_foreign_host_on_a_loopback_proxy_with_a_key_is_refused_unless_listed() -> None:
    """A rebinding page sends its own name as Host: 403 before any dial; loopback names and allowed_hosts pass."""
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(counting_upstream())
        _, proxy = await start(
            stack, secrets=KEY, upstream={"url": upstream.url}, auth={"allowed_hosts": ["proxy.internal"]}
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        target = url(proxy)
        for host in (f"evil.example:{proxy.port}", "evil.example", "127.0.0.1.evil.example"):
            async with http.get(target, headers={**UPGRADE, "Host": host}) as r:
                body = await r.json()
                assert r.status == 403 and body["error"]["code"] == "proxy_forbidden", host
                assert "allowed_hosts" in body["error"]["message"]
        async with http.get(f"http://127.0.0.1:{proxy.port}/metrics", headers={"Host": "evil.example"}) as r:
            assert r.status == 403  # a rebound page could read it otherwise: same origin, no Origin header
        assert upstream.connections == 0
        for n, host in enumerate(
            ("proxy.internal", f"PROXY.internal:{proxy.port}", f"localhost:{proxy.port}", "app.localhost", "[::1]"), 1
        ):
            async with http.get(target, headers={**UPGRADE, "Host": host}) as r:
                assert r.status == 503, host  # past every check: dialed (the stand-in upstream's refusal)
            assert upstream.connections == n


async def test_the_host_check_only_guards_a_key_on_loopback() -> None:
    """Without an injected key, any Host reaches the upstream (and session.created comes back)."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(stack)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.ws_connect(url(proxy), headers={"Host": "evil.example"}) as ws:
            assert orjson.loads(await ws.receive_str())["type"] == "session.created"
        assert len(sim.sessions) == 1


# --- billing headers ------------------------------------------------------------------------------------------

CLIENT_BILLING = {"OpenAI-Organization": "org-client", "OpenAI-Project": "proj_client"}
CLIENT_PROTOCOLS: Any = ["realtime", "openai-organization.org-client", "openai-project.proj_client"]
PINS = {"organization": "org-pinned", "project": "proj_pinned"}


@pytest.mark.parametrize(
    ("injected", "pins", "seen_org", "seen_project", "seen_protocols"),
    [
        pytest.param(True, {}, [], [], ["realtime"], id="key-injected-client-billing-dropped"),
        pytest.param(True, PINS, ["org-pinned"], ["proj_pinned"], ["realtime"], id="key-injected-pinned"),
        pytest.param(
            False,
            {"project": "proj_pinned"},
            ["org-client"],
            ["proj_pinned"],
            CLIENT_PROTOCOLS[:2],
            id="own-key-one-pin",
        ),
        pytest.param(False, {}, ["org-client"], ["proj_client"], CLIENT_PROTOCOLS, id="own-key-forwarded"),
    ],
)
async def test_billing_headers_the_upstream_receives(
    injected: bool, pins: dict[str, str], seen_org: list[str], seen_project: list[str], seen_protocols: list[str]
) -> None:
    """With an injected key the client's organization and project (headers and subprotocols) never reach the
    upstream, and [upstream] organization / project are sent when set; a pin replaces the client's even without."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(
            stack,
            SimulatorConfig(api_key="sk-real") if injected else None,
            secrets=KEY if injected else None,
            upstream=pins,
        )
        await session_created(url(proxy), additional_headers=CLIENT_BILLING, subprotocols=CLIENT_PROTOCOLS)
        seen = sim.sessions[0].headers
        assert seen.getall("OpenAI-Organization", []) == seen_org
        assert seen.getall("OpenAI-Project", []) == seen_project
        assert [p.strip() for p in seen["Sec-WebSocket-Protocol"].split(",")] == seen_protocols


# --- the admin routes on the main port ------------------------------------------------------------------------


async def test_metrics_on_the_main_port_ask_for_a_client_token_and_health_does_not() -> None:
    """With client tokens, a stranger on the main port reads /healthz and /readyz but not /metrics."""
    async with AsyncExitStack() as stack:
        _, proxy = await start(stack, secrets=Secrets(upstream_key="sk-real", client_tokens=(b"tok",)))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        base = f"http://127.0.0.1:{proxy.port}"
        for path in ("/healthz", "/readyz"):
            async with http.get(base + path) as r:
                assert r.status == 200
        async with http.get(base + "/metrics") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "proxy_unauthorized"
        async with http.get(base + "/metrics", headers={"Authorization": "Bearer tok"}) as r:
            text = await r.text()
            assert r.status == 200 and "realtime_proxy_connections_open" in text
        # Refused scrapes are not refused sessions.
        assert 'realtime_proxy_clients_refused_total{status="401"}' not in text


ADMIN_WARNING = (
    "/healthz and /readyz answer anyone who reaches 0.0.0.0:8765, and /metrics any client-token holder; "
    "set [admin] port (and host) to serve them on a listener of their own"
)


@pytest.mark.parametrize(("admin_port", "expected"), [(0, [ADMIN_WARNING]), (9090, [])])
def test_admin_routes_beside_client_tokens_off_loopback_draw_a_warning(
    json_logs: Logs, admin_port: int, expected: list[str]
) -> None:
    """A non-loopback listener with client tokens and the admin routes on it logs a config_warning naming
    [admin] port; with [admin] port set it does not. (The lines start() logs, without binding 0.0.0.0.)"""
    config = config_from_dict({"listen": {"host": "0.0.0.0"}, "admin": {"port": admin_port}})
    ProxyServer(config, secrets=Secrets(upstream_key="k", client_tokens=(b"t",))).log_config_warnings()
    warnings = [line for line in json_logs() if line["event"] == "config_warning"]
    assert [line["problem"] for line in warnings] == expected
    assert all(line["level"] == "warning" for line in warnings)
