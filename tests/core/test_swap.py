"""Reset by swap, the replay record and rollover, as protocol traces through the sans-I/O core (no event loop)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core.errors import InvalidSyntheticEvent
from proxy.core.events import parse_reset
from proxy.core.replay import Dial, ReplayRecord, Spare
from proxy.core.session import Binary, ResetFinished, TaskEnded, UpstreamSession
from proxy.core.swap import MAX_FAILURES, Action, SpareState, SwapConfig, Swapper, Switched
from tests.core.playbook import Event, Play, types

KEY = "sk-secret-key"
DIAL = Dial("wss://api.openai.com/v1/realtime?model=gpt-realtime", (("Authorization", f"Bearer {KEY}"),), ("realtime",))
UPDATE = {"type": "session.update", "event_id": "u1", "session": {"type": "realtime", "instructions": "be brief"}}
APPEND = {"type": "input_audio_buffer.append", "audio": "AAAA"}


class SwapPlay(Play):
    def __init__(self, strategy: Any = "swap", cap: float = 3300.0, warn: float = 300.0, **config: Any) -> None:
        super().__init__(**config)
        self.swapper = Swapper(SwapConfig(strategy, cap, warn), ReplayRecord(DIAL), self.session, clock=self.clock)

    def actions(self) -> list[Action]:
        return self.swapper.take_actions()

    def open_spare(self) -> list[Event]:
        """The relay's dial succeeded: what the spare is sent."""
        self.swapper.spare_opened()
        return [orjson.loads(f) for f in self.swapper.take_spare()]

    def spare(self, event: Event) -> None:
        self.swapper.spare_frame(orjson.dumps(event))

    def spare_created(self, session_id: str = "sess_2") -> None:
        self.spare({"type": "session.created", "session": {"id": session_id, "instructions": ""}})

    def ready_spare(self, session_id: str = "sess_2") -> list[Event]:
        sent = self.open_spare()
        self.spare_created(session_id)
        for update in sent:
            self.spare({"type": "session.updated", "session": {"id": session_id, **update["session"]}})
        assert self.swapper.spare is not None and self.swapper.spare.ready
        return sent

    def switch(self) -> list[Event]:
        """Carry out a SWITCH as the relay does; returns what the client is sent."""
        self.session = self.swapper.switch()
        return [orjson.loads(f) for f in self.swapper.take_client()]

    def primary_created(self, session_id: str = "sess_1") -> None:
        self.upstream({"type": "session.created", "session": {"id": session_id}})


def completed(events: list[Event]) -> Event:
    (done,) = [e for e in events if e["type"] == "session.reset.completed"]
    return done


# --- the replay record ------------------------------------------------------------------------------


def test_dial_repr_shows_the_url_but_never_the_key() -> None:
    """A stray log of the dial must not print the injected key or a key-carrying subprotocol."""
    dial = Dial("wss://x/v1/realtime", (("api-key", KEY),), (f"openai-insecure-api-key.{KEY}",))
    assert "wss://x/v1/realtime" in repr(dial) and KEY not in repr(dial)


def test_updates_are_recorded_in_order_and_replayed_under_our_ids() -> None:
    """Both updates go upstream as sent; the spare gets both, in order, same session, event ids of ours."""
    play = SwapPlay()
    second = {"type": "session.update", "session": {"type": "realtime", "voice": "marin"}}
    assert play.client(UPDATE) == ([UPDATE], [])
    assert play.client(second) == ([second], [])
    assert play.swapper.record.updates == [UPDATE, second]
    sent = play.open_spare()
    assert [e["session"] for e in sent] == [UPDATE["session"], second["session"]]
    assert all(e["event_id"].startswith(play.session.id_prefix) for e in sent)
    spare = play.swapper.spare
    assert spare is not None and not spare.ready
    play.spare_created()
    play.spare({"type": "session.updated", "session": {"instructions": "be brief"}})
    assert not spare.ready  # one answer still to come
    play.spare({"type": "session.updated", "session": {"instructions": "be brief", "voice": "marin"}})
    assert spare.ready and spare.session == {"instructions": "be brief", "voice": "marin"}


