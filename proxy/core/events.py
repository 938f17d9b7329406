"""The event shapes the core reads and writes: both protocol generations, and the synthetic events.

Reading: :func:`decode` turns a text frame into a dict (or ``None`` when it is not a JSON object); the core
only ever looks at a handful of fields, listed here by event type. Writing: the builders at the bottom make
the events the proxy itself sends, upstream (cancel, clear, delete) and to the client (completed, errors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.core.errors import InvalidSyntheticEvent

Event = dict[str, Any]

# --- server events the core reads -------------------------------------------------------------------
ITEM_CREATED = "conversation.item.created"  # beta
ITEM_ADDED = "conversation.item.added"  # GA
ITEM_DONE = "conversation.item.done"  # GA: the same item, finished
ITEM_EVENTS = frozenset({ITEM_CREATED, ITEM_ADDED, ITEM_DONE})
ITEM_DELETED = "conversation.item.deleted"
AUDIO_COMMITTED = "input_audio_buffer.committed"
AUDIO_CLEARED = "input_audio_buffer.cleared"
SPEECH_STARTED = "input_audio_buffer.speech_started"  # server VAD: names the item it will commit
SPEECH_STOPPED = "input_audio_buffer.speech_stopped"
TIMEOUT_TRIGGERED = "input_audio_buffer.timeout_triggered"  # GA idle timeout: commits the buffer on its own
RESPONSE_CREATED = "response.created"
RESPONSE_DONE = "response.done"
OUTPUT_ITEM_ADDED = "response.output_item.added"
SESSION_CREATED = "session.created"
SESSION_UPDATED = "session.updated"
ERROR = "error"

# --- client events the core reads or sends ----------------------------------------------------------
RESPONSE_CREATE = "response.create"
RESPONSE_CANCEL = "response.cancel"
ITEM_DELETE = "conversation.item.delete"
AUDIO_CLEAR = "input_audio_buffer.clear"
AUDIO_COMMIT = "input_audio_buffer.commit"
ITEM_CREATE = "conversation.item.create"
SESSION_UPDATE = "session.update"
AUDIO_APPEND = "input_audio_buffer.append"

# --- synthetic events (defaults; the type names are configurable) -----------------------------------
RESET_TYPES = ("session.reset", "conversation.delete.all")
CHECKPOINT_TYPES = ("session.checkpoint",)
USAGE_TYPES = ("session.usage",)
POLICY_TYPES = ("session.reset.policy",)
RESET_COMPLETED = "session.reset.completed"
SESSION_EXPIRING = "session.expiring"
CHECKPOINT_CREATED = "session.checkpoint.created"
USAGE_RESULT = "session.usage.result"
POLICY_UPDATED = "session.reset.policy.updated"

# --- error codes ----------------------------------------------------------------------------------
CODE_UNKNOWN_ITEM = "item_delete_invalid_item_id"
CODE_CANCEL_NOT_ACTIVE = "response_cancel_not_active"
CODE_ALREADY_ACTIVE = "conversation_already_has_active_response"
CODE_COMMIT_EMPTY = "input_audio_buffer_commit_empty"
CODE_CREATE_BAD_PREVIOUS = "item_create_invalid_previous_item_id"
CODE_INVALID_RESET = "invalid_session_reset"
CODE_RESET_TIMEOUT = "session_reset_timeout"
CODE_HELD_OVERFLOW = "held_events_overflow"
CODE_SESSION_EXPIRED = "session_expired"


# The fast path: most frames are audio (appends up, deltas down) that the core only forwards. Their type can
# be read off the front without parsing the whole frame when that provably gives what a full parse gives: the
# frame starts with a literal `{"type":"<plain name>"` (servers and SDKs put `type` first, sometimes after a
# plain `event_id`), and no other `"type"` key nor any backslash escape (which could spell `"type"` as
# `"\u0074ype"`) appears later that a parser could take as the type instead.
_WS = r"[ \t\r\n]*"
_PREFIX = (
    _WS
    + r"\{"
    + _WS
    + r'(?:"event_id"'
    + _WS
    + ":"
    + _WS
    + r'"[A-Za-z0-9_\-]{0,64}"'
    + _WS
    + ","
    + _WS
    + ")?"
    + r'"type"'
    + _WS
    + ":"
    + _WS
    + r'"([a-z0-9_.]{1,64})"'
)
_TYPE_PREFIX_S = re.compile(_PREFIX)
_TYPE_PREFIX_B = re.compile(_PREFIX.encode())


_MAX_QUOTES = 64  # past this many later quotes the frame is not an audio frame: a full parse is as cheap
_SHORT_HEAD = 2048  # up to this many bytes a six-byte search beats hopping from quote to quote


def sniff_type(data: bytes | str) -> str | None:
    """The event type when it can be read without a full parse and equals what a full parse gives, else None.

    None means "parse it": it never means the frame has no type.
    """
    if isinstance(data, str):
        m = _TYPE_PREFIX_S.match(data)
        if m is None or data.find("\\", m.end()) != -1:
            return None
        pos = m.end()
        data = data.encode("utf-8", "surrogatepass")
        found = m.group(1)
    else:
        mb = _TYPE_PREFIX_B.match(data)
        if mb is None:
            return None
        pos = mb.end()
        if data.find(b"\\", pos) != -1:
            return None
        found = mb.group(1).decode("ascii")
    # Is there a later `"type"` key? With no backslash after `pos`, every quote there is a string's boundary,
    # so such a key starts and ends at a quote. An audio frame's payload is one long quote-free base64 string,
    # most often the last value: the two last quotes (two `memrchr`) bound it, no occurrence can start inside
    # it, so only the few dozen bytes before it are searched. A big string elsewhere is crossed by hopping
    # quote to quote (a `memchr` each), and past `_MAX_QUOTES` of them the answer is "parse it".
    last = data.rfind(b'"', pos)
    before = data.rfind(b'"', pos, last) if last != -1 else -1
    if before == -1:
        return found  # at most one quote: no key
    end = min(before + 6, last + 1)  # every occurrence lies in [pos, end)
    if end - pos <= _SHORT_HEAD:
        return None if data.find(b'"type"', pos, end) != -1 else found
    return None if _hop_to_type_key(data, pos, end) else found


def _hop_to_type_key(data: bytes, pos: int, end: int) -> bool:
    """Whether a quote in [pos, end) opens `"type"` (True also past `_MAX_QUOTES` quotes)."""
    find = data.find
    startswith = data.startswith
    for _ in range(_MAX_QUOTES):
        q = find(b'"', pos, end)
        if q == -1:
            return False
        if startswith(b'type"', q + 1, end):
            return True
        pos = q + 1
    return True


def decode(data: bytes | str) -> Event | None:
    """Parse a text frame; ``None`` for anything that is not a JSON object (forwarded untouched)."""
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def encode(event: Event) -> bytes:
    return orjson.dumps(event)


def str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


# --- synthetic event requests ---------------------------------------------------------------------

ResetTarget = Literal["empty", "checkpoint"]
AutoAfter = Literal["never", "response"]
ResetStrategy = Literal["delete", "swap"]
RESET_STRATEGIES: tuple[ResetStrategy, ...] = ("delete", "swap")
_RESET_FIELDS = frozenset(
    {"type", "event_id", "keep_item_ids", "to", "cancel_response", "clear_input_audio", "strategy"}
)
_CHECKPOINT_FIELDS = frozenset({"type", "event_id"})
_POLICY_FIELDS = frozenset({"type", "event_id", "after", "to", "max_input_tokens", "max_items"})


@dataclass(frozen=True, slots=True)
class ResetRequest:
    event_id: str | None
    keep_item_ids: tuple[str, ...] = ()
    to: ResetTarget = "empty"
    cancel_response: bool = True
    clear_input_audio: bool = True
    strategy: ResetStrategy | None = None  # None: the configured one

    @property
    def full(self) -> bool:
        """Nothing is kept: the reset may as well be a new upstream session (a swap)."""
        return not self.keep_item_ids and self.to == "empty"


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    event_id: str | None


def _check_fields(event: Event, allowed: frozenset[str], what: str) -> None:
    # A typo such as `keep_items_ids` must not silently wipe what the client meant to keep.
    for key in event:
        if key not in allowed:
            raise_invalid(key, f"unknown field {key!r} in {what}")


def raise_invalid(param: str | None, message: str) -> None:
    raise InvalidSyntheticEvent(param, message)


def _event_id(event: Event) -> str | None:
    value = event.get("event_id")
    if value is not None and not isinstance(value, str):
        raise_invalid("event_id", "event_id must be a string")
    return str_or_none(value)


def _flag(event: Event, key: str, default: bool) -> bool:
    value = event.get(key, default)
    if not isinstance(value, bool):
        raise_invalid(key, f"{key} must be true or false")
    return bool(value)


def parse_reset(event: Event) -> ResetRequest:
    """Validate a reset event; raises :class:`InvalidSyntheticEvent` naming the bad param."""
    event_id = _event_id(event)
    _check_fields(event, _RESET_FIELDS, "a session reset")
    keep = event.get("keep_item_ids", [])
    if keep is None:
        keep = []
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise_invalid("keep_item_ids", "keep_item_ids must be a list of item id strings")
    to = event.get("to", "empty")
    if to not in ("empty", "checkpoint"):
        raise_invalid("to", 'to must be "empty" or "checkpoint"')
    strategy = event.get("strategy")
    if strategy is not None and strategy not in RESET_STRATEGIES:
        raise_invalid("strategy", 'strategy must be "delete" or "swap"')
    return ResetRequest(
        event_id=event_id,
        keep_item_ids=tuple(keep),
        to=to,
        cancel_response=_flag(event, "cancel_response", True),
        clear_input_audio=_flag(event, "clear_input_audio", True),
        strategy=strategy,
    )


def parse_checkpoint(event: Event) -> CheckpointRequest:
    event_id = _event_id(event)
    _check_fields(event, _CHECKPOINT_FIELDS, "a session checkpoint")
    return CheckpointRequest(event_id=event_id)


def parse_usage(event: Event) -> str | None:
    """Validate `session.usage` (a type and an optional event_id, like a checkpoint); returns its event_id."""
    event_id = _event_id(event)
    _check_fields(event, _CHECKPOINT_FIELDS, "a session usage request")
    return event_id


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """A `session.reset.policy`: the fields it sets (None: left as they are)."""

    event_id: str | None
    after: AutoAfter | None = None
    to: ResetTarget | None = None
    max_input_tokens: int | None = None
    max_items: int | None = None


def _limit(event: Event, key: str) -> int | None:
    value = event.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise_invalid(key, f"{key} must be a whole number, 0 or more (0: off)")
    return int(value)


def parse_policy(event: Event) -> PolicyRequest:
    """Validate a policy event; raises :class:`InvalidSyntheticEvent` naming the bad param."""
    event_id = _event_id(event)
    _check_fields(event, _POLICY_FIELDS, "a session reset policy")
    after = event.get("after")
    if after not in (None, "never", "response"):
        raise_invalid("after", 'after must be "never" or "response"')
    to = event.get("to")
    if to not in (None, "empty", "checkpoint"):
        raise_invalid("to", 'to must be "empty" or "checkpoint"')
    return PolicyRequest(
        event_id=event_id,
        after=after,
        to=to,
        max_input_tokens=_limit(event, "max_input_tokens"),
        max_items=_limit(event, "max_items"),
    )


# --- builders ---------------------------------------------------------------------------------------


def cancel_event(event_id: str, response_id: str | None) -> bytes:
    event: Event = {"type": RESPONSE_CANCEL, "event_id": event_id}
    if response_id is not None:
        event["response_id"] = response_id
    return encode(event)


def clear_event(event_id: str) -> bytes:
    return encode({"type": AUDIO_CLEAR, "event_id": event_id})


def delete_event(event_id: str, item_id: str) -> bytes:
    return encode({"type": ITEM_DELETE, "event_id": event_id, "item_id": item_id})


def error_event(
    event_id: str,
    *,
    error_type: str,
    code: str,
    message: str,
    param: str | None,
    client_event_id: str | None,
    extra: Event | None = None,
) -> bytes:
    """An `error` event in the API's own shape, so clients handle the proxy's errors like the server's.

    `extra` adds top-level fields (a timed-out reset reports what it had deleted)."""
    event: Event = {
        "type": ERROR,
        "event_id": event_id,
        "error": {
            "type": error_type,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        },
    }
    if extra:
        event.update(extra)
    return encode(event)
