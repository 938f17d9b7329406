"""What the upstream conversation holds, as far as the events that passed tell.

Rules (both generations):
- An item enters on `conversation.item.created` (beta) or `.added`/`.done` (GA) and leaves on
  `conversation.item.deleted`. `previous_item_id` places it: null → first, a known id → right after it,
  an id we never saw → last (we cannot do better, and order only affects listings).
- Evidence beats intent: an item event is tracked whatever the response that made it was requested as. A
  server that ignores `response.conversation: "none"` announces the item, and then it is in the conversation.
- `input_audio_buffer.committed` (and GA `.timeout_triggered`, which commits on its own) announces an item
  that is not there yet: it is *pending* until its item event arrives, so a reset can wait for it.
- A response's kind is the server's word when `response.created` carries `conversation_id` (null: out of
  band). Without it the kind is *unknown* (pairing it with a request by order is a guess that server-started
  responses break): a reset cancels it and waits for it, as for a conversation response; an item event for one
  of its output items settles it as in the conversation.
- A response is *in progress* from the moment a client `response.create` is forwarded (or the upstream
  starts one itself, e.g. server VAD) until its `response.done` (whatever its status or reason), until an
  `error` answers that create, or until a new in-conversation `response.created` replaces it (the server runs
  one conversation response at a time; some replace it without a `response.done`). A new response of unknown
  kind replaces earlier ones only when it answers a request that did not ask for `conversation: "none"`
  (the request is a hint here, never the evidence: it only lets a replaced response end).
- A client `conversation.item.create` or `input_audio_buffer.commit` that was forwarded and not answered yet
  is an item *on its way*: a reset that follows it must wait for it, or the item would outlive the reset.
  Item events answer creates by item id (when the client chose one) or else in order; item events for
  announced items (committed audio, response output) answer nothing.
- Nothing waits without a deadline: every client command in flight and every announced item carries the time
  it was sent or announced, and :meth:`Conversation.prune` stops waiting for those older than `max_age` (the
  reset timeout). An aged-out command still holds its place in the order (a slow server answers it at last,
  and that answer must not be taken for a newer command's); the newest few are kept for this, unwaited.
  An `error` with a null `event_id` answers the command its code names; with no code, or a code we do not
  know, the oldest command not answered yet (servers answer in order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from proxy.core.events import (
    AUDIO_COMMIT,
    AUDIO_COMMITTED,
    CODE_ALREADY_ACTIVE,
    CODE_COMMIT_EMPTY,
    ITEM_CREATE,
    ITEM_DELETED,
    ITEM_DONE,
    ITEM_EVENTS,
    OUTPUT_ITEM_ADDED,
    RESPONSE_CREATE,
    RESPONSE_CREATED,
    RESPONSE_DONE,
    SPEECH_STARTED,
    SPEECH_STOPPED,
    TIMEOUT_TRIGGERED,
    Event,
    str_or_none,
)

_REMEMBER_REMOVED = 1024
_MAX_EXPIRED = 64  # aged-out commands per queue kept only to keep the order of answers


def names_item_create(code: str | None) -> bool:
    """An error code that says a `conversation.item.create` failed (`item_create_invalid_previous_item_id`, ...)."""
    return code is not None and code.startswith("item_create")


class Kind(Enum):
    """What a running response can do to the conversation."""

    CONVERSATION = "conversation"
    OUT_OF_BAND = "out_of_band"
    UNKNOWN = "unknown"  # no conversation_id on its response.created


@dataclass(slots=True)
class PendingCreate:
    """A client command that was forwarded and not yet answered (`response.create`, item create, commit)."""

    event_id: str | None
    out_of_band: bool = False  # response.create only: what it asked for (a hint, never evidence of the kind)
    item_id: str | None = None  # conversation.item.create only: the id the client chose
    sent_at: float = 0.0
    order: int = 0  # the session's count of every command sent (answers come in that order)
    expired: bool = False  # older than `max_age`: not waited for, yet its late answer is still its own


def _live(queue: list[PendingCreate]) -> PendingCreate | None:
    """The oldest command of `queue` still waited for (expired ones are the oldest: a prefix)."""
    for entry in queue:
        if not entry.expired:
            return entry
    return None


class Conversation:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_age: float = 10.0) -> None:
        self._clock = clock
        self.max_age = max_age
        self.item_ids: list[str] = []
        self.additions = 0  # items ever added: tells a reset whether anything new needs a look
        self._present: set[str] = set()
        self.pending_items: dict[str, float] = {}  # announced by `committed`, item event not seen → when
        # Commands in flight, oldest first: lists, not deques (an empty deque is 760 bytes, an empty list 56, and
        # memory per idle session is a target); their answers come in order, so the first is nearly always the one.
        self.pending_creates: list[PendingCreate] = []  # response.create
        self.item_creates: list[PendingCreate] = []
        self.commits: list[PendingCreate] = []
        self._output_of: dict[str, str] = {}  # output item announced by output_item.added → its response
        # Recently deleted ids: a GA `conversation.item.done` that trails the delete must not bring one back.
        self._removed: dict[str, None] = {}
        # Items server VAD announced (speech_started/stopped): their `committed` answers no client commit.
        self._vad_items: set[str] = set()
        self.active_responses: dict[str, Kind] = {}
        self._outputs: dict[str, list[str]] = {}  # response id → its announced output items
        # Ids that creates forgotten by age had chosen: their late item answers no other create.
        self._expired_ids: dict[str, None] = {}

    # --- items ------------------------------------------------------------------------------------

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._present

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def items_on_their_way(self) -> bool:
        """Something already sent or announced will still add an item."""
        return bool(self.pending_items or _live(self.item_creates) or _live(self.commits))

    def items_coming(self) -> int:
        """How many items already sent or announced are still waited for."""
        queued = sum(not e.expired for q in (self.item_creates, self.commits) for e in q)
        return len(self.pending_items) + queued

    def add(self, item_id: str, previous_item_id: str | None, *, placed: bool = True) -> bool:
        """Record an item; returns False when it was already known (GA sends `.added` then `.done`)."""
        if item_id in self._present:
            return False
        self._answer_item_create(item_id)
        self.pending_items.pop(item_id, None)
        if placed and (previous_item_id is None or previous_item_id == "root"):
            self.item_ids.insert(0, item_id)
        elif not placed or previous_item_id not in self._present:
            self.item_ids.append(item_id)
        else:
            self.item_ids.insert(self.item_ids.index(previous_item_id) + 1, item_id)
        self._present.add(item_id)
        self.additions += 1
        return True

    def remove(self, item_id: str) -> bool:
        self.pending_items.pop(item_id, None)
        if item_id not in self._present:
            return False
        self._present.discard(item_id)
        self.item_ids.remove(item_id)
        self._removed[item_id] = None
        if len(self._removed) > _REMEMBER_REMOVED:
            del self._removed[next(iter(self._removed))]
        return True

    def _answer_item_create(self, item_id: str) -> None:
        if item_id in self.pending_items:
            return
        if item_id in self._expired_ids:
            del self._expired_ids[item_id]
            return
        rid = self._output_of.pop(item_id, None)
        if rid is not None:
            # A response's output item entered the conversation: evidence of the response's kind.
            if self.active_responses.get(rid) is not None:
                self.active_responses[rid] = Kind.CONVERSATION
            return
        for entry in self.item_creates:
            if entry.item_id == item_id:
                self._answered(self.item_creates, entry)
                return
        for entry in self.item_creates:
            if entry.item_id is None:
                self.item_creates.remove(entry)
                return

    # --- client commands in flight ----------------------------------------------------------------

    def on_client_event(self, etype: str, event: Event, order: int = 0) -> None:
        """Note a forwarded client event that will start a response or add an item (`order`: its place among
        every command the session sent)."""
        now = self._clock()
        self.prune(now)
        event_id = str_or_none(event.get("event_id"))
        if etype == RESPONSE_CREATE:
            # Whatever it asks for (`conversation: "none"` included): only its response.created shows its kind.
            response = event.get("response")
            oob = isinstance(response, dict) and response.get("conversation") == "none"
            self.pending_creates.append(PendingCreate(event_id, out_of_band=oob, sent_at=now, order=order))
        elif etype == ITEM_CREATE:
            item = event.get("item")
            item_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
            self.item_creates.append(PendingCreate(event_id, item_id=item_id, sent_at=now, order=order))
        elif etype == AUDIO_COMMIT:
            self.commits.append(PendingCreate(event_id, sent_at=now, order=order))

    def oldest_unanswered(self) -> int | None:
        """The order of the oldest command here with no answer yet (aged-out ones included), or None."""
        heads = [q[0].order for q in (self.pending_creates, self.item_creates, self.commits) if q]
        return min(heads) if heads else None

    def fail_oldest(self) -> None:
        """An error that names nothing answered the oldest command here (see :meth:`oldest_unanswered`)."""
        queue = min((q for q in (self.pending_creates, self.item_creates, self.commits) if q), key=lambda q: q[0].order)
        queue.pop(0)

    def client_event_failed(self, client_event_id: str | None, code: str | None) -> bool:
        """An `error` answered a client event: by its event id, or (id null) by the code that names its kind.

        Returns whether it answered a command in flight.
        """
        queues = (self.pending_creates, self.item_creates, self.commits)
        if client_event_id is not None:
            for queue in queues:
                for pending in queue:
                    if pending.event_id == client_event_id:
                        self._answered(queue, pending)
                        return True
            return False
        if code == CODE_ALREADY_ACTIVE:
            queue = self.pending_creates
        elif code == CODE_COMMIT_EMPTY:
            queue = self.commits
        elif names_item_create(code):
            queue = self.item_creates
        else:
            return False  # no code that names a kind: the session asks the order (see fail_oldest)
        if not queue:
            return False
        queue.pop(0)
        return True

    def _answered(self, queue: list[PendingCreate], entry: PendingCreate) -> None:
        """`entry` got the answer that names it: aged-out commands sent before it got theirs (in order) or none."""
        queue.remove(entry)
        while queue and queue[0].expired and queue[0].sent_at <= entry.sent_at:
            self._drop_expired(queue)

    def _drop_expired(self, queue: list[PendingCreate]) -> None:
        dropped = queue.pop(0)
        if dropped.item_id is not None:
            # Its late item, should it still come, answers no other create.
            self._expired_ids[dropped.item_id] = None
            if len(self._expired_ids) > _REMEMBER_REMOVED:
                del self._expired_ids[next(iter(self._expired_ids))]

    def oldest_sent(self) -> float | None:
        """When the oldest command in flight was sent or the oldest pending item announced (None: nothing)."""
        live = (_live(q) for q in (self.pending_creates, self.item_creates, self.commits))
        times = [entry.sent_at for entry in live if entry is not None]
        if self.pending_items:
            times.append(next(iter(self.pending_items.values())))
        return min(times) if times else None

    def prune(self, now: float) -> None:
        """Forget commands and announced items older than `max_age`: no answer is coming for them any more."""
        cutoff = now - self.max_age
        for queue in (self.pending_creates, self.item_creates, self.commits):
            expired = 0
            for entry in queue:
                if entry.sent_at > cutoff:
                    break
                entry.expired = True
                expired += 1
            for _ in range(expired - _MAX_EXPIRED):
                self._drop_expired(queue)
        pending = self.pending_items
        while pending:
            item_id, announced_at = next(iter(pending.items()))
            if announced_at > cutoff:
                break
            del pending[item_id]

    # --- responses --------------------------------------------------------------------------------

    @property
    def response_in_progress(self) -> bool:
        """A response that can still add items to the conversation runs or is about to start."""
        return bool(self.conversation_responses()) or self.response_requested

    @property
    def response_requested(self) -> bool:
        """A client asked for a response, and it has not started yet: until its `response.created` shows its
        kind it may add items (a server may ignore `conversation: "none"`)."""
        return any(not p.expired for p in self.pending_creates)

    def conversation_responses(self) -> list[str]:
        """Running responses that can add items (in the conversation, or of unknown kind): a reset cancels them
        and waits for them."""
        return [rid for rid, kind in self.active_responses.items() if kind is not Kind.OUT_OF_BAND]

    def end_response(self, response_id: str) -> bool:
        """The response is over; returns whether it was running."""
        for item_id in self._outputs.pop(response_id, ()):
            self._output_of.pop(item_id, None)
        return self.active_responses.pop(response_id, None) is not None

    # --- the server event feed --------------------------------------------------------------------

    def on_server_event(self, etype: str, event: Event) -> list[str]:
        """Update the model from one upstream event (every type is accepted; most change nothing).

        Returns the ids of the responses this event showed to be over (done, or replaced).
        """
        if etype in ITEM_EVENTS:
            item = event.get("item")
            item_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
            if item_id is None or (etype == ITEM_DONE and item_id in self._removed):
                return []
            placed = "previous_item_id" in event
            self.add(item_id, str_or_none(event.get("previous_item_id")), placed=placed)
        elif etype == ITEM_DELETED:
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None:
                self.remove(item_id)
        elif etype == AUDIO_COMMITTED:
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None and item_id in self._vad_items:
                self._vad_items.discard(item_id)  # server VAD committed it: no client commit is answered
            elif self.commits:
                self.commits.pop(0)
            if item_id is not None and item_id not in self._present:
                self.pending_items.setdefault(item_id, self._clock())
        elif etype in (SPEECH_STARTED, SPEECH_STOPPED, TIMEOUT_TRIGGERED):
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None and len(self._vad_items) < _REMEMBER_REMOVED:
                self._vad_items.add(item_id)
                if etype == TIMEOUT_TRIGGERED and item_id not in self._present:
                    self.pending_items.setdefault(item_id, self._clock())  # it commits the buffer itself
        elif etype == RESPONSE_CREATED:
            return self._response_created(event)
        elif etype == RESPONSE_DONE:
            response = event.get("response")
            rid = str_or_none(response.get("id")) if isinstance(response, dict) else None
            if rid is not None:
                self.end_response(rid)
                return [rid]
        elif etype == OUTPUT_ITEM_ADDED:
            rid = str_or_none(event.get("response_id"))
            item = event.get("item")
            item_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
            if item_id is None or rid is None or item_id in self._present:
                return []
            self._output_of[item_id] = rid
            self._outputs.setdefault(rid, []).append(item_id)
        return []

    def _response_created(self, event: Event) -> list[str]:
        response = event.get("response")
        if not isinstance(response, dict):
            return []
        rid = str_or_none(response.get("id"))
        # It answers the oldest request (a guess only for which one), or none: the server started it itself.
        request = self.pending_creates.pop(0) if self.pending_creates else None
        if rid is None:
            return []
        if "conversation_id" in response:
            # The server's own word.
            kind = Kind.OUT_OF_BAND if response["conversation_id"] is None else Kind.CONVERSATION
        else:
            kind = Kind.UNKNOWN
        ended: list[str] = []
        if kind is Kind.CONVERSATION:
            # One conversation response at a time: a new one shows the old one is over, done or not.
            ended = [r for r, k in self.active_responses.items() if k is Kind.CONVERSATION and r != rid]
        elif kind is Kind.UNKNOWN and request is not None and not request.out_of_band:
            # A server that names no conversation started the response a client asked to have in the
            # conversation: any earlier one that may be in the conversation is over (or was replaced), and one
            # that was really out of band adds nothing to it anyway.
            ended = [r for r, k in self.active_responses.items() if k is not Kind.OUT_OF_BAND and r != rid]
        for old in ended:
            self.end_response(old)
        self.active_responses[rid] = kind
        return ended
