"""`python -m bench [--quick]`: start the upstream, the proxy and nginx, run every scenario, write the report.

Exit codes: 0 done (targets met or not: the table says), 1 the benchmark itself failed, 3 with ``--strict``
when a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

from bench import report, scenarios
from bench.client import BenchError, client_session
from bench.procs import (
    REPO,
    Service,
    cpu_seconds,
    install_uvloop,
    machine_busy_seconds,
    nginx_binary,
    nginx_version,
    node_relay_missing,
    raise_fd_limit,
    start_naive,
    start_nginx,
    start_node_relay,
    start_proxy,
    start_upstream,
)
from bench.scenarios import FULL, QUICK, Plan, Target

RESULTS = Path(__file__).resolve().parent / "results"
SIM_DELAY_S = 0.025  # the fixed one-way upstream delay for the reset scenario
SCENARIOS = ("latency", "throughput", "concurrency", "memory", "reset")
TIMED = ("latency", "throughput", "concurrency")  # the scenarios other jobs on the machine distort
QUIET_CORES = 0.3  # other processes busier than this (cores) make timings noisy
_t0 = time.monotonic()


def log(line: str) -> None:
    print(f"[{time.monotonic() - _t0:6.1f}s] {line}", flush=True)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return out.stdout.strip()


def _meta(plan: Plan, loop: str, nginx: str | None) -> dict[str, Any]:
    return {
        "mode": plan.mode,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loop": loop,
        "aiohttp": metadata.version("aiohttp"),
        "websockets": metadata.version("websockets"),
        "orjson": metadata.version("orjson"),
        "nginx": nginx_version(nginx) if nginx else "not installed",
        "frame_sizes": scenarios.frame_sizes(),
        "loadavg_start": os.getloadavg(),
        "sim_delay_s": SIM_DELAY_S,
    }


async def _other_load(seconds: float) -> float:
    """Cores kept busy by processes other than this one, averaged over `seconds`."""
    t, busy, ours = time.monotonic(), machine_busy_seconds(), cpu_seconds(os.getpid())
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t
    return max(0.0, (machine_busy_seconds() - busy - (cpu_seconds(os.getpid()) - ours)) / elapsed)


async def _wait_quiet(max_wait_s: float) -> float:
    """Wait (at most `max_wait_s`) until other jobs leave the CPUs mostly idle; returns the last load seen."""
    deadline = time.monotonic() + max_wait_s
    load = await _other_load(1.0)
    said = -1e9
    while load > QUIET_CORES and time.monotonic() < deadline:
        if time.monotonic() - said >= 10:
            said = time.monotonic()
            log(f"other processes keep {load:.2f} cores busy; waiting for a quieter machine (up to {max_wait_s:g} s)")
        load = await _other_load(2.0)
    if load > QUIET_CORES:
        log(f"still {load:.2f} cores busy elsewhere: measuring anyway, the report will say the run was noisy")
    return load


async def _run(plan: Plan, only: set[str], use_nginx: bool, workdir: Path, wait_quiet_s: float) -> dict[str, Any]:
    loop = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    nginx = nginx_binary() if use_nginx else None
    results: dict[str, Any] = {"meta": _meta(plan, loop, nginx), "plan": dataclasses.asdict(plan), "skipped": {}}
    if not use_nginx:
        results["skipped"]["nginx"] = "--no-nginx"
    elif nginx is None:
        results["skipped"]["nginx"] = "no `nginx` binary on PATH (e.g. apt-get install nginx-light)"
        log("nginx: not on PATH, skipped (install it to compare against a plain C WebSocket proxy)")

    t = time.monotonic()
    results["meta"]["other_load_before"] = await _wait_quiet(wait_quiet_s)
    results["meta"]["waited_s"] = round(time.monotonic() - t, 1)
    # the code under test is what is checked out when the proxy starts, not when the wait began
    results["meta"]["commit"] = _git("rev-parse", "--short", "HEAD") or "unknown"
    results["meta"]["dirty"] = bool(_git("status", "--porcelain", "--", "proxy"))
    services: list[Service] = []
    try:
        upstream = await start_upstream(workdir, SIM_DELAY_S)
        services.append(upstream)
        echo_port, sim_port = upstream.extra["echo"], upstream.extra["sim"]
        echo_base = f"ws://127.0.0.1:{echo_port}/v1/realtime"
        proxy = await start_proxy(workdir, "proxy", echo_base)
        services.append(proxy)
        wire = await start_proxy(workdir, "wire", echo_base, engine="protocol")
        services.append(wire)
        targets = [
            Target("direct", echo_base + "?model=gpt-realtime", None),
            Target("proxy", proxy.url(), proxy),
            Target("wire", wire.url(), wire),
        ]
        if nginx:
            try:
                ngx = await start_nginx(nginx, workdir, echo_port)
            except RuntimeError as exc:
                results["skipped"]["nginx"] = f"it did not start: {str(exc).splitlines()[0]}"
                log(f"nginx: did not start, skipped: {exc}")
                nginx = None
            else:
                services.append(ngx)
                targets.append(Target("nginx", ngx.url(), ngx))
        # Anchors that parse nothing: a naive aiohttp relay, and a Node `ws` relay when node and ws are here.
        naive = await start_naive(workdir, echo_base)
        services.append(naive)
        targets.append(Target("naive", naive.url(), naive))
        missing = node_relay_missing()
        if missing is None:
            node = await start_node_relay(workdir, echo_base)
            services.append(node)
            targets.append(Target("node", node.url(), node))
        else:
            results["skipped"]["node"] = missing
            log(f"node ws relay: skipped ({missing})")
        log(
            f"upstream pid {upstream.pid} (echo :{echo_port}, simulator :{sim_port}); proxy pid {proxy.pid} "
            f":{proxy.port}; wire (protocol engine) pid {wire.pid} :{wire.port}"
            + (
                f"; nginx pid {targets[-1].service.pid} :{targets[-1].service.port}"
                if nginx and targets[-1].service
                else ""
            )
        )

        async with client_session() as session:
            steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
                ("latency", lambda: scenarios.latency(session, targets, plan, log)),
                ("throughput", lambda: scenarios.throughput(session, targets, plan, log)),
                ("concurrency", lambda: scenarios.concurrency(session, targets, upstream, plan, log)),
                ("memory", lambda: scenarios.memory(session, workdir, echo_base, echo_port, nginx, plan, log)),
                ("reset", lambda: scenarios.reset(session, workdir, upstream, SIM_DELAY_S, plan, log)),
            ]
            for name, step in steps:
                if name not in only:
                    continue
                log(f"{name} ...")
                t, busy, ours = time.monotonic(), machine_busy_seconds(), _our_cpu(services)
                try:
                    results[name] = await step()
                except (BenchError, TimeoutError, aiohttp.ClientError) as exc:
                    # one broken scenario still leaves the others' numbers worth writing down
                    results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
                    log(f"{name} FAILED: {exc!r}"[:500])
                elapsed = time.monotonic() - t
                results.setdefault("durations_s", {})[name] = round(elapsed, 1)
                # Cores busy meanwhile, ours and the rest's (other jobs on a shared machine make noise).
                # Processes a scenario starts for itself (memory, reset) count as "other".
                used = (machine_busy_seconds() - busy) / elapsed
                mine = (_our_cpu(services) - ours) / elapsed
                other = max(0.0, used - mine)  # loopback softirq time is nobody's: it can tip this below 0
                results.setdefault("machine_cores", {})[name] = {"busy": used, "ours": mine, "other": other}
    except BaseException:
        for service in services:
            tail = service.log_tail()
            if tail:
                print(f"--- last lines of {service.name}'s log ({service.log_path}):\n{tail}", file=sys.stderr)
        raise
    finally:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                await service.stop()
    return results


def _our_cpu(services: list[Service]) -> float:
    total = cpu_seconds(os.getpid())
    for service in services:
        with contextlib.suppress(OSError):
            total += service.cpu_seconds()
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency, throughput, concurrency, memory and reset timings: direct vs proxy vs nginx.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    parser.add_argument(
        "--name", help="output file stem (default: latest for a full run, quick for --quick)", default=None
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out even when it is installed")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios (default all: {','.join(SCENARIOS)})"
    )
    parser.add_argument("--strict", action="store_true", help="exit 3 when the proxy misses a target")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        metavar="SECONDS",
        default=None,
        help="wait up to this long for other jobs to leave the CPUs idle before measuring "
        "(default 60 for a full run, 0 for --quick)",
    )

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        print(f"python -m bench: unknown scenario(s) {sorted(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    stem = args.name or ("quick" if args.quick else "latest")
    # the memory scenario holds 1,000 sessions: 1 fd each here, 2 in the proxy, 1 in the upstream
    fds = raise_fd_limit()
    loop = install_uvloop()
    log(
        f"{plan.mode} run; scenarios: {', '.join(s for s in SCENARIOS if s in only)}; open-files limit {fds}; "
        f"harness loop {loop}"
    )
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="rrp-bench-") as tmp:
            wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 60.0)
            results = asyncio.run(_run(plan, only, not args.no_nginx, Path(tmp), wait_quiet))
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"python -m bench: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m bench: interrupted", file=sys.stderr)
        return 130
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_end"] = os.getloadavg()
    other = {k: v["other"] for k, v in results.get("machine_cores", {}).items() if k in TIMED}
    results["meta"]["noisy"] = {k: round(v, 2) for k, v in other.items() if v > QUIET_CORES}
    results["meta"]["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    args.out.mkdir(parents=True, exist_ok=True)
    md = report.markdown(results)
    (args.out / f"{stem}.md").write_text(md, encoding="utf-8")
    report.write_json(results, args.out / f"{stem}.json")
    why_not = report.plot(results, args.out / f"{stem}.png")
    print()
    print(md)
    written = [f"{stem}.md", f"{stem}.json"] + ([] if why_not else [f"{stem}.png"])
    print(f"written to {args.out}: {', '.join(written)}" + (f" (no plot: {why_not})" if why_not else ""))
    missed = [r.metric for r in report.rows(results) if r.met is False]
    if missed:
        print(f"targets missed: {'; '.join(missed)}")
    if results.get("errors"):
        print(f"python -m bench: scenario(s) failed: {', '.join(results['errors'])}", file=sys.stderr)
        return 1
    return 3 if args.strict and missed else 0