def test_a_spare_with_nothing_to_replay_is_ready_once_created() -> None:
    """No session.update yet: session.created alone makes the spare ready; a stray session.updated changes nothing."""
    play = SwapPlay()
    assert play.open_spare() == []
    play.spare({"type": "session.updated", "session": {"id": "sess_2"}})
    spare = play.swapper.spare
    assert spare is not None and not spare.ready
    play.spare_created()
    assert spare.ready and spare.session_id == "sess_2"


@pytest.mark.parametrize(
    ("frame", "refusal"),
    [
        (b'{"type":"error","error":{"message":"Invalid value: voice"}}', "Invalid value: voice"),
        (b'{"type":"error","error":null}', "the spare sent an error or a frame that is not an event"),
        (b"not json", "the spare sent an error or a frame that is not an event"),
    ],
)
def test_a_spare_that_errs_is_refused_with_its_message(frame: bytes, refusal: str) -> None:
    """Any error (or garbage) from a spare means it is not to be used; the first reason is kept."""
    spare = Spare(ReplayRecord(DIAL), "p_", 0.0)
    spare.spare_frame(frame)
    spare.spare_frame(b'{"type":"error","error":{"message":"later"}}')
    spare.spare_frame(b'{"type":"session.created","session":{"id":"s"}}')
    assert spare.refusal == refusal and not spare.ready


# --- the reset strategy -----------------------------------------------------------------------------


def test_strategy_field_is_parsed_and_checked() -> None:
    """session.reset takes "strategy": "delete" | "swap"; anything else names the param."""
    assert parse_reset({"type": "session.reset", "strategy": "swap"}).strategy == "swap"
    assert parse_reset({"type": "session.reset"}).strategy is None
    with pytest.raises(InvalidSyntheticEvent) as info:
        parse_reset({"type": "session.reset", "strategy": "fast"})
    assert info.value.param == "strategy"


def test_under_swap_a_spare_is_dialed_at_once() -> None:
    """The swap strategy asks the relay for a spare as soon as the connection starts; delete does not."""
    assert SwapPlay("swap").actions() == [Action.DIAL]
    assert SwapPlay("delete").actions() == []


def test_full_reset_swaps_to_the_ready_spare_without_an_upstream_command() -> None:
    """Nothing goes upstream; the client hears completed (swap, new session id, every old item deleted) and its
    later events go to the new session, whose conversation is empty."""
    play = SwapPlay()
    play.primary_created()
    play.actions()
    play.ready_spare("sess_2")
    play.items("a", "b")
    up, down = play.client({"type": "session.reset", "event_id": "r1"})
    assert up == [] and down == []
    assert play.actions() == [Action.SWITCH]
    old = play.session
    to_client = play.switch()
    assert to_client == [
        {
            "type": "session.reset.completed",
            "event_id": play.session.id_prefix + "swap",
            "reset_event_id": "r1",
            "deleted_item_ids": ["a", "b"],
            "kept_item_ids": [],
            "failed_item_ids": [],
            "response_cancelled": False,
            "duration_ms": 0.0,
            "strategy": "swap",
            "upstream_session_id": "sess_2",
            "usage": {"responses": 0, "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0},
            "auto": False,
        }
    ]
    assert play.session is not old and old.hooks is None and play.session.hooks is play.swapper
    assert play.session.conversation.item_ids == [] and not play.session.paused
    assert play.session.upstream_session_id == "sess_2"
    notices = play.swapper.take_notices()
    assert notices[0] == TaskEnded(0, 0, 0, False)
    assert notices[1] == Switched("reset", "sess_1", "sess_2", 2)
    assert notices[2] == UpstreamSession("sess_2")
    assert isinstance(notices[3], ResetFinished) and notices[3].deleted == 2
    assert play.actions() == [Action.DIAL]  # the next spare, at once
    assert play.swapper.take_retired() == [] and play.swapper.switches == 1
    item = {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}}
    assert play.client(item) == ([item], [])


