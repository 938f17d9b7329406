"""session.reset end to end: client → proxy → simulator over loopback, checked against the simulator's conversation."""

from __future__ import annotations

import base64

import pytest

from proxy.simulator import SimulatorConfig
from tests.e2e.conftest import INTERNAL, Client, StackFactory, item_event

AUDIO = base64.b64encode(b"\x01\x00" * 4800).decode()  # 200 ms of 24 kHz pcm16


async def add_text_items(client: Client, n: int, created: str = "conversation.item.added") -> list[str]:
    ids = []
    for i in range(n):
        await client.send(item_event(f"text {i}"))
        ids.append((await client.until(created))["item"]["id"])
    return ids


async def reset(client: Client, **fields: object) -> dict[str, object]:
    await client.send({"type": "session.reset", **fields})
    return await client.until("session.reset.completed")


@pytest.mark.parametrize("generation", ["ga", "beta"])
async def test_reset_wipes_text_and_committed_audio_items(make_stack: StackFactory, generation: str) -> None:
    """Text items and committed audio are deleted upstream; the client gets one completed and no internal acks."""
    stack = await make_stack()
    headers = {"OpenAI-Beta": "realtime=v1"} if generation == "beta" else {}
    client, upstream = await stack.client(additional_headers=headers)
    assert upstream.generation == generation
    created = "conversation.item.created" if generation == "beta" else "conversation.item.added"
    ids = await add_text_items(client, 2, created)
    await client.send({"type": "input_audio_buffer.append", "audio": AUDIO})
    await client.send({"type": "input_audio_buffer.commit"})
    audio_id = (await client.until("input_audio_buffer.committed"))["item_id"]
    await client.until(lambda e: e["type"] == created and e["item"]["id"] == audio_id)
    assert upstream.item_ids == [*ids, audio_id]

    done = await reset(client, event_id="r1")

    assert upstream.item_ids == []
    assert done["reset_event_id"] == "r1"
    assert done["deleted_item_ids"] == [*ids, audio_id]
    assert done["kept_item_ids"] == [] and done["response_cancelled"] is False
    assert not INTERNAL & set(client.types())
    assert client.types().count("session.reset.completed") == 1
    sent_types = [e["type"] for e in upstream.received]
    assert "session.reset" not in sent_types
    assert sent_types[-4:] == ["input_audio_buffer.clear"] + ["conversation.item.delete"] * 3


async def test_reset_during_streaming_response_cancels_it_first(make_stack: StackFactory) -> None:
    """A response streaming when the reset arrives is cancelled, its done forwarded, and its item deleted."""
    stack = await make_stack(sim=SimulatorConfig(delta_count=50, delta_interval_s=0.01))
    client, upstream = await stack.client()
    await add_text_items(client, 1)
    await client.send({"type": "response.create"})
    await client.until("response.output_text.delta")
    done = await reset(client)
    assert done["response_cancelled"] is True
    response_done = next(e for e in client.events if e["type"] == "response.done")
    assert response_done["response"]["status"] == "cancelled"
    assert client.types().index("response.done") < client.types().index("session.reset.completed")
    assert upstream.item_ids == []
    assert len(done["deleted_item_ids"]) == 2  # the user's item and the partial assistant item
    received = [e["type"] for e in upstream.received]
    assert received.index("response.cancel") < received.index("conversation.item.delete")


async def test_reset_right_after_response_create_waits_for_it(make_stack: StackFactory) -> None:
    """A reset sent right behind response.create (not started yet) still stops that response and deletes its item."""
    stack = await make_stack(sim=SimulatorConfig(delta_count=20, delta_interval_s=0.01, one_way_delay_s=0.01))
    client, upstream = await stack.client()
    await client.send({"type": "response.create"})
    done = await reset(client)
    assert upstream.item_ids == []
    assert upstream.active_response_ids == []
    assert done["response_cancelled"] is True


async def test_items_the_upstream_adds_mid_reset_are_deleted(make_stack: StackFactory) -> None:
    """A server-VAD turn (item + response) that reaches the proxy during the reset is cancelled and deleted."""
    stack = await make_stack(sim=SimulatorConfig(one_way_delay_s=0.02, delta_count=20, delta_interval_s=0.01))
    client, upstream = await stack.client()
    await add_text_items(client, 1)
    vad_item = await upstream.vad_commit(create_response=True)  # its events are 20 ms away from the proxy
    done = await reset(client)
    assert upstream.item_ids == []
    assert vad_item in done["deleted_item_ids"]
    assert done["response_cancelled"] is True


