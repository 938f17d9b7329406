"""The RFC 6455 frame layer: traces of what a reader hands out, then websockets as the reference.

The unit tests feed bytes and check the frames, heads and close codes that come out. The property tests build
random streams (every opcode, fin, reserved bits, lengths at the 125/126/65535/65536 boundaries in minimal and
non-minimal forms, masks, fragmented messages with control frames inside, close frames good and bad), cut
them into random reads, and feed them to our reader and to websockets' sans-I/O ``Protocol`` (its
``Frame.parse`` driven by its ``StreamReader``, plus its fragmentation and close rules): after every read
both must have handed out the same frames, and in the end refused the stream with the same close code.

Run longer with ``HYPOTHESIS_PROFILE=long`` (10x the examples) or ``HYPOTHESIS_PROFILE=soak`` (100x).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field, replace
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Close as WsClose
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import CLIENT, SERVER, Protocol
from websockets.speedups import apply_mask as c_apply_mask
from websockets.utils import apply_mask as ws_py_apply_mask

from proxy.core.frames import (
    Close,
    CloseCode,
    Failure,
    Frame,
    FrameReader,
    FrameWriter,
    Opcode,
    Outbox,
    ReaderState,
    apply_mask,
    parse_close,
)

_SCALE = {"default": 1, "long": 10, "soak": 100}[os.environ.get("HYPOTHESIS_PROFILE", "default")]
MASK = b"\x12\x34\x56\x78"


# --- an independent wire builder: any frame, valid or not, in any length form -----------------------------


def wire(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    form: str = "min",
    declared: int | None = None,
) -> bytes:
    """A frame's bytes. `form`: "min" (as websockets writes it), "16" or "64" (non-minimal allowed), "64msb"
    (a 64-bit length with the top bit set); `declared` overrides the length written (payload not checked)."""
    n = len(payload) if declared is None else declared
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    m = 0x80 if mask is not None else 0
    if form == "min":
        form = "7" if n < 126 else "16" if n < 65536 else "64"
    if form == "7":
        head = struct.pack("!BB", b0, m | n)
    elif form == "16":
        head = struct.pack("!BBH", b0, m | 126, n)
    elif form == "64":
        head = struct.pack("!BBQ", b0, m | 127, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n | 1 << 63)
    if mask is None:
        return head + payload
    return head + mask + ws_py_apply_mask(payload, mask)


def client_reader(max_message_bytes: int | None = 1 << 20) -> FrameReader:
    return FrameReader(masked=True, max_message_bytes=max_message_bytes)


def upstream_reader(max_message_bytes: int | None = 1 << 20) -> FrameReader:
    return FrameReader(masked=False, max_message_bytes=max_message_bytes)


def heads(frames: list[Frame]) -> list[tuple[Opcode, bool, bytes]]:
    return [(f.opcode, f.fin, bytes(f.payload())) for f in frames]


def refused(reader: FrameReader, data: bytes) -> Failure:
    """Feed `data`; the reader must hand out nothing and fail."""
    assert reader.receive_data(data) == []
    assert reader.state is ReaderState.FAILED and reader.failure is not None
    return reader.failure


# --- reading: heads, spans, payloads ------------------------------------------------------------------------


def test_a_masked_client_frame_in_one_read() -> None:
    """One read, one text frame: its head, its span in the stream, its wire bytes, prefix and payload unmasked."""
    event = b'{"type":"input_audio_buffer.append","audio":"AAAA"}'
    data = wire(Opcode.TEXT, event, mask=MASK)
    reader = client_reader()
    [frame] = reader.receive_data(data)
    assert (frame.opcode, frame.fin, frame.masked, frame.mask) == (Opcode.TEXT, True, True, MASK)
    assert (frame.header_length, frame.length, frame.start, frame.end) == (6, len(event), 0, len(data))
    assert frame.raw == data and frame.raw.obj is data  # a view of the read itself: no copy
    assert frame.prefix(9) == b'{"type":"' and frame.prefix(1000) == event
    assert frame.payload() == event
    assert (frame.message_opcode, frame.open_after, frame.close) == (Opcode.TEXT, False, None)
    assert reader.state is ReaderState.OPEN and reader.buffered == 0 and not reader.message_open


def test_an_upstream_frame_is_unmasked_and_its_payload_is_a_view() -> None:
    """An upstream frame carries no mask; its payload is a slice of the read, not a copy."""
    data = wire(Opcode.BINARY, b"\x00\x01\x02")
    [frame] = upstream_reader().receive_data(data)
    assert (frame.opcode, frame.masked, frame.mask, frame.header_length) == (Opcode.BINARY, False, None, 2)
    payload = frame.payload()
    assert isinstance(payload, memoryview) and payload.obj is data and payload == b"\x00\x01\x02"
    assert frame.prefix(2) == b"\x00\x01"


def test_a_frame_fed_byte_by_byte_comes_out_with_its_last_byte() -> None:
    """Split anywhere, header included: nothing until the last byte, then the frame, copied once."""
    data = wire(Opcode.TEXT, b"x" * 300, mask=MASK)  # a 16-bit length: an 8-byte header with the key
    reader = client_reader()
    for i, byte in enumerate(data[:-1]):
        assert reader.receive_data(bytes([byte])) == []
        assert reader.buffered == i + 1
    [frame] = reader.receive_data(data[-1:])
    assert frame.raw == data and frame.header_length == 8 and frame.payload() == b"x" * 300
    assert reader.buffered == 0


def test_frames_wholly_in_a_read_are_views_of_it_and_a_split_one_gets_its_own_buffer() -> None:
    """Two frames and the start of a third: two views of the read; the third is whole once its rest arrives."""
    a, b, c = (wire(Opcode.TEXT, p, mask=MASK) for p in (b"one", b"two", b"three"))
    first, second = a + b + c[:4], c[4:] + a
    reader = client_reader()
    out = reader.receive_data(first)
    assert [f.raw.obj for f in out] == [first, first] and heads(out) == [
        (Opcode.TEXT, True, b"one"),
        (Opcode.TEXT, True, b"two"),
    ]
    assert reader.buffered == 4
    third, fourth = reader.receive_data(second)
    assert third.raw == c and third.raw.obj is not second and third.start == len(a + b)
    assert third.raw.readonly  # its own buffer, which nobody may change through the frame
    assert fourth.raw.obj is second and fourth.start == len(a + b + c) and fourth.payload() == b"one"


def test_a_split_header_with_small_frames_behind_it() -> None:
    """The header is split; the read that completes it also holds the frame's end and the next frames."""
    a, b = wire(Opcode.PING, b"hi", mask=MASK), wire(Opcode.TEXT, b"next", mask=MASK)
    reader = client_reader()
    assert reader.receive_data(a[:1]) == []
    out = reader.receive_data(a[1:] + b + b)
    assert heads(out) == [(Opcode.PING, True, b"hi"), (Opcode.TEXT, True, b"next"), (Opcode.TEXT, True, b"next")]
    assert [f.start for f in out] == [0, len(a), len(a) + len(b)]


