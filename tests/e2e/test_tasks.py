"""Per-task usage and auto-reset policies over real sockets, checked against the simulator's own counts; and the
observer example (examples/observer.py), run against the simulator as CI runs it."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from proxy.simulator import SimSession, SimulatorConfig
from tests.e2e.conftest import Client, Event, StackFactory, item_event

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "observer.py"


def sim_usage(upstream: SimSession, start: int = 0, end: int | None = None) -> Event:
    """The usage the simulator itself reported in the response.done events it sent[start:end], summed."""
    dones = [e for e in upstream.sent[start:end] if e["type"] == "response.done"]
    usages = [d["response"]["usage"] for d in dones]
    return {
        "responses": len(dones),
        "input_tokens": sum(u["input_tokens"] for u in usages),
        "output_tokens": sum(u["output_tokens"] for u in usages),
        "cached_tokens": sum(u["input_token_details"]["cached_tokens"] for u in usages),
        "input_token_details": {
            k: sum(u["input_token_details"][k] for u in usages) for k in ("text_tokens", "audio_tokens")
        },
        "output_token_details": {
            k: sum(u["output_token_details"][k] for u in usages) for k in ("text_tokens", "audio_tokens")
        },
    }


def sent_count(upstream: SimSession, etype: str) -> int:
    return sum(1 for e in upstream.sent if e["type"] == etype)


async def turn(client: Client, text: str) -> Event:
    await client.send(item_event(text))
    await client.send({"type": "response.create"})
    return await client.until("response.done")


@pytest.mark.parametrize("generation", ["ga", "beta"])
async def test_after_response_resets_each_task_and_its_usage_is_the_simulators(
    make_stack: StackFactory, generation: str
) -> None:
    """[reset] after = "response": every response ends a task; each completed's usage is exactly what the
    simulator reported for that task (either protocol generation), and the simulator's conversation is empty."""
    stack = await make_stack(reset={"after": "response"})
    headers = {"OpenAI-Beta": "realtime=v1"} if generation == "beta" else {}
    client, upstream = await stack.client(additional_headers=headers)
    assert upstream.generation == generation
    for n in range(3):
        start = len(upstream.sent)
        await turn(client, f"task {n}")
        completed = await client.until("session.reset.completed")
        assert completed["auto"] is True and completed["auto_reason"] == "response"
        assert completed["usage"] == sim_usage(upstream, start)
        assert completed["usage"]["input_tokens"] == 10  # one item read: every task starts empty
        assert upstream.item_ids == []
    await client.send({"type": "session.usage", "event_id": "u"})
    result = await client.until("session.usage.result")
    assert result["usage"]["responses"] == 0
    assert result["connection_usage"] == sim_usage(upstream)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{stack.proxy.port}/metrics") as r:
        body = await r.text()
    assert "realtime_proxy_task_input_tokens_count 3.0" in body  # one proxy per test: these are this test's
    assert "realtime_proxy_task_input_tokens_sum 30.0" in body


async def test_a_policy_set_per_connection_caps_input_tokens(make_stack: StackFactory) -> None:
    """session.reset.policy max_input_tokens: no reset while responses read at most the cap, one when one reads
    more; the completed sums the whole task as the simulator counted it."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await client.send({"type": "session.reset.policy", "event_id": "p", "max_input_tokens": 40})
    reply = await client.until("session.reset.policy.updated")
    assert reply["policy"] == {"after": "never", "to": "empty", "max_input_tokens": 40, "max_items": 0}
    for n in range(2):  # read 10, then 30 input tokens: within the cap
        await turn(client, f"part {n}")
    assert len(upstream.item_ids) == 4
    await turn(client, "part 2")  # reads 50
    completed = await client.until("session.reset.completed")
    assert completed["auto_reason"] == "max_input_tokens"
    assert completed["usage"] == sim_usage(upstream) and completed["usage"]["input_tokens"] == 90
    assert upstream.item_ids == []


async def test_max_items_keeps_a_sliding_window_after_the_checkpoint(make_stack: StackFactory) -> None:
    """max_items: the checkpoint stays, the oldest items beyond the window go, one completed per trim."""
    stack = await make_stack(reset={"max_items": 4})
    client, upstream = await stack.client()
    await client.send(item_event("instructions"))
    await client.until("conversation.item.added")
    await client.send({"type": "session.checkpoint"})
    await client.until("session.checkpoint.created")
    system = upstream.item_ids[0]
    windows, trims = [], []
    for n in range(4):
        before = list(upstream.item_ids)
        await turn(client, f"line {n}")
        if n > 0:  # from the second turn on the window overflows: one trim per response
            completed = await client.until("session.reset.completed")
            assert completed["auto_reason"] == "max_items" and completed["kept_item_ids"][0] == system
            trims.append(completed["deleted_item_ids"])
            assert completed["deleted_item_ids"] == before[1 : 1 + len(completed["deleted_item_ids"])]  # the oldest
        windows.append(len(upstream.item_ids))
        assert upstream.item_ids[0] == system
    assert windows == [3, 4, 4, 4]
    assert [len(t) for t in trims] == [1, 2, 2]


async def test_a_response_cancelled_by_a_client_reset_under_a_policy_ends_one_task(make_stack: StackFactory) -> None:
    """Policy after = "response", a response streaming, the client's own reset cancels it: one completed, the
    client's, counting the cancelled response as the simulator reported it; no auto-reset follows."""
    # Slow deltas (a second per response): the reset surely lands while the response streams, however busy the box.
    stack = await make_stack(sim=SimulatorConfig(delta_count=20, delta_interval_s=0.05), reset={"after": "response"})
    client, upstream = await stack.client()
    await client.send(item_event("long task"))
    await client.send({"type": "response.create"})
    await client.until("response.output_text.delta")
    await client.send({"type": "session.reset", "event_id": "mine"})
    completed = await client.until("session.reset.completed")
    assert completed["reset_event_id"] == "mine" and completed["auto"] is False
    assert completed["response_cancelled"] is True
    (done,) = [e for e in client.events if e["type"] == "response.done"]
    assert done["response"]["status"] == "cancelled"
    assert completed["usage"] == sim_usage(upstream)
    await client.send({"type": "session.usage"})
    await client.until("session.usage.result")
    assert client.types().count("session.reset.completed") == 1
    assert upstream.item_ids == []


