"""An in-memory model of the OpenAI Realtime upstream server, written from ``/work/shared/realtime-protocol.md``.

It shares no code with ``proxy.core`` (nor with ``proxy.simulator``): it is an independent model of the server,
so a test of the core against it means something. It has no clock and no socket. :meth:`UpstreamModel.receive`
processes one client frame at once; the ``server_*`` methods are what the server does on its own (a server-VAD
turn, a response producing an output item or finishing); every server event lands in :attr:`UpstreamModel.outbox`
in order, and the test's scheduler decides when each one is delivered.

Every call takes a *cause* tag (any object, chosen by the test): each server event and each item remembers the
cause that made it, so the test can tell an ack of the proxy's own command from one of the client's, and an item
the client created after a reset from one that should have been deleted by it.

What it models:
- the conversation, ordered items. ``conversation.item.create`` takes an optional client ``item.id`` and an
  optional ``previous_item_id`` (absent or null → last, ``"root"`` → first, a present id → right after it, any other
  id → error ``item_create_invalid_previous_item_id``). ``conversation.item.delete`` → ``conversation.item.deleted``
  ``{item_id}``, or error ``item_delete_invalid_item_id`` with message
  ``Error deleting item: the item with id '<id>' does not exist.``
- the input audio buffer: ``append`` (never acknowledged), ``commit`` (→ ``input_audio_buffer.committed`` and the
  user item, or error ``input_audio_buffer_commit_empty`` when empty), ``clear`` (→ ``input_audio_buffer.cleared``,
  always), and server-VAD turns (``speech_started``/``speech_stopped``/``committed`` + the item, optionally a
  response, not a second one). The buffer remembers which append each chunk came from.
- responses: at most one in the conversation at a time (a second ``response.create`` → error
  ``conversation_already_has_active_response``), any number out of band (``response.conversation: "none"``: their
  output never enters the conversation and has no conversation events). Output items enter the conversation at the
  end as they start (``response.output_item.added`` then the item event); a running response keeps adding items
  after others were deleted. ``response.cancel`` (by ``response_id``, or the conversation's response when absent)
  ends the response with ``response.done`` status ``cancelled``; the partial item stays. Nothing to cancel → error
  ``response_cancel_not_active``.
- ``session.update`` → ``session.updated``.
- an unknown client event type → error ``invalid_value``, param ``type`` (how a synthetic event that leaked
  upstream would show up); such types are also listed in :attr:`UpstreamModel.invalid_types`.
- ``error.event_id`` names the client event, or is null when the caller asks for it (the real server sometimes
  leaves it null).
- beta names (``conversation.item.created``, ``response.text.delta``) or GA names (``conversation.item.added`` then
  ``conversation.item.done``, ``response.output_text.delta``).

How server events are encoded (bytes or str, key order) is the caller's choice. Unconfirmed behaviour is a switch:
whether ``response.created``/``response.done`` carry ``conversation_id``, and whether a GA
``conversation.item.done`` still follows for an output item deleted before it finished.
Not modelled: audio content and transcription, truncate/retrieve, session settings, rate limits, session expiry.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Event = dict[str, Any]
Generation = Literal["beta", "ga"]

#: Client event types the server knows (both generations); anything else is an ``invalid_value`` error.
CLIENT_EVENT_TYPES = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "response.create",
        "response.cancel",
        "output_audio_buffer.clear",
        "transcription_session.update",
    }
)
_NOT_MODELLED = frozenset(
    {
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "output_audio_buffer.clear",
        "transcription_session.update",
    }
)


@dataclass(eq=False)
class ServerEvent:
    """One event the server sends, with the cause that made it; `delivered_at` is the scheduler's to set."""

    event: Event
    data: bytes | str
    cause: object
    delivered_at: int | None = None

    @property
    def type(self) -> str:
        return str(self.event["type"])


@dataclass(eq=False)
class Item:
    """One item the server made; `announced` is its conversation item event (None for out-of-band output)."""

    id: str
    role: str
    origin: object
    in_conversation: bool
    announced: ServerEvent | None = None
    deleted_by: object | None = None
    deleted_ack: ServerEvent | None = None
    previous_at_add: str | None = None

    def as_json(self, status: str = "completed") -> Event:
        content_type = "input_text" if self.role == "user" else "output_text"
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "status": status,
            "role": self.role,
            "content": [{"type": content_type, "text": "..."}],
        }


