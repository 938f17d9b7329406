"""Tests of the Realtime server simulator over real sockets, driven by the `websockets` client."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from proxy.simulator import SimSession, Simulator, SimulatorConfig

SimFactory = Callable[..., Awaitable[Simulator]]
FAST = {"delta_interval_s": 0.0}


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    sims: list[Simulator] = []

    async def factory(**kwargs: Any) -> Simulator:
        sim = Simulator(SimulatorConfig(**kwargs))
        await sim.start()
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        await sim.stop()


def model_url(sim: Simulator) -> str:
    return sim.url + "?model=gpt-realtime"


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5.0):
        data = await ws.recv()
    event: dict[str, Any] = orjson.loads(data)
    return event


async def recv_until(ws: ClientConnection, etype: str) -> list[dict[str, Any]]:
    """Every event up to and including the first of type `etype`."""
    events: list[dict[str, Any]] = []
    while True:
        event = await recv(ws)
        events.append(event)
        if event["type"] == etype:
            return events


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(event).decode())


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def user_text(ws: ClientConnection, text: str, **extra: Any) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await send(ws, {"type": "conversation.item.create", "item": {**item, **extra.pop("item", {})}, **extra})


async def test_ga_event_names(make_sim: SimFactory) -> None:
    """Without the beta header the sim speaks GA: item.added/done and response.output_text.* names."""
    sim = await make_sim(delta_count=2, **FAST)
    async with connect(model_url(sim)) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created"
        assert created["session"]["object"] == "realtime.session"
        assert created["session"]["model"] == "gpt-realtime"
        assert created["session"]["id"].startswith("sess_")
        await user_text(ws, "hi")
        added, done = await recv(ws), await recv(ws)
        assert types([added, done]) == ["conversation.item.added", "conversation.item.done"]
        assert added["previous_item_id"] is None
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
    assert types(events) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert sim.sessions[0].generation == "ga"


async def test_beta_event_names_header_and_subprotocol(make_sim: SimFactory) -> None:
    """The OpenAI-Beta header or the beta subprotocol selects beta names; `realtime` is the chosen subprotocol."""
    sim = await make_sim(delta_count=1, **FAST)
    async with connect(model_url(sim), additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        await recv(ws)
        await user_text(ws, "hi")
        assert (await recv(ws))["type"] == "conversation.item.created"
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        assert types(events) == [
            "response.created",
            "response.output_item.added",
            "conversation.item.created",
            "response.content_part.added",
            "response.text.delta",
            "response.text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        ]
    protos = [Subprotocol("realtime"), Subprotocol("openai-beta.realtime-v1")]
    async with connect(model_url(sim), subprotocols=protos) as ws2:
        await recv(ws2)
        assert ws2.subprotocol == "realtime"
    assert [s.generation for s in sim.sessions] == ["beta", "beta"]
    assert sim.sessions[1].subprotocol == "realtime"


async def test_item_create_root_previous_and_unknown_previous(make_sim: SimFactory) -> None:
    """previous_item_id "root" inserts first, an id inserts after it, an unknown id is an error."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await user_text(ws, "a", item={"id": "a"})
        await recv_until(ws, "conversation.item.done")
        await user_text(ws, "b", item={"id": "b"})
        second = await recv_until(ws, "conversation.item.done")
        assert second[0]["previous_item_id"] == "a"
        await user_text(ws, "r", item={"id": "r"}, previous_item_id="root")
        root = await recv_until(ws, "conversation.item.done")
        assert root[0]["previous_item_id"] is None
        await user_text(ws, "m", item={"id": "m"}, previous_item_id="a")
        mid = await recv_until(ws, "conversation.item.done")
        assert mid[0]["previous_item_id"] == "a"
        await user_text(ws, "x", previous_item_id="nope", event_id="evt_client_1")
        err = await recv(ws)
    assert err["type"] == "error"
    assert err["error"]["code"] == "item_create_invalid_previous_item_id"
    assert err["error"]["event_id"] == "evt_client_1"
    assert sim.sessions[0].item_ids == ["r", "a", "m", "b"]


