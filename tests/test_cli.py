"""The real `python -m proxy` command, run as a subprocess: bad configs, --help, the demo, SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0


def run_cli(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    # cwd=ROOT: `-m proxy` finds the package whether or not it is installed into the interpreter.
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


BAD_CONFIGS: list[tuple[str, str, str]] = [
    # (test id, file text, the key the one stderr line must name)
    ("unknown-key", "[listen]\nprot = 8765\n", "listen.prot"),
    ("unknown-section", "[upstreams]\nurl = 'wss://x'\n", "upstreams"),
    ("wrong-type", '[reset]\ntimeout_seconds = "ten"\n', "reset.timeout_seconds"),
    ("out-of-range", "[listen]\nport = 70000\n", "listen.port"),
    ("bad-scheme", '[upstream]\nurl = "ftp://api.openai.com/v1/realtime"\n', "upstream.url"),
]


@pytest.mark.parametrize(("text", "key"), [pytest.param(t, k, id=i) for i, t, k in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    """A bad config file makes the CLI exit 2 with exactly one stderr line naming the key, and no traceback."""
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("realtime-reset-proxy: config error: ")
    assert f" {key}: " in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_serve_subcommand_reports_bad_config_the_same_way(tmp_path: Path) -> None:
    """`serve --config BAD` behaves like `--config BAD`: exit 2, one line naming the key."""
    path = tmp_path / "config.toml"
    path.write_text("[logging]\nlevel = 'loud'\n", encoding="utf-8")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert " logging.level: " in result.stderr


def test_missing_config_file_exits_2_naming_the_path(tmp_path: Path) -> None:
    """A --config path that does not exist gives exit 2 and one stderr line naming that path."""
    path = tmp_path / "absent.toml"
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr


def test_help_lists_the_subcommands() -> None:
    """--help exits 0 and shows the usage with --config and the serve, simulate and demo subcommands."""
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: realtime-reset-proxy")
    for word in ("--config", "serve", "simulate", "demo"):
        assert word in result.stdout
    assert result.stderr == ""


def test_demo_prints_each_task_emptied_by_its_reset() -> None:
    """`demo --tasks 2` exits 0 and prints two task lines, each with items before the reset and 0 after it."""
    result = run_cli("demo", "--tasks", "2")
    assert result.returncode == 0, result.stderr
    task_lines = [line for line in result.stdout.splitlines() if line.startswith("task ")]
    assert len(task_lines) == 2, result.stdout
    pattern = re.compile(r"^task (\d+): upstream held (\d+) items before the reset .*; 0 after \[\]; reset took ")
    for number, line in enumerate(task_lines, start=1):
        match = pattern.match(line)
        assert match is not None, line
        assert int(match.group(1)) == number
        assert int(match.group(2)) > 0  # the reset had something to delete
    assert "2 tasks on one connection" in result.stdout
    assert "Traceback" not in result.stderr


async def _first_event(stream: asyncio.StreamReader, name: str) -> dict[str, Any]:
    """The first JSON log line whose event is `name`; fails on end of stream."""
    while line := await stream.readline():
        event: dict[str, Any] = orjson.loads(line)
        if event.get("event") == name:
            return event
    raise AssertionError(f"the process ended its log without a {name!r} line")


async def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    """The server started from a config file logs `listening` as JSON, and SIGTERM makes it exit 0."""
    path = tmp_path / "config.toml"
    path.write_text('[listen]\nport = 0\n[logging]\nformat = "json"\n', encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(path),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        event = await asyncio.wait_for(_first_event(proc.stderr, "listening"), TIMEOUT_S)
        assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/v1/realtime", event["url"])
        assert not event["url"].endswith(":0/v1/realtime")  # the real port, not the requested 0
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), TIMEOUT_S)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT_S) == 0
        assert b"draining" in rest and b"stopped" in rest
        assert b"Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
