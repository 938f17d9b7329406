"""Anchors for the benchmark: relays that parse nothing, each in its own process.

`python -m bench.naive --port P --upstream URL` runs the naive aiohttp relay: every client connection dials the
upstream with aiohttp, and two pumps pass every message on as it came (no session, no reset, no checks). It is
what a careful "just forward it" relay in Python costs; the proxy must beat it to be worth its parsing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web

# Both ends with decode_text=False: a TEXT message arrives as bytes and is sent on as the same bytes.
_Socket = web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool]


async def _pump(source: _Socket, sink: _Socket) -> None:
    async for msg in source:
        if msg.type is WSMsgType.TEXT:
            await sink.send_frame(msg.data, WSMsgType.TEXT)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:
            break


def app(upstream: str) -> web.Application:
    session: list[aiohttp.ClientSession] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        if not session:
            session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        up = await session[0].ws_connect(upstream + "?" + request.query_string, compress=0, decode_text=False)
        ws = web.WebSocketResponse(compress=False, decode_text=False)
        await ws.prepare(request)
        tasks = [asyncio.create_task(_pump(ws, up)), asyncio.create_task(_pump(up, ws))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await up.close()
        return ws

    application = web.Application()
    application.router.add_get("/{tail:.*}", handle)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="ws:// URL of the upstream endpoint (no query)")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
