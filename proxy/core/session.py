"""The sans-I/O session: one client connection and its upstream, as events in and frames out.

Feed it with :meth:`Session.client_frame` and :meth:`Session.upstream_frame`; take what to send with
:meth:`Session.data_to_send` (two lists, each in order); when :attr:`Session.deadline` passes, call
:meth:`Session.handle_timeout`; while :attr:`Session.paused` is true, read no more from the client. It never
blocks, sleeps or touches a socket, so every branch is testable without an event loop.

Rules:
- Every frame is forwarded as it came (the same object: no re-encoding) unless it is one of ours: a synthetic
  client event (never forwarded upstream), or an upstream answer to a command the proxy sent on its own
  behalf (not forwarded to the client unless `forward_internal_events`).
- Flow control is a value: while a reset runs the session is *paused*, and the relay stops reading the client,
  so TCP pushes back on it. The few frames already read are held in order and replayed once the reset ends; a
  held reset starts the next reset and holds the rest again. Should held frames still pass the bound, the first
  one refused refuses every later one until the reset ends: never a commit after a hole in the audio.
- Answers are matched to commands by our event id where the server echoes it (every id we make starts with a
  random per-session prefix, so an error naming a command of ours is known as ours even once we stopped
  waiting for it), by item id for deletes (their acks carry no event id), by code and quoted id where an
  `error` left `event_id` null, and else by order: an error no code explains answers the oldest command in
  flight, the client's first (sent before any reset of ours began), then ours.
- Nothing waits without a deadline. A reset waits only for what was sent or announced less than
  `reset_timeout` ago; older entries are forgotten, and :attr:`Session.deadline` is the earliest moment one
  ages out. A reset that times out forgets the commands it waited for, so the next one starts as on a fresh
  connection holding the same items; a response still running is the exception (only its end shows it is
  over): the next reset cancels it again, and deletes alongside instead of waiting for it first.
- Evidence beats intent: a `response.done` ends its response whatever its status; a new conversation
  response ends the one before it. A cancelled `response.done` is credited to the first cancel sent that names
  it (a client's id-less cancel applies to conversation responses only), unless its reason shows it was not a
  cancel (`turn_detected`: server VAD); every cancel of ours for a response that ended is settled either way.
- A swap instead of deletes is not decided here: when :attr:`Session.hooks` is set (proxy/core/swap.py), it is
  asked at each reset's start, told when a swap reset is quiet, shown every client `session.update` as it goes
  upstream, and asked whether to hide a `session_expired` error (a rollover follows).
- Late responses: after a reset, a conversation response that starts with no client `response.create`, no
  commit and no new speech since (an auto-response for input the reset removed) is cancelled, and its items
  are deleted as they appear.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.core.conversation import Conversation, Kind, names_item_create
from proxy.core.errors import InvalidSyntheticEvent
from proxy.core.events import (
    AUDIO_APPEND,
    AUDIO_CLEAR,
    AUDIO_CLEARED,
    AUDIO_COMMIT,
    AUDIO_COMMITTED,
    CHECKPOINT_CREATED,
    CHECKPOINT_TYPES,
    CODE_ALREADY_ACTIVE,
    CODE_CANCEL_NOT_ACTIVE,
    CODE_COMMIT_EMPTY,
    CODE_HELD_OVERFLOW,
    CODE_INVALID_RESET,
    CODE_RESET_TIMEOUT,
    CODE_SESSION_EXPIRED,
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
    SESSION_UPDATE,
    SPEECH_STARTED,
    SPEECH_STOPPED,
    TIMEOUT_TRIGGERED,
    Event,
    ResetRequest,
    cancel_event,
    clear_event,
    decode,
    delete_event,
    encode,
    error_event,
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
_CLIENT_READ = _CLIENT_INTERESTING | {SESSION_UPDATE}  # session.update: only shown to the hooks
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
        TIMEOUT_TRIGGERED,
        ERROR,
    }
)
# Codes an error with a null event_id may carry that name what failed (so no guess by order is made), and
# codes that answer no command at all.
_KNOWN_CODES = frozenset({CODE_ALREADY_ACTIVE, CODE_COMMIT_EMPTY, CODE_UNKNOWN_ITEM, CODE_CANCEL_NOT_ACTIVE})
# `status_details.reason` of a cancelled response that a cancel event did cause.
_CANCEL_REASONS = frozenset({None, "client_cancelled"})
_CANCEL_FAILED = "Cancellation failed"  # the API's wording for response_cancel_not_active
_QUOTED_ID = re.compile(r"'([^']{1,256})'")
_MAX_SETTLED_CANCELS = 256
_MAX_LATE = 1024  # late answers to commands we stopped waiting for, recognised as ours


@dataclass(slots=True)
class _Cancel:
    """A `response.cancel` in flight, ours or the client's. The server answers cancels in the order sent: the
    first that still applies ends the response (`response.done` cancelled), each other one draws an error."""

    event_id: str
    response_id: str | None  # ours always name it; a client's may not (then: the running response)
    ours: bool
    sent_at: float = 0.0
    settled: bool = False  # ours, and its response ended: done for the reset, but an error may still come


class _DeletesInFlight:
    """`item in x`: a delete is on its way for the item that a reset should wait for instead of sending its own:
    ours, or a client's sent less than `reset_timeout` ago (an older one is not waited for any more)."""

    __slots__ = ("_cutoff", "_ours", "_sent")

    def __init__(self, ours: Mapping[str, str], client_sent: Mapping[str, float], cutoff: float) -> None:
        self._ours = ours
        self._sent = client_sent
        self._cutoff = cutoff

    def __contains__(self, key: object) -> bool:
        if key in self._ours:
            return True
        sent = self._sent.get(key) if isinstance(key, str) else None
        return sent is not None and sent > self._cutoff


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


