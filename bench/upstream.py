"""The upstream process: a minimal echo "API" and the project's Simulator, each on an ephemeral loopback port.

Run as ``python -m bench.upstream --sim-delay 0.025``; it prints one line,
``READY {"echo": port, "sim": port, "sim_via_delay_line": port}``, on stdout once all accept, and runs until
SIGTERM/SIGINT. It lives in its own process so that the proxy's
CPU time (and the client's) is not shared with the upstream's.

The echo answers ``session.created`` on connect, then each ``input_audio_buffer.append`` with one
``response.output_audio.delta`` carrying the same audio; everything else is ignored. It is deliberately
lean (orjson, bytes in and bytes out) so that the upstream is not what limits a direct connection.

The delay line puts the Simulator's delay on what the Simulator does not delay: connection set-up. The
Simulator delays every frame it sends by the one-way delay, so one request and its answer cost one delay;
behind the delay line (in front of a second, undelayed Simulator) every byte the server sends is late by that
delay, and a new connection's first bytes wait one delay as well (the TCP handshake's round trip, which a
real client must finish before it can send its upgrade request). A reconnect then costs what it costs over a
real path: a round trip for TCP, one for the upgrade answered with `session.created` (TLS would add more).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import orjson
from aiohttp import WSMsgType, web

from bench.frames import SESSION_CREATED, delta_event
from bench.procs import HOST, install_uvloop, raise_fd_limit
from proxy.simulator import Simulator, SimulatorConfig

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def echo(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, compress=False, decode_text=False, autoping=True)
    await ws.prepare(request)
    await ws.send_frame(SESSION_CREATED, WSMsgType.TEXT)
    seq = 0
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        event = orjson.loads(msg.data)
        if event.get("type") == "input_audio_buffer.append":
            seq += 1
            await ws.send_frame(delta_event(event.get("audio", ""), seq), WSMsgType.TEXT)
    return ws


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lag: float) -> None:
    """Copy bytes one way, each chunk written `lag` seconds after it was read (in order)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(release())
    try:
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((loop.time() + lag, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender


async def start_delay_line(target_port: int, delay: float) -> asyncio.Server:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(delay)  # the TCP handshake's round trip
            server_r, server_w = await asyncio.open_connection(HOST, target_port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pump(client_r, server_w, 0.0), _pump(server_r, client_w, delay))
        except OSError:
            pass  # a reset connection: nothing to report for a benchmark upstream
        finally:
            for w in (client_w, server_w):
                w.close()

    return await asyncio.start_server(handle, HOST, 0, backlog=1024)


async def serve(sim_delay: float) -> None:
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", echo)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    # A large backlog: the memory scenario opens hundreds of sessions at once.
    site = web.TCPSite(runner, HOST, 0, backlog=1024)
    await site.start()
    echo_port = int(runner.addresses[0][1])
    sim = Simulator(SimulatorConfig(one_way_delay_s=sim_delay))
    sim_port = await sim.start(HOST, 0)
    undelayed = Simulator(SimulatorConfig())
    undelayed_port = await undelayed.start(HOST, 0)
    line = await start_delay_line(undelayed_port, sim_delay)
    line_port = int(line.sockets[0].getsockname()[1])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ports = {"echo": echo_port, "sim": sim_port, "sim_via_delay_line": line_port}
    print("READY " + orjson.dumps(ports).decode(), flush=True)
    try:
        await stop.wait()
    finally:
        line.close()
        for s in (sim, undelayed):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.stop(), 3.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.cleanup(), 3.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--sim-delay", type=float, default=0.025, help="the Simulator's one-way delay, seconds")
    args = parser.parse_args(argv)
    raise_fd_limit()
    install_uvloop()
    asyncio.run(serve(args.sim_delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
