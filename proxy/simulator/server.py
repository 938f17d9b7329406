"""An offline fake of the OpenAI Realtime WebSocket server (beta and GA protocol generations).

Deliberately shares no code with ``proxy.core``: it is an independent model of the upstream, so testing
the proxy against it means something. Protocol facts follow /work/shared/realtime-protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

Generation = Literal["beta", "ga"]

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_ALNUM = string.ascii_letters + string.digits
# 10 ms of silence at 24 kHz pcm16: the payload of every simulated audio delta.
_AUDIO_CHUNK_B64 = base64.b64encode(b"\x00" * 480).decode()
_BYTES_PER_MS = 48  # pcm16 mono 24 kHz

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


def _rand_id(prefix: str, n: int = 21) -> str:
    return prefix + "".join(random.choices(_ALNUM, k=n))


@dataclass
class SimulatorConfig:
    delta_count: int = 5
    delta_interval_s: float = 0.005
    one_way_delay_s: float = 0.0
    server_vad: bool = False
    vad_commit_bytes: int = 9600
    api_key: str | None = None
    refuse_status: int | None = None
    null_error_event_ids: bool = False
    stall_acks: bool = False
    session_id_prefix: str = "sess_"
    # Extras beyond the agreed interface (all default to the documented behaviour):
    require_model: bool = True  # reject a handshake whose query has no model/call_id/deployment with 400
    max_item_id_len: int = 32  # client item ids longer than this are refused (unconfirmed limit)
    session_max_s: float | None = None  # when set: error `session_expired`, then close 1001, like the cap
    model: str = "gpt-realtime"  # reported when the query names no model


@dataclass
class _Response:
    id: str
    in_conversation: bool
    modalities: list[str]
    text: str
    item: dict[str, Any]
    obj: dict[str, Any]
    input_tokens: int
    previous_item_id: str | None = None
    deltas_sent: int = 0
    finished: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def _event_part(part: dict[str, Any]) -> dict[str, Any]:
    """A content part as `response.content_part.*` events carry it: GA items say `output_text`/`output_audio`,
    but the events' part is typed `text`/`audio` in both generations (the SDKs' schemas)."""
    kind = {"output_text": "text", "output_audio": "audio"}.get(part["type"], part["type"])
    return {**part, "type": kind}


def _json_error(status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Recursive dict merge: session.update sends partial objects (e.g. only audio.input.turn_detection)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _normalize_turn_detection(td: Any) -> dict[str, Any] | None:
    if not isinstance(td, dict):
        return None
    out: dict[str, Any] = {
        "type": td.get("type", "server_vad"),
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "create_response": True,
        "interrupt_response": True,
    }
    out.update(td)
    return out


class SimSession:
    """One accepted WebSocket connection and the conversation state the fake server holds for it."""

    def __init__(
        self,
        sim: Simulator,
        ws: web.WebSocketResponse,
        request: web.Request,
        generation: Generation,
    ) -> None:
        self._sim = sim
        self._cfg = sim.config
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self.id: str = _rand_id(self._cfg.session_id_prefix)
        self.generation: Generation = generation
        self.path: str = request.path
        self.query: dict[str, str] = {k: request.query[k] for k in request.query}
        self.headers: CIMultiDict[str] = CIMultiDict(request.headers)
        self.subprotocol: str | None = ws.ws_protocol
        self.items: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.closed: bool = False
        self.close_code: int | None = None
        self.conversation_id: str = _rand_id("conv_")
        self.session: dict[str, Any] = self._initial_session()
        self.audio_buffer = bytearray()
        self._audio_total_bytes = 0  # all audio ever appended: gives audio_start_ms/audio_end_ms
        self._responses: dict[str, _Response] = {}
        self._conv_response: _Response | None = None
        self._response_count = 0
        # (due time, kind, payload, close code, close reason); kind: event | text | binary | close
        self._queue: asyncio.Queue[tuple[float, str, bytes, int, str]] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._close_requested = False
        self._server_closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- public helpers
    @property
    def item_ids(self) -> list[str]:
        return [i["id"] for i in self.items]

    @property
    def active_response_id(self) -> str | None:
        return self._conv_response.id if self._conv_response else None

    @property
    def active_response_ids(self) -> list[str]:
        """Every response still streaming, out-of-band ones included."""
        return list(self._responses)

    @property
    def server_vad(self) -> bool:
        return self._turn_detection() is not None

    async def wait_until(self, predicate: Callable[[SimSession], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109 (agreed API)
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Server-initiated close; queued behind already-sent events so order is kept."""
        self._request_close(code, reason)
        await self._done.wait()

    async def send_event(self, event: dict[str, Any]) -> None:
        self._emit(dict(event), keep_event_id=True)

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self._enqueue("text", data.encode())
        else:
            self._enqueue("binary", data)

    def add_item(
        self, item: dict[str, Any], previous_item_id: str | None = None, *, announce: bool = True
    ) -> dict[str, Any]:
        """Add an item as the upstream would on its own (appended unless previous_item_id is given)."""
        stored = self._normalize_item(item, item.get("id") or _rand_id("item_"))
        index = len(self.items)
        if previous_item_id == "root":
            index = 0
        elif previous_item_id is not None:
            index = self.item_ids.index(previous_item_id) + 1
        self.items.insert(index, stored)
        if announce:
            self._announce_item(stored, self.items[index - 1]["id"] if index > 0 else None, done=True)
        self._notify()
        return stored

    async def vad_commit(self, create_response: bool | None = None) -> str:
        """Force a server-VAD turn now (speech_started ... committed, item, maybe a response)."""
        return self._vad_commit(create_response)

    # ---------------------------------------------------------------- session object
    def _initial_session(self) -> dict[str, Any]:
        td = _normalize_turn_detection({"type": "server_vad"}) if self._cfg.server_vad else None
        model = self.query.get("model") or self.query.get("deployment") or self._cfg.model
        expires = int(time.time()) + (1800 if self.generation == "beta" else 3600)
        if self.generation == "beta":
            return {
                "id": self.id,
                "object": "realtime.session",
                "model": model,
                "expires_at": expires,
                "modalities": ["text"],
                "instructions": "",
                "voice": "alloy",
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": None,
                "turn_detection": td,
                "tools": [],
                "tool_choice": "auto",
                "temperature": 0.8,
                "max_response_output_tokens": "inf",
            }
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": model,
            "output_modalities": ["text"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "prompt": None,
            "expires_at": expires,
            "include": None,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": td,
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
            },
        }

    def _turn_detection(self) -> dict[str, Any] | None:
        if self.generation == "beta":
            td = self.session.get("turn_detection")
        else:
            td = self.session.get("audio", {}).get("input", {}).get("turn_detection")
        return td if isinstance(td, dict) else None

    def _modalities(self) -> list[str]:
        key = "modalities" if self.generation == "beta" else "output_modalities"
        mods = self.session.get(key)
        return list(mods) if isinstance(mods, list) else ["text"]

    # ---------------------------------------------------------------- outgoing path
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _enqueue(self, kind: str, payload: bytes = b"", code: int = 1000, reason: str = "") -> None:
        # One fixed delay per frame, stamped at enqueue time: FIFO + monotonic due times keep the order.
        self._queue.put_nowait((self._loop.time() + self._cfg.one_way_delay_s, kind, payload, code, reason))

    def _emit(self, event: dict[str, Any], *, keep_event_id: bool = False) -> None:
        if not keep_event_id or "event_id" not in event:
            event = {"event_id": _rand_id("event_"), **event}
        # Serialize now: the conversation dicts referenced here keep changing while the frame waits.
        self._enqueue("event", orjson.dumps(event))

    def _request_close(self, code: int, reason: str) -> None:
        if self._close_requested or self.closed:
            return
        self._close_requested = True
        self._enqueue("close", b"", code, reason)

    async def _write_loop(self) -> None:
        while True:
            due, kind, payload, code, reason = await self._queue.get()
            delay = due - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._ws.closed:
                continue  # peer gone: drop, but keep draining
            if kind == "close":
                self.close_code = code
                self._server_closed = True
                await self._ws.close(code=code, message=reason.encode())
                return
            try:
                if kind == "binary":
                    await self._ws.send_bytes(payload)
                else:
                    await self._ws.send_str(payload.decode())
            except (ConnectionError, RuntimeError):
                continue
            if kind == "event":
                self.sent.append(orjson.loads(payload))
                self._notify()

    def _error(
        self,
        code: str | None,
        message: str,
        client_event: dict[str, Any] | None = None,
        param: str | None = None,
        err_type: str = "invalid_request_error",
    ) -> None:
        client_event_id = None if client_event is None else client_event.get("event_id")
        if self._cfg.null_error_event_ids:
            client_event_id = None
        self._emit(
            {
                "type": "error",
                "error": {
                    "type": err_type,
                    "code": code,
                    "message": message,
                    "param": param,
                    "event_id": client_event_id,
                },
            }
        )

    def _announce_item(self, item: dict[str, Any], previous_item_id: str | None, *, done: bool) -> None:
        """Beta: conversation.item.created. GA: conversation.item.added (+ .done once the item is final)."""
        if self.generation == "beta":
            self._emit({"type": "conversation.item.created", "previous_item_id": previous_item_id, "item": item})
            return
        self._emit({"type": "conversation.item.added", "previous_item_id": previous_item_id, "item": item})
        if done:
            self._emit({"type": "conversation.item.done", "previous_item_id": previous_item_id, "item": item})

    # ---------------------------------------------------------------- connection lifecycle
    async def _run(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())
        if self._cfg.session_max_s is not None:
            self._spawn(self._expire(self._cfg.session_max_s))
        self._emit({"type": "session.created", "session": self.session})
        try:
            async for msg in self._ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._record({"type": "<unparsable>"})
                    self._error("invalid_json", "Binary frames are not supported; send JSON text frames.")
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.closed = True
        if not self._server_closed:
            self.close_code = self._ws.close_code
        for task in list(self._tasks):
            task.cancel()
        writer = self._writer
        if writer is not None and not writer.done():
            if self._close_requested:
                # The writer is completing our own close handshake; let it finish rather than abort it.
                await asyncio.wait({writer}, timeout=2.0)
            writer.cancel()
        pending = [t for t in [*self._tasks, writer] if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        self._responses.clear()
        self._conv_response = None
        self._done.set()
        self._notify()
        self._sim._notify()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _expire(self, after: float) -> None:
        await asyncio.sleep(after)
        minutes = 30 if self.generation == "beta" else 60
        self._error("session_expired", f"Your session hit the maximum duration of {minutes} minutes.")
        self._request_close(1001, "session expired")

    def _record(self, event: dict[str, Any]) -> None:
        self.received.append(event)
        self._notify()

    # ---------------------------------------------------------------- client events
    def _on_text(self, data: str) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._record({"type": "<unparsable>"})
            self._error("invalid_json", f"Invalid JSON: {exc}")
            return
        if not isinstance(event, dict):
            self._record({"type": "<unparsable>"})
            self._error("invalid_json", "Expected a JSON object as the event.")
            return
        self._record(event)
        etype = event.get("type")
        if not isinstance(etype, str):
            self._error("missing_required_parameter", "Missing required parameter: 'type'.", event, "type")
            return
        handler = self._handlers().get(etype)
        if handler is None:
            supported = ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
            self._error(
                "invalid_value",
                f"Invalid value: '{etype}'. Supported values are: {supported}.",
                event,
                "type",
            )
            return
        handler(event)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        return {
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
        }

    def _require(self, event: dict[str, Any], key: str) -> Any:
        value = event.get(key)
        if value is None:
            self._error("missing_required_parameter", f"Missing required parameter: '{key}'.", event, key)
        return value

    def _on_session_update(self, event: dict[str, Any]) -> None:
        upd = event.get("session")
        if not isinstance(upd, dict):
            self._error("missing_required_parameter", "Missing required parameter: 'session'.", event, "session")
            return
        upd = copy.deepcopy(upd)
        for fixed in ("id", "object", "expires_at"):
            upd.pop(fixed, None)
        # Accept either generation's spelling; store in this generation's canonical place.
        has_td = False
        td: Any = None
        if "turn_detection" in upd:
            has_td, td = True, upd.pop("turn_detection")
        audio_in = upd.get("audio", {}).get("input") if isinstance(upd.get("audio"), dict) else None
        if isinstance(audio_in, dict) and "turn_detection" in audio_in:
            has_td, td = True, audio_in.pop("turn_detection")
        mods = upd.pop("modalities", None) or upd.pop("output_modalities", None)
        _merge(self.session, upd)
        if mods is not None:
            self.session["modalities" if self.generation == "beta" else "output_modalities"] = list(mods)
        if has_td:
            norm = _normalize_turn_detection(td)
            if self.generation == "beta":
                self.session["turn_detection"] = norm
            else:
                self.session.setdefault("audio", {}).setdefault("input", {})["turn_detection"] = norm
        self._emit({"type": "session.updated", "session": self.session})

    def _on_append(self, event: dict[str, Any]) -> None:
        audio = self._require(event, "audio")
        if audio is None:
            return
        try:
            chunk = base64.b64decode(audio, validate=True)
        except (binascii.Error, TypeError, ValueError):
            self._error("invalid_value", "Invalid 'audio': expected base64-encoded audio bytes.", event, "audio")
            return
        self.audio_buffer += chunk
        self._audio_total_bytes += len(chunk)
        if self.server_vad and len(self.audio_buffer) >= self._cfg.vad_commit_bytes:
            self._vad_commit(None)

    def _commit_buffer(self, item_id: str) -> dict[str, Any]:
        previous = self.items[-1]["id"] if self.items else None
        self.audio_buffer.clear()
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._emit({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id})
        self.items.append(item)
        self._announce_item(item, previous, done=True)
        self._notify()
        return item

    def _on_commit(self, event: dict[str, Any]) -> None:
        if not self.audio_buffer:
            self._error(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
                "but buffer only has 0.00ms of audio.",
                event,
            )
            return
        self._commit_buffer(_rand_id("item_"))

    def _vad_commit(self, create_response: bool | None) -> str:
        item_id = _rand_id("item_")
        end_ms = self._audio_total_bytes // _BYTES_PER_MS
        start_ms = max(0, end_ms - len(self.audio_buffer) // _BYTES_PER_MS)
        self._emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": start_ms, "item_id": item_id})
        self._emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id})
        self._commit_buffer(item_id)
        if create_response is None:
            td = self._turn_detection() or {}
            create_response = bool(td.get("create_response", True))
        if create_response and self._conv_response is None:
            self._start_response({}, None)
        return item_id

    def _on_clear(self, event: dict[str, Any]) -> None:
        if self._cfg.stall_acks:
            return  # fault injection: swallowed, neither applied nor answered
        self.audio_buffer.clear()
        self._emit({"type": "input_audio_buffer.cleared"})

    def _normalize_item(self, item: dict[str, Any], item_id: str) -> dict[str, Any]:
        itype = item.get("type", "message")
        out: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": itype}
        if itype == "message":
            out["status"] = "completed"
            out["role"] = item.get("role", "user")
            content = []
            for part in item.get("content") or []:
                part = dict(part)
                if part.get("type") == "input_audio":
                    # The server keeps no audio in the item, only a (not yet known) transcript.
                    part = {"type": "input_audio", "transcript": part.get("transcript")}
                content.append(part)
            out["content"] = content
        elif itype == "function_call":
            out.update(
                status="completed",
                name=item.get("name"),
                call_id=item.get("call_id") or _rand_id("call_", 16),
                arguments=item.get("arguments", ""),
            )
        else:
            out.update(call_id=item.get("call_id"), output=item.get("output", ""))
        return out

    def _on_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            self._error("missing_required_parameter", "Missing required parameter: 'item'.", event, "item")
            return
        itype = item.get("type", "message")
        if itype not in ("message", "function_call", "function_call_output"):
            self._error(
                "invalid_value",
                f"Invalid value: '{itype}'. Supported values are: 'message', 'function_call', "
                "and 'function_call_output'.",
                event,
                "item.type",
            )
            return
        if itype == "message" and item.get("role", "user") not in ("user", "assistant", "system"):
            self._error("invalid_value", f"Invalid value: '{item.get('role')}'.", event, "item.role")
            return
        item_id = item.get("id")
        if item_id is not None:
            if not isinstance(item_id, str) or len(item_id) > self._cfg.max_item_id_len:
                n = len(item_id) if isinstance(item_id, str) else 0
                self._error(
                    "string_above_max_length",
                    f"Invalid 'item.id': string too long. Expected a string with maximum length "
                    f"{self._cfg.max_item_id_len}, but got a string with length {n} instead.",
                    event,
                    "item.id",
                )
                return
            if item_id in self.item_ids:
                self._error(
                    "item_create_duplicate_item_id",
                    f"Error adding item: the item with id '{item_id}' already exists.",
                    event,
                    "item.id",
                )
                return
        prev = event.get("previous_item_id")
        if prev is None:
            index = len(self.items)
        elif prev == "root":
            index = 0
        elif prev in self.item_ids:
            index = self.item_ids.index(prev) + 1
        else:
            self._error(
                "item_create_invalid_previous_item_id",
                f"Error adding item: the previous item with id '{prev}' does not exist.",
                event,
                "previous_item_id",
            )
            return
        stored = self._normalize_item(item, item_id or _rand_id("item_"))
        self.items.insert(index, stored)
        self._announce_item(stored, self.items[index - 1]["id"] if index > 0 else None, done=True)
        self._notify()

    def _find_item(self, item_id: Any) -> dict[str, Any] | None:
        return next((i for i in self.items if i["id"] == item_id), None)

    def _item_or_error(self, event: dict[str, Any], item_id: Any, action: str, verb: str) -> dict[str, Any] | None:
        """The item, or None after the server's error for an unknown id (code `item_<action>_invalid_item_id`)."""
        item = self._find_item(item_id)
        if item is None:
            self._error(
                f"item_{action}_invalid_item_id",
                f"Error {verb} item: the item with id '{item_id}' does not exist.",
                event,
                "item_id",
            )
        return item

    def _on_item_retrieve(self, event: dict[str, Any]) -> None:
        item_id = self._require(event, "item_id")
        if item_id is None:
            return
        item = self._item_or_error(event, item_id, "retrieve", "retrieving")
        if item is None:
            return
        self._emit({"type": "conversation.item.retrieved", "item": item})

    def _on_item_truncate(self, event: dict[str, Any]) -> None:
        item_id = self._require(event, "item_id")
        if item_id is None:
            return
        item = self._item_or_error(event, item_id, "truncate", "truncating")
        if item is None:
            return
        content_index = event.get("content_index", 0)
        audio_end_ms = event.get("audio_end_ms", 0)
        content = item.get("content") or []
        if item.get("role") != "assistant" or not (
            isinstance(content_index, int) and 0 <= content_index < len(content)
        ):
            self._error(
                "invalid_value",
                "Only assistant message items with audio content can be truncated.",
                event,
                "content_index",
            )
            return
        self._emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": content_index,
                "audio_end_ms": audio_end_ms,
            }
        )

    def _on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = self._require(event, "item_id")
        if item_id is None:
            return
        if self._cfg.stall_acks:
            return  # fault injection: swallowed, neither applied nor answered
        item = self._item_or_error(event, item_id, "delete", "deleting")
        if item is None:
            return
        self.items.remove(item)
        self._emit({"type": "conversation.item.deleted", "item_id": item_id})
        self._notify()

    # ---------------------------------------------------------------- responses
    def _on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            self._error("invalid_type", "Invalid type for 'response': expected an object.", event, "response")
            return
        conv = params.get("conversation", "auto")
        if conv not in ("auto", "none"):
            self._error(
                "invalid_value",
                f"Invalid value: '{conv}'. Supported values are: 'auto' and 'none'.",
                event,
                "response.conversation",
            )
            return
        if conv == "auto" and self._conv_response is not None:
            self._error(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self._conv_response.id}. "
                "Wait until the response is finished before creating a new one.",
                event,
            )
            return
        self._start_response(params, event)

    def _last_user_text(self, items: list[dict[str, Any]]) -> str:
        for item in reversed(items):
            if item.get("type") == "message" and item.get("role") == "user":
                for part in item.get("content") or []:
                    text = part.get("text") or part.get("transcript")
                    if isinstance(text, str) and text:
                        return text
                return "audio"
        return ""

    def _start_response(self, params: dict[str, Any], event: dict[str, Any] | None) -> _Response:
        """Emits everything up to content_part.added synchronously, so a cancel always finds a started
        response; the deltas and the .done events run in a task."""
        in_conv = params.get("conversation", "auto") != "none"
        mods = params.get("output_modalities") or params.get("modalities") or self._modalities()
        mods = [m for m in mods if m in ("text", "audio")] or ["text"]
        input_items = params.get("input")
        context = input_items if isinstance(input_items, list) else self.items
        self._response_count += 1
        last = self._last_user_text([i for i in context if isinstance(i, dict)])
        text = f"Reply {self._response_count} to {last}" if last else f"Reply {self._response_count}"
        resp_id = _rand_id("resp_")
        beta = self.generation == "beta"
        obj: dict[str, Any] = {
            "id": resp_id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": self.conversation_id if in_conv else None,
            ("modalities" if beta else "output_modalities"): mods,
            "max_output_tokens": params.get("max_output_tokens", "inf"),
            "metadata": params.get("metadata"),
            "usage": None,
        }
        if beta:
            obj.update(voice="alloy", output_audio_format="pcm16", temperature=0.8)
        item: dict[str, Any] = {
            "id": _rand_id("item_"),
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        resp = _Response(
            id=resp_id,
            in_conversation=in_conv,
            modalities=mods,
            text=text,
            item=item,
            obj=obj,
            input_tokens=10 * max(1, len(context)),
        )
        self._responses[resp_id] = resp
        if in_conv:
            self._conv_response = resp
        self._emit({"type": "response.created", "response": obj})
        self._emit({"type": "response.output_item.added", "response_id": resp_id, "output_index": 0, "item": item})
        if in_conv:
            resp.previous_item_id = self.items[-1]["id"] if self.items else None
            self.items.append(item)
            self._announce_item(item, resp.previous_item_id, done=False)
        audio = "audio" in mods
        if audio:
            part: dict[str, Any] = {"type": "audio" if beta else "output_audio", "transcript": ""}
        else:
            part = {"type": "text" if beta else "output_text", "text": ""}
        item["content"].append(part)
        self._emit(
            {
                "type": "response.content_part.added",
                "response_id": resp_id,
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "part": _event_part(part),
            }
        )
        self._notify()
        resp.task = self._spawn(self._stream(resp))
        return resp

    def _ev(self, kind: str) -> str:
        """Output event names: beta `response.text.delta`, GA `response.output_text.delta`, etc."""
        return f"response.{kind}" if self.generation == "beta" else f"response.output_{kind}"

    async def _stream(self, resp: _Response) -> None:
        n = max(1, self._cfg.delta_count)
        text = resp.text.ljust(n, ".")
        size, extra = divmod(len(text), n)
        pos = 0
        part = resp.item["content"][0]
        audio = "audio" in resp.modalities
        ids = {"response_id": resp.id, "item_id": resp.item["id"], "output_index": 0, "content_index": 0}
        for i in range(self._cfg.delta_count):
            await asyncio.sleep(self._cfg.delta_interval_s)
            chunk = text[pos : pos + size + (1 if i < extra else 0)]
            pos += len(chunk)
            if audio:
                self._emit({"type": self._ev("audio.delta"), **ids, "delta": _AUDIO_CHUNK_B64})
                self._emit({"type": self._ev("audio_transcript.delta"), **ids, "delta": chunk})
                part["transcript"] += chunk
            else:
                self._emit({"type": self._ev("text.delta"), **ids, "delta": chunk})
                part["text"] += chunk
            resp.deltas_sent += 1
            self._notify()
        self._finish(resp, "completed")

    def _finish(self, resp: _Response, status: Literal["completed", "cancelled"]) -> None:
        if resp.finished:
            return
        resp.finished = True
        ids = {"response_id": resp.id, "item_id": resp.item["id"], "output_index": 0, "content_index": 0}
        part = resp.item["content"][0]
        if "audio" in resp.modalities:
            self._emit({"type": self._ev("audio.done"), **ids})
            self._emit({"type": self._ev("audio_transcript.done"), **ids, "transcript": part["transcript"]})
        else:
            self._emit({"type": self._ev("text.done"), **ids, "text": part["text"]})
        self._emit({"type": "response.content_part.done", **ids, "part": _event_part(part)})
        resp.item["status"] = "completed" if status == "completed" else "incomplete"
        self._emit(
            {
                "type": "response.output_item.done",
                "response_id": resp.id,
                "output_index": 0,
                "item": resp.item,
            }
        )
        if resp.in_conversation and self.generation == "ga":
            self._emit(
                {
                    "type": "conversation.item.done",
                    "previous_item_id": resp.previous_item_id,
                    "item": resp.item,
                }
            )
        out_text = resp.deltas_sent
        out_audio = resp.deltas_sent if "audio" in resp.modalities else 0
        resp.obj.update(
            status=status,
            status_details=({"type": "cancelled", "reason": "client_cancelled"} if status == "cancelled" else None),
            output=[resp.item],
            usage={
                "total_tokens": resp.input_tokens + out_text + out_audio,
                "input_tokens": resp.input_tokens,
                "output_tokens": out_text + out_audio,
                "input_token_details": {
                    "cached_tokens": 0,
                    "text_tokens": resp.input_tokens,
                    "audio_tokens": 0,
                },
                "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
            },
        )
        self._emit({"type": "response.done", "response": resp.obj})
        self._responses.pop(resp.id, None)
        if self._conv_response is resp:
            self._conv_response = None
        self._notify()

    def _on_response_cancel(self, event: dict[str, Any]) -> None:
        resp_id = event.get("response_id")
        resp = self._responses.get(resp_id) if resp_id is not None else self._conv_response
        if resp is None:
            self._error(
                "response_cancel_not_active",
                "Cancellation failed: no active response found"
                + (f" with id '{resp_id}'." if resp_id is not None else "."),
                event,
            )
            return
        # The task is parked at an await, so cancelling it here means it emits nothing more.
        if resp.task is not None:
            resp.task.cancel()
        self._finish(resp, "cancelled")


class Simulator:
    """The fake server: an aiohttp app accepting Realtime WebSocket connections on any path."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.sessions: list[SimSession] = []
        self.port: int = 0
        self.host: str = "127.0.0.1"
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{self.port}/v1/realtime"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host = host
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        open_sessions = [s for s in self.sessions if not s.closed]
        if open_sessions:
            await asyncio.gather(*(s.close(1001, "server shutting down") for s in open_sessions))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_for_sessions(self, n: int, timeout: float = 5.0) -> SimSession:  # noqa: ASYNC109 (agreed API)
        async with asyncio.timeout(timeout):
            while len(self.sessions) < n:
                assert self._changed is not None, "Simulator not started"
                await self._changed.wait()
        return self.sessions[n - 1]

    def _check_auth(self, request: web.Request, offered: list[str]) -> web.Response | None:
        key = self.config.api_key
        if key is None:
            return None
        candidates: list[str] = []
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(auth[7:].strip())
        for value in (request.headers.get("api-key"), request.query.get("api-key")):
            if value:
                candidates.append(value)
        prefix = "openai-insecure-api-key."
        candidates += [p[len(prefix) :] for p in offered if p.startswith(prefix)]
        if key in candidates:
            return None
        if not candidates:
            return _json_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                None,
            )
        shown = candidates[0][:3] + "*" * 4 + candidates[0][-4:]
        return _json_error(401, f"Incorrect API key provided: {shown}.", "invalid_api_key")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        if cfg.refuse_status is not None:
            return _json_error(cfg.refuse_status, "The simulator refuses this connection.", "refused")
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        denied = self._check_auth(request, offered)
        if denied is not None:
            return denied
        if cfg.require_model and not any(k in request.query for k in ("model", "call_id", "deployment")):
            return _json_error(400, "Missing required parameter: 'model'.", "missing_required_parameter", "model")
        ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=MAX_MESSAGE_BYTES)
        if not ws.can_prepare(request).ok:
            return _json_error(400, "Expected a WebSocket upgrade request.", "websocket_required")
        beta = (
            request.headers.get("OpenAI-Beta", "").replace(" ", "") == "realtime=v1"
            or "openai-beta.realtime-v1" in offered
        )
        await ws.prepare(request)
        session = SimSession(self, ws, request, "beta" if beta else "ga")
        self.sessions.append(session)
        self._notify()
        await session._run()
        return ws


async def serve_forever(host: str, port: int, config: SimulatorConfig) -> None:
    """Run a simulator until cancelled (used by the project's CLI)."""
    sim = Simulator(config)
    await sim.start(host, port)
    try:
        print(f"simulator listening on ws://{host}:{sim.port}/v1/realtime", flush=True)
        await asyncio.Event().wait()
    finally:
        await sim.stop()
