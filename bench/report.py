"""The results as a Markdown table (one row per metric: direct / proxy / nginx / target / met?), JSON and a PNG.

The targets are the issue's, for the proxy; nginx is shown as the floor a relay that parses nothing reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# The issues' targets (4, then 12's stricter ones for throughput, memory and CPU), for one proxy process on
# the benchmark machine.
ADDED_P50_US = 100.0
ADDED_P99_US = 300.0
THROUGHPUT_RATIO = 0.75
SESSIONS = 300
RSS_KIB = 32.0
CPU_US_PER_FRAME = 15.0
RESET_ITEMS = 1000
RESET_SLACK_MS = 20.0  # a 1,000-item reset within 2 x the one-way delay + 20 ms

# "wire" is the proxy on its Protocol engine ([relay] engine = "protocol", proxy/wire.py, the default), "proxy"
# the same proxy on its aiohttp engine (proxy/relay.py). The targets' "met?" column judges JUDGED. nginx, the
# naive aiohttp relay (bench/naive.py) and the Node `ws` relay (bench/ws_relay.mjs) parse nothing: anchors.
NAMES = ("direct", "proxy", "wire", "nginx", "naive", "node")
JUDGED = "wire"
HEADERS = {
    "direct": "direct",
    "proxy": "proxy (aiohttp)",
    "wire": "proxy (protocol, default)",
    "nginx": "nginx",
    "naive": "naive aiohttp relay",
    "node": "Node ws relay",
}


@dataclass
class Row:
    metric: str
    direct: str = "—"
    proxy: str = "—"
    nginx: str = "—"
    target: str = ""
    met: bool | None = None
    wire: str = "—"
    naive: str = "—"
    node: str = "—"

    @classmethod
    def of(cls, metric: str, values: Any, target: str = "", met: bool | None = None) -> Row:
        """A row from the target cells in NAMES order."""
        direct, proxy, wire, nginx, naive, node = values
        return cls(metric, direct, proxy, nginx, target, met, wire, naive, node)

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("yes" if self.met else "**no**")
        return [self.metric, self.direct, self.proxy, self.wire, self.nginx, self.naive, self.node, self.target, met]


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return fmt.format(x)


def _signed(x: Any, fmt: str = "{:+,.0f}") -> str:
    return _num(x, fmt)


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _ok(x: Any, test: Any) -> bool | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return bool(test(x))


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    lat = results.get("latency") or {}
    for size, label in (("1.3KB", "1.3 KB"), ("100KB", "100 KB")):
        res = lat.get(size)
        if not res:
            continue
        small = size == "1.3KB"
        for q in ("p50", "p99"):
            out.append(Row.of(f"Round trip {q}, {label} frames (µs)", [_num(_get(res, n, q)) for n in NAMES]))
        for q, limit in (("p50", ADDED_P50_US), ("p99", ADDED_P99_US)):
            added = _get(res, JUDGED, f"added_{q}")
            out.append(
                Row(
                    f"Added {q} vs direct, {label} (µs)",
                    "—",
                    _signed(_get(res, "proxy", f"added_{q}")),
                    _signed(_get(res, "nginx", f"added_{q}")),
                    f"≤ {limit:.0f}" if small else "",
                    _ok(added, lambda x, lim=limit: x <= lim) if small else None,
                    _signed(_get(res, "wire", f"added_{q}")),
                    _signed(_get(res, "naive", f"added_{q}")),
                    _signed(_get(res, "node", f"added_{q}")),
                )
            )
    tput = results.get("throughput") or {}
    for size, label in (("1.3KB", "1.3 KB"), ("100KB", "100 KB")):
        res = tput.get(size)
        if not res:
            continue
        out.append(Row.of(f"Pipelined throughput, {label} (frames/s)", [_num(_get(res, n, "fps")) for n in NAMES]))
        ratio = _get(res, JUDGED, "ratio")
        out.append(
            Row.of(
                f"Throughput vs direct, {label}",
                [_num(_get(res, n, "ratio"), "{:.2f}") for n in NAMES],
                f"≥ {THROUGHPUT_RATIO:.2f}",
                _ok(ratio, lambda x: x >= THROUGHPUT_RATIO),
            )
        )
    conc = results.get("concurrency")
    if conc:
        out.extend(_concurrency_rows(conc))
    mem = results.get("memory")
    if mem:
        per = _get(mem, JUDGED, "per_session_kib")

        def rss(name: str) -> str:
            value = _num(_get(mem, name, "per_session_kib"), "{:.1f}")
            if not _get(mem, name, "error"):
                return value
            held = _get(mem, name, "sessions")
            # it could not open them all: the figure measured at what it held, if any
            return f"{value} at {held:,} (failed at {mem['sessions']:,})" if value != "—" else "failed"

        out.append(
            Row(
                f"RSS per idle session, {mem['sessions']:,} open (KiB)",
                "—",
                rss("proxy"),
                rss("nginx"),
                f"≤ {RSS_KIB:.0f}",
                None if _get(mem, JUDGED, "error") else _ok(per, lambda x: x <= RSS_KIB),
                rss("wire"),
            )
        )
        if "proxy_swap" in mem or "wire_swap" in mem:
            out.append(
                Row(
                    f"RSS per idle session with a warm spare (strategy swap), {mem['sessions']:,} open (KiB)",
                    "—",
                    rss("proxy_swap"),
                    wire=rss("wire_swap"),
                )
            )
    rst = results.get("reset")
    if rst:
        out.extend(_reset_rows(rst))
    return out


def _concurrency_rows(conc: dict[str, Any]) -> list[Row]:
    held = conc["held"]
    steps = conc["steps"]
    failed = {name for s in steps for name in NAMES if name != "direct" and _get(s, name, "ok") is False}
    measured = [name for name in NAMES if any(name in s for s in steps)]

    def held_cell(name: str) -> str:
        if name not in measured:
            return "—"
        if name == "direct":  # no relay: how far the load generator and the echo kept real-time pace
            return f"pace kept to {held[name]:,}"
        # not failed: the run stopped first (load generator or time), so this is a lower bound
        return f"{held[name]:,}" if name in failed else f"≥ {held[name]:,}"

    out = [
        Row.of(
            "Real-time sessions held, p99 added < 5 ms",
            [held_cell(n) for n in NAMES],
            f"≥ {SESSIONS}",
            held.get(JUDGED, 0) >= SESSIONS if JUDGED in measured else None,
        )
    ]
    at = next((s for s in steps if s["n"] == SESSIONS), None)
    if at:
        out.append(
            Row.of(
                f"p99 round trip at {SESSIONS} sessions (ms)",
                [_num((_get(at, n, "p99") or math.nan) / 1000, "{:.2f}") for n in NAMES],
            )
        )
    # CPU at the largest step each relay was measured at without failing (else its first step)
    cpu: dict[str, str] = {}
    for name in NAMES[1:]:
        good = [s for s in steps if _get(s, name, "ok")] or [s for s in steps if name in s]
        if good:
            s = good[-1]
            share = _get(s, name, "cpu_core_per_session")
            per_frame = _get(s, name, "cpu_us_per_frame")
            if share is not None:
                cpu[name] = f"{100 * share:.2f} % ({per_frame:.0f} µs/frame, N = {s['n']})"
    judged = next((s for s in reversed(steps) if _get(s, JUDGED, "ok")), None)
    per_frame = _get(judged, JUDGED, "cpu_us_per_frame")
    out.append(
        Row.of(
            "CPU per real-time session (% of a core)",
            ["—", *(cpu.get(n, "—") for n in NAMES[1:])],
            f"≤ {CPU_US_PER_FRAME:.0f} µs/frame",
            _ok(per_frame, lambda x: x <= CPU_US_PER_FRAME),
        ),
    )
    return out


def _reset_rows(rst: dict[str, Any]) -> list[Row]:
    items = rst["items"]
    counts = " / ".join(f"{n:,}" for n in items)

    def cells(values: dict[str, Any]) -> str:
        return " / ".join(
            _num(values.get(str(n)), "{:,.0f}" if (values.get(str(n)) or 0) >= 100 else "{:.1f}") for n in items
        )

    limit = 2 * rst["delay_s"] * 1000 + RESET_SLACK_MS
    big = rst["reset_median_ms"].get(str(RESET_ITEMS))
    reconnect = rst["reconnect_median_ms"]
    return [
        # The reset scenario runs on the proxy's default engine, the Protocol relay (the "wire" column).
        Row(
            f"`session.reset` through the proxy, {counts} items (ms)",
            wire=cells(rst["reset_median_ms"]),
            target=f"{RESET_ITEMS:,}: ≤ {limit:.0f}",
            met=_ok(big, lambda x: x <= limit),
        ),
        Row(
            f"`session.reset` by swap to a warm spare, {counts} items (ms)",
            wire=cells(rst.get("swap_median_ms", {})) if rst.get("swap_median_ms") else "—",
            target="≤ 1 + own processing",
        ),
        Row(f"Client deletes one at a time, {counts} items (ms)", cells(rst["client_delete_ms"])),
        Row(f"Client deletes all at once (floor), {counts} items (ms)", cells(rst["pipelined_delete_median_ms"])),
        Row("Reconnect, handshake through the delay (ms)", _num(reconnect, "{:.1f}")),
        Row("Reconnect, handshake on loopback (ms)", _num(rst["reconnect_loopback_median_ms"], "{:.1f}")),
        Row(
            f"{RESET_ITEMS:,}-item reset vs reconnect (ms)",
            target="faster",
            met=_ok(big, lambda x: x < reconnect),
            wire=f"{big:.1f} vs {reconnect:.1f}" if big is not None else "—",
        ),
    ]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    table = [["Metric", *(HEADERS[n] for n in NAMES), "target", "met?"]]
    table.append(["---", *(["---:"] * len(NAMES)), "---", "---"])
    table += [r.cells() for r in rows(results)]
    lines = [f"# Benchmark: {meta['mode']} run, {meta['finished']}", ""]
    if meta.get("noisy"):
        busy = ", ".join(f"{k} {v:.2f}" for k, v in meta["noisy"].items())
        lines += [
            f"> **Noisy run**: other processes kept CPUs busy while timing ({busy} cores on average); "
            "these numbers understate what the proxy does on a quiet machine. Rerun when it is idle.",
            "",
        ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    lines += ["", *notes(results)]
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    sizes = meta["frame_sizes"]
    waited = meta.get("waited_s", 0.0)
    measured = meta["duration_s"] - waited
    out = [
        f"- Machine: {meta['cpus']} CPUs, {meta['platform']}; Python {meta['python']} ({meta['loop']} in the "
        f"harness); aiohttp {meta['aiohttp']}, websockets {meta['websockets']}; nginx: {meta['nginx']}; "
        f"proxy at commit {meta['commit']}{' (+ uncommitted changes)' if meta['dirty'] else ''}.",
        f"- Each of client (this process), proxy, nginx and the upstream (echo + Simulator) is its own process "
        f"on 127.0.0.1; all share the {meta['cpus']} cores. Run took {measured:.0f} s"
        + (f" (after {waited:.0f} s waiting for a quieter machine)." if waited > 2 else "."),
        f"- Frames: `input_audio_buffer.append` of {sizes['1.3KB']['up_bytes']:,} B (20 ms of 24 kHz pcm16) and "
        f"{sizes['100KB']['up_bytes']:,} B up; the echo answers each with a `response.output_audio.delta` "
        f"carrying the same audio ({sizes['1.3KB']['down_bytes']:,} B and {sizes['100KB']['down_bytes']:,} B).",
        "- Added latency is the relay's percentile minus direct's, measured in alternating rounds in the same run.",
    ]
    conc = results.get("concurrency")
    if conc:
        out.append(
            "- Real-time sessions: N connections each send one 20 ms frame every 20 ms (phases spread), for "
            f"{results['plan']['conc_measure_s']:g} s after a {results['plan']['conc_warmup_s']:g} s warm-up; held = "
            "p99 added < 5 ms, every frame answered, ≥ 95 % of real-time pace. Stepping stopped: "
            f"{conc['stopped']}. A '≥' is a lower bound. CPU per session = the relay's CPU seconds (from "
            "/proc) over the window / window / N."
        )
    rst = results.get("reset")
    if rst:
        d = rst["delay_s"] * 1000
        out.append(
            f"- Reset rows: the project's Simulator delays every frame it sends by {d:g} ms, so a request and its "
            f"answer cost one delay. `session.reset` → `session.reset.completed` through the proxy (median of "
            f"{results['plan']['reset_repeats']}); beside it, direct to the same Simulator, the client deleting the "
            "items itself one `conversation.item.delete` at a time (each waiting for its ack), and all at once "
            "(every delete sent, then every ack awaited: the floor for any reset against this upstream, so reset "
            "minus floor is the proxy's share). Items are created with pipelined `conversation.item.create` before "
            "each measurement."
        )
        out.append(
            "- Reconnect = a new WebSocket up to its `session.created` (the old one's close runs meanwhile). "
            "'Through the delay': via a delay line that delays every server byte by the same delay and holds a new "
            "connection's first bytes one delay (the TCP handshake), i.e. one round trip for TCP and one for the "
            "upgrade; a real `wss://` reconnect adds TLS on top. 'On loopback': straight to the Simulator, whose "
            "handshake is not delayed, a lower bound no real reconnect reaches."
        )
    cores = results.get("machine_cores") or {}
    if cores:
        other = ", ".join(
            f"{k} {v['other']:.2f}" for k, v in cores.items() if k in ("latency", "throughput", "concurrency")
        )
        out.append(
            f"- Other load on the machine while measuring (cores busy outside this benchmark's processes): {other}; "
            f"load average {meta['loadavg_start'][0]:.2f} at the start, {meta['loadavg_end'][0]:.2f} at the end."
        )
    for s in (results.get("concurrency") or {}).get("steps", []):
        for name in NAMES:
            if _get(s, name, "error"):
                out.append(f"- **{name} failed at {s['n']} sessions**: {s[name]['error']}")
    for name in NAMES:
        if _get(results, "memory", name, "error"):
            out.append(
                f"- **{name} failed the memory scenario** with {results['memory']['sessions']:,} sessions: "
                f"{results['memory'][name]['error']}"
            )
    for name, error in (results.get("errors") or {}).items():
        out.append(f"- **scenario {name} failed**: {error}")
    for name, reason in results.get("skipped", {}).items():
        out.append(f"- {name} skipped: {reason}")
    return out


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Write the PNG; returns why not when matplotlib is missing (see bench/requirements.txt)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r bench/requirements.txt)"
    colors = {
        "direct": "#444444",
        "proxy": "#d62728",
        "wire": "#2ca02c",
        "nginx": "#1f77b4",
        "naive": "#9467bd",
        "node": "#ff7f0e",
    }
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    meta = results["meta"]
    noisy = ", NOISY: other jobs were running" if meta.get("noisy") else ""
    fig.suptitle(
        f"realtime-reset-proxy benchmark ({meta['mode']}, {meta['finished']}, {meta['cpus']} CPUs, loopback{noisy})"
    )

    ax = axes[0][0]
    for size, style in (("1.3KB", "-"), ("100KB", ":")):
        res = _get(results, "latency", size) or {}
        for name in NAMES:
            curve = _get(res, name, "cdf")
            if curve:
                ys = [i / (len(curve) - 1) for i in range(len(curve))]
                ax.plot(curve, ys, style, color=colors[name], label=f"{name}, {size}")
    ax.set_xscale("log")
    ax.set_xlabel("round trip (µs, log)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("Ping-pong round trip CDF (one frame in flight)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    tput = results.get("throughput") or {}
    sizes = [s for s in ("1.3KB", "100KB") if s in tput]
    width = 0.8 / len(NAMES)
    for i, name in enumerate(NAMES):
        xs = [j + (i - (len(NAMES) - 1) / 2) * width for j in range(len(sizes))]
        vals = [_get(tput, s, name, "ratio") for s in sizes]
        if any(v is not None for v in vals):
            bars = ax.bar(xs, [v or 0 for v in vals], width, color=colors[name], label=name)
            for bar, s in zip(bars, sizes, strict=True):
                fps = _get(tput, s, name, "fps")
                if fps:
                    ax.annotate(
                        f"{fps:,.0f}/s",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
    ax.axhline(THROUGHPUT_RATIO, color="green", linestyle="--", label=f"target ≥ {THROUGHPUT_RATIO}")
    ax.set_xticks(range(len(sizes)), [f"{s} frames" for s in sizes])
    top = max([1.0] + [_get(tput, s, n, "ratio") or 0 for s in sizes for n in NAMES])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.set_ylabel("pipelined frames/s, ratio to direct")
    ax.set_title("Pipelined throughput, one connection")
    ax.legend(fontsize=8, ncol=4, loc="upper center")

    ax = axes[1][0]
    conc = results.get("concurrency") or {}
    steps = conc.get("steps", [])
    for name in NAMES:
        pts = [(s["n"], s[name]["p99"] / 1000) for s in steps if name in s and s[name].get("samples")]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[name], label=f"{name} p99")
        refused = [s["n"] for s in steps if _get(s, name, "error")]
        if refused:  # could not even open the sessions: marked on the 5 ms line
            ax.plot(
                refused, [5.0] * len(refused), "X", color=colors[name], markersize=12, label=f"{name}: sessions refused"
            )
    ax.axhline(5, color="green", linestyle="--", label="5 ms (criterion is p99 added)")
    ax.axvline(SESSIONS, color="grey", linestyle=":", label=f"target {SESSIONS} sessions")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time sessions (50 frames/s each way)")
    ax.set_ylabel("p99 round trip (ms, log)")
    ax.set_title("Concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    rst = results.get("reset")
    if rst:
        items = rst["items"]
        series = [
            ("reset_median_ms", "o-", colors["wire"], "session.reset through the proxy"),
            ("swap_median_ms", "D-", "purple", "session.reset by swap"),
            ("pipelined_delete_median_ms", "^--", colors["nginx"], "client deletes all at once (floor)"),
            ("client_delete_ms", "s-", colors["direct"], "client deletes one at a time"),
        ]
        for key, style, color, label in series:
            pts = [(n, rst.get(key, {}).get(str(n))) for n in items]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, label=label)
        ax.axhline(rst["reconnect_median_ms"], color="orange", linestyle="-.", label="reconnect, through the delay")
        ax.axhline(
            rst["reconnect_loopback_median_ms"], color="orange", linestyle=":", label="reconnect, loopback handshake"
        )
        limit = 2 * rst["delay_s"] * 1000 + RESET_SLACK_MS
        ax.axhline(limit, color="green", linestyle="--", label=f"target ≤ {limit:.0f} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items in the conversation")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"Back to an empty conversation, upstream delay {rst['delay_s'] * 1000:g} ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