def test_lengths_at_the_boundaries_and_in_non_minimal_forms() -> None:
    """7-, 16- and 64-bit lengths, and lengths written longer than needed (accepted, as websockets does)."""
    reader = upstream_reader()
    cases = [(125, "min", 2), (126, "min", 4), (65535, "min", 4), (65536, "min", 10), (5, "16", 4), (5, "64", 10)]
    for size, form, header_length in cases:
        data = wire(Opcode.BINARY, b"\xab" * size, form=form)
        [frame] = reader.receive_data(data)
        assert (frame.length, frame.header_length, frame.raw == data) == (size, header_length, True)


def test_a_prefix_unmasks_only_what_it_returns() -> None:
    """prefix(n) hands the mask function n bytes, not the payload: sniffing a 100 KB frame costs 64 bytes."""
    seen: list[int] = []

    def counting_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
        seen.append(len(data))
        return apply_mask(data, mask)

    reader = FrameReader(masked=True, max_message_bytes=None, apply_mask=counting_mask)
    [frame] = reader.receive_data(wire(Opcode.TEXT, b"a" * 100_000, mask=MASK))
    assert frame.prefix(64) == b"a" * 64 and seen == [64]
    assert frame.payload() == b"a" * 100_000 and seen == [64, 100_000]


def test_a_frame_shows_its_head_but_never_its_payload() -> None:
    """A frame may end up in a log line: its repr names the opcode and the span, not the audio."""
    [frame] = upstream_reader().receive_data(wire(Opcode.TEXT, b'{"audio":"SECRETAUDIO"}'))
    text = repr(frame)
    assert "SECRETAUDIO" not in text and "opcode=<Opcode.TEXT: 1>" in text and "start=0" in text


def test_a_c_mask_function_is_used_when_given() -> None:
    """websockets' C apply_mask plugs in (the I/O layer passes it; core cannot import it)."""
    reader = FrameReader(masked=True, max_message_bytes=None, apply_mask=c_apply_mask)
    [frame] = reader.receive_data(wire(Opcode.TEXT, b"hello", mask=MASK))
    assert frame.payload() == b"hello"
    # The fast path hands it the mask as a memoryview of the header, which its stub does not admit.
    data = wire(Opcode.TEXT, b"hello", mask=MASK)
    assert c_apply_mask(memoryview(data)[6:], memoryview(data)[2:6]) == b"hello"  # type: ignore[arg-type]
    passed: list[bytes] = []
    reader.receive(data, lambda payload, text: passed.append(payload) is None)
    assert passed == [b"hello"] and reader.passed == 1


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
@settings(max_examples=100 * _SCALE)
def test_the_pure_python_mask_equals_websockets_c_mask(data: bytes, mask: bytes) -> None:
    assert apply_mask(data, mask) == c_apply_mask(data, mask)
    assert apply_mask(memoryview(data), mask) == c_apply_mask(data, mask)


# --- fragmentation -----------------------------------------------------------------------------------------


