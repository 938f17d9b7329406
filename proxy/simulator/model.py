"""The OpenAI Realtime server of one WebSocket connection, as a sans-I/O model (beta and GA protocol generations).

Written from ``/work/shared/realtime-protocol.md``. It imports nothing from ``proxy.core``: it is an independent
model of the upstream, so a test of the core against it means something. It has no asyncio, no socket and no
clock: time is an input. :meth:`Model.receive` handles one client frame; the ``server_*`` methods are what the
server does on its own (a server-VAD turn, an idle timeout, a response step); :meth:`Model.advance` runs whatever
is due by ``now`` (the wire calls it from a loop timer at :attr:`Model.next_deadline`; the property tests never
call it and drive every server action by hand). Every server event lands in :attr:`Model.outbox` in order, already
encoded; the caller decides when each one is delivered. A close the server asks for is :attr:`Model.close_request`.

Every entry point takes a *cause* (any object, chosen by the caller): each server event and each item remembers the
cause that made it, so a test can tell an ack of the proxy's own command from one of the client's.

What it models:
- the conversation, ordered items: ``conversation.item.create`` (optional client ``item.id``, at most
  ``max_item_id_len`` characters, no duplicate; ``previous_item_id`` absent/null → last, ``"root"`` → first, a
  present id → right after it, anything else → ``item_create_invalid_previous_item_id``), ``.delete``,
  ``.retrieve``, ``.truncate`` (unknown id → ``item_<verb>_invalid_item_id``);
- the input audio buffer: ``append`` (never acknowledged; each chunk remembers its cause), ``commit`` (→
  ``input_audio_buffer.committed`` + the user item, or ``input_audio_buffer_commit_empty``), ``clear`` (→
  ``cleared``); server-VAD turns (``speech_started``/``speech_stopped``/``committed`` + the item, maybe a
  response), on their own once ``vad_commit_bytes`` are buffered or when the caller says so;
- responses: one in the conversation at a time (a second → ``conversation_already_has_active_response``), any
  number out of band (``response.conversation: "none"``: null ``conversation_id``, no conversation events).
  Each streams output items (``output_item.added``, the item event, ``content_part.added``, text or audio
  deltas, ``.done`` events) and ends with ``response.done`` and its usage. ``response.cancel`` ends one
  (``cancelled``, reason ``client_cancelled``; the partial item stays); nothing to cancel →
  ``response_cancel_not_active``;
- the session object (``session.created``; ``session.update`` merges partial objects in either generation's
  spelling → ``session.updated``), and the session cap (``session_expired`` unless ``session_expired_error`` is
  off, then a close with 1001 and OpenAI's reason);
- unknown client event types → ``invalid_value`` on ``type`` (also listed in :attr:`Model.invalid_types`);
- faults: ``stall_acks`` swallows deletes and clears; ``null_error_event_ids`` leaves ``error.event_id`` null.

Quirks of real servers, each off unless named in ``ModelConfig.quirks`` (see :data:`QUIRKS`):
- ``null_errors``: every error for a failed client event has ``code`` and ``event_id`` null;
- ``no_cancel``: ``response.cancel`` is answered by an error (code ``not_implemented``); responses run to the end;
- ``replace_response``: a new in-conversation response replaces a running one: no ``response.done`` for the old;
- ``ignore_out_of_band``: ``conversation: "none"`` is ignored: the response is an ordinary one;
- ``late_auto_response``: the auto-response for a server-VAD or idle-timeout commit starts only
  ``transcription_delay_s`` later (or when the caller calls :meth:`Model.server_start_late_response`);
- ``vad_interrupt``: a VAD turn during a conversation response ends it (``cancelled``, reason ``turn_detected``)
  right after ``speech_started``;
- ``idle_timeout``: with turn detection on, after ``idle_timeout_s`` (or ``turn_detection.idle_timeout_ms``)
  without audio the server sends ``input_audio_buffer.timeout_triggered`` (GA's name, sent in either generation)
  with its own ``item_id`` and commits an (empty) audio item like any commit, which may start a response;
- unconfirmed behaviour: ``response_without_conversation_id`` (``response.created``/``.done`` carry no
  ``conversation_id`` key), ``no_item_done_after_delete`` (no GA ``conversation.item.done`` for an output item
  deleted before it finished).
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.simulator.shapes import (
    Event,
    Generation,
    event_part,
    initial_session,
    merge,
    normalize_item,
    normalize_turn_detection,
    usage,
)

QUIRKS: tuple[str, ...] = (
    "null_errors",
    "no_cancel",
    "replace_response",
    "ignore_out_of_band",
    "late_auto_response",
    "vad_interrupt",
    "idle_timeout",
    "response_without_conversation_id",
    "no_item_done_after_delete",
)

#: Client event types the server handles; anything else is an ``invalid_value`` error naming these.
CLIENT_EVENT_TYPES: tuple[str, ...] = (
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
)

# 10 ms of silence at 24 kHz pcm16: the payload of every simulated audio delta.
_AUDIO_CHUNK_B64 = base64.b64encode(b"\x00" * 480).decode()
_BYTES_PER_MS = 48  # pcm16 mono 24 kHz


@dataclass(frozen=True)
class ModelConfig:
    """How the modelled server behaves; every default is the documented behaviour of OpenAI's server."""

    quirks: frozenset[str] = frozenset()
    delta_count: int = 5  # deltas per streamed response
    delta_interval_s: float = 0.005
    stream_responses: bool = True  # False: responses advance only by server_response_step (property tests)
    server_vad: bool = False  # turn detection on at session start
    vad_commit_bytes: int | None = 9600  # buffered audio that makes a VAD turn on its own; None: only when told
    null_error_event_ids: bool = False
    stall_acks: bool = False  # fault: deletes and clears are neither applied nor answered
    max_item_id_len: int = 32  # unconfirmed limit
    session_max_s: float | None = None  # the session cap: close 1001 with OpenAI's reason this long after the start
    session_expired_error: bool = True  # at the cap, an `error` session_expired first (some versions send none)
    transcription_delay_s: float = 1.0  # late_auto_response: commit → response.created
    idle_timeout_s: float = 5.0  # idle_timeout, unless turn_detection.idle_timeout_ms says otherwise

    def __post_init__(self) -> None:
        unknown = set(self.quirks) - set(QUIRKS)
        if unknown:
            raise ValueError(f"unknown quirk(s) {sorted(unknown)}; known: {', '.join(QUIRKS)}")