def test_swap_cancels_a_running_response_and_forwards_its_done_first() -> None:
    """A response runs: it is cancelled on the old upstream, its done reaches the client, then the switch; the
    client's events sent meanwhile are held and go to the new session in order."""
    play = SwapPlay()
    play.actions()
    play.ready_spare()
    play.items("a")
    play.response_created("resp_1")
    up, _ = play.client({"type": "session.reset"})
    assert types(up) == ["response.cancel"]
    item = {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}}
    assert play.client(item) == ([], [])  # held
    assert play.actions() == []
    _, down = play.response_done("resp_1", status="cancelled")
    assert types(down) == ["response.done"]
    play.upstream({"type": "conversation.item.deleted", "item_id": "elsewhere"})  # asks again: still one switch
    assert play.actions() == [Action.SWITCH]
    done = completed(play.switch())
    assert done["response_cancelled"] is True and done["deleted_item_ids"] == ["a"]
    assert play.take() == ([item], [])


def test_a_reset_held_behind_a_swap_runs_on_the_new_session() -> None:
    """Two resets in a row: the second, held during the first, runs on the new (empty) session at once."""
    play = SwapPlay()
    play.actions()
    play.ready_spare()
    play.items("a")
    play.response_created("resp_1")
    play.client({"type": "session.reset", "event_id": "r1"})
    play.client({"type": "session.reset", "event_id": "r2", "strategy": "delete"})
    play.response_done("resp_1", status="cancelled")
    assert play.actions() == [Action.SWITCH]
    assert completed(play.switch())["reset_event_id"] == "r1"
    up, _ = play.take()
    assert types(up) == ["input_audio_buffer.clear"]  # r2, on the new session: nothing to delete
    _, down = play.ack_all(up)
    assert [(e["reset_event_id"], e["strategy"]) for e in down] == [("r2", "delete")]


@pytest.mark.parametrize(
    "reset",
    [
        {"type": "session.reset", "strategy": "delete"},
        {"type": "session.reset", "keep_item_ids": ["a"]},
        {"type": "session.reset", "to": "checkpoint"},
    ],
)
def test_resets_that_keep_something_or_ask_for_deletes_delete(reset: Event) -> None:
    """A ready spare is not used by a reset that keeps items or asks for deletes; completed says "delete"."""
    play = SwapPlay()
    play.actions()
    play.ready_spare()
    play.items("a", "b")
    play.client({"type": "session.checkpoint"})
    up, _ = play.client(reset)
    assert "conversation.item.delete" in types(up) or reset.get("to") == "checkpoint"
    _, down = play.ack_all(up)
    assert completed(down)["strategy"] == "delete"
    assert play.actions() == []


def test_buffered_audio_the_reset_keeps_means_deletes() -> None:
    """Audio appended and not committed, and a reset told to keep it: a new upstream would lose it."""
    play = SwapPlay()
    play.actions()
    play.ready_spare()
    play.client(APPEND)
    assert play.session.audio_pending
    up, down = play.client({"type": "session.reset", "clear_input_audio": False})
    assert up == [] and completed(down)["strategy"] == "delete"  # nothing to delete, nothing to clear
    assert play.actions() == []


@pytest.mark.parametrize(
    ("frame", "pending"),
    [
        (b'{"type":"input_audio_buffer.append","audio":"AAAA"}', True),
        (b'{"audio":"AAAA","type":"input_audio_buffer.append"}', True),  # not sniffable: parsed
        (b'{"type":"input_audio_buffer.commit"}', False),
        (b'{"type":"input_audio_buffer.clear"}', False),
    ],
)
def test_audio_pending_follows_appends_commits_and_clears(frame: bytes, pending: bool) -> None:
    """Whether audio waits in the buffer: an append sets it, a commit or clear (the client's) ends it."""
    play = SwapPlay()
    play.client(APPEND)
    play.session.client_frame(frame)
    assert play.session.audio_pending is pending


