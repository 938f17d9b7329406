"""Per connection: two pumps around a core session, a reset timer, and the close handshake both ways.

Both sides are aiohttp WebSockets (the client's a ``WebSocketResponse``, the upstream's a
``ClientWebSocketResponse``), both with ``decode_text=False``: a TEXT frame arrives as bytes and leaves as the
same bytes (``send_frame``), never decoded or re-encoded. Every frame goes into the core session, and what the
session hands back is written out under a per-direction lock, so two pumps never interleave a direction's
frames. Writes await the peer's drain: a slow reader slows its source (TCP back-pressure); nothing piles up.
While the core is paused (a reset runs) the client pump reads nothing more: aiohttp's reader fills its small
queue, stops reading the socket, and TCP pushes back on the client instead of the proxy buffering its frames.

A fault of our own (an exception in a pump or the reset timer that is not the network going away) is logged
with its traceback and closes both sides with 1011: it is never swallowed.

With a swap controller (proxy/core/swap.py) a client connection may outlive its upstream: a :class:`Spares`
helper owns the spare upstream (its dial, its close) and the upstreams the client left (each gets a close
1000). Every upstream socket has one reader; what it reads goes to the core session while that socket is the
primary, to the controller while it is the spare, and nowhere once retired. Actions the controller asks for
are carried out at the start of the next flush, before any await, so no frame slips in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType, web

from proxy.core.errors import UpstreamRefused, UpstreamUnreachable
from proxy.core.replay import Dial, ReplayRecord
from proxy.core.session import (
    Binary,
    EventsRejected,
    Frame,
    LateResponse,
    Notice,
    ResetFinished,
    Session,
    SessionConfig,
    TaskEnded,
    UpstreamSession,
    Usage,
)
from proxy.core.swap import Action, SwapConfig, SwapNotice, Swapper, Switched
from proxy.metrics import Metrics

_log = structlog.get_logger("proxy.relay")

# Codes that may appear in a close frame we send (RFC 6455 §7.4.1): 1005, 1006 and 1015 only describe a close.
_UNSENDABLE = {1005: 1000, 1006: 1014, 1015: 1014}
BAD_GATEWAY = 1014  # "the server was acting as a gateway and got an invalid response": the upstream vanished


def sendable(code: int | None, default: int) -> int:
    if code is None:
        return default
    if code in _UNSENDABLE:
        return _UNSENDABLE[code]
    if 1000 <= code <= 1015 or 3000 <= code <= 4999:
        return code
    return default


INVALID_UTF8 = "invalid UTF-8 in a text frame"
PAUSED_CHECK_SECONDS = 0.1


def is_utf8(data: bytes) -> bool:
    """RFC 6455 §8.1: a TEXT frame's payload is UTF-8. aiohttp does not check it with ``decode_text=False``, so we
    do; audio (base64) is ASCII and passes the ``isascii`` scan (~2 µs for 64 KiB) without a decode."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@dataclass(slots=True)
class RelayStats:
    frames_up: int = 0
    frames_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    resets: int = 0
    resets_timed_out: int = 0
    client_close_code: int | None = None
    upstream_close_code: int | None = None
    upstream_switches: int = 0


Upstream = ClientWebSocketResponse[bool]
Connect = Callable[[Dial], Awaitable[Upstream]]