async def test_item_create_id_too_long_or_duplicate(make_sim: SimFactory) -> None:
    """Client item ids over 32 characters and duplicate ids are refused with an error and nothing is added."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await user_text(ws, "a", item={"id": "x" * 33})
        too_long = await recv(ws)
        await user_text(ws, "a", item={"id": "dup"})
        await recv_until(ws, "conversation.item.done")
        await user_text(ws, "a", item={"id": "dup"})
        dup = await recv(ws)
    assert too_long["type"] == "error" and too_long["error"]["param"] == "item.id"
    assert dup["type"] == "error" and "dup" in dup["error"]["message"]
    assert sim.sessions[0].item_ids == ["dup"]


async def test_delete_and_unknown_delete(make_sim: SimFactory) -> None:
    """Delete removes the item with conversation.item.deleted; an unknown id gives the documented error."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await user_text(ws, "a", item={"id": "a"})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "conversation.item.delete", "item_id": "a", "event_id": "c1"})
        deleted = await recv(ws)
        await send(ws, {"type": "conversation.item.delete", "item_id": "a", "event_id": "c2"})
        err = await recv(ws)
    assert deleted["type"] == "conversation.item.deleted"
    assert deleted["item_id"] == "a"
    assert deleted["event_id"].startswith("event_")
    assert err["error"] == {
        "type": "invalid_request_error",
        "code": "item_delete_invalid_item_id",
        "message": "Error deleting item: the item with id 'a' does not exist.",
        "param": "item_id",
        "event_id": "c2",
    }
    assert sim.sessions[0].items == []


