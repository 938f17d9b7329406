"""Token usage, summed per task: what each stretch of a conversation between two resets cost.

Rules:
- A task is everything between two resets (or the connection's start and its first reset): every
  `response.done` the session sees in that stretch adds its `response.usage` to the task's sum, a response
  that the reset cancelled included (its `response.done` arrives while the reset runs, before it completes).
- Both protocol generations report usage in one shape (`input_tokens`, `output_tokens`,
  `input_token_details.{cached,text,audio}_tokens`, `output_token_details.{text,audio}_tokens`; GA adds
  `input_token_details.image_tokens`). The three totals are always given (0 when never reported); a detail
  (the text/audio/image split) only once a server reported it, so a client can tell "none" from "not
  reported". A value that is not a whole number ≥ 0 counts as not reported.
- The sum is data for the client (`session.reset.completed`'s and `session.usage.result`'s `usage`), shaped
  like the API's own usage object plus `responses`, the number of `response.done` events summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_INPUT_DETAILS = ("text_tokens", "audio_tokens", "image_tokens")
_OUTPUT_DETAILS = ("text_tokens", "audio_tokens")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class ResponseUsage:
    """One `response.done`'s usage (a total the server did not report is 0)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    input_details: tuple[tuple[str, int], ...] = ()
    output_details: tuple[tuple[str, int], ...] = ()


def _details(value: object, keys: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        return ()
    return tuple((k, n) for k in keys if (n := _count(value.get(k))) is not None)


def read_usage(usage: object) -> ResponseUsage | None:
    """`response.usage` as a :class:`ResponseUsage`; None when there is no usage object at all."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_token_details")
    return ResponseUsage(
        input_tokens=_count(usage.get("input_tokens")) or 0,
        output_tokens=_count(usage.get("output_tokens")) or 0,
        cached_tokens=(_count(details.get("cached_tokens")) or 0) if isinstance(details, dict) else 0,
        input_details=_details(details, _INPUT_DETAILS),
        output_details=_details(usage.get("output_token_details"), _OUTPUT_DETAILS),
    )


@dataclass(slots=True)
class UsageSum:
    """The sum of the usage of `responses` response.done events; detail keys appear once a server reported them."""

    responses: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    input_details: dict[str, int] = field(default_factory=dict)
    output_details: dict[str, int] = field(default_factory=dict)

    def add(self, used: ResponseUsage | None) -> None:
        self.responses += 1
        if used is None:
            return
        self.input_tokens += used.input_tokens
        self.output_tokens += used.output_tokens
        self.cached_tokens += used.cached_tokens
        for target, pairs in ((self.input_details, used.input_details), (self.output_details, used.output_details)):
            for key, value in pairs:
                target[key] = target.get(key, 0) + value

    def as_event(self) -> dict[str, Any]:
        """The JSON object clients get: `responses`, the three totals (0 when never reported), the details seen."""
        out: dict[str, Any] = {
            "responses": self.responses,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.input_details:
            out["input_token_details"] = dict(self.input_details)
        if self.output_details:
            out["output_token_details"] = dict(self.output_details)
        return out


@dataclass(slots=True)
class UsageBook:
    """The running task's sum and the connection's; :meth:`end_task` hands the task's over and starts afresh."""

    task: UsageSum = field(default_factory=UsageSum)
    connection: UsageSum = field(default_factory=UsageSum)

    def add(self, used: ResponseUsage | None) -> None:
        self.task.add(used)
        self.connection.add(used)

    def end_task(self) -> UsageSum:
        ended, self.task = self.task, UsageSum()
        return ended
