"""Property-based interleavings for tasks: usage per task and auto-resets, the core against the server model.

Hypothesis draws a `[reset]` policy and a random walk of steps; a harness plays them around one
:class:`proxy.core.session.Session`: a client (lines and responses, out-of-band ones too, its own resets,
checkpoints, policy changes, `session.usage`), two ordered wires that deliver a few frames per step, and the server
(:mod:`proxy.simulator.model`, each response stepped by hand: some output items, then its end), and the clock
jumping past a reset's deadline when everything sent is answered. Checked after every step:

- every `response.done` the core was handed is counted exactly once: the `usage` of the completions and timeout
  errors the client got, plus the running task, equal the sums of those `response.done` events' usage;
- a `session.usage.result` answered at once shows that running task;
- the policy's resets are never more than the `response.done` events that reached the core with no reset running;
  each says `"auto": true`, a reason, and no `reset_event_id`; the client's own say `"auto": false`;
- a trim never deletes a checkpoint item; no synthetic event reaches the server.

A failing walk is named by its policies and seed, which replay it.
"""

from __future__ import annotations

from collections import deque
from random import Random
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.events import RESET_COMPLETED
from proxy.core.policy import Policy
from proxy.core.session import Session, SessionConfig
from proxy.simulator.model import Model, ModelConfig, ServerEvent
from tests.core.playbook import FakeClock

Event = dict[str, Any]

POLICIES = st.builds(
    Policy,
    after=st.sampled_from(["response", "never"]),  # hypothesis favours the first: the policy that acts most
    to=st.sampled_from(["empty", "checkpoint"]),
    max_input_tokens=st.sampled_from([0, 20, 50]),
    max_items=st.sampled_from([0, 2, 4]),
)
# Steps and their weights: the wires and the server move most; a client reset is rare (else most responses end
# inside one, where no policy acts).
STEPS = {
    "turn": 4,
    "item": 2,
    "response": 2,
    "out_of_band": 1,
    "reset": 1,
    "checkpoint": 2,
    "policy": 1,
    "usage": 2,
    "time": 1,
    "to_server": 5,
    "to_core": 7,
    "server": 5,
}