@dataclass(frozen=True, slots=True)
class LateResponse:
    """A notice: a response started after a reset for input the reset removed; it is cancelled, its items go."""

    response_id: str


Notice = ResetFinished | EventsRejected | Usage | UpstreamSession | LateResponse


class SwapHooks(Protocol):
    """What the session asks of a swap controller (proxy/core/swap.py), and all it knows of one."""

    def swap_wanted(self, request: ResetRequest) -> bool:
        """A reset starts: True makes it a swap (quiet the old upstream, then move to another)."""

    def swap_ready(self) -> None:
        """The swap reset is quiet: the client may move now (called again on each later event until it does)."""

    def client_session_update(self, event: Event) -> None:
        """A client `session.update` is being sent upstream."""

    def session_expired(self) -> bool:
        """The upstream said `session_expired`: True hides the error (the controller rolls over)."""


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _cancel_reason(response: Event) -> str | None:
    details = response.get("status_details")
    return str_or_none(details.get("reason")) if isinstance(details, dict) else None


class Session:
    def __init__(self, config: SessionConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SessionConfig()
        self._clock = clock
        self.conversation = Conversation(clock, self.config.reset_timeout)
        self.reset: Reset | None = None
        self.upstream_session_id: str | None = None
        self.checkpoint: list[str] | None = None
        self.hooks: SwapHooks | None = None
        self.audio_pending = False  # audio appended since the last commit or clear
        self._to_upstream: list[Frame] = []
        self._to_client: list[Frame] = []
        self.notices: list[Notice] = []
        self._held: deque[Frame] = deque()
        self._held_bytes = 0
        self._refusing = False  # one held event was refused: refuse the rest until the reset ends
        self._releasing = False
        self.held_total = 0
        self._seq = 0
        self._ids = 0
        # Unguessable and apart from any client's ids; commands carry a mark of their own within it.
        self.id_prefix = f"rrp_{secrets.token_hex(6)}_"
        self._command_prefix = self.id_prefix + "cmd"
        # Our commands waiting for an answer, by our event id (a reset's, or the clean-up of a late response).
        self._commands: dict[str, Command] = {}
        self._deletes: dict[str, str] = {}  # item id → our delete's event id
        self._clears: deque[str] = deque()
        self._cancel_fifo: deque[_Cancel] = deque()  # every cancel in flight, ours and the client's, as sent
        # Answers that may still come for commands we stopped waiting for (a timed-out reset's): they are ours.
        self._late_deletes: dict[str, list[int]] = {}  # item id → the orders of late answers still to come
        self._order = 0  # counts every delete sent, the client's and ours
        self._late_clears = 0
        # Client commands in flight whose answers look like ours: tell them apart.
        # item id → client event ids, oldest first; they stay until answered, for telling answers apart, but a
        # reset stops waiting for one once it is older than the timeout (bounded by _MAX_LATE).
        self._client_deletes: dict[str, list[str]] = {}
        self._client_delete_ids: dict[str, tuple[str, float, int]] = {}  # client event id → (item id, sent at, order)
        self._client_delete_sent: dict[str, float] = {}  # item id → when its newest client delete was sent
        self._client_clears: deque[tuple[str, float]] = deque()  # (client event id, sent at) not answered yet
        self._client_interesting = _CLIENT_READ | self.config.reset_types | self.config.checkpoint_types
        # After a reset: no client response.create, commit or new speech since (a response now is a late one).
        self._quiet_since_reset = False
        self._doomed: set[str] = set()  # late responses: cancelled, their items deleted as they appear
        self._unstoppable: set[str] = set()  # responses a timed-out reset could not stop
        self._doomed_items: dict[str, None] = {}

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
    def paused(self) -> bool:
        """Read no more client frames while true: a reset runs, or frames read before wait to be replayed."""
        return self.reset is not None or bool(self._held)

    @property
    def deadline(self) -> float | None:
        """When :meth:`handle_timeout` must be called (clock units), or None.

        The reset's own deadline, or sooner the moment something it waits for ages out."""
        reset = self.reset
        if reset is None:
            return None
        times = [reset.started_at]
        oldest = self.conversation.oldest_sent()
        if oldest is not None:
            times.append(oldest)
        cutoff = self._clock() - self.config.reset_timeout  # client deletes older are waited for no more
        times.extend(t for t in self._client_delete_sent.values() if t > cutoff)
        return min(times) + self.config.reset_timeout

    @property
    def held_count(self) -> int:
        return len(self._held)

    def _new_id(self, *, command: bool = False) -> str:
        self._ids += 1
        return f"{self._command_prefix if command else self.id_prefix}{self._ids}"

    # --- client → upstream ------------------------------------------------------------------------

    def client_frame(self, data: Frame) -> None:
        if self.reset is not None or self._held:
            self._hold(data)
        else:
            self._client_now(data)

    def _hold(self, data: Frame) -> None:
        cfg = self.config
        full = len(self._held) >= cfg.max_held_events or self._held_bytes + len(data) > cfg.max_held_bytes
        if self._refusing or full:
            self._refusing = True
            event = None if isinstance(data, Binary) else decode(data)
            client_id = str_or_none(event.get("event_id")) if event is not None else None
            self._client_error(
                "proxy_error",
                CODE_HELD_OVERFLOW,
                f"event not sent: more than {cfg.max_held_events} events or {cfg.max_held_bytes} bytes are "
                "held back while a session reset runs; every later event is refused too until it ends",
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
            if sniffed == AUDIO_APPEND:
                self.audio_pending = True
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
        elif etype == SESSION_UPDATE:
            if self.hooks is not None:
                self.hooks.client_session_update(event)
        elif etype == AUDIO_APPEND:
            self.audio_pending = True
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
        now = self._clock()
        if etype in _TRACKED_CLIENT_EVENTS:
            if etype == AUDIO_COMMIT:
                self.audio_pending = False
            self.conversation.on_client_event(etype, event)
            if etype != ITEM_CREATE:
                self._quiet_since_reset = False  # the client asked for a response, or sent a new turn
        elif etype == ITEM_DELETE:
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None:
                self._client_deletes.setdefault(item_id, []).append(client_id)
                self._order += 1
                self._client_delete_ids[client_id] = (item_id, now, self._order)
                self._client_delete_sent[item_id] = now
                if len(self._client_delete_ids) > _MAX_LATE:
                    old_id, (old_item, _, _) = next(iter(self._client_delete_ids.items()))
                    self._client_delete_done(old_item, old_id)
        elif etype == AUDIO_CLEAR:
            self.audio_pending = False
            self._client_clears.append((client_id, now))
        else:
            self._cancel_fifo.append(_Cancel(client_id, str_or_none(event.get("response_id")), False, now))
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
        swap = self.hooks is not None and self.hooks.swap_wanted(request)
        self._new_reset(request, frozenset(keep), swap=swap)

    def _new_reset(self, request: ResetRequest, keep: frozenset[str], *, swap: bool, silent: bool = False) -> None:
        now = self._clock()
        self._prune(now)
        self._seq += 1
        self.reset = Reset(
            seq=self._seq,
            request=request,
            keep=keep,
            started_at=now,
            deadline=now + self.config.reset_timeout,
            swap=swap,
            silent=silent,
        )
        self.reset.refused.update(self._unstoppable)
        self._advance()

    def begin_rollover(self) -> None:
        """A swap of the proxy's own (the upstream ends): hold the client's events until the hooks move it."""
        self._new_reset(ResetRequest(event_id=None), frozenset(), swap=True, silent=True)

    def swap_failed(self) -> None:
        """No upstream to move to: the running swap reset deletes instead, as a delete reset would have."""
        reset = self.reset
        if reset is not None and reset.swap and not reset.silent:
            reset.swap = False
            self._advance()

    def take_held(self) -> list[Frame]:
        """The client frames held back, in order, for the session that takes over (this one is done)."""
        held = list(self._held)
        self._held.clear()
        self._held_bytes = 0
        return held

    def _invalid(self, exc: InvalidSyntheticEvent, event: Event) -> None:
        self._client_error(
            "invalid_request_error", CODE_INVALID_RESET, exc.message, exc.param, str_or_none(event.get("event_id"))
        )

    def _client_error(
        self,
        error_type: str,
        code: str,
        message: str,
        param: str | None,
        client_id: str | None,
        extra: Event | None = None,
    ) -> None:
        self._to_client.append(
            error_event(
                self._new_id(),
                error_type=error_type,
                code=code,
                message=message,
                param=param,
                client_event_id=client_id,
                extra=extra,
            )
        )

    # --- our commands -------------------------------------------------------------------------------

    def _send_command(self, kind: str, target: str | None) -> None:
        """Send a command for the running reset, or (none running) for the clean-up of a late response."""
        reset = self.reset
        event_id = self._new_id(command=True)
        now = self._clock()
        self._order += 1
        self._commands[event_id] = Command(kind, target, reset.seq if reset is not None else 0, now, self._order)
        if reset is not None:
            reset.outstanding.add(event_id)
        if kind == "delete":
            assert target is not None
            self._deletes[target] = event_id
            self._to_upstream.append(delete_event(event_id, target))
        elif kind == "clear":
            self.audio_pending = False
            self._clears.append(event_id)
            self._to_upstream.append(clear_event(event_id))
        else:
            self._cancel_fifo.append(_Cancel(event_id, target, True, now))
            # Settled cancels only wait for an error that may never come: keep the newest few.
            while len(self._cancel_fifo) > _MAX_SETTLED_CANCELS and self._cancel_fifo[0].settled:
                self._cancel_fifo.popleft()
            self._to_upstream.append(cancel_event(event_id, target))

    def _answered(self, event_id: str, cmd: Command) -> None:
        """Our command `event_id` got its answer; the reset it belongs to (if still running) may move on."""
        if self.reset is not None and self.reset.seq == cmd.reset_seq:
            self.reset.outstanding.discard(event_id)

    def _prune(self, now: float) -> None:
        """Forget what no answer is coming for any more: everything sent longer than `reset_timeout` ago."""
        self.conversation.prune(now)
        cutoff = now - self.config.reset_timeout
        while self._client_clears and self._client_clears[0][1] <= cutoff:
            self._client_clears.popleft()
        kept: deque[_Cancel] = deque()
        for entry in self._cancel_fifo:
            if entry.ours:
                if not entry.settled and entry.sent_at <= cutoff:
                    # Stop waiting for it, but keep it (bounded) so that its late error is still known as ours.
                    entry.settled = True
                    self._commands.pop(entry.event_id, None)
                kept.append(entry)
            elif entry.sent_at > cutoff:
                kept.append(entry)
        self._cancel_fifo = kept
        for event_id in list(self._deletes.values()):
            if self._commands[event_id].sent_at <= cutoff:
                self._forget_delete(event_id)

    def _forget_delete(self, event_id: str) -> Command:
        """Stop waiting for our delete `event_id`, yet know its answer, should it come, as ours."""
        cmd = self._commands.pop(event_id)
        target = cmd.target
        assert target is not None
        del self._deletes[target]
        self._late_deletes.setdefault(target, []).append(cmd.order)
        if len(self._late_deletes) > _MAX_LATE:
            del self._late_deletes[next(iter(self._late_deletes))]
        return cmd

    def _late_answer(self, item_id: str) -> bool:
        """An answer for `item_id` that may be the late one of a delete we stopped waiting for."""
        orders = self._late_deletes.get(item_id)
        if orders is None:
            return False
        orders.pop(0)
        if not orders:
            del self._late_deletes[item_id]
        return True

    # --- the reset ----------------------------------------------------------------------------------

    def _advance(self) -> None:
        reset = self.reset
        if reset is None:
            return
        # Deletes already on their way (the client's, or ours for a late response) are waited for, never sent
        # twice: two answers for one item could not be told apart.
        in_flight = _DeletesInFlight(self._deletes, self._client_delete_sent, self._clock() - self.config.reset_timeout)
        if not reset.plan(self.conversation, in_flight, self._send_command):
            return
        if reset.swap:
            assert self.hooks is not None  # only the hooks make a reset a swap
            self.hooks.swap_ready()
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
                    "strategy": "delete",
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
        self._refusing = False
        self._quiet_since_reset = True
        self._release()

    def handle_timeout(self) -> None:
        reset = self.reset
        if reset is None:
            return
        now = self._clock()
        if now < reset.deadline:
            # Something the reset waited for aged out: it waits no longer.
            self._prune(now)
            self._advance()
            return
        timeout = self.config.reset_timeout
        self._client_error(
            "proxy_error",
            CODE_RESET_TIMEOUT,
            f"session reset did not finish within {timeout:g} s; still awaited: "
            f"{reset.awaiting(self.conversation)}; held events are released",
            None,
            reset.request.event_id,
            {"reset_event_id": reset.request.event_id, "deleted_item_ids": reset.deleted},
        )
        self._forget(reset)
        self._prune(now)
        self._finish(reset, "timed_out")

    def _forget(self, reset: Reset) -> None:
        """A reset timed out: stop waiting for what it waited for, yet know its late answers as ours."""
        for event_id in reset.outstanding:
            cmd = self._commands[event_id]
            if cmd.kind == "delete":
                self._forget_delete(event_id)
                continue
            del self._commands[event_id]
            if cmd.kind == "clear":
                self._clears.remove(event_id)
                self._late_clears = min(self._late_clears + 1, _MAX_LATE)
            else:
                for entry in self._cancel_fifo:
                    if entry.event_id == event_id:
                        entry.settled = True
        # A response still running is not stale (only its end, or a replacement, shows it is over): the next
        # reset cancels it again, but deletes alongside instead of holding back for it.
        self._unstoppable.update(self.conversation.conversation_responses())

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
        elif etype == AUDIO_COMMITTED:
            self.audio_pending = False  # server VAD committed the buffer
        elif etype in (SPEECH_STARTED, TIMEOUT_TRIGGERED):
            self._quiet_since_reset = False  # a new turn of audio: a response for it is no late one
        elif etype == SESSION_CREATED:
            session = event.get("session")
            if isinstance(session, dict):
                self.upstream_session_id = str_or_none(session.get("id"))
                if self.upstream_session_id is not None:
                    self.notices.append(UpstreamSession(self.upstream_session_id))
        for rid in self.conversation.on_server_event(etype, event):
            self._response_over(rid)  # done, or replaced by a new one
        if etype == RESPONSE_CREATED:
            self._on_response_created(event)
        elif etype == OUTPUT_ITEM_ADDED or (self._doomed_items and etype in ITEM_EVENTS):
            item = event.get("item")
            item_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
            if etype == OUTPUT_ITEM_ADDED and str_or_none(event.get("response_id")) in self._doomed:
                self._doom_item(item_id)
            self._delete_doomed(item_id)
        if not internal or self.config.forward_internal_events:
            self._to_client.append(data)
        if self.reset is not None:
            self._advance()

    def _on_item_deleted(self, event: Event) -> bool:
        item_id = str_or_none(event.get("item_id"))
        if item_id is None:
            return False
        # Deletes are answered in the order sent: the answer is the oldest delete's still waiting for one.
        candidates: list[tuple[int, str]] = []
        client = self._client_deletes.get(item_id)
        if client:
            candidates.append((self._client_delete_ids[client[0]][2], "client"))
        event_id = self._deletes.get(item_id)
        if event_id is not None:
            candidates.append((self._commands[event_id].order, "ours"))
        late = self._late_deletes.get(item_id)
        if late:
            candidates.append((late[0], "late"))
        if not candidates:
            return False
        whose = min(candidates)[1]
        if whose == "client":
            self._client_delete_done(item_id, None)
            if event_id is not None:
                # Ours, also on its way, has done what it was for (the item is gone); its own answer may still
                # come and is known as ours.
                self._answered(event_id, self._forget_delete(event_id))
            return False
        if whose == "late":
            self._late_answer(item_id)  # a delete we stopped waiting for, answered at last
            self._confirm_deleted(item_id)
            if event_id is not None:
                # The item is gone, which is all our newer delete was for; its answer is known as ours.
                self._answered(event_id, self._forget_delete(event_id))
            return True
        assert event_id is not None
        del self._deletes[item_id]
        cmd = self._commands.pop(event_id)
        self._confirm_deleted(item_id)
        self._answered(event_id, cmd)
        return True

    def _confirm_deleted(self, item_id: str) -> None:
        if self.reset is not None and item_id not in self.reset.keep:
            # Confirmed while this reset runs, even if an earlier reset or a clean-up sent the delete.
            self.reset.deleted.append(item_id)

    def _client_delete_done(self, item_id: str, client_event_id: str | None) -> None:
        """One of the client's deletes of `item_id` (one is in flight) was answered: the one named, else the oldest."""
        pending = self._client_deletes[item_id]
        if client_event_id in pending:
            pending.remove(client_event_id)
        else:
            client_event_id = pending.pop(0)
        self._client_delete_ids.pop(client_event_id, None)
        if not pending:
            del self._client_deletes[item_id]
            del self._client_delete_sent[item_id]

    def _on_cleared(self) -> bool:
        # The server answers clears in order; the client's, sent before ours, come back first.
        if self._client_clears:
            self._client_clears.popleft()
            return False
        if self._late_clears:
            # A timed-out reset's clear, answered at last: sent before any clear of ours still awaited.
            self._late_clears -= 1
            return True
        if self._clears:
            event_id = self._clears.popleft()
            self._answered(event_id, self._commands.pop(event_id))
            return True
        return False

    # --- responses ----------------------------------------------------------------------------------

    def _on_response_created(self, event: Event) -> None:
        response = event.get("response")
        rid = str_or_none(response.get("id")) if isinstance(response, dict) else None
        if (
            rid is None
            or self.reset is not None
            or not self._quiet_since_reset
            or rid not in self.conversation.conversation_responses()
        ):
            return
        # Nobody asked for it since the reset: an auto-response for input the reset removed.
        self._doomed.add(rid)
        self.notices.append(LateResponse(rid))
        self._send_command("cancel", rid)

    def _doom_item(self, item_id: str | None) -> None:
        if item_id is not None:
            self._doomed_items[item_id] = None
            if len(self._doomed_items) > _MAX_LATE:
                del self._doomed_items[next(iter(self._doomed_items))]

    def _delete_doomed(self, item_id: str | None) -> None:
        """A late response's output item: delete it once it is in the conversation (a reset running does)."""
        if item_id is None or item_id not in self._doomed_items:
            return
        if item_id not in self.conversation:
            return
        del self._doomed_items[item_id]
        if self.reset is None and item_id not in self._deletes and item_id not in self._client_deletes:
            self._send_command("delete", item_id)

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
        if rid in self._doomed:
            output = response.get("output")
            for out in output if isinstance(output, list) else ():
                out_id = str_or_none(out.get("id")) if isinstance(out, dict) else None
                self._doom_item(out_id)
                self._delete_doomed(out_id)
        if response.get("status") != "cancelled" or _cancel_reason(response) not in _CANCEL_REASONS:
            return
        in_conversation = self.conversation.active_responses.get(rid) is Kind.CONVERSATION
        # The first cancel sent that applies to this response is the one that ended it (one of ours we stopped
        # waiting for included: it still takes the answer).
        for entry in self._cancel_fifo:
            if entry.response_id == rid or (entry.response_id is None and not entry.ours and in_conversation):
                self._cancel_fifo.remove(entry)
                if entry.ours:
                    if not entry.settled:
                        self._cancel_answered(entry.event_id, cancelled=True)
                    # Ours ended it, even if an earlier reset's cancel got there first.
                    if self.reset is not None and rid in self.reset.cancelled_responses:
                        self.reset.response_cancelled = True
                break

    def _response_over(self, rid: str) -> None:
        """Response `rid` ended (done, or replaced): our cancels for it are settled, a not-active error may follow."""
        for entry in self._cancel_fifo:
            if entry.ours and not entry.settled and entry.response_id == rid:
                entry.settled = True
                self._cancel_answered(entry.event_id, cancelled=False)
        self._doomed.discard(rid)
        self._unstoppable.discard(rid)

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

    # --- errors -------------------------------------------------------------------------------------

    def _on_error(self, event: Event) -> bool:
        """Match an upstream `error` to the command it answers; True when that command was ours."""
        err = event.get("error")
        if not isinstance(err, dict) or not all(isinstance(err.get(k), str | None) for k in ("event_id", "code")):
            return False  # not an error the API's shape describes: it answers nothing we know of
        ref = str_or_none(err.get("event_id"))
        code = str_or_none(err.get("code"))
        message = err.get("message")
        if code is None and isinstance(message, str) and message.startswith(_CANCEL_FAILED):
            code = CODE_CANCEL_NOT_ACTIVE  # servers that leave the code null still say what failed
        if ref is not None:
            return self._on_named_error(ref, code)
        # No event id: the server left it null. Attribute by code and by the id quoted in the message.
        # The wording alone is evidence only when no other code says what failed: a refused create reads
        # "the previous item with id 'x' does not exist" too.
        if code == CODE_UNKNOWN_ITEM or (code is None and isinstance(message, str) and "does not exist" in message):
            match = _QUOTED_ID.search(message) if isinstance(message, str) else None
            item_id = match.group(1) if match else None
            if item_id is not None:
                return self._unknown_item(item_id)
        if code == CODE_CANCEL_NOT_ACTIVE:
            if not self._cancel_fifo:
                return False
            oldest = self._cancel_fifo.popleft()  # cancels are answered in the order sent
            if oldest.ours:
                cmd = self._commands.pop(oldest.event_id, None)
                if cmd is not None:
                    self._command_failed(oldest.event_id, cmd, code)
            return oldest.ours
        if code == CODE_SESSION_EXPIRED:  # answers no command: the session ends
            return self.hooks is not None and self.hooks.session_expired()
        if self.conversation.client_event_failed(None, code):
            return False
        if (code is None or (code not in _KNOWN_CODES and not names_item_create(code))) and self._commands:
            # Nothing of the client's in flight that it could answer: the oldest command of ours failed.
            event_id, cmd = next(iter(self._commands.items()))
            del self._commands[event_id]
            self._command_failed(event_id, cmd, code)
            return True
        return False

    def _on_named_error(self, ref: str, code: str | None) -> bool:
        cmd = self._commands.pop(ref, None)
        if cmd is not None:
            self._command_failed(ref, cmd, code)
            return True
        cancel = self._cancel_entry(ref)
        if (cancel is not None and cancel.ours) or ref.startswith(self._command_prefix):
            return True  # ours: a settled cancel's late error, or a command we had stopped waiting for
        client_delete = self._client_delete_ids.get(ref)
        if client_delete is not None:
            self._client_delete_done(client_delete[0], ref)
            if code == CODE_UNKNOWN_ITEM:
                self.conversation.remove(client_delete[0])
        else:
            for entry in self._client_clears:
                if entry[0] == ref:
                    self._client_clears.remove(entry)
                    break
        self.conversation.client_event_failed(ref, code)
        return False

    def _unknown_item(self, item_id: str) -> bool:
        """A null-id error says `item_id` does not exist: whose delete was it?"""
        if item_id in self._client_deletes:
            self._client_delete_done(item_id, None)
            self.conversation.remove(item_id)
            return False
        event_id = self._deletes.get(item_id)
        if event_id is not None:
            self._command_failed(event_id, self._commands.pop(event_id), CODE_UNKNOWN_ITEM)
            return True
        if self._late_answer(item_id):
            self.conversation.remove(item_id)
            return True
        return False

    def _command_failed(self, event_id: str, cmd: Command, code: str | None) -> None:
        """An `error` answered our command `event_id`."""
        target = cmd.target
        reset = self.reset if self.reset is not None and self.reset.seq == cmd.reset_seq else None
        if cmd.kind == "delete" and target is not None:
            del self._deletes[target]  # every delete of ours still awaited is there, under its target
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
                self._doomed.discard(target)
            elif reset is not None:
                # The server will not cancel it (e.g. "not implemented"): delete alongside, wait for its end.
                reset.refused.add(target)
        self._answered(event_id, cmd)
