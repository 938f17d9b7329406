"""Reset by swap and rollover over real sockets: client → proxy → simulator, checked against the simulator."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from proxy.core.swap import SpareState
from proxy.relay import Relay
from proxy.simulator import SimSession, SimulatorConfig
from proxy.wire import WireRelay
from tests.e2e.conftest import Client, Stack, StackFactory, item_event
from tests.e2e.probes import live_objects, relays, settled, wait_for

UPDATE = {"type": "session.update", "session": {"type": "realtime", "instructions": "answer in French"}}
# Fields that differ between any two sessions, however configured.
_OWN = {"id", "expires_at"}


def the_relay() -> Relay | WireRelay:
    (relay,) = relays()
    return relay


async def spare_ready() -> None:
    def ready() -> bool:
        swapper = the_relay().swapper
        return swapper is not None and swapper.spare is not None and swapper.spare.ready

    await wait_for(ready, "a ready spare")


def config_of(session: SimSession) -> dict[str, Any]:
    return {k: v for k, v in session.session.items() if k not in _OWN}


async def configured_client(stack: Stack) -> tuple[Client, SimSession]:
    client, upstream = await stack.client()
    await client.send(UPDATE)
    await client.until("session.updated")
    return client, upstream


async def test_swap_with_1000_items_moves_the_client_to_the_configured_spare(make_stack: StackFactory) -> None:
    """The reset sends nothing upstream: completed says swap, names the new session and all 1,000 old items; the
    old upstream is closed with 1000; the new conversation is empty and configured like the old one."""
    stack = await make_stack(reset={"strategy": "swap"})
    client, old = await configured_client(stack)
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    ids = [old.add_item({"type": "message", "role": "user", "content": []})["id"] for _ in range(1000)]
    await client.until(lambda e: e["type"] == "conversation.item.done" and e["item"]["id"] == ids[-1])
    received_before = len(old.received)

    await client.send({"type": "session.reset", "event_id": "r1"})
    done = await client.until("session.reset.completed")

    assert done["strategy"] == "swap" and done["reset_event_id"] == "r1"
    assert done["upstream_session_id"] == spare.id
    assert done["deleted_item_ids"] == ids and done["kept_item_ids"] == [] and done["failed_item_ids"] == []
    assert len(old.received) == received_before  # not one upstream command
    await old.wait_until(lambda s: s.closed)
    assert old.close_code == 1000
    assert spare.item_ids == [] and config_of(spare) == config_of(old)
    assert config_of(spare)["instructions"] == "answer in French"
    # The spare's own session.created and session.updated never reached the client.
    assert client.types().count("session.created") == 1 and client.types().count("session.updated") == 1
    assert not client.ws.close_code
    third = await stack.sim.wait_for_sessions(3)  # the next spare, at once
    await third.wait_until(lambda s: [e["type"] for e in s.received] == ["session.update"])
    await client.ws.close()
    await settled(stack.proxy)  # the spare closed with the connection: no socket, no task left
    assert all(s.closed for s in stack.sim.sessions) and live_objects() == (0, 0, 0)


async def test_events_right_after_a_swap_reach_only_the_new_upstream_in_order(make_stack: StackFactory) -> None:
    """Creates sent behind the reset without waiting go to the new session, in order, and never to the old one."""
    stack = await make_stack(reset={"strategy": "swap"})
    client, old = await stack.client()
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    await client.send(item_event("old"))
    await client.until("conversation.item.added")
    await client.send({"type": "session.reset"})
    for i in range(3):
        await client.send(item_event(f"new {i}", f"new_{i}"))
    done = await client.until("session.reset.completed")
    await client.until(lambda e: e["type"] == "conversation.item.added" and e["item"]["id"] == "new_2")
    assert spare.item_ids == ["new_0", "new_1", "new_2"]
    assert [e["item"]["id"] for e in client.events if e["type"] == "conversation.item.added"][1:] == spare.item_ids
    assert not any(e.get("item", {}).get("id", "").startswith("new_") for e in old.received)
    assert done["strategy"] == "swap"


async def test_a_session_update_is_mirrored_to_the_spare(make_stack: StackFactory) -> None:
    """An update sent after the spare was configured reaches it too; the swapped-to session has both updates."""
    stack = await make_stack(reset={"strategy": "swap"})
    client, old = await configured_client(stack)
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    await client.send({"type": "session.update", "session": {"type": "realtime", "instructions": "be brief"}})
    await client.until("session.updated")
    await spare_ready()
    await client.send({"type": "session.reset"})
    await client.until("session.reset.completed")
    assert [e["session"]["instructions"] for e in spare.received] == ["answer in French", "be brief"]
    assert config_of(spare) == config_of(old)
    assert client.types().count("session.updated") == 2


async def test_without_a_ready_spare_the_reset_deletes_at_once(make_stack: StackFactory) -> None:
    """Under the delete strategy a reset asking for a swap finds no spare: deletes, "strategy": "delete"; the next
    reset that asks swaps to the spare dialed meanwhile."""
    stack = await make_stack()
    client, old = await stack.client()
    await client.send(item_event("x"))
    await client.until("conversation.item.added")
    await client.send({"type": "session.reset", "strategy": "swap"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "delete" and old.item_ids == []
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    await client.send({"type": "session.reset", "strategy": "swap"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "swap" and done["upstream_session_id"] == spare.id


async def test_a_spare_that_cannot_be_dialed_leaves_resets_to_deletes(make_stack: StackFactory) -> None:
    """Every spare dial is refused (HTTP 429): a few tries, then none; the client's connection is unaffected and
    its resets delete."""
    stack = await make_stack()
    client, upstream = await stack.client()
    stack.sim.config.refuse_status = 429  # from now on: the client's own upstream is already open
    await client.send({"type": "session.reset", "strategy": "swap"})
    assert (await client.until("session.reset.completed"))["strategy"] == "delete"
    swapper = the_relay().swapper
    assert swapper is not None
    await wait_for(lambda: swapper.spare_state is SpareState.ABSENT and not swapper.actions, "the dials to give up")
    await client.send(item_event("x"))
    await client.until("conversation.item.added")
    await client.send({"type": "session.reset", "strategy": "swap"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "delete" and len(done["deleted_item_ids"]) == 1
    assert upstream.item_ids == [] and len(stack.sim.sessions) == 1 and not upstream.closed


async def test_a_spare_that_refuses_the_replay_is_replaced(make_stack: StackFactory) -> None:
    """The spare answers with an error: it is closed and another is dialed and configured; the swap uses that one."""
    stack = await make_stack(reset={"strategy": "swap"})
    client, _ = await configured_client(stack)
    refusing = await stack.sim.wait_for_sessions(2)
    await refusing.send_event({"type": "error", "error": {"type": "invalid_request_error", "message": "no"}})
    await refusing.wait_until(lambda s: s.closed)
    replacement = await stack.sim.wait_for_sessions(3)
    await spare_ready()
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "swap" and done["upstream_session_id"] == replacement.id
    assert [e["type"] for e in client.events].count("error") == 0


async def test_the_client_outlives_three_upstream_caps(make_stack: StackFactory) -> None:
    """Sessions capped at 0.8 s: the client's socket stays open through three caps (rollover while idle, resets in
    between), sees no error, and each new upstream carries the client's configuration."""
    stack = await make_stack(sim=SimulatorConfig(delta_interval_s=0.002, session_max_s=0.8))
    client, first = await configured_client(stack)
    for n in range(2, 5):
        await client.send(item_event(f"task {n}"))
        await client.until("conversation.item.added")
        await client.send({"type": "session.reset"})
        assert (await client.until("session.reset.completed"))["strategy"] == "delete"
        upstream = await stack.sim.wait_for_sessions(n, timeout=5.0)  # the cap: a rollover to a fresh session
        await upstream.wait_until(lambda s: len(s.received) == 1)
        assert upstream.received[0]["session"] == UPDATE["session"]
    await client.send(item_event("after three caps", "last"))
    await client.until(lambda e: e["type"] == "conversation.item.added" and e["item"]["id"] == "last")
    latest = stack.sim.sessions[-1]
    assert latest.item_ids == ["last"] and config_of(latest) == config_of(first)
    assert "error" not in client.types() and client.types().count("session.created") == 1
    assert all(s.closed for s in stack.sim.sessions[:3])


