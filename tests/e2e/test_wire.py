"""Frames at the edges of RFC 6455 over real sockets, on both relay engines: fragmented messages with a ping
inside, bytes sent with the upgrade request, a stream cut byte by byte, pings answered by the proxy.

The protocol engine (proxy/wire.py) parses frames itself, so these are the cases its reader and its hand-over of
the client's socket from aiohttp must get right; the aiohttp engine shows the behaviour both must share.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections import deque
from typing import Any

import orjson
import pytest
import trustme
from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy import wire
from proxy.config import RelayEngine, config_from_dict
from proxy.core.frames import Frame, FrameReader, FrameWriter, Opcode
from proxy.server import ProxyServer
from proxy.wire import WireRelay
from tests.e2e.conftest import Client, Stack, StackFactory, item_event, keep_engine
from tests.e2e.probes import relays

ENGINES: list[RelayEngine] = ["aiohttp", "protocol"]
UP = FrameWriter(masked=True)  # a client's frames: masked
DOWN = FrameWriter(masked=False)


class RawClient:
    """A client on a bare socket: the upgrade by hand, frames written as given, frames read as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader(masked=False, max_message_bytes=None)
        self.pending: deque[Frame] = deque()  # read, not yet looked at

    @classmethod
    async def connect(cls, stack: Stack, early: bytes = b"") -> RawClient:
        """Upgrade; `early` goes out in the same write as the request (frames a hasty client sends at once)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{stack.proxy.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        writer.write(request.encode() + early)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def next_frame(self, predicate: Any = lambda f: True) -> Frame:
        """The next frame that matches (the ones before it are passed over)."""
        while True:
            while self.pending:
                frame = self.pending.popleft()
                if predicate(frame):
                    return frame
            self.pending.extend(self.frames.receive_data(await self.reader.read(65536)))

    async def event(self, etype: str) -> dict[str, Any]:
        def match(frame: Frame) -> bool:
            return frame.opcode is Opcode.TEXT and orjson.loads(bytes(frame.payload())).get("type") == etype

        return dict(orjson.loads(bytes((await self.next_frame(match)).payload())))

    async def close(self) -> None:
        self.writer.write(UP.close(1000))
        self.writer.close()
        await self.writer.wait_closed()


def texts_created(upstream: Any) -> list[str]:
    return [e["item"]["content"][0]["text"] for e in upstream.received if e.get("type") == "conversation.item.create"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_fragmented_client_message_with_a_ping_inside_reaches_the_upstream_whole(
    make_stack: StackFactory, engine: RelayEngine
) -> None:
    """Three fragments with a ping between them: the upstream gets the one event, the client its pong first."""
    stack = await make_stack(relay={"engine": engine})
    client = await RawClient.connect(stack)
    await client.event("session.created")
    (upstream,) = stack.sim.sessions
    data = orjson.dumps(item_event("in three fragments, h\u00e9llo"))
    cut = data.index(b"\xc3") + 1  # inside the two bytes of "é": fragments need not be UTF-8 alone
    client.writer.write(UP.frame(Opcode.TEXT, data[:10], fin=False))
    client.writer.write(UP.frame(Opcode.PING, b"are you there"))
    client.writer.write(UP.frame(Opcode.CONT, data[10:cut], fin=False))
    client.writer.write(UP.frame(Opcode.CONT, data[cut:]))
    pong = await client.next_frame(lambda f: f.opcode is Opcode.PONG)
    assert bytes(pong.payload()) == b"are you there"
    await client.event("conversation.item.added")
    assert texts_created(upstream) == ["in three fragments, h\u00e9llo"]
    await client.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_fragmented_upstream_message_reaches_the_client_whole(
    make_stack: StackFactory, engine: RelayEngine
) -> None:
    """The upstream's fragments (cut inside a UTF-8 character) reach the client as one message, the same text."""
    stack = await make_stack(relay={"engine": engine})
    client, upstream = await stack.client()
    data = orjson.dumps({"type": "response.output_text.delta", "delta": "fragm\u00e9nted"})
    cut = data.index(b"\xc3") + 1
    transport = upstream._ws._writer.transport
    transport.write(DOWN.frame(Opcode.TEXT, data[:cut], fin=False) + DOWN.frame(Opcode.CONT, data[cut:]))
    await upstream.send_raw('{"type":"test.marker"}')
    assert await client.ws.recv() == data.decode()
    assert await client.ws.recv() == '{"type":"test.marker"}'


