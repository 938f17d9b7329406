"""The real `realtime-reset-proxy` process: JSON logs without secrets, SIGTERM drain, several workers."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.config import RelayConfig
from proxy.simulator import Simulator, SimulatorConfig
from tests.e2e.conftest import ENGINE, Client, item_event
from tests.e2e.test_sidecar import metric_values

KEY = "sk-secret-key-123"
TOKEN = "tok-proxy-456"
AUDIO = base64.b64encode(b"AUDIO-PAYLOAD-MARKER" * 50).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A proxy subprocess whose stderr lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            async with self._changed:
                self.lines.append(raw.decode().rstrip("\n"))
                self._changed.notify_all()

    async def wait_logs(self, match: Callable[[dict[str, Any]], bool], count: int = 1) -> list[dict[str, Any]]:
        """Wait until `count` JSON log lines match; returns them."""
        async with asyncio.timeout(10.0), self._changed:
            while True:
                found = []
                for line in self.lines:
                    try:
                        entry = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and match(entry):
                        found.append(entry)
                if len(found) >= count:
                    return found
                await self._changed.wait()

    async def wait_log(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        return (await self.wait_logs(match))[0]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=gpt-realtime"


@asynccontextmanager
async def proxy_process(
    tmp_path: Path, sim: Simulator, env: dict[str, str] | None = None, **listen: Any
) -> AsyncIterator[Proc]:
    port = free_port()
    listen_toml = "\n".join(f"{k} = {v}" for k, v in listen.items())
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {port}
{listen_toml}

[upstream]
url = "{sim.url}"
api_key_env = "RRP_TEST_KEY"

[auth]
client_tokens_env = "RRP_TEST_TOKENS"

[relay]
engine = "{ENGINE or RelayConfig().engine}"

[logging]
level = "info"
format = "json"
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RRP_TEST_KEY": KEY, "RRP_TEST_TOKENS": TOKEN, **(env or {})},
    )
    proc = Proc(process, port)
    try:
        await proc.wait_log(lambda e: e.get("event") == "listening")
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await proc._reader


async def test_json_logs_carry_ids_and_no_secrets_and_sigterm_drains(tmp_path: Path) -> None:
    """Logs are JSON with connection and upstream session ids, never keys, tokens or audio; SIGTERM drains."""
    async with Simulator(SimulatorConfig(api_key=KEY)) as sim, proxy_process(tmp_path, sim, drain_seconds=20) as proc:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with connect(proc.url, additional_headers=auth) as ws, aiohttp.ClientSession() as http:
            client = Client(ws)
            await client.until("session.created")
            await client.send({"type": "input_audio_buffer.append", "audio": AUDIO})
            await client.send({"type": "input_audio_buffer.commit"})
            await client.until("conversation.item.added")
            await client.send({"type": "session.reset"})
            await client.until("session.reset.completed")

            proc.process.send_signal(signal.SIGTERM)
            await proc.wait_log(lambda e: e.get("event") == "draining")
            async with http.get(f"http://127.0.0.1:{proc.port}/readyz") as r:
                assert r.status == 503
            async with http.get(f"http://127.0.0.1:{proc.port}/healthz") as r:
                assert r.status == 200
            with pytest.raises(InvalidStatus) as info:
                async with connect(proc.url, additional_headers=auth):
                    pass
            assert info.value.response.status_code == 503
            # The open session still works while draining.
            await client.send(item_event("still served", item_id="late_1"))
            await client.until("conversation.item.added")
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
        await proc._reader

    text = "\n".join(proc.lines)
    entries = [orjson.loads(line) for line in proc.lines if line.strip()]
    assert KEY not in text and TOKEN not in text and AUDIO[:40] not in text
    closed = next(e for e in entries if e["event"] == "connection_closed")
    reset = next(e for e in entries if e["event"] == "reset")
    assert closed["conn"] == reset["conn"]
    assert closed["upstream_session"] == reset["upstream_session"] == sim.sessions[0].id
    assert closed["frames_up"] == 4 and closed["resets"] == 1
    assert all({"event", "level", "timestamp"} <= set(e) for e in entries)
    assert entries[-1]["event"] == "stopped"


async def test_drain_timeout_closes_open_sessions_with_1001(tmp_path: Path) -> None:
    """A session still open when drain_seconds run out is closed with 1001, then the process exits 0."""
    async with Simulator(SimulatorConfig(api_key=KEY)) as sim, proxy_process(tmp_path, sim, drain_seconds=0.3) as proc:
        async with connect(proc.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            client = Client(ws)
            await client.until("session.created")
            proc.process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await client.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
        await sim.sessions[0].wait_until(lambda s: s.closed)


def worker_children(pid: int) -> list[int]:
    """Pids of the multiprocessing children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "spawn_main" in (entry / "cmdline").read_text():
                found.append(int(entry.name))
    return found


