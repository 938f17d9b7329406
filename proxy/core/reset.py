"""One reset, as a small state machine.

    QUIETING ──(no response that can add items runs or is about to start)──▶ DELETING ──(all answered)──▶ done
       │ sends response.cancel for each running conversation response          │ sends input_audio_buffer.clear once
       │ (when cancel_response; else it waits for them to finish)              │ and one delete per item to remove,
       │                                                                       │ pipelined; later items are deleted
       └────────────────────────── deadline passes: timed out ◀────────────────┘ as they appear

A swap (`swap`: the client moves to a fresh upstream session, proxy/core/swap.py) stops after QUIETING: it is done
once no response of the old session runs and its cancels are answered; it sends no clear and no delete.

Done means: every command this reset sent was answered (ack or error), no item is still on its way (a
committed audio item, or a client create or commit sent before the reset), no response that can add items
runs, and the conversation holds nothing but kept items (and items whose delete failed for a reason other
than "does not exist", reported as failed). A response whose cancel the server refused (it cannot cancel)
does not hold the deletes back: its items are deleted as they appear, and the reset ends when it ends. A
response an earlier reset already waited for in vain until its timeout (*stale*: replaced unseen, or never
ending) is cancelled again but not waited for at all. The reset never decides what an upstream event means —
the session does that and tells the reset through the conversation model and `answered`.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field
from enum import Enum

from proxy.core.conversation import Conversation
from proxy.core.events import ResetRequest


class Phase(Enum):
    QUIETING = "quieting"
    DELETING = "deleting"


@dataclass(slots=True)
class Command:
    """One event the proxy sent upstream on a reset's behalf; `target` is the item or response id."""

    kind: str  # "cancel" | "clear" | "delete"
    target: str | None
    reset_seq: int  # 0: not a reset's (the clean-up of a late response)
    sent_at: float = 0.0
    order: int = 0  # place among every delete sent, the client's and ours (answers come in that order)


@dataclass(slots=True)
class Reset:
    seq: int
    request: ResetRequest
    keep: Container[str]  # a set of ids, or every id but some (an auto-reset's trim: policy.AllBut)
    started_at: float
    deadline: float
    phase: Phase = Phase.QUIETING
    outstanding: set[str] = field(default_factory=set)  # event ids of our commands not answered yet
    cancelled_responses: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)  # responses whose cancel the server refused
    stale: set[str] = field(default_factory=set)  # responses an earlier reset waited for until it timed out
    attempted: set[str] = field(default_factory=set)  # item ids a delete was sent for
    deleted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    response_cancelled: bool = False
    clear_sent: bool = False
    scanned_additions: int = -1  # conv.additions at the last full scan
    waiting: set[str] = field(default_factory=set)  # items somebody else's delete is on its way for
    swap: bool = False  # done when quiet: the session moves to another upstream instead of deleting
    silent: bool = False  # a swap of the proxy's own (a rollover): the client asked for nothing, hears nothing

    def plan(
        self,
        conv: Conversation,
        deletes_elsewhere: Container[str],
        send: Callable[[str, str | None], None],
    ) -> bool:
        """Send what the state calls for now (through `send(kind, target)`); True when the reset is done.

        `deletes_elsewhere` are items a delete is already on its way for (the client's, sent before the reset
        began, or ours for a late response): the reset waits for them to go instead of deleting twice.
        """
        if self.request.cancel_response:
            for rid in conv.conversation_responses():
                if rid not in self.cancelled_responses:
                    self.cancelled_responses.add(rid)
                    send("cancel", rid)
        # Deleting while a response runs races its output items: quiet first (again, should one start
        # mid-reset: server VAD on audio committed before our clear).
        if conv.response_requested or any(r not in self.refused for r in conv.conversation_responses()):
            self.phase = Phase.QUIETING
            return False
        if self.swap:
            return not self.outstanding
        if self.phase is Phase.QUIETING:
            self.phase = Phase.DELETING
            if self.request.clear_input_audio and not self.clear_sent:
                self.clear_sent = True
                send("clear", None)
        # Every upstream event during a reset comes through here: scan the whole conversation only when items
        # were added since the last scan (else a 1,000-item reset costs a million steps), and otherwise look
        # again only at the items that wait for somebody else's delete.
        if conv.additions != self.scanned_additions:
            self.scanned_additions = conv.additions
            candidates: list[str] = conv.item_ids
            self.waiting.clear()
        else:
            candidates = list(self.waiting)
        for item_id in candidates:
            if item_id in self.keep or item_id in self.attempted or item_id not in conv:
                self.waiting.discard(item_id)
                continue
            if item_id in deletes_elsewhere:
                self.waiting.add(item_id)
                continue
            self.waiting.discard(item_id)
            self.attempted.add(item_id)
            send("delete", item_id)
        if self.outstanding or self.waiting or conv.items_on_their_way:
            return False
        if any(r not in self.stale for r in conv.conversation_responses()):
            return False
        failed = set(self.failed)
        return all(i in self.keep or i in failed for i in conv.item_ids)

    def awaiting(self, conv: Conversation) -> str:
        """What the reset still waits for, in words (for a timeout's message)."""
        parts: list[str] = []
        for rid in conv.conversation_responses():
            if rid in self.stale:
                continue
            why = " (the server refused to cancel it)" if rid in self.refused else ""
            parts.append(f"the response {rid}{why}")
        if conv.response_requested:
            parts.append("a requested response")
        items = len(self.waiting) + conv.items_coming()
        if items:
            parts.append(f"{items} item(s) on their way or being deleted by another")
        if self.outstanding:
            parts.append(f"{len(self.outstanding)} command(s) unanswered")
        return ", ".join(parts) or "nothing it could name"

    def kept_item_ids(self, conv: Conversation) -> list[str]:
        return [i for i in conv.item_ids if i in self.keep]