def test_a_fragmented_message_with_control_frames_inside() -> None:
    """TEXT, PING, CONT, PONG, CONT(fin): the type is the first fragment's; the message is open until its end."""
    frames = [
        wire(Opcode.TEXT, b'{"type":', fin=False, mask=MASK),
        wire(Opcode.PING, b"p", mask=MASK),
        wire(Opcode.CONT, b'"x"', fin=False, mask=MASK),
        wire(Opcode.PONG, b"", mask=MASK),
        wire(Opcode.CONT, b"}", mask=MASK),
    ]
    reader = client_reader()
    out = []
    for data in frames:
        out += reader.receive_data(data)
        if len(out) == 1:
            assert reader.message_open
    assert [(f.opcode, f.fin, f.message_opcode, f.open_after) for f in out] == [
        (Opcode.TEXT, False, Opcode.TEXT, True),
        (Opcode.PING, True, Opcode.PING, True),  # a control frame inside: still no place for a data frame
        (Opcode.CONT, False, Opcode.TEXT, True),
        (Opcode.PONG, True, Opcode.PONG, True),
        (Opcode.CONT, True, Opcode.TEXT, False),
    ]
    assert b"".join(f.prefix(100) for f in out if f.message_opcode is Opcode.TEXT) == b'{"type":"x"}'
    assert not reader.message_open


def test_a_continuation_outside_a_message_and_a_message_inside_one_are_refused() -> None:
    assert refused(client_reader(), wire(Opcode.CONT, b"x", mask=MASK)).code == CloseCode.PROTOCOL_ERROR
    reader = client_reader()
    assert len(reader.receive_data(wire(Opcode.BINARY, b"a", fin=False, mask=MASK))) == 1
    failure = refused(reader, wire(Opcode.TEXT, b"b", mask=MASK))
    assert failure == Failure(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message")


# --- refusals from the header, before the payload arrives ---------------------------------------------------


def test_a_frame_over_max_message_bytes_is_refused_from_its_header() -> None:
    """1009 as soon as the 14-byte header of a 1 MiB frame is in: the megabyte is never waited for."""
    reader = client_reader(max_message_bytes=1000)
    header = wire(Opcode.TEXT, b"", mask=MASK, declared=1 << 20)
    assert refused(reader, header).code == CloseCode.MESSAGE_TOO_BIG
    assert reader.receive_data(b"\x00" * 100) == [] and reader.buffered == 0  # the rest is discarded


def test_max_message_bytes_counts_every_fragment_and_control_frames_inside_against_what_is_left() -> None:
    """The limit is on the message: fragments add up; a ping inside one gets only what the message left."""
    reader = upstream_reader(max_message_bytes=10)
    assert len(reader.receive_data(wire(Opcode.TEXT, b"123456", fin=False))) == 1
    assert refused(reader, wire(Opcode.CONT, b"12345")).code == CloseCode.MESSAGE_TOO_BIG
    reader = upstream_reader(max_message_bytes=10)
    reader.receive_data(wire(Opcode.TEXT, b"123456", fin=False))
    failure = refused(reader, wire(Opcode.PING, b"12345"))  # as websockets counts it
    assert failure == Failure(CloseCode.MESSAGE_TOO_BIG, "frame of 5 bytes over the 4 bytes left")
    reader = upstream_reader(max_message_bytes=10)
    out = reader.receive_data(wire(Opcode.TEXT, b"123456", fin=False) + wire(Opcode.CONT, b"1234"))
    assert len(out) == 2 and len(reader.receive_data(wire(Opcode.TEXT, b"0123456789"))) == 1


def test_a_64_bit_length_with_its_top_bit_set_is_a_huge_length() -> None:
    """RFC 6455 says the top bit must be 0; websockets reads it as a length, and the limit refuses it."""
    header = wire(Opcode.BINARY, b"", form="64msb", declared=3)
    assert refused(upstream_reader(), header).code == CloseCode.MESSAGE_TOO_BIG
    unlimited = upstream_reader(max_message_bytes=None)
    assert unlimited.receive_data(header + b"abc") == [] and unlimited.state is ReaderState.OPEN
    assert unlimited.buffered == len(header) + 3  # waiting for 2**63 bytes, as websockets would


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (wire(3, mask=MASK), "reserved opcode 0x3"),
        (wire(0xB, mask=MASK), "reserved opcode 0xb"),
        (wire(Opcode.TEXT, b"x"), "incorrect masking"),
        (wire(Opcode.TEXT, b"x", rsv=4, mask=MASK), "reserved bits set (no extension was negotiated)"),
        (wire(Opcode.TEXT, b"x", rsv=1, mask=MASK), "reserved bits set (no extension was negotiated)"),
        (wire(Opcode.PING, b"", mask=MASK, declared=126), "control frame over 125 bytes"),
        (wire(Opcode.PONG, b"", fin=False, mask=MASK), "fragmented control frame"),
    ],
)
def test_a_client_frame_breaking_a_header_rule_is_refused_with_1002(data: bytes, reason: str) -> None:
    assert refused(client_reader(), data) == Failure(CloseCode.PROTOCOL_ERROR, reason)


def test_a_masked_upstream_frame_is_refused() -> None:
    assert refused(upstream_reader(), wire(Opcode.TEXT, b"x", mask=MASK)).reason == "incorrect masking"


def test_frames_before_a_refused_one_are_still_handed_out() -> None:
    reader = client_reader()
    out = reader.receive_data(wire(Opcode.TEXT, b"ok", mask=MASK) + wire(Opcode.TEXT, b"x", rsv=2, mask=MASK))
    assert heads(out) == [(Opcode.TEXT, True, b"ok")] and reader.state is ReaderState.FAILED


