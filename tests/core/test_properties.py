"""Property-based interleavings: the sans-I/O core against an independent model of the upstream server.

A hypothesis state machine plays a client, a network and the server (:mod:`proxy.simulator.model`, driven by
hand: no clock, every server action a rule) around one :class:`proxy.core.session.Session`. The client sends
random events — items created with and without ids, audio appended and committed, responses in the conversation
and out of band, cancels, its own deletes and clears, resets with random keep lists (present, deleted and made-up
ids), checkpoints and resets to them, and ordinary events right behind a reset. The scheduler decides when each
frame crosses: client→upstream frames wait on one ordered wire and reach the server whenever it likes (the server
may run VAD turns, idle timeouts and responses meanwhile, and, in one mode, handle the proxy's deletes and clears
in a different order); server events reach the core in order but at arbitrary times; the server may leave
``error.event_id`` null; the clock may jump past the reset deadline while answers are still withheld.

The test runs once per quirk of real servers (``proxy.simulator.model.QUIRKS``: errors with null code and id, no
cancel, a response replaced without ``response.done``, out-of-band requests ignored, auto-responses after a
transcription delay, VAD interrupting a response, idle-timeout commits, and the unconfirmed behaviours) and once
with none; the quirk is on in every example of its run, the client leans toward what makes it happen, and the run
fails unless some example made it happen.

Every frame is tagged with who made it (the client, the proxy, or the server on its own), so the checks are
exact:

- every non-synthetic client event reaches the server exactly once, in the client's order (the same frame object,
  or, for a command the client left without ``event_id``, the same event with an ``event_id`` the proxy chose),
  and none is sent before every earlier reset has finished;
- a client event sent after a completed reset is processed by the server after every command of that reset;
- no synthetic event reaches the server (the model would answer ``invalid_value`` for ``type``);
- the client sees every server event except the answers to the proxy's own commands (``conversation.item.
  deleted``, ``input_audio_buffer.cleared`` and ``error``), in order, as the same frame objects —
  ``input_audio_buffer.cleared`` names no client event, so those are counted instead: never more than the
  client's clears, one per clear once nothing is in flight;
- the proxy never deletes an item the running reset keeps, and sends a cancel or clear only when asked;
- once the server has processed everything sent before a ``session.reset.completed``, its conversation holds
  exactly the kept items plus items made by client events sent after the reset (server-VAD turns of audio
  appended after it included; with ``clear_input_audio: false`` also turns of older audio that the proxy had not
  heard of when it completed), the audio buffer holds no audio from before the reset (unless told to keep it),
  and ``kept_item_ids``, ``deleted_item_ids`` and ``failed_item_ids`` tell the truth;
- ``session.checkpoint.created`` lists the items the core has been told of;
- when nothing is in flight (and no response runs that the reset may wait for), no reset is running: a reset
  times out only while the scheduler withholds answers past the deadline;
- once all is quiet, no late auto-response for a turn that a completed reset removed (with no new input since
  that could explain it) has left items in the conversation.

Shrunk failures are kept below as plain regression tests (``test_regression_*``); those of core bugs not yet
fixed are ``xfail(strict=True)``, and the machine steers around them (``KNOWN_BUGS``) so that the search can
find others. ``RRP_AVOID_KNOWN_BUGS=0`` lets it find them again.

Examples per run: 300 by default (3,000 over the ten runs), ``HYPOTHESIS_PROFILE=long`` 1,000 (10,000),
``HYPOTHESIS_PROFILE=soak`` 10,000 (100,000). Runs skip shrinking unless ``RRP_SHRINK=1``, so that a failing
run costs seconds, not minutes; set it to get the minimal step trace.
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import pytest
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import event as tally
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from proxy.core.session import Frame, Session, SessionConfig
from proxy.simulator.model import QUIRKS, Item, Model, ModelConfig, Response, ServerEvent

Event = dict[str, Any]

# --- profiles: registered here (no conftest), applied to this module's tests only ---------------------

_PROFILES = {
    "default": settings(
        max_examples=300,  # per run: 3,000 over the ten runs
        stateful_step_count=50,
        deadline=None,
        # The CI run is the same every time, so a submission lands or not on its own code; `long` and `soak`
        # search afresh each run (that is where new failures are found).
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ),
    "long": settings(
        max_examples=1000,
        stateful_step_count=60,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ),
    "soak": settings(
        max_examples=10000,
        stateful_step_count=80,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ),
}
for _name, _profile in _PROFILES.items():
    settings.register_profile(f"rrp-properties-{_name}", _profile)
PROFILE = settings.get_profile(f"rrp-properties-{os.environ.get('HYPOTHESIS_PROFILE', 'default')}")

TIMEOUT = 10.0
RESET_TYPES = ("session.reset", "conversation.delete.all")
CHECKPOINT_TYPE = "session.checkpoint"
SYNTHETIC = frozenset({*RESET_TYPES, CHECKPOINT_TYPE})
PROXY_COMMANDS = frozenset({"response.cancel", "input_audio_buffer.clear", "conversation.item.delete"})
HIDDEN_ANSWERS = frozenset({"conversation.item.deleted", "input_audio_buffer.cleared", "error"})
ITEM_EVENTS = frozenset({"conversation.item.created", "conversation.item.added", "conversation.item.done"})
SWAPPABLE = frozenset({"conversation.item.delete", "input_audio_buffer.clear"})
MAX_OUTPUT_ITEMS = 3
# What the client sends, weighted by repetition.
CLIENT_KINDS = (
    *("create", "create", "create", "append", "append", "commit", "clear"),
    *("response", "response", "response_oob", "cancel", "delete", "delete", "update", "malformed"),
)
QUIRK_FOCUS = {
    "null_errors": ("commit", "delete", "response", "cancel"),
    "no_cancel": ("response", "response"),
    "replace_response": ("response", "response", "response"),
    "ignore_out_of_band": ("response_oob", "response_oob", "response_oob"),
    "late_auto_response": ("append", "append", "append"),
    "vad_interrupt": ("append", "append", "response", "response"),
    "idle_timeout": ("append", "commit", "commit"),
    "no_item_done_after_delete": ("response", "response"),
}
SPEAKING_QUIRKS = frozenset({"late_auto_response", "vad_interrupt"})
# The search steers around core bugs already pinned by xfail regression tests below, so that it can find others;
# RRP_AVOID_KNOWN_BUGS=0 lets it find them again.
KNOWN_BUGS: frozenset[str] = frozenset()
AVOID = KNOWN_BUGS if os.environ.get("RRP_AVOID_KNOWN_BUGS", "1") != "0" else frozenset()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- what the test knows about each frame ------------------------------------------------------------


@dataclass(eq=False)
class ClientSent:
    """A frame the client sent, in the client's order."""

    index: int
    data: bytes | str
    event: Event

    @property
    def synthetic(self) -> bool:
        return self.event.get("type") in SYNTHETIC