async def test_a_client_reset_racing_the_policys_own_ends_every_task_once(make_stack: StackFactory) -> None:
    """The client sends session.reset while its response is about to end, at varying moments: whichever reset
    runs first, each response is counted in exactly one completed, the client's reset is answered once, and
    the simulator ends up empty."""
    # 20 ms between deltas: a reset sent before the first surely beats the response's end; one sent on the last
    # delta surely comes after the done, which follows that delta at once.
    stack = await make_stack(sim=SimulatorConfig(delta_interval_s=0.02), reset={"after": "response"})
    orders = set()
    for deltas in range(6):
        client, upstream = await stack.client()
        await client.send(item_event("race"))
        await client.send({"type": "response.create"})
        for _ in range(deltas):
            await client.until("response.output_text.delta")
        await client.send({"type": "session.reset", "event_id": "mine"})
        await client.until(lambda e: e.get("type") == "session.reset.completed" and e["reset_event_id"] == "mine")
        await client.send({"type": "session.usage"})
        await client.until("session.usage.result")
        completed = [e for e in client.events if e["type"] == "session.reset.completed"]
        assert [e["reset_event_id"] for e in completed if not e["auto"]] == ["mine"]
        assert len(completed) in (1, 2)  # the policy's reset ran first, or the client's swallowed the done
        orders.add(len(completed))
        assert sum(e["usage"]["responses"] for e in completed) == 1 == sent_count(upstream, "response.done")
        assert sum(e["usage"]["input_tokens"] for e in completed) == sim_usage(upstream)["input_tokens"]
        assert upstream.item_ids == []
        await client.ws.close()
    assert orders == {1, 2}  # reset sent before the first delta: the client's wins; after the last: the policy's


# --- the observer example ---------------------------------------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("observer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


async def test_the_observer_example_labels_each_turn_from_its_checkpoint(make_stack: StackFactory) -> None:
    """The observer's every turn starts from its examples: auto-reset to the checkpoint, flat tokens that are the
    simulator's own counts, and at the end the simulator holds only the examples."""
    observer: Any = load_example()
    stack = await make_stack()
    lines: list[str] = []
    turns = await observer.run_observer(f"ws://127.0.0.1:{stack.proxy.port}", turns=4, out=lines.append)
    main, watcher = stack.sim.sessions
    assert [t.turn for t in turns] == [1, 2, 3, 4] and all(t.auto for t in turns)
    examples = 2 * len(observer.FEW_SHOT)
    assert all(t.kept == examples and t.deleted == 3 for t in turns)  # the turn's text, its audio, the answer
    assert len(watcher.item_ids) == examples
    # Each turn's usage is what the simulator reported for the observer's response of that turn.
    dones = [e["response"]["usage"] for e in watcher.sent if e["type"] == "response.done"]
    assert [t.usage["input_tokens"] for t in turns] == [u["input_tokens"] for u in dones] == [60] * 4
    assert [t.usage["output_tokens"] for t in turns] == [u["output_tokens"] for u in dones]
    # The main conversation was never reset: what its responses read grows.
    assert [t.main_input_tokens for t in turns] == [10, 30, 50, 70]
    assert len(main.item_ids) == 8
    # The observer got the assistant's audio as input audio.
    appended = [e for e in watcher.received if e["type"] == "input_audio_buffer.append"]
    assert len(appended) == 4 * stack.sim.config.delta_count
    assert lines[-1].startswith("main conversation per turn: 10, 30, 50, 70")


async def test_the_observer_example_runs_as_one_command() -> None:
    """`python examples/observer.py` (what `make observer` runs): starts its own simulator and proxy, no key."""
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(EXAMPLE), "--turns", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in out if line.startswith("turn ")] == ["turn 1", "turn 2"]
    assert out[-2] == "observer input tokens per turn: 60, 60 (flat: every turn starts from the examples alone)"
    assert proc.stderr == ""