async def test_swap_cancels_a_running_response_and_nothing_of_the_old_one_follows(make_stack: StackFactory) -> None:
    """A streaming response is cancelled on the old upstream, its done reaches the client before completed, and no
    event of the old upstream reaches the client after it."""
    stack = await make_stack(sim=SimulatorConfig(delta_count=200, delta_interval_s=0.005), reset={"strategy": "swap"})
    client, old = await stack.client()
    await stack.sim.wait_for_sessions(2)
    await spare_ready()
    await client.send({"type": "response.create"})
    await client.until("response.output_text.delta")
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "swap" and done["response_cancelled"] is True and len(done["deleted_item_ids"]) == 1
    response_done = next(e for e in client.events if e["type"] == "response.done")
    assert response_done["response"]["status"] == "cancelled"
    assert [e["type"] for e in old.received] == ["response.create", "response.cancel"]
    await old.wait_until(lambda s: s.closed)
    await client.send(item_event("next", "next"))
    await client.until(lambda e: e["type"] == "conversation.item.added")
    after = client.events[client.events.index(done) + 1 :]
    assert [e["type"] for e in after] == ["conversation.item.added"]


async def test_session_expiring_then_a_reset_past_the_cap_swaps_even_under_delete(make_stack: StackFactory) -> None:
    """At max_session_seconds the client is told session.expiring; its next full reset dials a fresh upstream and
    swaps to it, unseen but for completed."""
    stack = await make_stack(upstream={"max_session_seconds": 0.3, "warn_before_seconds": 0.0})
    client, old = await configured_client(stack)
    await client.send(item_event("x"))
    await client.until("conversation.item.added")
    expiring = await client.until("session.expiring")
    assert expiring["expires_in_seconds"] == 0 and expiring["upstream_session_id"] == old.id
    assert len(stack.sim.sessions) == 1  # no spare under the delete strategy
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    fresh = stack.sim.sessions[1]
    assert done["strategy"] == "swap" and done["upstream_session_id"] == fresh.id
    assert config_of(fresh) == config_of(old) and fresh.item_ids == []
    assert client.types().count("session.created") == 1


