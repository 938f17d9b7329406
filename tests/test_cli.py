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
    ("bad-strategy", '[reset]\nstrategy = "fast"\n', "reset.strategy"),
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


DEMO_TASK = re.compile(r"^  task (\d): billed +(\d+) input tokens; upstream conversation holds (\d+) items(.*)$")


def test_demo_bills_growing_input_without_resets_and_flat_input_with_them() -> None:
    """`demo --tasks 4`: the input tokens billed per task grow without resets and stay flat with a reset after each."""
    result = run_cli("demo", "--tasks", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    split = next(i for i, line in enumerate(lines) if line.startswith("The same 4 tasks"))
    runs = [
        [DEMO_TASK.fullmatch(line) for line in part if line.startswith("  task ")]
        for part in (lines[:split], lines[split:])
    ]
    assert all(len(run) == 4 and all(run) for run in runs), result.stdout
    (without, with_reset) = ([m.groups() for m in run if m] for run in runs)
    billed_without = [int(g[1]) for g in without]
    billed_with = [int(g[1]) for g in with_reset]
    assert [g[0] for g in without] == [g[0] for g in with_reset] == ["1", "2", "3", "4"]
    assert billed_without == sorted(set(billed_without)), billed_without  # growing
    assert billed_with == [billed_without[0]] * 4, billed_with  # flat: each task starts from an empty conversation
    # Each task adds its two items (the user's audio, the reply); without resets they pile up.
    assert [g[2] for g in without] == ["2", "4", "6", "8"] and all(g[3] == "" for g in without)
    assert [g[2] for g in with_reset] == ["2"] * 4
    assert all(re.fullmatch(r"; session.reset deleted 2 in [\d.]+ ms, 0 left", g[3]) for g in with_reset)
    totals = f"Input tokens billed for 4 tasks: {sum(billed_without)} without resets, {sum(billed_with)} with them"
    assert lines[-1].startswith(totals)
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


async def test_simulate_with_a_session_cap_closes_each_session_with_openais_reason() -> None:
    """`simulate --session-max-seconds` ends a session at the cap with 1001 and OpenAI's reason (no error first)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "simulate",
        "--port",
        "0",
        "--session-max-seconds",
        "0.3",
        "--no-session-expired-error",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)).decode()
        url = re.search(r"ws://\S+", line)
        assert url is not None, line
        async with connect(url.group(0) + "?model=gpt-realtime") as ws:
            received = [orjson.loads(await ws.recv())["type"]]
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT_S)
        assert received == ["session.created"]
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert closed.value.rcvd.reason == "Your session hit the maximum duration of 60 minutes."
    finally:
        proc.terminate()
        await proc.wait()