async def test_commit_audio_creates_user_item_and_empty_commit_errors(make_sim: SimFactory) -> None:
    """A commit turns appended audio into a user input_audio item; an empty buffer gives commit_empty."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "input_audio_buffer.commit", "event_id": "c0"})
        empty = await recv(ws)
        audio = base64.b64encode(b"\x01\x00" * 2400).decode()
        await send(ws, {"type": "input_audio_buffer.append", "audio": audio})
        await send(ws, {"type": "input_audio_buffer.commit"})
        committed, added, done = await recv(ws), await recv(ws), await recv(ws)
        await send(ws, {"type": "input_audio_buffer.clear"})
        cleared = await recv(ws)
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
    assert empty["error"]["event_id"] == "c0"
    assert types([committed, added, done]) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert committed["previous_item_id"] is None
    assert committed["item_id"] == added["item"]["id"]
    assert added["item"]["role"] == "user"
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    assert cleared["type"] == "input_audio_buffer.cleared"
    assert sim.sessions[0].item_ids == [committed["item_id"]]


async def test_response_streams_in_order_and_updates_conversation(make_sim: SimFactory) -> None:
    """Deltas arrive in order, spell the reply, and the assistant item ends up completed in the conversation."""
    sim = await make_sim(delta_count=5, delta_interval_s=0.001)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await user_text(ws, "hello", item={"id": "u1"})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create", "response": {"metadata": {"k": "v"}}})
        events = await recv_until(ws, "response.done")
    created = events[0]["response"]
    assert created["status"] == "in_progress"
    assert created["conversation_id"].startswith("conv_")
    assert created["id"].startswith("resp_")
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 5
    assert "".join(deltas) == "Reply 1 to hello"
    added = next(e for e in events if e["type"] == "conversation.item.added")
    assert added["previous_item_id"] == "u1"
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["metadata"] == {"k": "v"}
    assert done["output"][0]["id"] == added["item"]["id"]
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert set(usage["input_token_details"]) == {"cached_tokens", "text_tokens", "audio_tokens"}
    session = sim.sessions[0]
    assert session.item_ids == ["u1", added["item"]["id"]]
    assert session.items[1]["status"] == "completed"
    assert session.items[1]["content"] == [{"type": "output_text", "text": "Reply 1 to hello"}]
    assert session.active_response_id is None
    assert [e["type"] for e in session.sent][-len(events) :] == types(events)


async def test_audio_response_uses_audio_events(make_sim: SimFactory) -> None:
    """A response with audio output streams audio and transcript deltas (GA names)."""
    sim = await make_sim(delta_count=2, **FAST)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create", "response": {"output_modalities": ["audio"]}})
        events = await recv_until(ws, "response.done")
    assert types(events).count("response.output_audio.delta") == 2
    assert types(events).count("response.output_audio_transcript.delta") == 2
    done = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
    assert done["transcript"] == "Reply 1"
    assert sim.sessions[0].items[0]["content"] == [{"type": "output_audio", "transcript": "Reply 1"}]


async def test_second_conversation_response_is_refused(make_sim: SimFactory) -> None:
    """A second in-conversation response.create while one streams gets conversation_already_has_active_response."""
    sim = await make_sim(delta_count=100, delta_interval_s=0.01)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_text.delta")
        await send(ws, {"type": "response.create", "event_id": "second"})
        while (err := await recv(ws))["type"] != "error":
            pass
        await send(ws, {"type": "response.cancel"})
        await recv_until(ws, "response.done")
    assert err["error"]["code"] == "conversation_already_has_active_response"
    assert err["error"]["event_id"] == "second"


async def test_cancel_mid_response_keeps_partial_item(make_sim: SimFactory) -> None:
    """Cancelling mid-stream ends with response.done status cancelled; the partial item stays, incomplete."""
    sim = await make_sim(delta_count=200, delta_interval_s=0.01)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        before = await recv_until(ws, "response.output_text.delta")
        resp_id = before[0]["response"]["id"]
        await send(ws, {"type": "response.cancel", "response_id": resp_id})
        after = await recv_until(ws, "response.done")
        session = sim.sessions[0]
        await session.wait_until(lambda s: s.active_response_id is None)
    done = after[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    n_deltas = types(before + after).count("response.output_text.delta")
    assert 1 <= n_deltas < 200
    assert len(session.items) == 1
    assert session.items[0]["id"] == done["output"][0]["id"]
    assert session.items[0]["status"] == "incomplete"
    # Nothing of the cancelled response is sent after its response.done.
    assert session.sent[-1]["type"] == "response.done"


async def test_cancel_without_active_response_errors(make_sim: SimFactory) -> None:
    """response.cancel with nothing active, or an unknown response_id, gives response_cancel_not_active."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.cancel", "event_id": "c1"})
        err1 = await recv(ws)
        await send(ws, {"type": "response.cancel", "response_id": "resp_nope"})
        err2 = await recv(ws)
    assert err1["error"]["code"] == "response_cancel_not_active"
    assert err1["error"]["event_id"] == "c1"
    assert err2["error"]["code"] == "response_cancel_not_active"
    assert "resp_nope" in err2["error"]["message"]


async def test_out_of_band_response_adds_nothing(make_sim: SimFactory) -> None:
    """An out-of-band response (conversation none) has conversation_id null and leaves the conversation as is."""
    sim = await make_sim(delta_count=3, **FAST)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await user_text(ws, "q", item={"id": "q"})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create", "response": {"conversation": "none", "metadata": {"a": 1}}})
        events = await recv_until(ws, "response.done")
    assert events[0]["response"]["conversation_id"] is None
    assert "conversation.item.added" not in types(events)
    assert "conversation.item.done" not in types(events)
    assert events[-1]["response"]["status"] == "completed"
    assert sim.sessions[0].item_ids == ["q"]


async def test_out_of_band_runs_alongside_conversation_response(make_sim: SimFactory) -> None:
    """An out-of-band response may start while a conversation response is active."""
    sim = await make_sim(delta_count=3, delta_interval_s=0.002)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await send(ws, {"type": "response.create", "response": {"conversation": "none"}})
        events = await recv_until(ws, "response.done")
        while types(events).count("response.done") < 2:
            events += await recv_until(ws, "response.done")
        session = await sim.wait_for_sessions(1)
    created = [e["response"] for e in events if e["type"] == "response.created"]
    assert created[0]["conversation_id"] is not None and created[1]["conversation_id"] is None
    assert not any(e["type"] == "error" for e in session.sent)
    statuses = [e["response"]["status"] for e in session.sent if e["type"] == "response.done"]
    assert statuses == ["completed", "completed"]
    assert len(session.items) == 1