class Spares:
    """The spare upstream of one client connection and the upstreams it left: dials and closes, nothing more.

    `on_open(ws)` is called with a spare that opened (the relay starts its reader), `on_failed()` when a dial
    failed. Tasks it starts are its own and are all ended by :meth:`aclose`."""

    def __init__(
        self,
        connect: Connect,
        dial: Dial,
        on_open: Callable[[Upstream], Awaitable[None]],
        on_failed: Callable[[str], Awaitable[None]],
    ) -> None:
        self.ws: Upstream | None = None
        self._connect = connect
        self._dial = dial
        self._on_open = on_open
        self._on_failed = on_failed
        self._tasks: set[asyncio.Task[object]] = set()
        self._closed = False

    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def dial(self) -> None:
        if not self._closed:  # a spare lost while the connection ends is not replaced
            self._spawn(self._dial_one(), "spare-dial")

    async def _dial_one(self) -> None:
        try:
            ws = await self._connect(self._dial)
        except UpstreamRefused as exc:
            await self._on_failed(f"refused with HTTP {exc.status}")
            return
        except UpstreamUnreachable as exc:
            await self._on_failed(exc.reason)
            return
        if self._closed:
            await ws.close(code=WSCloseCode.GOING_AWAY)
            return
        self.ws = ws
        await self._on_open(ws)

    def close_spare(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            self._spawn(ws.close(code=WSCloseCode.OK), "spare-close")

    def promote(self) -> Upstream:
        ws, self.ws = self.ws, None
        assert ws is not None
        return ws

    def retire(self, ws: Upstream, last: Awaitable[None]) -> None:
        """Send the old upstream what it still had coming, then close it with 1000."""

        async def retire() -> None:
            await last
            await ws.close(code=WSCloseCode.OK, message=b"session moved")

        self._spawn(retire(), "upstream-retire")

    async def aclose(self) -> None:
        self._closed = True
        self.close_spare()
        tasks = list(self._tasks)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Relay:
    def __init__(
        self,
        client: web.WebSocketResponse,
        upstream: ClientWebSocketResponse[bool],
        config: SessionConfig,
        metrics: Metrics | None = None,
        log: structlog.stdlib.BoundLogger | None = None,
        close_timeout: float = 5.0,
        client_transport: asyncio.BaseTransport | None = None,
        swap: SwapConfig | None = None,
        dial: Dial | None = None,
        connect: Connect | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.log: structlog.stdlib.BoundLogger = log or _log
        self.upstream = upstream
        # time.monotonic drives the core and our timer alike: uvloop's loop.time() moves in whole milliseconds and
        # stands still within an iteration, which would round every reset's duration to 0 ms.
        self.session = Session(config, clock=time.monotonic)
        self.stats = RelayStats()
        self._close_timeout = close_timeout
        self._up_lock = asyncio.Lock()
        self._down_lock = asyncio.Lock()
        self._deadline_changed = asyncio.Event()
        self._resumed = asyncio.Event()  # set while the core takes client frames (not paused)
        self._resumed.set()
        self._closing = False
        # While paused we read nothing from the client, so its going away is seen on the transport instead.
        self._client_transport = client_transport
        self._armed: float | None = None
        self._upstream_close: tuple[int | None, str] | None = None
        self._primary_ended = asyncio.Event()
        self._reader_fault: BaseException | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._held_before = 0  # held_total of the sessions the client left
        self.swapper: Swapper | None = None
        self.spares: Spares | None = None
        if swap is not None and dial is not None and connect is not None:
            self.swapper = Swapper(swap, ReplayRecord(dial), self.session, clock=time.monotonic)
            self.spares = Spares(connect, dial, self._spare_opened, self._spare_failed)

    async def run(self) -> None:
        """Relay until either side closes; then close the other with a code that says why, and clean up."""
        if self.metrics is not None:
            self.metrics.opened(self)
        client_pump = asyncio.create_task(self._client_pump(), name="client-pump")
        upstream_pump = asyncio.create_task(self._upstream_pump(), name="upstream-pump")
        timer = asyncio.create_task(self._timer(), name="reset-timer")
        try:
            if self.swapper is not None and self.swapper.pending:
                await self._flush()  # the first spare's dial
            done, _ = await asyncio.wait({client_pump, upstream_pump, timer}, return_when=asyncio.FIRST_COMPLETED)
            fault = _fault(done)
            self._closing = True
            self._resumed.set()  # a client pump paused by a reset reads on: the close is what it will find
            if fault is not None:
                await self._fail(fault)
            elif upstream_pump in done:
                await self._close_client()
            else:
                await self._close_upstream()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait({client_pump, upstream_pump}), 5.0)
            late = _fault({client_pump, upstream_pump} - done) if fault is None else None
            if late is not None:
                self.log.error("relay_fault", exc_info=late)
        finally:
            for task in (client_pump, upstream_pump, timer):
                task.cancel()
            await asyncio.gather(client_pump, upstream_pump, timer, return_exceptions=True)
            if not self.client.closed:
                await self.client.close(code=WSCloseCode.GOING_AWAY)
            if not self.upstream.closed:
                await self.upstream.close()
            if self.spares is not None:
                await self.spares.aclose()
            readers = list(self._readers)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if self.metrics is not None:
                self.metrics.closed(self)

    # --- pumps ------------------------------------------------------------------------------------

    async def _client_pump(self) -> None:
        stats = self.stats
        receive = self.client.receive
        while True:
            msg = await receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                data: Frame = msg.data
                if not is_utf8(msg.data):  # never passed on: the upstream would be sent an invalid frame
                    await self.client.close(code=WSCloseCode.INVALID_TEXT, message=INVALID_UTF8.encode())
                    return
            elif kind is WSMsgType.BINARY:
                data = Binary(msg.data)
            else:  # CLOSE, CLOSED, or ERROR (e.g. a frame over max_msg_size: aiohttp closes with 1009)
                return
            stats.frames_up += 1
            stats.bytes_up += len(data)
            self.session.client_frame(data)  # not cached: a swap puts another session here
            await self._flush()
            if self.session.paused and not await self._resumed_or_gone():
                return  # the client vanished while a reset held it back

    async def _resumed_or_gone(self) -> bool:
        """Flow control as a value: wait until the core takes client frames again (True), or the client's
        connection is gone meanwhile (False; looked at every PAUSED_CHECK_SECONDS, as no read would tell)."""
        while self.session.paused and not self._closing:
            self._resumed.clear()
            try:
                await asyncio.wait_for(self._resumed.wait(), PAUSED_CHECK_SECONDS)
            except TimeoutError:
                transport = self._client_transport
                if transport is not None and transport.is_closing():
                    return False
        return True

    async def _upstream_pump(self) -> None:
        """Ends when the client's upstream ends for good (no rollover), with a reader's fault if there was one."""
        self._start_reader(self.upstream)
        await self._primary_ended.wait()
        if self._reader_fault is not None:
            raise self._reader_fault

    def _start_reader(self, ws: Upstream) -> None:
        task = asyncio.create_task(self._upstream_reader(ws), name="upstream-reader")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _upstream_reader(self, ws: Upstream) -> None:
        """The one reader of an upstream socket, primary or spare; any fault ends the relay with 1011."""
        try:
            await self._follow(ws)
        except ConnectionError:  # a write failed: the network went away, as a read would have said
            if ws is self.upstream:
                self._primary_ended.set()
        except Exception as exc:  # a fault of ours: the relay fails loudly
            self._reader_fault = exc
            self._primary_ended.set()

    async def _follow(self, ws: Upstream) -> None:
        try:
            close = await self._read(ws)
        except ConnectionError:
            close = None
        if ws is self.upstream:
            if close is not None:
                self._upstream_close = close
            swapper = self.swapper
            code = close[0] if close is not None else None
            if swapper is None or not swapper.upstream_closed(code):
                self._primary_ended.set()
            else:
                await self._flush()  # a rollover: the client stays, held back until the switch
        elif self.spares is not None and ws is self.spares.ws:
            self.spares.ws = None
            await self._spare_failed("the spare's connection ended")

    async def _read(self, ws: Upstream) -> tuple[int | None, str] | None:
        """Read `ws` until it ends; its close code and reason if it sent a close frame."""
        stats = self.stats
        receive = ws.receive
        while True:
            msg = await receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                data: Frame = msg.data
                if not is_utf8(msg.data):  # the upstream broke the protocol: 1007 to it, 1014 to the client
                    await ws.close(code=WSCloseCode.INVALID_TEXT, message=INVALID_UTF8.encode())
                    return None, "upstream sent " + INVALID_UTF8
            elif kind is WSMsgType.BINARY:
                data = Binary(msg.data)
            else:
                # The upstream's own close: its code and reason go to the client.
                return (msg.data, msg.extra or "") if kind is WSMsgType.CLOSE else None
            if ws is self.upstream:
                stats.frames_down += 1
                stats.bytes_down += len(data)
                self.session.upstream_frame(data)
            elif self.spares is not None and ws is self.spares.ws:
                assert self.swapper is not None
                self.swapper.spare_frame(data)  # a spare's words are for us alone
            else:
                continue  # an upstream the client left: nothing of it reaches the client
            await self._flush()

    async def _spare_opened(self, ws: Upstream) -> None:
        assert self.swapper is not None
        self.swapper.spare_opened()
        self._start_reader(ws)
        await self._flush()

    async def _spare_failed(self, reason: str) -> None:
        assert self.swapper is not None
        self.log.info("spare_failed", reason=reason)
        self.swapper.spare_failed()
        await self._flush()

    def _act(self, actions: Sequence[Action]) -> None:
        """Carry out what the swap controller asked for; synchronous, so nothing is read in between."""
        swapper, spares = self.swapper, self.spares
        assert swapper is not None and spares is not None
        for action in actions:
            if action is Action.DIAL:
                spares.dial()
            elif action is Action.CLOSE_SPARE:
                spares.close_spare()
            elif action is Action.SWITCH:
                old_session, old = self.session, self.upstream
                self._held_before += old_session.held_total
                self.session = swapper.switch()
                self.upstream = spares.promote()
                self.stats.upstream_switches += 1
                spares.retire(old, self._send_locked(old, swapper.take_retired()))
            else:  # END: a rollover found no upstream; the old one's close reaches the client
                self._primary_ended.set()

    async def _send_locked(self, ws: Upstream, frames: list[Frame]) -> None:
        if frames:
            async with self._up_lock:
                await _send_all(ws, frames)

    def _deadline(self) -> float | None:
        return relay_deadline(self.session, self.swapper)

    async def _timer(self) -> None:
        while True:
            self._deadline_changed.clear()
            deadline = self._deadline()
            self._armed = deadline
            if deadline is None:
                await self._deadline_changed.wait()
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._deadline_changed.wait(), delay)
                continue
            self.session.handle_timeout()
            if self.swapper is not None:
                self.swapper.handle_timeout()
            await self._flush()

    async def _flush(self) -> None:
        swapper = self.swapper
        if swapper is not None:
            while swapper.actions:  # a switch asks for the next spare at once
                self._act(swapper.take_actions())
            if swapper.pending:
                await self._flush_swapper(swapper)
        session = self.session
        if self._deadline() != self._armed:
            self._deadline_changed.set()
        if not session.paused:
            self._resumed.set()
        if session.pending_upstream:
            async with self._up_lock:
                await _send_all(self.upstream, session.take_upstream())
        if session.pending_client:
            async with self._down_lock:
                await _send_all(self.client, session.take_client())
        if session.notices:
            self._note(session.take_notices())

    async def _flush_swapper(self, swapper: Swapper) -> None:
        spare = self.spares.ws if self.spares is not None else None
        to_spare = swapper.take_spare()
        if to_spare and spare is not None:
            await _send_all(spare, to_spare)  # only this relay writes to its spare, one flush at a time
        if swapper.notices:
            self._note(swapper.take_notices())
        to_client = swapper.take_client()
        if to_client:
            async with self._down_lock:
                await _send_all(self.client, to_client)

    @property
    def held_count(self) -> int:
        return self.session.held_count

    @property
    def held_total(self) -> int:
        return self._held_before + self.session.held_total

    def _note(self, notices: Sequence[Notice | SwapNotice]) -> None:
        self.log = note_notices(self.log, self.stats, self.metrics, notices)

    # --- closing ----------------------------------------------------------------------------------

    async def _fail(self, fault: BaseException) -> None:
        """A bug or fault of ours: say so loudly, and close both sides with 1011 (internal error)."""
        self.log.error("relay_fault", exc_info=fault)
        message = b"proxy internal error"
        async with self._locked(self._down_lock):
            if not self.client.closed:
                await self.client.close(code=WSCloseCode.INTERNAL_ERROR, message=message)
        async with self._locked(self._up_lock):
            if not self.upstream.closed:
                await self.upstream.close(code=WSCloseCode.INTERNAL_ERROR, message=message)

    async def _close_client(self) -> None:
        """The upstream closed: pass its code and reason on (1011 stays 1011), or 1014 if it just vanished."""
        # Without a close frame from the upstream (it vanished, or broke a limit), aiohttp's own code is not the
        # upstream's word: the client learns the gateway lost its upstream.
        code, reason = self._upstream_close or (None, "upstream connection lost")
        self.stats.upstream_close_code = code
        # Under the direction's lock: frames already taken for the client go out before the close frame.
        async with self._locked(self._down_lock):
            if not self.client.closed:
                await self.client.close(code=sendable(code, BAD_GATEWAY), message=reason.encode()[:123])

    async def _close_upstream(self) -> None:
        """The client closed (or broke a limit): tell the upstream with the client's code."""
        code = self.client.close_code
        self.stats.client_close_code = code
        # A client that vanished without a close frame (aiohttp says 1006) is "going away" as far as the upstream
        # is concerned; mapped like an upstream's 1006 it would become 1014, blaming the upstream.
        vanished = code is None or code == WSCloseCode.ABNORMAL_CLOSURE
        async with self._locked(self._up_lock):
            await self.upstream.close(code=1001 if vanished else sendable(code, 1001), message=b"client closed")

    @contextlib.asynccontextmanager
    async def _locked(self, lock: asyncio.Lock) -> AsyncIterator[None]:
        """The lock, unless a stuck writer holds it past the close timeout: a close must not wait forever."""
        try:
            await asyncio.wait_for(lock.acquire(), self._close_timeout)
        except TimeoutError:
            yield
            return
        try:
            yield
        finally:
            lock.release()


