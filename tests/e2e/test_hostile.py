"""Hostile input over real sockets (client → proxy → simulator on loopback): what a client can throw at the proxy.

Covered elsewhere and reused, not repeated here: a client frame over ``limits.max_message_bytes`` closes that
client with 1009 (test_relay.py; the neighbour test below also sends some); arbitrary frames fed to the core in
any interleaving (tests/core/test_fuzz_core.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import string
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from proxy.simulator import SimulatorConfig
from proxy.simulator.model import CLIENT_EVENT_TYPES
from tests.e2e.conftest import Client, Stack, StackFactory, item_event
from tests.e2e.probes import client_reading_paused, record, relays, wait_for


async def add_items(client: Client, n: int) -> list[str]:
    """Create `n` items; returns once each one's last event (GA: `conversation.item.done`) has arrived."""
    ids = []
    for i in range(n):
        await client.send(item_event(f"text {i}"))
        ids.append((await client.until("conversation.item.done"))["item"]["id"])
    return ids


# --- random frames next to a neighbour ------------------------------------------------------------------

TYPES = [
    *CLIENT_EVENT_TYPES,  # every type the server model handles
    "session.reset",
    "conversation.delete.all",
    "session.checkpoint",
    "",
    "x" * 300,
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == 3:
        return "".join(rng.choice(string.printable + "\u00e9\u2603\U0001f600\u0000") for _ in range(rng.randrange(20)))
    if kind == 4:
        return rng.choice(["item_1", "root", "rrp_1", "checkpoint", "empty", ""])
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    fields = ["type", "event_id", "item_id", "item", "keep_item_ids", "to", "response", "audio", "session"]
    return {rng.choice(fields): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_frame(rng: random.Random, limit: int) -> str | bytes:
    """One hostile client frame: garbage text or bytes, a mangled or well-formed event, deep nesting, oversize."""
    kind = rng.randrange(10)
    if kind == 0:
        return "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(100)))
    if kind == 1:
        return rng.randbytes(rng.randrange(200))  # a BINARY frame
    if kind == 2:
        return rng.choice(["[" * 60_000, '{"type":"session.reset","keep_item_ids":' + "[" * 50_000, "{" * 10])
    if kind == 3 and rng.random() < 0.1:
        return '{"type":"input_audio_buffer.append","audio":"' + "A" * (limit + 1) + '"}'  # over the limit: 1009
    if kind == 4:
        keep = [rng.choice(["item_1", "x", ""]) for _ in range(rng.randrange(1000))]
        return orjson.dumps({"type": "session.reset", "event_id": "h", "keep_item_ids": keep}).decode()
    event: dict[str, Any] = {"type": rng.choice(TYPES)}
    for _ in range(rng.randrange(5)):
        event[rng.choice(["event_id", "item_id", "item", "keep_item_ids", "to", "response", "audio"])] = random_value(
            rng
        )
    if rng.random() < 0.3:
        event["type"] = random_value(rng)
    return orjson.dumps(event).decode()


async def test_random_frames_from_one_client_never_close_a_neighbour(
    make_stack: StackFactory, request: pytest.FixtureRequest
) -> None:
    """2,000 seeded random frames (garbage, deep nesting, oversize, bad resets) never disturb a neighbour's session."""
    limit = 64 * 1024
    stack = await make_stack(limits={"max_message_bytes": limit})
    neighbour, neighbour_upstream = await stack.client()
    rng = random.Random(20_260_525)
    frames = [random_frame(rng, limit) for _ in range(2_000)]
    closes: list[int | None] = []

    async def hostile() -> None:
        """Send every frame; after an oversize one, wait for the close and carry on with a new connection."""
        pending = list(frames)
        while pending:
            client, _ = await stack.client()
            reader = asyncio.create_task(drain(client))
            while pending:
                frame = pending.pop(0)
                await client.ws.send(frame)
                if len(frame) > limit:
                    break
            else:
                await client.ws.close()
            closes.append(await reader)

    made: list[str] = []

    async def neighbourly(hostile_done: asyncio.Task[None]) -> None:
        """Items, one at a time, for as long as the hostile client sends."""
        while not hostile_done.done():
            item_id = f"n{len(made)}"
            await neighbour.send(item_event(item_id, item_id=item_id))
            await neighbour.until(lambda e, i=item_id: e["type"] == "conversation.item.done" and e["item"]["id"] == i)
            made.append(item_id)

    attack = asyncio.create_task(hostile())
    await asyncio.gather(attack, neighbourly(attack))
    await neighbour.send({"type": "session.reset", "event_id": "after"})
    done = await neighbour.until("session.reset.completed")
    assert done["deleted_item_ids"] == made
    assert neighbour_upstream.item_ids == [] and not neighbour_upstream.closed
    record(request, hostile_frames=len(frames), hostile_connections=len(closes), neighbour_items=len(made))
    record(request, hostile_closed_1009=closes.count(1009), hostile_closed_by_reset=closes.count(None))
    oversize = sum(len(frame) > limit for frame in frames)
    # Each oversize frame ended its connection with 1009 — or with the TCP reset that follows the proxy's close
    # while the rest of that frame is still unread (RFC 6455 §7.1.7 allows failing the connection so), which can
    # reach the client before the close frame does; nothing else closed a hostile connection.
    assert len(closes) == oversize + 1 and closes[-1] == 1000, closes
    assert set(closes[:-1]) <= {1009, None}, closes


async def drain(client: Client) -> int | None:
    """Read and drop everything until the connection closes (a reader that keeps up); the close code received."""
    try:
        while True:
            await client.ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None


# --- nesting, encoding, sizes ---------------------------------------------------------------------------


async def test_deeply_nested_json_in_a_synthetic_looking_frame_is_not_a_reset(make_stack: StackFactory) -> None:
    """100,000 levels of `[` after a reset's type cannot be parsed: no reset runs, the upstream's error comes back."""
    stack = await make_stack()
    client, upstream = await stack.client()
    ids = await add_items(client, 2)
    for frame in [
        '{"type":"session.reset","keep_item_ids":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"type":"session.reset","event_id":"deep","keep_item_ids":' + "[" * 100_000,
        "[" * 100_000,
    ]:
        await client.ws.send(frame)
        error = await client.until("error")
        assert error["error"]["code"] == "invalid_json"  # the upstream's answer to an unparsable frame
    # Nesting orjson can parse is a reset the proxy reads and refuses, naming the field.
    await client.ws.send('{"type":"session.reset","event_id":"d500","keep_item_ids":' + "[" * 500 + "]" * 500 + "}")
    error = await client.until("error")
    assert error["error"]["code"] == "invalid_session_reset"
    assert (error["error"]["param"], error["error"]["event_id"]) == ("keep_item_ids", "d500")
    assert "session.reset.completed" not in client.types()
    assert upstream.item_ids == ids
    assert [e["type"] for e in upstream.received[2:]] == ["<unparsable>"] * 3


async def test_invalid_utf8_in_a_client_text_frame_closes_1007_and_never_reaches_the_upstream(
    make_stack: StackFactory,
) -> None:
    """RFC 6455 §8.1: a TEXT frame that is not UTF-8 closes the client with 1007 and is never sent upstream."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await client.ws.send(b'{"type":"input_audio_buffer.append","audio":"\xff\xfe"}', text=True)
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await client.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1007, "invalid UTF-8 in a text frame")
    await upstream.wait_until(lambda s: s.closed)
    assert upstream.received == []
    assert upstream.close_code == 1007  # the client's close code goes upstream, as for 1009


async def test_valid_multibyte_utf8_passes_byte_for_byte_both_ways(make_stack: StackFactory) -> None:
    """Non-ASCII UTF-8 (accents, symbols, emoji) crosses the proxy untouched in both directions."""
    stack = await make_stack()
    client, upstream = await stack.client()
    text = "h\u00e9llo \u2603 \U0001f600 \u4e2d\u6587"
    await client.send(item_event(text, item_id="u1"))
    done = await client.until("conversation.item.done")
    assert done["item"]["content"][0]["text"] == text
    assert upstream.items[-1]["content"][0]["text"] == text
    raw = '{"type":"response.output_text.delta","delta":"' + text + '"}'
    await upstream.send_raw(raw)
    assert await client.ws.recv() == raw


async def test_a_reset_keeping_100000_made_up_ids_completes_quickly(
    make_stack: StackFactory, request: pytest.FixtureRequest
) -> None:
    """A keep list of 100,000 ids (one real) keeps the real one, deletes the others, and answers within a second."""
    stack = await make_stack()
    client, upstream = await stack.client()
    ids = await add_items(client, 3)
    keep = [f"made_up_{i}" for i in range(100_000)]
    keep[50_000] = ids[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send({"type": "session.reset", "event_id": "big", "keep_item_ids": keep})
    done = await client.until("session.reset.completed")
    elapsed = loop.time() - started
    record(request, reset_with_100000_keep_ids_s=round(elapsed, 3))
    assert done["kept_item_ids"] == [ids[1]]
    assert done["deleted_item_ids"] == [ids[0], ids[2]]
    assert upstream.item_ids == [ids[1]]
    assert elapsed < 1.0, f"the reset took {elapsed:.3f} s"


async def test_10000_events_behind_a_stalled_reset_are_pushed_back_then_all_delivered_in_order(
    make_stack: StackFactory, request: pytest.FixtureRequest
) -> None:
    """10,000 events sent behind a stalled reset, with max_held_events=50: the proxy stops reading the client, so
    the core holds none of them and refuses none; once the reset ends all 10,000 reach the upstream, in order.

    (Before back-pressure, 50 were held and 9,950 refused by name; the refusal path stays tested in the core.)
    """
    n, limit = 10_000, 50
    stack = await make_stack(
        sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 30}, limits={"max_held_events": limit}
    )
    client, upstream = await stack.client()
    (item,) = await add_items(client, 1)
    (relay,) = relays()
    await client.send({"type": "session.reset", "event_id": "r"})
    await upstream.wait_until(lambda s: any(e["type"] == "conversation.item.delete" for e in s.received))
    audio = base64.b64encode(b"\x00\x00").decode()
    sent = [f"h{i}" for i in range(n)]

    async def send_all() -> None:
        for event_id in sent:
            await client.send({"type": "input_audio_buffer.append", "event_id": event_id, "audio": audio})

    sender = asyncio.create_task(send_all())
    # The proxy's small queue fills and it stops reading the socket: TCP pushes back on the client.
    await wait_for(lambda: client_reading_paused(relay), "the proxy to stop reading")
    held_while_paused = relay.session.held_count
    # The simulator swallowed the reset's commands (stall_acks); answer them, and the events flow.
    await upstream.send_event({"type": "input_audio_buffer.cleared"})
    await upstream.send_event({"type": "conversation.item.deleted", "item_id": item})
    await client.until("session.reset.completed")
    await sender

    def appended(s: Any) -> list[str]:
        return [e["event_id"] for e in s.received if e.get("type") == "input_audio_buffer.append"]

    await upstream.wait_until(lambda s: len(appended(s)) >= n)
    record(request, held_while_paused=held_while_paused, delivered=len(appended(upstream)))
    assert held_while_paused == 0 and appended(upstream) == sent  # the reset itself paused the pump
    assert not [e for e in client.events if e["type"] == "error"]
    assert stack.proxy.state.metrics.events_rejected._value.get() == 0


# --- header, query and path injection -------------------------------------------------------------------


@asynccontextmanager
async def trap() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A listener standing in for an attacker's host: records whatever connects to it."""
    hits: list[bytes] = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(1024))
        writer.close()

    server = await asyncio.start_server(note, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", hits
    finally:
        server.close()
        await server.wait_closed()


async def raw_upgrade(stack: Stack, target: str, extra: bytes = b"", host: str = "127.0.0.1") -> int:
    """Send a hand-written upgrade request (clients refuse to write these) and return the status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\n"
        b"Host: " + host.encode() + b"\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n" + extra + b"\r\n"
    )
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            status_line = (await reader.readuntil(b"\r\n")).decode("latin-1")
        return int(status_line.split()[1])
    finally:
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        b"OpenAI-Organization: org\rX-Injected: 1\r\n",  # bare CR
        b"OpenAI-Organization: org\nX-Injected: 1\r\n",  # bare LF
        b"OpenAI-Organization: org\r\n X-Injected: 1\r\n",  # obsolete line folding
        b"OpenAI-Organization: org\x00X-Injected: 1\r\n",  # NUL
        b"Authorization: Bearer k\r X-Injected: 1\r\n",
    ],
    ids=["bare-cr", "bare-lf", "obs-fold", "nul", "cr-in-authorization"],
)
async def test_cr_lf_or_nul_in_a_header_is_refused_before_anything_is_dialed(
    make_stack: StackFactory, header: bytes
) -> None:
    """A header value with CR, LF, a fold or NUL is a 400 from the proxy's HTTP parser; nothing is dialed."""
    stack = await make_stack()
    assert await raw_upgrade(stack, "/v1/realtime?model=m", header) == 400
    assert stack.sim.sessions == []
    assert await raw_upgrade(stack, "/v1/realtime?model=m") == 101  # the same request, clean, goes through


@pytest.mark.parametrize(
    ("target", "extra", "query"),
    [
        ("/v1/realtime?model=m%0D%0AX-Injected:%201", b"", {"model": "m\r\nX-Injected: 1"}),
        (
            "/v1/realtime?model=m&api-version=%0d%0aHost:%20{trap}",
            b"",
            {"model": "m", "api-version": "\r\nHost: {trap}"},
        ),
        (
            "/v1/realtime?model=m&host={trap}&url=ws://{trap}/v1/realtime",
            b"",
            {"host": "{trap}", "url": "ws://{trap}/v1/realtime"},
        ),
        ("//{trap}/v1/realtime?model=m", b"", {"model": "m"}),
        ("/../../v1/realtime?model=m", b"", {"model": "m"}),
        ("/%2e%2e/%2e%2e/{trap}?model=m", b"", {"model": "m"}),
        ("ws://{trap}/v1/realtime?model=m", b"", {"model": "m"}),  # absolute-form request target
        ("http://{trap}/v1/realtime?model=m", b"", {"model": "m"}),
        ("/v1/realtime?model=m", b"X-Forwarded-Host: {trap}\r\nForwarded: host={trap}\r\n", {"model": "m"}),
        ("/v1/realtime?model=m", b"Host: {trap}\r\n", None),  # a second Host header
    ],
    ids=[
        "crlf-query",
        "crlf-host-query",
        "host-url-query",
        "double-slash",
        "dot-dot",
        "encoded-dot-dot",
        "absolute-ws",
        "absolute-http",
        "forwarded-headers",
        "second-host",
    ],
)
async def test_no_query_path_or_header_redirects_the_upstream_dial(
    make_stack: StackFactory, target: str, extra: bytes, query: dict[str, str] | None
) -> None:
    """Query keys, paths, absolute-form targets and Host-like headers never move the dial: only the configured
    upstream is reached, at its configured path, and what the client wrote arrives as inert query values."""
    stack = await make_stack()
    async with trap() as (evil, hits):
        status = await raw_upgrade(stack, target.replace("{trap}", evil), extra.replace(b"{trap}", evil.encode()))
        if query is None:  # duplicate Host: refusing is fine too, as long as nothing else is dialed
            assert status in (101, 400)
        else:
            assert status == 101
            (session,) = stack.sim.sessions
            assert session.path == "/v1/realtime"
            assert session.headers["Host"] == f"127.0.0.1:{stack.sim.port}"
            assert {k: v.replace(evil, "{trap}") for k, v in session.query.items() if k in query} == query
            assert "X-Injected" not in session.headers and "Forwarded" not in session.headers
    assert hits == [], f"the proxy dialed the attacker's host: {hits}"
