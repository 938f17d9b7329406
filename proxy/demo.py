"""`realtime-reset-proxy demo`: why a reset matters, shown with the simulator, the proxy and a scripted client.

All on loopback, no API key. The same audio "tasks" (append 200 ms of audio, commit, ask for a response) run
twice, each run over ONE connection through the proxy: first with nothing between the tasks, so every
response reads the whole conversation so far, then with a `session.reset` after each task. Per task it prints
the input tokens the simulator billed in that response's `response.done` usage (growing in the first run,
flat in the second) and what the upstream conversation held, read from the simulator's own state, not from
what the client believes.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from proxy.config import config_from_dict
from proxy.server import ProxyServer
from proxy.simulator import Simulator, SimulatorConfig


@dataclass(frozen=True)
class TaskResult:
    task: int
    input_tokens: int  # from the task's response.done usage, as the server billed it
    items_before_reset: int  # upstream conversation size when the task's response was done
    items_after: int  # upstream conversation size when the next task starts
    deleted: int  # items the reset removed (0 without a reset)
    reset_ms: float | None  # client-side round trip of the reset, None without one


@dataclass(frozen=True)
class DemoResult:
    without_reset: list[TaskResult]
    with_reset: list[TaskResult]


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


async def _run(
    sim: Simulator, proxy: ProxyServer, tasks: int, reset: bool, out: Callable[[str], object]
) -> list[TaskResult]:
    """One connection through the proxy, `tasks` tasks on it, a reset after each when `reset`."""
    results: list[TaskResult] = []
    chunk = orjson.dumps({"type": "input_audio_buffer.append", "audio": tone_chunk()})
    async with connect(proxy.url + "?model=gpt-realtime", compression=None) as ws:
        await _until(ws, "session.created")
        upstream = sim.sessions[-1]  # this connection's: the simulator adds it before it sends session.created
        for task in range(1, tasks + 1):
            for _ in range(10):  # 200 ms of audio: one "case" to handle
                await ws.send(chunk, text=True)
            await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}), text=True)
            await ws.send(orjson.dumps({"type": "response.create"}), text=True)
            done = await _until(ws, "response.done")
            billed = int((done["response"].get("usage") or {}).get("input_tokens") or 0)
            before = len(upstream.item_ids)
            line = f"  task {task}: billed {billed:>4} input tokens; upstream conversation holds {before} items"
            deleted, reset_ms = 0, None
            if reset:
                started = time.perf_counter()
                await ws.send(orjson.dumps({"type": "session.reset", "event_id": f"reset-{task}"}), text=True)
                completed = await _until(ws, "session.reset.completed")
                reset_ms = (time.perf_counter() - started) * 1000
                deleted = len(completed["deleted_item_ids"])
                line += f"; session.reset deleted {deleted} in {reset_ms:.2f} ms, {len(upstream.item_ids)} left"
            results.append(TaskResult(task, billed, before, len(upstream.item_ids), deleted, reset_ms))
            out(line)
    return results


async def run_demo(tasks: int = 3, out: Callable[[str], object] = print) -> DemoResult:
    """Run the tasks without and then with resets; returns what each task was billed (also printed via `out`)."""
    async with Simulator(SimulatorConfig(delta_interval_s=0.002)) as sim:
        config = config_from_dict({"listen": {"port": 0}, "upstream": {"url": sim.url}})
        async with ProxyServer(config) as proxy:
            out(f"simulator upstream: {sim.url}")
            out(f"proxy:              {proxy.url}  (clients connect here, as they would to the API)")
            out(f"{tasks} independent tasks on one connection, nothing between them:")
            without = await _run(sim, proxy, tasks, reset=False, out=out)
            out(f"The same {tasks} tasks on a new connection, a session.reset after each:")
            with_reset = await _run(sim, proxy, tasks, reset=True, out=out)
    total_without = sum(r.input_tokens for r in without)
    total_with = sum(r.input_tokens for r in with_reset)
    out(
        f"Input tokens billed for {tasks} tasks: {total_without} without resets, {total_with} with them: "
        "each response reads the whole conversation, so without a reset every task pays for all before it."
    )
    return DemoResult(without, with_reset)
