"""The JSON shapes the modelled server shows: session objects, stored items, content parts, usage.

Pure functions of their arguments (no state, no I/O), so :mod:`proxy.simulator.model` reads as behaviour only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

Event = dict[str, Any]
Generation = Literal["beta", "ga"]


def event_part(part: Event) -> Event:
    """A content part as `response.content_part.*` events carry it: GA items say `output_text`/`output_audio`,
    but the events' part is typed `text`/`audio` in both generations (the SDKs' schemas)."""
    kind = {"output_text": "text", "output_audio": "audio"}.get(part["type"], part["type"])
    return {**part, "type": kind}


def merge(dst: Event, src: Event) -> None:
    """Recursive dict merge: session.update sends partial objects (e.g. only audio.input.turn_detection)."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def normalize_turn_detection(td: Any) -> Event | None:
    if not isinstance(td, dict):
        return None
    out: Event = {
        "type": td.get("type", "server_vad"),
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "create_response": True,
        "interrupt_response": True,
    }
    out.update(td)
    return out


def initial_session(generation: Generation, session_id: str, model: str, expires_at: int, *, server_vad: bool) -> Event:
    """The session object of a new connection, in `generation`'s shape."""
    td = normalize_turn_detection({"type": "server_vad"}) if server_vad else None
    if generation == "beta":
        return {
            "id": session_id,
            "object": "realtime.session",
            "model": model,
            "expires_at": expires_at,
            "modalities": ["text"],
            "instructions": "",
            "voice": "alloy",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": None,
            "turn_detection": td,
            "tools": [],
            "tool_choice": "auto",
            "temperature": 0.8,
            "max_response_output_tokens": "inf",
        }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["text"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "prompt": None,
        "expires_at": expires_at,
        "include": None,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": td,
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
        },
    }


def normalize_item(item: Event, item_id: str, call_id: Callable[[], str]) -> Event:
    """A client's item as the server stores and shows it (audio dropped, defaults filled in)."""
    itype = item.get("type", "message")
    out: Event = {"id": item_id, "object": "realtime.item", "type": itype}
    if itype == "message":
        out["status"] = "completed"
        out["role"] = item.get("role", "user")
        content = []
        for part in item.get("content") or []:
            part = dict(part)
            if part.get("type") == "input_audio":
                # The server keeps no audio in the item, only a (not yet known) transcript.
                part = {"type": "input_audio", "transcript": part.get("transcript")}
            content.append(part)
        out["content"] = content
    elif itype == "function_call":
        out.update(
            status="completed",
            name=item.get("name"),
            call_id=item.get("call_id") or call_id(),
            arguments=item.get("arguments", ""),
        )
    else:
        out.update(call_id=item.get("call_id"), output=item.get("output", ""))
    return out


def usage(input_tokens: int, out_text: int, out_audio: int) -> Event:
    """`response.done`'s usage: a token per delta (and one more per audio delta)."""
    return {
        "total_tokens": input_tokens + out_text + out_audio,
        "input_tokens": input_tokens,
        "output_tokens": out_text + out_audio,
        "input_token_details": {
            "cached_tokens": 0,
            "text_tokens": input_tokens,
            "audio_tokens": 0,
        },
        "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
    }
