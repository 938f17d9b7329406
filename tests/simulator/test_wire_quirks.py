"""Quirks over real sockets: SimulatorConfig (and `realtime-reset-proxy simulate --quirk`) switch them on, the
wire's loop timer drives the model's deadlines."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from proxy.cli import build_parser
from proxy.simulator import Simulator, SimulatorConfig

AUDIO = base64.b64encode(b"\x00" * 4800).decode()  # 100 ms: one VAD turn at vad_commit_bytes=4800


@pytest.fixture
async def ws_for() -> AsyncIterator[Any]:
    sims: list[Simulator] = []
    clients: list[ClientConnection] = []

    async def factory(**config: Any) -> tuple[Simulator, ClientConnection]:
        sim = Simulator(SimulatorConfig(**config))
        await sim.start()
        sims.append(sim)
        ws = await connect(sim.url + "?model=gpt-realtime")
        clients.append(ws)
        created = await recv(ws)
        assert created["type"] == "session.created"
        return sim, ws

    yield factory
    for ws in clients:
        await ws.close()
    for sim in sims:
        await sim.stop()


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5.0):
        event: dict[str, Any] = orjson.loads(await ws.recv())
    return event


async def until(ws: ClientConnection, etype: str) -> list[dict[str, Any]]:
    events = [await recv(ws)]
    while events[-1]["type"] != etype:
        events.append(await recv(ws))
    return events


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(event).decode())


def test_simulate_takes_repeatable_quirks_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --quirk A --quirk B` names quirks; an unknown name exits 2 with one line naming the option."""
    args = build_parser().parse_args(["simulate", "--quirk", "no_cancel", "--quirk", "null_errors"])
    assert args.quirk == ["no_cancel", "null_errors"]
    with pytest.raises(SystemExit) as exc_info:
        build_parser().parse_args(["simulate", "--quirk", "bogus"])
    assert exc_info.value.code == 2
    assert "argument --quirk: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bogus"):
        SimulatorConfig(quirks={"bogus"})


async def test_null_errors_and_no_cancel_over_the_wire(ws_for: Any) -> None:
    """A server that cannot cancel answers with an error whose code and event_id are null; the response ends."""
    sim, ws = await ws_for(quirks={"null_errors", "no_cancel"}, delta_count=3, delta_interval_s=0.01)
    await send(ws, {"type": "response.create"})
    await until(ws, "response.created")
    await send(ws, {"type": "response.cancel", "event_id": "c1"})
    events = await until(ws, "response.done")
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["error"]["code"] is None and error["error"]["event_id"] is None
    assert events[-1]["response"]["status"] == "completed"
    assert sim.sessions[0].active_response_id is None


async def test_vad_interrupt_over_the_wire(ws_for: Any) -> None:
    """Speech while a response streams ends it with turn_detected, before the new user turn is committed."""
    _, ws = await ws_for(quirks={"vad_interrupt"}, server_vad=True, vad_commit_bytes=4800, delta_count=1000)
    await send(ws, {"type": "response.create"})
    created = (await until(ws, "response.created"))[-1]["response"]
    await send(ws, {"type": "input_audio_buffer.append", "audio": AUDIO})
    events = await until(ws, "input_audio_buffer.committed")
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert done["id"] == created["id"]
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")


async def test_late_auto_response_waits_for_transcription(ws_for: Any) -> None:
    """The auto-response of a VAD turn starts transcription_delay_s after the commit, from the loop's timer."""
    delay = 0.2
    _, ws = await ws_for(
        quirks={"late_auto_response"}, server_vad=True, vad_commit_bytes=4800, transcription_delay_s=delay
    )
    await send(ws, {"type": "input_audio_buffer.append", "audio": AUDIO})
    await until(ws, "input_audio_buffer.committed")
    committed_at = time.monotonic()
    events = await until(ws, "response.created")
    assert time.monotonic() - committed_at >= delay * 0.9  # loop timers may fire a hair early
    assert [e["type"] for e in events] == ["conversation.item.added", "conversation.item.done", "response.created"]


async def test_idle_timeout_over_the_wire(ws_for: Any) -> None:
    """With turn detection on and no audio, timeout_triggered commits an empty item and a response answers it."""
    sim, ws = await ws_for(quirks={"idle_timeout"}, server_vad=True, idle_timeout_s=0.05, delta_count=1)
    events = await until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert kinds[:3] == [
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
    ]
    assert events[0]["item_id"] == events[1]["item_id"] == sim.sessions[0].item_ids[0]


async def test_drive_makes_the_server_act_now(ws_for: Any) -> None:
    """SimSession.drive runs a server action on the model and sends what it produced, in order."""
    sim, ws = await ws_for()
    session = await sim.wait_for_sessions(1)
    committed = session.drive(lambda model: model.server_idle_timeout(create_response=False))
    events = await until(ws, "conversation.item.done")
    assert [e["type"] for e in events] == [
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert events[1]["item_id"] == committed.event["item_id"] == session.item_ids[0]
