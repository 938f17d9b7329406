"""The relay on asyncio Protocols: bytes in, frames parsed by their headers, bytes out; one write per read.

    client socket ─▶ _ClientSide.data_received ─▶ FrameReader(masked) ─▶ Session.client_frame ─┐
                                                                                              ▼
    upstream socket ◀── one writelines per read ◀── raw frames (their own mask) / new frames ◀┘
    (and the same the other way, through FrameReader(unmasked) and Session.upstream_frame)

The same core session as relay.py, fed the same way (a message's payload in, frames out), so a feature of the
core works in both engines. What differs is the I/O: no message objects, no task per message, no lock; a frame
the session forwards as it came (the same object back) leaves as the bytes it arrived in, header and client
mask included, so only a frame the session made or changed is encoded.

Rules:
- One write per direction per read: what a read (or a timer) produced is gathered and written with one
  ``writelines``, after everything that read brought was handled.
- Flow control: a side whose transport says ``pause_writing`` stops the other side's reading until
  ``resume_writing``. While the core is paused (a reset runs) no more client frames go into it: the frames
  already read wait here, in order, and are fed once it resumes; past ``STASH_PAUSE_BYTES`` of them, the
  client's socket is not read any more and TCP pushes back. (Below that the socket is still read, so a client
  that vanishes mid-reset is seen at once.) A client that does not read what it is sent is not read either
  once ``CLIENT_BUFFER_CAP`` waits for it, and is closed (1008) after two heartbeats of reading none of it.
- The fast path: a read's plain frames that the session passes (`Session.client_passes`/`upstream_passes`,
  asked by the frame reader) leave as one span of the read's bytes, before anything else of that read.
- Fragmented messages are put together before the core sees them (it decides on whole messages); one the core
  forwards leaves as its fragments did. Pings are answered here, pongs dropped (as aiohttp's autoping did).
- UTF-8: the proxy enforces it, as relay.py does, since it has each text payload in hand anyway: an invalid
  text frame from the client closes it with 1007 (the upstream then hears 1007 from us); from the upstream, 1007
  to it and 1014 to the client.
- Close codes: as relay.py's (see `sendable`): an upstream's close passes on (its code and reason), an upstream
  that vanished is 1014 to the client, a client that vanished is 1001 to the upstream, a fault of ours is
  logged with its traceback and closes both with 1011. A close frame we send is followed by the transport's
  close once the peer's close arrives, or by an abort after ``close_timeout``.
- Swap and rollover (with a swap config, proxy/core/swap.py, as relay.py): a spare upstream is a second socket
  with its own frame reader; its frames go to the controller, never to the client, and its write pauses stop
  no one's reading. The controller's actions are carried out right after the core step that asked for them,
  between two frames of a read: at a switch the spare becomes the client's upstream (and `session` another
  core session), the old one is sent what it still had coming and a close 1000, and the rest of its read, like
  all it sends later, reaches nobody. Spare dials are tasks of the relay's, cancelled when it closes; the relay
  is done once every socket it opened, spares and retired upstreams included, is gone.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

import structlog
from aiohttp import web
from aiohttp.web_request import BaseRequest
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.http11 import Response
from websockets.speedups import apply_mask as c_apply_mask
from websockets.streams import StreamReader
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from proxy.core.errors import UpstreamRefused, UpstreamUnreachable
from proxy.core.frames import Frame as WireFrame
from proxy.core.frames import FrameReader, FrameWriter, MaskFunction, Opcode, ReaderState
from proxy.core.replay import Dial, ReplayRecord
from proxy.core.session import Binary, Frame, Session, SessionConfig
from proxy.core.swap import Action, SwapConfig, Swapper
from proxy.metrics import Metrics
from proxy.relay import BAD_GATEWAY, INVALID_UTF8, RelayStats, is_utf8, note_notices, relay_deadline, sendable
from proxy.upstream import MAX_REFUSAL_BODY, REFUSAL_HEADERS

_log = structlog.get_logger("proxy.wire")

STASH_PAUSE_BYTES = 256 * 1024  # client bytes read while the core is paused, past which its socket is not read
HEARTBEAT_SECONDS = 20.0  # an upstream silent this long is pinged; silent for as long again, it is gone
# Bytes waiting for a client that does not read, past which the client is not read either (what it sends may be
# answered to it: pongs, errors); a client that then reads none of it for two heartbeats is dropped.
CLIENT_BUFFER_CAP = 1024 * 1024
_INTERNAL = "proxy internal error"
_CLIENT_CLOSED = "client closed"
_UPSTREAM_LOST = "upstream connection lost"

# The C XOR: the hot path's only per-byte work. Its stub says the mask is bytes; any buffer works (the fast path
# passes a memoryview of the header: tests/core/test_frames.py checks it).
_mask = cast(MaskFunction, c_apply_mask)


def _encode(writer: FrameWriter, frame: Frame) -> bytes:
    if isinstance(frame, Binary):
        return writer.frame(Opcode.BINARY, frame)
    return writer.frame(Opcode.TEXT, frame.encode() if isinstance(frame, str) else frame)


class _Side:
    """One connection's socket, one direction's reader and writer, and its closing state."""

    __slots__ = (
        "close_timer",
        "frag_payload",
        "frag_raw",
        "got_close",
        "lost",
        "out",
        "reader",
        "sent_close",
        "transport",
        "write_paused",
        "writer",
    )

    def __init__(self, *, masked_in: bool, max_message_bytes: int) -> None:
        self.reader = FrameReader(masked=masked_in, max_message_bytes=max_message_bytes, apply_mask=_mask)
        self.writer = FrameWriter(masked=not masked_in, apply_mask=_mask)
        self.transport: asyncio.Transport | None = None
        self.out: list[Any] = []  # buffers for this side's next writelines
        self.frag_raw: list[bytes] = []  # a fragmented message in progress: its frames, its payload parts
        self.frag_payload: list[bytes] = []
        self.write_paused = False
        self.sent_close = False
        self.got_close = False
        self.lost = False
        self.close_timer: asyncio.TimerHandle | None = None

    def flush(self) -> None:
        if self.out:
            out, self.out = self.out, []
            if self.transport is not None and not self.lost:
                if len(out) == 1:  # the common real-time case: skip writelines' list handling
                    self.transport.write(out[0])
                else:
                    self.transport.writelines(out)


class _ClientSide(asyncio.Protocol):
    """The client's transport, taken over from aiohttp after the upgrade."""

    __slots__ = ("http", "relay")

    def __init__(self, relay: WireRelay, http: asyncio.BaseProtocol | None) -> None:
        self.relay = relay
        self.http = http  # aiohttp's protocol: told when the connection ends, so its server forgets it

    def data_received(self, data: bytes) -> None:
        self.relay.client_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.client_lost()
        http, self.http = self.http, None
        if http is not None:
            http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.relay.client_write_paused(True)

    def resume_writing(self) -> None:
        self.relay.client_write_paused(False)


