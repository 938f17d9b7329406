"""RFC 6455 frames, sans-I/O: bytes in, frame boundaries and heads out; frames built for the way out.

A relay that understands the protocol only needs each frame's 2-14-byte header and the first bytes of its
payload: more than 99 % of the bytes are audio it forwards as they came. So:

    FrameReader.receive_data(bytes) ──▶ [Frame, ...]        complete frames, in order, each with its wire bytes
                                                            (`raw`, a memoryview: no copy when forwarded)
    Outbox.forward / drop / replace / inject ──▶ take() ──▶ buffers for one `writelines`

A relay's read, in outline (the session decides; nothing here awaits)::

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.receive_data(data):
            kind = sniff(frame.prefix(64)) if frame.opcode is Opcode.TEXT else None
            if kind == "input_audio_buffer.append":
                self.outbox.forward(frame)
            else:
                ...  # the session: forward, drop, replace(frame, new_payload), inject(payload)
        self.peer.writelines(self.outbox.take())
        if self.reader.state is ReaderState.FAILED:
            ...  # close both ways with self.reader.failure.code

Rules:
- One reader per direction. ``masked=True`` reads a client's frames (every frame must be masked: we are its
  server); ``masked=False`` reads the upstream's (none may be masked: we are its client). One writer per
  direction the other way round: frames to the upstream get a fresh mask each, frames to a client none.
- A frame is handed out once all of it has arrived; its header is checked as soon as the header is in, so a
  frame that is too big (1009) or malformed (1002) is refused before its payload arrives. Checks run in the
  order websockets runs them (opcode, masking, size, reserved bits, control frame rules, fragmentation), so
  a frame that breaks two rules gets the same close code from both.
- ``max_message_bytes`` bounds a message: the sum of its fragments. As in websockets, a frame is checked
  against what the message in progress leaves (control frames inside a fragmented message included), and
  lengths are read as sent: a non-minimal length is accepted, a 64-bit length with its top bit set is just a
  large length (refused by the limit).
- Text payloads are not checked for UTF-8 (websockets does that when it hands a message to the application,
  not in its frame parser): that is the endpoint's to enforce. Close reasons are checked (1007), and close codes (1002).
- After a close frame or a failure nothing more is read: the rest of the stream is discarded (RFC 6455 1.4,
  7.1.7), as websockets does.
- Bytes passed to `receive_data` back the frames handed out (memoryviews, no copy): do not change them while
  those frames are in use. Only a frame split across reads is copied, once, into a buffer of its own. A frame
  kept keeps its whole read alive: hold ``bytes(frame.raw)`` instead of the frame when holding one for long
  (a reset's hold-back).
- Unmasking is the hot path's only per-byte work: `Frame.prefix` unmasks the first bytes only (to sniff the
  event type); `Frame.payload` unmasks all of it, on demand. The pure-Python `apply_mask` here XORs two big
  ints; the I/O layer may pass a C one (``websockets.speedups.apply_mask``), which core cannot import.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TypeAlias, cast

Bytes: TypeAlias = bytes | bytearray | memoryview
MaskFunction: TypeAlias = Callable[[Bytes, Bytes], bytes]
# The fast path's question to the session: may this whole message (its payload, whether it is text) go on as it
# came, with nothing else to do? True means the session took it (counted it) and the caller forwards its bytes.
Passes: TypeAlias = Callable[[bytes, bool], bool]


class Opcode(IntEnum):
    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


# An opcode's member by index: a tuple lookup instead of Opcode(x) (which raises, and costs more).
_OPCODES: tuple[Opcode | None, ...] = tuple(next((o for o in Opcode if o == i), None) for i in range(16))


class CloseCode(IntEnum):
    """The close codes this layer sends or checks (RFC 6455 7.4.1)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # never on the wire: what an empty close frame means
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


# Codes a close frame may carry: the registered ones that are not "internal", and 3000-4999 (as websockets).
_SENDABLE_CODES = frozenset(CloseCode) - {CloseCode.NO_STATUS_RCVD}


def close_code_allowed(code: int) -> bool:
    """Whether `code` may appear in a close frame."""
    return code in _SENDABLE_CODES or 3000 <= code < 5000