@dataclass(eq=False)
class ServerEvent:
    """One event the server sends, encoded, with the cause that made it; `delivered_at` is the caller's to set."""

    event: Event
    data: bytes | str
    cause: object
    delivered_at: int | None = None

    @property
    def type(self) -> str:
        return str(self.event.get("type"))


@dataclass(eq=False)
class Item:
    """One item the server made; `announced` is its conversation item event (None for out-of-band output)."""

    id: str
    data: Event  # the item as the server shows it; output items grow as they stream
    origin: object
    in_conversation: bool
    announced: ServerEvent | None = None
    deleted_by: object | None = None
    deleted_ack: ServerEvent | None = None
    previous_at_add: str | None = None
    response: Response | None = None  # output items: the response that made it

    @property
    def role(self) -> str | None:
        role = self.data.get("role")
        return role if isinstance(role, str) else None

    def as_json(self) -> Event:
        return copy.deepcopy(self.data)


@dataclass(eq=False)
class Response:
    """A response in progress: in the conversation or out of band; `origin` is the cause that started it."""

    id: str
    out_of_band: bool
    origin: object
    body: Event  # the response object as response.created/.done carry it
    modalities: list[str]
    chunks: deque[str]
    input_tokens: int
    late: bool = False  # started after a transcription delay (late_auto_response)
    output: list[Item] = field(default_factory=list)
    current: Item | None = None
    deltas_sent: int = 0
    next_due: float | None = None  # streaming: when the next delta is due


@dataclass(eq=False)
class PendingResponse:
    """An auto-response the server will start once transcription is done (late_auto_response)."""

    due: float
    origin: object


def _counter_ids() -> Callable[[str], str]:
    count = 0

    def new_id(prefix: str) -> str:
        nonlocal count
        count += 1
        return f"{prefix}m{count:05d}"

    return new_id


