"""Micro-benchmark of the sans-I/O frame layer (`proxy.core.frames`); not run by the tests.

    .venv/bin/python -m bench.frames_parse [--seconds 1.0]

For 1.3 KB and 100 KB append frames, in the two directions (masked client frames, unmasked upstream frames),
fed as 64 KiB reads like a socket's: frames/s for reading only (the header), reading plus a 64-byte unmasked
prefix (the event type), reading plus the whole payload unmasked, a relay's pass (prefix, `Outbox.forward`,
`take`), and encoding a new masked frame; with the pure-Python mask and with websockets' C one. websockets' own parser
(its sans-I/O `Protocol`, which unmasks and copies every payload) is the reference line.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import cast

from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import CLIENT, SERVER, Protocol
from websockets.speedups import apply_mask as c_apply_mask

from bench.frames import audio_frame, big_frame
from proxy.core.frames import FrameReader, FrameWriter, MaskFunction, Opcode, Outbox
from proxy.core.frames import apply_mask as py_apply_mask

READ_SIZE = 64 * 1024
STREAM_BYTES = 4 * 1024 * 1024  # each pass parses about this much, so a pass is long enough to time
WORK = {
    "head": "read (header only)",
    "prefix": "read + prefix(64)",
    "payload": "read + payload()",
    "relay": "read+prefix+forward",  # what a relay does per audio frame: sniff, forward, one writelines list
}


def _reads(payload: bytes, masked: bool) -> tuple[list[bytes], int]:
    """A stream of `payload` frames cut into socket-sized reads, and the number of frames in it."""
    one = FrameWriter(masked=masked).text(payload)
    count = max(1, STREAM_BYTES // len(one))
    stream = one * count
    return [stream[i : i + READ_SIZE] for i in range(0, len(stream), READ_SIZE)], count


def _rate(run: Callable[[], int], seconds: float) -> float:
    """Frames per second of `run` (which returns how many frames it handled), the best of repeated passes."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        frames = run()
        elapsed = time.perf_counter() - t0
        best = max(best, frames / elapsed)
        if time.perf_counter() > deadline:
            return best


def _reader_pass(reads: list[bytes], masked: bool, mask: MaskFunction, work: str) -> Callable[[], int]:
    def run() -> int:
        reader = FrameReader(masked=masked, max_message_bytes=16 * 1024 * 1024, apply_mask=mask)
        outbox = Outbox(FrameWriter(masked=not masked))
        n = 0
        for data in reads:
            frames = reader.receive_data(data)
            n += len(frames)
            if work == "prefix":
                for frame in frames:
                    frame.prefix(64)
            elif work == "payload":
                for frame in frames:
                    frame.payload()
            elif work == "relay":
                for frame in frames:
                    frame.prefix(64)
                    outbox.forward(frame)
                outbox.take()
        return n

    return run


def _websockets_pass(reads: list[bytes], masked: bool) -> Callable[[], int]:
    def run() -> int:
        protocol = Protocol(SERVER if masked else CLIENT, max_size=16 * 1024 * 1024)
        n = 0
        for data in reads:
            protocol.receive_data(data)
            n += len(protocol.events_received())
        return n

    return run


def _encode_pass(payload: bytes, mask: MaskFunction) -> Callable[[], int]:
    writer = FrameWriter(masked=True, apply_mask=mask)
    count = max(1, STREAM_BYTES // len(payload))

    def run() -> int:
        for _ in range(count):
            writer.frame(Opcode.TEXT, payload)
        return count

    return run


def _websockets_encode_pass(payload: bytes) -> Callable[[], int]:
    frame = WsFrame(WsOpcode.TEXT, payload)
    count = max(1, STREAM_BYTES // len(payload))

    def run() -> int:
        for _ in range(count):
            frame.serialize(mask=True)
        return count

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement (best pass kept)")
    args = parser.parse_args(argv)
    masks: dict[str, MaskFunction] = {"py": py_apply_mask, "C": cast(MaskFunction, c_apply_mask)}
    print(f"frames/s, {READ_SIZE // 1024} KiB reads, best pass over {args.seconds:.1f} s (pid {os.getpid()})")
    print(f"{'frame':>8} {'direction':<18} {'what':<22} {'mask':<5} {'frames/s':>12} {'MB/s':>8}")
    for name, payload in (("1.3 KB", audio_frame()), ("100 KB", big_frame())):
        for masked, direction in ((True, "client (masked)"), (False, "upstream (plain)")):
            reads, _ = _reads(payload, masked)
            rows: list[tuple[str, str, Callable[[], int]]] = []
            for work in ("head", "prefix", "payload", "relay"):
                if masked:
                    rows += [(WORK[work], m, _reader_pass(reads, masked, fn, work)) for m, fn in masks.items()]
                else:
                    rows.append((WORK[work], "-", _reader_pass(reads, masked, py_apply_mask, work)))
            rows.append(("websockets Protocol", "C", _websockets_pass(reads, masked)))
            for what, mask_name, run in rows:
                rate = _rate(run, args.seconds)
                mb = rate * len(payload) / 1e6
                print(f"{name:>8} {direction:<18} {what:<22} {mask_name:<5} {rate:>12,.0f} {mb:>8,.0f}")
        for mask_name, fn in masks.items():
            rate = _rate(_encode_pass(payload, fn), args.seconds)
            print(f"{name:>8} {'to upstream':<18} {'encode (fresh mask)':<22} {mask_name:<5} {rate:>12,.0f}")
        rate = _rate(_websockets_encode_pass(payload), args.seconds)
        print(f"{name:>8} {'to upstream':<18} {'websockets serialize':<22} {'C':<5} {rate:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