# --- close frames --------------------------------------------------------------------------------------------


def test_a_close_frame_gives_its_code_and_reason_and_ends_the_stream() -> None:
    """The close is handed out with its code and reason; whatever follows it is discarded."""
    data = wire(Opcode.CLOSE, struct.pack("!H", 1000) + "au revoir é".encode(), mask=MASK)
    reader = client_reader()
    [frame] = reader.receive_data(data + wire(Opcode.TEXT, b"late", mask=MASK))
    assert frame.close == reader.close == Close(1000, "au revoir é") and reader.state is ReaderState.CLOSED
    assert reader.receive_data(wire(Opcode.TEXT, b"later", mask=MASK)) == []


def test_a_split_close_frame_closes_the_stream_too() -> None:
    data = wire(Opcode.CLOSE, struct.pack("!H", 4000), mask=MASK)
    reader = client_reader()
    assert reader.receive_data(data[:3]) == []
    [frame] = reader.receive_data(data[3:] + wire(Opcode.TEXT, b"late", mask=MASK))
    assert frame.close == Close(4000, "") and reader.state is ReaderState.CLOSED


def test_an_empty_close_frame_means_1005() -> None:
    [frame] = upstream_reader().receive_data(wire(Opcode.CLOSE))
    assert frame.close == Close(CloseCode.NO_STATUS_RCVD, "")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999])
