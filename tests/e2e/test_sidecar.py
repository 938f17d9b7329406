"""Sidecar features over real sockets: client tokens, injected keys, origins, TLS, health and metrics."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from proxy.auth import Secrets
from proxy.config import config_from_dict
from proxy.server import ProxyServer
from proxy.simulator import Simulator, SimulatorConfig
from tests.e2e.conftest import Client, item_event


async def start(
    stack: AsyncExitStack, sim_config: SimulatorConfig | None = None, secrets: Secrets | None = None, **sections: Any
) -> tuple[Simulator, ProxyServer]:
    sim = await stack.enter_async_context(Simulator(sim_config or SimulatorConfig(delta_interval_s=0.001)))
    upstream = {"url": sim.url, **sections.pop("upstream", {})}
    config = config_from_dict({"listen": {"port": 0, **sections.pop("listen", {})}, "upstream": upstream, **sections})
    proxy = await stack.enter_async_context(ProxyServer(config, secrets=secrets or Secrets()))
    return sim, proxy


def url(proxy: ProxyServer) -> str:
    return proxy.url + "?model=gpt-realtime"


async def refused_status(target: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(target, **kwargs):
            pass
    response = info.value.response
    body = response.body or b""
    return response.status_code, orjson.loads(body) if body.startswith(b"{") else {}  # a 502's reason is text


async def test_client_tokens_gate_connections_before_any_upstream_dial() -> None:
    """Without a valid proxy token a client gets 401 and no upstream connection is opened; with one it connects."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(stack, secrets=Secrets(client_tokens=(b"tok-1", b"tok-2")))
        status, body = await refused_status(url(proxy))
        assert status == 401 and body["error"]["code"] == "proxy_unauthorized"
        status, _ = await refused_status(url(proxy), additional_headers={"Authorization": "Bearer wrong"})
        assert status == 401
        assert sim.sessions == []
        async with connect(url(proxy), additional_headers={"Authorization": "Bearer tok-2"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        protocols: Any = ["realtime", "openai-insecure-api-key.tok-1"]
        async with connect(url(proxy), subprotocols=protocols) as ws:
            assert ws.subprotocol == "realtime"
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        # The proxy token is the proxy's: it never reaches the upstream.
        assert "Authorization" not in sim.sessions[0].headers
        assert sim.sessions[1].subprotocol == "realtime"
        assert all("tok-" not in str(dict(s.headers)) for s in sim.sessions)


@pytest.mark.parametrize("mode", ["bearer", "api-key"])
async def test_injected_key_replaces_client_credentials(mode: str) -> None:
    """With an injected key the upstream sees only that key (Bearer or api-key), never the client's credential."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(
            stack,
            SimulatorConfig(api_key="sk-real"),
            secrets=Secrets(upstream_key="sk-real"),
            upstream={"auth": mode},
        )
        protocols: Any = ["realtime", "openai-insecure-api-key.sk-client"]
        headers = {"Authorization": "Bearer sk-client", "api-key": "client-azure"}
        async with connect(url(proxy), additional_headers=headers, subprotocols=protocols) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        seen = sim.sessions[0].headers
        if mode == "bearer":
            assert seen.getall("Authorization") == ["Bearer sk-real"] and "api-key" not in seen
        else:
            assert seen.getall("api-key") == ["sk-real"] and "Authorization" not in seen
        assert "sk-client" not in str(list(seen.items()))


async def test_disallowed_origin_is_a_403() -> None:
    """A browser Origin outside allowed_origins is refused with 403; a listed one and no Origin pass."""
    async with AsyncExitStack() as stack:
        _, proxy = await start(stack, auth={"allowed_origins": ["https://app.example"]})
        status, body = await refused_status(url(proxy), origin="https://evil.example")  # type: ignore[arg-type]
        assert status == 403 and "evil.example" in body["error"]["message"]
        async with connect(url(proxy), origin="https://app.example") as ws:  # type: ignore[arg-type]
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        async with connect(url(proxy)) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"


async def test_tls_listener_serves_wss(tmp_path: Any) -> None:
    """With a certificate and key the listener speaks TLS: a wss:// client that trusts the CA connects and resets."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    async with AsyncExitStack() as stack:
        sim, proxy = await start(stack, listen={"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)})
        assert proxy.url.startswith("wss://")
        async with connect(url(proxy), ssl=client_ssl) as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send(item_event("over tls"))
            await client.until("conversation.item.added")
            await client.send({"type": "session.reset"})
            await client.until("session.reset.completed")
        assert sim.sessions[0].item_ids == []
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(url(proxy), ssl=ssl.create_default_context()):
                pass


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_health_readiness_and_metrics_move() -> None:
    """/healthz and /readyz answer; /metrics parses and its counters move with traffic, resets and usage."""
    async with AsyncExitStack() as stack:
        _, proxy = await start(stack)
        base = f"http://127.0.0.1:{proxy.port}"
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
        async with http.get(base + "/metrics") as r:
            before = metric_values(await r.text())
        async with connect(url(proxy)) as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send(item_event("count me"))
            await client.until("conversation.item.added")
            await client.send({"type": "response.create"})
            await client.until("response.done")
            await client.send({"type": "session.reset"})
            await client.until("session.reset.completed")
            async with http.get(base + "/metrics") as r:
                during = metric_values(await r.text())
        assert during[("realtime_proxy_connections_open", ())] == 1
        await proxy.state.idle.wait()
        async with http.get(base + "/metrics") as r:
            after = metric_values(await r.text())
        assert before[("realtime_proxy_connections_total", ())] == 0
        assert after[("realtime_proxy_connections_total", ())] == 1
        assert after[("realtime_proxy_connections_open", ())] == 0
        assert after[("realtime_proxy_frames_total", (("direction", "upstream"),))] == 3
        assert after[("realtime_proxy_frames_total", (("direction", "downstream"),))] >= 10
        assert after[("realtime_proxy_bytes_total", (("direction", "downstream"),))] > 1000
        assert after[("realtime_proxy_resets_total", (("outcome", "completed"),))] == 1
        assert after[("realtime_proxy_items_deleted_total", ())] == 2
        assert after[("realtime_proxy_reset_duration_seconds_count", ())] == 1
        assert after[("realtime_proxy_upstream_connect_seconds_count", ())] == 1
        assert after[("realtime_proxy_tokens_total", (("kind", "input"),))] > 0
        assert after[("realtime_proxy_tokens_total", (("kind", "output"),))] > 0


async def test_upstream_failures_and_refusals_are_counted() -> None:
    """Upstream refusals are counted by status, and the proxy's own 401s by status too."""
    async with AsyncExitStack() as stack:
        _, proxy = await start(stack, SimulatorConfig(refuse_status=429), secrets=Secrets(client_tokens=(b"t",)))
        await refused_status(url(proxy))
        await refused_status(url(proxy), additional_headers={"Authorization": "Bearer t"})
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # With client tokens set, /metrics on the main port asks for one too.
        async with http.get(f"http://127.0.0.1:{proxy.port}/metrics", headers={"Authorization": "Bearer t"}) as r:
            values = metric_values(await r.text())
        assert values[("realtime_proxy_clients_refused_total", (("status", "401"),))] == 1
        assert values[("realtime_proxy_upstream_connect_failures_total", (("status", "429"),))] == 1


async def test_admin_port_serves_health_and_metrics_apart() -> None:
    """With [admin] port set, /metrics lives there and the main port treats those paths as proxy paths."""
    async with AsyncExitStack() as stack:
        _, proxy = await start(stack, admin={"port": 0})
        assert proxy.admin_port == proxy.port  # 0 means: same port
    async with AsyncExitStack() as stack:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        _, proxy = await start(stack, admin={"port": free})
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.get(f"http://127.0.0.1:{free}/metrics") as r:
            assert r.status == 200 and "realtime_proxy_connections_open" in await r.text()
        async with http.get(f"http://127.0.0.1:{proxy.port}/metrics") as r:
            assert r.status == 426


def test_config_warnings_name_the_risky_set_ups() -> None:
    """An injected key on a public address without tokens, and tokens without a key, each draw a warning."""
    from proxy.auth import config_warnings

    public = config_from_dict({"listen": {"host": "0.0.0.0"}, "admin": {"port": 9090}})
    assert "anyone who can reach this port" in config_warnings(public, Secrets(upstream_key="k"))[0]
    assert config_warnings(public, Secrets(upstream_key="k", client_tokens=(b"t",))) == []
    local = config_from_dict({})
    assert config_warnings(local, Secrets(upstream_key="k")) == []
    assert "no upstream key" in config_warnings(local, Secrets(client_tokens=(b"t",)))[0]


async def test_admin_host_binds_the_admin_listener_apart() -> None:
    """[admin] host puts /metrics on its own address while the proxy keeps its own."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    async with AsyncExitStack() as stack:
        _, proxy = await start(stack, admin={"port": free, "host": "127.0.0.2"})
        assert proxy.admin_port == free
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.get(f"http://127.0.0.2:{free}/healthz") as r:
            assert r.status == 200


async def test_injected_key_drops_the_clients_api_key_query_parameter() -> None:
    """With an injected key, a browser's ?api-key= never reaches the upstream; other parameters do."""
    async with AsyncExitStack() as stack:
        sim, proxy = await start(stack, SimulatorConfig(api_key="sk-real"), secrets=Secrets(upstream_key="sk-real"))
        async with connect(proxy.url + "?model=m&api-key=client-key") as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        assert sim.sessions[0].query == {"model": "m"}


def test_json_logs_keep_tracebacks_as_data(json_logs: Callable[[], list[dict[str, Any]]]) -> None:
    """In JSON format an exception is logged as structured frames, not lost as exc_info=true."""
    import structlog

    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("test").exception("failed")
    line = json_logs()[-1]
    assert line["event"] == "failed" and line["exception"][0]["exc_type"] == "ValueError"
