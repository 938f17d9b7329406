"""Real sockets on 127.0.0.1: a client → the proxy → the simulator, each on an ephemeral port."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import structlog
from websockets.asyncio.client import ClientConnection, connect

from proxy.config import Config, LoggingConfig, RelayConfig, RelayEngine, config_from_dict
from proxy.logs import configure_logging
from proxy.server import ProxyServer
from proxy.simulator import SimSession, Simulator, SimulatorConfig

Event = dict[str, Any]

# The relay engine every proxy of this suite runs on, unless a test names one: RRP_RELAY_ENGINE=aiohttp runs
# the whole suite over proxy/relay.py (`make test-aiohttp-engine`, and make test's second pass), the default
# being proxy/wire.py ("protocol").
ENGINE: RelayEngine | None = os.environ.get("RRP_RELAY_ENGINE") or None  # type: ignore[assignment]
_ENGINE_NAMED: set[int] = set()  # ids of configs whose test named an engine: ENGINE does not replace it


def keep_engine(config: Config) -> Config:
    """A config whose [relay] engine the test chose: RRP_RELAY_ENGINE does not replace it."""
    _ENGINE_NAMED.add(id(config))
    return config


@pytest.fixture(autouse=True)
def relay_engine(monkeypatch: pytest.MonkeyPatch) -> RelayEngine:
    """Proxies started with the default [relay] run on ENGINE instead (a test that sets the key keeps its own)."""
    if ENGINE is None:
        return RelayConfig().engine
    original = ProxyServer.__init__

    def init(self: ProxyServer, config: Any, *args: Any, **kwargs: Any) -> None:
        if config.relay == RelayConfig() and id(config) not in _ENGINE_NAMED:
            config = dataclasses.replace(config, relay=RelayConfig(engine=ENGINE))
        original(self, config, *args, **kwargs)

    monkeypatch.setattr(ProxyServer, "__init__", init)
    return ENGINE


class Client:
    """A raw WebSocket client that keeps every event it received, for exact assertions."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[Event] = []

    async def send(self, event: Event) -> None:
        await self.ws.send(orjson.dumps(event).decode())

    async def recv(self) -> Event:
        event: Event = orjson.loads(await self.ws.recv(decode=False))
        self.events.append(event)
        return event

    async def until(self, predicate: str | Callable[[Event], bool]) -> Event:
        """Receive until an event of that type (or matching the predicate) arrives; returns it."""
        match = (lambda e: e.get("type") == predicate) if isinstance(predicate, str) else predicate
        while True:
            event = await self.recv()
            if match(event):
                return event

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


@dataclass
class Stack:
    sim: Simulator
    proxy: ProxyServer
    exit: AsyncExitStack

    async def client(
        self, query: str = "?model=gpt-realtime", path: str = "/v1/realtime", **kwargs: Any
    ) -> tuple[Client, SimSession]:
        """A connected client, its upstream session in the simulator, and session.created already read."""
        n = len(self.sim.sessions)
        url = f"ws://127.0.0.1:{self.proxy.port}{path}{query}"
        ws = await self.exit.enter_async_context(connect(url, compression=None, **kwargs))
        client = Client(ws)
        await client.until("session.created")
        upstream = await self.sim.wait_for_sessions(n + 1)
        return client, upstream


StackFactory = Callable[..., Any]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    """make_stack(sim=SimulatorConfig(...), **proxy config sections) → a running Stack, torn down after."""
    async with AsyncExitStack() as stack:

        async def factory(sim: SimulatorConfig | None = None, url_suffix: str = "", **sections: Any) -> Stack:
            simulator = await stack.enter_async_context(Simulator(sim or SimulatorConfig(delta_interval_s=0.002)))
            upstream = {"url": simulator.url + url_suffix, **sections.pop("upstream", {})}
            config = config_from_dict({"listen": {"port": 0}, "upstream": upstream, **sections})
            if "relay" in sections:
                keep_engine(config)
            proxy = await stack.enter_async_context(ProxyServer(config))
            return Stack(simulator, proxy, stack)

        yield factory


def item_event(text: str, item_id: str | None = None) -> Event:
    item: Event = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    if item_id is not None:
        item["id"] = item_id
    return {"type": "conversation.item.create", "item": item}


INTERNAL = {"conversation.item.deleted", "input_audio_buffer.cleared"}


@pytest.fixture
def json_logs() -> Iterator[Callable[[], list[Event]]]:
    """The real logging set-up (configure_logging, JSON) writing to a buffer; call the result for the lines so far.

    The previous structlog and root-logger set-up is put back afterwards.
    """
    saved_config, root = structlog.get_config(), logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=stream)
    try:
        yield lambda: [orjson.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        structlog.configure(**saved_config)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