async def test_a_cap_without_an_error_rolls_over_too(make_stack: StackFactory) -> None:
    """The upstream closes with 1001 and no session_expired first: an idle empty session still rolls over."""
    stack = await make_stack(sim=SimulatorConfig(session_max_s=0.3, session_expired_error=False))
    client, first = await configured_client(stack)
    second = await stack.sim.wait_for_sessions(2)
    await first.wait_until(lambda s: s.closed)
    assert first.close_code == 1001
    await client.send(item_event("still here", "here"))
    await client.until(lambda e: e["type"] == "conversation.item.added")
    assert second.item_ids == ["here"] and config_of(second) == config_of(first)
    assert client.types() == ["session.created", "session.updated", "conversation.item.added"]  # no error, no close


async def test_spares_of_an_injected_key_and_azure_are_dialed_like_the_first(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure's preview URL with a pinned deployment and an injected api-key: the spare gets the same URL and the
    key, never the client's own credential, and the swap works."""
    monkeypatch.setenv("RRP_SWAP_KEY", "sk-injected")
    stack = await make_stack(
        sim=SimulatorConfig(api_key="sk-injected", delta_interval_s=0.002),
        url_suffix="?api-version=2024-10-01-preview&deployment=dep",
        upstream={"api_key_env": "RRP_SWAP_KEY", "auth": "api-key"},
        reset={"strategy": "swap"},
    )
    client, first = await stack.client(query="", additional_headers={"api-key": "client-own"})
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    assert spare.query == first.query == {"api-version": "2024-10-01-preview", "deployment": "dep"}
    assert spare.headers["api-key"] == first.headers["api-key"] == "sk-injected"
    assert "client-own" not in str(spare.headers)
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "swap" and done["upstream_session_id"] == spare.id


async def test_a_rollover_that_finds_no_upstream_passes_the_close_through(make_stack: StackFactory) -> None:
    """The cap comes while every dial is refused: after a few tries the client gets the upstream's 1001 and reason."""
    stack = await make_stack(sim=SimulatorConfig(session_max_s=0.3, session_expired_error=False))
    client, first = await stack.client()
    stack.sim.config.refuse_status = 429
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, first.model.close_request[1])
    assert client.types() == ["session.created"] and len(stack.sim.sessions) == 1
    # (Not `settled`: the refused dials' HTTP connections stay in aiohttp's keep-alive pool, a task each.)
    await wait_for(lambda: not stack.proxy.state.sockets and not relays(), "the connection to end")


async def test_a_beta_client_swaps_to_a_beta_spare(make_stack: StackFactory) -> None:
    """The OpenAI-Beta header is part of the dial: the spare speaks beta too, and the swap moves the client to it."""
    stack = await make_stack(reset={"strategy": "swap"})
    client, old = await stack.client(additional_headers={"OpenAI-Beta": "realtime=v1"})
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    assert old.generation == spare.generation == "beta"
    await client.send(item_event("x"))
    item_id = (await client.until("conversation.item.created"))["item"]["id"]
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "swap" and done["deleted_item_ids"] == [item_id] and spare.item_ids == []