@dataclass(eq=False)
class Response:
    """A response in progress: in the conversation or out of band; `origin` is the cause that started it."""

    id: str
    out_of_band: bool
    origin: object
    output: list[Item] = field(default_factory=list)
    current: Item | None = None


class UpstreamModel:
    """The upstream server of one Realtime WebSocket connection, as a deterministic in-memory state machine."""

    def __init__(
        self,
        generation: Generation = "beta",
        *,
        conversation_id_on_response: bool = True,
        done_after_delete: bool = True,
        conversation_id: str = "conv_model1",
        encode: Callable[[Event], bytes | str] = orjson.dumps,
    ) -> None:
        self.generation: Generation = generation
        self.conversation_id_on_response = conversation_id_on_response
        self.done_after_delete = done_after_delete
        self.conversation_id = conversation_id
        self.encode = encode  # how server events become text frames
        self.conversation: list[Item] = []
        self.items: dict[str, Item] = {}  # every item ever made, by id (deleted and out-of-band ones too)
        self.audio: list[tuple[object, int]] = []  # the input audio buffer: (cause of the append, bytes)
        self.responses: dict[str, Response] = {}  # running ones, in start order
        self.outbox: deque[ServerEvent] = deque()
        self.sent: list[ServerEvent] = []  # every event ever queued, in order
        self.processed: list[object] = []  # causes of the client frames processed, in order
        self.invalid_types: list[str] = []
        self.deletions: list[Item] = []  # items deleted, in order
        self._ids = 0
        self._audio_ms = 0

    # --- queries ----------------------------------------------------------------------------------

    @property
    def item_ids(self) -> list[str]:
        return [item.id for item in self.conversation]

    @property
    def audio_bytes(self) -> int:
        return sum(size for _, size in self.audio)

    @property
    def conversation_response(self) -> Response | None:
        """The response running in the conversation, if any."""
        for response in self.responses.values():
            if not response.out_of_band:
                return response
        return None

    def _index(self, item_id: str) -> int | None:
        for i, item in enumerate(self.conversation):
            if item.id == item_id:
                return i
        return None

    # --- output -----------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_m{self._ids:05d}"

    def _emit(self, event: Event, cause: object) -> ServerEvent:
        event = {"type": event["type"], "event_id": self._new_id("event"), **event}
        out = ServerEvent(event, self.encode(event), cause)
        self.outbox.append(out)
        self.sent.append(out)
        return out

    def _error(
        self, code: str, message: str, param: str | None, client_event: Event, cause: object, null_id: bool
    ) -> None:
        client_id = client_event.get("event_id")
        ref = client_id if isinstance(client_id, str) and not null_id else None
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param, "event_id": ref}
        self._emit({"type": "error", "error": error}, cause)

    def session_created(self, cause: object) -> None:
        """The first event of every connection."""
        session = {"id": "sess_model1", "object": "realtime.session", "turn_detection": {"type": "server_vad"}}
        self._emit({"type": "session.created", "session": session}, cause)

    # --- the conversation ---------------------------------------------------------------------------

    def _insert(self, item: Item, index: int, cause: object, *, done_now: bool) -> None:
        """Put `item` at `index` and announce it (beta: created; GA: added, and done when it is finished)."""
        self.conversation.insert(index, item)
        self.items[item.id] = item
        previous = self.conversation[index - 1].id if index > 0 else None
        item.previous_at_add = previous
        status = "completed" if done_now else "in_progress"
        event_type = "conversation.item.created" if self.generation == "beta" else "conversation.item.added"
        item.announced = self._emit(
            {"type": event_type, "previous_item_id": previous, "item": item.as_json(status)}, cause
        )
        if done_now and self.generation == "ga":
            self._emit({"type": "conversation.item.done", "previous_item_id": previous, "item": item.as_json()}, cause)

    def _append_user_item(self, item_id: str, cause: object, origin: object) -> None:
        item = Item(item_id, "user", origin, in_conversation=True)
        self._insert(item, len(self.conversation), cause, done_now=True)

    def _commit(self, cause: object) -> str:
        item_id = self._new_id("item")
        previous = self.conversation[-1].id if self.conversation else None
        self._emit({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id}, cause)
        self.audio = []
        self._append_user_item(item_id, cause, cause)
        return item_id

    # --- client frames ------------------------------------------------------------------------------

    def receive(self, data: bytes | str, cause: object, *, null_error_ids: bool = False) -> None:
        """Process one client frame now; `null_error_ids` leaves `error.event_id` null in the errors it causes."""
        self.processed.append(cause)
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            self._error("invalid_json", "We could not parse the JSON body of your request.", None, {}, cause, True)
            return
        etype = event.get("type")
        if not isinstance(etype, str) or etype not in CLIENT_EVENT_TYPES:
            self.invalid_types.append(str(etype))
            supported = ", ".join(f"'{t}'" for t in sorted(CLIENT_EVENT_TYPES))
            self._error(
                "invalid_value",
                f"Invalid value: '{etype}'. Supported values are: {supported}.",
                "type",
                event,
                cause,
                null_error_ids,
            )
            return
        if etype in _NOT_MODELLED:
            raise NotImplementedError(f"the upstream model does not model {etype!r}")
        handler = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._client_commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._create,
            "conversation.item.delete": self._delete,
            "response.create": self._response_create,
            "response.cancel": self._cancel,
        }[etype]
        handler(event, cause, null_error_ids)

    def _session_update(self, event: Event, cause: object, null_id: bool) -> None:
        session = event.get("session")
        self._emit({"type": "session.updated", "session": session if isinstance(session, dict) else {}}, cause)

    def _append(self, event: Event, cause: object, null_id: bool) -> None:
        audio = event.get("audio")
        try:
            chunk = base64.b64decode(audio if isinstance(audio, str) else "", validate=True)
        except (binascii.Error, ValueError):
            self._error(
                "invalid_value", "Invalid 'audio': expected base64-encoded audio bytes.", "audio", event, cause, null_id
            )
            return
        if chunk:
            self.audio.append((cause, len(chunk)))

    def _client_commit(self, event: Event, cause: object, null_id: bool) -> None:
        if self.audio_bytes == 0:
            self._error(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
                "but buffer only has 0.00ms of audio.",
                None,
                event,
                cause,
                null_id,
            )
            return
        self._commit(cause)

    def _clear(self, event: Event, cause: object, null_id: bool) -> None:
        self.audio = []
        self._emit({"type": "input_audio_buffer.cleared"}, cause)

    def _create(self, event: Event, cause: object, null_id: bool) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            self._error(
                "missing_required_parameter", "Missing required parameter: 'item'.", "item", event, cause, null_id
            )
            return
        item_id = item.get("id")
        if item_id is not None and (not isinstance(item_id, str) or item_id in self.items):
            # Unconfirmed code; the property tests never reuse an id.
            self._error(
                "item_create_duplicate_id",
                f"Item with id '{item_id}' already exists.",
                "item.id",
                event,
                cause,
                null_id,
            )
            return
        previous = event.get("previous_item_id")
        if previous is None:
            index = len(self.conversation)
        elif previous == "root":
            index = 0
        else:
            found = self._index(previous) if isinstance(previous, str) else None
            if found is None:
                self._error(
                    "item_create_invalid_previous_item_id",
                    f"Error adding item: the previous item with id '{previous}' does not exist.",
                    "previous_item_id",
                    event,
                    cause,
                    null_id,
                )
                return
            index = found + 1
        role = item.get("role")
        new = Item(item_id or self._new_id("item"), role if isinstance(role, str) else "user", cause, True)
        self._insert(new, index, cause, done_now=True)

    def _delete(self, event: Event, cause: object, null_id: bool) -> None:
        item_id = event.get("item_id")
        index = self._index(item_id) if isinstance(item_id, str) else None
        if index is None:
            self._error(
                "item_delete_invalid_item_id",
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                "item_id",
                event,
                cause,
                null_id,
            )
            return
        item = self.conversation.pop(index)
        item.deleted_by = cause
        self.deletions.append(item)
        item.deleted_ack = self._emit({"type": "conversation.item.deleted", "item_id": item.id}, cause)

    def _response_create(self, event: Event, cause: object, null_id: bool) -> None:
        params = event.get("response")
        out_of_band = isinstance(params, dict) and params.get("conversation") == "none"
        running = self.conversation_response
        if not out_of_band and running is not None:
            self._error(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {running.id}. Wait until the "
                "response is finished before creating a new one.",
                None,
                event,
                cause,
                null_id,
            )
            return
        self._start_response(cause, out_of_band=out_of_band)

    def _cancel(self, event: Event, cause: object, null_id: bool) -> None:
        response_id = event.get("response_id")
        if response_id is not None:
            target = self.responses.get(response_id) if isinstance(response_id, str) else None
        else:
            target = self.conversation_response
        if target is None:
            self._error(
                "response_cancel_not_active",
                "Cancellation failed: no active response found",
                None,
                event,
                cause,
                null_id,
            )
            return
        self._end_response(target, "cancelled", cause)

    # --- responses ----------------------------------------------------------------------------------

    def _response_json(self, response: Response, status: str) -> Event:
        body: Event = {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": None if status in ("in_progress", "completed") else {"type": status},
            "output": [item.as_json() for item in response.output] if status != "in_progress" else [],
        }
        if self.conversation_id_on_response:
            body["conversation_id"] = None if response.out_of_band else self.conversation_id
        if status != "in_progress":
            out = len(response.output) * 5
            body["usage"] = {
                "total_tokens": 10 + out,
                "input_tokens": 10,
                "output_tokens": out,
                "input_token_details": {"cached_tokens": 0},
            }
        return body

    def _start_response(self, cause: object, *, out_of_band: bool) -> Response:
        response = Response(self._new_id("resp"), out_of_band, cause)
        self.responses[response.id] = response
        self._emit({"type": "response.created", "response": self._response_json(response, "in_progress")}, cause)
        return response

    def _finish_output_item(self, response: Response, status: str, cause: object) -> None:
        item = response.current
        if item is None:
            return
        response.current = None
        index = response.output.index(item)
        self._emit(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": index,
                "item": item.as_json(status),
            },
            cause,
        )
        if response.out_of_band or self.generation != "ga":
            return
        position = self._index(item.id)
        if position is None and not self.done_after_delete:
            return
        previous = (
            (self.conversation[position - 1].id if position > 0 else None)
            if position is not None
            else item.previous_at_add
        )
        self._emit(
            {"type": "conversation.item.done", "previous_item_id": previous, "item": item.as_json(status)}, cause
        )

    def _end_response(self, response: Response, status: str, cause: object) -> None:
        self._finish_output_item(response, "incomplete" if status == "cancelled" else "completed", cause)
        del self.responses[response.id]
        self._emit({"type": "response.done", "response": self._response_json(response, status)}, cause)

    def server_response_step(self, response_id: str, cause: object, *, add_item: bool) -> None:
        """The response produces its next output item (`add_item`), or finishes (status completed)."""
        response = self.responses[response_id]
        if not add_item:
            self._end_response(response, "completed", cause)
            return
        self._finish_output_item(response, "completed", cause)
        item = Item(self._new_id("item"), "assistant", response.origin, not response.out_of_band)
        response.output.append(item)
        response.current = item
        self._emit(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": len(response.output) - 1,
                "item": item.as_json("in_progress"),
            },
            cause,
        )
        if response.out_of_band:
            self.items[item.id] = item
        else:
            self._insert(item, len(self.conversation), cause, done_now=False)
        delta_type = "response.text.delta" if self.generation == "beta" else "response.output_text.delta"
        self._emit(
            {
                "type": delta_type,
                "response_id": response.id,
                "item_id": item.id,
                "output_index": len(response.output) - 1,
                "content_index": 0,
                "delta": "...",
            },
            cause,
        )

    # --- server VAD ---------------------------------------------------------------------------------

    def server_vad_turn(self, cause: object, *, create_response: bool) -> ServerEvent:
        """Server VAD hears a turn in the buffered audio: it commits it, and may start a response.

        Returns the `input_audio_buffer.committed` event. Needs audio in the buffer. With a response already
        running in the conversation no second one starts.
        """
        assert self.audio_bytes > 0, "server VAD needs audio in the buffer"
        item_id = self._new_id("item")
        self._emit(
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": self._audio_ms, "item_id": item_id}, cause
        )
        self._audio_ms += 500
        self._emit(
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self._audio_ms, "item_id": item_id}, cause
        )
        previous = self.conversation[-1].id if self.conversation else None
        committed = self._emit(
            {"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id}, cause
        )
        self.audio = []
        self._append_user_item(item_id, cause, cause)
        if create_response and self.conversation_response is None:
            self._start_response(cause, out_of_band=False)
        return committed