def apply_mask(data: Bytes, mask: Bytes) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated: two big ints and one XOR, no per-byte Python loop."""
    n = len(data)
    mask = bytes(mask)  # a memoryview cannot be repeated
    key = mask * (n // 4) + mask[: n % 4]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


@dataclass(frozen=True, slots=True)
class Close:
    """A close frame's code and reason (1005 and "" for an empty close frame)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a stream was refused: the close code to send and a one-line reason for it."""

    code: int
    reason: str


def parse_close(payload: Bytes) -> Close | Failure:
    """A close frame's payload, read as websockets reads it (the reason is decoded before the code is checked)."""
    if not payload:
        return Close(CloseCode.NO_STATUS_RCVD, "")
    if len(payload) == 1:
        return Failure(CloseCode.PROTOCOL_ERROR, "close frame too short")
    code = int.from_bytes(payload[:2], "big")
    try:
        reason = bytes(payload[2:]).decode()
    except UnicodeDecodeError as exc:
        return Failure(CloseCode.INVALID_DATA, f"close reason: {exc.reason} at position {exc.start}")
    if not close_code_allowed(code):
        return Failure(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    return Close(code, reason)


@dataclass(slots=True, eq=False)
class Frame:
    """One complete frame as it came: what a session needs to decide on it, and its bytes to forward."""

    raw: memoryview  # the frame's bytes on the wire, header included: forward these
    start: int  # offset of its first byte in the stream (raw spans start .. start + len(raw))
    opcode: Opcode
    fin: bool
    header_length: int  # 2-14 bytes, mask key included
    message_opcode: Opcode  # TEXT or BINARY for every fragment of a message; the opcode itself for a control frame
    open_after: bool  # a fragmented message is still open after this frame: no data frame may go in here
    close: Close | None  # a close frame's code and reason
    _unmask: MaskFunction

    @property
    def masked(self) -> bool:
        return bool(self.raw[1] & 0x80)

    @property
    def mask(self) -> bytes | None:
        """The 4-byte masking key, None for an unmasked frame."""
        return bytes(self.raw[self.header_length - 4 : self.header_length]) if self.raw[1] & 0x80 else None

    @property
    def length(self) -> int:
        """The payload length."""
        return len(self.raw) - self.header_length

    @property
    def end(self) -> int:
        return self.start + len(self.raw)

    def prefix(self, n: int) -> bytes:
        """The first `n` payload bytes, unmasked (fewer when the payload is shorter): only those are unmasked."""
        head = self.raw[self.header_length : self.header_length + n]
        mask = self.mask
        return bytes(head) if mask is None else self._unmask(head, mask)

    def payload(self) -> bytes | memoryview:
        """The whole payload, unmasked: a view of `raw` when the frame is not masked (no copy), else new bytes."""
        body = self.raw[self.header_length :]
        mask = self.mask
        return body if mask is None else self._unmask(body, mask)


class ReaderState(Enum):
    OPEN = "open"
    CLOSED = "closed"  # a close frame was read
    FAILED = "failed"  # the stream broke a rule: `failure` says which


_MAX_HEADER = 14
_MASK_BIT = 0x80


def _header_length(b1: int) -> int:
    """The header's length from its second byte (the mask bit and the 7-bit length)."""
    ln = b1 & 0x7F
    return (2 if ln < 126 else 4 if ln == 126 else 10) + (4 if b1 & _MASK_BIT else 0)


class FrameReader:
    """Frames out of one direction's byte stream; see the module docstring for the rules."""

    # Slots: one reader per direction per session, and the relay's RSS per idle session is a target.
    __slots__ = (
        "_buf",
        "_mask_bit",
        "_message",
        "_message_size",
        "_offset",
        "_pending",
        "_unmask",
        "close",
        "failure",
        "masked",
        "max_message_bytes",
        "passed",
        "passed_bytes",
        "state",
    )

    def __init__(self, *, masked: bool, max_message_bytes: int | None, apply_mask: MaskFunction = apply_mask) -> None:
        self.masked = masked
        self.max_message_bytes = max_message_bytes
        self.state = ReaderState.OPEN
        self.failure: Failure | None = None
        self.close: Close | None = None  # the close frame read, once it is
        self._unmask = apply_mask
        self._mask_bit = _MASK_BIT if masked else 0
        self._message: Opcode | None = None  # the fragmented message in progress
        self._message_size = 0  # its payload so far
        self._offset = 0  # stream offset of the first byte not yet handed out in a frame
        self._buf = bytearray()  # the start of a frame split across reads, and nothing else
        self._pending = 0  # that frame's total length once its header is in and checked, else 0
        self.passed = 0  # frames the last `receive` passed on as they came, and their payload bytes
        self.passed_bytes = 0

    @property
    def message_open(self) -> bool:
        """A fragmented message is in progress: a data frame injected now would land inside it."""
        return self._message is not None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until the rest of it arrives."""
        return len(self._buf)

    def receive_data(self, data: Bytes) -> list[Frame]:
        """Every frame `data` completes, in order. Check `state` afterwards: it may have closed or failed."""
        return cast(list[Frame], self.receive(data))

    def receive(self, data: Bytes, passes: Passes | None = None) -> list[Frame | memoryview]:
        """As `receive_data`, with the fast path: from the start of `data`, each plain frame (final, whole, outside
        a fragmented message, text only if ASCII) that `passes` takes is handed out as wire bytes to forward,
        never as a Frame: a memoryview for a frame an earlier read began, then one for the run of them in this
        read. The first frame `passes` refuses ends the run: it and every frame after it are Frames (the session
        must see them in order, and a frame it refused may change what it takes next). So the memoryviews, if
        any, come first. `passed` and `passed_bytes` count the frames passed on."""
        self.passed = self.passed_bytes = 0
        if self.state is not ReaderState.OPEN:
            return []
        frames: list[Frame | memoryview] = []
        view = memoryview(data)
        pos = 0
        if self._buf:
            pos = self._fill(view, frames, passes)
            if frames and type(frames[-1]) is not memoryview:
                passes = None
        if pos >= 0 and self.state is ReaderState.OPEN:
            if passes is not None and self._message is None:
                pos = self._pass_run(view, pos, frames, passes)
            if pos < len(view):
                self._scan(view, pos, frames)
        return frames

    def _pass_run(self, view: memoryview, pos: int, frames: list[Frame | memoryview], passes: Passes) -> int:
        """From `pos`, the frames `passes` takes, handed out as one view; where the first one not passed starts.

        The header rules are `_head`'s common case (a final text or binary frame, masked as it must be, within
        the size limit); anything else stops the run, and the general path reads and checks it."""
        n = len(view)
        start = pos
        count = size = 0
        masked = self._mask_bit
        limit = self.max_message_bytes
        unmask = self._unmask
        while n - pos >= 2:
            b0 = view[pos]
            b1 = view[pos + 1]
            if (b0 != 0x81 and b0 != 0x82) or b1 & _MASK_BIT != masked:
                break
            ln = b1 & 0x7F
            if ln < 126:
                hl = 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = view[pos + 2] << 8 | view[pos + 3]
                hl = 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(view[pos + 2 : pos + 10], "big")
                hl = 10
            body = pos + hl + (4 if masked else 0)
            end = body + ln
            if end > n or (limit is not None and ln > limit):
                break
            payload = unmask(view[body:end], view[body - 4 : body]) if masked else bytes(view[body:end])
            text = b0 == 0x81
            if (text and not payload.isascii()) or not passes(payload, text):
                break
            count += 1
            size += ln
            pos = end
        if count:
            frames.append(view[start:pos])
            self._offset += pos - start
            self.passed += count
            self.passed_bytes += size
        return pos

    def _fill(self, view: memoryview, frames: list[Frame | memoryview], passes: Passes | None) -> int:
        """Complete the frame split across reads; where the rest of `view` starts, or -1 when none is left."""
        buf = self._buf
        taken = 0
        if not self._pending:
            # The header itself was split: take at most a header's worth, then see what it says.
            taken = min(_MAX_HEADER - len(buf), len(view))
            buf += view[:taken]
            total = self._head(buf, 0, len(buf))
            if total <= 0:
                return -1  # still incomplete (all of `view` taken), or refused
            if total <= len(buf):
                # A small frame finished inside the bytes taken; the rest of them go back to the scan.
                self._buf = bytearray()
                self._hand_out(memoryview(buf).toreadonly()[:total], frames, passes)
                return taken - (len(buf) - total)
            self._pending = total
        missing = self._pending - len(buf)
        if missing > len(view) - taken:
            buf += view[taken:]
            return -1
        buf += view[taken : taken + missing]
        self._buf = bytearray()  # the full one now backs the frame handed out: never resize it again
        self._pending = 0
        self._hand_out(memoryview(buf).toreadonly(), frames, passes)
        return taken + missing

    def _hand_out(self, raw: memoryview, frames: list[Frame | memoryview], passes: Passes | None) -> None:
        """The frame that was split across reads: passed on if `passes` takes it, else a Frame."""
        if passes is None or self._message is not None or not self._pass_run(raw, 0, frames, passes):
            self._complete(raw, frames)

    def _scan(self, view: memoryview, pos: int, frames: list[Frame | memoryview]) -> None:
        """Hand out the frames wholly inside `view` from `pos` (no copy); keep a split last one."""
        n = len(view)
        while pos < n:
            total = self._head(view, pos, n)
            if total < 0:
                return
            if total == 0 or pos + total > n:
                self._buf = bytearray(view[pos:])
                self._pending = total
                return
            self._complete(view[pos : pos + total], frames)
            if self.state is not ReaderState.OPEN:
                return
            pos += total

    def _head(self, buf: Bytes, pos: int, n: int) -> int:
        """The frame's total length once its header is in and passes; 0 while incomplete; -1 when refused."""
        if n - pos < 2:
            return 0
        b0 = buf[pos]
        b1 = buf[pos + 1]
        hl = _header_length(b1)
        if n - pos < hl:
            return 0
        ln = b1 & 0x7F
        if ln >= 126:
            ln = int.from_bytes(buf[pos + 2 : pos + (4 if ln == 126 else 10)], "big")
        # The common frame (a final text or binary frame outside a fragmented message) passes in one test.
        if not (
            (b0 == 0x81 or b0 == 0x82)
            and self._message is None
            and b1 & _MASK_BIT == self._mask_bit
            and (self.max_message_bytes is None or ln <= self.max_message_bytes)
        ):
            failure = self._check(b0, b1, ln)
            if failure is not None:
                self._fail(failure)
                return -1
        return hl + ln

    def _check(self, b0: int, b1: int, ln: int) -> Failure | None:
        """The header's rules, in websockets' order (its Frame.parse, then Frame.check, then recv_frame)."""
        opcode = _OPCODES[b0 & 0x0F]
        if opcode is None:
            return Failure(CloseCode.PROTOCOL_ERROR, f"reserved opcode {b0 & 0x0F:#x}")
        if b1 & _MASK_BIT != self._mask_bit:
            return Failure(CloseCode.PROTOCOL_ERROR, "incorrect masking")
        limit = self.max_message_bytes
        if limit is not None:
            limit -= self._message_size  # 0 outside a fragmented message
            if ln > limit:
                return Failure(CloseCode.MESSAGE_TOO_BIG, f"frame of {ln} bytes over the {limit} bytes left")
        if b0 & 0x70:
            return Failure(CloseCode.PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if opcode >= Opcode.CLOSE:
            if ln > 125:
                return Failure(CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
            if not b0 & 0x80:
                return Failure(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            # A close frame in a fragmented message is refused once its payload is read (as websockets does).
        elif opcode is Opcode.CONT:
            if self._message is None:
                return Failure(CloseCode.PROTOCOL_ERROR, "continuation frame outside a fragmented message")
        elif self._message is not None:
            return Failure(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message")
        return None

    def _complete(self, raw: memoryview, frames: list[Frame | memoryview]) -> None:
        """Account for a checked, complete frame and hand it out."""
        b0 = raw[0]
        opcode = _OPCODES[b0 & 0x0F]
        assert opcode is not None  # _check refused the others
        fin = bool(b0 & 0x80)
        hl = _header_length(raw[1])
        close = None
        if opcode < Opcode.CLOSE:
            message_opcode = opcode if self._message is None else self._message
            if fin:
                self._message = None
                self._message_size = 0
            else:
                self._message = message_opcode
                self._message_size += len(raw) - hl
        else:
            message_opcode = opcode
            if opcode is Opcode.CLOSE:
                payload = raw[hl:]
                if self._mask_bit:
                    payload = memoryview(self._unmask(payload, bytes(raw[hl - 4 : hl])))
                parsed = parse_close(payload)
                if isinstance(parsed, Failure):
                    self._fail(parsed)
                    return
                if self._message is not None:
                    self._fail(Failure(CloseCode.PROTOCOL_ERROR, "close frame inside a fragmented message"))
                    return
                close = self.close = parsed
                self.state = ReaderState.CLOSED
                self._buf = bytearray()
        frames.append(
            Frame(raw, self._offset, opcode, fin, hl, message_opcode, self._message is not None, close, self._unmask)
        )
        self._offset += len(raw)

    def _fail(self, failure: Failure) -> None:
        self.state = ReaderState.FAILED
        self.failure = failure
        self._buf = bytearray()


class FrameWriter:
    """Encodes new frames for one direction: masked (a fresh key each) toward the upstream, unmasked to a client."""

    __slots__ = ("_apply_mask", "_mask_source", "masked")

    def __init__(
        self,
        *,
        masked: bool,
        mask_source: Callable[[int], bytes] = os.urandom,
        apply_mask: MaskFunction = apply_mask,
    ) -> None:
        self.masked = masked
        self._mask_source = mask_source
        self._apply_mask = apply_mask

    def frame(self, opcode: Opcode, payload: Bytes = b"", *, fin: bool = True) -> bytes:
        """One frame, its length in the shortest form (as websockets writes it)."""
        n = len(payload)
        if opcode >= Opcode.CLOSE and (n > 125 or not fin):
            raise ValueError("a control frame must be final and carry at most 125 bytes")
        b0 = (0x80 if fin else 0) | opcode
        m = _MASK_BIT if self.masked else 0
        if n < 126:
            head = bytes((b0, m | n))
        elif n < 65536:
            head = struct.pack("!BBH", b0, m | 126, n)
        else:
            head = struct.pack("!BBQ", b0, m | 127, n)
        if self.masked:
            mask = self._mask_source(4)
            return b"".join((head, mask, self._apply_mask(payload, mask)))
        return b"".join((head, payload))

    def text(self, payload: Bytes) -> bytes:
        return self.frame(Opcode.TEXT, payload)

    def close(self, code: int | None = None, reason: str = "") -> bytes:
        """A close frame; no code means an empty one (received as 1005)."""
        if code is None:
            if reason:
                raise ValueError("a close reason needs a close code")
            return self.frame(Opcode.CLOSE)
        if not close_code_allowed(code):
            raise ValueError(f"close code {code} may not be sent")
        return self.frame(Opcode.CLOSE, code.to_bytes(2, "big") + reason.encode())


class Outbox:
    """What one read sends one way, in order: buffers for a single ``writelines``.

    It keeps the way out well-formed: a data frame injected while a forwarded fragmented message is open is
    held until that message's last frame has gone; a dropped or replaced message must be dropped whole.
    """

    __slots__ = ("_buffers", "_dropping", "_held", "_open", "writer")

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self._buffers: list[Bytes] = []
        self._open = False  # a forwarded fragmented message is open on the way out
        self._dropping = False  # the fragmented message coming in is being dropped (or replaced at its end)
        self._held: list[bytes] = []  # injected data frames waiting for the open message to end

    @property
    def message_open(self) -> bool:
        """A fragmented message is open on the way out: an injected data frame is held until it ends."""
        return self._open

    def take(self) -> list[Bytes]:
        """The buffers to write, in order; the outbox is empty afterwards."""
        buffers, self._buffers = self._buffers, []
        return buffers

    def forward(self, frame: Frame) -> None:
        """Send the frame as it came (its own bytes, its own mask)."""
        if frame.opcode < Opcode.CLOSE:
            if self._dropping:
                raise ValueError("a fragment of a dropped message cannot be forwarded")
            self._open = not frame.fin
        self._buffers.append(frame.raw)
        if frame.fin and self._held and not self._open:
            self._buffers.extend(self._held)
            self._held.clear()

    def drop(self, frame: Frame) -> None:
        """Send nothing for this frame. A fragment's whole message must be dropped (or replaced at its end)."""
        if frame.opcode < Opcode.CLOSE:
            if self._open:
                raise ValueError("a fragment of a forwarded message cannot be dropped")
            self._dropping = not frame.fin

    def replace(self, frame: Frame, payload: Bytes) -> None:
        """Send `payload` in a new frame instead of this one: for a fragmented message, at its last fragment."""
        if not frame.fin:
            raise ValueError("replace a fragmented message at its last fragment (drop the ones before)")
        self.drop(frame)
        self._buffers.append(self.writer.frame(frame.message_opcode, payload))

    def inject(self, payload: Bytes, opcode: Opcode = Opcode.TEXT) -> None:
        """Send a frame of ours: now, or (a data frame) once the open fragmented message has ended."""
        data = self.writer.frame(opcode, payload)
        if self._open and opcode < Opcode.CLOSE:
            self._held.append(data)
        else:
            self._buffers.append(data)
