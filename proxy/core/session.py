"""The sans-I/O session: one client connection and its upstream, as events in and frames out.

Feed it with :meth:`Session.client_frame` and :meth:`Session.upstream_frame`; take what to send with
:meth:`Session.data_to_send` (two lists, each in order); when :attr:`Session.deadline` passes, call
:meth:`Session.handle_timeout`. It never blocks, sleeps or touches a socket, so every branch is testable
without an event loop.

Rules:
- Every frame is forwarded as it came (the same object: no re-encoding) unless it is one of ours: a synthetic
  client event (never forwarded upstream), or an upstream answer to a command the proxy sent on a reset's
  behalf (not forwarded to the client unless `forward_internal_events`).
- While a reset runs, client frames are held back in order (bounded) and replayed once it ends; a held reset
  starts the next reset and holds the rest again.
- Answers are matched to commands by our event id where the server echoes it, by item id for deletes (their
  acks carry no event id), and by code and message where an `error` left `event_id` null.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from proxy.core.conversation import Conversation
from proxy.core.errors import InvalidSyntheticEvent
from proxy.core.events import (
    AUDIO_CLEAR,
    AUDIO_CLEARED,
    AUDIO_COMMIT,
    AUDIO_COMMITTED,
    CHECKPOINT_CREATED,
    CHECKPOINT_TYPES,
    CODE_CANCEL_NOT_ACTIVE,
    CODE_HELD_OVERFLOW,
    CODE_INVALID_RESET,
    CODE_RESET_TIMEOUT,
    CODE_UNKNOWN_ITEM,
    ERROR,
    ITEM_CREATE,
    ITEM_DELETE,
    ITEM_DELETED,
    ITEM_EVENTS,
    OUTPUT_ITEM_ADDED,
    RESET_COMPLETED,
    RESET_TYPES,
    RESPONSE_CANCEL,
    RESPONSE_CREATE,
    RESPONSE_CREATED,
    RESPONSE_DONE,
    SESSION_CREATED,
    SPEECH_STARTED,
    SPEECH_STOPPED,
    Event,
    cancel_event,
    clear_event,
    decode,
    delete_event,
    encode,
    error_event,
    inner_error,
    parse_checkpoint,
    parse_reset,
    sniff_type,
    str_or_none,
)
from proxy.core.reset import Command, Reset


class Binary(bytes):
    """A binary WebSocket frame: passed through untouched (the API speaks JSON text; we do not guess)."""

    __slots__ = ()


Frame = bytes | str  # text frames as bytes (UTF-8) or str; Binary for binary frames

_TRACKED_CLIENT_EVENTS = frozenset({RESPONSE_CREATE, ITEM_CREATE, AUDIO_COMMIT})
_CLIENT_INTERESTING = _TRACKED_CLIENT_EVENTS | {ITEM_DELETE, AUDIO_CLEAR, RESPONSE_CANCEL}
# Upstream events that change what the core tracks; every other type is forwarded unread.
_UPSTREAM_INTERESTING = frozenset(
    {
        *ITEM_EVENTS,
        ITEM_DELETED,
        AUDIO_COMMITTED,
        AUDIO_CLEARED,
        RESPONSE_CREATED,
        RESPONSE_DONE,
        OUTPUT_ITEM_ADDED,
        SESSION_CREATED,
        SPEECH_STARTED,
        SPEECH_STOPPED,
        ERROR,
    }
)
_QUOTED_ID = re.compile(r"'([^']{1,256})'")
_MAX_SETTLED_CANCELS = 256


@dataclass(slots=True)
class _Cancel:
    """A `response.cancel` in flight, ours or the client's. The server answers cancels in the order sent: the
    first that still applies ends the response (`response.done` cancelled), each other one draws an error."""

    event_id: str
    response_id: str | None  # ours always name it; a client's may not (then: the running response)
    ours: bool
    settled: bool = False  # ours, and its response ended: done for the reset, but an error may still come


class _AnyOf:
    """`key in x` for a key of any of several mappings, without building a merged copy."""

    __slots__ = ("_maps",)

    def __init__(self, *maps: Mapping[str, object]) -> None:
        self._maps = maps

    def __contains__(self, key: object) -> bool:
        return any(key in m for m in self._maps)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    reset_types: frozenset[str] = frozenset(RESET_TYPES)
    checkpoint_types: frozenset[str] = frozenset(CHECKPOINT_TYPES)
    reset_timeout: float = 10.0
    forward_internal_events: bool = False
    max_held_events: int = 10_000
    max_held_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResetFinished:
    """A notice for the relay (logs, metrics): a reset ended."""

    outcome: Literal["completed", "timed_out"]
    duration_ms: float
    deleted: int
    failed: int
    cancelled_response: bool


@dataclass(frozen=True, slots=True)
class EventsRejected:
    """A notice: client events were refused (held-event limit) and answered with an error."""

    count: int


@dataclass(frozen=True, slots=True)
class Usage:
    """A notice: token usage reported by a `response.done`."""

    input_tokens: int
    cached_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class UpstreamSession:
    """A notice: the upstream named its session (`session.created`); every later log line carries it."""

    session_id: str


Notice = ResetFinished | EventsRejected | Usage | UpstreamSession


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Session:
    def __init__(self, config: SessionConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SessionConfig()
        self._clock = clock
        self.conversation = Conversation()
        self.reset: Reset | None = None
        self.upstream_session_id: str | None = None
        self.checkpoint: list[str] | None = None
        self._to_upstream: list[Frame] = []
        self._to_client: list[Frame] = []
        self.notices: list[Notice] = []
        self._held: deque[Frame] = deque()
        self._held_bytes = 0
        self._releasing = False
        self.held_total = 0
        self._seq = 0
        self._ids = 0
        # Commands sent for resets, by our event id, kept until answered (even after a timeout, so a late
        # answer is still recognised as ours and not shown to the client).
        self._commands: dict[str, Command] = {}
        self._deletes: dict[str, str] = {}  # item id → our delete's event id
        self._clears: deque[str] = deque()
        self._cancel_fifo: deque[_Cancel] = deque()  # every cancel in flight, ours and the client's, as sent
        # Client commands in flight whose answers look like ours: tell them apart.
        self._client_deletes: dict[str, list[str]] = {}  # item id → client event ids, oldest first
        self._client_delete_ids: dict[str, str] = {}  # client event id → item id
        self._client_clears: deque[str] = deque()  # client event ids of clears not answered yet
        self._client_interesting = _CLIENT_INTERESTING | self.config.reset_types | self.config.checkpoint_types

    # --- output -----------------------------------------------------------------------------------

    def data_to_send(self) -> tuple[list[Frame], list[Frame]]:
        """(frames for the upstream, frames for the client), each in order; the buffers start afresh."""
        return self.take_upstream(), self.take_client()

    @property
    def pending_upstream(self) -> bool:
        return bool(self._to_upstream)

    @property
    def pending_client(self) -> bool:
        return bool(self._to_client)

    def take_upstream(self) -> list[Frame]:
        frames, self._to_upstream = self._to_upstream, []
        return frames

    def take_client(self) -> list[Frame]:
        frames, self._to_client = self._to_client, []
        return frames

    def take_notices(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices

    @property
    def deadline(self) -> float | None:
        """When :meth:`handle_timeout` must be called (clock units), or None."""
        return self.reset.deadline if self.reset is not None else None

    @property
    def held_count(self) -> int:
        return len(self._held)

    def _new_id(self) -> str:
        self._ids += 1
        return f"rrp_{self._ids}"

    # --- client → upstream ------------------------------------------------------------------------

    def client_frame(self, data: Frame) -> None:
        if self.reset is not None or self._held:
            self._hold(data)
        else:
            self._client_now(data)

    def _hold(self, data: Frame) -> None:
        cfg = self.config
        if len(self._held) >= cfg.max_held_events or self._held_bytes + len(data) > cfg.max_held_bytes:
            event = None if isinstance(data, Binary) else decode(data)
            client_id = str_or_none(event.get("event_id")) if event is not None else None
            self._client_error(
                "proxy_error",
                CODE_HELD_OVERFLOW,
                f"event not sent: more than {cfg.max_held_events} events or {cfg.max_held_bytes} bytes are "
                "held back while a session reset runs",
                None,
                client_id,
            )
            self.notices.append(EventsRejected(1))
            return
        self._held.append(data)
        self._held_bytes += len(data)
        self.held_total += 1

    def _release(self) -> None:
        # Iterative, not recursive: a held reset that completes at once finishes inside this loop, and a
        # nested release would add a stack frame per such reset (a client could exhaust the stack).
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._held and self.reset is None:
                data = self._held.popleft()
                self._held_bytes -= len(data)
                self._client_now(data)
        finally:
            self._releasing = False

    def _client_now(self, data: Frame) -> None:
        if isinstance(data, Binary):
            self._to_upstream.append(data)
            return
        sniffed = sniff_type(data)
        if sniffed is not None and sniffed not in self._client_interesting:
            self._to_upstream.append(data)  # an append or the like: nothing to read in it
            return
        event = decode(data)
        etype = event.get("type") if event is not None else None
        if event is None or not isinstance(etype, str):
            self._to_upstream.append(data)  # the upstream answers garbage with its own error
            return
        if etype in self.config.reset_types:
            self._start_reset(event)
            return
        if etype in self.config.checkpoint_types:
            self._make_checkpoint(event)
            return
        if etype in _CLIENT_INTERESTING:
            data = self._track_client_command(etype, event, data)
        self._to_upstream.append(data)

    def _track_client_command(self, etype: str, event: Event, data: Frame) -> Frame:
        """Note a client command whose answer the reset must tell from its own; returns the frame to send."""
        client_id = event.get("event_id")
        if not isinstance(client_id, str):
            # An error is matched to the command it answers by event id; without one, a refused create could
            # never be told apart and would stall every later reset. So the proxy names it.
            client_id = self._new_id()
            event["event_id"] = client_id
            data = encode(event)
        if etype in _TRACKED_CLIENT_EVENTS:
            self.conversation.on_client_event(etype, event)
        elif etype == ITEM_DELETE:
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None:
                self._client_deletes.setdefault(item_id, []).append(client_id)
                self._client_delete_ids[client_id] = item_id
        elif etype == AUDIO_CLEAR:
            self._client_clears.append(client_id)
        else:
            self._cancel_fifo.append(_Cancel(client_id, str_or_none(event.get("response_id")), ours=False))
        return data

    def _make_checkpoint(self, event: Event) -> None:
        try:
            request = parse_checkpoint(event)
        except InvalidSyntheticEvent as exc:
            self._invalid(exc, event)
            return
        self.checkpoint = list(self.conversation.item_ids)
        self._to_client.append(
            encode(
                {
                    "type": CHECKPOINT_CREATED,
                    "event_id": self._new_id(),
                    "checkpoint_event_id": request.event_id,
                    "item_ids": self.checkpoint,
                }
            )
        )

    def _start_reset(self, event: Event) -> None:
        try:
            request = parse_reset(event)
            if request.to == "checkpoint" and self.checkpoint is None:
                raise InvalidSyntheticEvent("to", 'no checkpoint: send "session.checkpoint" first')
        except InvalidSyntheticEvent as exc:
            self._invalid(exc, event)
            return
        keep = set(request.keep_item_ids)
        if request.to == "checkpoint" and self.checkpoint is not None:
            keep.update(self.checkpoint)
        now = self._clock()
        self._seq += 1
        self.reset = Reset(
            seq=self._seq,
            request=request,
            keep=frozenset(keep),
            started_at=now,
            deadline=now + self.config.reset_timeout,
        )
        self._advance()

    def _invalid(self, exc: InvalidSyntheticEvent, event: Event) -> None:
        self._client_error(
            "invalid_request_error", CODE_INVALID_RESET, exc.message, exc.param, str_or_none(event.get("event_id"))
        )

    def _client_error(self, error_type: str, code: str, message: str, param: str | None, client_id: str | None) -> None:
        self._to_client.append(
            error_event(
                self._new_id(),
                error_type=error_type,
                code=code,
                message=message,
                param=param,
                client_event_id=client_id,
            )
        )

    # --- the reset ----------------------------------------------------------------------------------

    def _send_command(self, kind: str, target: str | None) -> None:
        reset = self.reset
        assert reset is not None
        event_id = self._new_id()
        self._commands[event_id] = Command(kind, target, reset.seq)
        reset.outstanding.add(event_id)
        if kind == "delete":
            assert target is not None
            self._deletes[target] = event_id
            self._to_upstream.append(delete_event(event_id, target))
        elif kind == "clear":
            self._clears.append(event_id)
            self._to_upstream.append(clear_event(event_id))
        else:
            self._cancel_fifo.append(_Cancel(event_id, target, ours=True))
            # Settled cancels only wait for an error that may never come: keep the newest few.
            while len(self._cancel_fifo) > _MAX_SETTLED_CANCELS and self._cancel_fifo[0].settled:
                self._cancel_fifo.popleft()
            self._to_upstream.append(cancel_event(event_id, target))

    def _advance(self) -> None:
        reset = self.reset
        if reset is None:
            return
        # Deletes already on their way (the client's, or ours from a reset that timed out) are waited for,
        # never sent twice: two answers for one item could not be told apart.
        in_flight = _AnyOf(self._client_deletes, self._deletes)
        if not reset.plan(self.conversation, in_flight, self._send_command):
            return
        self._to_client.append(
            encode(
                {
                    "type": RESET_COMPLETED,
                    "event_id": self._new_id(),
                    "reset_event_id": reset.request.event_id,
                    "deleted_item_ids": reset.deleted,
                    "kept_item_ids": reset.kept_item_ids(self.conversation),
                    "failed_item_ids": reset.failed,
                    "response_cancelled": reset.response_cancelled,
                    "duration_ms": round((self._clock() - reset.started_at) * 1000.0, 3),
                }
            )
        )
        self._finish(reset, "completed")

    def _finish(self, reset: Reset, outcome: Literal["completed", "timed_out"]) -> None:
        duration_ms = (self._clock() - reset.started_at) * 1000.0
        self.notices.append(
            ResetFinished(outcome, duration_ms, len(reset.deleted), len(reset.failed), reset.response_cancelled)
        )
        self.reset = None
        self._release()

    def handle_timeout(self) -> None:
        reset = self.reset
        if reset is None or self._clock() < reset.deadline:
            return
        timeout = self.config.reset_timeout
        self._client_error(
            "proxy_error",
            CODE_RESET_TIMEOUT,
            f"session reset did not finish within {timeout:g} s: the upstream left "
            f"{len(reset.outstanding)} command(s) unanswered; held events are released",
            None,
            reset.request.event_id,
        )
        self._finish(reset, "timed_out")

    def _answered(self, event_id: str, cmd: Command) -> None:
        """Our command `event_id` got its answer; the reset it belongs to (if still running) may move on."""
        if self.reset is not None and self.reset.seq == cmd.reset_seq:
            self.reset.outstanding.discard(event_id)

    # --- upstream → client --------------------------------------------------------------------------

    def upstream_frame(self, data: Frame) -> None:
        if isinstance(data, Binary):
            self._to_client.append(data)
            return
        sniffed = sniff_type(data)
        if sniffed is not None and sniffed not in _UPSTREAM_INTERESTING:
            self._to_client.append(data)  # a delta or the like: it changes nothing we track
            return
        event = decode(data)
        etype = event.get("type") if event is not None else None
        if event is None or not isinstance(etype, str):
            self._to_client.append(data)
            return
        internal = False
        if etype == ITEM_DELETED:
            internal = self._on_item_deleted(event)
        elif etype == AUDIO_CLEARED:
            internal = self._on_cleared()
        elif etype == ERROR:
            internal = self._on_error(event)
        elif etype == RESPONSE_DONE:
            self._on_response_done(event)
        elif etype == SESSION_CREATED:
            session = event.get("session")
            if isinstance(session, dict):
                self.upstream_session_id = str_or_none(session.get("id"))
                if self.upstream_session_id is not None:
                    self.notices.append(UpstreamSession(self.upstream_session_id))
        self.conversation.on_server_event(etype, event)
        if not internal or self.config.forward_internal_events:
            self._to_client.append(data)
        if self.reset is not None:
            self._advance()

    def _on_item_deleted(self, event: Event) -> bool:
        item_id = str_or_none(event.get("item_id"))
        if item_id is None:
            return False
        event_id = self._deletes.pop(item_id, None)
        if event_id is None:
            self._client_delete_done(item_id, None)
            return False
        cmd = self._commands.pop(event_id)
        if self.reset is not None and item_id not in self.reset.keep:
            # Confirmed while this reset runs, even if an earlier (timed-out) reset sent the delete.
            self.reset.deleted.append(item_id)
        self._answered(event_id, cmd)
        return True

    def _client_delete_done(self, item_id: str, client_event_id: str | None) -> None:
        """One of the client's deletes of `item_id` was answered: the one named, else the oldest."""
        pending = self._client_deletes.get(item_id)
        if not pending:
            return
        if client_event_id in pending:
            pending.remove(client_event_id)
        else:
            client_event_id = pending.pop(0)
        self._client_delete_ids.pop(client_event_id, None)
        if not pending:
            del self._client_deletes[item_id]

    def _on_cleared(self) -> bool:
        # The server answers clears in order; the client's, sent before ours, come back first.
        if self._client_clears:
            self._client_clears.popleft()
            return False
        if not self._clears:
            return False
        event_id = self._clears.popleft()
        self._answered(event_id, self._commands.pop(event_id))
        return True

    def _on_response_done(self, event: Event) -> None:
        response = event.get("response")
        if not isinstance(response, dict):
            return
        usage = response.get("usage")
        if isinstance(usage, dict):
            details = usage.get("input_token_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else 0
            self.notices.append(Usage(_int(usage.get("input_tokens")), _int(cached), _int(usage.get("output_tokens"))))
        rid = str_or_none(response.get("id"))
        if rid is None:
            return
        if response.get("status") == "cancelled":
            # The first cancel sent that applies to this response is the one that ended it.
            for entry in self._cancel_fifo:
                if not entry.settled and entry.response_id in (None, rid):
                    self._cancel_fifo.remove(entry)
                    if entry.ours:
                        self._cancel_answered(entry.event_id, cancelled=True)
                        # Ours ended it, even if an earlier (timed-out) reset's cancel got there first.
                        if self.reset is not None and rid in self.reset.cancelled_responses:
                            self.reset.response_cancelled = True
                    break
        for entry in self._cancel_fifo:
            if entry.ours and not entry.settled and entry.response_id == rid:
                # The response is over, which is what the reset waited for; a not-active error may follow.
                entry.settled = True
                self._cancel_answered(entry.event_id, cancelled=False)

    def _cancel_answered(self, event_id: str, *, cancelled: bool) -> None:
        cmd = self._commands.pop(event_id)  # an unsettled cancel of ours is always still a command
        if cancelled and self.reset is not None and self.reset.seq == cmd.reset_seq:
            self.reset.response_cancelled = True
        self._answered(event_id, cmd)

    def _cancel_entry(self, event_id: str) -> _Cancel | None:
        for entry in self._cancel_fifo:
            if entry.event_id == event_id:
                self._cancel_fifo.remove(entry)
                return entry
        return None

    def _on_error(self, event: Event) -> bool:
        err = inner_error(event)
        ref = str_or_none(err.get("event_id"))
        code = str_or_none(err.get("code"))
        if ref is not None:
            cmd = self._commands.pop(ref, None)
            if cmd is not None:
                self._command_failed(ref, cmd, code)
                return True
            cancel = self._cancel_entry(ref)
            if cancel is not None and cancel.ours:
                return True  # a settled cancel of ours drew its late error
            item_id = self._client_delete_ids.get(ref)
            if item_id is not None:
                self._client_delete_done(item_id, ref)
                if code == CODE_UNKNOWN_ITEM:
                    self.conversation.remove(item_id)
            elif ref in self._client_clears:
                self._client_clears.remove(ref)
            self.conversation.client_event_failed(ref, code)
            return False
        # No event id: the server left it null. Attribute by code and by the id quoted in the message.
        message = err.get("message")
        # The wording alone is evidence only when no other code says what failed: a refused create reads
        # "the previous item with id 'x' does not exist" too.
        if code == CODE_UNKNOWN_ITEM or (code is None and isinstance(message, str) and "does not exist" in message):
            match = _QUOTED_ID.search(message) if isinstance(message, str) else None
            item_id = match.group(1) if match else None
            if item_id is None:
                return False
            if item_id in self._client_deletes:
                self._client_delete_done(item_id, None)
                self.conversation.remove(item_id)
                return False
            event_id = self._deletes.get(item_id)
            if event_id is not None:
                self._command_failed(event_id, self._commands.pop(event_id), CODE_UNKNOWN_ITEM)
                return True
            return False
        if code == CODE_CANCEL_NOT_ACTIVE:
            if not self._cancel_fifo:
                return False
            oldest = self._cancel_fifo.popleft()  # cancels are answered in the order sent
            if oldest.ours:
                cmd = self._commands.pop(oldest.event_id, None)
                if cmd is not None:
                    self._command_failed(oldest.event_id, cmd, code)
            return oldest.ours
        self.conversation.client_event_failed(None, code)
        return False

    def _command_failed(self, event_id: str, cmd: Command, code: str | None) -> None:
        """An `error` answered our command `event_id`."""
        target = cmd.target
        reset = self.reset if self.reset is not None and self.reset.seq == cmd.reset_seq else None
        if cmd.kind == "delete" and target is not None:
            self._deletes.pop(target, None)
            if code == CODE_UNKNOWN_ITEM:
                self.conversation.remove(target)  # already gone: that is what we wanted
            elif reset is not None:
                reset.failed.append(target)
        elif cmd.kind == "clear":
            if event_id in self._clears:
                self._clears.remove(event_id)
        elif target is not None:
            self._cancel_entry(event_id)
            if code == CODE_CANCEL_NOT_ACTIVE:
                self.conversation.end_response(target)  # it ended before our cancel arrived
        self._answered(event_id, cmd)
