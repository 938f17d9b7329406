"""Hostile input for the sans-I/O core: arbitrary frames both ways, in any interleaving, during resets too.

Where ``test_properties.py`` plays a well-behaved client and server, this plays neither: each step feeds the
core one of

- a client frame: random bytes or text (a TEXT frame, as bytes or str), a BINARY frame, deeply nested JSON,
  an event with a real, synthetic or made-up type and random field values (keep lists of any shape, event ids
  of any JSON type, oversized lists), a well-formed reset or checkpoint;
- an upstream frame: the same kinds of garbage, events the core reads (items, deletes, clears, commits,
  responses, errors with and without ``event_id``, naming our ``rrp_`` ids or not), each with random values;
- an answer to one of the proxy's own commands (ack, error with its event id, error with a null id, or a
  second answer to one already answered);
- the clock jumping (past a reset's deadline or not) and ``handle_timeout``.

Checks, after every step and once the session is brought to rest (every reset timed out, nothing held):

- no exception, ever; what comes out each way is a list of frames, and what the proxy itself says to the
  client is a JSON object;
- the held queue never exceeds ``max_held_events`` / ``max_held_bytes``; a frame over either limit is answered
  at once with ``held_events_overflow`` naming its ``event_id`` (or null when it has none);
- every non-synthetic client frame reaches the upstream exactly once, unchanged (same type, same bytes; a
  command the client left unnamed may be named with a proxy ``rrp_`` event id), in the client's order, unless
  it was refused for overflow: nothing is dropped silently;
- every synthetic event (reset or checkpoint) gets exactly one answer: completed / checkpoint created, or an
  error naming it (invalid, timed out, overflow).

Run longer with ``HYPOTHESIS_PROFILE=long`` (3,000 examples) or ``HYPOTHESIS_PROFILE=soak`` (30,000).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.core.events import decode
from proxy.core.session import Binary, Frame, Session, SessionConfig

Event = dict[str, Any]

_PROFILES = {"default": 300, "long": 3_000, "soak": 30_000}
for _name, _examples in _PROFILES.items():
    settings.register_profile(
        f"rrp-fuzz-{_name}",
        max_examples=_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
PROFILE = settings.get_profile(f"rrp-fuzz-{os.environ.get('HYPOTHESIS_PROFILE', 'default')}")

RESET_TYPES = ("session.reset", "conversation.delete.all")
CHECKPOINT_TYPES = ("session.checkpoint",)
SYNTHETIC = frozenset({*RESET_TYPES, *CHECKPOINT_TYPES})
PROXY_COMMANDS = frozenset({"response.cancel", "input_audio_buffer.clear", "conversation.item.delete"})
PROXY_ERROR_CODES = frozenset({"invalid_session_reset", "session_reset_timeout", "held_events_overflow"})
PROXY_TYPES = frozenset({"session.reset.completed", "session.checkpoint.created"})
TIMEOUT = 10.0

CLIENT_TYPES = [
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    *SYNTHETIC,
]
UPSTREAM_TYPES = [
    "session.created",
    "conversation.item.created",
    "conversation.item.added",
    "conversation.item.done",
    "conversation.item.deleted",
    "input_audio_buffer.committed",
    "input_audio_buffer.cleared",
    "response.created",
    "response.output_item.added",
    "response.done",
    "response.output_audio.delta",
    "error",
]
# The upstream never speaks with the proxy's voice: its errors carry the API's codes, never the proxy's own.
UPSTREAM_CODES = [
    "item_delete_invalid_item_id",
    "response_cancel_not_active",
    "conversation_already_has_active_response",
    "input_audio_buffer_commit_empty",
    "item_create_invalid_previous_item_id",
    "invalid_value",
    None,
]

ids = st.sampled_from(["a", "b", "c", "item_1", "root", "", "rrp_1", "rrp_2", "rrp_3", "rrp_7", "resp_1", "resp_2"])
client_ids = st.sampled_from(["e1", "e2", "e3", "", "r1", "r2"])  # never "rrp_": those are the proxy's own
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | ids
)
values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ids, inner, max_size=4), max_leaves=12
)


def deep(depth: int, style: int) -> str:
    if style == 0:
        return "[" * depth + "]" * depth
    if style == 1:
        return '{"a":' * depth + "1" + "}" * depth
    return '{"type":"session.reset","keep_item_ids":' + "[" * depth + "]" * depth + "}"


@st.composite
def structured(draw: st.DrawFn, types: list[str], event_ids: st.SearchStrategy[str], upstream: bool) -> Event:
    event: Event = {"type": draw(st.sampled_from(types) | st.text(max_size=8) | values)}
    if draw(st.booleans()):
        event["event_id"] = draw(event_ids | values)
    fields = ["item_id", "item", "response", "previous_item_id", "response_id", "session", "audio", "delta"]
    if not upstream:
        fields += ["keep_item_ids", "to", "cancel_response", "clear_input_audio"]
    for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
        event[name] = draw(values)
    kind = draw(st.integers(0, 3))
    if kind == 1:
        event["item"] = {"id": draw(ids | values), "type": "message", "role": "user"}
    elif kind == 2:
        event["response"] = {
            "id": draw(ids | values),
            "status": draw(st.sampled_from(["cancelled", "completed", "in_progress"])),
            "conversation_id": draw(st.none() | st.just("conv_1")),
            "usage": draw(values),
        }
    elif kind == 3 and upstream:
        event["error"] = {
            "code": draw(st.sampled_from(UPSTREAM_CODES)),
            "event_id": draw(st.none() | ids),
            "message": draw(st.sampled_from(["", "the item with id 'a' does not exist.", "x 'rrp_1' does not exist"])),
        }
    return event


@st.composite
def resets(draw: st.DrawFn) -> Event:
    """A well-formed synthetic event (or one field off), so resets do run and hold frames back."""
    event: Event = {"type": draw(st.sampled_from(sorted(SYNTHETIC)))}
    if draw(st.booleans()):
        event["event_id"] = draw(client_ids)
    if event["type"] in RESET_TYPES:
        if draw(st.booleans()):
            event["keep_item_ids"] = draw(st.lists(ids, max_size=4))
        if draw(st.integers(0, 4)) == 0:
            event["to"] = "checkpoint"
        for flag in ("cancel_response", "clear_input_audio"):
            if draw(st.integers(0, 3)) == 0:
                event[flag] = draw(st.booleans())
    return event


def as_frame(draw: st.DrawFn, data: bytes) -> Frame:
    """A TEXT frame as the relay hands it over (bytes), or as a decoded str (never with lone surrogates: a str
    frame comes from decoding a WebSocket message, which cannot hold one)."""
    return data.decode() if draw(st.booleans()) else data


@st.composite
def frames(draw: st.DrawFn, upstream: bool) -> Frame:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=64))  # a TEXT frame's payload, not necessarily UTF-8 nor JSON
    if kind == 1:
        return draw(st.text(max_size=64))
    if kind == 2:
        return Binary(draw(st.binary(max_size=32)))
    if kind == 3:
        return as_frame(
            draw, deep(draw(st.sampled_from([1_000, 1_025, 5_000, 100_000])), draw(st.integers(0, 2))).encode()
        )
    if kind == 4:  # pieces that fool a prefix reader: a synthetic-looking start, cut short or escaped
        pieces = st.sampled_from([b'{"type":"session.reset"', b'{"type":"error"', b",", b"{", b'"', b"\\", b"}"])
        return as_frame(draw, b"".join(draw(st.lists(pieces, min_size=1, max_size=5))))
    if kind == 5 and not upstream:
        return as_frame(draw, orjson.dumps(draw(resets())))
    if kind == 6 and not upstream:
        keep = [f"k{i}" for i in range(draw(st.sampled_from([0, 1_000, 20_000])))]
        return as_frame(draw, orjson.dumps({"type": "session.reset", "event_id": "big", "keep_item_ids": keep}))
    types = UPSTREAM_TYPES if upstream else CLIENT_TYPES
    event = draw(structured(types, ids if upstream else client_ids, upstream))
    return as_frame(draw, orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS))


item_ids = st.sampled_from(["a", "b", "c", "item_1", "rrp_1"])
response_ids = st.sampled_from(["resp_1", "resp_2", "rrp_2"])


@st.composite
def plain_client_events(draw: st.DrawFn) -> Frame:
    """Ordinary, well-formed client events: the kind a reset holds back and the core keeps books on."""
    event: Event = draw(
        st.sampled_from(
            [
                {"type": "conversation.item.create", "item": {"type": "message", "role": "user"}},
                {"type": "response.create"},
                {"type": "response.create", "response": {"conversation": "none"}},
                {"type": "input_audio_buffer.append", "audio": "AAAA"},
                {"type": "input_audio_buffer.commit"},
                {"type": "input_audio_buffer.clear"},
                {"type": "conversation.item.delete"},
                {"type": "response.cancel"},
            ]
        )
    )
    event = {**event}
    if event["type"] == "conversation.item.create" and draw(st.booleans()):
        event["item"] = {**event["item"], "id": draw(item_ids)}
    if event["type"] == "conversation.item.delete":
        event["item_id"] = draw(item_ids)
    if draw(st.booleans()):
        event["event_id"] = draw(client_ids)
    return as_frame(draw, orjson.dumps(event))


@st.composite
def plain_upstream_events(draw: st.DrawFn) -> Frame:
    """Well-formed server events that change what the core tracks: items, commits, responses, deletes."""
    item, rid = draw(item_ids), draw(response_ids)
    kind = draw(st.integers(0, 6))
    if kind == 0:
        event: Event = {"type": draw(st.sampled_from(["conversation.item.created", "conversation.item.added"]))}
        event["item"] = {"id": item, "type": "message"}
        if draw(st.booleans()):
            event["previous_item_id"] = draw(st.none() | item_ids)
    elif kind == 1:
        event = {"type": "conversation.item.done", "item": {"id": item}}
    elif kind == 2:
        event = {"type": "input_audio_buffer.committed", "item_id": item}
    elif kind == 3:
        event = {"type": "response.created", "response": {"id": rid}}
        if draw(st.booleans()):
            event["response"]["conversation_id"] = draw(st.none() | st.just("conv_1"))
    elif kind == 4:
        event = {"type": "response.output_item.added", "response_id": rid, "item": {"id": item}}
    elif kind == 5:
        event = {
            "type": "response.done",
            "response": {"id": rid, "status": draw(st.sampled_from(["completed", "cancelled"]))},
        }
    else:
        event = {"type": "conversation.item.deleted", "item_id": item}
    return as_frame(draw, orjson.dumps(event))


steps = st.one_of(
    st.tuples(st.just("client"), resets().map(orjson.dumps)),
    st.tuples(st.just("client"), plain_client_events()),
    st.tuples(st.just("client"), frames(upstream=False)),
    st.tuples(st.just("upstream"), plain_upstream_events()),
    st.tuples(st.just("upstream"), frames(upstream=True)),
    st.tuples(st.just("answer"), st.integers(0, 7), st.sampled_from(["ack", "ack", "error", "null_error", "again"])),
    st.tuples(st.just("answer"), st.integers(0, 7), st.just("ack")),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, TIMEOUT, TIMEOUT + 1.0])),
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kind_of(frame: Frame) -> str:
    return "binary" if isinstance(frame, Binary) else type(frame).__name__


def as_event(frame: Frame) -> Event | None:
    return None if isinstance(frame, Binary) else decode(frame)


def same_event(sent: Frame, want: Frame) -> bool:
    """`sent` is the client's frame `want` unchanged (same type, same bytes) — or, for a command the client left
    unnamed, the same event named with a proxy event id, so that an error answering it can be told apart."""
    if kind_of(sent) == kind_of(want) and sent == want:
        return True
    sent_event, want_event = as_event(sent), as_event(want)
    if sent_event is None or want_event is None or isinstance(want_event.get("event_id"), str):
        return False
    named = str(sent_event.pop("event_id", "")).startswith("rrp_")
    want_event.pop("event_id", None)
    return named and sent_event == want_event


def type_of(event: Event | None) -> str | None:
    value = event.get("type") if event is not None else None
    return value if isinstance(value, str) else None


@dataclass
class Driver:
    """Feeds the core, takes what it sends after every step, and keeps the books the checks need."""

    config: SessionConfig
    clock: FakeClock = field(default_factory=FakeClock)
    expected_up: list[Frame] = field(default_factory=list)  # non-synthetic client frames, not refused
    sent_up: list[Frame] = field(default_factory=list)  # everything the core sent upstream
    commands: list[Event] = field(default_factory=list)  # the proxy's own commands, answerable
    answered: list[Event] = field(default_factory=list)
    asked: Counter[str | None] = field(default_factory=Counter)  # synthetic requests by event id
    replies: Counter[str | None] = field(default_factory=Counter)  # their answers by event id
    refused = 0
    completed = 0
    most_held = 0

    def __post_init__(self) -> None:
        self.session = Session(self.config, clock=self.clock)

    def step(self, op: tuple[Any, ...]) -> None:
        s = self.session
        if op[0] == "client":
            self.client(op[1])
        elif op[0] == "upstream":
            s.upstream_frame(op[1])
            self.take()
        elif op[0] == "answer":
            self.answer(op[1], op[2])
        else:
            self.clock.now += op[1]
            s.handle_timeout()
            self.take()
        assert s.held_count <= self.config.max_held_events
        self.most_held = max(self.most_held, s.held_count)
        assert s._held_bytes <= self.config.max_held_bytes

    def client(self, frame: Frame) -> None:
        event = as_event(frame)
        synthetic = type_of(event) in SYNTHETIC
        if synthetic:
            assert event is not None
            self.asked[event.get("event_id") if isinstance(event.get("event_id"), str) else None] += 1
        self.session.client_frame(frame)
        overflow = [e for e in self.take() if (e.get("error") or {}).get("code") == "held_events_overflow"]
        assert len(overflow) <= 1
        if overflow:
            self.refused += 1
            own_id = event.get("event_id") if event is not None else None
            assert overflow[0]["error"]["event_id"] == (own_id if isinstance(own_id, str) else None)
            assert overflow[0]["error"]["type"] == "proxy_error"
            if synthetic:
                self.replies[overflow[0]["error"]["event_id"]] += 1
        elif not synthetic:
            self.expected_up.append(frame)

    def answer(self, index: int, how: str) -> None:
        pool = self.answered if how == "again" else self.commands
        if not pool:
            return
        cmd = pool[index % len(pool)]
        if how != "again":
            self.commands.remove(cmd)
            self.answered.append(cmd)
        kind, eid = cmd["type"], cmd["event_id"]
        if how in ("ack", "again"):
            if kind == "conversation.item.delete":
                reply: Event = {"type": "conversation.item.deleted", "item_id": cmd.get("item_id")}
            elif kind == "input_audio_buffer.clear":
                reply = {"type": "input_audio_buffer.cleared"}
            else:
                reply = {"type": "response.done", "response": {"id": cmd.get("response_id"), "status": "cancelled"}}
        else:
            code = {
                "conversation.item.delete": "item_delete_invalid_item_id",
                "response.cancel": "response_cancel_not_active",
            }.get(kind, "invalid_value")
            message = f"the item with id '{cmd.get('item_id')}' does not exist."
            error = {"code": code, "event_id": eid if how == "error" else None, "message": message}
            reply = {"type": "error", "error": error}
        self.session.upstream_frame(orjson.dumps(reply))
        self.take()

    def take(self) -> list[Event]:
        """Take both ways; returns what the proxy itself said to the client (decoded)."""
        up, down = self.session.data_to_send()
        assert isinstance(up, list) and isinstance(down, list)
        for frame in up:
            assert isinstance(frame, bytes | str)
            self.sent_up.append(frame)
            event = as_event(frame)
            if event is not None and type_of(event) in PROXY_COMMANDS and str(event.get("event_id")).startswith("rrp_"):
                self.commands.append(event)
        own: list[Event] = []
        for frame in down:
            assert isinstance(frame, bytes | str)
            event = as_event(frame)
            if event is None:
                continue
            code = (event.get("error") or {}).get("code") if isinstance(event.get("error"), dict) else None
            if type_of(event) in PROXY_TYPES or (type_of(event) == "error" and code in PROXY_ERROR_CODES):
                assert str(event.get("event_id", "")).startswith("rrp_")
                own.append(event)
                if event["type"] == "session.reset.completed":
                    self.completed += 1
                    self.replies[event["reset_event_id"]] += 1
                elif event["type"] == "session.checkpoint.created":
                    self.replies[event["checkpoint_event_id"]] += 1
                elif code != "held_events_overflow":  # those are booked by client(), which knows the frame
                    self.replies[event["error"]["event_id"]] += 1
        return own

    def settle(self) -> None:
        """Let every reset time out (held ones start and time out in turn) until nothing is held."""
        s = self.session
        for _ in range(len(self.expected_up) + 1_000):
            if s.reset is None and s.held_count == 0:
                return
            self.clock.now += TIMEOUT + 1.0
            s.handle_timeout()
            self.take()
        raise AssertionError(f"the session did not come to rest: held={s.held_count} reset={s.reset}")

    def check_upstream(self) -> None:
        """The client's frames went up once each, unchanged, in order; everything else up is the proxy's."""
        expected = iter(self.expected_up)
        want = next(expected, None)
        for frame in self.sent_up:
            if want is not None and same_event(frame, want):
                want = next(expected, None)
                continue
            event = as_event(frame)
            assert event is not None and type_of(event) in PROXY_COMMANDS, f"unexpected frame upstream: {frame!r}"
            assert str(event.get("event_id")).startswith("rrp_")
        assert want is None, f"a client frame never reached the upstream: {want!r}"


@PROFILE
@given(
    st.lists(steps, min_size=10, max_size=80),
    st.sampled_from([1, 3, 10_000]),
    st.sampled_from([64, 100_000, 256 * 1024 * 1024]),
)
def test_any_frames_any_order_never_raise_and_nothing_is_dropped(
    ops: list[tuple[Any, ...]], max_held_events: int, max_held_bytes: int
) -> None:
    """Arbitrary frames both ways, answers and timeouts in any order: no exception, no silent loss, one answer each."""
    driver = Driver(
        SessionConfig(reset_timeout=TIMEOUT, max_held_events=max_held_events, max_held_bytes=max_held_bytes)
    )
    for op in ops:
        driver.step(op)
    driver.settle()
    driver.check_upstream()
    assert driver.replies == driver.asked
    event(f"resets completed before settling: {min(driver.completed, 3)}+")
    event(f"frames refused for overflow: {'some' if driver.refused else 'none'}")
    event(f"frames held back at once (max): {min(driver.most_held, 3)}+")
    event(f"proxy commands answered: {min(len(driver.answered), 3)}+")


def test_deep_nesting_and_invalid_utf8_are_forwarded_not_parsed() -> None:
    """100,000 levels of nesting and invalid UTF-8 neither raise nor start a reset; they go up as they came."""
    s = Session()
    frames: list[Frame] = [
        deep(100_000, 0).encode(),
        deep(100_000, 1),
        deep(100_000, 2).encode(),
        b'{"type":"session.reset","event_id":"\xff\xfe"}',
    ]
    for frame in frames:
        s.client_frame(frame)
        s.upstream_frame(frame)
    up, down = s.data_to_send()
    assert up == frames and down == frames
    assert s.reset is None