class _Handshake:
    """The upstream's HTTP answer being read (websockets' parser); dropped once read, so a session keeps none of it."""

    __slots__ = ("done", "parser", "stream")

    def __init__(self) -> None:
        self.done: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.stream = StreamReader()
        self.parser = Response.parse(self.stream.read_line, self.stream.read_exact, self.stream.read_to_eof)
        next(self.parser)

    def feed(self, data: bytes) -> bytes | None:
        """Feed bytes (b"" for EOF); once the response is complete, the bytes after it (else None)."""
        if data:
            self.stream.feed_data(data)
        else:
            self.stream.feed_eof()  # a refusal without Content-Length ends at EOF
        try:
            next(self.parser)
        except StopIteration as stop:
            self.done.set_result(stop.value)
            return bytes(self.stream.buffer)  # frames that came with the response
        except Exception as exc:  # any parse error is a failed handshake, said in one line
            self.done.set_exception(UpstreamUnreachable(f"upstream handshake failed: {exc}"))
        return None


class _Sink(Protocol):
    """Where an upstream socket's events go: the relay itself for the client's upstream, an `_Other` for the rest."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_lost(self) -> None: ...

    def upstream_write_paused(self, paused: bool) -> None: ...


class _UpstreamSide(asyncio.Protocol):
    """The upstream's transport: the HTTP handshake first (websockets' parser), then frames for the relay."""

    __slots__ = ("early", "handshake", "lost", "relay", "transport")

    def __init__(self) -> None:
        self.handshake: _Handshake | None = _Handshake()
        self.relay: _Sink | None = None
        self.transport: asyncio.Transport | None = None
        self.early = bytearray()  # bytes after the handshake, before the relay is attached
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.upstream_data(data)
        else:
            self._received(data)

    def _received(self, data: bytes) -> None:
        handshake = self.handshake
        if handshake is None or handshake.done.done():
            self.early += data
            return
        rest = handshake.feed(data)
        if rest:
            self.early += rest

    def eof_received(self) -> bool:
        handshake = self.handshake
        if handshake is not None and not handshake.done.done():
            handshake.feed(b"")
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        handshake = self.handshake
        if handshake is not None and not handshake.done.done():
            handshake.feed(b"")
            if not handshake.done.done():
                handshake.done.set_exception(UpstreamUnreachable("upstream closed the connection during the handshake"))
        if self.relay is not None:
            self.relay.upstream_lost()

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.upstream_write_paused(False)


class Upstream:
    """A dialed upstream whose handshake succeeded: its transport, the selected subprotocol, bytes read early."""

    def __init__(self, side: _UpstreamSide, subprotocol: str | None) -> None:
        self.side = side
        self.protocol = subprotocol

    def abort(self) -> None:
        if self.side.transport is not None:
            self.side.transport.abort()


async def dial(
    url: str,
    headers: Sequence[tuple[str, str]],
    subprotocols: Sequence[str],
    *,
    connect_timeout: float,
) -> Upstream:
    """Open the upstream WebSocket (no extension offered); raises UpstreamRefused or UpstreamUnreachable."""
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise UpstreamUnreachable(f"upstream URL is invalid: {exc}") from exc
    handshake = ClientProtocol(uri, subprotocols=[Subprotocol(p) for p in subprotocols] or None)
    loop = asyncio.get_running_loop()
    side: _UpstreamSide | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            _, side = await loop.create_connection(
                _UpstreamSide,
                uri.host,
                uri.port,
                ssl=ssl.create_default_context() if uri.secure else None,
            )
            request = handshake.connect()
            for name, value in headers:
                request.headers[name] = value
            assert side.transport is not None
            side.transport.write(request.serialize())
            assert side.handshake is not None
            response = await side.handshake.done
            side.handshake = None
    except TimeoutError as exc:
        _abort(side)
        raise UpstreamUnreachable(f"upstream did not answer within {connect_timeout:g} s") from exc
    except UpstreamUnreachable:
        _abort(side)
        raise
    except OSError as exc:
        _abort(side)
        raise UpstreamUnreachable(f"upstream unreachable: {exc.strerror or exc}") from exc
    except BaseException:  # cancelled (a spare's dial when its relay ends): the socket must not outlive it
        _abort(side)
        raise
    if response.status_code != 101:
        _abort(side)
        keep = [(k, v) for k, v in response.headers.raw_items() if k.lower() in REFUSAL_HEADERS]
        raise UpstreamRefused(response.status_code, keep, bytes(response.body[:MAX_REFUSAL_BODY]))
    try:
        handshake.process_response(response)
    except InvalidHandshake as exc:
        _abort(side)
        raise UpstreamUnreachable(f"upstream handshake failed: {exc}") from exc
    if handshake.extensions:  # none was offered: a server that still picks one breaks the protocol
        _abort(side)
        raise UpstreamUnreachable("upstream handshake failed: it chose an extension none was offered")
    return Upstream(side, handshake.subprotocol)


def _abort(side: _UpstreamSide | None) -> None:
    if side is not None and side.transport is not None:
        side.transport.abort()


class _Handover(web.WebSocketResponse):
    """aiohttp's handshake (its checks, its 101), then nothing of aiohttp's WebSocket: the relay takes the socket.

    Not installing aiohttp's frame reader leaves bytes the client sent after its request in the protocol's
    message tail, where `take_over` finds them; and the end of the handler must not send a close frame of aiohttp's
    on a socket that is no longer aiohttp's."""

    def _post_start(self, request: BaseRequest, protocol: str | None, writer: Any) -> None:
        self._ws_protocol = protocol
        self._writer = writer
        request.protocol.keep_alive(False)

    async def write_eof(self, data: bytes = b"") -> None:
        self._eof_sent = True