def test_server_commits_and_our_clear_end_pending_audio() -> None:
    """Server VAD's commit empties the buffer; so does a reset's own clear."""
    play = SwapPlay("delete")
    play.client(APPEND)
    play.upstream({"type": "input_audio_buffer.committed", "item_id": "v1", "previous_item_id": None})
    assert not play.session.audio_pending
    play.client(APPEND)
    play.client({"type": "session.reset"})
    assert not play.session.audio_pending


def test_without_a_ready_spare_a_swap_reset_deletes_at_once_and_a_spare_is_dialed() -> None:
    """Under "delete", a reset asking for a swap finds no spare: it deletes, never waits; the next one swaps."""
    play = SwapPlay("delete")
    play.items("a")
    up, _ = play.client({"type": "session.reset", "strategy": "swap"})
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]
    assert play.actions() == [Action.DIAL]
    _, down = play.ack_all(up)
    assert completed(down)["strategy"] == "delete"
    play.ready_spare()
    play.items("b")
    assert play.client({"type": "session.reset", "strategy": "swap"}) == ([], [])
    assert play.actions() == [Action.SWITCH]
    assert completed(play.switch())["deleted_item_ids"] == ["b"]
    assert play.actions() == [Action.DIAL]  # asked once: kept warm from then on


def test_a_spare_still_configuring_is_not_ready_and_the_reset_deletes() -> None:
    """A session.update mirrored to the spare and not answered yet: the reset deletes instead of waiting."""
    play = SwapPlay()
    play.actions()
    play.ready_spare()
    play.client(UPDATE)
    assert [orjson.loads(f)["session"] for f in play.swapper.take_spare()] == [UPDATE["session"]]
    play.items("a")
    up, _ = play.client({"type": "session.reset"})
    assert "conversation.item.delete" in types(up)
    assert play.actions() == []


def test_a_spare_lost_while_the_swap_quiets_means_deletes() -> None:
    """The spare closes while a response is being cancelled: once quiet, the reset deletes (and a spare is dialed)."""
    play = SwapPlay()
    play.actions()
    play.ready_spare()
    play.items("a")
    play.response_created("resp_1")
    play.client({"type": "session.reset"})
    play.swapper.spare_failed()
    assert play.actions() == [Action.CLOSE_SPARE, Action.DIAL]
    up, down = play.response_done("resp_1", status="cancelled")
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]
    _, down = play.ack_all(up)
    assert completed(down)["strategy"] == "delete"


def test_a_refusing_spare_is_replaced_until_too_many_fail_then_a_new_update_tries_again() -> None:
    """A spare that answers the replay with an error is closed and another dialed, MAX_FAILURES times at most."""
    play = SwapPlay()
    assert play.actions() == [Action.DIAL]
    play.client(UPDATE)
    for _ in range(MAX_FAILURES):
        play.open_spare()
        play.spare({"type": "error", "error": {"message": "Invalid value"}})
        actions = play.actions()
        assert actions[0] == Action.CLOSE_SPARE
    assert actions == [Action.CLOSE_SPARE]  # the last failure: no more dials
    assert play.swapper.spare_state is SpareState.ABSENT
    play.spare({"type": "session.created", "session": {"id": "late"}})  # a closed spare's last words
    play.client(UPDATE)
    assert play.actions() == [Action.DIAL]


def test_a_failed_dial_is_retried() -> None:
    """The dial failed (refused, unreachable): another is asked for."""
    play = SwapPlay()
    play.actions()
    play.swapper.spare_failed()
    assert play.actions() == [Action.DIAL]
    assert play.swapper.take_spare() == []


