"""structlog set-up: one format for every line, JSON off a terminal, readable console lines on one.

aiohttp's and websockets' stdlib loggers go through the same renderer (ProcessorFormatter), so an operator
reads one format. Nothing here logs frames: audio and keys never reach a log line by construction (the relay
logs counts and ids only).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from proxy.config import LoggingConfig


def _json(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(config: LoggingConfig, stream: Any = None) -> None:
    stream = stream or sys.stderr
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks survive in both formats, as plain text or a dict: never "pretty" formatters that print the
    # local variables of each frame (they would print headers, and so keys).
    renderers: list[Any] = (
        [structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)]
        if fmt == "console"
        else [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer(serializer=_json)]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiohttp.access would log every upgrade request line with its query: we log connections ourselves.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # At debug level these libraries log handshake headers (API keys) and frame contents (audio): never.
    for name in ("websockets", "aiohttp.websocket", "aiohttp.client", "aiohttp.server"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