def relay_deadline(session: Session, swapper: Swapper | None) -> float | None:
    """When a relay's timer must fire (both engines): the earlier of the session's deadline and the swap
    controller's, or None."""
    deadline = session.deadline
    other = swapper.deadline if swapper is not None else None
    if deadline is None or (other is not None and other < deadline):
        return other
    return deadline


def _fault(tasks: set[asyncio.Task[None]]) -> BaseException | None:
    """The first exception among finished tasks that is a fault of ours, not the network going away."""
    for task in tasks:
        if task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, ConnectionError):
                return exc
    return None


async def _send_all(ws: web.WebSocketResponse[bool] | ClientWebSocketResponse[bool], frames: Sequence[Frame]) -> None:
    for frame in frames:
        if isinstance(frame, Binary):
            await ws.send_frame(frame, WSMsgType.BINARY)
        elif isinstance(frame, str):
            await ws.send_frame(frame.encode(), WSMsgType.TEXT)
        else:
            await ws.send_frame(frame, WSMsgType.TEXT)


def note_notices(
    log: structlog.stdlib.BoundLogger,
    stats: RelayStats,
    metrics: Metrics | None,
    notices: Sequence[Notice | SwapNotice],
) -> structlog.stdlib.BoundLogger:
    """Logs and metrics for what the core reported (both engines); rare events, off the per-frame path. Returns
    the connection's logger, bound to the upstream session's id once it is known."""
    for notice in notices:
        if isinstance(notice, UpstreamSession):
            log = log.bind(upstream_session=notice.session_id)
        elif isinstance(notice, Usage):
            if metrics is not None:
                metrics.tokens.labels("input").inc(notice.input_tokens)
                metrics.tokens.labels("cached").inc(notice.cached_tokens)
                metrics.tokens.labels("output").inc(notice.output_tokens)
        elif isinstance(notice, ResetFinished):
            stats.resets += 1
            outcome = "partial" if notice.outcome == "completed" and notice.failed else notice.outcome
            if notice.outcome == "timed_out":
                stats.resets_timed_out += 1
            if metrics is not None:
                metrics.resets.labels(outcome).inc()
                metrics.reset_seconds.observe(notice.duration_ms / 1000.0)
                metrics.items_deleted.inc(notice.deleted)
            log.info(
                "reset",
                outcome=outcome,
                duration_ms=round(notice.duration_ms, 3),
                items_deleted=notice.deleted,
                items_failed=notice.failed,
                response_cancelled=notice.cancelled_response,
            )
        elif isinstance(notice, TaskEnded):
            if metrics is not None:
                metrics.task_input_tokens.observe(notice.input_tokens)
            log.info(
                "task_usage",
                responses=notice.responses,
                input_tokens=notice.input_tokens,
                output_tokens=notice.output_tokens,
                auto=notice.auto,
            )
        elif isinstance(notice, Switched):
            log.info(
                "upstream_switched",
                reason=notice.reason,
                old_upstream_session=notice.old_session_id,
                items_left=notice.items,
            )
        elif isinstance(notice, LateResponse):
            log.info("late_response_cancelled", response_id=notice.response_id)
        elif isinstance(notice, EventsRejected):
            if metrics is not None:
                metrics.events_rejected.inc(notice.count)
            log.warning("events_rejected", count=notice.count, reason="held event limit")
    return log