async def test_several_workers_share_the_port(tmp_path: Path) -> None:
    """With workers = 2 two processes serve one port; every client is served; SIGTERM stops them all with 0."""
    async with Simulator(SimulatorConfig(api_key=KEY)) as sim, proxy_process(tmp_path, sim, workers=2) as proc:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        await proc.wait_logs(lambda e: e.get("event") == "listening", count=2)
        assert len(worker_children(proc.process.pid)) == 2
        for _ in range(6):
            async with connect(proc.url, additional_headers=headers) as ws:
                assert orjson.loads(await ws.recv())["type"] == "session.created"
        assert len(sim.sessions) == 6
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 15) == 0


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One /metrics scrape on a fresh TCP connection, so the kernel picks the worker anew each time."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        # The proxy has client tokens: /metrics on its main port asks for one too.
        http.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r,
    ):
        assert r.status == 200
        return metric_values(await r.text())


async def test_one_scrape_of_any_worker_shows_the_sum_over_all_workers(tmp_path: Path) -> None:
    """With workers = 2, sessions served by both workers add up in every scrape; the metrics dir goes at exit."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    async with (
        Simulator(SimulatorConfig(api_key=KEY)) as sim,
        proxy_process(tmp_path, sim, env={"TMPDIR": str(tmp)}, workers=2) as proc,
    ):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        listening = await proc.wait_logs(lambda e: e.get("event") == "listening", count=2)
        pids = {e["pid"] for e in listening}
        assert pids == set(worker_children(proc.process.pid))
        [metrics_dir] = list(tmp.iterdir())  # the parent's fresh PROMETHEUS_MULTIPROC_DIR
        assert metrics_dir.name.startswith("realtime-reset-proxy-metrics-")

        # Sessions until each worker has served some (SO_REUSEPORT spreads them), each with a different load.
        closed: list[dict[str, Any]] = []
        sessions = 0
        while {e["pid"] for e in closed} != pids:
            assert sessions < 64, "the kernel never spread sessions over both workers"
            sessions += 1
            async with connect(proc.url, additional_headers=headers) as ws:
                client = Client(ws)
                await client.until("session.created")
                for n in range(sessions % 3 + 1):
                    await client.send(item_event(f"session {sessions} item {n}"))
                    await client.until("conversation.item.added")
                await client.send({"type": "session.reset"})
                await client.until("session.reset.completed")
            closed = await proc.wait_logs(lambda e: e.get("event") == "connection_closed", count=sessions)

        # One open session on each worker, each sending one event: the "now" gauge, and counts still flowing.
        async with AsyncExitStack() as stack:
            open_pids: set[int] = set()
            opened = 0
            while open_pids != pids:
                assert opened < 64, "the kernel never spread sessions over both workers"
                opened += 1
                client = Client(await stack.enter_async_context(connect(proc.url, additional_headers=headers)))
                await client.until("session.created")
                await client.send(item_event("still open"))
                await client.until("conversation.item.added")
                logs = await proc.wait_logs(lambda e: e.get("event") == "connection_open", count=sessions + opened)
                open_pids.add(logs[-1]["pid"])
            up_so_far = sum(e["frames_up"] for e in closed) + opened
            values = await scrape(proc.port)
            assert values[("realtime_proxy_connections_open", ())] == opened
            # The other worker publishes its open sessions' counts every second; the scraped one at once.
            async with asyncio.timeout(5.0):
                while values[("realtime_proxy_frames_total", (("direction", "upstream"),))] < up_so_far:
                    values = await scrape(proc.port)
            assert values[("realtime_proxy_frames_total", (("direction", "upstream"),))] == up_so_far

        closed = await proc.wait_logs(lambda e: e.get("event") == "connection_closed", count=sessions + opened)
        expected = {
            ("realtime_proxy_connections_total", ()): sessions + opened,
            ("realtime_proxy_connections_open", ()): 0,
            ("realtime_proxy_resets_total", (("outcome", "completed"),)): sessions,
            ("realtime_proxy_upstream_connect_seconds_count", ()): sessions + opened,
            ("realtime_proxy_items_deleted_total", ()): sum(n % 3 + 1 for n in range(1, sessions + 1)),
        }
        for key, field in (("frames", "frames"), ("bytes", "bytes")):
            for direction, d in (("upstream", "up"), ("downstream", "down")):
                expected[(f"realtime_proxy_{key}_total", (("direction", direction),))] = sum(
                    e[f"{field}_{d}"] for e in closed
                )
        for _ in range(4):  # whichever worker answers
            values = await scrape(proc.port)
            assert {k: values[k] for k in expected} == expected
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 15) == 0
    assert list(tmp.iterdir()) == []