async def test_server_vad_auto_commit_and_response(make_sim: SimFactory) -> None:
    """With server VAD, enough appended audio triggers speech_started/stopped, commit, item and a response."""
    sim = await make_sim(server_vad=True, vad_commit_bytes=4800, delta_count=2, **FAST)
    async with connect(model_url(sim)) as ws:
        created = await recv(ws)
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        chunk = base64.b64encode(b"\x00" * 2400).decode()
        await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        events = await recv_until(ws, "response.done")
    assert types(events)[:6] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    item_id = events[0]["item_id"]
    assert events[0]["audio_start_ms"] == 0 and events[1]["audio_end_ms"] == 100
    assert events[2]["item_id"] == item_id == events[3]["item"]["id"]
    session = sim.sessions[0]
    assert session.item_ids[0] == item_id
    assert len(session.items) == 2


async def test_session_update_switches_turn_detection(make_sim: SimFactory) -> None:
    """session.update with turn_detection server_vad enables VAD for that session; null disables it again."""
    sim = await make_sim(vad_commit_bytes=480, delta_count=1, **FAST)
    async with connect(model_url(sim), additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        await recv(ws)
        await send(
            ws,
            {
                "type": "session.update",
                "session": {"turn_detection": {"type": "server_vad", "create_response": False}},
            },
        )
        updated = await recv(ws)
        await send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 480).decode()})
        vad = await recv_until(ws, "conversation.item.created")
        await send(ws, {"type": "session.update", "session": {"turn_detection": None}})
        off = await recv(ws)
    assert updated["type"] == "session.updated"
    assert updated["session"]["turn_detection"]["type"] == "server_vad"
    assert types(vad)[0] == "input_audio_buffer.speech_started"
    assert off["session"]["turn_detection"] is None
    session = sim.sessions[0]
    assert not session.server_vad
    assert session.active_response_id is None and len(session.items) == 1


async def test_forced_vad_commit_helper(make_sim: SimFactory) -> None:
    """SimSession.vad_commit() makes the upstream add a user item on its own, announced to the client."""
    sim = await make_sim(delta_count=1, **FAST)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        session = await sim.wait_for_sessions(1)
        item_id = await session.vad_commit(create_response=False)
        events = await recv_until(ws, "conversation.item.done")
    assert types(events)[0] == "input_audio_buffer.speech_started"
    assert events[0]["item_id"] == item_id
    assert session.item_ids == [item_id]


async def test_null_error_event_ids(make_sim: SimFactory) -> None:
    """With null_error_event_ids the error's inner event_id is null even if the client sent one."""
    sim = await make_sim(null_error_event_ids=True)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "conversation.item.delete", "item_id": "x", "event_id": "mine"})
        err = await recv(ws)
    assert err["error"]["code"] == "item_delete_invalid_item_id"
    assert err["error"]["event_id"] is None
    assert err["event_id"].startswith("event_")