async def test_events_sent_right_after_the_reset_go_after_the_deletes_in_order(make_stack: StackFactory) -> None:
    """Events the client sends behind a reset reach the upstream after its deletes, all of them, in order."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await add_text_items(client, 3)
    await client.send({"type": "session.reset", "event_id": "r"})
    for i in range(5):
        await client.send(item_event(f"after {i}", item_id=f"after_{i}"))
    await client.until("session.reset.completed")
    await upstream.wait_until(lambda s: len(s.items) == 5)
    assert upstream.item_ids == [f"after_{i}" for i in range(5)]
    received = [(e["type"], e.get("item_id") or e.get("item", {}).get("id")) for e in upstream.received]
    last_delete = max(i for i, (t, _) in enumerate(received) if t == "conversation.item.delete")
    creates_after = [item for t, item in received[last_delete:] if t == "conversation.item.create"]
    assert creates_after == [f"after_{i}" for i in range(5)]


async def test_keep_item_ids_and_checkpoint(make_stack: StackFactory) -> None:
    """keep_item_ids survive a reset; a reset to a checkpoint keeps the checkpoint's items."""
    stack = await make_stack()
    client, upstream = await stack.client()
    system = await add_text_items(client, 2)
    await client.send({"type": "session.checkpoint", "event_id": "cp"})
    checkpoint = await client.until("session.checkpoint.created")
    assert checkpoint["item_ids"] == system and checkpoint["checkpoint_event_id"] == "cp"
    task = await add_text_items(client, 3)
    done = await reset(client, to="checkpoint")
    assert upstream.item_ids == system
    assert done["deleted_item_ids"] == task and done["kept_item_ids"] == system
    more = await add_text_items(client, 2)
    done = await reset(client, keep_item_ids=[more[1]])
    assert upstream.item_ids == [more[1]]
    assert done["deleted_item_ids"] == [*system, more[0]]


async def test_unknown_item_error_with_null_event_id_completes(make_stack: StackFactory) -> None:
    """An item the upstream no longer has draws an error with event_id null; the reset still completes cleanly."""
    stack = await make_stack(sim=SimulatorConfig(null_error_event_ids=True))
    client, upstream = await stack.client()
    real = await add_text_items(client, 1)
    # An item event the simulator does not back: the proxy tracks "ghost", the upstream has never heard of it.
    await upstream.send_event(
        {"type": "conversation.item.added", "item": {"id": "ghost", "type": "message"}, "previous_item_id": real[0]}
    )
    await client.until(lambda e: e.get("item", {}).get("id") == "ghost")
    done = await reset(client)
    assert done["deleted_item_ids"] == real and done["failed_item_ids"] == []
    assert "error" not in client.types()
    errors = [e for e in upstream.sent if e["type"] == "error"]
    assert errors and errors[0]["error"]["event_id"] is None and "ghost" in errors[0]["error"]["message"]
    assert upstream.item_ids == []


async def test_reset_timeout_reports_and_releases_held_events(make_stack: StackFactory) -> None:
    """With acks stalled, the reset ends in session_reset_timeout and the held events then reach the upstream."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 0.3})
    client, upstream = await stack.client()
    await add_text_items(client, 1)
    await client.send({"type": "session.reset", "event_id": "slow"})
    await client.send(item_event("held", item_id="held_1"))
    error = await client.until("error")
    assert error["error"]["code"] == "session_reset_timeout"
    assert error["error"]["type"] == "proxy_error" and error["error"]["event_id"] == "slow"
    await upstream.wait_until(lambda s: "held_1" in s.item_ids)
    assert "session.reset.completed" not in client.types()


@pytest.mark.parametrize(
    ("event", "param"),
    [
        ({"type": "session.reset", "event_id": "bad1", "to": "nowhere"}, "to"),
        ({"type": "session.reset", "event_id": "bad2", "keep_item_ids": "item_1"}, "keep_item_ids"),
        ({"type": "conversation.delete.all", "event_id": "bad3", "to": "checkpoint"}, "to"),
        ({"type": "session.checkpoint", "event_id": "bad4", "x": 1}, "x"),
    ],
)
async def test_malformed_reset_is_an_error_naming_param_and_event_id(
    make_stack: StackFactory, event: dict[str, object], param: str
) -> None:
    """A malformed synthetic event gets invalid_session_reset naming the param and event id; nothing goes upstream."""
    stack = await make_stack()
    client, upstream = await stack.client()
    ids = await add_text_items(client, 1)
    await client.send(event)
    error = await client.until("error")
    assert error["error"]["code"] == "invalid_session_reset"
    assert error["error"]["param"] == param and error["error"]["event_id"] == event["event_id"]
    await client.send({"type": "conversation.item.retrieve", "item_id": ids[0]})
    await client.until("conversation.item.retrieved")  # the connection still works, and in order
    assert [e["type"] for e in upstream.received] == ["conversation.item.create", "conversation.item.retrieve"]
    assert upstream.item_ids == ids


async def test_alias_and_two_resets_back_to_back(make_stack: StackFactory) -> None:
    """conversation.delete.all works like session.reset, and a second reset sent during the first runs after it."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await add_text_items(client, 2)
    await client.send({"type": "conversation.delete.all", "event_id": "a"})
    await client.send(item_event("between", item_id="between"))
    await client.send({"type": "session.reset", "event_id": "b"})
    first = await client.until("session.reset.completed")
    second = await client.until("session.reset.completed")
    assert (first["reset_event_id"], second["reset_event_id"]) == ("a", "b")
    assert second["deleted_item_ids"] == ["between"]
    assert upstream.item_ids == []
