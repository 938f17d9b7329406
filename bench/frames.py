"""The frames the benchmark sends and the echo upstream answers with, built once.

An upstream-bound frame is an ``input_audio_buffer.append`` carrying base64 pcm16; the echo answers each one
with a ``response.output_audio.delta`` carrying the same audio, so both directions move the same bytes.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import orjson

SAMPLE_RATE = 24_000
FRAME_MS = 20
# 20 ms of 24 kHz mono pcm16: 480 samples, 960 bytes, 1,280 base64 characters, ~1.3 KB of JSON.
AUDIO_FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2
FRAMES_PER_SECOND = 1000 // FRAME_MS
BIG_FRAME_JSON_BYTES = 100 * 1024


def _noise(n: int, seed: int = 20) -> bytes:
    # Noise-like audio, like real speech after base64: nothing downstream can shortcut on repeated bytes.
    return random.Random(seed).randbytes(n)


def append_event(audio: bytes, event_id: str = "event_bench_append") -> bytes:
    return orjson.dumps(
        {"type": "input_audio_buffer.append", "event_id": event_id, "audio": base64.b64encode(audio).decode()}
    )


def audio_frame() -> bytes:
    """The 20 ms append frame (~1.3 KB)."""
    return append_event(_noise(AUDIO_FRAME_BYTES))


def big_frame(json_bytes: int = BIG_FRAME_JSON_BYTES) -> bytes:
    """An append frame of about `json_bytes` of JSON (default 100 KiB)."""
    overhead = len(append_event(b""))
    audio_bytes = (json_bytes - overhead) * 3 // 4  # base64 turns 3 bytes into 4 characters
    return append_event(_noise(audio_bytes))


def delta_event(audio_b64: Any, seq: int) -> bytes:
    """The echo's answer: the shape of a GA ``response.output_audio.delta`` with the append's audio."""
    return orjson.dumps(
        {
            "type": "response.output_audio.delta",
            "event_id": f"event_{seq}",
            "response_id": "resp_bench",
            "item_id": "item_bench",
            "output_index": 0,
            "content_index": 0,
            "delta": audio_b64,
        }
    )


SESSION_CREATED = orjson.dumps(
    {
        "type": "session.created",
        "event_id": "event_bench_session",
        "session": {
            "type": "realtime",
            "object": "realtime.session",
            "id": "sess_bench",
            "model": "gpt-realtime",
            "output_modalities": ["audio"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "turn_detection": None},
                "output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": "alloy", "speed": 1.0},
            },
        },
    }
)