async def test_unknown_event_type_error(make_sim: SimFactory) -> None:
    """An unknown client event type is answered with invalid_value on param type, naming the type."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "session.reset", "event_id": "r1"})
        err = await recv(ws)
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["code"] == "invalid_value"
    assert err["error"]["param"] == "type"
    assert "'session.reset'" in err["error"]["message"]
    assert err["error"]["event_id"] == "r1"


async def test_refuse_status(make_sim: SimFactory) -> None:
    """refuse_status refuses every handshake with that HTTP status and a JSON error body."""
    sim = await make_sim(refuse_status=503)
    with pytest.raises(InvalidStatus) as exc_info:
        async with connect(model_url(sim)):
            pass
    response = exc_info.value.response
    assert response.status_code == 503
    assert "error" in orjson.loads(response.body or b"{}")
    assert sim.sessions == []


async def test_api_key_required(make_sim: SimFactory) -> None:
    """With api_key set, a missing or wrong key is refused with 401; Bearer, api-key and subprotocol pass."""
    sim = await make_sim(api_key="sk-test")
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        with pytest.raises(InvalidStatus) as exc_info:
            async with connect(model_url(sim), additional_headers=headers):
                pass
        assert exc_info.value.response.status_code == 401
        body = orjson.loads(exc_info.value.response.body or b"{}")
        assert body["error"]["type"] == "invalid_request_error"
    async with connect(model_url(sim), additional_headers={"Authorization": "Bearer sk-test"}) as ws:
        assert (await recv(ws))["type"] == "session.created"
    async with connect(model_url(sim), additional_headers={"api-key": "sk-test"}) as ws:
        assert (await recv(ws))["type"] == "session.created"
    protos = [Subprotocol("realtime"), Subprotocol("openai-insecure-api-key.sk-test")]
    async with connect(model_url(sim), subprotocols=protos) as ws:
        assert (await recv(ws))["type"] == "session.created"
    assert len(sim.sessions) == 3


async def test_missing_model_is_400_and_any_path_accepted(make_sim: SimFactory) -> None:
    """A query without model/call_id/deployment gets 400; Azure-style paths with deployment are accepted."""
    sim = await make_sim()
    with pytest.raises(InvalidStatus) as exc_info:
        async with connect(sim.url):
            pass
    assert exc_info.value.response.status_code == 400
    base = f"ws://127.0.0.1:{sim.port}"
    async with connect(f"{base}/openai/realtime?api-version=x&deployment=dep") as ws:
        assert (await recv(ws))["session"]["model"] == "dep"
    async with connect(f"{base}/openai/v1/realtime?call_id=c1") as ws:
        await recv(ws)
    assert [s.path for s in sim.sessions] == ["/openai/realtime", "/openai/v1/realtime"]
    assert sim.sessions[0].query["deployment"] == "dep"


async def test_one_way_delay_keeps_order(make_sim: SimFactory) -> None:
    """one_way_delay_s delays every server event by at least the delay and keeps the sent order."""
    delay = 0.05
    sim = await make_sim(one_way_delay_s=delay, delta_count=10, **FAST)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        t0 = time.monotonic()
        await user_text(ws, "x")
        await recv(ws)
        rtt = time.monotonic() - t0
        assert (await recv(ws))["type"] == "conversation.item.done"
        await send(ws, {"type": "response.create"})
        await send(ws, {"type": "conversation.item.delete", "item_id": "nope"})
        events = await recv_until(ws, "response.done")
        session = sim.sessions[0]
        await session.wait_until(lambda s: len(s.sent) >= 3 + len(events))
    assert rtt >= delay
    received_ids = [e["event_id"] for e in events]
    sent_ids = [e["event_id"] for e in session.sent[3:]]
    assert received_ids == sent_ids
    assert types(events)[0] == "response.created"
    assert "error" in types(events)


async def test_garbage_frames_keep_connection_open(make_sim: SimFactory) -> None:
    """Invalid JSON and binary frames get error events and the session keeps working afterwards."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await ws.send("{not json")
        err1 = await recv(ws)
        await ws.send(b"\x00\x01binary")
        err2 = await recv(ws)
        await user_text(ws, "still here", item={"id": "ok"})
        added = await recv(ws)
    assert err1["type"] == "error" and err1["error"]["code"] == "invalid_json"
    assert err2["type"] == "error" and err2["error"]["type"] == "invalid_request_error"
    assert added["item"]["id"] == "ok"
    assert [e["type"] for e in sim.sessions[0].received] == [
        "<unparsable>",
        "<unparsable>",
        "conversation.item.create",
    ]


async def test_stall_acks_swallows_delete_and_clear(make_sim: SimFactory) -> None:
    """With stall_acks, delete and clear are never answered (and not applied), while other events still are."""
    sim = await make_sim(stall_acks=True)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await user_text(ws, "a", item={"id": "a"})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "conversation.item.delete", "item_id": "a"})
        await send(ws, {"type": "input_audio_buffer.clear"})
        await send(ws, {"type": "conversation.item.retrieve", "item_id": "a"})
        nxt = await recv(ws)
    assert nxt["type"] == "conversation.item.retrieved"
    assert sim.sessions[0].item_ids == ["a"]


