"""The client side: connections, ping-pong round trips, pipelined throughput, paced real-time sessions.

Every connection is an aiohttp client WebSocket with ``decode_text=False`` and frames sent with
``send_frame(bytes, TEXT)``: the client neither decodes nor encodes, so its own CPU cost per frame is small and
the same for every target. Replies are matched to requests in order (the echo answers each append once,
and a relay must keep order), so nothing is parsed on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import aiohttp
from aiohttp import ClientWebSocketResponse, WSMsgType

from bench.frames import FRAMES_PER_SECOND

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
WS: TypeAlias = ClientWebSocketResponse[Literal[False]]  # decode_text=False: TEXT frames arrive as bytes
now = time.perf_counter


class BenchError(RuntimeError):
    """A target misbehaved (closed, answered something unexpected, did not answer in time)."""


class ConnectError(BenchError):
    """Not every connection asked for could be opened; `opened` could (and were closed again)."""

    def __init__(self, message: str, opened: int) -> None:
        super().__init__(message)
        self.opened = opened


def client_session() -> aiohttp.ClientSession:
    # limit=0: an open WebSocket keeps its connector slot, and the default (100) would cap sessions.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


async def connect(session: aiohttp.ClientSession, url: str, wait_s: float = 10.0) -> WS:
    """Open a WebSocket and read the upstream's `session.created` (so the whole path is up)."""
    ws = await session.ws_connect(
        url,
        max_msg_size=MAX_MESSAGE_BYTES,
        decode_text=False,
        autoping=True,
        compress=0,
        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
    )
    try:
        msg = await ws.receive(wait_s)
        if msg.type is not WSMsgType.TEXT or b'"session.created"' not in msg.data[:200]:
            raise BenchError(f"expected session.created from {url}, got {msg.type!r}")
    except BaseException:
        await ws.close()
        raise
    return ws


async def connect_many(session: aiohttp.ClientSession, url: str, n: int, parallel: int = 32) -> list[WS]:
    """`n` connections, at most `parallel` handshakes at a time (a burst of thousands would only measure
    the listen backlog); all or nothing."""
    sem = asyncio.Semaphore(parallel)
    opened: list[WS] = []

    async def one() -> None:
        async with sem:
            opened.append(await connect(session, url))

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    # the first failure cancels the rest: a relay refusing the 101st session should not cost N timeouts
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    failures = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
    if failures:
        await close_all(opened)
        raise ConnectError(
            f"{len(opened)} of {n} connections opened, then one failed: {describe(failures[0])}", len(opened)
        )
    return opened


def describe(exc: BaseException) -> str:
    """One short line for a failed connection (aiohttp's handshake error repr carries every header)."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"HTTP {exc.status} answered the WebSocket upgrade"
    return f"{type(exc).__name__}: {exc}"[:200]


async def close_all(sockets: Sequence[WS], wait_s: float = 10.0) -> None:
    async def one(ws: WS) -> None:
        with contextlib.suppress(Exception):
            await ws.close()

    # past wait_s, the client session's own cleanup aborts whatever is left
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(one(ws) for ws in sockets)), wait_s)


async def _reply(ws: WS, wait_s: float = 10.0) -> None:
    msg = await ws.receive(wait_s)
    if msg.type is not WSMsgType.TEXT:
        raise BenchError(f"expected a delta, got {msg.type!r} {msg.data!r}")


# --- ping-pong ------------------------------------------------------------------------------------------


async def ping_pong(ws: WS, frame: bytes, count: int, limit_s: float) -> list[float]:
    """Round trips of one frame at a time, in µs; stops early after `limit_s`."""
    out: list[float] = []
    deadline = now() + limit_s
    for _ in range(count):
        t0 = time.perf_counter_ns()
        await ws.send_frame(frame, WSMsgType.TEXT)
        await _reply(ws)
        out.append((time.perf_counter_ns() - t0) / 1000)
        if now() > deadline:
            break
    return out


# --- pipelined throughput -------------------------------------------------------------------------------


async def pipelined(ws: WS, frame: bytes, window: int, warmup_s: float, measure_s: float) -> float:
    """Frames per second echoed on one connection with up to `window` frames in flight.

    Counted between the end of the warm-up and the end of the measurement, by the replies received.
    """
    credits = asyncio.Semaphore(window)
    received = 0
    sent = 0
    stop = False
    home = asyncio.Event()  # set once sending stopped and every frame sent was answered

    async def reader() -> None:
        nonlocal received
        while True:
            await _reply(ws)
            received += 1
            credits.release()
            if stop and received >= sent:
                home.set()

    async def writer() -> None:
        nonlocal sent
        while not stop:
            await credits.acquire()
            if stop:
                break
            sent += 1  # before the await: the reader must never stop with this frame's reply still coming
            await ws.send_frame(frame, WSMsgType.TEXT)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    try:
        await _sleep_watching(warmup_s, tasks)
        t0, n0 = now(), received
        await _sleep_watching(measure_s, tasks)
        t1, n1 = now(), received
        stop = True
        credits.release()  # wake a writer parked on the semaphore
        await asyncio.wait_for(tasks[1], 10.0)
        # Drain what is in flight, so the socket stays usable. The reader may be parked on a reply that will never
        # come (all answered before the stop): it is cancelled then, not waited for (it once stalled the run 10 s).
        if received < sent:
            await asyncio.wait_for(home.wait(), 10.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return (n1 - n0) / (t1 - t0)


async def _sleep_watching(seconds: float, tasks: list[asyncio.Task[None]]) -> None:
    """Sleep, but surface a worker's failure at once instead of after the whole period."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()