class Harness:
    def __init__(self, policy: Policy, draw_policy: Policy) -> None:
        self.clock = FakeClock()
        self.session = Session(SessionConfig(policy=policy), clock=self.clock)
        self.model = Model(ModelConfig(stream_responses=False))
        self.later_policy = draw_policy  # what the "policy" step sets
        self.up: deque[bytes | str] = deque()  # core → server, in order
        self.down: deque[ServerEvent] = deque()  # server → core, in order
        self.seen: list[Event] = []  # what the client got
        self.dones: list[Event] = []  # the usage of each response.done the core was handed
        self.auto_allowed = 0  # response.done events handed to the core with no reset running
        self.n = 0

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _take(self) -> None:
        up, down = self.session.data_to_send()
        for frame in up:
            event = orjson.loads(frame)
            auto = self.session._auto
            if event["type"] == "conversation.item.delete" and auto is not None and auto[1] == "max_items":
                assert event["item_id"] not in (self.session.checkpoint or ()), "a trim deleted a checkpoint item"
            self.up.append(frame)
        self.seen.extend(orjson.loads(frame) for frame in down)
        self.session.take_notices()

    def _client(self, event: Event) -> None:
        self.session.client_frame(orjson.dumps(event))
        self._take()

    # --- steps ----------------------------------------------------------------------------------------------------

    def step(self, name: str, k: int) -> None:
        getattr(self, f"step_{name}")(k)
        self.check()

    def step_item(self, _: int) -> None:
        self.n += 1
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"line {self.n}"}]}
        self._client({"type": "conversation.item.create", "item": item})

    def step_response(self, _: int) -> None:
        self._client({"type": "response.create"})

    def step_out_of_band(self, _: int) -> None:
        self._client({"type": "response.create", "response": {"conversation": "none"}})

    def step_turn(self, k: int) -> None:
        self.step_item(k)
        self.step_response(k)

    def step_reset(self, k: int) -> None:
        self.n += 1
        event: Event = {"type": "session.reset", "event_id": f"r{self.n}", "cancel_response": k % 2 == 0}
        if k % 3 == 0 and self.session.checkpoint is not None:
            event["to"] = "checkpoint"
        self._client(event)

    def step_checkpoint(self, _: int) -> None:
        self._client({"type": "session.checkpoint"})

    def step_policy(self, k: int) -> None:
        policy = self.later_policy if k % 2 else Policy()
        self._client({"type": "session.reset.policy", **policy.as_event()})

    def step_usage(self, _: int) -> None:
        paused = self.session.paused
        task = self.session.usage.task.as_event()
        self._client({"type": "session.usage"})
        if not paused:
            assert self.seen[-1]["type"] == "session.usage.result" and self.seen[-1]["usage"] == task

    def step_time(self, _: int) -> None:
        # Only once everything sent is answered: a reset still running then waits for a response the server runs.
        if self.session.reset is not None and not self.up and not self.down:
            self.clock.now += 11.0
            self.session.handle_timeout()
            self._take()

    def step_to_server(self, k: int) -> None:
        for _ in range(min(k + 1, len(self.up))):
            self.model.receive(self.up.popleft())
            self.down.extend(self.model.outbox)
            self.model.outbox.clear()

    def step_to_core(self, k: int) -> None:
        for _ in range(min(k + 1, len(self.down))):
            out = self.down.popleft()
            if out.type == "response.done":
                self.dones.append(out.event["response"]["usage"])
                if self.session.reset is None:
                    self.auto_allowed += 1
            self.session.upstream_frame(out.data)
            self._take()

    def step_server(self, k: int) -> None:
        """The oldest running response adds k % 3 output items, then ends."""
        if not self.model.responses:
            return
        rid = next(iter(self.model.responses))
        for _ in range(k % 3):
            self.model.server_response_step(rid, add_item=True)
        self.model.server_response_step(rid, add_item=False)
        self.down.extend(self.model.outbox)
        self.model.outbox.clear()

    # --- the checks -----------------------------------------------------------------------------------------------

    def ends(self) -> list[Event]:
        """Each reset's end the client saw: its completion, or its timeout error (which carries the same fields)."""
        return [e for e in self.seen if e["type"] == RESET_COMPLETED or (e["type"] == "error" and "auto" in e)]

    def check(self) -> None:
        ends = self.ends()
        running = self.session.usage.task
        for key in ("input_tokens", "output_tokens"):
            counted = sum(e["usage"][key] for e in ends) + getattr(running, key)
            assert counted == sum(d[key] for d in self.dones), key
        assert sum(e["usage"]["responses"] for e in ends) + running.responses == len(self.dones)
        autos = [e for e in ends if e["auto"]]
        assert len(autos) <= self.auto_allowed
        assert all(e["auto_reason"] in ("response", "max_input_tokens", "max_items") for e in autos)
        assert all(e["reset_event_id"] is None for e in autos)
        assert all(e["reset_event_id"] is not None and "auto_reason" not in e for e in ends if not e["auto"])
        assert self.model.invalid_types == []


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(policy=POLICIES, later=POLICIES, seed=st.integers(0, 2**32 - 1))
def test_usage_is_conserved_and_auto_resets_follow_the_policy(policy: Policy, later: Policy, seed: int) -> None:
    """Over random walks against the server model (60 weighted steps each), every response.done is counted once
    and the policy's resets are what it allows."""
    rnd = Random(seed)  # uniform: hypothesis's own randoms lean to the first choice, and every walk jams
    harness = Harness(policy, later)
    names, weights = list(STEPS), list(STEPS.values())
    for _ in range(60):
        harness.step(rnd.choices(names, weights)[0], rnd.randrange(16))
