"""Reset timings against the project's Simulator with a fixed one-way delay (25 ms by default).

Ways to get back to an empty conversation, each measured from the client:

- ``session.reset`` through the proxy, until ``session.reset.completed``: by deletes (the default strategy), and
  by swap (a second proxy with ``[reset] strategy = "swap"``: the client moves to a spare upstream session that
  is already open and configured, so no upstream round trip is paid, whatever the item count);
- a client deleting every item itself, one ``conversation.item.delete`` at a time, each waiting for its
  ``conversation.item.deleted`` (direct to the same Simulator);
- a client sending every delete at once and waiting for all the acks (direct): the floor any reset reaches
  against this upstream, so ``session.reset`` minus this is what the proxy adds;
- closing the connection and opening a new one until its ``session.created``: through the delay line (the
  handshake pays the delay too, see bench/upstream.py), and straight to the Simulator, whose handshake is
  not delayed (a lower bound).

The Simulator delays every frame it sends by the one-way delay, so one request/answer exchange costs one delay.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from bench.client import WS, BenchError, connect

Event = dict[str, Any]
_ITEM_FINAL = frozenset({"conversation.item.done", "conversation.item.created"})  # GA, beta


@dataclass
class ResetResult:
    delay_s: float
    items: list[int]
    reset_ms: dict[int, list[float]] = field(default_factory=dict)
    swap_ms: dict[int, list[float]] = field(default_factory=dict)  # by swap, to a warm spare
    client_delete_ms: dict[int, float | None] = field(default_factory=dict)
    pipelined_delete_ms: dict[int, list[float]] = field(default_factory=dict)
    reconnect_ms: list[float] = field(default_factory=list)  # handshake through the delay
    reconnect_loopback_ms: list[float] = field(default_factory=list)  # handshake not delayed

    def reset_median(self, n: int) -> float | None:
        times = self.reset_ms.get(n)
        return statistics.median(times) if times else None


async def _send(ws: WS, event: Event) -> None:
    await ws.send_frame(orjson.dumps(event), WSMsgType.TEXT)


async def _until(ws: WS, etype: str, wait_s: float = 30.0) -> Event:
    """Read events until one of type `etype`; an `error` event is a benchmark failure."""
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"no {etype} within {wait_s:g} s")
        msg = await ws.receive(left)
        if msg.type is not WSMsgType.TEXT:
            raise BenchError(f"connection ended waiting for {etype}: {msg.type!r} {msg.data!r}")
        event: Event = orjson.loads(msg.data)
        if event.get("type") == "error":
            raise BenchError(f"error event waiting for {etype}: {event.get('error')}")
        if event.get("type") == etype:
            return event


async def create_items(ws: WS, n: int, tag: str, wait_s: float = 30.0) -> list[str]:
    """Create `n` user messages, pipelined, and wait until the upstream has announced every one."""
    ids = [f"it_{tag}_{i}" for i in range(n)]  # the API caps item ids at 32 characters
    for item_id in ids:
        await _send(
            ws,
            {
                "type": "conversation.item.create",
                "item": {
                    "id": item_id,
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a benchmark turn"}],
                },
            },
        )
    pending = set(ids)
    deadline = time.monotonic() + wait_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{len(pending)} of {n} items not created within {wait_s:g} s")
        msg = await ws.receive(left)
        if msg.type is not WSMsgType.TEXT:
            raise BenchError(f"connection ended while creating items: {msg.type!r}")
        event: Event = orjson.loads(msg.data)
        if event.get("type") == "error":
            raise BenchError(f"error creating items: {event.get('error')}")
        if event.get("type") in _ITEM_FINAL:
            pending.discard(event["item"]["id"])
    return ids


async def time_reset(ws: WS, n: int, tag: str, strategy: str = "delete", settle_s: float = 0.0) -> float:
    """ms from sending `session.reset` to `session.reset.completed`, with `n` items in the conversation; the
    reset must have been done by `strategy` (a swap that found no ready spare deletes, and would not count).
    `settle_s`: a pause before the reset (the next spare is ready one handshake and one delay after a swap)."""
    await create_items(ws, n, tag)
    if settle_s:
        await asyncio.sleep(settle_s)
    t0 = time.perf_counter()
    await _send(ws, {"type": "session.reset", "event_id": f"reset_{tag}"})
    completed = await _until(ws, "session.reset.completed")
    elapsed = (time.perf_counter() - t0) * 1000
    deleted = completed.get("deleted_item_ids") or []
    if len(deleted) != n:
        raise BenchError(f"reset of {n} items reported {len(deleted)} deleted")
    if completed.get("strategy") != strategy:
        raise BenchError(f"reset of {n} items was done by {completed.get('strategy')!r}, not {strategy!r}")
    return elapsed


async def time_client_deletes(ws: WS, n: int, tag: str) -> float:
    """ms for a client to delete `n` items itself, one at a time, each waiting for its ack."""
    ids = await create_items(ws, n, tag)
    t0 = time.perf_counter()
    for item_id in ids:
        await _send(ws, {"type": "conversation.item.delete", "item_id": item_id})
        event = await _until(ws, "conversation.item.deleted")
        if event.get("item_id") != item_id:
            raise BenchError(f"deleted {event.get('item_id')!r}, expected {item_id!r}")
    return (time.perf_counter() - t0) * 1000


async def time_pipelined_deletes(ws: WS, n: int, tag: str) -> float:
    """ms for a client to send all `n` deletes at once and receive every ack."""
    ids = await create_items(ws, n, tag)
    t0 = time.perf_counter()
    for item_id in ids:
        await _send(ws, {"type": "conversation.item.delete", "item_id": item_id})
    for _ in ids:
        await _until(ws, "conversation.item.deleted")
    return (time.perf_counter() - t0) * 1000


async def time_reconnects(session: aiohttp.ClientSession, url: str, repeats: int) -> list[float]:
    """ms from giving up a connection to a new one's `session.created`. The old one's close handshake runs
    meanwhile, not first: a client in a hurry need not wait for it."""
    out: list[float] = []
    ws = await connect(session, url)
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            closing = asyncio.create_task(ws.close())
            ws = await connect(session, url)
            out.append((time.perf_counter() - t0) * 1000)
            await closing
    finally:
        await ws.close()
    return out


async def run_reset(
    session: aiohttp.ClientSession,
    proxy_url: str,
    sim_url: str,
    delay_line_url: str,
    delay_s: float,
    items: list[int],
    repeats: int,
    client_delete_max: int,
    reconnects: int,
    log: Any = print,
    swap_proxy_url: str | None = None,
) -> ResetResult:
    result = ResetResult(delay_s=delay_s, items=items)
    ws = await connect(session, proxy_url)
    try:
        for n in items:
            result.reset_ms[n] = [await time_reset(ws, n, f"r{n}_{r}") for r in range(repeats)]
            log(f"  session.reset, {n} items: {statistics.median(result.reset_ms[n]):.1f} ms (median of {repeats})")
    finally:
        await ws.close()
    if swap_proxy_url is not None:
        ws = await connect(session, swap_proxy_url)
        settle_s = 4 * delay_s + 0.05  # the spare's handshake and its session.created, through the delay
        try:
            for n in items:
                result.swap_ms[n] = [await time_reset(ws, n, f"s{n}_{r}", "swap", settle_s) for r in range(repeats)]
                log(f"  session.reset by swap, {n} items: {statistics.median(result.swap_ms[n]):.2f} ms")
        finally:
            await ws.close()
    ws = await connect(session, sim_url)
    try:
        for n in items:
            if n > client_delete_max:
                result.client_delete_ms[n] = None
                log(f"  client deletes, {n} items: skipped (more than {client_delete_max} in this mode)")
                continue
            result.client_delete_ms[n] = await time_client_deletes(ws, n, f"d{n}")
            log(f"  client deletes one by one, {n} items: {result.client_delete_ms[n]:.0f} ms")
        for n in items:
            result.pipelined_delete_ms[n] = [await time_pipelined_deletes(ws, n, f"p{n}_{r}") for r in range(repeats)]
            log(f"  client deletes all at once, {n} items: {statistics.median(result.pipelined_delete_ms[n]):.1f} ms")
    finally:
        await ws.close()
    result.reconnect_ms = await time_reconnects(session, delay_line_url, reconnects)
    result.reconnect_loopback_ms = await time_reconnects(session, sim_url, reconnects)
    log(
        f"  reconnect: {statistics.median(result.reconnect_ms):.1f} ms with the handshake through the delay, "
        f"{statistics.median(result.reconnect_loopback_ms):.1f} ms with it on loopback (medians of {reconnects})"
    )
    return result