# --- the cap --------------------------------------------------------------------------------------------


def test_session_expiring_is_sent_once_before_the_cap() -> None:
    """warn_before_seconds before max_session_seconds: one session.expiring naming the upstream session."""
    play = SwapPlay("delete", cap=100.0, warn=30.0)
    play.primary_created("sess_1")
    start = play.clock.now
    assert play.swapper.deadline == start + 70.0
    play.clock.now = start + 70.0
    play.swapper.handle_timeout()
    assert [orjson.loads(f) for f in play.swapper.take_client()] == [
        {
            "type": "session.expiring",
            "event_id": play.session.id_prefix + "expiring",
            "expires_in_seconds": 30,
            "upstream_session_id": "sess_1",
        }
    ]
    assert play.swapper.deadline is None
    play.swapper.handle_timeout()
    assert play.swapper.take_client() == []


def test_no_cap_no_deadline_no_rollover() -> None:
    """max_session_seconds = 0: nothing is timed, and the upstream's end passes through."""
    play = SwapPlay("swap", cap=0.0)
    assert play.swapper.deadline is None
    play.actions()
    play.ready_spare()
    play.clock.now += 10_000.0
    play.swapper.handle_timeout()  # the relay calls it at the session's deadlines too
    assert play.swapper.take_client() == [] and play.actions() == []
    _, down = play.error("session_expired")
    assert types(down) == ["error"]
    assert play.swapper.upstream_closed(1001) is False


def test_a_spare_about_to_expire_is_replaced() -> None:
    """A spare as old as the cap is closed and another dialed before it is used."""
    play = SwapPlay("swap", cap=100.0, warn=0.0)
    play.actions()
    play.clock.now += 10.0
    play.ready_spare()
    play.clock.now += 90.0
    play.swapper.handle_timeout()  # the warning's time too
    play.swapper.take_client()
    assert play.swapper.deadline == play.clock.now + 10.0  # the spare's
    play.clock.now += 10.0
    play.swapper.handle_timeout()
    assert play.actions() == [Action.CLOSE_SPARE, Action.DIAL]
    assert play.swapper.deadline is None


def test_past_the_cap_a_full_reset_swaps_even_without_a_spare() -> None:
    """Under "delete", an upstream older than the cap: the reset waits for the spare it dials, then swaps."""
    play = SwapPlay("delete", cap=100.0)
    play.items("a")
    play.clock.now += 100.0
    assert play.client({"type": "session.reset"}) == ([], [])
    assert play.actions() == [Action.DIAL]
    assert play.session.paused
    play.client(UPDATE)  # held: sent to the new session after the switch
    play.ready_spare()
    assert play.actions() == [Action.SWITCH]
    assert completed(play.switch())["strategy"] == "swap"
    assert play.take() == ([UPDATE], [])
    assert play.swapper.record.updates == [UPDATE]
    assert play.swapper.deadline == play.clock.now + 100.0 - 300.0  # the new upstream's own clock


def test_past_the_cap_a_reset_deletes_when_no_spare_can_be_had() -> None:
    """Every dial fails: after MAX_FAILURES the waiting swap reset deletes instead."""
    play = SwapPlay("delete", cap=100.0)
    play.items("a")
    play.clock.now += 100.0
    play.client({"type": "session.reset"})
    for _ in range(MAX_FAILURES - 1):
        assert play.actions() == [Action.DIAL]
        play.swapper.spare_failed()
    assert play.actions() == [Action.DIAL]
    play.swapper.spare_failed()
    up, _ = play.take()
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]
    assert play.client({"type": "session.reset"})[0] == []  # held behind the running reset
    _, down = play.ack_all(up)
    assert completed(down)["strategy"] == "delete"


