"""What the upstream conversation holds, as far as the events that passed tell.

Rules (both generations):
- An item enters on `conversation.item.created` (beta) or `.added`/`.done` (GA) and leaves on
  `conversation.item.deleted`. `previous_item_id` places it: null → first, a known id → right after it,
  an id we never saw → last (we cannot do better, and order only affects listings).
- `input_audio_buffer.committed` announces an item that is not there yet: it is *pending* until its item
  event arrives, so a reset can wait for it instead of leaving it behind.
- Items of out-of-band responses (`response.conversation: "none"`, seen as `conversation_id: null` on the
  response) never enter: they are not in the conversation.
- A response is *in progress* from the moment a client `response.create` is forwarded (or the upstream
  starts one itself, e.g. server VAD) until its `response.done`, or until an `error` answers that create.
- A client `conversation.item.create` or `input_audio_buffer.commit` that was forwarded and not answered yet
  is an item *on its way*: a reset that follows it must wait for it, or the item would outlive the reset.
  Item events answer creates by item id (when the client chose one) or else in order; item events for
  announced items (committed audio, response output) answer nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
    Event,
    str_or_none,
)

_REMEMBER_REMOVED = 1024


@dataclass(slots=True)
class PendingCreate:
    """A client `response.create` that was forwarded and not yet answered."""

    event_id: str | None
    out_of_band: bool


class Conversation:
    def __init__(self) -> None:
        self.item_ids: list[str] = []
        self.additions = 0  # items ever added: tells a reset whether anything new needs a look
        self._present: set[str] = set()
        self.pending_items: set[str] = set()  # announced by `committed`, item event not seen yet
        self.pending_creates: deque[PendingCreate] = deque()
        self.item_creates: deque[tuple[str | None, str | None]] = deque()  # (client event id, item id)
        self.commits: deque[str | None] = deque()  # client event ids of commits not answered yet
        self._output_items: set[str] = set()  # announced by response.output_item.added, item event not seen
        # Recently deleted ids: a GA `conversation.item.done` that trails the delete must not bring one back.
        self._removed: dict[str, None] = {}
        # Items server VAD announced (speech_started/stopped): their `committed` answers no client commit.
        self._vad_items: set[str] = set()
        self.active_responses: dict[str, bool] = {}  # response id → in the conversation (not out-of-band)
        # Out-of-band response id → its output item ids; the items are ignored should an item event name them.
        self._oob_responses: dict[str, list[str]] = {}
        self._oob_items: set[str] = set()

    # --- items ------------------------------------------------------------------------------------

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._present

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def items_on_their_way(self) -> bool:
        """Something already sent or announced will still add an item."""
        return bool(self.pending_items or self.item_creates or self.commits)

    def add(self, item_id: str, previous_item_id: str | None, *, placed: bool = True) -> bool:
        """Record an item; returns False when it was already known (GA sends `.added` then `.done`)."""
        if item_id in self._present:
            return False
        self._answer_item_create(item_id)
        self.pending_items.discard(item_id)
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
        self.pending_items.discard(item_id)
        if item_id not in self._present:
            return False
        self._present.discard(item_id)
        self.item_ids.remove(item_id)
        self._removed[item_id] = None
        if len(self._removed) > _REMEMBER_REMOVED:
            del self._removed[next(iter(self._removed))]
        return True

    # --- responses --------------------------------------------------------------------------------

    def _answer_item_create(self, item_id: str) -> None:
        if item_id in self.pending_items:
            return
        if item_id in self._output_items:
            self._output_items.discard(item_id)
            return
        for entry in self.item_creates:
            if entry[1] == item_id:
                self.item_creates.remove(entry)
                return
        for entry in self.item_creates:
            if entry[1] is None:
                self.item_creates.remove(entry)
                return

    def on_client_event(self, etype: str, event: Event) -> None:
        """Note a forwarded client event that will start a response or add an item."""
        event_id = str_or_none(event.get("event_id"))
        if etype == RESPONSE_CREATE:
            response = event.get("response")
            oob = isinstance(response, dict) and response.get("conversation") == "none"
            self.pending_creates.append(PendingCreate(event_id, oob))
        elif etype == ITEM_CREATE:
            item = event.get("item")
            self.item_creates.append((event_id, str_or_none(item.get("id")) if isinstance(item, dict) else None))
        elif etype == AUDIO_COMMIT:
            self.commits.append(event_id)

    def client_event_failed(self, client_event_id: str | None, code: str | None) -> None:
        """An `error` answered a client event: by its event id, or (id null) guessed from its code."""
        if client_event_id is not None:
            for pending in self.pending_creates:
                if pending.event_id == client_event_id:
                    self.pending_creates.remove(pending)
                    return
            for entry in self.item_creates:
                if entry[0] == client_event_id:
                    self.item_creates.remove(entry)
                    return
            if client_event_id in self.commits:
                self.commits.remove(client_event_id)
            return
        if code == CODE_ALREADY_ACTIVE and self.pending_creates:
            self.pending_creates.popleft()
        elif code == CODE_COMMIT_EMPTY and self.commits:
            self.commits.popleft()
        elif code is not None and code.startswith("item_create") and self.item_creates:
            self.item_creates.popleft()

    @property
    def response_in_progress(self) -> bool:
        """A response that can still add items to the conversation runs or is about to start."""
        return any(self.active_responses.values()) or any(not p.out_of_band for p in self.pending_creates)

    def conversation_responses(self) -> list[str]:
        return [rid for rid, in_conv in self.active_responses.items() if in_conv]

    def end_response(self, response_id: str) -> None:
        self.active_responses.pop(response_id, None)
        for item_id in self._oob_responses.pop(response_id, ()):
            self._oob_items.discard(item_id)

    # --- the server event feed --------------------------------------------------------------------

    def on_server_event(self, etype: str, event: Event) -> None:
        """Update the model from one upstream event (every type is accepted; most change nothing)."""
        if etype in ITEM_EVENTS:
            item = event.get("item")
            item_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
            if item_id is None or item_id in self._oob_items or (etype == ITEM_DONE and item_id in self._removed):
                return
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
                self.commits.popleft()
            if item_id is not None and item_id not in self._present:
                self.pending_items.add(item_id)
        elif etype in (SPEECH_STARTED, SPEECH_STOPPED):
            item_id = str_or_none(event.get("item_id"))
            if item_id is not None and len(self._vad_items) < _REMEMBER_REMOVED:
                self._vad_items.add(item_id)
        elif etype == RESPONSE_CREATED:
            self._response_created(event)
        elif etype == RESPONSE_DONE:
            response = event.get("response")
            if isinstance(response, dict):
                rid = str_or_none(response.get("id"))
                if rid is not None:
                    self.end_response(rid)
        elif etype == OUTPUT_ITEM_ADDED:
            rid = str_or_none(event.get("response_id"))
            item = event.get("item")
            item_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
            if item_id is None or item_id in self._present:
                return
            oob_items = self._oob_responses.get(rid) if rid is not None else None
            if oob_items is not None:
                self._oob_items.add(item_id)
                oob_items.append(item_id)
            else:
                self._output_items.add(item_id)

    def _response_created(self, event: Event) -> None:
        response = event.get("response")
        if not isinstance(response, dict):
            return
        rid = str_or_none(response.get("id"))
        pending = self.pending_creates.popleft() if self.pending_creates else None
        if rid is None:
            return
        if "conversation_id" in response:
            # The server's own word wins over our guess from the request.
            oob = response["conversation_id"] is None
        else:
            oob = pending.out_of_band if pending is not None else False
        self.active_responses[rid] = not oob
        if oob:
            self._oob_responses[rid] = []
