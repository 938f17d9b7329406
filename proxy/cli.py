"""The `realtime-reset-proxy` command: serve (default), simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog
from yarl import URL

from proxy.auth import load_secrets
from proxy.config import Config, load_config
from proxy.core.errors import ConfigError
from proxy.logs import configure_logging
from proxy.simulator.model import QUIRKS

log = structlog.get_logger("proxy")


async def _serve(config: Config, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then drain: not ready, no new sessions, open ones get drain_seconds."""
    from proxy.server import ProxyServer

    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[int] = asyncio.Queue()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    server = ProxyServer(config, reuse_port=reuse_port)
    await server.start()
    loop_name = type(loop).__module__.split(".")[0]
    upstream = str(URL(config.upstream.url).with_query(None))  # a query may pin values an operator keeps private
    log.info("listening", url=server.url, upstream=upstream, admin_port=server.admin_port, loop=loop_name)
    try:
        received = await signals.get()
        log.info("signal", signal=signal.Signals(received).name)
        drain = asyncio.create_task(server.drain(config.listen.drain_seconds))
        second = asyncio.create_task(signals.get())
        # A second signal cuts the drain short, as operators expect from Ctrl-C twice.
        await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, second):
            task.cancel()
        await asyncio.gather(drain, second, return_exceptions=True)
    finally:
        await server.stop()
        log.info("stopped")


def _run(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, on uvloop when it is installed (`pip install realtime-reset-proxy[fast]`): less per-frame cost."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _worker(config_path: str | None) -> None:
    """One of several processes sharing the port (SO_REUSEPORT); the kernel spreads connections."""
    config = load_config(config_path)
    configure_logging(config.logging)
    # Every line this worker logs names it (asyncio copies this context into the tasks that serve requests).
    structlog.contextvars.bind_contextvars(pid=os.getpid())
    _run(_serve(config, reuse_port=True))


def _run_workers(config: Config, config_path: str | None) -> int:
    import multiprocessing
    import multiprocessing.connection
    import shutil
    import tempfile

    from prometheus_client.multiprocess import mark_process_dead

    from proxy.metrics import MULTIPROC_DIR_ENV

    # prometheus_client's multiprocess mode: each worker keeps its metrics in files here, and a scrape of any
    # worker sums them all. A fresh directory per run: counts left by an earlier run must not be added in.
    try:
        metrics_dir = tempfile.mkdtemp(prefix="realtime-reset-proxy-metrics-")
    except OSError as exc:  # a read-only root filesystem with no writable TMPDIR, say
        raise ConfigError(
            "listen.workers", f"more than 1 needs a writable temporary directory (TMPDIR): {exc}"
        ) from exc
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir  # the spawned workers inherit it before they import anything
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(config_path,), name=f"worker-{i}") for i in range(config.listen.workers)
    ]

    def forward(sig: int, _frame: object) -> None:
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, sig)

    try:
        for process in workers:
            process.start()
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        running = list(workers)
        while running:
            ready = multiprocessing.connection.wait([p.sentinel for p in running])
            for process in [p for p in running if p.sentinel in ready]:
                running.remove(process)
                process.join()
                # Its "now" gauges (open connections, held events) leave the sum; its counters stay in it.
                mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((p.exitcode or 0) for p in workers)


async def _simulate(args: argparse.Namespace) -> None:
    from proxy.simulator import SimulatorConfig
    from proxy.simulator.server import serve_forever

    config = SimulatorConfig(
        server_vad=args.server_vad,
        quirks=frozenset(args.quirk),
        session_max_s=args.session_max_seconds,
        session_expired_error=not args.no_session_expired_error,
    )
    await serve_forever(args.host, args.port, config)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


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
    simulate.add_argument(
        "--quirk",
        action="append",
        default=[],
        choices=QUIRKS,
        metavar="NAME",
        help=f"behave like a real server that does this (repeatable): {', '.join(QUIRKS)}",
    )
    simulate.add_argument(
        "--session-max-seconds",
        type=_positive,
        default=None,
        metavar="S",
        help="end every session S seconds after it opened, like OpenAI's 60-minute cap (close 1001)",
    )
    simulate.add_argument(
        "--no-session-expired-error",
        action="store_true",
        help="at the cap send only the close, without the session_expired error some API versions send first",
    )
    demo = sub.add_parser("demo", help="simulator + proxy + a client: the same tasks without, then with resets")
    demo.add_argument("--tasks", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        if command == "simulate":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_simulate(args))
            return 0
        if command == "demo":
            from proxy.config import LoggingConfig
            from proxy.demo import run_demo

            configure_logging(LoggingConfig(level="warning", format="console"))  # the demo prints its own lines
            asyncio.run(run_demo(args.tasks))
            return 0
        config_path = getattr(args, "serve_config", None) or args.config
        config = load_config(config_path)
        load_secrets(config)  # a missing key is a config error now, not at the first connection
        configure_logging(config.logging)
        if config.listen.workers > 1:
            return _run_workers(config, config_path)
        _run(_serve(config))
    except ConfigError as exc:
        print(f"realtime-reset-proxy: {exc}", file=sys.stderr)
        return 2
    return 0
