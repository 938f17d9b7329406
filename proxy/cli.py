"""The `realtime-reset-proxy` command: serve (default), simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import structlog

from proxy.config import Config, load_config
from proxy.core.errors import ConfigError
from proxy.logs import configure_logging

log = structlog.get_logger("proxy")


async def _serve(config: Config) -> None:
    from proxy.server import ProxyServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ProxyServer(config) as server:
        log.info("listening", url=server.url, upstream=config.upstream.url)
        await stop.wait()
        log.info("shutting_down")


async def _simulate(host: str, port: int, vad: bool) -> None:
    from proxy.simulator import SimulatorConfig
    from proxy.simulator.server import serve_forever

    await serve_forever(host, port, SimulatorConfig(server_vad=vad))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realtime-reset-proxy",
        description="OpenAI Realtime API proxy that adds session.reset: wipe the conversation, keep the socket.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config (default: built-in defaults)")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the proxy (the default)")
    serve.add_argument("--config", metavar="FILE", dest="serve_config", help="TOML config")
    simulate = sub.add_parser("simulate", help="run the offline Realtime API simulator alone")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8766)
    simulate.add_argument("--server-vad", action="store_true", help="turn server VAD on by default")
    demo = sub.add_parser("demo", help="simulator + proxy + a scripted client: several tasks, a reset after each")
    demo.add_argument("--tasks", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        if command == "simulate":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_simulate(args.host, args.port, args.server_vad))
            return 0
        if command == "demo":
            from proxy.config import LoggingConfig
            from proxy.demo import run_demo

            configure_logging(LoggingConfig(level="warning", format="console"))  # the demo prints its own lines
            asyncio.run(run_demo(args.tasks))
            return 0
        config = load_config(getattr(args, "serve_config", None) or args.config)
    except ConfigError as exc:
        print(f"realtime-reset-proxy: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging)
    asyncio.run(_serve(config))
    return 0
