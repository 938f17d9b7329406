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
  waiting for it), by item id for deletes (their acks carry no event id), by code (or, where the code is
  null, the API's wording) and quoted id where an `error` left `event_id` null, and else by order: one count
  orders every command sent, the client's and ours, and an error nothing explains answers the oldest one
  with no answer yet, whoever's (one we stopped waiting for included: a slow server answers it at last).
- Nothing waits without a deadline. A reset waits only for what was sent or announced less than
  `reset_timeout` ago; older entries are forgotten, and :attr:`Session.deadline` is the earliest moment one
  ages out. A reset that times out forgets the commands it waited for, so the next one starts as on a fresh
  connection holding the same items; a response it waited for in vain is cancelled again by the next reset,
  which deletes alongside and does not wait for it (it may be over unseen, or run on: its later items, if any,
  are the next reset's to delete).
- Evidence beats intent: a `response.done` ends its response whatever its status; a new conversation
  response ends the one before it. A cancelled `response.done` is credited to the first cancel sent that names
  it (a client's id-less cancel: any response not known to be out of band), unless its reason shows it was not
  a cancel (`turn_detected`: server VAD); every cancel of ours for a response that ended is settled either way.
- A swap instead of deletes is not decided here: when :attr:`Session.hooks` is set (proxy/core/swap.py), it is
  asked at each reset's start, told when a swap reset is quiet, shown every client `session.update` as it goes
  upstream, and asked whether to hide a `session_expired` error (a rollover follows).
- Late responses: after a reset, a conversation response that starts with no client `response.create`, no
  commit and no new speech since (an auto-response for input the reset removed) is cancelled, and its items
  are deleted as they appear.
- Tasks and auto-resets (usage.py, policy.py): every `response.done`'s usage is summed for the task the next
  reset ends, and reported in its `session.reset.completed`; after a `response.done` that arrived with no reset
  running, the policy may start one, through the same path as a client's `session.reset`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
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
    CODE_CREATE_BAD_PREVIOUS,
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
    POLICY_TYPES,
    POLICY_UPDATED,
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
    USAGE_RESULT,
    USAGE_TYPES,
    Event,
    ResetRequest,
    cancel_event,
    clear_event,
    decode,
    delete_event,
    encode,
    error_event,
    parse_checkpoint,
    parse_policy,
    parse_reset,
    parse_usage,
    sniff_type,
    str_or_none,
)
from proxy.core.policy import AutoReason, Policy, decide
from proxy.core.reset import Command, Reset
from proxy.core.usage import UsageBook, read_usage


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


def _upstream_unread(data: Frame) -> bool:
    """An upstream text frame forwarded without a parse: its type is none the core tracks."""
    sniffed = sniff_type(data)
    return sniffed is not None and sniffed not in _UPSTREAM_INTERESTING


# Codes an error with a null event_id may carry that name what failed (so no guess by order is made), and
# codes that answer no command at all.
_KNOWN_CODES = frozenset({CODE_ALREADY_ACTIVE, CODE_COMMIT_EMPTY, CODE_UNKNOWN_ITEM, CODE_CANCEL_NOT_ACTIVE})
# `status_details.reason` of a cancelled response that a cancel event did cause.
_CANCEL_REASONS = frozenset({None, "client_cancelled"})
# Servers that leave `code` null still say what failed: the API's wording for the codes we act on. The wording
# is a clue only where no code is given; an error no clue explains answers by order.
_WORDINGS = (
    ("Cancellation failed", CODE_CANCEL_NOT_ACTIVE),
    ("Conversation already has an active response", CODE_ALREADY_ACTIVE),
    ("Error committing input audio buffer", CODE_COMMIT_EMPTY),
    ("Error adding item", CODE_CREATE_BAD_PREVIOUS),
    ("Error deleting item", CODE_UNKNOWN_ITEM),
)
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
    order: int = 0  # place among every command sent
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
    usage_types: frozenset[str] = frozenset(USAGE_TYPES)
    policy_types: frozenset[str] = frozenset(POLICY_TYPES)
    policy: Policy = field(default_factory=Policy)  # each connection's auto-reset policy until it sends its own


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


@dataclass(frozen=True, slots=True)
class TaskEnded:
    """A notice: a reset ended a task (completed or timed out); what its responses cost."""

    responses: int
    input_tokens: int
    output_tokens: int
    auto: bool


Notice = ResetFinished | EventsRejected | Usage | UpstreamSession | LateResponse | TaskEnded


class SwapHooks(Protocol):
    """What the session asks of a swap controller (proxy/core/swap.py), and all it knows of one."""

    def swap_wanted(self, request: ResetRequest) -> bool:
        """A reset starts: True makes it a swap (quiet the old upstream, then move to another)."""

    def swap_ready(self) -> None:
        """The swap reset is quiet: the client may move now (called again on each later event until it does)."""

    def client_session_update(self, event: Event) -> None:
        """A client `session.update` is being sent upstream."""

    def client_event_refused(self, event_id: str) -> None:
        """The upstream answered the client's event `event_id` with an error (a refused session.update must not
        be replayed)."""

    def session_expired(self) -> bool:
        """The upstream said `session_expired`: True hides the error (the controller rolls over)."""


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
        # FIFOs of commands in flight: short (bounded by _MAX_LATE and the like) and mostly empty, so lists, not
        # deques (an empty deque is 760 bytes, an empty list 56: memory per idle session is a target).
        self._clears: list[str] = []
        self._cancel_fifo: list[_Cancel] = []  # every cancel in flight, ours and the client's, as sent
        # Answers that may still come for commands we stopped waiting for (a timed-out reset's): they are ours.
        # item id → (order, our event id) of each delete whose late answer is still to come, oldest first
        self._late_deletes: dict[str, list[tuple[int, str]]] = {}
        self._order = 0  # counts every command sent, the client's and ours: answers come in this order
        self._late_clears: list[tuple[int, str]] = []  # (order, event id): a timed-out reset's clears
        # Client commands in flight whose answers look like ours: tell them apart.
        # item id → client event ids, oldest first; they stay until answered, for telling answers apart, but a
        # reset stops waiting for one once it is older than the timeout (bounded by _MAX_LATE).
        self._client_deletes: dict[str, list[str]] = {}
        self._client_delete_ids: dict[str, tuple[str, float, int]] = {}  # client event id → (item id, sent at, order)
        self._client_delete_sent: dict[str, float] = {}  # item id → when its newest client delete was sent
        # (client event id, sent at, order) not answered yet
        self._client_clears: list[tuple[str, float, int]] = []
        self._client_interesting = _CLIENT_READ | self.config.reset_types | self.config.checkpoint_types
        # After a reset: no client response.create, commit or new speech since (a response now is a late one).
        self._quiet_since_reset = False
        self._doomed: set[str] = set()  # late responses: cancelled, their items deleted as they appear
        self._unstoppable: set[str] = set()  # responses a timed-out reset could not stop
        self._doomed_items: dict[str, None] = {}
        self._unwanted: set[str] = set()  # out-of-band responses across a reset: their items must not stay
        # Tasks (usage.py, policy.py): the usage sums, the auto-reset policy, and its two synthetic events.
        self._client_interesting |= self.config.usage_types | self.config.policy_types
        self.usage = UsageBook()
        self.policy = self.config.policy
        self._auto: tuple[int, AutoReason] | None = None  # the running reset's seq, if the policy started it

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

    def client_passes(self, data: bytes, text: bool) -> bool:
        """The fast path (proxy/core/frames.py `Passes`): True when `client_frame` would only forward this
        message as it came. It then counts as forwarded, the caller sends its wire bytes, and `client_frame` is
        not called for it; nothing changes when False (then call `client_frame`)."""
        if self.reset is not None or self._held:
            return False
        return not text or self._unread(data)

    def _unread(self, data: Frame) -> bool:
        """A text frame forwarded without a parse (an append or the like: nothing to read in it); noted if so."""
        sniffed = sniff_type(data)
        if sniffed is None or sniffed in self._client_interesting:
            return False
        if sniffed == AUDIO_APPEND:
            self.audio_pending = True
        return True

    def _client_now(self, data: Frame) -> None:
        if isinstance(data, Binary) or self._unread(data):
            self._to_upstream.append(data)
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
        if etype in self.config.usage_types or etype in self.config.policy_types:
            self._tasks_event(etype, event)
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
        self._order += 1
        if etype in _TRACKED_CLIENT_EVENTS:
            if etype == AUDIO_COMMIT:
                self.audio_pending = False
            self.conversation.on_client_event(etype, event, self._order)
            if etype != ITEM_CREATE:
                self._quiet_since_reset = False  # the client asked for a response, or sent a new turn
        elif etype == ITEM_DELETE:
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None:
                self._client_deletes.setdefault(item_id, []).append(client_id)
                self._client_delete_ids[client_id] = (item_id, now, self._order)
                self._client_delete_sent[item_id] = now
                if len(self._client_delete_ids) > _MAX_LATE:
                    old_id, (old_item, _, _) = next(iter(self._client_delete_ids.items()))
                    self._client_delete_done(old_item, old_id)
        elif etype == AUDIO_CLEAR:
            self.audio_pending = False
            self._client_clears.append((client_id, now, self._order))  # kept, unawaited, until answered
            if len(self._client_clears) > _MAX_LATE:
                self._client_clears.pop(0)
        else:
            response_id = str_or_none(event.get("response_id"))
            self._add_cancel(_Cancel(client_id, response_id, False, now, self._order))
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
        self._begin_reset(request, frozenset(keep), swap=swap)

    def _begin_reset(
        self, request: ResetRequest, keep: Container[str], *, swap: bool = False, silent: bool = False
    ) -> None:
        """Start a reset: a client's, one the policy asked for (always by deletes), or a rollover's (the same path)."""
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
        self.reset.stale.update(self._unstoppable)
        self._advance()

    def begin_rollover(self) -> None:
        """A swap of the proxy's own (the upstream ends): hold the client's events until the hooks move it."""
        self._begin_reset(ResetRequest(event_id=None), frozenset(), swap=True, silent=True)

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
        # A cancel for a response an earlier reset waited for in vain is not awaited (known as ours should its
        # answer come; a not-active error or its response.done ends the response).
        unawaited = kind == "cancel" and reset is not None and target in reset.stale
        if not unawaited:
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
            self._add_cancel(_Cancel(event_id, target, True, now, self._order, settled=unawaited))
            self._to_upstream.append(cancel_event(event_id, target))

    def _add_cancel(self, entry: _Cancel) -> None:
        self._cancel_fifo.append(entry)
        # Settled cancels of ours and the client's only wait for an answer that may never come: keep the newest.
        fifo = self._cancel_fifo
        while len(fifo) > _MAX_SETTLED_CANCELS and (fifo[0].settled or not fifo[0].ours):
            fifo.pop(0)

    def _answered(self, event_id: str, cmd: Command) -> None:
        """Our command `event_id` got its answer; the reset it belongs to (if still running) may move on."""
        if self.reset is not None and self.reset.seq == cmd.reset_seq:
            self.reset.outstanding.discard(event_id)

    def _prune(self, now: float) -> None:
        """Forget what no answer is coming for any more: everything sent longer than `reset_timeout` ago."""
        self.conversation.prune(now)
        cutoff = now - self.config.reset_timeout
        for entry in self._cancel_fifo:
            if entry.ours and not entry.settled and entry.sent_at <= cutoff:
                # Stop waiting for it, but keep it (bounded) so that its late error is still known as ours.
                entry.settled = True
                self._commands.pop(entry.event_id, None)
        # Nothing waits for a client's cancel, but it keeps its place: a slow server's late error for it must not
        # be taken for a newer cancel's.
        for event_id in list(self._deletes.values()):
            if self._commands[event_id].sent_at <= cutoff:
                self._forget_delete(event_id)

    def _forget_delete(self, event_id: str) -> Command:
        """Stop waiting for our delete `event_id`, yet know its answer, should it come, as ours."""
        cmd = self._commands.pop(event_id)
        target = cmd.target
        assert target is not None
        del self._deletes[target]
        self._late_deletes.setdefault(target, []).append((cmd.order, event_id))
        if len(self._late_deletes) > _MAX_LATE:
            del self._late_deletes[next(iter(self._late_deletes))]
        return cmd

    def _late_answer(self, item_id: str, event_id: str | None = None) -> None:
        """A delete of `item_id` we stopped waiting for got its answer at last: the one named, else the oldest."""
        late = self._late_deletes[item_id]
        named = [entry for entry in late if entry[1] == event_id]
        late.remove(named[0] if named else late[0])
        if not late:
            del self._late_deletes[item_id]

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
                    **self._task_fields(reset),
                }
            )
        )
        self._finish(reset, "completed")

    def _finish(self, reset: Reset, outcome: Literal["completed", "timed_out"]) -> None:
        duration_ms = (self._clock() - reset.started_at) * 1000.0
        self.notices.append(
            ResetFinished(outcome, duration_ms, len(reset.deleted), len(reset.failed), reset.response_cancelled)
        )
        trimmed = self._end_task(reset)
        self.reset = None
        self._refusing = False
        # A response after the reset is late only if no input it could be for is left: not after a trim (the
        # input is there); after a reset that removed nothing, only if the conversation is empty.
        if trimmed:
            self._quiet_since_reset = False
        elif reset.deleted or reset.clear_sent or reset.cancelled_responses or not self.conversation.item_ids:
            self._quiet_since_reset = True
        if outcome == "completed":
            # An out-of-band response that runs on through the reset: should its item enter the conversation
            # (the server ignored `conversation: "none"`), it goes, as a late response's do.
            self._unwanted.update(
                rid for rid, kind in self.conversation.active_responses.items() if kind is Kind.OUT_OF_BAND
            )
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
            {"reset_event_id": reset.request.event_id, "deleted_item_ids": reset.deleted, **self._task_fields(reset)},
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
                self._late_clears.append((cmd.order, event_id))
                if len(self._late_clears) > _MAX_LATE:
                    self._late_clears.pop(0)
            else:
                for entry in self._cancel_fifo:
                    if entry.event_id == event_id:
                        entry.settled = True
        # A response still running may be over unseen (replaced without a response.done, where no kind was
        # reported) or may run on: the next reset cancels it again, deletes alongside and does not wait for it.
        self._unstoppable.update(self.conversation.conversation_responses())

    # --- tasks: usage per task and auto-resets (usage.py, policy.py) --------------------------------

    def _tasks_event(self, etype: str, event: Event) -> None:
        """`session.usage` (the running sums, nothing reset) or `session.reset.policy` (the policy in force)."""
        reply: Event
        try:
            if etype in self.config.usage_types:
                reply = {
                    "type": USAGE_RESULT,
                    "event_id": self._new_id(),
                    "usage_event_id": parse_usage(event),
                    "usage": self.usage.task.as_event(),
                    "connection_usage": self.usage.connection.as_event(),
                }
            else:
                request = parse_policy(event)
                self.policy = self.policy.updated(request)
                reply = {
                    "type": POLICY_UPDATED,
                    "event_id": self._new_id(),
                    "policy_event_id": request.event_id,
                    "policy": self.policy.as_event(),
                }
        except InvalidSyntheticEvent as exc:
            self._invalid(exc, event)
            return
        self._to_client.append(encode(reply))

    def _auto_reset_kind(self, event: Event) -> bool | None:
        """A `response.done` with no reset running: whether its response was in the conversation (read before
        the done is handled), or None when the policy has no say (no id; a late response we cancelled; one a
        timed-out reset cancelled: its end belongs to the task that reset ended)."""
        response = event.get("response")
        rid = str_or_none(response.get("id")) if isinstance(response, dict) else None
        if rid is None or rid in self._doomed or rid in self._unstoppable:
            return None
        return self.conversation.active_responses.get(rid) is Kind.CONVERSATION

    def _auto_reset(self, event: Event, *, in_conversation: bool) -> None:
        """After a `response.done` (already forwarded): start the reset the policy calls for, if any."""
        used = read_usage(event["response"].get("usage"))
        try:
            auto = decide(
                self.policy,
                in_conversation=in_conversation,
                input_tokens=used.input_tokens if used is not None else 0,
                item_ids=self.conversation.item_ids,
                checkpoint=self.checkpoint,
            )
        except InvalidSyntheticEvent as exc:
            self._client_error("invalid_request_error", CODE_INVALID_RESET, exc.message, exc.param, None)
            return
        if auto is not None:
            self._auto = (self._seq + 1, auto.reason)  # set first: the reset may complete at once
            self._begin_reset(auto.request, auto.keep)

    def _auto_reason(self, reset: Reset) -> AutoReason | None:
        """Why the policy started `reset`; None when the client asked for it."""
        return self._auto[1] if self._auto is not None and self._auto[0] == reset.seq else None

    def _task_fields(self, reset: Reset) -> Event:
        """What a reset's end tells the client about the task it ends: its usage, and whether it was automatic."""
        reason = self._auto_reason(reset)
        fields: Event = {"usage": self.usage.task.as_event(), "auto": reason is not None}
        if reason is not None:
            fields["auto_reason"] = reason
        return fields

    def hand_over(self, new: Session, reset: Reset) -> tuple[Event, TaskEnded | None]:
        """A swap moves the client to `new` (another upstream): what the connection carries over (its usage
        totals, its policy, its checkpoint) goes with it, and the task a client's `reset` ends is ended here (a
        rollover ends none). Returns the task's fields for the completion, and the task's end to report."""
        fields = self._task_fields(reset)
        ended = None if reset.silent else self._task_ended(reset)
        new.usage = self.usage
        new.policy = self.policy
        new.checkpoint = self.checkpoint
        return fields, ended

    def _end_task(self, reset: Reset) -> bool:
        """A reset ended: the task's usage starts afresh. True when the reset was a trim (max_items)."""
        trim = self._auto_reason(reset) == "max_items"
        self.notices.append(self._task_ended(reset))
        return trim

    def _task_ended(self, reset: Reset) -> TaskEnded:
        """End the task `reset` ends: its usage starts afresh; returns what to report of it."""
        ended = self.usage.end_task()
        auto = self._auto_reason(reset) is not None
        self._auto = None
        return TaskEnded(ended.responses, ended.input_tokens, ended.output_tokens, auto)

    # --- upstream → client --------------------------------------------------------------------------

    def upstream_passes(self, data: bytes, text: bool) -> bool:
        """The fast path, as `client_passes`: True when `upstream_frame` would only forward this message."""
        if not text:
            return True
        sniffed = sniff_type(data)  # `_upstream_unread`, inlined: this runs for every audio delta
        return sniffed is not None and sniffed not in _UPSTREAM_INTERESTING

    def upstream_frame(self, data: Frame) -> None:
        if isinstance(data, Binary) or _upstream_unread(data):
            self._to_client.append(data)  # a delta or the like: it changes nothing we track
            return
        event = decode(data)
        etype = event.get("type") if event is not None else None
        if event is None or not isinstance(etype, str):
            self._to_client.append(data)
            return
        internal = False
        auto = self._auto_reset_kind(event) if etype == RESPONSE_DONE and self.reset is None else None
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
            self._quiet_since_reset = False  # new audio committed: a response for it is no late one
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
            if etype == OUTPUT_ITEM_ADDED:
                by = str_or_none(event.get("response_id"))
                if by in self._doomed or by in self._unwanted:
                    self._doom_item(item_id)
            self._delete_doomed(item_id)
        if not internal or self.config.forward_internal_events:
            self._to_client.append(data)
        if self.reset is not None:
            self._advance()
        elif auto is not None:
            self._auto_reset(event, in_conversation=auto)

    def _on_item_deleted(self, event: Event) -> bool:
        item_id = str_or_none(event.get("item_id"))
        if item_id is None:
            return False
        whose = self._whose_delete(item_id)
        if whose is None:
            return False
        event_id = self._deletes.get(item_id)
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

    def _oldest_deleted_item(self) -> str | None:
        """The item of the oldest delete with no answer yet, whoever's (a "no such item" error quoting no id)."""
        heads: list[tuple[int, str]] = [(entry[0][0], item_id) for item_id, entry in self._late_deletes.items()]
        if self._client_delete_ids:
            item_id, _, order = next(iter(self._client_delete_ids.values()))
            heads.append((order, item_id))
        heads.extend((self._commands[event_id].order, item_id) for item_id, event_id in self._deletes.items())
        return min(heads)[1] if heads else None

    def _whose_delete(self, item_id: str) -> Literal["client", "ours", "late"] | None:
        """Deletes are answered in the order sent: whose is the oldest delete of `item_id` still awaiting one."""
        candidates: list[tuple[int, Literal["client", "ours", "late"]]] = []
        client = self._client_deletes.get(item_id)
        if client:
            candidates.append((self._client_delete_ids[client[0]][2], "client"))
        event_id = self._deletes.get(item_id)
        if event_id is not None:
            candidates.append((self._commands[event_id].order, "ours"))
        late = self._late_deletes.get(item_id)
        if late:
            candidates.append((late[0][0], "late"))
        return min(candidates)[1] if candidates else None

    def _confirm_deleted(self, item_id: str) -> None:
        if self.reset is not None and item_id not in self.reset.keep:
            # Confirmed while this reset runs, even if an earlier reset or a clean-up sent the delete, or an error
            # was taken (by order, a guess) for its failure.
            self.reset.deleted.append(item_id)
            if item_id in self.reset.failed:
                self.reset.failed.remove(item_id)

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
        # The server answers clears in the order sent: the client's, a timed-out reset's, ours.
        heads: list[tuple[int, str]] = []
        if self._client_clears:
            heads.append((self._client_clears[0][2], "client"))
        if self._late_clears:
            heads.append((self._late_clears[0][0], "late"))
        if self._clears:
            heads.append((self._commands[self._clears[0]].order, "ours"))
        if not heads:
            return False
        whose = min(heads)[1]
        if whose == "client":
            self._client_clears.pop(0)
            return False
        if whose == "late":
            self._late_clears.pop(0)  # a timed-out reset's clear, answered at last
            return True
        event_id = self._clears.pop(0)
        self._answered(event_id, self._commands.pop(event_id))
        return True

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
        used = read_usage(response.get("usage"))
        self.usage.add(used)
        if used is not None:
            self.notices.append(Usage(used.input_tokens, used.cached_tokens, used.output_tokens))
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
        # A client's id-less cancel ends the conversation's response: any response not known to be out of band
        # (a server that reports no conversation_id is unlikely to run responses out of band at all).
        maybe_in_conversation = self.conversation.active_responses.get(rid) is not Kind.OUT_OF_BAND
        # The first cancel sent that applies to this response is the one that ended it (one of ours we stopped
        # waiting for included: it still takes the answer).
        for entry in self._cancel_fifo:
            if entry.response_id == rid or (entry.response_id is None and not entry.ours and maybe_in_conversation):
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
        self._unwanted.discard(rid)

    def _not_running(self, rid: str | None) -> None:
        """A not-active error for a cancel naming `rid`: evidence that the response is over."""
        if rid is not None and self.conversation.end_response(rid):
            self._response_over(rid)

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
        message = message if isinstance(message, str) else ""
        if code is None:
            code = next((c for wording, c in _WORDINGS if message.startswith(wording)), None)
        if ref is not None:
            return self._on_named_error(ref, code)
        # No event id: the server left it null. Attribute by code and by the id quoted in the message.
        if code == CODE_UNKNOWN_ITEM:
            match = _QUOTED_ID.search(message)
            item_id = match.group(1) if match else self._oldest_deleted_item()
            ours = self._unknown_item(item_id) if item_id is not None else None
            if ours is not None:
                return ours
        if code == CODE_CANCEL_NOT_ACTIVE:
            match = _QUOTED_ID.search(message)
            oldest = self._failed_cancel(match.group(1) if match else None)
            if oldest is None:
                return False
            if oldest.ours:
                cmd = self._commands.pop(oldest.event_id, None)
                if cmd is not None:
                    self._command_failed(oldest.event_id, cmd, code)
                else:
                    self._not_running(oldest.response_id)
            return oldest.ours
        if code == CODE_SESSION_EXPIRED:  # answers no command: the session ends
            return self.hooks is not None and self.hooks.session_expired()
        if code in _KNOWN_CODES or names_item_create(code):
            self.conversation.client_event_failed(None, code)  # the code names the kind: its oldest failed
            return False
        return self._oldest_failed(code)

    def _oldest_failed(self, code: str | None) -> bool:
        """An error no code or wording explains answers the oldest command with no answer yet, whoever's."""
        heads: list[tuple[int, str]] = []
        conv = self.conversation.oldest_unanswered()
        if conv is not None:
            heads.append((conv, "conversation"))
        if self._cancel_fifo:
            heads.append((self._cancel_fifo[0].order, "cancel"))
        if self._client_delete_ids:
            heads.append((next(iter(self._client_delete_ids.values()))[2], "client_delete"))
        if self._client_clears:
            heads.append((self._client_clears[0][2], "client_clear"))
        if self._commands:
            heads.append((next(iter(self._commands.values())).order, "ours"))
        late = [(entries[0][0], item_id) for item_id, entries in self._late_deletes.items()]
        if late:
            heads.append((min(late)[0], "late_delete"))
        if self._late_clears:
            heads.append((self._late_clears[0][0], "late_clear"))
        if not heads:
            return False
        whose = min(heads)[1]
        if whose == "conversation":
            self.conversation.fail_oldest()
        elif whose == "cancel":
            entry = self._cancel_fifo.pop(0)
            cmd = self._commands.pop(entry.event_id, None) if entry.ours else None
            if cmd is not None:
                self._command_failed(entry.event_id, cmd, code)
            return entry.ours
        elif whose == "client_delete":
            client_id, (item_id, _, _) = next(iter(self._client_delete_ids.items()))
            self._client_delete_done(item_id, client_id)
        elif whose == "client_clear":
            self._client_clears.pop(0)
        elif whose == "ours":
            event_id, cmd = next(iter(self._commands.items()))
            del self._commands[event_id]
            self._command_failed(event_id, cmd, code)
            if cmd.kind == "delete" and cmd.target is not None:
                # Only a guess (a spontaneous server_error reads the same): should its ack still come, it is ours
                # and the item is deleted after all.
                self._late_deletes.setdefault(cmd.target, []).append((cmd.order, event_id))
            return True
        elif whose == "late_delete":
            self._late_answer(min(late)[1])
            return True
        else:
            self._late_clears.pop(0)
            return True
        return False

    def _late_named(self, event_id: str) -> None:
        """An error names a command of ours we stopped waiting for: it has its answer, and leaves the order."""
        for item_id, late in self._late_deletes.items():
            if any(entry[1] == event_id for entry in late):
                self._late_answer(item_id, event_id)
                return
        for entry in self._late_clears:
            if entry[1] == event_id:
                self._late_clears.remove(entry)
                return

    def _failed_cancel(self, response_id: str | None) -> _Cancel | None:
        """The cancel a not-active error answers: cancels are answered in the order sent, so the oldest; the
        oldest that names the response when the message quotes one (none such: not a cancel we know of)."""
        for entry in self._cancel_fifo:
            if response_id is None or entry.response_id == response_id:
                self._cancel_fifo.remove(entry)
                return entry
        return None

    def _on_named_error(self, ref: str, code: str | None) -> bool:
        cmd = self._commands.pop(ref, None)
        if cmd is not None:
            self._command_failed(ref, cmd, code)
            return True
        cancel = self._cancel_entry(ref)
        if cancel is not None and code == CODE_CANCEL_NOT_ACTIVE:
            self._not_running(cancel.response_id)  # a settled cancel of ours, or the client's
        if ref.startswith(self._command_prefix):
            self._late_named(ref)
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
        if self.hooks is not None:
            self.hooks.client_event_refused(ref)
        return False

    def _unknown_item(self, item_id: str) -> bool | None:
        """A null-id error says `item_id` does not exist: whose delete was it? The oldest still awaiting an answer
        (True: ours; False: the client's; None: no delete of it is in flight)."""
        whose = self._whose_delete(item_id)
        if whose is None:
            return None
        self.conversation.remove(item_id)
        if whose == "client":
            self._client_delete_done(item_id, None)
            return False
        if whose == "ours":
            event_id = self._deletes[item_id]
            self._command_failed(event_id, self._commands.pop(event_id), CODE_UNKNOWN_ITEM)
        else:
            self._late_answer(item_id)
        return True

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