class Model:
    """The upstream server of one Realtime WebSocket connection, as a deterministic state machine."""

    def __init__(
        self,
        config: ModelConfig | None = None,
        generation: Generation = "ga",
        *,
        session_id: str = "sess_model1",
        conversation_id: str = "conv_model1",
        model: str = "gpt-realtime",
        now: float = 0.0,
        wall_clock: int = 0,
        new_id: Callable[[str], str] | None = None,
        encode: Callable[[Event], bytes | str] = orjson.dumps,
    ) -> None:
        self.config = config or ModelConfig()
        self.quirks = frozenset(self.config.quirks)
        self.generation: Generation = generation
        self.session_id = session_id
        self.conversation_id = conversation_id
        self.encode = encode
        self.new_id = new_id or _counter_ids()
        self.now = now
        expires = wall_clock + (1800 if generation == "beta" else 3600)
        self.session: Event = initial_session(generation, session_id, model, expires, server_vad=self.config.server_vad)
        self.conversation: list[Item] = []
        self.items: dict[str, Item] = {}  # every item ever made, by id (deleted and out-of-band ones too)
        self.audio: list[tuple[object, int]] = []  # the input audio buffer: (cause of the append, bytes)
        self.audio_total_bytes = 0  # every byte ever appended: gives audio_start_ms/audio_end_ms
        self.responses: dict[str, Response] = {}  # running ones, in start order
        self.pending_responses: list[PendingResponse] = []  # late auto-responses not started yet
        self.outbox: deque[ServerEvent] = deque()
        self.sent: list[ServerEvent] = []  # every event ever queued, in order
        self.received: list[Event] = []  # every client event, parsed (`<unparsable>` for the rest)
        self.processed: list[object] = []  # causes of the client frames processed, in order
        self.invalid_types: list[str] = []
        self.deletions: list[Item] = []  # items deleted, in order
        self.abandoned: list[Response] = []  # responses replaced without a response.done (replace_response)
        self.close_request: tuple[int, str] | None = None
        self.quirk_hits: Counter[str] = Counter()  # how often each quirk changed what the server did
        self._cause: object = None
        self._null_ids = False
        self._response_count = 0
        self._expires_at = now + self.config.session_max_s if self.config.session_max_s is not None else None
        self._idle_since = now
        self._idle_fired = False

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

    @property
    def turn_detection(self) -> Event | None:
        if self.generation == "beta":
            td = self.session.get("turn_detection")
        else:
            td = self.session.get("audio", {}).get("input", {}).get("turn_detection")
        return td if isinstance(td, dict) else None

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`advance` next has something to do (None: nothing is scheduled)."""
        dues = [due for due, _ in self._timers()]
        return min(dues) if dues else None

    def _index(self, item_id: object) -> int | None:
        for i, item in enumerate(self.conversation):
            if item.id == item_id:
                return i
        return None

    # --- time ---------------------------------------------------------------------------------------

    def _timers(self) -> list[tuple[float, Callable[[], object]]]:
        timers: list[tuple[float, Callable[[], object]]] = []
        if self._expires_at is not None and self.close_request is None:
            timers.append((self._expires_at, self._expire))
        if self.pending_responses:
            timers.append((self.pending_responses[0].due, self._start_late))
        idle = self._idle_deadline()
        if idle is not None:
            timers.append((idle, self._idle_timer))
        for response in self.responses.values():
            if response.next_due is not None:
                timers.append((response.next_due, functools.partial(self._stream_step, response)))
        return timers

    def advance(self, now: float, cause: object = None) -> None:
        """Do everything due by `now`, in time order (each at its own due time, so spacing is kept)."""
        self._cause = cause
        for _ in range(1_000_000):
            timers = self._timers()
            if not timers:
                break
            due, action = min(timers, key=lambda t: t[0])
            if due > now:
                break
            self.now = max(self.now, due)
            action()
        self.now = max(self.now, now)

    def _idle_deadline(self) -> float | None:
        if "idle_timeout" not in self.quirks or self._idle_fired or self.conversation_response is not None:
            return None
        td = self.turn_detection
        if td is None:
            return None
        ms = td.get("idle_timeout_ms")
        timeout = ms / 1000 if isinstance(ms, int | float) and not isinstance(ms, bool) else self.config.idle_timeout_s
        return self._idle_since + timeout

    def _idle_timer(self) -> None:
        self.server_idle_timeout(self._cause)

    def _expire(self) -> None:
        minutes = 30 if self.generation == "beta" else 60
        reason = f"Your session hit the maximum duration of {minutes} minutes."
        if self.config.session_expired_error:
            self._emit_error("session_expired", reason, None, None)
        self.close_request = (1001, reason)

    # --- output -------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> ServerEvent:
        if "event_id" not in event:
            head = {"type": event["type"]} if "type" in event else {}
            event = {**head, "event_id": self.new_id("event_"), **event}
        out = ServerEvent(event, self.encode(event), self._cause)
        self.outbox.append(out)
        self.sent.append(out)
        return out

    def _emit_error(
        self, code: str | None, message: str, param: str | None, client_event: Event | None, *, failure: bool = False
    ) -> None:
        """An `error` event; `failure`: it answers a client event (null_errors then nulls its code and id)."""
        ref = client_event.get("event_id") if client_event is not None else None
        if self.config.null_error_event_ids or self._null_ids or not isinstance(ref, str):
            ref = None
        if failure and "null_errors" in self.quirks:
            code, ref = None, None
            self.quirk_hits["null_errors"] += 1
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param, "event_id": ref}
        self._emit({"type": "error", "error": error})

    def _fail(self, code: str, message: str, event: Event, param: str | None = None) -> None:
        self._emit_error(code, message, param, event, failure=True)

    def _ev(self, kind: str) -> str:
        """Output event names: beta `response.text.delta`, GA `response.output_text.delta`, etc."""
        return f"response.{kind}" if self.generation == "beta" else f"response.output_{kind}"

    def session_created(self, cause: object = None) -> ServerEvent:
        """The first event of every connection."""
        self._cause = cause
        return self._emit({"type": "session.created", "session": copy.deepcopy(self.session)})

    def inject(self, event: Event, cause: object = None) -> ServerEvent:
        """Send `event` as is (its own event_id kept when it has one): a test's hand-made server event."""
        self._cause = cause
        return self._emit(dict(event))

    def shutdown(self) -> None:
        """The connection is gone: nothing runs any more."""
        self.responses.clear()
        self.pending_responses.clear()
        self._expires_at = None
        self._idle_fired = True

    # --- the session object ---------------------------------------------------------------------------

    def _call_id(self) -> str:
        return self.new_id("call_")

    def _modalities(self) -> list[str]:
        mods = self.session.get("modalities" if self.generation == "beta" else "output_modalities")
        return list(mods) if isinstance(mods, list) else ["text"]

    # --- the conversation -------------------------------------------------------------------------------

    def _insert(self, item: Item, index: int, *, done_now: bool) -> None:
        """Put `item` at `index` and announce it (beta: created; GA: added, and done when it is finished)."""
        self.conversation.insert(index, item)
        self.items[item.id] = item
        previous = self.conversation[index - 1].id if index > 0 else None
        item.previous_at_add = previous
        event_type = "conversation.item.created" if self.generation == "beta" else "conversation.item.added"
        item.announced = self._emit({"type": event_type, "previous_item_id": previous, "item": item.as_json()})
        if done_now and self.generation == "ga":
            self._emit({"type": "conversation.item.done", "previous_item_id": previous, "item": item.as_json()})

    def _commit(self, item_id: str, origin: object) -> ServerEvent:
        previous = self.conversation[-1].id if self.conversation else None
        committed = self._emit(
            {"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id}
        )
        self.audio = []
        data: Event = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._insert(Item(item_id, data, origin, True), len(self.conversation), done_now=True)
        self._idle_since = self.now
        return committed

    def add_item(
        self, item: Event, previous_item_id: str | None = None, *, announce: bool = True, cause: object = None
    ) -> Item:
        """Add an item as the server would on its own (appended unless `previous_item_id` is given)."""
        self._cause = cause
        new = Item("", {}, cause, True)
        new.data = normalize_item(item, item.get("id") or self.new_id("item_"), self._call_id)
        new.id = new.data["id"]
        index = len(self.conversation)
        if previous_item_id == "root":
            index = 0
        elif previous_item_id is not None:
            found = self._index(previous_item_id)
            if found is None:
                raise KeyError(previous_item_id)
            index = found + 1
        if announce:
            self._insert(new, index, done_now=True)
        else:
            self.conversation.insert(index, new)
            self.items[new.id] = new
        return new

    # --- client frames ------------------------------------------------------------------------------------

    def receive(
        self, data: bytes | str, cause: object = None, *, now: float | None = None, null_error_ids: bool = False
    ) -> None:
        """Handle one client text frame; `null_error_ids` leaves `error.event_id` null in the errors it causes."""
        if now is not None:
            self.now = max(self.now, now)
        self._cause = cause
        self._null_ids = null_error_ids
        self.processed.append(cause)
        try:
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                self.received.append({"type": "<unparsable>"})
                self._emit_error("invalid_json", f"Invalid JSON: {exc}", None, None)
                return
            if not isinstance(event, dict):
                self.received.append({"type": "<unparsable>"})
                self._emit_error("invalid_json", "Expected a JSON object as the event.", None, None)
                return
            self.received.append(event)
            self._dispatch(event)
        finally:
            self._null_ids = False

    def receive_binary(self, cause: object = None) -> None:
        """A binary frame: the server takes only JSON text frames."""
        self._cause = cause
        self.processed.append(cause)
        self.received.append({"type": "<unparsable>"})
        self._emit_error("invalid_json", "Binary frames are not supported; send JSON text frames.", None, None)

    def _dispatch(self, event: Event) -> None:
        etype = event.get("type")
        if not isinstance(etype, str):
            self._fail("missing_required_parameter", "Missing required parameter: 'type'.", event, "type")
            return
        handler = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.retrieve": self._on_item_retrieve,
            "conversation.item.truncate": self._on_item_truncate,
            "conversation.item.delete": self._on_item_delete,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
        }.get(etype)
        if handler is None:
            self.invalid_types.append(etype)
            supported = ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
            self._fail("invalid_value", f"Invalid value: '{etype}'. Supported values are: {supported}.", event, "type")
            return
        handler(event)

    def _require(self, event: Event, key: str) -> Any:
        value = event.get(key)
        if value is None:
            self._fail("missing_required_parameter", f"Missing required parameter: '{key}'.", event, key)
        return value

    def _on_session_update(self, event: Event) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            self._fail("missing_required_parameter", "Missing required parameter: 'session'.", event, "session")
            return
        update = copy.deepcopy(update)
        for fixed in ("id", "object", "expires_at"):
            update.pop(fixed, None)
        # Either generation's spelling is accepted and stored in this generation's place.
        has_td = False
        td: Any = None
        if "turn_detection" in update:
            has_td, td = True, update.pop("turn_detection")
        audio_in = update.get("audio", {}).get("input") if isinstance(update.get("audio"), dict) else None
        if isinstance(audio_in, dict) and "turn_detection" in audio_in:
            has_td, td = True, audio_in.pop("turn_detection")
        mods = update.pop("modalities", None) or update.pop("output_modalities", None)
        merge(self.session, update)
        if mods is not None:
            self.session["modalities" if self.generation == "beta" else "output_modalities"] = list(mods)
        if has_td:
            norm = normalize_turn_detection(td)
            if self.generation == "beta":
                self.session["turn_detection"] = norm
            else:
                self.session.setdefault("audio", {}).setdefault("input", {})["turn_detection"] = norm
            self._idle_since, self._idle_fired = self.now, False
        self._emit({"type": "session.updated", "session": copy.deepcopy(self.session)})

    def _on_append(self, event: Event) -> None:
        audio = self._require(event, "audio")
        if audio is None:
            return
        try:
            chunk = base64.b64decode(audio, validate=True)
        except (binascii.Error, TypeError, ValueError):
            self._fail("invalid_value", "Invalid 'audio': expected base64-encoded audio bytes.", event, "audio")
            return
        if chunk:
            self.audio.append((self._cause, len(chunk)))
            self.audio_total_bytes += len(chunk)
        self._idle_since, self._idle_fired = self.now, False
        limit = self.config.vad_commit_bytes
        if limit is not None and self.turn_detection is not None and self.audio_bytes >= limit:
            self.server_vad_turn(self._cause)

    def _on_commit(self, event: Event) -> None:
        if self.audio_bytes == 0:
            self._fail(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
                "but buffer only has 0.00ms of audio.",
                event,
            )
            return
        self._commit(self.new_id("item_"), self._cause)

    def _on_clear(self, event: Event) -> None:
        if self.config.stall_acks:
            return  # fault injection: swallowed, neither applied nor answered
        self.audio = []
        self._emit({"type": "input_audio_buffer.cleared"})

    def _on_item_create(self, event: Event) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            self._fail("missing_required_parameter", "Missing required parameter: 'item'.", event, "item")
            return
        itype = item.get("type", "message")
        if itype not in ("message", "function_call", "function_call_output"):
            self._fail(
                "invalid_value",
                f"Invalid value: '{itype}'. Supported values are: 'message', 'function_call', "
                "and 'function_call_output'.",
                event,
                "item.type",
            )
            return
        if itype == "message" and item.get("role", "user") not in ("user", "assistant", "system"):
            self._fail("invalid_value", f"Invalid value: '{item.get('role')}'.", event, "item.role")
            return
        item_id = item.get("id")
        if item_id is not None:
            limit = self.config.max_item_id_len
            if not isinstance(item_id, str) or len(item_id) > limit:
                n = len(item_id) if isinstance(item_id, str) else 0
                self._fail(
                    "string_above_max_length",
                    f"Invalid 'item.id': string too long. Expected a string with maximum length {limit}, "
                    f"but got a string with length {n} instead.",
                    event,
                    "item.id",
                )
                return
            if self._index(item_id) is not None:
                self._fail(
                    "item_create_duplicate_item_id",
                    f"Error adding item: the item with id '{item_id}' already exists.",
                    event,
                    "item.id",
                )
                return
        previous = event.get("previous_item_id")
        if previous is None:
            index = len(self.conversation)
        elif previous == "root":
            index = 0
        else:
            found = self._index(previous)
            if found is None:
                self._fail(
                    "item_create_invalid_previous_item_id",
                    f"Error adding item: the previous item with id '{previous}' does not exist.",
                    event,
                    "previous_item_id",
                )
                return
            index = found + 1
        data = normalize_item(item, item_id or self.new_id("item_"), self._call_id)
        self._insert(Item(data["id"], data, self._cause, True), index, done_now=True)

    def _item_or_error(self, event: Event, action: str, verb: str) -> Item | None:
        """The item `event` names, or None after the server's error (`item_<action>_invalid_item_id`)."""
        item_id = self._require(event, "item_id")
        if item_id is None:
            return None
        index = self._index(item_id)
        if index is None:
            self._fail(
                f"item_{action}_invalid_item_id",
                f"Error {verb} item: the item with id '{item_id}' does not exist.",
                event,
                "item_id",
            )
            return None
        return self.conversation[index]

    def _on_item_retrieve(self, event: Event) -> None:
        item = self._item_or_error(event, "retrieve", "retrieving")
        if item is not None:
            self._emit({"type": "conversation.item.retrieved", "item": item.as_json()})

    def _on_item_truncate(self, event: Event) -> None:
        item = self._item_or_error(event, "truncate", "truncating")
        if item is None:
            return
        content_index = event.get("content_index", 0)
        content = item.data.get("content") or []
        if item.role != "assistant" or not (isinstance(content_index, int) and 0 <= content_index < len(content)):
            self._fail(
                "invalid_value",
                "Only assistant message items with audio content can be truncated.",
                event,
                "content_index",
            )
            return
        self._emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item.id,
                "content_index": content_index,
                "audio_end_ms": event.get("audio_end_ms", 0),
            }
        )

    def _on_item_delete(self, event: Event) -> None:
        if self.config.stall_acks and event.get("item_id") is not None:
            return  # fault injection: swallowed, neither applied nor answered
        item = self._item_or_error(event, "delete", "deleting")
        if item is None:
            return
        self.conversation.remove(item)
        item.deleted_by = self._cause
        self.deletions.append(item)
        item.deleted_ack = self._emit({"type": "conversation.item.deleted", "item_id": item.id})

    def _on_response_create(self, event: Event) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            self._fail("invalid_type", "Invalid type for 'response': expected an object.", event, "response")
            return
        conversation = params.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            self._fail(
                "invalid_value",
                f"Invalid value: '{conversation}'. Supported values are: 'auto' and 'none'.",
                event,
                "response.conversation",
            )
            return
        if conversation == "none":
            if "ignore_out_of_band" not in self.quirks:
                self._start_response(params, out_of_band=True)
                return
            self.quirk_hits["ignore_out_of_band"] += 1
        running = self.conversation_response
        if running is not None and "replace_response" not in self.quirks:
            self._fail(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {running.id}. "
                "Wait until the response is finished before creating a new one.",
                event,
            )
            return
        self._start_in_conversation(params, self._cause)

    def _on_response_cancel(self, event: Event) -> None:
        if "no_cancel" in self.quirks:
            self.quirk_hits["no_cancel"] += 1
            self._fail("not_implemented", "response.cancel is not implemented by this server.", event)
            return
        response_id = event.get("response_id")
        target = self.responses.get(response_id) if isinstance(response_id, str) else None
        if response_id is None:
            target = self.conversation_response
        if target is None:
            self._fail(
                "response_cancel_not_active",
                "Cancellation failed: no active response found"
                + (f" with id '{response_id}'." if response_id is not None else "."),
                event,
            )
            return
        self._end_response(target, "cancelled", "client_cancelled")

    # --- responses --------------------------------------------------------------------------------------

    def _start_in_conversation(self, params: Event, origin: object, *, late: bool = False) -> Response:
        """Start a conversation response; with replace_response a running one is dropped without a done."""
        running = self.conversation_response
        if running is not None:
            self.quirk_hits["replace_response"] += 1
            del self.responses[running.id]
            running.next_due = None
            self.abandoned.append(running)
        return self._start_response(params, out_of_band=False, origin=origin, late=late)

    def _last_user_text(self, items: list[Event]) -> str:
        for item in reversed(items):
            if item.get("type") == "message" and item.get("role") == "user":
                for part in item.get("content") or []:
                    text = part.get("text") or part.get("transcript") if isinstance(part, dict) else None
                    if isinstance(text, str) and text:
                        return text
                return "audio"
        return ""

    def _start_response(
        self, params: Event, *, out_of_band: bool, origin: object = None, late: bool = False
    ) -> Response:
        """response.created; when streaming, the first output item starts at once (so a cancel always finds one)."""
        mods = params.get("output_modalities") or params.get("modalities") or self._modalities()
        mods = [m for m in mods if m in ("text", "audio")] or ["text"]
        input_items = params.get("input")
        context = input_items if isinstance(input_items, list) else [item.data for item in self.conversation]
        self._response_count += 1
        last = self._last_user_text([i for i in context if isinstance(i, dict)])
        text = f"Reply {self._response_count} to {last}" if last else f"Reply {self._response_count}"
        n = max(1, self.config.delta_count)
        text = text.ljust(n, ".")
        size, extra = divmod(len(text), n)
        chunks: deque[str] = deque()
        pos = 0
        for i in range(n):
            chunks.append(text[pos : pos + size + (1 if i < extra else 0)])
            pos += len(chunks[-1])
        beta = self.generation == "beta"
        response_id = self.new_id("resp_")
        body: Event = {
            "id": response_id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
        }
        if "response_without_conversation_id" not in self.quirks:
            body["conversation_id"] = None if out_of_band else self.conversation_id
        else:
            self.quirk_hits["response_without_conversation_id"] += 1
        body.update(
            {
                ("modalities" if beta else "output_modalities"): mods,
                "max_output_tokens": params.get("max_output_tokens", "inf"),
                "metadata": params.get("metadata"),
                "usage": None,
            }
        )
        if beta:
            body.update(voice="alloy", output_audio_format="pcm16", temperature=0.8)
        response = Response(
            response_id,
            out_of_band,
            self._cause if origin is None else origin,
            body,
            mods,
            chunks,
            10 * max(1, len(context)),
            late=late,
        )
        self.responses[response_id] = response
        self._emit({"type": "response.created", "response": copy.deepcopy(body)})
        if self.config.stream_responses:
            self._start_item(response)
            response.next_due = self.now + self.config.delta_interval_s if self.config.delta_count > 0 else self.now
        return response

    def _ids(self, response: Response, item: Item) -> Event:
        return {
            "response_id": response.id,
            "item_id": item.id,
            "output_index": response.output.index(item),
            "content_index": 0,
        }

    def _start_item(self, response: Response) -> None:
        data: Event = {
            "id": self.new_id("item_"),
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        item = Item(data["id"], data, response.origin, not response.out_of_band, response=response)
        response.output.append(item)
        response.current = item
        self._emit(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": len(response.output) - 1,
                "item": item.as_json(),
            }
        )
        if response.out_of_band:
            self.items[item.id] = item
        else:
            self._insert(item, len(self.conversation), done_now=False)
        beta = self.generation == "beta"
        if "audio" in response.modalities:
            part: Event = {"type": "audio" if beta else "output_audio", "transcript": ""}
        else:
            part = {"type": "text" if beta else "output_text", "text": ""}
        data["content"].append(part)
        self._emit({"type": "response.content_part.added", **self._ids(response, item), "part": event_part(part)})

    def _delta(self, response: Response) -> None:
        item = response.current
        if item is None:
            self._start_item(response)
            item = response.current
            assert item is not None
        chunk = response.chunks.popleft() if response.chunks else "."
        part = item.data["content"][0]
        ids = self._ids(response, item)
        if "audio" in response.modalities:
            self._emit({"type": self._ev("audio.delta"), **ids, "delta": _AUDIO_CHUNK_B64})
            self._emit({"type": self._ev("audio_transcript.delta"), **ids, "delta": chunk})
            part["transcript"] += chunk
        else:
            self._emit({"type": self._ev("text.delta"), **ids, "delta": chunk})
            part["text"] += chunk
        response.deltas_sent += 1

    def _stream_step(self, response: Response) -> None:
        """The timer's step of a streaming response: its next delta, or its end once all were sent."""
        if response.deltas_sent >= self.config.delta_count:
            self._end_response(response, "completed")
            return
        self._delta(response)
        if response.deltas_sent >= self.config.delta_count:
            self._end_response(response, "completed")
        else:
            response.next_due = (response.next_due or self.now) + self.config.delta_interval_s

    def _finish_item(self, response: Response, status: str) -> None:
        item = response.current
        if item is None:
            return
        response.current = None
        ids = self._ids(response, item)
        part = item.data["content"][0]
        if "audio" in response.modalities:
            self._emit({"type": self._ev("audio.done"), **ids})
            self._emit({"type": self._ev("audio_transcript.done"), **ids, "transcript": part["transcript"]})
        else:
            self._emit({"type": self._ev("text.done"), **ids, "text": part["text"]})
        self._emit({"type": "response.content_part.done", **ids, "part": event_part(part)})
        item.data["status"] = status
        self._emit(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": ids["output_index"],
                "item": item.as_json(),
            }
        )
        if response.out_of_band or self.generation != "ga":
            return
        position = self._index(item.id)
        if position is None and "no_item_done_after_delete" in self.quirks:
            self.quirk_hits["no_item_done_after_delete"] += 1
            return
        if position is None:
            previous = item.previous_at_add
        else:
            previous = self.conversation[position - 1].id if position > 0 else None
        self._emit({"type": "conversation.item.done", "previous_item_id": previous, "item": item.as_json()})

    def _end_response(self, response: Response, status: str, reason: str | None = None) -> None:
        self._finish_item(response, "incomplete" if status == "cancelled" else "completed")
        del self.responses[response.id]
        response.next_due = None
        out_text = response.deltas_sent
        out_audio = response.deltas_sent if "audio" in response.modalities else 0
        response.body.update(
            status=status,
            status_details={"type": status, "reason": reason} if status != "completed" else None,
            output=[item.as_json() for item in response.output],
            usage=usage(response.input_tokens, out_text, out_audio),
        )
        self._emit({"type": "response.done", "response": copy.deepcopy(response.body)})
        if not response.out_of_band:
            self._idle_since, self._idle_fired = self.now, False

    def server_response_step(self, response_id: str, cause: object = None, *, add_item: bool) -> None:
        """The response produces its next output item (`add_item`: added, item event, a delta), or finishes."""
        self._cause = cause
        response = self.responses[response_id]
        if not add_item:
            self._end_response(response, "completed")
            return
        self._finish_item(response, "completed")
        self._start_item(response)
        self._delta(response)

    # --- what the server does on its own ------------------------------------------------------------------

    def _auto_response(self, origin: object, create_response: bool | None) -> None:
        """The response turn detection starts for a commit (create_response), now or after transcription."""
        if create_response is None:
            create_response = bool((self.turn_detection or {}).get("create_response", True))
        if not create_response:
            return
        if "late_auto_response" in self.quirks:
            self.quirk_hits["late_auto_response"] += 1
            self.pending_responses.append(PendingResponse(self.now + self.config.transcription_delay_s, origin))
            return
        if self.conversation_response is None or "replace_response" in self.quirks:
            self._start_in_conversation({}, origin)

    def server_vad_turn(self, cause: object = None, *, create_response: bool | None = None) -> ServerEvent:
        """Server VAD hears a turn in the buffered audio: it commits it, and may start a response.

        Returns the `input_audio_buffer.committed` event. `create_response` None: as the session's turn detection
        says. No second response starts while one runs in the conversation (unless `replace_response`); with
        `vad_interrupt` the running one is cancelled (`turn_detected`) as speech starts.
        """
        self._cause = cause
        item_id = self.new_id("item_")
        end_ms = self.audio_total_bytes // _BYTES_PER_MS
        start_ms = max(0, end_ms - self.audio_bytes // _BYTES_PER_MS)
        self._emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": start_ms, "item_id": item_id})
        running = self.conversation_response
        interrupts = bool((self.turn_detection or {}).get("interrupt_response", True))
        if running is not None and "vad_interrupt" in self.quirks and interrupts:
            self.quirk_hits["vad_interrupt"] += 1
            self._end_response(running, "cancelled", "turn_detected")
        self._emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id})
        committed = self._commit(item_id, cause)
        self._auto_response(cause, create_response)
        return committed

    def server_idle_timeout(self, cause: object = None, *, create_response: bool | None = None) -> ServerEvent:
        """Turn detection times out on silence (GA `timeout_triggered`): it commits an (empty) audio item with its
        own id, like any commit, and may start a response. Returns the `input_audio_buffer.committed` event."""
        self._cause = cause
        self._idle_fired = True
        self.quirk_hits["idle_timeout"] += 1
        item_id = self.new_id("item_")
        end_ms = self.audio_total_bytes // _BYTES_PER_MS
        self._emit(
            {
                "type": "input_audio_buffer.timeout_triggered",
                "audio_start_ms": end_ms,
                "audio_end_ms": end_ms,
                "item_id": item_id,
            }
        )
        committed = self._commit(item_id, cause)
        self._idle_fired = True
        self._auto_response(cause, create_response)
        return committed

    def server_start_late_response(self, cause: object = None) -> Response | None:
        """Transcription finished: the oldest late auto-response starts now (None: skipped, one already runs)."""
        self._cause = cause
        return self._start_late()

    def _start_late(self) -> Response | None:
        pending = self.pending_responses.pop(0)
        if self.conversation_response is not None and "replace_response" not in self.quirks:
            return None
        return self._start_in_conversation({}, pending.origin, late=True)
