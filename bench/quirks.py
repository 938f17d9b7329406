"""Reset time against each quirk of real servers: the simulator with one quirk on, the proxy in front, one task.

Run as ``python -m bench.quirks`` (``--repeats``, ``--delay``). Per quirk (and none), on one connection through
the proxy, each repeat: three text items and a ``response.create``; once the response runs, the quirk's own
disturbance (a server-VAD turn that interrupts it, a second response that replaces it, a late auto-response on
its way, an idle-timeout commit, a refused commit answered with null ids; with ``ignore_out_of_band`` the task's
response is asked for out of band, and the server puts it in the conversation); then ``session.reset``, timed
from the client until ``session.reset.completed`` (or the timeout's error). Then it waits for the server to go
quiet and reads what the simulator's conversation still holds: 0 is the only right answer. The simulator delays
each frame it sends by ``--delay`` (one way), so an upstream round trip costs one delay; a server that cannot
cancel makes the reset wait for the response's end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from proxy.config import LoggingConfig, config_from_dict
from proxy.logs import configure_logging
from proxy.server import ProxyServer
from proxy.simulator import Simulator, SimulatorConfig
from proxy.simulator.model import QUIRKS
from proxy.simulator.server import SimSession

Event = dict[str, Any]
RESPONSE_S = 0.4  # how long a response streams: what a reset must wait for when the server cannot cancel
TRANSCRIPTION_S = 0.3  # late_auto_response: commit → response.created


@dataclass
class QuirkResult:
    quirk: str
    reset_ms: list[float] = field(default_factory=list)
    timed_out: int = 0
    cancelled: int = 0
    deleted: list[int] = field(default_factory=list)
    left: list[int] = field(default_factory=list)  # items the simulator still held once quiet


class Client:
    """The client's side: reads every event in the background, so waits are on events, not on time."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for data in self.ws:
            self.events.append(orjson.loads(data))
            self._changed.set()
            self._changed = asyncio.Event()

    async def send(self, event: Event) -> None:
        await self.ws.send(orjson.dumps(event), text=True)

    async def wait(self, match: Callable[[Event], bool], since: int = 0, timeout: float = 15.0) -> Event:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[since:]:
                    if match(event):
                        return event
                await self._changed.wait()


def _is(etype: str) -> Callable[[Event], bool]:
    return lambda e: e.get("type") == etype


async def _disturb(quirk: str, client: Client, upstream: SimSession) -> None:
    """What makes the quirk happen, while the task's response runs."""
    if quirk == "vad_interrupt":
        await upstream.vad_commit(create_response=False)  # the user speaks: turn_detected ends the response
    elif quirk == "replace_response":
        await client.send({"type": "response.create"})  # the server replaces the running one, no response.done
    elif quirk == "late_auto_response":
        await upstream.vad_commit(create_response=True)  # its response starts TRANSCRIPTION_S later
    elif quirk == "idle_timeout":
        upstream.drive(lambda model: model.server_idle_timeout())
    elif quirk == "null_errors":
        await client.send({"type": "input_audio_buffer.commit"})  # nothing buffered: refused, code and id null


async def _repeat(quirk: str, n: int, client: Client, upstream: SimSession, result: QuirkResult) -> None:
    mark = len(client.events)
    for i in range(3):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"task {n} part {i}"}]}
        await client.send({"type": "conversation.item.create", "item": item})
    # ignore_out_of_band: the task asks for an out-of-band response, the server puts it in the conversation.
    oob = {"response": {"conversation": "none"}} if quirk == "ignore_out_of_band" else {}
    await client.send({"type": "response.create", **oob})
    await client.wait(_is("response.created"), mark)
    await _disturb(quirk, client, upstream)
    mark = len(client.events)
    started = time.perf_counter()
    await client.send({"type": "session.reset", "event_id": f"reset_{n}"})
    answer = await client.wait(
        lambda e: (
            e.get("type") == "session.reset.completed"
            or (e.get("type") == "error" and e["error"].get("event_id") == f"reset_{n}")
        ),
        mark,
    )
    result.reset_ms.append((time.perf_counter() - started) * 1000)
    if answer["type"] == "error":
        result.timed_out += 1
    else:
        result.cancelled += bool(answer["response_cancelled"])
        result.deleted.append(len(answer["deleted_item_ids"]))
    if quirk == "late_auto_response":
        await client.wait(_is("response.created"), mark)  # the late one: the proxy cancels it, deletes its items
    await upstream.wait_until(lambda s: not s.active_response_ids, timeout=15.0)
    with contextlib.suppress(TimeoutError):  # what is left after 2 s is reported, not waited for
        await upstream.wait_until(lambda s: not s.item_ids, timeout=2.0)
    result.left.append(len(upstream.item_ids))


async def run_quirk(quirk: str, repeats: int, delay_s: float) -> QuirkResult:
    deltas = 20
    sim_config = SimulatorConfig(
        one_way_delay_s=delay_s,
        delta_count=deltas,
        delta_interval_s=RESPONSE_S / deltas,
        quirks=frozenset({quirk}) if quirk else frozenset(),
        transcription_delay_s=TRANSCRIPTION_S,
    )
    result = QuirkResult(quirk or "none")
    async with Simulator(sim_config) as sim:
        settings = {"listen": {"port": 0}, "upstream": {"url": sim.url}, "logging": {"level": "warning"}}
        config = config_from_dict(settings)
        async with ProxyServer(config) as proxy, connect(proxy.url + "?model=gpt-realtime", compression=None) as ws:
            client = Client(ws)
            await client.wait(_is("session.created"))
            upstream = sim.sessions[-1]
            for n in range(repeats):
                await _repeat(quirk, n, client, upstream, result)
    return result


def _row(r: QuirkResult) -> str:
    ms = r.reset_ms
    return (
        f"{r.quirk:<33} {statistics.median(ms):>8.1f} {max(ms):>8.1f} {r.timed_out:>9} {r.cancelled:>10} "
        f"{statistics.median(r.deleted) if r.deleted else 0:>8} {max(r.left):>5}"
    )


async def run_all(repeats: int, delay_s: float, out: Callable[[str], object] = print) -> list[QuirkResult]:
    out(
        f"reset after each quirk: {repeats} tasks per quirk, {delay_s * 1000:g} ms one-way upstream delay, "
        f"responses stream for {RESPONSE_S * 1000:g} ms"
    )
    out(f"{'quirk':<33} {'p50 ms':>8} {'max ms':>8} {'timed out':>9} {'cancelled':>10} {'deleted':>8} {'left':>5}")
    results = []
    for quirk in ("", *QUIRKS):
        result = await run_quirk(quirk, repeats, delay_s)
        out(_row(result))
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5, help="tasks (each ending in a reset) per quirk")
    parser.add_argument("--delay", type=float, default=0.025, help="one-way upstream delay in seconds")
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="warning"))
    results = asyncio.run(run_all(args.repeats, args.delay))
    return 1 if any(max(r.left) or r.timed_out for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
