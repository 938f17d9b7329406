"""One client connection's upstream sessions over time: the current one, a warm spare, and when to move.

    spare:  ABSENT ──wanted──▶ DIALING ──opened──▶ OPEN (configuring ──every update answered──▶ ready)
              ▲                   │ dial failed          │ refused, closed, or older than the cap
              └───────────────────┴──────────────────────┘ (replaced; MAX_FAILURES in a row: none until the next update)

    primary ──a swap reset, quiet, spare ready / a rollover, spare ready──▶ the spare is the primary (SWITCH)

Rules:
- This decides, the relay does the I/O: :attr:`Swapper.actions` asks it to dial a spare (DIAL), close the spare
  (CLOSE_SPARE), move the client to the spare (SWITCH: the old upstream gets a close 1000 and nothing more of
  it reaches the client), or give the upstream's close to the client after all (END: a rollover found no
  spare). What to send goes out through :meth:`Swapper.take_client` and :meth:`Swapper.take_spare`.
- A reset is a swap when it is full (nothing kept, to "empty", and no buffered audio that it was told to keep)
  and either its strategy (the event's, else the configured one) is "swap" and a spare is ready, or the
  upstream is older than `max_session_seconds` (then it waits for the spare it dials, and deletes should none
  come). It never waits for a spare otherwise: without a ready one it deletes, and one is dialed for next time.
- A swap reset first quiets the old upstream (cancels and awaits a running response, as a delete reset does);
  then the client moves: its held events go to the new upstream in order, and it is told
  `session.reset.completed` with `"strategy": "swap"`, the new `upstream_session_id`, and every item the old
  conversation held as deleted.
- Spares are kept warm under the "swap" strategy, or once a reset asked for one; every client `session.update`
  is recorded (proxy/core/replay.py) and mirrored to the spare.
- Rollover: when the upstream ends the session (`session_expired`, or a close 1001) while the conversation is
  empty and idle (no response running or asked for, no audio appended since the last commit or clear, no
  reset running, nothing held), the client moves to a fresh upstream and hears nothing of it. Otherwise the
  end passes through as it came.
- `session.expiring` is sent once per upstream, `warn_before_seconds` before it is `max_session_seconds` old.
  `max_session_seconds = 0` turns the cap off: no warning, no forced swap, no rollover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from proxy.core.events import RESET_COMPLETED, SESSION_EXPIRING, Event, ResetRequest, ResetStrategy, encode
from proxy.core.replay import ReplayRecord, Spare
from proxy.core.reset import Reset
from proxy.core.session import Frame, Notice, ResetFinished, Session, UpstreamSession

MAX_FAILURES = 3  # spares in a row that failed or refused: then none until the client's next session.update


class Action(Enum):
    DIAL = "dial"
    CLOSE_SPARE = "close_spare"
    SWITCH = "switch"
    END = "end"


class SpareState(Enum):
    ABSENT = "absent"
    DIALING = "dialing"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class SwapConfig:
    strategy: ResetStrategy = "delete"
    max_session_seconds: float = 3300.0  # under OpenAI's 60 minutes; 0: no cap
    warn_before_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class Switched:
    """A notice: the client moved to another upstream session."""

    reason: Literal["reset", "rollover"]
    old_session_id: str | None
    new_session_id: str | None
    items: int  # what the old conversation held


SwapNotice = Switched | Notice


class Swapper:
    """The swap controller of one client connection; it sets itself as the session's hooks."""

    def __init__(
        self,
        config: SwapConfig,
        record: ReplayRecord,
        session: Session,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.record = record
        self.session = session
        self._clock = clock
        self.actions: list[Action] = []
        self.notices: list[SwapNotice] = []
        self.spare: Spare | None = None
        self.spare_state = SpareState.ABSENT
        self.switches = 0
        self._to_client: list[Frame] = []
        self._retired_frames: list[Frame] = []  # the old upstream's last frames, sent to it before its close
        self._opened_at = clock()  # the primary's
        self._warned = False
        self._keep_spare = config.strategy == "swap"
        self._failures = 0
        self._rolling = False  # a rollover waits for a spare
        self._quiet: Reset | None = None  # the swap reset that is quiet and waits for a spare
        self._attach(session)
        if self._keep_spare:
            self._want_spare()

    def _attach(self, session: Session) -> None:
        self.session = session
        session.hooks = self

    # --- output -------------------------------------------------------------------------------------

    def take_actions(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions

    def take_client(self) -> list[Frame]:
        frames, self._to_client = self._to_client, []
        return frames

    def take_spare(self) -> list[bytes]:
        return self.spare.take() if self.spare is not None else []

    def take_retired(self) -> list[Frame]:
        frames, self._retired_frames = self._retired_frames, []
        return frames

    def take_notices(self) -> list[SwapNotice]:
        notices, self.notices = self.notices, []
        return notices

    @property
    def pending(self) -> bool:
        return bool(self.actions or self._to_client or self.notices or (self.spare and self.spare.pending))

    @property
    def deadline(self) -> float | None:
        """When :meth:`handle_timeout` must be called: the expiry warning, or a spare to replace."""
        cap = self.config.max_session_seconds
        if not cap:
            return None
        times = [] if self._warned else [self._opened_at + cap - self.config.warn_before_seconds]
        if self.spare is not None:
            times.append(self.spare.opened_at + cap)
        return min(times) if times else None

    def handle_timeout(self) -> None:
        now = self._clock()
        cap = self.config.max_session_seconds
        if not cap:
            return  # called for the session's deadlines too: with no cap nothing here is ever due
        if not self._warned and now >= self._opened_at + cap - self.config.warn_before_seconds:
            self._warned = True
            left = max(0.0, self._opened_at + cap - now)
            expiring = {
                "type": SESSION_EXPIRING,
                "event_id": self.session.id_prefix + "expiring",
                "expires_in_seconds": round(left),
                "upstream_session_id": self.session.upstream_session_id,
            }
            self._to_client.append(encode(expiring))
        if self.spare is not None and now >= self.spare.opened_at + cap:
            self._drop_spare(failed=False)  # it would expire before it is used: a fresh one
            self._want_spare()

    # --- the spare (the relay reports) ------------------------------------------------------------------

    def _want_spare(self) -> bool:
        """Dial one unless one is there or on its way; False when none will come."""
        if self.spare_state is SpareState.ABSENT:
            if self._failures >= MAX_FAILURES:
                return False
            self.spare_state = SpareState.DIALING
            self.actions.append(Action.DIAL)
        return True

    def spare_opened(self) -> None:
        """The dial succeeded: configure the spare by the record."""
        self.spare_state = SpareState.OPEN
        self.spare = Spare(self.record, self.session.id_prefix, self._clock())

    def spare_frame(self, data: Frame) -> None:
        spare = self.spare
        if spare is None:
            return  # a closed spare's last words
        spare.spare_frame(data)
        if spare.refusal is not None:
            self.spare_failed()
        elif spare.ready:
            self._failures = 0
            if self._waiting():
                self._switch_when_ready()

    def spare_failed(self) -> None:
        """The dial failed, the spare's connection ended, or it refused."""
        self._drop_spare(failed=True)
        waiting = self._waiting()
        if (waiting or self._keep_spare) and self._want_spare():
            return
        if self._rolling:
            self._rolling = False
            self.actions.append(Action.END)  # no upstream to roll over to: the end passes through
        elif waiting:
            self.session.swap_failed()

    def _drop_spare(self, *, failed: bool) -> None:
        if self.spare_state is SpareState.OPEN:
            self.actions.append(Action.CLOSE_SPARE)  # a no-op for the relay when its connection already ended
        self.spare = None
        self.spare_state = SpareState.ABSENT
        if failed:
            self._failures += 1

    # --- the session's hooks ----------------------------------------------------------------------------

    def client_session_update(self, event: Event) -> None:
        self.record.record(event)
        self._failures = 0  # a new configuration: a spare may accept it
        if self.spare is not None:
            self.spare.mirror(event)
        elif self._keep_spare:
            self._want_spare()

    def client_event_refused(self, event_id: str) -> None:
        if self.record.refused(event_id) and self.spare is not None:
            # The spare was sent it too (and will refuse it, or took a setting the client's upstream did not):
            # a fresh one, from the record as it is now; the old record's fault is no failure of spares.
            self._failures = 0
            self.spare_failed()

    def swap_wanted(self, request: ResetRequest) -> bool:
        if not request.full or (self.session.audio_pending and not request.clear_input_audio):
            return False
        if self._past_cap():
            return self._want_spare()
        if (request.strategy or self.config.strategy) != "swap":
            return False
        self._keep_spare = True
        if self.spare is not None and self.spare.ready:
            return True
        self._want_spare()  # none ready: this reset deletes, the next may swap
        return False

    def swap_ready(self) -> None:
        self._quiet = self.session.reset
        if self.spare is not None and self.spare.ready:
            self._switch_when_ready()
        elif not self._rolling and not (self._past_cap() and self._want_spare()):
            self._quiet = None
            self.session.swap_failed()  # its spare is gone: delete instead, never wait

    def session_expired(self) -> bool:
        return self._roll_over()

    def upstream_closed(self, code: int | None) -> bool:
        """The upstream closed the session: True when the client rolls over to a fresh one instead of closing."""
        return self._rolling or (code == 1001 and self._roll_over())

    # --- moving ------------------------------------------------------------------------------------------

    def _past_cap(self) -> bool:
        cap = self.config.max_session_seconds
        return bool(cap) and self._clock() - self._opened_at >= cap

    def _waiting(self) -> bool:
        """A swap (the client's or a rollover) is quiet and waits for a spare."""
        reset = self.session.reset
        return reset is not None and reset is self._quiet and reset.swap

    def _idle(self) -> bool:
        session = self.session
        conv = session.conversation
        return not (
            session.reset is not None
            or session.held_count
            or session.audio_pending
            or conv.item_ids
            or conv.active_responses
            or conv.response_requested
            or conv.items_on_their_way
        )

    def _roll_over(self) -> bool:
        if not self.config.max_session_seconds or not self._idle() or not self._want_spare():
            return False
        self._rolling = True
        self.session.begin_rollover()  # holds the client's events until the switch
        return True

    def _switch_when_ready(self) -> None:
        if Action.SWITCH not in self.actions:
            self.actions.append(Action.SWITCH)

    def switch(self) -> Session:
        """The relay is moving the client to the spare now: the session that takes over, fed what was held."""
        spare = self.spare
        old = self.session
        reset = old.reset
        assert spare is not None and spare.ready and reset is not None and reset is self._quiet
        new_id = spare.session_id
        assert new_id is not None  # ready means it said session.created
        deleted = list(old.conversation.item_ids)
        self._retired_frames = old.take_upstream()
        self._to_client.extend(old.take_client())
        new = Session(old.config, clock=self._clock)
        new.upstream_session_id = new_id
        task, ended = old.hand_over(new, reset)
        if ended is not None:
            self.notices.append(ended)
        self.notices.append(
            Switched("rollover" if reset.silent else "reset", old.upstream_session_id, new_id, len(deleted))
        )
        self.notices.append(UpstreamSession(new_id))
        if not reset.silent:
            duration_ms = (self._clock() - reset.started_at) * 1000.0
            completed = {
                "type": RESET_COMPLETED,
                "event_id": new.id_prefix + "swap",
                "reset_event_id": reset.request.event_id,
                "deleted_item_ids": deleted,
                "kept_item_ids": [],
                "failed_item_ids": [],
                "response_cancelled": reset.response_cancelled,
                "duration_ms": round(duration_ms, 3),
                "strategy": "swap",
                "upstream_session_id": new_id,
                **task,
            }
            self._to_client.append(encode(completed))
            self.notices.append(ResetFinished("completed", duration_ms, len(deleted), 0, reset.response_cancelled))
        self.switches += 1
        self._opened_at = spare.opened_at
        self._warned = False
        self._rolling = False
        self._quiet = None
        self.spare = None
        self.spare_state = SpareState.ABSENT
        held = old.take_held()
        old.hooks = None
        self._attach(new)
        for frame in held:
            new.client_frame(frame)
        if self._keep_spare:
            self._want_spare()
        return new