def test_past_the_cap_with_no_spare_possible_a_reset_deletes_at_once() -> None:
    """Dials already failed MAX_FAILURES times: a reset past the cap does not wait, it deletes."""
    play = SwapPlay("swap", cap=100.0)
    for _ in range(MAX_FAILURES):
        play.swapper.spare_failed()
    play.actions()
    play.items("a")
    play.clock.now += 100.0
    up, _ = play.client({"type": "session.reset"})
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]


# --- rollover ---------------------------------------------------------------------------------------------


def test_session_expired_on_an_idle_empty_session_rolls_over_unseen() -> None:
    """The error is hidden, the client held; once a spare is ready the client moves and hears nothing."""
    play = SwapPlay("delete")
    play.primary_created()
    assert play.error("session_expired") == ([], [])
    assert play.session.paused and play.actions() == [Action.DIAL]
    assert play.swapper.upstream_closed(1001) is True  # the close that follows: still rolling over
    play.client(UPDATE)
    play.ready_spare("sess_2")
    assert play.actions() == [Action.SWITCH]
    assert play.switch() == []
    assert play.take() == ([UPDATE], [])
    assert play.swapper.take_notices() == [Switched("rollover", "sess_1", "sess_2", 0), UpstreamSession("sess_2")]


def test_a_close_1001_on_an_idle_empty_session_rolls_over() -> None:
    """No error first: the close itself starts the rollover; other codes pass through."""
    play = SwapPlay("delete")
    assert play.swapper.upstream_closed(1000) is False
    assert play.swapper.upstream_closed(None) is False
    assert play.swapper.upstream_closed(1001) is True
    assert play.actions() == [Action.DIAL]


@pytest.mark.parametrize(
    "busy",
    [
        lambda p: p.items("a"),
        lambda p: p.client(APPEND),
        lambda p: p.response_created("resp_1"),
        lambda p: p.client({"type": "response.create"}),
        lambda p: p.client({"type": "input_audio_buffer.commit"}),
        lambda p: p.client({"type": "session.reset"}),
    ],
    ids=["item", "audio", "response", "requested", "on-its-way", "resetting"],
)
def test_a_session_that_is_not_empty_and_idle_ends_as_it_came(busy: Any) -> None:
    """Items, buffered audio, a response running or asked for, an item on its way, a reset: no rollover."""
    play = SwapPlay("delete")
    play.items("x")
    play.client({"type": "session.reset", "strategy": "delete"})
    play.ack_all([{"type": "conversation.item.delete", "item_id": "x"}, {"type": "input_audio_buffer.clear"}])
    busy(play)
    _, down = play.error("session_expired")
    assert types(down) == ["error"]
    assert play.swapper.upstream_closed(1001) is False


def test_a_session_with_held_events_is_not_idle() -> None:
    """Events held by a reset in flight count as busy."""
    play = SwapPlay("delete")
    play.items("x")
    play.client({"type": "session.reset"})
    play.client(APPEND)
    assert play.session.held_count == 1
    play.session.reset = None  # as if it ended without releasing: only the held event remains
    assert play.swapper.upstream_closed(1001) is False


def test_a_rollover_with_no_spare_to_be_had_ends_the_connection() -> None:
    """Every dial fails: the controller asks the relay to pass the upstream's end through (END)."""
    play = SwapPlay("delete")
    play.swapper.upstream_closed(1001)
    for _ in range(MAX_FAILURES - 1):
        assert play.actions() == [Action.DIAL]
        play.swapper.spare_failed()
    assert play.actions() == [Action.DIAL]
    play.swapper.spare_failed()
    assert play.actions() == [Action.END]
    assert play.swapper.upstream_closed(1001) is False  # no longer rolling over


def test_a_rollover_is_not_started_when_no_spare_can_come() -> None:
    """Dials failed MAX_FAILURES times already: the end passes through."""
    play = SwapPlay("delete")
    play.swapper.upstream_closed(1001)
    for _ in range(MAX_FAILURES):
        play.swapper.spare_failed()
    other = SwapPlay("delete")
    for _ in range(MAX_FAILURES):
        other.swapper.spare_failed()
    assert other.swapper.upstream_closed(1001) is False