# --- real-time paced sessions ---------------------------------------------------------------------------


@dataclass
class PacedResult:
    sessions: int
    window_s: float
    latencies_us: list[float]
    sent_in_window: int
    expected_in_window: int
    received: int
    sent: int
    max_lag_ms: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds in the window, by probe key
    cpu_window_s: float = 0.0  # the wall time between the two probe reads
    errors: list[str] = field(default_factory=list)

    @property
    def pace(self) -> float:
        """Frames actually sent in the window / frames real time asks for (1.0 = kept up)."""
        return self.sent_in_window / self.expected_in_window if self.expected_in_window else 0.0


async def paced(
    sockets: Sequence[WS],
    frame: bytes,
    warmup_s: float,
    measure_s: float,
    cpu_probe: Callable[[], dict[str, float]] | None = None,
    slots: int = 20,
) -> PacedResult:
    """Every socket sends one frame per 20 ms (50 frames/s); their phases are spread over `slots` ticks
    of 1 ms so the load is smooth, as with independent callers. Round trips are recorded for frames sent
    inside the measurement window; the CPU probe (CPU seconds by process) is read at its two ends.
    """
    period = 1.0 / FRAMES_PER_SECOND
    tick = period / slots
    groups: list[list[tuple[WS, deque[float]]]] = [[] for _ in range(slots)]
    queues: list[deque[float]] = []
    for i, ws in enumerate(sockets):
        q: deque[float] = deque()
        queues.append(q)
        groups[i % slots].append((ws, q))
    latencies: list[float] = []
    win = [float("inf"), float("inf")]  # [start, end) of the measurement window, set by the pacer
    counts = {"received": 0, "sent": 0, "in_window": 0}
    errors: list[str] = []
    draining = False
    all_home = asyncio.Event()  # set once sending stopped and every frame sent has been answered

    async def reader(ws: WS, q: deque[float]) -> None:
        async for msg in ws:
            t = now()
            if msg.type is not WSMsgType.TEXT or not q:
                errors.append(f"unexpected {msg.type!r}")
                return
            s = q.popleft()
            counts["received"] += 1
            if win[0] <= s < win[1]:
                latencies.append((t - s) * 1e6)
            if draining and counts["received"] >= counts["sent"]:
                all_home.set()
        if q:
            errors.append(f"closed with {len(q)} frames unanswered (close code {ws.close_code})")

    readers = [asyncio.create_task(reader(ws, q)) for ws, q in zip(sockets, queues, strict=True)]
    max_lag = 0.0
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    cpu_t0 = cpu_t1 = 0.0
    start = now() + 0.01
    win[0] = start + warmup_s
    win[1] = win[0] + measure_s
    total_ticks = round((warmup_s + measure_s) / tick)
    window_marked = False
    try:
        for k in range(total_ticks):
            due = start + k * tick
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            if not window_marked and due >= win[0]:
                window_marked = True
                cpu0, cpu_t0 = (cpu_probe() if cpu_probe else {}), now()
            for ws, q in groups[k % slots]:
                t = now()
                q.append(t)
                if win[0] <= t < win[1]:
                    counts["in_window"] += 1
                await ws.send_frame(frame, WSMsgType.TEXT)
                counts["sent"] += 1
            if errors:
                break
        # the window closes when the last frame of its time has been sent
        cpu1, cpu_t1 = (cpu_probe() if cpu_probe else {}), now()
        # let the last replies come home (bounded), then stop the readers
        draining = True
        if counts["received"] < counts["sent"] and not errors:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_home.wait(), 2.0)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    expected = round(measure_s * FRAMES_PER_SECOND) * len(sockets)
    return PacedResult(
        sessions=len(sockets),
        window_s=measure_s,
        latencies_us=latencies,
        sent_in_window=counts["in_window"],
        expected_in_window=expected,
        received=counts["received"],
        sent=counts["sent"],
        max_lag_ms=max_lag * 1000,
        cpu_s={k: cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0},
        cpu_window_s=cpu_t1 - cpu_t0,
        errors=errors[:5],
    )


async def with_timeout(aw: Awaitable[object], seconds: float, what: str) -> None:
    try:
        await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        raise BenchError(f"{what} took more than {seconds:g} s") from None