def test_close_codes_that_may_be_sent(code: int) -> None:
    assert parse_close(struct.pack("!H", code)) == Close(code, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_that_may_not_be_sent_are_refused_with_1002(code: int) -> None:
    failure = refused(upstream_reader(), wire(Opcode.CLOSE, struct.pack("!H", code)))
    assert failure == Failure(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")


def test_a_close_frame_of_one_byte_is_refused_with_1002() -> None:
    assert refused(upstream_reader(), wire(Opcode.CLOSE, b"\x03")).code == CloseCode.PROTOCOL_ERROR


def test_a_close_reason_that_is_not_utf8_is_refused_with_1007_even_with_a_bad_code() -> None:
    """The reason is decoded before the code is checked (websockets' order), so 1007 wins over 1002."""
    for code in (1000, 1005):
        failure = refused(upstream_reader(), wire(Opcode.CLOSE, struct.pack("!H", code) + b"\xff"))
        assert failure == Failure(CloseCode.INVALID_DATA, "close reason: invalid start byte at position 0")


def test_a_close_frame_inside_a_fragmented_message_is_refused_once_read() -> None:
    reader = upstream_reader()
    reader.receive_data(wire(Opcode.TEXT, b"a", fin=False))
    failure = refused(reader, wire(Opcode.CLOSE, struct.pack("!H", 1000)))
    assert failure == Failure(CloseCode.PROTOCOL_ERROR, "close frame inside a fragmented message")
    reader = upstream_reader()
    reader.receive_data(wire(Opcode.TEXT, b"a", fin=False))
    assert refused(reader, wire(Opcode.CLOSE, b"\x03\xe8\xff")).code == CloseCode.INVALID_DATA  # read first


# --- writing -------------------------------------------------------------------------------------------------


def test_frames_to_a_client_are_unmasked_and_byte_for_byte_websockets() -> None:
    writer = FrameWriter(masked=False)
    for size in (0, 125, 126, 65535, 65536):
        payload = b"\x07" * size
        assert writer.frame(Opcode.BINARY, payload) == WsFrame(WsOpcode.BINARY, payload).serialize(mask=False)
    assert writer.text(b"hi") == b"\x81\x02hi"
    assert writer.frame(Opcode.TEXT, b"part", fin=False) == b"\x01\x04part"


def test_frames_to_the_upstream_get_a_fresh_mask_each() -> None:
    keys = iter([b"\x01\x02\x03\x04", b"\xff\xfe\xfd\xfc"])
    writer = FrameWriter(masked=True, mask_source=lambda n: next(keys))
    first, second = writer.text(b"same"), writer.text(b"same")
    assert first == wire(Opcode.TEXT, b"same", mask=b"\x01\x02\x03\x04")
    assert second == wire(Opcode.TEXT, b"same", mask=b"\xff\xfe\xfd\xfc")
    random_masks = FrameWriter(masked=True)  # os.urandom by default
    [frame] = client_reader().receive_data(random_masks.text(b"x" * 70_000))
    assert frame.header_length == 14 and frame.payload() == b"x" * 70_000


def test_close_frames_are_written_with_a_code_and_reason_or_empty() -> None:
    writer = FrameWriter(masked=False)
    assert writer.close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert writer.close() == b"\x88\x00"
    with pytest.raises(ValueError, match="needs a close code"):
        writer.close(None, "bye")
    with pytest.raises(ValueError, match="1005 may not be sent"):
        writer.close(1005)


def test_a_control_frame_over_125_bytes_or_fragmented_cannot_be_written() -> None:
    writer = FrameWriter(masked=False)
    assert len(writer.frame(Opcode.PING, b"x" * 125)) == 127
    with pytest.raises(ValueError, match="control frame"):
        writer.frame(Opcode.PING, b"x" * 126)
    with pytest.raises(ValueError, match="control frame"):
        writer.frame(Opcode.PONG, b"", fin=False)


# --- the way out: forward, drop, replace, inject ---------------------------------------------------------


def _read(*frames: bytes) -> list[Frame]:
    return upstream_reader().receive_data(b"".join(frames))


def test_forwarded_frames_are_their_own_bytes_and_injections_land_between_them() -> None:
    """Forward, inject, drop: one list of buffers for one writelines, the forwarded ones the reads' views."""
    a, b, c = _read(wire(Opcode.TEXT, b"a"), wire(Opcode.TEXT, b"b"), wire(Opcode.TEXT, b"c"))
    out = Outbox(FrameWriter(masked=False))
    out.forward(a)
    out.inject(b'{"type":"ours"}')
    out.drop(b)
    out.forward(c)
    buffers = out.take()
    assert buffers[0] is a.raw and buffers[2] is c.raw
    assert [bytes(x) for x in buffers] == [b"\x81\x01a", b'\x81\x0f{"type":"ours"}', b"\x81\x01c"]
    assert out.take() == []


def test_a_data_frame_injected_inside_a_forwarded_fragmented_message_waits_for_its_end() -> None:
    """Control frames may go in between fragments; a data frame of ours is held until the message's last one."""
    first, ping, last = _read(wire(Opcode.TEXT, b"a", fin=False), wire(Opcode.PING), wire(Opcode.CONT, b"b"))
    out = Outbox(FrameWriter(masked=False))
    out.forward(first)
    assert out.message_open
    out.inject(b"ours")
    out.inject(b"", Opcode.PONG)
    out.forward(ping)
    assert [bytes(x) for x in out.take()] == [b"\x01\x01a", b"\x8a\x00", b"\x89\x00"]
    out.forward(last)
    assert [bytes(x) for x in out.take()] == [b"\x80\x01b", b"\x81\x04ours"] and not out.message_open


def test_a_fragmented_message_is_dropped_whole_or_replaced_at_its_last_fragment() -> None:
    """Our own event split into fragments: drop the first ones, replace the last with one new frame."""
    first, ping, last = _read(wire(Opcode.BINARY, b"a", fin=False), wire(Opcode.PING), wire(Opcode.CONT, b"b"))
    out = Outbox(FrameWriter(masked=False))
    out.drop(first)
    out.forward(ping)
    with pytest.raises(ValueError, match="dropped message cannot be forwarded"):
        out.forward(last)
    out.replace(last, b"new")
    assert [bytes(x) for x in out.take()] == [b"\x89\x00", b"\x82\x03new"]
    with pytest.raises(ValueError, match="at its last fragment"):
        out.replace(first, b"new")


def test_a_fragment_of_a_forwarded_message_cannot_be_dropped() -> None:
    first, last = _read(wire(Opcode.TEXT, b"a", fin=False), wire(Opcode.CONT, b"b"))
    out = Outbox(FrameWriter(masked=False))
    out.forward(first)
    with pytest.raises(ValueError, match="forwarded message cannot be dropped"):
        out.drop(last)
    [ping] = _read(wire(Opcode.PING))
    out.drop(ping)  # a control frame may always be dropped
    out.replace(ping, b"pong?")
    assert [bytes(x) for x in out.take()] == [b"\x01\x01a", b"\x89\x05pong?"]


def test_client_frames_keep_their_mask_on_the_way_up_and_ours_get_a_fresh_one() -> None:
    [frame] = client_reader().receive_data(wire(Opcode.TEXT, b"theirs", mask=MASK))
    out = Outbox(FrameWriter(masked=True, mask_source=lambda n: b"\x00\x00\x00\x01"))
    out.forward(frame)
    out.inject(b"ours")
    assert [bytes(x) for x in out.take()] == [
        wire(Opcode.TEXT, b"theirs", mask=MASK),
        wire(Opcode.TEXT, b"ours", mask=b"\x00\x00\x00\x01"),
    ]


# --- differential: websockets as the reference ---------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One frame of a generated stream."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    form: str = "min"
    key: bytes = MASK  # used when masked

    def encode(self) -> bytes:
        mask = self.key if self.masked else None
        return wire(self.opcode, self.payload, fin=self.fin, rsv=self.rsv, mask=mask, form=self.form)


SMALL_SIZES = st.one_of(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.sampled_from([125, 126, 127]))
SIZES = st.one_of(SMALL_SIZES, SMALL_SIZES, st.sampled_from([65535, 65536, 65537]))
KEYS = st.binary(min_size=4, max_size=4)
CLOSE_PAYLOADS = st.one_of(
    st.just(b""),
    st.builds(
        lambda c, r: struct.pack("!H", c) + r.encode(),
        st.sampled_from([1000, 1001, 1011, 3000, 4999]),
        st.text(max_size=20),
    ),
    st.builds(lambda c: struct.pack("!H", c), st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 2999, 5000])),
    st.builds(lambda c: struct.pack("!H", c) + b"\xc3(", st.sampled_from([1000, 1005])),
    st.binary(max_size=4),
)


