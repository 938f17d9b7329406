"""The README's wire trace of a reset is what crosses the wire: client → proxy → simulator and back.

A tap between the proxy and the simulator records every frame each way, and the client records what it sends
and receives, into one timeline. `python -m tests.e2e.test_readme_trace` prints that timeline in the README's
format, for pasting when the trace changes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from websockets.asyncio.client import connect

from proxy.config import config_from_dict
from proxy.server import ProxyServer
from proxy.simulator import Simulator, SimulatorConfig
from tests.e2e.conftest import Client, item_event

README = Path(__file__).resolve().parents[2] / "README.md"
Trace = list[tuple[str, dict[str, Any]]]
DIRECTIONS = ("client → proxy", "proxy → upstream", "upstream → proxy", "proxy → client")


@asynccontextmanager
async def tap(upstream_url: str, trace: Trace) -> AsyncIterator[str]:
    """A WebSocket relay on 127.0.0.1 that records each frame, in order, before passing it on."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse()
        await client.prepare(request)
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{upstream_url}?{request.query_string}") as up:

            async def pump(src: Any, dst: Any, direction: str) -> None:
                async for msg in src:
                    trace.append((direction, orjson.loads(msg.data)))
                    await dst.send_str(msg.data)
                await dst.close()

            await asyncio.gather(
                pump(client, up, "proxy → upstream"), pump(up, client, "upstream → proxy"), return_exceptions=True
            )
        return client

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/realtime"
    finally:
        await runner.cleanup()


async def reset_trace() -> Trace:
    """One user item and one response, then a session.reset: the frames from the reset on, in order."""
    trace: Trace = []
    async with Simulator(SimulatorConfig(delta_interval_s=0.001)) as sim, tap(sim.url, trace) as tapped:
        config = config_from_dict({"listen": {"port": 0}, "upstream": {"url": tapped}})
        async with ProxyServer(config) as proxy, connect(proxy.url + "?model=gpt-realtime") as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send(item_event("Summarise ticket 1"))
            await client.until("conversation.item.added")
            await client.send({"type": "response.create"})
            await client.until("response.done")
            await sim.sessions[0].wait_until(lambda s: len(s.items) == 2)
            start = len(trace)
            reset = {"type": "session.reset", "event_id": "reset-1"}
            trace.append(("client → proxy", reset))
            await client.send(reset)
            trace.append(("proxy → client", await client.until("session.reset.completed")))
            assert sim.sessions[0].items == []
    return trace[start:]


def readme_trace() -> list[tuple[str, str]]:
    """(direction, event type) of each line of the README's trace block."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- reset trace -->", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.strip().splitlines():
        match = re.fullmatch(r"(\S+ → \S+) +(\{.*\})", line.strip())
        assert match, line
        lines.append((match.group(1), orjson.loads(match.group(2))["type"]))
    return lines


async def test_the_readme_reset_trace_is_what_crosses_the_wire() -> None:
    """The README's reset trace lists the frames each side sends, in the order a real run sends them."""
    trace = await reset_trace()
    assert {d for d, _ in trace} == set(DIRECTIONS)
    assert [(d, e["type"]) for d, e in trace] == readme_trace()
    # Nothing the proxy sent upstream was a synthetic event; nothing internal reached the client.
    assert all(not e["type"].startswith("session.") for d, e in trace if d == "proxy → upstream")
    assert [e["type"] for d, e in trace if d == "proxy → client"] == ["session.reset.completed"]


def render(trace: Trace) -> str:
    width = max(len(d) for d in DIRECTIONS)
    return "\n".join(f"{d:<{width}}  {orjson.dumps(e).decode()}" for d, e in trace)


if __name__ == "__main__":
    from proxy.config import LoggingConfig
    from proxy.logs import configure_logging

    configure_logging(LoggingConfig(level="warning", format="console"))
    print(render(asyncio.run(reset_trace())))