async def test_injected_event_raw_frame_and_server_close(make_sim: SimFactory) -> None:
    """send_event/send_raw reach the client in order and close(1011) closes with that code."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        session = await sim.wait_for_sessions(1)
        await session.send_event({"type": "custom.event", "x": 1})
        await session.send_raw("garbage")
        await session.close(1011, "boom")
        injected = await recv(ws)
        async with asyncio.timeout(5):
            raw = await ws.recv()
        with pytest.raises(ConnectionClosed) as exc_info:
            await ws.recv()
    assert injected["type"] == "custom.event" and injected["x"] == 1
    assert raw == "garbage"
    assert exc_info.value.rcvd is not None and exc_info.value.rcvd.code == 1011
    assert session.closed and session.close_code == 1011


async def test_client_disconnect_mid_response(make_sim: SimFactory) -> None:
    """A client vanishing mid-response closes the session and cancels its streaming task."""
    sim = await make_sim(delta_count=1000, delta_interval_s=0.01)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_text.delta")
    session = sim.sessions[0]
    await session.wait_until(lambda s: s.closed)
    assert session.close_code == 1000
    assert session.active_response_id is None
    assert session._timer is None


async def test_stop_leaves_no_tasks() -> None:
    """stop() closes open sessions with 1001 mid-response and leaves no task running."""
    before = asyncio.all_tasks()
    sim = Simulator(SimulatorConfig(delta_count=1000, delta_interval_s=0.01))
    await sim.start()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_text.delta")
        await sim.stop()
        with pytest.raises(ConnectionClosed) as exc_info:
            while True:
                await ws.recv()
    assert exc_info.value.rcvd is not None and exc_info.value.rcvd.code == 1001
    assert sim.sessions[0].closed and sim.sessions[0].close_code == 1001
    await ws.wait_closed()
    leftover = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert leftover == set()


async def test_wait_until_times_out(make_sim: SimFactory) -> None:
    """wait_until raises TimeoutError when the predicate never becomes true."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        session: SimSession = await sim.wait_for_sessions(1)
        with pytest.raises(TimeoutError):
            await session.wait_until(lambda s: len(s.items) > 0, timeout=0.05)


async def test_session_expiry_sends_error_then_closes_1001(make_sim: SimFactory) -> None:
    """With session_max_s the sim sends error session_expired, then closes with 1001."""
    sim = await make_sim(session_max_s=0.05)
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        err = await recv(ws)
        with pytest.raises(ConnectionClosed) as exc_info:
            await ws.recv()
    assert err["error"]["code"] == "session_expired"
    assert exc_info.value.rcvd is not None and exc_info.value.rcvd.code == 1001


async def test_add_item_helper_announces_item(make_sim: SimFactory) -> None:
    """SimSession.add_item inserts an item as the upstream would and announces it with its predecessor."""
    sim = await make_sim()
    async with connect(model_url(sim)) as ws:
        await recv(ws)
        session = await sim.wait_for_sessions(1)
        first = session.add_item({"type": "message", "role": "system", "content": []})
        second = session.add_item({"type": "message", "role": "user", "content": []}, previous_item_id="root")
        events = [await recv(ws) for _ in range(4)]
    assert types(events) == ["conversation.item.added", "conversation.item.done"] * 2
    assert events[0]["item"]["id"] == first["id"] and events[0]["previous_item_id"] is None
    assert events[2]["item"]["id"] == second["id"] and events[2]["previous_item_id"] is None
    assert session.item_ids == [second["id"], first["id"]]
