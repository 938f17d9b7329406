"""Auto-reset policies: when the session resets on its own, and what such a reset keeps.

A policy is set for every connection by `[reset]` in the config and per connection by `session.reset.policy`
(absent fields keep their value). It is looked at once per `response.done`, and only when no reset runs or
waits (a `response.done` during a reset belongs to the task that reset ends):

    after = "response"     an in-conversation response ended            → reset to `to` ("response")
    max_input_tokens = N   a response reported more than N input tokens → reset to `to` ("max_input_tokens")
    max_items = N          an in-conversation response ended, and the
                           conversation holds more than N items         → delete the oldest items beyond N that
                                                                          are not in the checkpoint ("max_items")

The first that applies wins; 0 turns a limit off. Every auto-reset is an ordinary reset (the session runs it
through the same path as a client's `session.reset`: held client events, deletes, `session.reset.completed`
with `"auto": true`), with two differences that keep it from undoing the client's next turn: it cancels no
response (one the client already asked for runs to its end first) and leaves the input audio buffer alone. A
trim deletes only the items it chose; items that appear while it runs stay. A reset to a checkpoint when
there is none is not run: the client gets an `invalid_session_reset` error naming `to` instead.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from proxy.core.errors import InvalidSyntheticEvent
from proxy.core.events import AutoAfter, PolicyRequest, ResetRequest, ResetTarget

AutoReason = Literal["response", "max_input_tokens", "max_items"]


@dataclass(frozen=True, slots=True)
class Policy:
    after: AutoAfter = "never"
    to: ResetTarget = "empty"
    max_input_tokens: int = 0  # 0: off
    max_items: int = 0  # 0: off

    def updated(self, request: PolicyRequest) -> Policy:
        """This policy with the fields `request` sets."""
        changes: dict[str, Any] = {
            name: value
            for name in ("after", "to", "max_input_tokens", "max_items")
            if (value := getattr(request, name)) is not None
        }
        return replace(self, **changes)

    def as_event(self) -> dict[str, Any]:
        return {
            "after": self.after,
            "to": self.to,
            "max_input_tokens": self.max_input_tokens,
            "max_items": self.max_items,
        }


class AllBut:
    """`x in AllBut(ids)`: every item but these (a trim keeps whatever it did not choose to delete)."""

    __slots__ = ("ids",)

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = frozenset(ids)

    def __contains__(self, item: object) -> bool:
        return item not in self.ids


@dataclass(frozen=True, slots=True)
class AutoReset:
    reason: AutoReason
    request: ResetRequest
    keep: Container[str]


def decide(
    policy: Policy,
    *,
    in_conversation: bool,
    input_tokens: int,
    item_ids: list[str],
    checkpoint: list[str] | None,
) -> AutoReset | None:
    """The auto-reset a `response.done` calls for, or None; raises InvalidSyntheticEvent (param `to`) when the
    policy would reset to a checkpoint that does not exist."""
    reason: AutoReason
    if in_conversation and policy.after == "response":
        reason = "response"
    elif policy.max_input_tokens and input_tokens > policy.max_input_tokens:
        reason = "max_input_tokens"
    elif in_conversation and policy.max_items and len(item_ids) > policy.max_items:
        protected = frozenset(checkpoint or ())
        victims = [i for i in item_ids if i not in protected][: len(item_ids) - policy.max_items]
        if not victims:
            return None  # only checkpoint items beyond the window: they stay
        return AutoReset("max_items", _request("empty"), AllBut(victims))
    else:
        return None
    if policy.to == "checkpoint" and checkpoint is None:
        raise InvalidSyntheticEvent(
            "to", f'auto-reset ({reason}) not run: no checkpoint to reset to; send "session.checkpoint" first'
        )
    keep = frozenset(checkpoint or ()) if policy.to == "checkpoint" else frozenset()
    return AutoReset(reason, _request(policy.to), keep)


def _request(to: ResetTarget) -> ResetRequest:
    return ResetRequest(event_id=None, to=to, cancel_response=False, clear_input_audio=False)
