"""The offline fake of the OpenAI Realtime WebSocket server: the thin aiohttp wire around :mod:`.model`.

The model (sans-I/O, shared with the property tests) decides what the server does; this module owns the rest:
the handshake (auth, refusals, the generation chosen by header or subprotocol), frames in → the model → frames
out, a fixed one-way delay, a loop timer at the model's next deadline, and the close the model asks for.
Deliberately shares no code with ``proxy.core``: it is an independent model of the upstream, so testing the
proxy against it means something. Protocol facts follow /work/shared/realtime-protocol.md.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TypeVar

import orjson
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from proxy.simulator.model import Model, ModelConfig
from proxy.simulator.shapes import Event, Generation

T = TypeVar("T")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_ALNUM = string.ascii_letters + string.digits


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
    session_expired_error: bool = True  # False: at the cap only the close, as some API versions do
    model: str = "gpt-realtime"  # reported when the query names no model
    # Quirks of real servers (proxy.simulator.model.QUIRKS), each off unless named here.
    quirks: Iterable[str] = field(default_factory=frozenset)
    transcription_delay_s: float = 1.0  # late_auto_response: a VAD commit → its response.created
    idle_timeout_s: float = 5.0  # idle_timeout, unless the session's turn_detection.idle_timeout_ms says otherwise

    def __post_init__(self) -> None:
        self.quirks = frozenset(self.quirks)
        self.model_config()  # an unknown quirk fails here, not at the first connection

    def model_config(self) -> ModelConfig:
        """The model's share of this config: the fields both spell alike."""
        shared = {f.name for f in fields(ModelConfig)} & {f.name for f in fields(self)}
        return ModelConfig(**{name: getattr(self, name) for name in shared})


def _json_error(status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class SimSession:
    """One accepted WebSocket connection: the model of its server, and the wire that feeds and drains it."""

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
        self.sent: list[Event] = []  # server events actually written, in order
        self.closed: bool = False
        self.close_code: int | None = None
        self.conversation_id: str = _rand_id("conv_")
        self.model = Model(
            self._cfg.model_config(),
            generation,
            session_id=self.id,
            conversation_id=self.conversation_id,
            model=self.query.get("model") or self.query.get("deployment") or self._cfg.model,
            now=self._loop.time(),
            wall_clock=int(time.time()),
            new_id=_rand_id,
        )
        # (due time, kind, payload, event, close code, close reason); kind: event | text | binary | close
        self._queue: asyncio.Queue[tuple[float, str, bytes, Event | None, int, str]] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._close_requested = False
        self._server_closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- public helpers
    @property
    def items(self) -> list[Event]:
        """The conversation as the server holds it (copies)."""
        return [item.as_json() for item in self.model.conversation]

    @property
    def item_ids(self) -> list[str]:
        return self.model.item_ids

    @property
    def received(self) -> list[Event]:
        return self.model.received

    @property
    def session(self) -> Event:
        return self.model.session

    @property
    def active_response_id(self) -> str | None:
        running = self.model.conversation_response
        return running.id if running else None

    @property
    def active_response_ids(self) -> list[str]:
        """Every response still streaming, out-of-band ones included."""
        return list(self.model.responses)

    @property
    def server_vad(self) -> bool:
        return self.model.turn_detection is not None

    async def wait_until(self, predicate: Callable[[SimSession], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109 (agreed API)
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Server-initiated close; queued behind already-sent events so order is kept."""
        self._request_close(code, reason)
        await self._done.wait()

    async def send_event(self, event: Event) -> None:
        self.model.inject(event)
        self._flush()

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self._enqueue("text", data.encode())
        else:
            self._enqueue("binary", data)

    def add_item(self, item: Event, previous_item_id: str | None = None, *, announce: bool = True) -> Event:
        """Add an item as the upstream would on its own (appended unless previous_item_id is given)."""
        added = self.model.add_item(item, previous_item_id, announce=announce)
        self._flush()
        return added.as_json()

    async def vad_commit(self, create_response: bool | None = None) -> str:
        """Force a server-VAD turn now (speech_started ... committed, item, maybe a response)."""
        committed = self.drive(lambda model: model.server_vad_turn(create_response=create_response))
        return str(committed.event["item_id"])

    def drive(self, action: Callable[[Model], T]) -> T:
        """Make the server act now, e.g. `session.drive(lambda m: m.server_idle_timeout())`, and send what it made."""
        result = action(self.model)
        self._flush()
        return result

    # ---------------------------------------------------------------- the model's output
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _flush(self) -> None:
        """Move what the model produced onto the wire, obey its close, and rearm the timer at its next deadline."""
        outbox = self.model.outbox
        while outbox:
            out = outbox.popleft()
            data = out.data if isinstance(out.data, bytes) else out.data.encode()
            self._enqueue("event", data, out.event)
        if self.model.close_request is not None:
            self._request_close(*self.model.close_request)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.model.next_deadline
        if deadline is not None and not self.closed:
            self._timer = self._loop.call_at(deadline, self._on_timer)
        self._notify()

    def _on_timer(self) -> None:
        self._timer = None
        self.model.advance(self._loop.time())
        self._flush()

    def _enqueue(
        self, kind: str, payload: bytes = b"", event: Event | None = None, code: int = 1000, reason: str = ""
    ) -> None:
        # One fixed delay per frame, stamped at enqueue time: FIFO + monotonic due times keep the order.
        self._queue.put_nowait((self._loop.time() + self._cfg.one_way_delay_s, kind, payload, event, code, reason))

    def _request_close(self, code: int, reason: str) -> None:
        if self._close_requested or self.closed:
            return
        self._close_requested = True
        self._enqueue("close", b"", None, code, reason)

    async def _write_loop(self) -> None:
        while True:
            due, kind, payload, event, code, reason = await self._queue.get()
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
            if event is not None:
                self.sent.append(event)
                self._notify()

    # ---------------------------------------------------------------- connection lifecycle
    async def _run(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())
        self.model.session_created()
        self._flush()
        try:
            async for msg in self._ws:
                if msg.type == WSMsgType.TEXT:
                    self.model.receive(msg.data, now=self._loop.time())
                    self._flush()
                elif msg.type == WSMsgType.BINARY:
                    self.model.receive_binary()
                    self._flush()
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.closed = True
        if not self._server_closed:
            self.close_code = self._ws.close_code
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.model.shutdown()
        writer = self._writer
        if writer is not None and not writer.done():
            if self._close_requested:
                # The writer is completing our own close handshake; let it finish rather than abort it.
                await asyncio.wait({writer}, timeout=2.0)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        self._done.set()
        self._notify()
        self._sim._notify()


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
