"""`realtime-reset-proxy demo`: simulator + proxy + a scripted client, all on loopback, no API key.

The client runs several independent audio "tasks" over ONE connection (append audio, commit, ask for a
response) and resets after each, printing what the upstream conversation held before and after the reset and
how long the reset took. The counts come from the simulator's own conversation, not from the client's belief.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from proxy.config import config_from_dict
from proxy.server import ProxyServer
from proxy.simulator import Simulator, SimulatorConfig


def tone_chunk(ms: int = 20, rate: int = 24_000, freq: float = 440.0) -> str:
    """`ms` of a pcm16 sine tone at 24 kHz, base64 as `input_audio_buffer.append` wants it."""
    samples = rate * ms // 1000
    pcm = struct.pack(f"<{samples}h", *(int(8000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(samples)))
    return base64.b64encode(pcm).decode()


async def _until(ws: ClientConnection, etype: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = orjson.loads(await ws.recv(decode=False))
        if event.get("type") == etype:
            return event
        if event.get("type") == "error":
            raise RuntimeError(f"unexpected error event: {event['error']}")


async def run_demo(tasks: int = 3, out: Any = print) -> list[dict[str, Any]]:
    """Run the scripted tasks; returns one summary per task (also printed through `out`)."""
    results: list[dict[str, Any]] = []
    async with Simulator(SimulatorConfig(delta_interval_s=0.002)) as sim:
        config = config_from_dict({"listen": {"port": 0}, "upstream": {"url": sim.url}})
        async with ProxyServer(config) as proxy:
            out(f"simulator upstream: {sim.url}")
            out(f"proxy:              {proxy.url}  (clients connect here, as they would to the API)")
            chunk = tone_chunk()
            async with connect(proxy.url + "?model=gpt-realtime", compression=None) as ws:
                await _until(ws, "session.created")
                upstream = sim.sessions[0]
                for task in range(1, tasks + 1):
                    for _ in range(10):  # 200 ms of audio: one "case" to summarise
                        await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": chunk}), text=True)
                    await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}), text=True)
                    await ws.send(orjson.dumps({"type": "response.create"}), text=True)
                    done = await _until(ws, "response.done")
                    before = list(upstream.item_ids)
                    started = time.perf_counter()
                    await ws.send(orjson.dumps({"type": "session.reset", "event_id": f"reset-{task}"}), text=True)
                    completed = await _until(ws, "session.reset.completed")
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    after = list(upstream.item_ids)
                    usage = done["response"].get("usage") or {}
                    result = {
                        "task": task,
                        "items_before": before,
                        "items_after": after,
                        "deleted": completed["deleted_item_ids"],
                        "reset_ms": elapsed_ms,
                        "input_tokens": usage.get("input_tokens"),
                    }
                    results.append(result)
                    out(
                        f"task {task}: upstream held {len(before)} items before the reset {before}; "
                        f"{len(after)} after {after}; reset took {elapsed_ms:.2f} ms "
                        f"(proxy says {completed['duration_ms']:.2f} ms); "
                        f"this task's response was billed {result['input_tokens']} input tokens"
                    )
    out(f"{tasks} tasks on one connection; each started from an empty conversation.")
    return results