@dataclass(eq=False)
class ResetRecord:
    """A `session.reset` the client sent, and what became of it."""

    seq: int
    sent: ClientSent
    keep_ids: tuple[str, ...]
    to: str
    cancel_response: bool
    clear_input_audio: bool
    malformed: bool = False
    keep: frozenset[str] = frozenset()
    started: bool = False
    started_at: float = 0.0  # the core's clock when the reset began
    outcome: Literal["completed", "timed_out", "invalid"] | None = None
    completed: Event | None = None
    completion_tick: int = -1
    completed_at: float = 0.0  # the core's clock when it completed
    known_at_completion: frozenset[str] = frozenset()  # the items the core knew when it completed the reset
    sent_tick: int = -1
    timeouts_before: int = 0
    frames: list[UpFrame] = field(default_factory=list)  # the proxy's commands for this reset
    checked: bool = False

    @property
    def event_id(self) -> str | None:
        value = self.sent.event.get("event_id")
        return value if isinstance(value, str) else None


@dataclass(eq=False)
class UpFrame:
    """A frame the core emitted toward the upstream: the client's (forwarded) or the proxy's own command."""

    data: Frame
    event: Event
    sent: ClientSent | None  # None: the proxy's own command
    reset: ResetRecord | None  # the proxy's commands: the reset that sent it
    at: float = 0.0  # the core's clock when it was forwarded
    processed: bool = False

    @property
    def by_proxy(self) -> bool:
        return self.sent is None

    @property
    def type(self) -> str:
        return str(self.event.get("type"))


@dataclass(eq=False)
class LateResponse:
    """A late auto-response (quirk late_auto_response): started at `tick` for the turn `trigger` committed."""

    response: Response
    tick: int
    trigger: ServerAction


@dataclass(eq=False)
class ServerAction:
    """Something the server did on its own (a VAD turn, an idle timeout, a response step), at scheduler time `tick`."""

    kind: str
    tick: int
    committed: ServerEvent | None = None
    audio: list[object] = field(default_factory=list)  # VAD: the causes of the appends it committed


def _sorted_text(event: Event) -> str:
    """A text frame as a str, keys sorted (so `type` is rarely first) and spaced: the core's slow path."""
    return json.dumps(event, sort_keys=True, separators=(", ", ": "))


def _brief(event: Event) -> Event:
    """`event` for the trace: the bulky objects a check never reads (session, response settings) left out."""
    if "session" in event:
        return {**event, "session": "…"}
    response = event.get("response")
    if isinstance(response, dict):
        keep = ("id", "status", "status_details", "conversation_id", "output")
        brief = {k: response[k] for k in keep if k in response}
        brief["output"] = [item.get("id") for item in brief.get("output") or []]
        return {**event, "response": brief}
    item = event.get("item")
    if isinstance(item, dict):
        return {**event, "item": {k: item[k] for k in ("id", "role", "status") if k in item}}
    return event


def _decode(frame: Frame) -> Event:
    value = orjson.loads(frame)
    assert isinstance(value, dict), f"not a JSON object: {frame!r}"
    return value


# --- the machine ---------------------------------------------------------------------------------------