def rarely(flag: bool) -> st.SearchStrategy[bool]:
    """True about one time in eight when `flag` allows it."""
    return st.sampled_from([False] * 7 + [True]) if flag else st.just(False)


class Tiled(bytes):
    """A payload made of a repeated pattern, shown as such: a failing example stays readable at 64 KiB."""

    def __repr__(self) -> str:
        if len(self) <= 32:
            return bytes.__repr__(self)
        period = next(p for p in range(1, 8) if self[p:] == self[:-p])
        return f"({bytes(self[:period])!r} * {len(self) // period + 1})[:{len(self)}]"


@st.composite
def payloads(draw: st.DrawFn, sizes: st.SearchStrategy[int] = SIZES) -> bytes:
    size = draw(sizes)
    pattern = draw(st.binary(min_size=1, max_size=7))
    return Tiled((pattern * (size // len(pattern) + 1))[:size])


@st.composite
def frame_specs(draw: st.DrawFn, masked: bool, breakage: bool, sizes: st.SearchStrategy[int]) -> Spec:
    """A frame, nearly always valid on its own; with `breakage`, now and then a bit, opcode or rule broken."""
    opcode = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.PING, Opcode.PONG]))
    payload = draw(payloads(st.integers(0, 125)) if opcode >= Opcode.CLOSE else payloads(sizes))
    form = draw(st.sampled_from(["min"] * 6 + ["16", "64"]))
    spec = Spec(opcode, payload, masked=masked, form=form, key=draw(KEYS))
    if spec.form == "16" and len(payload) >= 65536:
        spec = replace(spec, form="64")
    if draw(rarely(breakage)):
        how = draw(st.sampled_from(["rsv", "opcode", "mask", "control", "cont"]))
        if how == "rsv":
            spec = replace(spec, rsv=draw(st.integers(1, 7)))
        elif how == "opcode":
            spec = replace(spec, opcode=draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])))
        elif how == "mask":
            spec = replace(spec, masked=not masked)
        elif how == "control":
            spec = replace(
                spec,
                opcode=draw(st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE])),
                fin=draw(st.booleans()),
                payload=draw(payloads(st.integers(120, 130))),
            )
        else:
            spec = replace(spec, opcode=Opcode.CONT)
    return spec


@dataclass(frozen=True)
class Stream:
    specs: list[Spec]
    tail: bytes  # a header declaring a length with its top bit set, or nothing
    data: bytes = field(repr=False)


@st.composite
def streams(draw: st.DrawFn, masked: bool, sizes: st.SearchStrategy[int] = SIZES) -> Stream:
    """Messages (some fragmented, with control frames inside), maybe a close, maybe a huge declared length."""
    breakage = draw(st.booleans())
    specs: list[Spec] = []
    for _ in range(draw(st.integers(0, 5))):
        spec = draw(frame_specs(masked, breakage, sizes))
        if spec.opcode in (Opcode.TEXT, Opcode.BINARY) and draw(st.booleans()):
            # Fragment it: continuations, control frames in between, maybe a frame that breaks in.
            specs.append(replace(spec, fin=False))
            for _ in range(draw(st.integers(0, 3))):
                inner = draw(frame_specs(masked, breakage, sizes))
                if inner.opcode in (Opcode.TEXT, Opcode.BINARY) and not draw(rarely(breakage)):
                    inner = replace(inner, opcode=Opcode.CONT, fin=False)
                elif draw(rarely(breakage)):
                    inner = Spec(Opcode.CLOSE, draw(CLOSE_PAYLOADS), masked=masked, key=draw(KEYS))
                specs.append(inner)
            if not draw(rarely(breakage)):
                specs.append(Spec(Opcode.CONT, draw(payloads(sizes)), masked=masked, key=draw(KEYS)))
        else:
            specs.append(spec)
    if draw(st.booleans()):
        specs.append(Spec(Opcode.CLOSE, draw(CLOSE_PAYLOADS), masked=masked, key=draw(KEYS)))
    tail = b""
    if draw(rarely(True)):
        tail = wire(Opcode.BINARY, b"", mask=MASK if masked else None, form="64msb", declared=draw(sizes))
    return Stream(specs, tail, b"".join(s.encode() for s in specs) + tail)


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(p % (len(stream) + 1) for p in points), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


