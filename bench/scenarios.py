"""The measurements. Each takes the running targets and a plan, and returns a JSON-ready dict.

A "target" is a URL a client connects to: direct (the upstream itself), the proxy, nginx. Targets are
measured in alternation (rounds, order rotated each round), so a drift of the machine over the run (another
job, thermal, the page cache) lands on all of them alike and "added latency" compares like with like.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import client
from bench.client import WS, BenchError, ConnectError, PacedResult
from bench.frames import audio_frame, big_frame, delta_event
from bench.procs import Service, cpu_seconds, machine_busy_seconds, start_nginx, start_proxy
from bench.reset import run_reset
from bench.stats import quantile_curve, summary

Log = Callable[[str], None]
ADDED_P99_LIMIT_US = 5000.0  # the concurrency criterion: p99 added latency under 5 ms
MIN_PACE = 0.95  # a run "keeps real time" when it sent at least 95 % of the frames real time asks for


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    service: Service | None  # None for direct: there is no relay process to measure


@dataclass(frozen=True)
class Plan:
    mode: str
    latency_samples: dict[str, int]  # per frame size, per target
    latency_warmup: int
    latency_rounds: int
    latency_limit_s: float  # per round and target, a bound if a target turns slow
    tput_warmup_s: float
    tput_measure_s: float
    tput_rounds: int
    tput_window: dict[str, int]
    conc_steps: tuple[int, ...]
    conc_warmup_s: float
    conc_measure_s: float
    conc_budget_s: float
    idle_sessions: int
    reset_items: tuple[int, ...]
    reset_repeats: int
    client_delete_max: int
    reconnects: int


FULL = Plan(
    mode="full",
    latency_samples={"1.3KB": 6000, "100KB": 1500},
    latency_warmup=300,
    latency_rounds=6,
    latency_limit_s=10.0,
    tput_warmup_s=0.4,
    tput_measure_s=1.6,
    tput_rounds=3,
    tput_window={"1.3KB": 64, "100KB": 8},
    conc_steps=(50, 100, 200, 300, 400, 500, 600, 800, 1000),
    conc_warmup_s=1.0,
    conc_measure_s=3.0,
    conc_budget_s=150.0,
    idle_sessions=1000,
    reset_items=(10, 100, 1000),
    reset_repeats=5,
    client_delete_max=1000,
    reconnects=10,
)

QUICK = Plan(
    mode="quick",
    latency_samples={"1.3KB": 1500, "100KB": 300},
    latency_warmup=100,
    latency_rounds=3,
    latency_limit_s=5.0,
    tput_warmup_s=0.3,
    tput_measure_s=0.8,
    tput_rounds=1,
    tput_window={"1.3KB": 64, "100KB": 8},
    conc_steps=(50, 300),
    conc_warmup_s=0.5,
    conc_measure_s=1.5,
    conc_budget_s=30.0,
    idle_sessions=300,
    reset_items=(10, 100, 1000),
    reset_repeats=2,
    client_delete_max=100,  # 1,000 one-by-one deletes alone take 1,000 round trips (25 s)
    reconnects=5,
)


def frames() -> dict[str, bytes]:
    return {"1.3KB": audio_frame(), "100KB": big_frame()}


def frame_sizes() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for size, frame in frames().items():
        down = delta_event(orjson.loads(frame)["audio"], 1)
        out[size] = {"up_bytes": len(frame), "down_bytes": len(down)}
    return out


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


# --- latency ---------------------------------------------------------------------------------------------


async def latency(session: aiohttp.ClientSession, targets: list[Target], plan: Plan, log: Log) -> dict[str, Any]:
    """Ping-pong round trips, one frame in flight, one connection per target, targets in alternation."""
    conns: dict[str, WS] = {}
    out: dict[str, Any] = {}
    try:
        for t in targets:
            conns[t.name] = await client.connect(session, t.url)
        names = list(conns)
        for size, frame in frames().items():
            for name in names:
                await client.ping_pong(conns[name], frame, plan.latency_warmup, plan.latency_limit_s)
            per_round = plan.latency_samples[size] // plan.latency_rounds
            samples: dict[str, list[float]] = {name: [] for name in names}
            for r in range(plan.latency_rounds):
                for name in _rotated(names, r):
                    gc.collect()  # start each batch with a clean heap: a GC pause lands on nobody in particular
                    samples[name] += await client.ping_pong(conns[name], frame, per_round, plan.latency_limit_s)
            res: dict[str, Any] = {}
            for name in names:
                res[name] = {**summary(samples[name]), "cdf": quantile_curve(samples[name])}
            for name in names:
                if name != "direct":
                    res[name]["added_p50"] = res[name]["p50"] - res["direct"]["p50"]
                    res[name]["added_p99"] = res[name]["p99"] - res["direct"]["p99"]
            out[size] = res
            log(
                f"  {size}: "
                + ", ".join(
                    f"{n} p50 {res[n]['p50']:.0f} µs / p99 {res[n]['p99']:.0f} µs"
                    + (f" (+{res[n]['added_p50']:.0f} / +{res[n]['added_p99']:.0f})" if n != "direct" else "")
                    for n in names
                )
            )
    finally:
        await client.close_all(list(conns.values()))
    return out


# --- throughput ------------------------------------------------------------------------------------------


async def throughput(session: aiohttp.ClientSession, targets: list[Target], plan: Plan, log: Log) -> dict[str, Any]:
    """Pipelined frames/s on one connection per target (a window of frames in flight)."""
    conns: dict[str, WS] = {}
    out: dict[str, Any] = {}
    try:
        for t in targets:
            conns[t.name] = await client.connect(session, t.url)
        names = list(conns)
        for size, frame in frames().items():
            window = plan.tput_window[size]
            rates: dict[str, list[float]] = {name: [] for name in names}
            for r in range(plan.tput_rounds):
                for name in _rotated(names, r):
                    try:
                        rate = await client.pipelined(
                            conns[name], frame, window, plan.tput_warmup_s, plan.tput_measure_s
                        )
                    except TimeoutError as exc:
                        raise BenchError(f"{name}, {size} frames: replies stopped coming") from exc
                    rates[name].append(rate)
            res: dict[str, Any] = {"window": window}
            for name in names:
                res[name] = {"rounds": rates[name], "fps": statistics.median(rates[name])}
            for name in names:
                res[name]["ratio"] = res[name]["fps"] / res["direct"]["fps"]
            out[size] = res
            log(f"  {size}: " + ", ".join(f"{n} {res[n]['fps']:,.0f}/s (x{res[n]['ratio']:.2f})" for n in names))
    finally:
        await client.close_all(list(conns.values()))
    return out


# --- concurrency -----------------------------------------------------------------------------------------


def _paced_summary(r: PacedResult) -> dict[str, Any]:
    s = summary(r.latencies_us)
    cores = {k: v / r.cpu_window_s for k, v in r.cpu_s.items()} if r.cpu_window_s > 0 else {}
    if "machine" in cores:
        # what the rest of the machine (other jobs) used meanwhile: the run's noise floor
        cores["other"] = cores["machine"] - sum(v for k, v in cores.items() if k != "machine")
    return {
        "p50": s["p50"],
        "p99": s["p99"],
        "max": s["max"],
        "samples": s["n"],
        "pace": r.pace,
        "max_lag_ms": r.max_lag_ms,
        "unanswered": r.sent - r.received,
        "errors": r.errors,
        "cpu_s": r.cpu_s.get("relay"),
        "cpu_window_s": r.cpu_window_s,
        "frames_in_window": r.sent_in_window,
        "cores": cores,
    }


async def _paced_target(
    session: aiohttp.ClientSession, t: Target, upstream: Service, n: int, frame: bytes, plan: Plan
) -> PacedResult:
    me = os.getpid()

    def probe() -> dict[str, float]:
        out = {"client": cpu_seconds(me), "upstream": upstream.cpu_seconds(), "machine": machine_busy_seconds()}
        if t.service:
            out["relay"] = t.service.cpu_seconds()
        return out

    sockets = await client.connect_many(session, t.url, n)
    try:
        return await asyncio.wait_for(
            client.paced(sockets, frame, plan.conc_warmup_s, plan.conc_measure_s, probe),
            plan.conc_warmup_s + plan.conc_measure_s + 30.0,
        )
    finally:
        await client.close_all(sockets)


async def concurrency(
    session: aiohttp.ClientSession, targets: list[Target], upstream: Service, plan: Plan, log: Log
) -> dict[str, Any]:
    """Step N up: N sessions per target, each at real-time pace; a relay holds N while its p99 added latency
    stays under 5 ms, every frame is answered and the load keeps pace."""
    frame = frames()["1.3KB"]
    by_name = {t.name: t for t in targets}
    relays = [t.name for t in targets if t.name != "direct"]
    held: dict[str, int] = {name: 0 for name in by_name}
    failed: set[str] = set()
    steps: list[dict[str, Any]] = []
    stopped = f"all steps done (up to {plan.conc_steps[-1]})"
    started = time.monotonic()
    for n in plan.conc_steps:
        if time.monotonic() - started > plan.conc_budget_s:
            stopped = f"time budget of {plan.conc_budget_s:g} s spent before N = {n}"
            break
        step: dict[str, Any] = {"n": n}
        direct = _paced_summary(await _paced_target(session, by_name["direct"], upstream, n, frame, plan))
        step["direct"] = direct
        direct_ok = direct["pace"] >= MIN_PACE and not direct["errors"] and direct["unanswered"] == 0
        line = f"  N = {n}: direct p99 {direct['p99'] / 1000:.2f} ms, pace {direct['pace']:.2f}"
        if not direct_ok:
            steps.append(step)
            stopped = f"the load generator could not keep {n} direct sessions at real-time pace"
            log(line + " — " + stopped)
            break
        held["direct"] = n
        for name in relays:
            if name in failed:
                continue
            t = by_name[name]
            try:
                r = _paced_summary(await _paced_target(session, t, upstream, n, frame, plan))
            except BenchError as exc:
                failed.add(name)
                step[name] = {"ok": False, "error": _with_log(exc, t.service)}
                line += f"; {name} FAILED: {step[name]['error']}"
                continue
            r["added_p99"] = r["p99"] - direct["p99"]
            r["added_p50"] = r["p50"] - direct["p50"]
            if r["cpu_s"] is not None and r["cpu_window_s"] > 0 and r["frames_in_window"]:
                r["cpu_core_per_session"] = r["cpu_s"] / r["cpu_window_s"] / n
                relayed = r["frames_in_window"] * 2  # each frame crosses the relay twice: append up, delta down
                r["cpu_us_per_frame"] = r["cpu_s"] / relayed * 1e6
            r["ok"] = (
                r["added_p99"] < ADDED_P99_LIMIT_US
                and r["pace"] >= MIN_PACE
                and not r["errors"]
                and not r["unanswered"]
            )
            step[name] = r
            if r["ok"]:
                held[name] = n
            else:
                failed.add(name)
            line += (
                f"; {name} p99 {r['p99'] / 1000:.2f} ms (+{r['added_p99'] / 1000:.2f}), pace {r['pace']:.2f}, "
                f"CPU {100 * r.get('cpu_core_per_session', 0):.2f} % of a core per session, "
                f"machine {r['cores'].get('machine', 0):.2f} cores busy" + ("" if r["ok"] else " — FAILED")
            )
        steps.append(step)
        log(line)
        if relays and all(name in failed for name in relays):
            stopped = f"every relay failed by N = {n}"
            break
    return {"steps": steps, "held": held, "stopped": stopped, "limit_added_p99_us": ADDED_P99_LIMIT_US}


# --- memory ----------------------------------------------------------------------------------------------


async def memory(
    session: aiohttp.ClientSession,
    workdir: Path,
    echo_url: str,
    echo_port: int,
    nginx: str | None,
    plan: Plan,
    log: Log,
) -> dict[str, Any]:
    """RSS per idle open session, each relay in a FRESH process: one that already served the other
    scenarios would reuse freed memory for the new sessions and look cheaper than it is."""
    out: dict[str, Any] = {"sessions": plan.idle_sessions}
    starters: list[tuple[str, Callable[[], Awaitable[Service]]]] = [
        ("proxy", lambda: start_proxy(workdir, "proxy-mem", echo_url)),
        ("wire", lambda: start_proxy(workdir, "wire-mem", echo_url, engine="protocol")),
    ]
    if nginx:
        starters.append(("nginx", lambda: start_nginx(nginx, workdir, echo_port, name="nginx-mem")))
    for name, start in starters:
        result = await _idle_rss_fresh(session, start, plan.idle_sessions, name, log)
        if "error" in result and result["opened"] >= 50:
            # It holds fewer: measure what it does hold (a fresh process again), and keep the failure.
            fewer = result["opened"] // 10 * 10
            retry = await _idle_rss_fresh(session, start, fewer, name, log)
            if "error" not in retry:
                result = {**retry, "error": result["error"], "sessions": fewer}
        out[name] = result
    # The same proxy keeping a warm spare per connection ([reset] strategy = "swap"): two upstream sockets each,
    # on each engine.
    swap = '\n[reset]\nstrategy = "swap"\n'
    for key, engine, name in (("proxy_swap", "aiohttp", "proxy"), ("wire_swap", "protocol", "wire")):
        start = functools.partial(start_proxy, workdir, f"{name}-mem-swap", echo_url, swap, engine=engine)
        out[key] = await _idle_rss_fresh(session, start, plan.idle_sessions, f"{name}, strategy swap", log)
    return out


async def _idle_rss_fresh(
    session: aiohttp.ClientSession, start: Callable[[], Awaitable[Service]], n: int, name: str, log: Log
) -> dict[str, Any]:
    """Start the relay, measure with `n` idle sessions, stop it; a failure comes back as `error`/`opened`."""
    service = await start()
    try:
        return await _idle_rss(session, service, n, name, log)
    except BenchError as exc:
        error = _with_log(exc, service)
        log(f"  {name}: FAILED with {n:,} sessions: {error}")
        return {"error": error, "opened": exc.opened if isinstance(exc, ConnectError) else 0, "sessions": n}
    finally:
        await service.stop()


async def _idle_rss(session: aiohttp.ClientSession, service: Service, n: int, name: str, log: Log) -> dict[str, Any]:
    url = service.url()
    # warm up: imports, first-connection caches and the like are not per-session costs
    await client.close_all(await client.connect_many(session, url, 20))
    await asyncio.sleep(0.5)
    before = service.rss_bytes()
    sockets = await client.connect_many(session, url, n)
    try:
        await asyncio.sleep(1.0)  # let per-connection tasks settle
        after = service.rss_bytes()
    finally:
        await client.close_all(sockets)
    per = (after - before) / n
    log(f"  {name}: {before / 2**20:.1f} MiB → {after / 2**20:.1f} MiB, {per / 1024:.1f} KiB per session")
    return {"rss_before": before, "rss_after": after, "per_session_kib": per / 1024}


def _with_log(exc: BaseException, service: Service | None, limit: int = 400) -> str:
    """The failure, and the relay's last log line: that is usually where the reason is."""
    text = str(exc).replace("\n", " ")
    last = service.log_tail(1).strip() if service else ""
    if last:
        text += f" (its last log line: {last})"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- reset -----------------------------------------------------------------------------------------------