@pytest.mark.parametrize("engine", ENGINES)
async def test_frames_sent_with_the_upgrade_request_are_relayed(make_stack: StackFactory, engine: RelayEngine) -> None:
    """A client that writes its first events in the same write as its upgrade request loses none of them."""
    stack = await make_stack(relay={"engine": engine})
    early = b"".join(UP.text(orjson.dumps(item_event(f"early {i}"))) for i in range(3))
    client = await RawClient.connect(stack, early=early)
    for _ in range(3):
        await client.event("conversation.item.added")
    (upstream,) = stack.sim.sessions
    assert texts_created(upstream) == ["early 0", "early 1", "early 2"]
    if engine == "protocol":
        assert all(isinstance(r, WireRelay) for r in relays())
    await client.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_stream_cut_byte_by_byte_is_relayed_in_order(make_stack: StackFactory, engine: RelayEngine) -> None:
    """Frames written one byte per write (each its own TCP segment, no delay) arrive whole and in order."""
    stack = await make_stack(relay={"engine": engine})
    client = await RawClient.connect(stack)
    await client.event("session.created")
    (upstream,) = stack.sim.sessions
    stream = b"".join(UP.text(orjson.dumps(item_event(f"byte {i}"))) for i in range(3))
    for i in range(len(stream)):
        client.writer.write(stream[i : i + 1])
        await client.writer.drain()
    for _ in range(3):
        await client.event("conversation.item.added")
    assert texts_created(upstream) == ["byte 0", "byte 1", "byte 2"]
    await client.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_binary_frame_from_the_upstream_reaches_the_client_unchanged(
    make_stack: StackFactory, engine: RelayEngine
) -> None:
    """A binary frame is passed through as the same bytes (the core does not read it)."""
    stack = await make_stack(relay={"engine": engine})
    client, upstream = await stack.client()
    payload = bytes(range(256)) * 8
    await upstream._ws.send_frame(payload, WSMsgType.BINARY)
    assert await client.ws.recv() == payload


async def test_an_upstream_that_stops_answering_is_pinged_then_given_up_with_1014(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Protocol engine: an upstream silent for a heartbeat period gets a ping; silent for another, the client is
    closed with 1014 and the upstream with 1001 (aiohttp's heartbeat did the same for the aiohttp engine)."""
    monkeypatch.setattr(wire, "HEARTBEAT_SECONDS", 0.05)
    pinged = asyncio.Event()
    upstream_closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)  # it never answers a ping
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                pinged.set()
        upstream_closed.set_result(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", silent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        config = keep_engine(
            config_from_dict(
                {
                    "listen": {"port": 0},
                    "upstream": {"url": f"ws://127.0.0.1:{port}/v1/realtime"},
                    "relay": {"engine": "protocol"},
                }
            )
        )
        async with ProxyServer(config) as proxy, connect(f"ws://127.0.0.1:{proxy.port}/v1/realtime") as client:
            with pytest.raises(ConnectionClosed) as info:
                await client.recv()
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1014, "upstream stopped answering")
            assert await upstream_closed == 1001
            assert pinged.is_set()  # the ping went out before the close, on the same stream
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("trusted", [True, False])
async def test_a_wss_upstream_is_dialed_over_verified_tls(
    make_stack: StackFactory, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    """Protocol engine, wss:// upstream (here a second proxy with a TLS listener in front of the simulator): a
    certificate the system trusts carries the session; one it does not is a 502 naming the verification."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    tls = {"port": 0, "tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
    front = await make_stack(listen=tls)  # simulator behind a TLS proxy
    if trusted:
        default_context = ssl.create_default_context

        def trusting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
            context = default_context(*args, **kwargs)
            ca.configure_trust(context)  # as if the CA were the system's
            return context

        monkeypatch.setattr(wire.ssl, "create_default_context", trusting)
    config = keep_engine(
        config_from_dict(
            {
                "listen": {"port": 0},
                "upstream": {"url": f"wss://127.0.0.1:{front.proxy.port}/v1/realtime"},
                "relay": {"engine": "protocol"},
            }
        )
    )
    async with ProxyServer(config) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/v1/realtime?model=gpt-realtime"
        if not trusted:
            with pytest.raises(InvalidStatus) as refused:
                await connect(url)
            assert refused.value.response.status_code == 502
            assert b"CERTIFICATE_VERIFY_FAILED" in refused.value.response.body
            return
        async with connect(url) as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send(item_event("over wss"))
            await client.until("conversation.item.added")
        assert front.sim.sessions[0].item_ids != []