async def upgrade(request: web.Request, subprotocol: str | None) -> tuple[web.StreamResponse, asyncio.Transport, bytes]:
    """Answer the client's upgrade with aiohttp's handshake; the response to return, the transport, early bytes."""
    ws = _Handover(protocols=(subprotocol,) if subprotocol else (), compress=False)
    await ws.prepare(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away during the upgrade")
    http = request.protocol
    # What the client sent after its request (aiohttp keeps it for the frame reader it did not get).
    tail = bytes(http._message_tail)
    http._message_tail = b""
    return ws, transport, tail


Connect = Callable[[Dial], Awaitable[Upstream]]


class _Other:
    """An upstream socket that is not the client's upstream: the spare, or one the client left (retired).

    Its events go to the relay's spare handling while it is the spare, and only to its own close once retired;
    its write pauses count for nothing of the client's (they are noted, for the moment it becomes the upstream)."""

    __slots__ = ("heard", "pinged", "protocol", "relay", "side")

    def __init__(self, relay: WireRelay, side: _Side, protocol: _UpstreamSide) -> None:
        self.relay = relay
        self.side = side
        self.protocol = protocol
        self.heard = True  # the spare's heartbeat, as the client's upstream's (`WireRelay._on_beat`)
        self.pinged = False

    def upstream_data(self, data: bytes) -> None:
        self.relay.other_data(self, data)

    def upstream_lost(self) -> None:
        self.relay.other_lost(self)

    def upstream_write_paused(self, paused: bool) -> None:
        self.side.write_paused = paused


class WireRelay:
    """One client connection and its upstream, relayed frame by frame through a core Session.

    Given a swap config, a dial and a way to dial, it also drives a swap controller (proxy/core/swap.py), as
    relay.py does: a warm spare upstream, reset by swap, rollover before the session cap. The client's upstream
    is then whichever socket the controller last switched to; the others are `_Other`s."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        max_message_bytes: int,
        metrics: Metrics | None = None,
        log: structlog.stdlib.BoundLogger | None = None,
        close_timeout: float = 5.0,
        heartbeat: float | None = None,
        swap: SwapConfig | None = None,
        dial: Dial | None = None,
        connect: Connect | None = None,
    ) -> None:
        self.session = Session(config, clock=time.monotonic)  # not cached across a switch: a swap puts another here
        self.stats = RelayStats()
        self.metrics = metrics
        self.log: structlog.stdlib.BoundLogger = log or _log
        self._loop = asyncio.get_running_loop()
        self._close_timeout = close_timeout
        self._heartbeat = HEARTBEAT_SECONDS if heartbeat is None else heartbeat
        self.client = _Side(masked_in=True, max_message_bytes=max_message_bytes)
        self.upstream = _Side(masked_in=False, max_message_bytes=max_message_bytes)
        self._stash: deque[WireFrame] = deque()  # client frames read while the core is paused, in order
        self._stash_bytes = 0
        self._client_reading = True
        self._upstream_reading = True
        self._client_swamped = False  # more than CLIENT_BUFFER_CAP waits for the client: it is not read
        self._client_stuck: int | None = None  # what waited for it at the last heartbeat, while swamped
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._upstream_heard = True
        self._pinged = False
        self._closing = False
        self._done = self._loop.create_future()
        self._max_message_bytes = max_message_bytes
        self._upstream_protocol: _UpstreamSide | None = None  # the client's upstream's, relinked when it is left
        self.swapper: Swapper | None = None
        self._connect = connect
        self._spare: _Other | None = None  # the spare's socket once its dial succeeded
        self._others: set[_Other] = set()  # upstream sockets not the client's, until each is gone
        self._dials: set[asyncio.Task[None]] = set()  # spare dials in flight: ended with the relay
        self._upstream_close: tuple[int | None, str] = (None, _UPSTREAM_LOST)  # a rollover's, should it find none
        self._held_before = 0  # held_total of the sessions the client left
        if swap is not None and dial is not None and connect is not None:
            self.swapper = Swapper(swap, ReplayRecord(dial), self.session, clock=time.monotonic)
            # The one per-frame cost of swapping: the controller is looked at after each core step. A relay
            # without a swap config keeps the plain method, and pays nothing.
            self._after_core = self._after_core_swapping  # type: ignore[method-assign]

    # --- start, end -------------------------------------------------------------------------------

    def start(self, client: asyncio.Transport, client_tail: bytes, http: asyncio.BaseProtocol, up: Upstream) -> None:
        """Take both transports over and feed what each side sent early; nothing awaits in here."""
        if self.metrics is not None:
            self.metrics.opened(self)
        self.client.transport = client
        client.set_protocol(_ClientSide(self, http))
        self.upstream.transport = up.side.transport
        up.side.relay = self
        self._upstream_protocol = up.side
        early, up.side.early = bytes(up.side.early), bytearray()
        self._beat = self._loop.call_later(self._heartbeat, self._on_beat)
        client.resume_reading()  # aiohttp may have paused it while it queued the tail
        if client_tail:
            self.client_data(client_tail)
        if early:
            self.upstream_data(early)
        if up.side.lost:
            self.upstream_lost()
        if self.swapper is not None:
            self._guard(self._swap_step)  # the expiry warning's timer, and the first spare's dial under "swap"

    async def run(self) -> None:
        """Wait until both sides are closed; a cancelled wait (server shutdown) closes both with 1001 first."""
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._close_both(1001, "proxy shutting down", 1001, "proxy shutting down")
            raise

    async def close(self, *, code: int = 1001, message: bytes = b"") -> bool:
        """Close both sides (the server's shutdown): the client hears `code`, the upstream 1001."""
        self._guard(self._close_both, code, message.decode(errors="replace"), 1001, "proxy shutting down")
        await asyncio.shield(self._done)
        return True

    @property
    def closed(self) -> bool:
        return self._done.done()

    @property
    def held_count(self) -> int:
        return self.session.held_count

    @property
    def held_total(self) -> int:
        return self._held_before + self.session.held_total

    @property
    def client_reading_paused(self) -> bool:
        return not self._client_reading

    @property
    def upstream_reading_paused(self) -> bool:
        return not self._upstream_reading

    @property
    def client_buffered(self) -> int:
        """Client bytes held here: read but not yet fed to the core, plus a frame split across reads."""
        return self._stash_bytes + self.client.reader.buffered

    @property
    def upstream_buffered(self) -> int:
        return self.upstream.reader.buffered

    def _finish_if_done(self) -> None:
        if self._others or self._dials:
            return  # a spare, a socket the client left, or a dial: the relay ends with the last of them
        if self.client.lost and self.upstream.lost and not self._done.done():
            for handle in (self._timer, self._beat, self.client.close_timer, self.upstream.close_timer):
                if handle is not None:
                    handle.cancel()
            self._stash.clear()
            self._stash_bytes = 0
            if self.metrics is not None:
                self.metrics.closed(self)
            self._done.set_result(None)

    # --- reads --------------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        try:
            self._client_read(data)
        except Exception as exc:  # a fault of ours: said loudly, never swallowed
            self._fault(exc)
        if self.upstream.out:
            self.upstream.flush()
        if self.client.out:
            self.client.flush()
            if self.client.write_paused:
                self._check_client_buffer()

    def upstream_data(self, data: bytes) -> None:
        self._upstream_heard = True
        try:
            self._upstream_read(data)
        except Exception as exc:
            self._fault(exc)
        if self.client.out:
            self.client.flush()
        if self.upstream.out:
            self.upstream.flush()

    def _guard(self, step: Any, *args: Any) -> None:
        """Run one step of ours; a fault in it is logged with its traceback and closes both sides with 1011."""
        try:
            step(*args)
        except Exception as exc:  # a fault of ours: said loudly, never swallowed
            self._fault(exc)
        self._flush()

    def _fault(self, exc: Exception) -> None:
        """A bug or fault of ours: logged with its traceback, and both sides closed with 1011 (internal error)."""
        self.log.error("relay_fault", exc_info=exc)
        self._close_both(1011, _INTERNAL, 1011, _INTERNAL)

    def _client_read(self, data: bytes) -> None:
        side = self.client
        reader = side.reader
        # The fast path only while nothing waits to be fed first: stashed frames go to the core before these.
        frames = reader.receive(data, None if self._stash or self._closing else self.session.client_passes)
        if reader.passed:
            self.stats.frames_up += reader.passed
            self.stats.bytes_up += reader.passed_bytes
            if len(frames) == 1 and reader.state is ReaderState.OPEN:  # the common case: all of it passed on
                self.upstream.out.append(frames[0])
                return
        if self._closing:
            self._closes_only(side, frames)
        elif self._stash or self.session.paused:
            # No fast path here (`client_passes` refuses while paused): every one is a Frame.
            self._stash.extend(cast(list[WireFrame], frames))
            self._stash_bytes += len(data)
        else:
            self._feed_client(frames, 0, len(data))
        if reader.state is ReaderState.FAILED and not self._closing:
            failure = reader.failure
            assert failure is not None
            self.stats.client_close_code = failure.code
            # A failed stream is read no more (RFC 6455 7.1.7), so its close frame would never be seen: the
            # connection ends once our close frame is written, not after close_timeout.
            side.got_close = True
            self._close_both(failure.code, failure.reason, failure.code, _CLIENT_CLOSED)
        if self._stash_bytes > STASH_PAUSE_BYTES:
            self._update_reading()

    def _feed_client(self, frames: Sequence[WireFrame | memoryview], i: int, nbytes: int) -> None:
        """Feed client frames from `i` while the core takes them; stash the rest once it pauses. A memoryview is
        frames the core passed on already (the fast path: they only ever come first, before any Frame)."""
        n = len(frames)
        while i < n:
            frame = frames[i]
            i += 1
            if type(frame) is memoryview:
                self.upstream.out.append(frame)
                continue
            assert isinstance(frame, WireFrame)
            self._client_frame(frame)
            if self._closing:
                self._closes_only(self.client, frames[i:])  # the client's close frame may be right behind
                return
            if self.session.paused and i < n:  # self.session: a frame may have switched it
                self._stash.extend(cast(Sequence[WireFrame], frames[i:]))  # after a Frame: Frames only
                self._stash_bytes += nbytes  # what keeps those frames alive: the reads they point into
                return

    def _client_frame(self, frame: WireFrame) -> None:
        message = self._message(self.client, frame)
        if message is None:
            return
        data, raws = message
        stats = self.stats
        stats.frames_up += 1
        stats.bytes_up += len(data)
        session = self.session
        session.client_frame(data)
        if session.pending_upstream:
            self._take(self.upstream, session.take_upstream(), data, raws)
        if session.pending_client:
            self._take(self.client, session.take_client(), None, ())
        self._after_core()

    def _upstream_read(self, data: bytes) -> None:
        side = self.upstream
        reader = side.reader
        frames = reader.receive(data, None if self._closing else self.session.upstream_passes)
        if reader.passed:
            self.stats.frames_down += reader.passed
            self.stats.bytes_down += reader.passed_bytes
            if len(frames) == 1 and reader.state is ReaderState.OPEN and not self._stash:
                self.client.out.append(frames[0])
                return
        if self._closing:
            self._closes_only(side, frames)
        else:
            for i, frame in enumerate(frames):
                if type(frame) is memoryview:
                    self.client.out.append(frame)
                    continue
                assert isinstance(frame, WireFrame)
                self._upstream_frame(frame)
                if self._closing:
                    self._closes_only(side, frames[i + 1 :])
                    break
                if side is not self.upstream:  # a switch: the rest of this read is for nobody
                    break
        if reader.state is ReaderState.FAILED and not self._closing and side is self.upstream:
            failure = reader.failure
            assert failure is not None
            self.log.info("upstream_protocol_error", code=failure.code, reason=failure.reason)
            reason = "upstream broke the protocol: " + failure.reason
            side.got_close = True  # as a failed client stream: read no more, so closed once our close is written
            self._close_both(BAD_GATEWAY, reason, failure.code, failure.reason)
        if self._stash:
            self._resume_client_feed()

    def _upstream_frame(self, frame: WireFrame) -> None:
        message = self._message(self.upstream, frame)
        if message is None:
            return
        data, raws = message
        stats = self.stats
        stats.frames_down += 1
        stats.bytes_down += len(data)
        session = self.session
        session.upstream_frame(data)
        if session.pending_client:
            self._take(self.client, session.take_client(), data, raws)
        if session.pending_upstream:
            self._take(self.upstream, session.take_upstream(), None, ())
        self._after_core()

    def _closes_only(self, side: _Side, frames: Sequence[WireFrame | memoryview]) -> None:
        """Closing: data frames are dropped, but the peer's close frame completes the close handshake."""
        for frame in frames:
            if type(frame) is not memoryview and frame.opcode is Opcode.CLOSE:
                self._control(side, frame)

    def _message(self, side: _Side, frame: WireFrame) -> tuple[Frame, Sequence[Any]] | None:
        """A whole message for the core (bytes for text, Binary) and the wire bytes it came in; None for a control
        frame (handled here), a fragment of a message still open, or text that is not UTF-8 (closed here)."""
        opcode = frame.opcode
        if opcode >= Opcode.CLOSE:
            self._control(side, frame)
            return None
        raws: Sequence[Any]
        if not frame.fin or opcode is Opcode.CONT:
            side.frag_raw.append(bytes(frame.raw))
            side.frag_payload.append(bytes(frame.payload()))
            if not frame.fin:
                return None
            payload = b"".join(side.frag_payload)
            raws = side.frag_raw
            side.frag_raw, side.frag_payload = [], []
        else:
            unmasked = frame.payload()  # new bytes for a client's (masked) frame, a view of an upstream's
            payload = unmasked if isinstance(unmasked, bytes) else bytes(unmasked)
            raws = (frame.raw,)
        if frame.message_opcode is not Opcode.TEXT:
            return Binary(payload), raws
        if is_utf8(payload):
            return payload, raws
        # Never passed on: the other side would be sent an invalid frame.
        if side is self.client:
            self.stats.client_close_code = 1007
            self._close_both(1007, INVALID_UTF8, 1007, _CLIENT_CLOSED)
        else:  # the upstream broke the protocol: 1007 to it, 1014 to the client
            self._close_both(BAD_GATEWAY, "upstream sent " + INVALID_UTF8, 1007, INVALID_UTF8)
        return None

    def _control(self, side: _Side, frame: WireFrame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PING:
            side.out.append(side.writer.frame(Opcode.PONG, frame.payload()))
        elif opcode is Opcode.CLOSE:
            side.got_close = True
            close = frame.close
            assert close is not None
            if side is self.client:
                self._client_closed(close.code)
            else:
                self._upstream_closed(close.code, close.reason)
        # A pong: the upstream answered our heartbeat (any bytes count), or a client's unsolicited one.

    # --- what the core hands back ----------------------------------------------------------------------

    @staticmethod
    def _take(side: _Side, frames: list[Frame], data: Frame | None, raws: Sequence[Any]) -> None:
        """Queue the core's frames for `side`: `data` (the message just fed, when the core passed it on as it
        came) as its own wire bytes, header and mask included; any other frame encoded anew."""
        out = side.out
        writer = side.writer
        for frame in frames:
            if frame is data:
                out.extend(raws)
            else:
                out.append(_encode(writer, frame))

    def _after_core(self) -> None:
        session = self.session
        if session.notices:
            self.log = note_notices(self.log, self.stats, self.metrics, session.take_notices())
        if session.deadline != self._armed:
            self._arm()

    def _drain_core(self) -> None:
        session = self.session
        if session.pending_upstream:
            self._take(self.upstream, session.take_upstream(), None, ())
        if session.pending_client:
            self._take(self.client, session.take_client(), None, ())
        self._after_core()

    def _resume_client_feed(self) -> None:
        """Feed the stashed client frames while the core takes them (after it resumed)."""
        stash = self._stash
        while stash and not self.session.paused and not self._closing:  # a frame may switch the session
            self._client_frame(stash.popleft())
        if not stash:
            self._stash_bytes = 0
        self._update_reading()

    # --- the swap controller (proxy/core/swap.py): spares, switches, rollover --------------------------

    def _after_core_swapping(self) -> None:
        """`_after_core` with a swap controller: its actions are carried out at once, before the next frame is
        read, so nothing of the old upstream follows a switch."""
        WireRelay._after_core(self)
        swapper = self.swapper
        assert swapper is not None
        if swapper.pending:
            self._swap_step()

    def _swap_step(self) -> None:
        """Carry out the controller's actions, then send what it has for the spare and the client."""
        swapper = self.swapper
        assert swapper is not None
        while swapper.actions:  # a switch asks for the next spare at once
            for action in swapper.take_actions():
                self._act(action)
        spare = self._spare
        to_spare = swapper.take_spare()
        if to_spare and spare is not None:
            self._take(spare.side, list(to_spare), None, ())
            spare.side.flush()
        if swapper.notices:
            self.log = note_notices(self.log, self.stats, self.metrics, swapper.take_notices())
        to_client = swapper.take_client()
        if to_client:
            self._take(self.client, to_client, None, ())
        self._arm()  # the controller's deadline may have moved (a spare opened or replaced, a warning sent)

    def _act(self, action: Action) -> None:
        if action is Action.DIAL:
            self._dial_spare()
        elif action is Action.CLOSE_SPARE:
            spare, self._spare = self._spare, None
            if spare is not None:  # None: its connection already ended
                self._send_close(spare.side, 1000, "")
        elif action is Action.SWITCH:
            self._switch()
        else:  # END: a rollover found no upstream; the old one's close reaches the client after all
            code, reason = self._upstream_close
            self.stats.upstream_close_code = code
            self._close_both(sendable(code, BAD_GATEWAY), reason, 1000, "")

    def _switch(self) -> None:
        """The spare becomes the client's upstream; the old one is sent what it still had coming, then 1000."""
        swapper, spare, old, old_protocol = self.swapper, self._spare, self.upstream, self._upstream_protocol
        assert swapper is not None and spare is not None and old_protocol is not None
        self._spare = None
        self._others.discard(spare)
        self._held_before += self.session.held_total
        self.session = swapper.switch()
        self.stats.upstream_switches += 1
        self._retire(old, old_protocol)
        retired = swapper.take_retired()
        if not old.sent_close:  # (a rollover's upstream had its close answered already)
            self._take(old, retired, None, ())
            self._send_close(old, 1000, "session moved")
        self.upstream = spare.side
        self._upstream_protocol = spare.protocol
        spare.protocol.relay = self
        self._upstream_heard = True
        self._pinged = False
        self._upstream_reading = True  # a spare is always read; paused below if the client's writes are
        self._update_reading()
        self._take(self.client, swapper.take_client(), None, ())  # the old session's last words, then completed
        self._drain_core()  # the new session's: the events held back, fed to it by the switch
        self._resume_client_feed()  # then the client frames read meanwhile (none when a client frame switched)

    def _retire(self, side: _Side, protocol: _UpstreamSide) -> None:
        """`side` is no longer the client's upstream: its frames reach nobody, and its end is its own."""
        if protocol.relay is not self:
            return  # retired already (a rollover's upstream, which closed first)
        other = _Other(self, side, protocol)
        protocol.relay = other
        if not side.lost:
            self._others.add(other)
            if not self._upstream_reading and side.transport is not None:
                side.transport.resume_reading()  # so that its answer to our close is read

    def _rolled_over(self, code: int | None, reason: str) -> bool:
        """The client's upstream ended: True when the client stays, held back, until the switch to a fresh one."""
        swapper = self.swapper
        if swapper is None or not swapper.upstream_closed(code):
            return False
        self._upstream_close = (code, reason)
        side = self.upstream
        self._send_close(side, code if code is not None and code != 1005 else 1000, "")  # none if it vanished
        assert self._upstream_protocol is not None
        self._retire(side, self._upstream_protocol)
        self._swap_step()
        return True

    def _dial_spare(self) -> None:
        if self._closing:
            return  # a spare lost while the connection ends is not replaced
        task = self._loop.create_task(self._dial_one(), name="spare-dial")
        self._dials.add(task)
        task.add_done_callback(self._dialed)

    async def _dial_one(self) -> None:
        assert self._connect is not None and self.swapper is not None
        try:
            up = await self._connect(self.swapper.record.dial)
        except UpstreamRefused as exc:
            self._guard(self._spare_failed, f"refused with HTTP {exc.status}")
            return
        except UpstreamUnreachable as exc:
            self._guard(self._spare_failed, exc.reason)
            return
        self._guard(self._spare_opened, up)

    def _dialed(self, task: asyncio.Task[None]) -> None:
        self._dials.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._guard(self._fault, cast(Exception, task.exception()))
        self._finish_if_done()

    def _spare_opened(self, up: Upstream) -> None:
        protocol = up.side
        side = _Side(masked_in=False, max_message_bytes=self._max_message_bytes)
        side.transport = protocol.transport
        other = _Other(self, side, protocol)
        protocol.relay = other
        self._others.add(other)
        early, protocol.early = bytes(protocol.early), bytearray()
        if self._closing:  # the connection ended while it was dialed
            self._send_close(side, 1000, "")
        else:
            assert self.swapper is not None
            self._spare = other
            self.swapper.spare_opened()
            self._swap_step()  # the replay record, sent
            if early:
                self._spare_read(other, early)
        if protocol.lost:
            self.other_lost(other)

    def _spare_failed(self, reason: str) -> None:
        assert self.swapper is not None
        self.log.info("spare_failed", reason=reason)
        self.swapper.spare_failed()
        self._swap_step()
        # A swap reset that waited for this spare may have turned into deletes: they leave now.
        self._drain_core()

    def other_data(self, other: _Other, data: bytes) -> None:
        """Bytes from an upstream socket that is not the client's upstream."""
        other.heard = True
        if other is self._spare:
            self._guard(self._spare_read, other, data)
        else:  # retired: we sent it our close; only its answer matters
            for frame in other.side.reader.receive_data(data):
                if frame.opcode is Opcode.CLOSE and other.side.transport is not None:
                    other.side.transport.close()
        other.side.flush()

    def _spare_read(self, spare: _Other, data: bytes) -> None:
        """The spare's frames go to the controller (none reaches the client) until it is the client's upstream."""
        swapper = self.swapper
        assert swapper is not None
        side = spare.side
        frames = side.reader.receive_data(data)
        for i, frame in enumerate(frames):
            if side is self.upstream:  # it became the client's upstream: the rest of this read is the client's
                self._upstream_rest(side, frames[i:])
                return
            if spare is not self._spare:
                return  # dropped (it refused, or was replaced)
            opcode = frame.opcode
            if opcode is Opcode.PING:
                side.out.append(side.writer.frame(Opcode.PONG, frame.payload()))
            elif opcode is Opcode.CLOSE:
                side.got_close = True
                self._spare_failed("the spare closed its connection")
                return
            elif opcode is not Opcode.PONG:
                side.frag_payload.append(bytes(frame.payload()))
                if frame.fin:
                    payload = b"".join(side.frag_payload)
                    side.frag_payload = []
                    swapper.spare_frame(Binary(payload) if frame.message_opcode is Opcode.BINARY else payload)
                    if swapper.pending:
                        self._swap_step()
        if side is self.upstream:
            self._upstream_rest(side, ())
        elif side.reader.state is ReaderState.FAILED and spare is self._spare:
            failure = side.reader.failure
            assert failure is not None
            self._spare_failed("the spare broke the protocol: " + failure.reason)

    def _upstream_rest(self, side: _Side, frames: Sequence[WireFrame]) -> None:
        """The rest of a read from a spare that became the client's upstream in the middle of it."""
        for i, frame in enumerate(frames):
            self._upstream_frame(frame)
            if self._closing:
                self._closes_only(side, frames[i + 1 :])
                return
            if side is not self.upstream:
                return
        if side.reader.state is ReaderState.FAILED and not self._closing:
            self._upstream_read(b"")  # a failed reader reads nothing more: this reports its failure, as for any read

    def other_lost(self, other: _Other) -> None:
        side = other.side
        side.lost = True
        self._others.discard(other)
        if other is self._spare:
            self._spare = None
            self._guard(self._spare_failed, "the spare's connection ended")
        self._lost(side)

    def _deadline(self) -> float | None:
        return relay_deadline(self.session, self.swapper)

    # --- the reset timer ----------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = self.session.deadline  # what `_after_core` compares with; the controller's is re-armed apart
        deadline = self._deadline()
        if deadline is not None and not self._closing:
            self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._guard(self._timeout)

    def _timeout(self) -> None:
        deadline = self._deadline()
        if deadline is not None and time.monotonic() < deadline:  # the loop's clock is coarser than ours
            self._arm()
            return
        self.session.handle_timeout()
        if self.swapper is not None:
            self.swapper.handle_timeout()
        self._drain_core()
        self._arm()
        self._resume_client_feed()

    def _on_beat(self) -> None:
        """The upstream heartbeat: ping an upstream silent for a period; one silent for two is gone. The spare's
        too (as aiohttp's heartbeat does for relay.py's): it keeps it open through NATs, and a dead one is replaced."""
        if self._closing:
            return
        if self._client_swamped:
            # Two beats without the client reading a byte of what waits for it: it is gone for our purposes.
            transport = self.client.transport
            size = transport.get_write_buffer_size() if transport is not None else 0
            if self._client_stuck is not None and size >= self._client_stuck:
                self.log.warning("client_not_reading", buffered=size, seconds=self._heartbeat)
                self._close_both(1008, "client not reading", 1001, _CLIENT_CLOSED)
                self._flush()
                return
            self._client_stuck = size
        spare = self._spare
        if spare is not None:
            if spare.heard:
                spare.heard = spare.pinged = False
            elif not spare.pinged:
                spare.pinged = True
                spare.side.out.append(spare.side.writer.frame(Opcode.PING, b""))
                spare.side.flush()
            else:
                self._guard(self._spare_failed, "the spare stopped answering pings")
        if self._upstream_heard or self.upstream.sent_close:  # (sent_close: a rollover waits for the next one)
            self._upstream_heard = False
            self._pinged = False
        elif not self._pinged:
            self._pinged = True
            self.upstream.out.append(self.upstream.writer.frame(Opcode.PING, b""))
            self._flush()
        else:
            self.log.warning("upstream_silent", seconds=self._heartbeat * 2)
            self._close_both(BAD_GATEWAY, "upstream stopped answering", 1001, "no answer to pings")
            self._flush()
            return
        self._beat = self._loop.call_later(self._heartbeat, self._on_beat)

    # --- flow control -------------------------------------------------------------------------------

    def client_write_paused(self, paused: bool) -> None:
        self.client.write_paused = paused
        if not paused:
            self._client_swamped = False
            self._client_stuck = None
        self._update_reading()

    def _check_client_buffer(self) -> None:
        """A client whose writes are paused: past CLIENT_BUFFER_CAP waiting for it, it is not read any more."""
        transport = self.client.transport
        if transport is not None and transport.get_write_buffer_size() > CLIENT_BUFFER_CAP:
            self._client_swamped = True
            self._update_reading()

    def upstream_write_paused(self, paused: bool) -> None:
        self.upstream.write_paused = paused
        self._update_reading()

    def _update_reading(self) -> None:
        # Closing, a side is read on: the peer's close frame is what we wait for.
        want_client = self._closing or not (
            self.upstream.write_paused or self._client_swamped or self._stash_bytes > STASH_PAUSE_BYTES
        )
        if want_client != self._client_reading and self.client.transport is not None and not self.client.lost:
            self._client_reading = want_client
            if want_client:
                self.client.transport.resume_reading()
            else:
                self.client.transport.pause_reading()
        want_upstream = self._closing or not self.client.write_paused
        if want_upstream != self._upstream_reading and self.upstream.transport is not None and not self.upstream.lost:
            self._upstream_reading = want_upstream
            if want_upstream:
                self.upstream.transport.resume_reading()
            else:
                self.upstream.transport.pause_reading()

    def _flush(self) -> None:
        self.upstream.flush()
        self.client.flush()

    # --- closing ------------------------------------------------------------------------------------

    def _client_closed(self, code: int) -> None:
        """The client's close frame: tell the upstream with the client's code."""
        if self._closing:
            self._closed_after_ours(self.client)
            return
        self.stats.client_close_code = code
        self._close_both(code if code != 1005 else 1000, "", sendable(code, 1001), _CLIENT_CLOSED)

    def _upstream_closed(self, code: int, reason: str) -> None:
        """The upstream's close frame: its code and reason go to the client."""
        if self._closing:
            self._closed_after_ours(self.upstream)
            return
        if self._rolled_over(code, reason):
            return
        self.stats.upstream_close_code = code
        self._close_both(sendable(code, BAD_GATEWAY), reason, code if code != 1005 else 1000, "")

    def client_lost(self) -> None:
        side = self.client
        side.lost = True
        if not self._closing:
            self.stats.client_close_code = 1006
            # Vanished without a close frame: "going away" as far as the upstream is concerned.
            self._guard(self._close_both, 1001, "", 1001, _CLIENT_CLOSED)
        self._lost(side)

    def upstream_lost(self) -> None:
        side = self.upstream
        side.lost = True
        if not self._closing:
            self._guard(self._upstream_gone)
        self._lost(side)

    def _upstream_gone(self) -> None:
        if not self._rolled_over(None, _UPSTREAM_LOST):
            self._close_both(BAD_GATEWAY, _UPSTREAM_LOST, 1001, "")

    def _lost(self, side: _Side) -> None:
        if side.close_timer is not None:
            side.close_timer.cancel()
            side.close_timer = None
        side.out.clear()
        self._finish_if_done()

    def _close_both(self, client_code: int, client_reason: str, upstream_code: int, upstream_reason: str) -> None:
        """Send each side its close frame (after what is already queued for it); nothing more is relayed."""
        if self._closing:
            return
        self._closing = True
        self._stash.clear()
        self._stash_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
        self._send_close(self.client, client_code, client_reason)
        self._send_close(self.upstream, upstream_code, upstream_reason)
        for task in self._dials:
            task.cancel()
        spare, self._spare = self._spare, None
        if spare is not None:
            self._send_close(spare.side, 1000, "")
        self._update_reading()

    def _send_close(self, side: _Side, code: int, reason: str) -> None:
        transport = side.transport
        if side.lost or transport is None or side.sent_close:
            return
        side.sent_close = True
        side.out.append(side.writer.close(code, reason.encode()[:123].decode(errors="ignore")))
        side.flush()
        if side.got_close:
            transport.close()  # the close handshake is complete: the side said so first
        # Armed either way: a close waits for the buffer to drain, which a peer that never reads never lets happen.
        side.close_timer = self._loop.call_later(self._close_timeout, transport.abort)

    def _closed_after_ours(self, side: _Side) -> None:
        """The peer's answer to our close frame: the handshake is complete."""
        if side.sent_close and side.transport is not None:
            side.flush()
            side.transport.close()
