"""The fast path reads an event's type off the front of a frame; it must agree with a full parse, always."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core import events
from proxy.core.events import decode, sniff_type
from proxy.core.session import Session

TYPES = [
    "input_audio_buffer.append",
    "response.output_audio.delta",
    "session.reset",
    "conversation.item.created",
    "conversation.item.deleted",
    "error",
    "response.done",
    "session.checkpoint",
    "x",
]
names = st.sampled_from(["type", "event_id", "audio", "delta", "item", "typ", "types", "Type", "t\u00fcpe"])
texts = st.text(max_size=12) | st.sampled_from(TYPES) | st.sampled_from(['"type"', "\\u0074ype", '\\"', "\\"])
leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts
values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3), max_leaves=8
)


@st.composite
def event_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = draw(st.dictionaries(names, values, max_size=5))
    if draw(st.booleans()):
        position = draw(st.integers(0, len(obj)))
        items = list(obj.items())
        items.insert(position, ("type", draw(st.sampled_from(TYPES) | texts)))
        obj = dict(items)
    return obj


def serialise(obj: dict[str, Any], style: int) -> bytes:
    if style == 0:
        return orjson.dumps(obj)
    if style == 1:
        return json.dumps(obj, ensure_ascii=True).encode()
    if style == 2:
        return json.dumps(obj, ensure_ascii=False, indent=1).encode()
    return json.dumps(obj, separators=(" , ", " : ")).encode()


def agrees(frame: bytes | str) -> None:
    sniffed = sniff_type(frame)
    if sniffed is None:
        return
    parsed = decode(frame)
    # A frame the parser rejects is forwarded untouched either way; one it accepts must have that type.
    assert parsed is None or parsed.get("type") == sniffed, (frame, sniffed, parsed)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(event_objects(), st.integers(0, 3))
def test_sniffed_type_equals_the_parsed_type(obj: dict[str, Any], style: int) -> None:
    """For any object in any formatting (bytes and str), a sniffed type is the type a full parse finds."""
    frame = serialise(obj, style)
    agrees(frame)
    agrees(frame.decode())


@settings(max_examples=300)
@given(st.binary(max_size=80), st.sampled_from(TYPES))
def test_arbitrary_bytes_after_a_type_prefix_never_fool_it(tail: bytes, etype: str) -> None:
    """Garbage after a well-formed prefix never yields a type other than the one a parser would take."""
    agrees(b'{"type":"' + etype.encode() + b'"' + tail)


def test_duplicate_and_escaped_type_keys_fall_back_to_a_full_parse() -> None:
    """A second `type` key, or an escape that could spell one, makes the fast path step aside."""
    assert sniff_type(b'{"type":"input_audio_buffer.append","type":"session.reset"}') is None
    assert sniff_type(b'{"type":"input_audio_buffer.append","\\u0074ype":"session.reset"}') is None
    assert sniff_type('{"type":"input_audio_buffer.append","audio":"\\"type\\""}') is None
    assert sniff_type(b'{"item":{"type":"message"},"type":"x"}') is None
    assert sniff_type(b'  {"event_id":"e_1", "type" :"response.output_audio.delta","delta":"AAA="}') == (
        "response.output_audio.delta"
    )


@settings(max_examples=200)
@given(st.lists(st.tuples(event_objects(), st.integers(0, 3), st.booleans()), max_size=12))
def test_session_decisions_do_not_depend_on_the_fast_path(frames: list[tuple[dict[str, Any], int, bool]]) -> None:
    """A session with the fast path and one with it turned off send exactly the same frames both ways."""

    def run(fast: bool, passes: bool = False) -> tuple[list[Any], list[Any]]:
        original = events.sniff_type
        session = Session(clock=lambda: 0.0)
        import proxy.core.session as session_module

        session_module.sniff_type = original if fast else (lambda data: None)  # type: ignore[assignment]
        up: list[Any] = []
        down: list[Any] = []
        try:
            for obj, style, upstream in frames:
                frame = serialise(obj, style)
                # As the Protocol relay does: a frame the session passes is sent as it came, in its place.
                if passes and (session.upstream_passes if upstream else session.client_passes)(frame, True):
                    (down if upstream else up).append(frame)
                    continue
                (session.upstream_frame if upstream else session.client_frame)(frame)
                more_up, more_down = session.data_to_send()
                up += more_up
                down += more_down
        finally:
            session_module.sniff_type = original
        # Frames the proxy made carry fresh event ids; compare them without those.
        return [_strip(f) for f in up], [_strip(f) for f in down]

    assert run(True) == run(False) == run(True, passes=True)


def test_what_the_session_passes_on_as_it_came() -> None:
    """The relay's fast path asks the session first: audio (either way) and binary frames pass; a command the
    core reads, or anything while a reset runs, does not, and then nothing was counted."""
    session = Session(clock=lambda: 0.0)
    append = b'{"type":"input_audio_buffer.append","audio":"AAAA"}'
    assert session.client_passes(append, True) and session.audio_pending
    assert session.client_passes(b"\x00\x01", False)
    assert not session.client_passes(b'{"type":"conversation.item.delete","item_id":"a"}', True)
    assert session.upstream_passes(b'{"type":"response.output_audio.delta","delta":"AAAA"}', True)
    assert session.upstream_passes(b"\x00", False)
    assert not session.upstream_passes(b'{"type":"response.done","response":{}}', True)
    session.client_frame(b'{"type":"session.reset","event_id":"r"}')
    assert session.paused
    assert not session.client_passes(append, True) and not session.client_passes(b"\x00", False)
    assert session.upstream_passes(b'{"type":"response.output_audio.delta","delta":"AAAA"}', True)


def _strip(frame: bytes | str) -> Any:
    parsed = decode(frame)
    if parsed is not None and str(parsed.get("event_id", "")).startswith("rrp_"):
        parsed.pop("event_id")
        return parsed
    return frame


def test_a_frame_with_many_quotes_after_the_type_is_parsed_in_full() -> None:
    """Before the last string value a short head is searched at once; a long one is hopped quote to quote, and
    past a bounded number of quotes the fast path steps aside instead of hopping on."""
    short = {"type": "input_audio_buffer.append", **{f"k{i}": "v" for i in range(40)}}
    assert sniff_type(orjson.dumps(short)) == "input_audio_buffer.append"
    assert sniff_type(orjson.dumps({**short, "k9": {"type": "x"}})) is None
    many = {"type": "input_audio_buffer.append", **{f"k{i}": "v" * 60 for i in range(40)}}
    assert sniff_type(orjson.dumps(many)) is None
    few = {"type": "input_audio_buffer.append", "event_id": "e", "audio": "A" * 100_000}
    assert sniff_type(orjson.dumps(few)) == "input_audio_buffer.append"
    assert sniff_type(orjson.dumps(few).decode()) == "input_audio_buffer.append"
    audio_first = {"type": "input_audio_buffer.append", "audio": "A" * 100_000, "event_id": "e"}
    assert sniff_type(orjson.dumps(audio_first)) == "input_audio_buffer.append"
    assert sniff_type(orjson.dumps({**audio_first, "x": {"type": "y"}})) is None
    assert sniff_type(b'{"type":"input_audio_buffer.append","audio":"AAAA') == "input_audio_buffer.append"
    assert sniff_type(b'{"type":"response.done","type"') is None  # the last string is "type" itself


def test_a_str_frame_with_a_lone_surrogate_is_not_a_crash() -> None:
    """A str frame holding a lone surrogate is sniffed without raising; a full parse then rejects it."""
    frame = '{"type":"input_audio_buffer.append","audio":"\ud800"}'
    assert sniff_type(frame) == "input_audio_buffer.append"
    assert decode(frame) is None


@settings(max_examples=500)
@given(
    st.lists(st.sampled_from([b'"', b"type", b'"type"', b"A" * 7, b"A" * 700, b":", b","]), max_size=30),
    st.integers(0, 40),
)
def test_the_later_key_search_misses_no_occurrence(parts: list[bytes], pos: int) -> None:
    """Against the plain search: every `"type"` after `pos` is found; a "maybe" only past the quote bound."""
    data = b"".join(parts)
    found = sniff_type(b'{"type":"x"' + data[pos:]) is None  # the search starts right after the prefix
    plain = data.find(b'"type"', pos) != -1
    assert found or not plain
    if found and not plain:
        assert data.count(b'"', pos) > events._MAX_QUOTES