class ResetMachine(RuleBasedStateMachine):
    """Client, wire, server and clock around one core session; every rule ends with the checks."""

    QUIRKS: frozenset[str] = frozenset()  # the run's quirks (a subclass per run: each has its own example database)

    def __init__(self) -> None:
        super().__init__()
        quirks = self.QUIRKS
        self.run_quirks = quirks  # this run's quirks: on in every example
        # A quirk's run sends more of what makes that quirk happen.
        self.client_kinds = (*CLIENT_KINDS, *(kind for quirk in sorted(quirks) for kind in QUIRK_FOCUS.get(quirk, ())))
        self.tick = 0
        self.clock = FakeClock()
        self.core = Session(SessionConfig(reset_timeout=TIMEOUT), clock=self.clock)
        self.model = Model(ModelConfig(quirks=quirks, stream_responses=False, vad_commit_bytes=None))
        self.late: list[LateResponse] = []  # late auto-responses the server started, in order
        self.new_input_ticks: list[int] = []  # when the client sent a commit or response.create, or VAD committed
        self.encode: Callable[[Event], bytes | str] = orjson.dumps
        self.swap_mode = False
        self.wire: list[UpFrame] = []  # emitted by the core, not yet processed by the server, in order
        self.sent: list[ClientSent] = []
        self.by_identity: dict[int, ClientSent] = {}
        self.expected_up: deque[ClientSent] = deque()  # client frames the core has yet to forward
        self.delivered: dict[int, ServerEvent] = {}  # server events delivered to the core, by frame identity
        self.expect_down: deque[ServerEvent] = deque()  # delivered, to be forwarded to the client
        self.resets: list[ResetRecord] = []
        self.open_resets: deque[ResetRecord] = deque()
        self.checkpoints: list[list[str]] = []
        self.checkpoint_sent = False
        self.known_items: list[str] = []
        self.known_responses: list[str] = []
        self.timeouts = 0
        self.last_client_processed = -1
        self.trace: list[str] = []
        self._n = 0
        self.broken = False  # a check failed mid-step: teardown must not mask it
        # `input_audio_buffer.cleared` names no client event, so acks in flight together are interchangeable: the
        # core may forward the proxy's and hide the client's (same content but the server's event_id). They are
        # counted, not matched: the client never sees more acks than it sent clears, and in the end one per clear.
        self.client_clears = 0  # client clears the core forwarded upstream
        self.clears_forwarded = 0  # `input_audio_buffer.cleared` the client saw

    # --- set-up ------------------------------------------------------------------------------------

    @initialize(
        generation=st.sampled_from(["beta", "ga"]),
        no_conversation_id=st.booleans(),
        no_done_after_delete=st.booleans(),
        swap_mode=st.booleans(),
        sorted_text=st.booleans(),
    )
    def connect(
        self,
        generation: Literal["beta", "ga"],
        no_conversation_id: bool,
        no_done_after_delete: bool,
        swap_mode: bool,
        sorted_text: bool,
    ) -> None:
        """Open the connection: protocol generation, the server's quirks (the run's, and the unconfirmed behaviours
        drawn), and how frames are encoded."""
        self.encode = _sorted_text if sorted_text else orjson.dumps
        if "no_item_done_after_delete" in self.run_quirks:
            generation = "ga"  # only GA has conversation.item.done
        quirks = set(self.run_quirks)
        # (Drawn as "the quirk is on", so that a shrunk failure shows an unconfirmed behaviour only if it matters.)
        if no_conversation_id:
            quirks.add("response_without_conversation_id")
        if no_done_after_delete:
            quirks.add("no_item_done_after_delete")
        config = ModelConfig(quirks=frozenset(quirks), stream_responses=False, server_vad=True, vad_commit_bytes=None)
        self.model = Model(config, generation, encode=self.encode)
        note(f"quirks: {sorted(quirks)}")
        self.trace.append(f"server quirks: {sorted(quirks)}, generation {generation}")
        self.swap_mode = swap_mode
        self.model.session_created(ServerAction("session", self.tick))

    def _new_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    # --- plumbing ------------------------------------------------------------------------------------

    def _client_send(self, event: Event) -> ClientSent:
        data = self.encode(event)
        sent = ClientSent(len(self.sent), data, event)
        self.sent.append(sent)
        self.by_identity[id(data)] = sent
        if not sent.synthetic:
            self.expected_up.append(sent)
        if event.get("type") in ("input_audio_buffer.commit", "response.create"):
            self.new_input_ticks.append(self.tick + 1)
        self.trace.append(f"client → core: {event}")
        self.tick += 1
        self.core.client_frame(data)
        self._pump()
        return sent

    def _pump(self) -> None:
        """Take what the core produced and check it: frames to the client first, then frames upstream."""
        self.broken = True
        up, down = self.core.data_to_send()
        finished_before = {id(r) for r in self.resets if r.outcome is not None}
        for frame in down:
            self._to_client(frame)
        assert not self.expect_down, f"server events not forwarded to the client: {[e.event for e in self.expect_down]}"
        running = self._running_reset()
        # Resets that finished within this step (held ones run back to back) may have sent some of `up`.
        just_finished = [r for r in self.resets if r.outcome is not None and id(r) not in finished_before]
        for frame in up:
            self._to_upstream(frame, running, just_finished)
        self._check_completed_resets()
        self.broken = False

    def _running_reset(self) -> ResetRecord | None:
        reset = self.core.reset
        if reset is None:
            return None
        assert self.open_resets, "the core runs a reset the client never sent"
        record = self.open_resets[0]
        assert record.event_id == reset.request.event_id, "the core runs a reset out of the client's order"
        if not record.started:
            self._start(record)
        return record

    def _start(self, record: ResetRecord) -> None:
        keep = set(record.keep_ids)
        if record.to == "checkpoint":
            assert self.checkpoints, "a reset to a checkpoint ran before the checkpoint was answered"
            keep.update(self.checkpoints[-1])
        record.keep = frozenset(keep)
        record.started = True
        record.started_at = self.core.reset.started_at if self.core.reset is not None else self.clock.now
        if record.to == "checkpoint":
            present = {item.id for item in self.model.conversation}
            tally(
                f"reset to a checkpoint with {min(len(present & set(self.checkpoints[-1])), 2)}+ of its items present"
            )

    def _to_client(self, frame: Frame) -> None:
        server = self.delivered.get(id(frame))
        if server is not None and server.data is frame:
            hidden = self._hidden(server)
            if server.type == "input_audio_buffer.cleared":
                self.clears_forwarded += 1
                assert self.clears_forwarded <= self.client_clears, f"the client saw the proxy's ack {server.event}"
                self.trace.append(f"core → client: {_brief(server.event)}")
                return
            assert not hidden, f"the client saw an answer to the proxy's own command: {server.event}"
            assert self.expect_down and self.expect_down[0] is server, (
                f"server event forwarded out of order: {server.event}; expected "
                f"{self.expect_down[0].event if self.expect_down else None}"
            )
            self.expect_down.popleft()
            self.trace.append(f"core → client: {_brief(server.event)}")
            self._client_learns(server.event)
            return
        event = _decode(frame)
        self.trace.append(f"core → client (proxy's own): {event}")
        etype = event.get("type")
        if etype == "session.reset.completed":
            self._on_completed(event)
        elif etype == "session.checkpoint.created":
            self._on_checkpoint(event)
        elif etype == "error":
            self._on_proxy_error(event)
        else:
            pytest.fail(f"the proxy sent the client an event it made up: {event}")

    def _client_learns(self, event: Event) -> None:
        etype = event.get("type")
        if etype in ITEM_EVENTS:
            item_id = event["item"]["id"]
            if item_id not in self.known_items:
                self.known_items.append(item_id)
        elif etype == "response.created":
            self.known_responses.append(event["response"]["id"])

    def _hidden(self, server: ServerEvent) -> bool:
        """Whether the core must keep `server` from the client: an answer to the proxy's own command."""
        cause = server.cause
        return isinstance(cause, UpFrame) and cause.by_proxy and server.type in HIDDEN_ANSWERS

    def _to_upstream(self, frame: Frame, running: ResetRecord | None, just_finished: list[ResetRecord]) -> None:
        sent = self.by_identity.get(id(frame))
        if sent is not None and sent.data is frame:
            assert not sent.synthetic, f"a synthetic event leaked upstream: {sent.event}"
            assert self.expected_up and self.expected_up[0] is sent, (
                f"client event forwarded twice or out of order: {sent.event}; expected "
                f"{self.expected_up[0].event if self.expected_up else None}"
            )
            self.expected_up.popleft()
            up = UpFrame(frame, sent.event, sent, None)
        elif (named := self._named_by_proxy(frame)) is not None:
            sent, event = named
            self.expected_up.popleft()
            up = UpFrame(frame, event, sent, None)
        else:
            event = _decode(frame)
            etype = event.get("type")
            assert etype not in SYNTHETIC, f"a synthetic event leaked upstream: {event}"
            assert etype in PROXY_COMMANDS, f"the proxy sent upstream an event nobody asked for: {event}"
            if running is None:
                # Only the clean-up of a late response (one the server started after a reset, for input the
                # reset removed) sends commands with no reset running: a cancel, and deletes of its items.
                assert etype != "input_audio_buffer.clear", f"the proxy cleared with no reset running: {event}"
                up = UpFrame(frame, event, None, None)
            elif etype == "conversation.item.delete":
                assert event["item_id"] not in running.keep, f"the reset deletes a kept item: {event}"
            elif etype == "response.cancel":
                # A cancel it does not await (of a response an earlier reset waited for in vain) lets a reset end
                # within the step it started in: the cancel may be a reset's that finished just now.
                cancelling = running.cancel_response or any(r.cancel_response for r in just_finished)
                assert cancelling, f"the reset cancels although cancel_response is false: {event}"
            else:
                assert running.clear_input_audio, f"the reset clears although clear_input_audio is false: {event}"
            if running is not None:
                up = UpFrame(frame, event, None, running)
                running.frames.append(up)
        if up.sent is not None:
            for record in self.resets:
                if record.sent.index < up.sent.index:
                    assert record.outcome is not None, f"{up.event} overtook the unfinished reset {record.sent.event}"
            if up.type == "input_audio_buffer.clear":
                self.client_clears += 1
        up.at = self.clock.now
        self.trace.append(f"core → wire: {up.event}")
        self.wire.append(up)

    def _named_by_proxy(self, frame: Frame) -> tuple[ClientSent, Event] | None:
        """The next client event, if `frame` is it with an `event_id` the proxy added (the client sent none)."""
        if not self.expected_up or "event_id" in self.expected_up[0].event:
            return None
        sent = self.expected_up[0]
        if any(r.outcome is None for r in self.resets if r.sent.index < sent.index):
            # It cannot be released yet, so this is the proxy's own command (a renamed client delete looks
            # the same); were it the client's, the client's event would be missing and the checks would say so.
            return None
        event = _decode(frame)
        name = event.get("event_id")
        if not isinstance(name, str) or {**sent.event, "event_id": name} != event:
            return None
        assert all(s.event.get("event_id") != name for s in self.sent), f"the proxy named {event} with a client's id"
        return sent, event

    def _on_completed(self, event: Event) -> None:
        assert self.open_resets, f"a completion for no reset: {event}"
        record = self.open_resets.popleft()
        assert not record.malformed, f"a malformed reset completed: {record.sent.event}"
        assert event["reset_event_id"] == record.event_id, f"completion names the wrong reset: {event}"
        if not record.started:
            self._start(record)
        record.outcome = "completed"
        record.completed = event
        record.completion_tick = self.tick
        record.completed_at = self.clock.now
        record.known_at_completion = frozenset(self.core.conversation.item_ids)
        record.timeouts_before = self.timeouts

    def _on_checkpoint(self, event: Event) -> None:
        seen = self._core_view()
        assert set(event["item_ids"]) == seen, f"checkpoint {event['item_ids']} but the core has seen {sorted(seen)}"
        self.checkpoints.append(list(event["item_ids"]))

    def _on_proxy_error(self, event: Event) -> None:
        error = event["error"]
        code = error.get("code")
        assert self.open_resets, f"a proxy error with no reset open: {event}"
        record = self.open_resets.popleft()
        assert error.get("event_id") == record.event_id, f"proxy error names the wrong reset: {event}"
        if code == "invalid_session_reset":
            assert record.malformed, f"a well-formed reset was refused: {record.sent.event} → {event}"
            record.outcome = "invalid"
        elif code == "session_reset_timeout":
            assert not record.malformed
            record.outcome = "timed_out"
            self.timeouts += 1
            tally("reset timed out")
        else:
            pytest.fail(f"unexpected proxy error: {event}")

    def _core_view(self) -> set[str]:
        """Item ids the core has been told of and not told are gone."""
        view: set[str] = set()
        for item in self.model.items.values():
            if item.announced is None or item.announced.delivered_at is None:
                continue
            if item.deleted_ack is not None and item.deleted_ack.delivered_at is not None:
                continue
            view.add(item.id)
        return view

    # --- the wire and the server --------------------------------------------------------------------

    def _process(self, index: int, null_error_ids: bool) -> None:
        self.broken = True
        up = self.wire.pop(index)
        if up.sent is not None:
            assert up.sent.index > self.last_client_processed, "client events processed out of order"
            self.last_client_processed = up.sent.index
            for record in self.resets:
                if record.outcome == "completed" and record.sent.index < up.sent.index:
                    late = [f.event for f in record.frames if not f.processed]
                    assert not late, f"{up.event} reached the server before the reset's commands {late}"
        up.processed = True
        self.trace.append(f"wire → server{' (error ids null)' if null_error_ids else ''}: {up.event}")
        self.model.receive(up.data, up, null_error_ids=null_error_ids)
        assert not self.model.invalid_types, (
            f"the server got an event type it does not know: {self.model.invalid_types}"
        )
        self._check_completed_resets()
        self.broken = False

    def _deliver(self) -> None:
        server = self.model.outbox.popleft()
        self.tick += 1
        server.delivered_at = self.tick
        self.delivered[id(server.data)] = server
        if not self._hidden(server) and server.type != "input_audio_buffer.cleared":
            self.expect_down.append(server)
        self.trace.append(f"server → core: {_brief(server.event)}")
        self.core.upstream_frame(server.data)
        self._pump()

    def _swappable(self) -> bool:
        if len(self.wire) < 2:
            return False
        first, second = self.wire[0], self.wire[1]
        if not second.by_proxy or first.type not in SWAPPABLE or second.type not in SWAPPABLE:
            return False
        if first.type == second.type == "input_audio_buffer.clear":
            return False
        return not (
            first.event.get("item_id") is not None and first.event.get("item_id") == second.event.get("item_id")
        )

    # --- the checks after a completed reset -----------------------------------------------------------

    def _check_completed_resets(self) -> None:
        for record in self.resets:
            if record.outcome != "completed" or record.checked:
                continue
            if any(self._sent_before(f, record) for f in self.wire):
                continue
            record.checked = True
            self._check_reset(record)
            tally("reset checked")
            tally(f"reset checked with {len(record.completed['deleted_item_ids']) if record.completed else 0} deletes")

    @staticmethod
    def _sent_before(frame: UpFrame, record: ResetRecord) -> bool:
        if frame.sent is not None:
            return frame.sent.index < record.sent.index
        if frame.reset is None:
            return True  # a late response's clean-up: wait for it to land before judging any reset
        return frame.reset.seq <= record.seq

    def _made_after(self, item: Item, record: ResetRecord) -> bool:
        """Whether `item` may be there although `record` completed: the reset could not have known it."""
        if item.response is not None and item.response.late:
            return True  # a late auto-response may start after the reset: checked once all is quiet (_check_late)
        origin = item.origin
        if isinstance(origin, UpFrame):
            aged = origin.at <= record.completed_at - TIMEOUT
            if origin.sent is not None and aged and item.id not in record.known_at_completion:
                # Unanswered for longer than the reset timeout when the reset completed: the core stopped waiting
                # for it by design (nothing waits without a deadline); the server answering later is its loss.
                tally("item of a command older than the timeout outlived a reset")
                return True
            return origin.sent is not None and origin.sent.index > record.sent.index
        assert isinstance(origin, ServerAction) and origin.kind in ("vad", "idle") and origin.committed is not None
        if origin.kind == "idle":
            # An idle-timeout commit of no audio: the reset must delete it if the proxy heard of it in time.
            seen = origin.committed.delivered_at
            return seen is None or seen > record.completion_tick
        if all(self._sent_after(cause, record) for cause in origin.audio):
            return True  # a turn of audio the client appended after the reset
        if record.clear_input_audio:
            return False  # audio from before the reset: the reset's clear should have dropped it
        # Audio the reset was told to keep: server VAD may commit it before the proxy can hear of it.
        seen = origin.committed.delivered_at
        return seen is None or seen > record.completion_tick

    @staticmethod
    def _sent_after(cause: object, record: ResetRecord) -> bool:
        return isinstance(cause, UpFrame) and cause.sent is not None and cause.sent.index > record.sent.index

    def _check_reset(self, record: ResetRecord) -> None:
        done = record.completed
        assert done is not None
        if record.clear_input_audio:
            stale_audio = [c for c, _ in self.model.audio if not self._sent_after(c, record)]
            assert not stale_audio, (
                f"reset {record.sent.event} completed but audio sent before it is still buffered: "
                f"{[c.event if isinstance(c, UpFrame) else c for c in stale_audio]}"
            )
        present = [item for item in self.model.conversation if not self._made_after(item, record)]
        stale = [item.id for item in present if item.id not in record.keep]
        assert not stale, (
            f"reset {record.sent.event} completed but the server still holds {stale} "
            f"(conversation {self.model.item_ids}, keep {sorted(record.keep)})"
        )
        kept = done["kept_item_ids"]
        assert len(set(kept)) == len(kept) and set(kept) <= record.keep, f"kept_item_ids {kept} not all kept"
        assert {item.id for item in present} <= set(kept), f"kept items {[i.id for i in present]} not all in {kept}"
        for item_id in kept:
            item = self.model.items.get(item_id)
            assert item is not None, f"kept_item_ids names {item_id}, which the server never had"
            if item in self.model.conversation:
                continue
            by = item.deleted_by
            assert isinstance(by, UpFrame), f"kept item {item_id} vanished"
            # The client's own delete, a later reset's (the server may handle a frame sent before this reset
            # after a later reset's delete), or a timed-out reset's late delete.
            excused = by.sent is not None or (
                by.reset is not None and (by.reset.seq > record.seq or by.reset.outcome == "timed_out")
            )
            assert excused, f"kept item {item_id} was deleted by the proxy for {by.reset and by.reset.sent.event}"
        deleted = done["deleted_item_ids"]
        assert len(set(deleted)) == len(deleted), f"deleted_item_ids repeats an id: {deleted}"
        by_this = {
            item.id
            for item in self.model.deletions
            if isinstance(item.deleted_by, UpFrame) and item.deleted_by.reset is record
        }
        if record.timeouts_before == 0:
            assert set(deleted) == by_this, (
                f"deleted_item_ids {deleted} but the reset's deletes removed {sorted(by_this)}"
            )
        else:
            by_proxy = {
                i.id for i in self.model.deletions if isinstance(i.deleted_by, UpFrame) and i.deleted_by.by_proxy
            }
            assert set(deleted) <= by_proxy, f"deleted_item_ids {deleted} but the proxy removed {sorted(by_proxy)}"
        assert done["failed_item_ids"] == [], f"failed_item_ids {done['failed_item_ids']}: the server refused no delete"
        assert record.cancel_response or not done["response_cancelled"]
        assert done["duration_ms"] >= 0.0

    # --- invariants -------------------------------------------------------------------------------------

    @invariant()
    def nothing_in_flight_means_no_reset_running(self) -> None:
        """When no frame is in flight and no response runs, every reset has finished: none waits for nothing."""
        if self.wire or self.model.outbox:
            return
        self.broken = True
        running = self.core.reset
        if running is not None and self.model.conversation_response is not None:
            self._check_quiet_reset()
            self.broken = False
            return
        if running is not None and self.model.responses and "response_without_conversation_id" in self.model.quirks:
            # A response.created without conversation_id leaves the core no way to tell an out-of-band response from
            # one in the conversation: waiting for it to end (its events settle its kind) is not waiting for nothing.
            self.broken = False
            return
        if self._waits_for_a_replaced_response_of_unknown_kind():
            self.broken = False  # it waits until its deadline, which is not waiting for nothing (see _drain)
            return
        assert running is None, f"a reset is stuck with nothing in flight: {self.open_resets[0].sent.event}"
        assert self.core.held_count == 0
        assert not self.expected_up, "client events are stuck in the core"
        assert self.clears_forwarded == self.client_clears, (
            f"the client sent {self.client_clears} clears and saw {self.clears_forwarded} acks"
        )
        self.broken = False

    def _check_quiet_reset(self) -> None:
        """Nothing in flight: a reset that may cancel must not be waiting for a response it has not cancelled."""
        running = self.core.reset
        if (
            running is not None
            and self.model.conversation_response is not None
            and "no_cancel" not in self.model.quirks
        ):
            # (A server that cannot cancel refuses the cancel: the reset may then wait for the response to end.)
            assert not running.request.cancel_response, "a reset waits for a response it never cancelled"

    # --- client rules -------------------------------------------------------------------------------------

    @rule(data=st.data())
    def client_sends(self, data: st.DataObject) -> None:
        """The client sends one ordinary event, named or not (or a malformed reset)."""
        kind = data.draw(st.sampled_from(self.client_kinds), label="kind")
        self._client_event(kind, data)

    def _client_event(self, kind: str, data: st.DataObject) -> None:
        eid = self._new_id("c")
        if kind == "create":
            # A text item, with or without the client's own id, placed last, first, after one, or after nothing.
            item: Event = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
            if data.draw(st.booleans(), label="with_id"):
                item["id"] = self._new_id("citem_")
                self.known_items.append(item["id"])
            event: Event = {"type": "conversation.item.create", "event_id": eid, "item": item}
            previous = data.draw(st.sampled_from(["last", "last", "root", "known", "ghost"]), label="previous")
            if previous == "root":
                event["previous_item_id"] = "root"
            elif previous == "known" and self.known_items:
                event["previous_item_id"] = data.draw(st.sampled_from(self.known_items), label="previous_item_id")
            elif previous == "ghost":
                event["previous_item_id"] = "ghost_prev"
        elif kind == "append":
            event = {"type": "input_audio_buffer.append", "event_id": eid, "audio": "AAAAAAAA"}
        elif kind == "commit":
            event = {"type": "input_audio_buffer.commit", "event_id": eid}
        elif kind == "clear":
            event = {"type": "input_audio_buffer.clear", "event_id": eid}
        elif kind == "response":
            event = {"type": "response.create", "event_id": eid}
        elif kind == "response_oob":
            event = {"type": "response.create", "event_id": eid, "response": {"conversation": "none"}}
        elif kind == "cancel":
            # The current response, one the client heard of (maybe over), or one that never was.
            event = {"type": "response.cancel", "event_id": eid}
            which = data.draw(st.sampled_from(["current", "known", "ghost"]), label="cancel")
            if which == "known" and self.known_responses:
                event["response_id"] = data.draw(st.sampled_from(self.known_responses), label="response_id")
            elif which == "ghost":
                event["response_id"] = "resp_ghost"
        elif kind == "delete":
            # An item the client heard of (maybe gone already), or one that never was.
            item_id = data.draw(st.sampled_from([*self.known_items, "ghost_item"]), label="item_id")
            event = {"type": "conversation.item.delete", "event_id": eid, "item_id": item_id}
        elif kind == "update":
            event = {"type": "session.update", "event_id": eid, "session": {"instructions": "x"}}
        else:
            malformed: list[Event] = [
                {"keep_item_ids": "x"},
                {"to": "start"},
                {"cancel_response": 1},
                {"keep_items": []},
            ]
            bad = data.draw(st.sampled_from(malformed), label="malformed")
            self._send_reset({"type": "session.reset", "event_id": self._new_id("bad"), **bad}, malformed=True)
            return
        if not data.draw(st.sampled_from([True, True, True, False]), label="named"):
            del event["event_id"]  # the client may leave event_id out (the proxy may then name the command)
        self._client_send(event)

    @rule(settle=st.booleans())
    def checkpoint(self, settle: bool) -> None:
        """The client takes a checkpoint (at once, or once everything in flight has landed)."""
        if settle:
            self._drain()
        self._client_send({"type": CHECKPOINT_TYPE, "event_id": self._new_id("cp")})
        self.checkpoint_sent = True

    @rule(
        data=st.data(),
        alias=st.sampled_from(RESET_TYPES),
        cancel=st.booleans(),
        clear=st.sampled_from([True, True, False]),
        with_event_id=st.sampled_from([True, True, True, False]),
        to_checkpoint=st.booleans(),
        followers=st.lists(st.sampled_from(["create", "response", "append", "commit", "delete", "update"]), max_size=3),
    )
    def reset(
        self,
        data: st.DataObject,
        alias: str,
        cancel: bool,
        clear: bool,
        with_event_id: bool,
        to_checkpoint: bool,
        followers: list[str],
    ) -> None:
        """The client resets, keeping random ids (present, gone or made up), maybe to its checkpoint; events follow."""
        pool = [*self.known_items, "ghost_keep"]
        keep = data.draw(st.lists(st.sampled_from(pool), max_size=4, unique=True), label="keep_item_ids")
        event: Event = {"type": alias}
        if with_event_id:
            event["event_id"] = self._new_id("reset")
        if keep:
            event["keep_item_ids"] = keep
        if to_checkpoint and self.checkpoint_sent:
            event["to"] = "checkpoint"
        if not cancel:
            event["cancel_response"] = False
        if not clear:
            event["clear_input_audio"] = False
        self._send_reset(event, malformed=False)
        for follower in followers:
            self._client_event(follower, data)

    def _send_reset(self, event: Event, *, malformed: bool) -> None:
        record = ResetRecord(
            seq=len(self.resets),
            sent=ClientSent(-1, b"", event),
            keep_ids=tuple(event.get("keep_item_ids", ())) if not malformed else (),
            to=str(event.get("to", "empty")),
            cancel_response=event.get("cancel_response", True) is True,
            clear_input_audio=event.get("clear_input_audio", True) is True,
            malformed=malformed,
        )
        self.resets.append(record)
        self.open_resets.append(record)
        # Registered before sending: the core may start (and even finish) it within the call.
        data = self.encode(event)
        sent = ClientSent(len(self.sent), data, event)
        record.sent = sent
        self.sent.append(sent)
        self.by_identity[id(data)] = sent
        self.trace.append(f"client → core: {event}")
        self.tick += 1
        record.sent_tick = self.tick
        self.core.client_frame(data)
        self._pump()

    # --- scheduler rules -----------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.wire))
    @rule(count=st.integers(1, 4), null_error_ids=st.booleans())
    def server_receives(self, count: int, null_error_ids: bool) -> None:
        """The server takes the next frames off the wire, in order, and handles them (errors maybe without ids)."""
        for _ in range(count):
            if not self.wire:
                return
            self._process(0, null_error_ids)

    @precondition(lambda self: self.swap_mode and self._swappable())
    @rule(null_error_ids=st.booleans())
    def server_handles_a_command_early(self, null_error_ids: bool) -> None:
        """The server handles the proxy's second delete or clear before the first (no order is promised)."""
        self._process(1, null_error_ids)

    @precondition(lambda self: bool(self.model.outbox))
    @rule(count=st.integers(1, 6))
    def core_receives(self, count: int) -> None:
        """The next server events reach the core, in order."""
        for _ in range(count):
            if not self.model.outbox:
                return
            self._deliver()

    @precondition(lambda self: self.model.audio_bytes > 0)
    @rule(create_response=st.booleans())
    def server_vad_turn(self, create_response: bool) -> None:
        """Server VAD commits the buffered audio as a user item, maybe starting a response."""
        create_response = self._avoid_server_response(create_response)
        action = ServerAction("vad", self.tick, audio=[cause for cause, _ in self.model.audio])
        interrupts = "vad_interrupt" in self.model.quirks and self.model.conversation_response is not None
        action.committed = self.model.server_vad_turn(action, create_response=create_response)
        self.new_input_ticks.append(self.tick)
        self.trace.append(
            f"server: VAD turn (create_response={create_response}{', interrupts the response' if interrupts else ''})"
        )

    @precondition(lambda self: bool(self.run_quirks & SPEAKING_QUIRKS))
    @rule(data=st.data())
    def client_speaks(self, data: st.DataObject) -> None:
        """The client appends audio, the server reads the wire, and server VAD hears a turn that wants a response."""
        self._client_event("append", data)
        while self.wire:
            self._process(0, False)
        if self.model.audio_bytes > 0:
            self.server_vad_turn(True)

    def _avoid_server_response(self, create_response: bool) -> bool:
        if "vad_response_taken_for_out_of_band" in AVOID and "response_without_conversation_id" in self.model.quirks:
            return False
        return create_response

    @precondition(
        lambda self: (
            "idle_timeout" in self.model.quirks
            and self.model.audio_bytes == 0
            and self.model.conversation_response is None
        )
    )
    @rule(create_response=st.booleans())
    def server_idle_timeout(self, create_response: bool) -> None:
        """Turn detection times out on silence: timeout_triggered commits an empty audio item, maybe a response."""
        create_response = self._avoid_server_response(create_response)
        action = ServerAction("idle", self.tick)
        action.committed = self.model.server_idle_timeout(action, create_response=create_response)
        self.new_input_ticks.append(self.tick)
        self.trace.append(f"server: idle timeout (create_response={create_response})")

    @precondition(lambda self: "idle_timeout" in self.run_quirks and self.model.audio_bytes == 0)
    @rule(data=st.data(), create_response=st.booleans())
    def idle_timeout_while_the_client_commits(self, data: st.DataObject, create_response: bool) -> None:
        """The client appends and commits; before the server reads them, it times out on silence, and the core
        hears of that first."""
        self._client_event("append", data)
        self._client_event("commit", data)
        if self.model.conversation_response is None:
            self.server_idle_timeout(create_response)
            while self.model.outbox:
                self._deliver()

    @precondition(lambda self: bool(self.model.pending_responses))
    @rule()
    def server_starts_late_response(self) -> None:
        """Transcription finished: the auto-response of an earlier turn starts now (unless one already runs)."""
        self._start_late_response()

    @precondition(lambda self: "no_item_done_after_delete" in self.run_quirks and self.core.reset is None)
    @rule()
    def client_deletes_a_streaming_item(self) -> None:
        """A response (started now if none runs) streams an output item; the client hears of it and deletes it."""
        if self.model.conversation_response is None:
            self._client_send({"type": "response.create", "event_id": self._new_id("c")})
            while self.wire:
                self._process(0, False)
        response = self.model.conversation_response
        if response is None or len(response.output) >= MAX_OUTPUT_ITEMS:
            return
        self.trace.append(f"server: response {response.id} adds an item")
        self.model.server_response_step(response.id, ServerAction("response", self.tick), add_item=True)
        while self.model.outbox:
            self._deliver()
        current = response.current
        if current is not None and current.id in self.known_items:
            self._client_send(
                {"type": "conversation.item.delete", "event_id": self._new_id("c"), "item_id": current.id}
            )

    def _start_late_response(self) -> None:
        trigger = self.model.pending_responses[0].origin
        assert isinstance(trigger, ServerAction)
        response = self.model.server_start_late_response(ServerAction("late", self.tick))
        self.trace.append(f"server: late auto-response {response.id if response else 'skipped (one runs)'}")
        if response is not None:
            self.late.append(LateResponse(response, self.tick, trigger))
            # It answers at once: its first output item (the answer that may outlive a reset) comes with it.
            self.trace.append(f"server: response {response.id} adds an item")
            self.model.server_response_step(response.id, ServerAction("response", self.tick), add_item=True)

    @precondition(lambda self: bool(self.model.responses))
    @rule(data=st.data(), add_item=st.booleans())
    def server_response_step(self, data: st.DataObject, add_item: bool) -> None:
        """A running response produces an output item, or finishes."""
        response_id = data.draw(st.sampled_from(sorted(self.model.responses)), label="response")
        add_item = add_item and len(self.model.responses[response_id].output) < MAX_OUTPUT_ITEMS
        self.trace.append(f"server: response {response_id} {'adds an item' if add_item else 'finishes'}")
        self.model.server_response_step(response_id, ServerAction("response", self.tick), add_item=add_item)

    @rule(seconds=st.sampled_from([0.01, 0.5, 3.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        """The clock moves; past the deadline the relay would call handle_timeout."""
        self.clock.now += seconds
        deadline = self.core.deadline
        if deadline is not None and self.clock.now >= deadline:
            self.trace.append(f"clock +{seconds}: handle_timeout")
            self.tick += 1
            self.core.handle_timeout()
            self._pump()

    @rule()
    def drain(self) -> None:
        """Everything in flight is delivered and every response finishes; then nothing may be left waiting."""
        self._drain()

    def _waits_for_a_replaced_response_of_unknown_kind(self) -> bool:
        reset = self.core.reset
        if reset is None or not {"replace_response", "response_without_conversation_id"} <= self.model.quirks:
            return False
        waited = [r for r in self.core.conversation.conversation_responses() if r not in reset.stale]
        return bool(waited) and not any(r in self.model.responses for r in waited)

    def _drain(self) -> None:
        for _ in range(10_000):
            if self.wire:
                self._process(0, False)
            elif self.model.outbox:
                self._deliver()
            elif self.model.pending_responses:
                self._start_late_response()
            elif self.model.responses:
                self._check_quiet_reset()
                response_id = next(iter(self.model.responses))
                self.model.server_response_step(response_id, ServerAction("response", self.tick), add_item=False)
            elif self._waits_for_a_replaced_response_of_unknown_kind():
                # Replaced without a response.done, and no conversation_id to say the replacement was in the
                # conversation: the core cannot know it is over, and waits for it until the deadline (the next
                # reset does not wait for it at all).
                tally("reset waited out a replaced response of unknown kind")
                self.time_passes(max(0.0, (self.core.deadline or self.clock.now) - self.clock.now))
            else:
                break
        assert self.core.reset is None, "a reset is still running after everything was delivered"
        assert self.core.held_count == 0 and not self.expected_up, "client events stuck after everything was delivered"
        assert all(r.outcome is not None for r in self.resets), "a reset never finished"
        assert all(r.checked for r in self.resets if r.outcome == "completed")
        self.broken = True
        self._check_late()
        self.broken = False

    def _check_late(self) -> None:
        """Once all is quiet: no late auto-response for input a completed reset removed left items behind.

        Such a response is one the server started for a turn the reset did not keep, with no client commit or
        ``response.create`` and no server turn since the reset that could explain it; the proxy must cancel it and
        delete what it added (its output items are exempt from the check at completion, which may come first).
        """
        for late in self.late:
            committed = late.trigger.committed
            assert committed is not None
            turn = self.model.items[committed.event["item_id"]]
            present = [item for item in late.response.output if item in self.model.conversation]
            if not present:
                continue
            for record in self.resets:
                if record.outcome != "completed" or not record.cancel_response or turn.id in record.keep:
                    continue
                if self._made_after(turn, record):
                    continue
                if any(record.sent_tick < tick < late.tick for tick in self.new_input_ticks):
                    continue
                # Kept by this reset (the response had started before it) or by a later one: the client's choice.
                kept = {
                    item_id
                    for later in self.resets[record.seq :]
                    if later.outcome == "completed"
                    for item_id in later.keep
                }
                left = [item for item in present if item.id not in kept]
                if not left:
                    continue
                raise AssertionError(
                    f"reset {record.sent.event} completed, then a late auto-response {late.response.id} for turn "
                    f"{turn.id} (which the reset removed) left {[i.id for i in left]} in the conversation "
                    f"{self.model.item_ids}"
                )

    def teardown(self) -> None:
        """At the end, deliver everything: the same checks must hold, and every reset must have finished."""
        QUIRK_HITS.update(self.model.quirk_hits)
        RESETS_CHECKED[0] += sum(r.checked for r in self.resets)
        if self.broken:
            note("\n".join(["event trace of the failing case:", *self.trace]))
            return
        model = self.model
        if model.outbox or self.wire or model.responses or model.pending_responses or self.core.reset is not None:
            try:
                self._drain()
            except BaseException:
                note("\n".join(["event trace of the failing case:", *self.trace]))
                raise


# One run per quirk (and one with none): each quirk is on in every example of its run; the unconfirmed behaviours
# are also drawn per example in every run. Every run must pass (issue 9: the quirk runs once marked pending pass).
RUNS = [pytest.param(quirk, id=quirk or "no_quirk") for quirk in ("", *QUIRKS)]


QUIRK_HITS: Counter[str] = Counter()  # this run's: how often each quirk changed what the server did
RESETS_CHECKED = [0]


SHRINK = os.environ.get("RRP_SHRINK", "0") == "1"


@pytest.mark.parametrize("quirk", RUNS)
def test_reset_properties(quirk: str) -> None:
    """The invariants above hold against a server with `quirk` (none: the documented behaviour); the run shows it."""
    quirks = frozenset({quirk}) if quirk else frozenset()
    QUIRK_HITS.clear()
    RESETS_CHECKED[0] = 0
    profile = PROFILE
    if not SHRINK:  # a failing run reports its first failure at once; RRP_SHRINK=1 shrinks it (up to minutes)
        profile = settings(profile, phases=[p for p in Phase if p not in (Phase.shrink, Phase.explain)])
    machine = type(f"ResetMachine_{quirk or 'no_quirk'}", (ResetMachine,), {"QUIRKS": quirks})
    run_state_machine_as_test(machine, settings=profile)
    print(f"quirk {quirk or 'none'}: hits {dict(QUIRK_HITS)}, resets checked {RESETS_CHECKED[0]}")
    if quirk:
        assert QUIRK_HITS[quirk] > 0, f"no example of the run made the quirk {quirk} happen"


# --- regression tests: shrunk failures, kept as plain traces ------------------------------------------------


def _client(session: Session, event: Event) -> tuple[list[Event], list[Event]]:
    session.client_frame(orjson.dumps(event))
    return _take(session)


def _upstream(session: Session, event: Event) -> tuple[list[Event], list[Event]]:
    session.upstream_frame(orjson.dumps(event))
    return _take(session)


def _take(session: Session) -> tuple[list[Event], list[Event]]:
    up, down = session.data_to_send()
    return [_decode(f) for f in up], [_decode(f) for f in down]


def test_regression_client_cancel_error_without_event_id_reaches_the_client() -> None:
    """A client's cancel answered by a not-active error with a null event id reaches the client after a reset.

    Found by the state machine; fixed in the core by 0be7bf4 (client cancels tracked, answered in order).
    """
    s = Session()
    _upstream(s, {"type": "response.created", "response": {"id": "resp_1", "conversation_id": "conv_1"}})
    up, _ = _client(s, {"type": "session.reset", "event_id": "reset1"})
    assert [e["type"] for e in up] == ["response.cancel"]
    done = {"id": "resp_1", "status": "cancelled", "conversation_id": "conv_1", "output": []}
    up, _ = _upstream(s, {"type": "response.done", "response": done})
    assert [e["type"] for e in up] == ["input_audio_buffer.clear"]
    _, down = _upstream(s, {"type": "input_audio_buffer.cleared"})
    assert [e["type"] for e in down] == ["session.reset.completed"]
    up, _ = _client(s, {"type": "response.cancel", "event_id": "c4"})
    assert [e["type"] for e in up] == ["response.cancel"]
    error = {
        "type": "invalid_request_error",
        "code": "response_cancel_not_active",
        "message": "Cancellation failed: no active response found",
        "param": None,
        "event_id": None,
    }
    _, down = _upstream(s, {"type": "error", "error": error})
    assert [e["type"] for e in down] == ["error"], "the client's cancel got no answer"


def test_regression_vad_response_taken_for_a_pending_out_of_band_one() -> None:
    """A server-started response that arrives before the client's out-of-band one is cancelled, and its output item
    does not outlive the reset.

    Was a strict xfail (the VAD response inherited the client's out-of-band flag, so its item outlived the reset);
    fixed by evidence: a response without conversation_id is of unknown kind, and an item event for its output
    settles it as a conversation response. The client's response, of unknown kind too, is cancelled as well: with
    no conversation_id, the safe side.
    """
    s = Session()
    _client(s, {"type": "response.create", "event_id": "c1", "response": {"conversation": "none"}})
    # Server VAD had started a response before the server read c1; neither response.created names a conversation.
    _upstream(s, {"type": "input_audio_buffer.committed", "item_id": "user1", "previous_item_id": None})
    _upstream(s, {"type": "conversation.item.created", "previous_item_id": None, "item": {"id": "user1"}})
    _upstream(s, {"type": "response.created", "response": {"id": "resp_vad", "status": "in_progress"}})
    item = {"id": "out1", "type": "message", "role": "assistant"}
    _upstream(s, {"type": "response.output_item.added", "response_id": "resp_vad", "output_index": 0, "item": item})
    _upstream(s, {"type": "conversation.item.created", "previous_item_id": "user1", "item": item})
    _upstream(s, {"type": "response.created", "response": {"id": "resp_oob", "status": "in_progress"}})
    up, _ = _client(s, {"type": "session.reset", "event_id": "reset1"})
    assert [(e["type"], e.get("response_id")) for e in up] == [
        ("response.cancel", "resp_vad"),
        ("response.cancel", "resp_oob"),
    ]
    for rid in ("resp_vad", "resp_oob"):
        up, _ = _upstream(s, {"type": "response.done", "response": {"id": rid, "status": "cancelled", "output": []}})
    deletes = [e["item_id"] for e in up if e["type"] == "conversation.item.delete"]
    assert deletes == ["user1", "out1"]
    for item_id in deletes:
        _, down = _upstream(s, {"type": "conversation.item.deleted", "event_id": "ev", "item_id": item_id})
    _, down = _upstream(s, {"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert [e["type"] for e in down] == ["session.reset.completed"]
    assert down[0]["deleted_item_ids"] == ["user1", "out1"]


_NOT_ACTIVE_NULL_ID = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "code": "response_cancel_not_active",
        "message": "Cancellation failed: no active response found",
        "param": None,
        "event_id": None,
    },
}


def test_regression_client_cancel_after_a_timed_out_reset_loses_its_error() -> None:
    """After a timeout, a client cancel sent behind the reset's own cancel still gets its not-active error.

    Found by the state machine (the cancelled response.done was taken as the answer to the client's cancel, whose
    null-id error was then hidden as ours); fixed in the core by e58bbbf (one FIFO of every cancel in flight).
    """
    clock = FakeClock()
    s = Session(SessionConfig(reset_timeout=TIMEOUT), clock=clock)
    _upstream(s, {"type": "response.created", "response": {"id": "resp_1", "conversation_id": "conv_1"}})
    up, _ = _client(s, {"type": "session.reset", "event_id": "reset1"})
    assert [(e["type"], e.get("response_id")) for e in up] == [("response.cancel", "resp_1")]
    clock.now += TIMEOUT
    s.handle_timeout()
    _, down = _take(s)
    assert [e["error"]["code"] for e in down] == ["session_reset_timeout"]
    up, _ = _client(s, {"type": "response.cancel", "event_id": "c4"})
    assert [e["type"] for e in up] == ["response.cancel"]
    # The server handles our cancel (the response ends, cancelled), then the client's (nothing left to cancel).
    done = {"id": "resp_1", "status": "cancelled", "conversation_id": "conv_1", "output": []}
    _, down = _upstream(s, {"type": "response.done", "response": done})
    assert [e["type"] for e in down] == ["response.done"]
    _, down = _upstream(s, _NOT_ACTIVE_NULL_ID)
    assert [e["type"] for e in down] == ["error"], "the client's cancel got no answer"


def test_regression_second_cancel_after_a_timeout_leaks_its_error() -> None:
    """Two of the proxy's cancels for one response, both refused with null ids, are both hidden from the client.

    Found by the state machine (a reset held behind a timed-out one cancelled the same response again, and the
    core remembered one cancel per response, so one error leaked); fixed in the core by e58bbbf.
    """
    clock = FakeClock()
    s = Session(SessionConfig(reset_timeout=TIMEOUT), clock=clock)
    _upstream(s, {"type": "response.created", "response": {"id": "resp_1", "conversation_id": "conv_1"}})
    up, _ = _client(s, {"type": "session.reset", "event_id": "reset1"})
    assert [(e["type"], e.get("response_id")) for e in up] == [("response.cancel", "resp_1")]
    _client(s, {"type": "session.reset", "event_id": "reset2"})
    clock.now += TIMEOUT
    s.handle_timeout()
    up, down = _take(s)
    assert [e["error"]["code"] for e in down] == ["session_reset_timeout"]
    # reset2's cancel, and (the response is one a timed-out reset could not stop) its clear alongside.
    assert [(e["type"], e.get("response_id")) for e in up] == [
        ("response.cancel", "resp_1"),
        ("input_audio_buffer.clear", None),
    ]
    # The response ends by itself before the server reads either cancel; both cancels are then refused.
    done = {"id": "resp_1", "status": "completed", "conversation_id": "conv_1", "output": []}
    _, down = _upstream(s, {"type": "response.done", "response": done})
    assert [e["type"] for e in down] == ["response.done"]
    _, down = _upstream(s, _NOT_ACTIVE_NULL_ID)
    assert down == []
    _, down = _upstream(s, _NOT_ACTIVE_NULL_ID)
    assert down == [], "an answer to the proxy's own cancel reached the client"


def test_regression_vad_commit_taken_for_the_client_commit() -> None:
    """A reset waits for the item of a client commit sent before it, though a server-VAD commit came in between.

    Found by the state machine (any `committed` answered the oldest client commit, so the reset completed and the
    client's audio item outlived it); fixed in the core by 53621fa (VAD items are known by speech_started/stopped).
    """
    s = Session()
    for event_id in ("a1", "a2"):
        _client(s, {"type": "input_audio_buffer.append", "event_id": event_id, "audio": "AAAAAAAA"})
    up, _ = _client(s, {"type": "input_audio_buffer.commit", "event_id": "k3"})
    assert [e["type"] for e in up] == ["input_audio_buffer.commit"]
    # Server VAD had committed the audio of a1 before the server read a2 and k3.
    _upstream(s, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "vad1"})
    _upstream(s, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 500, "item_id": "vad1"})
    _upstream(s, {"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": "vad1"})
    _upstream(s, {"type": "conversation.item.created", "previous_item_id": None, "item": {"id": "vad1"}})
    reset = {"type": "session.reset", "event_id": "reset1", "keep_item_ids": ["vad1"], "clear_input_audio": False}
    up, down = _client(s, reset)
    assert up == []
    assert down == [], "the reset completed while the client's commit k3 was still on its way"
    _upstream(s, {"type": "input_audio_buffer.committed", "previous_item_id": "vad1", "item_id": "user2"})
    up, _ = _upstream(s, {"type": "conversation.item.created", "previous_item_id": "vad1", "item": {"id": "user2"}})
    assert [(e["type"], e["item_id"]) for e in up] == [("conversation.item.delete", "user2")]
