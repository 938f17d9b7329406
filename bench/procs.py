"""The processes under test: start, wait until they accept, read their CPU time and RSS from /proc, stop.

Every service is a child process on 127.0.0.1 with its output in a file in the run's temp dir (never an
unread pipe, which would stall a chatty child). Children get SIGTERM if the benchmark dies, so nothing
outlives a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1

# --- this process -----------------------------------------------------------------------------------


def raise_fd_limit(want: int = 65_536) -> int:
    """Raise the soft open-files limit towards `want` (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def install_uvloop() -> str:
    """Use uvloop for this process's loop when it is installed (the harness should be as light as it can)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def free_port() -> int:
    """A port free right now on loopback (the tiny race until the child binds it is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it when the benchmark process goes away.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- /proc --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of stat


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                out.extend(int(p) for p in f.read().split())
    return out


# --- services -----------------------------------------------------------------------------------------


@dataclass
class Service:
    """One child process serving on `port`; nginx's CPU and RSS include its worker (`with_children`)."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path
    with_children: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *child_pids(self.pid)] if self.with_children else [self.pid]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def rss_bytes(self) -> int:
        return sum(rss_bytes(p) for p in self.pids())

    def url(self, path: str = "/v1/realtime?model=gpt-realtime") -> str:
        return f"ws://{HOST}:{self.port}{path}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; only ever this child's own pid."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), grace_s)


async def _spawn(args: list[str], log_path: Path, stdout: int | None = None) -> asyncio.subprocess.Process:
    log = log_path.open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            cwd=REPO,
            preexec_fn=_die_with_parent,
        )
    finally:
        log.close()  # the child holds its own descriptor


async def wait_listening(service: Service, within_s: float = 20.0) -> None:
    """Poll until the service accepts a TCP connection; fail early (with its log) if it exits."""
    deadline = time.monotonic() + within_s
    while True:
        if service.proc.returncode is not None:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode}:\n{service.log_tail()}")
        try:
            _, writer = await asyncio.open_connection(HOST, service.port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{service.name} did not accept on port {service.port} within {within_s:g} s"
                ) from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def start_upstream(workdir: Path, sim_delay: float) -> Service:
    """The echo + Simulator process; `extra` holds both ports ("echo", "sim")."""
    log_path = workdir / "upstream.log"
    proc = await _spawn(
        [sys.executable, "-m", "bench.upstream", "--sim-delay", str(sim_delay)], log_path, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30.0)
    except TimeoutError:
        proc.kill()
        raise RuntimeError("the upstream process did not start within 30 s") from None
    if not line.startswith(b"READY "):
        await proc.wait()
        raise RuntimeError(f"the upstream process failed:\n{log_path.read_text(errors='replace')[-2000:]}")
    ports: dict[str, int] = orjson.loads(line[6:])
    return Service("upstream", proc, ports["echo"], log_path, extra=ports)


async def start_proxy(
    workdir: Path, name: str, upstream_url: str, extra_toml: str = "", engine: str = "aiohttp"
) -> Service:
    """`python -m proxy --config <toml>` on a port chosen here (the CLI does not report the one it picks), on
    the relay `engine` given ([relay] engine)."""
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(
        "# written by bench/procs.py\n"
        # one worker: the targets are for a single proxy process, and /proc is read for this one pid
        f'[listen]\nhost = "{HOST}"\nport = {port}\nworkers = 1\n\n'
        f'[upstream]\nurl = "{upstream_url}"\n\n'
        f'[relay]\nengine = "{engine}"\n\n'
        # Production settings: info-level JSON lines (one per connection open/close and per reset).
        '[logging]\nlevel = "info"\nformat = "json"\n' + extra_toml,
        encoding="utf-8",
    )
    log_path = workdir / f"{name}.log"
    proc = await _spawn([sys.executable, "-m", "proxy", "--config", str(config)], log_path)
    return await _listening(Service(name, proc, port, log_path))


async def _listening(service: Service, within_s: float = 20.0) -> Service:
    """The service once it accepts connections; stopped (and the error raised) if it does not."""
    try:
        await wait_listening(service, within_s)
    except BaseException:
        await service.stop()
        raise
    return service


def nginx_binary() -> str | None:
    return shutil.which("nginx")


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


_NGINX_CONF = """\
# written by bench/procs.py: a plain WebSocket reverse proxy, the floor for a proxy that parses nothing
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port} backlog=1024;
        location / {{
            proxy_pass http://{host}:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_buffer_size 128k;
            proxy_buffers 4 128k;
            proxy_busy_buffers_size 256k;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


async def start_nginx(binary: str, workdir: Path, upstream_port: int, name: str = "nginx") -> Service:
    directory = workdir / name
    directory.mkdir(exist_ok=True)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=directory, host=HOST, port=port, upstream_port=upstream_port))
    log_path = directory / "stderr.log"
    # -e: the error log before the config is read (the default path may not exist or be writable).
    args = [binary, "-p", f"{directory}/", "-c", str(conf), "-e", str(directory / "error.log")]
    proc = await _spawn(args, log_path)
    return await _listening(Service(name, proc, port, directory / "error.log", with_children=True), within_s=10.0)


async def start_naive(workdir: Path, upstream_url: str) -> Service:
    """The naive aiohttp relay (bench/naive.py): parses nothing, an anchor for what plain forwarding costs."""
    port = free_port()
    log_path = workdir / "naive.log"
    proc = await _spawn(
        [sys.executable, "-m", "bench.naive", "--port", str(port), "--upstream", upstream_url], log_path
    )
    return await _listening(Service("naive", proc, port, log_path))


WS_MODULES = REPO / "tests" / "js" / "node_modules"


def node_relay_missing() -> str | None:
    """Why the Node `ws` relay cannot run here, or None."""
    if shutil.which("node") is None:
        return "no `node` on PATH"
    if not (WS_MODULES / "ws").is_dir():
        return f"{WS_MODULES / 'ws'} is missing: run `make js`"
    return None


async def start_node_relay(workdir: Path, upstream_url: str) -> Service:
    """The Node `ws` relay (bench/ws_relay.mjs), with ws from tests/js (`make js`)."""
    port = free_port()
    log_path = workdir / "node.log"
    node = shutil.which("node") or "node"
    script = str(REPO / "bench" / "ws_relay.mjs")
    os.environ["WS_MODULES"] = str(WS_MODULES)  # inherited by the child: where its `ws` is
    proc = await _spawn([node, script, str(port), upstream_url], log_path)
    return await _listening(Service("node", proc, port, log_path))