def test_swap_failed_leaves_a_rollover_and_no_reset_alone() -> None:
    """Session.swap_failed only turns a client's swap reset into deletes."""
    play = SwapPlay("delete")
    play.session.swap_failed()
    assert play.session.reset is None
    play.swapper.upstream_closed(1001)
    play.session.swap_failed()
    assert play.session.reset is not None and play.session.reset.swap


def test_pending_says_what_waits_for_the_relay() -> None:
    """The relay flushes the controller when it has actions, frames or notices."""
    play = SwapPlay("delete")
    assert not play.swapper.pending
    play.client(UPDATE)
    play.swapper.upstream_closed(1001)
    assert play.swapper.pending
    play.actions()
    assert not play.swapper.pending
    play.swapper.spare_opened()
    assert play.swapper.pending


def test_binary_frames_are_not_session_updates() -> None:
    """A binary frame goes upstream untouched and is not recorded."""
    play = SwapPlay()
    play.session.client_frame(Binary(b"\x00"))
    assert play.swapper.record.updates == []


def test_a_swap_carries_the_connections_usage_policy_and_checkpoint_over() -> None:
    """The task a swap reset ends is reported (usage on the completion, TaskEnded); the connection's totals, its
    own policy and its checkpoint live on in the session that takes over."""
    play = SwapPlay()
    play.primary_created()
    play.actions()
    play.ready_spare("sess_2")
    play.client({"type": "session.reset.policy", "event_id": "p1", "max_input_tokens": 500})
    play.client({"type": "session.checkpoint", "event_id": "cp1"})
    done = {"id": "resp_1", "status": "completed", "output": [], "usage": {"input_tokens": 7, "output_tokens": 3}}
    play.upstream({"type": "response.done", "response": done})
    play.client({"type": "session.reset", "event_id": "r1"})
    assert play.actions() == [Action.SWITCH]
    (swap,) = play.switch()
    assert swap["usage"]["input_tokens"] == 7 and swap["usage"]["responses"] == 1 and swap["auto"] is False
    assert play.swapper.take_notices()[0] == TaskEnded(1, 7, 3, False)
    new = play.session
    assert new.policy.max_input_tokens == 500 and new.checkpoint == []
    assert new.usage.connection.input_tokens == 7 and new.usage.task.input_tokens == 0
    _, down = play.client({"type": "session.usage", "event_id": "u1"})
    (result,) = down
    assert result["connection_usage"]["input_tokens"] == 7 and result["usage"]["input_tokens"] == 0


def test_an_update_the_clients_upstream_refused_is_not_replayed() -> None:
    """The client's upstream refuses one session.update (its error names the update's event id): it leaves the
    record, the spare that was sent it is replaced by one configured without it, and swaps go on. (An update
    with no event id cannot be told apart: it stays, and a spare refusing it is replaced up to three times.)"""
    play = SwapPlay()
    play.primary_created()
    play.actions()
    play.ready_spare("sess_2")
    play.client({"type": "session.update", "event_id": "u1", "session": {"voice": "nope"}})
    assert [u["event_id"] for u in play.swapper.record.updates] == ["u1"]
    _, down = play.error("invalid_value", "u1", "Invalid value: 'nope'.")
    assert types(down) == ["error"]  # the client's, shown
    assert play.swapper.record.updates == [] and play.actions() == [Action.CLOSE_SPARE, Action.DIAL]
    assert play.ready_spare("sess_3") == []  # nothing to replay: ready once created
    play.items("a")
    play.client({"type": "session.reset", "event_id": "r1"})
    assert play.actions() == [Action.SWITCH]
    assert completed(play.switch())["upstream_session_id"] == "sess_3"
    play.error("invalid_value", "someone_else", "x")  # an error for no update changes nothing
    assert play.swapper.record.updates == []