async def reset(
    session: aiohttp.ClientSession, workdir: Path, upstream: Service, delay_s: float, plan: Plan, log: Log
) -> dict[str, Any]:
    sim_base = f"ws://127.0.0.1:{upstream.extra['sim']}/v1/realtime"
    line_url = f"ws://127.0.0.1:{upstream.extra['sim_via_delay_line']}/v1/realtime?model=gpt-realtime"
    # On the default engine (the Protocol relay), the one the targets judge.
    proxy = await start_proxy(workdir, "proxy-sim", sim_base, engine="protocol")
    swap_proxy = await start_proxy(
        workdir, "proxy-sim-swap", sim_base, '\n[reset]\nstrategy = "swap"\n', engine="protocol"
    )
    try:
        r = await run_reset(
            session,
            proxy.url(),
            sim_base + "?model=gpt-realtime",
            line_url,
            delay_s,
            list(plan.reset_items),
            plan.reset_repeats,
            plan.client_delete_max,
            plan.reconnects,
            log,
            swap_proxy.url(),
        )
    finally:
        await proxy.stop()
        await swap_proxy.stop()
    return {
        "delay_s": r.delay_s,
        "items": r.items,
        "reset_ms": {str(n): v for n, v in r.reset_ms.items()},
        "reset_median_ms": {str(n): r.reset_median(n) for n in r.items},
        "swap_ms": {str(n): v for n, v in r.swap_ms.items()},
        "swap_median_ms": {str(n): statistics.median(v) for n, v in r.swap_ms.items()},
        "client_delete_ms": {str(n): v for n, v in r.client_delete_ms.items()},
        "pipelined_delete_ms": {str(n): v for n, v in r.pipelined_delete_ms.items()},
        "pipelined_delete_median_ms": {str(n): statistics.median(v) for n, v in r.pipelined_delete_ms.items()},
        "reconnect_ms": r.reconnect_ms,
        "reconnect_median_ms": statistics.median(r.reconnect_ms),
        "reconnect_loopback_ms": r.reconnect_loopback_ms,
        "reconnect_loopback_median_ms": statistics.median(r.reconnect_loopback_ms),
    }


__all__ = ["FULL", "QUICK", "BenchError", "Plan", "Target", "concurrency", "latency", "memory", "reset", "throughput"]