WS_CODES = {
    ProtocolError: CloseCode.PROTOCOL_ERROR,
    PayloadTooBig: CloseCode.MESSAGE_TOO_BIG,
    UnicodeDecodeError: CloseCode.INVALID_DATA,
}
MAX_SIZES = st.sampled_from([None, None, None, 0, 20, 125, 126, 65536, 1 << 20])
DIFFERENTIAL = settings(
    max_examples=250 * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


class Passing:
    """A fast path's `passes` that takes or refuses frames as told (cycling through `decisions`), and checks the
    reader's side of the contract: only plain frames are offered (final, text only if ASCII), and nothing more
    within a read once one was refused."""

    def __init__(self, decisions: list[bool]) -> None:
        self.decisions = decisions or [True]
        self.calls = 0
        self.taken: list[tuple[Opcode, bool, bytes]] = []  # the heads of the frames passed on, in order
        self.refused_in_read = False

    def __call__(self, payload: bytes, text: bool) -> bool:
        assert not self.refused_in_read, "offered a frame after one was refused in the same read"
        assert isinstance(payload, bytes) and (not text or payload.isascii())
        take = self.decisions[self.calls % len(self.decisions)]
        self.calls += 1
        if take:
            self.taken.append((Opcode.TEXT if text else Opcode.BINARY, True, payload))
        else:
            self.refused_in_read = True
        return take


def check_against_websockets(
    masked: bool, stream: bytes, reads: list[bytes], max_size: int | None, passing: Passing | None = None
) -> None:
    """After every read, the same frames from both; in the end the same close code, or the same close. With
    `passing`, the frames passed on count as handed out, in their place, and their bytes tile the stream too."""
    ours = FrameReader(masked=masked, max_message_bytes=max_size)
    theirs = Protocol(SERVER if masked else CLIENT, max_size=max_size)
    handed: list[Frame] = []
    spans: list[memoryview] = []  # the wire bytes of everything handed out or passed on, in order
    for data in reads:
        if passing is None:
            items: list[Frame | memoryview] = list(ours.receive_data(data))
        else:
            passing.refused_in_read = False
            before = len(passing.taken)
            items = ours.receive(data, passing)
            assert ours.passed == len(passing.taken) - before
            assert ours.passed_bytes == sum(len(h[2]) for h in passing.taken[before:])
            runs = [i for i, item in enumerate(items) if isinstance(item, memoryview)]
            # First, before any Frame: the frame an earlier read began (its own buffer), then the run in this one.
            assert runs in ([], [0], [0, 1]), runs
        theirs.receive_data(data)
        events = theirs.events_received()
        frames = [item for item in items if isinstance(item, Frame)]
        got = heads(frames)
        if passing is not None:
            got = passing.taken[before:] + got
        assert got == [(Opcode(e.opcode), e.fin, bytes(e.data)) for e in events]
        for frame, event in zip(frames, events[len(events) - len(frames) :], strict=True):
            if frame.opcode is Opcode.CLOSE:
                parsed = WsClose.parse(bytes(event.data))
                assert frame.close == Close(parsed.code, parsed.reason)
        for item in items:
            if isinstance(item, Frame):
                assert item.start == sum(len(s) for s in spans)
                spans.append(item.raw)
            else:
                spans.append(item)
        handed += frames
    # Forwarding as is means byte for byte: the frames' spans tile the stream from its start.
    assert b"".join(spans) == stream[: sum(len(s) for s in spans)]
    note_event(f"{len(reads)} reads" if len(reads) < 4 else "4+ reads")
    failure = ours.failure
    if failure is not None and theirs.parser_exc is None:
        # We refuse a frame from its header; websockets once its payload is in: give it the rest (any bytes).
        assert len(stream) - sum(len(s) for s in spans) < 14 + 65537, "websockets had all of it, yet read on"
        note_event("refused from the header before websockets had the payload")
        theirs.receive_data(bytes(1 << 17))
        assert theirs.events_received() == []
        if theirs.parser_exc is None:
            # The frame declares more than we could ever feed (a 64-bit length with the top bit set): websockets
            # still waits for its payload, to refuse the frame only then, with one of the codes we chose.
            assert failure.code in (CloseCode.PROTOCOL_ERROR, CloseCode.MESSAGE_TOO_BIG), failure
            note_event("refused from the header; websockets still waits for a payload larger than we feed")
            return
    note_event(f"outcome: {failure.code} {re.sub(r'[0-9]+', 'N', failure.reason)}" if failure else ours.state.value)
    if theirs.parser_exc is None:
        assert ours.failure is None
        assert ours.state is (ReaderState.CLOSED if theirs.close_rcvd else ReaderState.OPEN)
    else:
        assert theirs.close_sent is not None
        assert theirs.close_sent.code == WS_CODES[type(theirs.parser_exc)]
        assert ours.failure is not None and ours.failure.code == theirs.close_sent.code, ours.failure


@given(streams(masked=True), MAX_SIZES, st.lists(st.integers(0, 1 << 20), max_size=8))
@DIFFERENTIAL
def test_client_streams_read_as_websockets_reads_them(stream: Stream, max_size: int | None, points: list[int]) -> None:
    check_against_websockets(True, stream.data, cut(stream.data, points), max_size)


@given(streams(masked=False), MAX_SIZES, st.lists(st.integers(0, 1 << 20), max_size=8))
@DIFFERENTIAL
def test_upstream_streams_read_as_websockets_reads_them(
    stream: Stream, max_size: int | None, points: list[int]
) -> None:
    check_against_websockets(False, stream.data, cut(stream.data, points), max_size)


@given(
    st.booleans(),
    st.data(),
    MAX_SIZES,
    st.lists(st.integers(0, 1 << 20), max_size=8),
    st.lists(st.booleans(), max_size=6),
)
@DIFFERENTIAL
def test_streams_read_through_the_fast_path_as_websockets_reads_them(
    masked: bool, data: st.DataObject, max_size: int | None, points: list[int], decisions: list[bool]
) -> None:
    """The fast path (`receive` with `passes`): frames passed on and frames handed out are, in order, the frames
    websockets reads; their bytes tile the stream; the same close code or close in the end."""
    stream = data.draw(streams(masked=masked))
    check_against_websockets(masked, stream.data, cut(stream.data, points), max_size, Passing(decisions))


@given(streams(masked=True, sizes=SMALL_SIZES), MAX_SIZES)
@settings(max_examples=60 * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_small_streams_fed_byte_by_byte_read_as_websockets_reads_them(stream: Stream, max_size: int | None) -> None:
    data = stream.data
    check_against_websockets(True, data, [data[i : i + 1] for i in range(len(data))], max_size)


LATE_REFUSALS = st.one_of(
    st.builds(Spec, st.sampled_from([*Opcode]), payloads(), rsv=st.integers(1, 7), masked=st.just(False)),
    st.builds(
        Spec,
        st.sampled_from([Opcode.CLOSE, Opcode.PING, Opcode.PONG]),
        payloads(st.integers(126, 300)),
        masked=st.just(False),
    ),
    st.builds(
        Spec, st.sampled_from([Opcode.CLOSE, Opcode.PING]), payloads(), fin=st.just(False), masked=st.just(False)
    ),
    st.builds(Spec, st.sampled_from([Opcode.CONT, Opcode.TEXT]), payloads(), masked=st.just(False)),
)


@given(streams(masked=False), LATE_REFUSALS, MAX_SIZES, st.data())
@settings(max_examples=150 * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_frame_is_refused_from_its_header_where_websockets_waits_for_its_payload(
    stream: Stream, broken: Spec, max_size: int | None, data: st.DataObject
) -> None:
    """Reserved bits, control frame rules, fragmentation: websockets checks them once the payload is in, we from
    the header. The stream ends inside that frame: the same frames before it, and we may have refused it."""
    frame = broken.encode()
    header_length = len(frame) - len(broken.payload)
    cut = data.draw(st.integers(header_length, len(frame)), label="bytes of it sent")
    short = stream.data + frame[:cut]
    check_against_websockets(False, short, [short], max_size)


VALID_FRAMES = st.one_of(
    st.builds(
        lambda op, p, fin: (op, p, fin),
        st.sampled_from([Opcode.CONT, Opcode.TEXT, Opcode.BINARY]),
        payloads(),
        st.booleans(),
    ),
    st.builds(lambda op, p: (op, p, True), st.sampled_from([Opcode.PING, Opcode.PONG]), payloads(st.integers(0, 125))),
    st.builds(lambda p: (Opcode.CLOSE, p, True), st.sampled_from([b"", b"\x03\xe8", b"\x0f\xa0bye"])),
)


@given(VALID_FRAMES, st.binary(min_size=4, max_size=4))
@settings(max_examples=100 * _SCALE, deadline=None)
def test_our_writer_and_websockets_serializer_write_the_same_frames(
    frame: tuple[Opcode, bytes, bool], key: bytes
) -> None:
    """Unmasked: the same bytes. Masked: the same header, and each side's parser reads the other's frame."""
    opcode, payload, fin = frame
    ws_frame = WsFrame(WsOpcode(opcode), payload, fin)
    unmasked = ws_frame.serialize(mask=False)
    assert FrameWriter(masked=False).frame(opcode, payload, fin=fin) == unmasked
    assert wire(opcode, payload, fin=fin) == unmasked  # the streams' builder writes valid frames as websockets does
    ours = FrameWriter(masked=True, mask_source=lambda n: key).frame(opcode, payload, fin=fin)
    theirs = ws_frame.serialize(mask=True)
    header_length = len(theirs) - len(payload)
    assert ours[: header_length - 4] == theirs[: header_length - 4] and ours[header_length - 4 : header_length] == key
    # A continuation needs a message to continue: both parsers read an empty first fragment before it.
    opening = wire(Opcode.TEXT, fin=False, mask=key) if opcode is Opcode.CONT else b""
    reader = FrameReader(masked=True, max_message_bytes=None)
    read = reader.receive_data(opening + theirs)[-1]
    assert (read.opcode, read.fin, bytes(read.payload())) == (opcode, fin, payload)
    protocol = Protocol(SERVER, max_size=None)
    protocol.receive_data(opening + ours)
    event = protocol.events_received()[-1]
    assert (event.opcode, event.fin, bytes(event.data)) == (opcode, fin, payload)


def test_the_fast_path_leaves_a_split_header_to_the_general_path() -> None:
    """A read that ends inside a 16- or 64-bit length: the run stops there, and the frame is read once whole."""
    taken: list[bytes] = []

    def passes(payload: bytes, text: bool) -> bool:
        taken.append(payload)
        return True

    for size in (200, 70_000):
        reader = FrameReader(masked=False, max_message_bytes=None)
        small, big = wire(Opcode.BINARY, b"ab"), wire(Opcode.BINARY, b"x" * size)
        first = reader.receive(small + big[:3], passes)
        assert [bytes(b) for b in first] == [small] and reader.passed == 1 and reader.buffered == 3
        rest = reader.receive(big[3:], passes)
        assert [bytes(b) for b in rest] == [big] and reader.passed_bytes == size
    assert taken == [b"ab", b"x" * 200, b"ab", b"x" * 70_000]
