"""The session's less travelled branches: odd shapes, answers to nobody, answers by guess, late answers."""

from __future__ import annotations

import orjson
import pytest

from proxy.core.conversation import Kind
from proxy.core.reset import Command
from proxy.core.session import Binary, EventsRejected, ResetFinished, Session, UpstreamSession, Usage
from tests.core.playbook import Play, types

UNKNOWN = "item_delete_invalid_item_id"
NOT_ACTIVE = "response_cancel_not_active"


def gone(item_id: str) -> str:
    return f"Error deleting item: the item with id '{item_id}' does not exist."


def resets_finished(p: Play) -> list[ResetFinished]:
    return [n for n in p.session.take_notices() if isinstance(n, ResetFinished)]


# --- output buffers ---------------------------------------------------------------------------------


def test_pending_flags_tell_whether_frames_wait_each_way() -> None:
    """pending_upstream / pending_client are true exactly while frames wait to be taken on that side."""
    s = Session()
    assert not s.pending_upstream and not s.pending_client
    s.client_frame(b'{"type":"session.update"}')
    assert s.pending_upstream and not s.pending_client
    s.upstream_frame(b'{"type":"session.updated"}')
    assert s.pending_client
    assert s.take_upstream() == [b'{"type":"session.update"}']
    assert not s.pending_upstream and s.pending_client
    assert s.take_client() == [b'{"type":"session.updated"}']
    assert not s.pending_client


def test_a_binary_frame_over_the_hold_limit_is_refused_without_an_event_id() -> None:
    """A binary frame that does not fit among the held events is refused with an error naming no event."""
    p = Play(max_held_bytes=4)
    p.client({"type": "session.reset"})
    p.session.client_frame(Binary(b"\x00\x01\x02\x03\x04"))
    up, down = p.take()
    assert up == [] and types(down) == ["error"]
    assert down[0]["error"]["code"] == "held_events_overflow" and down[0]["error"]["event_id"] is None
    assert p.session.held_count == 0


# --- odd shapes from the upstream ---------------------------------------------------------------------


def test_session_created_without_a_session_object_is_forwarded_and_names_no_session() -> None:
    """A `session.created` whose session is not an object reaches the client and sets no upstream session id."""
    p = Play()
    _, down = p.upstream({"type": "session.created", "session": "sess_1"})
    assert types(down) == ["session.created"]
    assert p.session.upstream_session_id is None


def test_item_deleted_without_an_item_id_answers_nothing() -> None:
    """A `conversation.item.deleted` with no item id is forwarded and does not answer the reset's delete."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.upstream({"type": "conversation.item.deleted", "event_id": "ev"})
    assert types(down) == ["conversation.item.deleted"]
    assert p.session.reset is not None and p.session.conversation.item_ids == ["a"]
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"] and down[0]["deleted_item_ids"] == ["a"]


def test_an_unsolicited_cleared_is_forwarded() -> None:
    """An `input_audio_buffer.cleared` that answers no clear of the client's or ours reaches the client."""
    p = Play()
    up, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert up == [] and types(down) == ["input_audio_buffer.cleared"]


@pytest.mark.parametrize(
    "response",
    [None, "resp_1", {"status": "cancelled", "output": []}, {"id": 5, "status": "cancelled"}],
    ids=["null", "string", "no-id", "id-not-str"],
)
def test_response_done_without_a_usable_id_does_not_answer_our_cancel(response: object) -> None:
    """A `response.done` without a response id is forwarded and leaves the reset waiting for the real one."""
    p = Play()
    p.items("a")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    up, down = p.upstream({"type": "response.done", "response": response})
    assert up == [] and types(down) == ["response.done"]
    assert p.session.conversation.active_responses == {"r1": Kind.CONVERSATION}
    up, down = p.response_done("r1", "cancelled")
    assert types(down) == ["response.done"] and types(up) == ["conversation.item.delete"]
    _, down = p.ack_all(up)
    assert down[0]["response_cancelled"] is True


# --- notices ---------------------------------------------------------------------------------------------


def test_session_created_names_the_upstream_session_in_a_notice() -> None:
    """A `session.created` with a string id sets upstream_session_id and tells the relay once; other ids do not."""
    p = Play()
    _, down = p.upstream({"type": "session.created", "session": {"id": "sess_1"}})
    assert types(down) == ["session.created"]
    assert p.session.take_notices() == [UpstreamSession("sess_1")]
    p.upstream({"type": "session.created", "session": {"id": 42}})
    assert p.session.upstream_session_id is None and p.session.take_notices() == []


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"input_tokens": 120, "output_tokens": 30, "input_token_details": {"cached_tokens": 64}},
            Usage(120, 64, 30),
        ),
        ({"input_tokens": 5, "output_tokens": 7}, Usage(5, 0, 7)),
        ({"input_tokens": 5, "output_tokens": 7, "input_token_details": None}, Usage(5, 0, 7)),
        ({"input_tokens": True, "output_tokens": "7", "input_token_details": {"cached_tokens": 1.5}}, Usage(0, 0, 0)),
        ({}, Usage(0, 0, 0)),
    ],
    ids=["full", "no-details", "null-details", "not-ints", "empty"],
)
def test_response_done_reports_its_usage(usage: dict[str, object], expected: Usage) -> None:
    """A `response.done` with a usage object yields one Usage notice; counts that are not integers read as 0."""
    p = Play()
    _, down = p.upstream({"type": "response.done", "response": {"id": "r1", "status": "completed", "usage": usage}})
    assert types(down) == ["response.done"]
    assert p.session.take_notices() == [expected]


@pytest.mark.parametrize("response", [{"id": "r1", "status": "completed"}, {"id": "r1", "usage": None}, "r1"])
def test_response_done_without_usage_reports_none(response: object) -> None:
    """A `response.done` with no usage object (or no response object) yields no Usage notice."""
    p = Play()
    p.upstream({"type": "response.done", "response": response})
    assert p.session.take_notices() == []


def test_held_total_counts_every_event_ever_held_but_not_refused_ones() -> None:
    """held_total grows by one per held event, is not lowered by releasing them, and skips refused events."""
    p = Play(max_held_events=2)
    assert p.session.held_total == 0
    up, _ = p.client({"type": "session.reset"})
    for i in range(3):
        p.client({"type": "input_audio_buffer.append", "event_id": f"a{i}", "audio": ""})
    assert p.session.held_total == 2
    assert [n for n in p.session.take_notices() if isinstance(n, EventsRejected)] == [EventsRejected(1)]
    up, _ = p.ack_all(up)
    assert [e["event_id"] for e in up] == ["a0", "a1"]
    assert p.session.held_total == 2 and p.session.held_count == 0


def test_a_response_output_item_does_not_stand_in_for_the_clients_create() -> None:
    """An announced output item is deleted by the reset but does not answer the client's create, which is awaited."""
    p = Play()
    p.response_created("r1")
    p.client({"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}})
    up, _ = p.client({"type": "session.reset", "cancel_response": False, "clear_input_audio": False})
    assert up == []
    p.output_item("r1", "o1")
    up, down = p.item("o1")
    assert up == [] and types(down) == ["conversation.item.created"]
    up, _ = p.response_done("r1")
    assert [e["item_id"] for e in up] == ["o1"]
    _, down = p.ack_all(up)
    assert down == []  # c1's item is still on its way
    up, _ = p.item("x1")
    assert [e["item_id"] for e in up] == ["x1"]
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"] and down[0]["deleted_item_ids"] == ["o1", "x1"]


# --- the client's own deletes --------------------------------------------------------------------------


def test_a_client_delete_without_item_id_is_forwarded_and_not_awaited() -> None:
    """A client delete naming no item goes upstream as it is, and a reset deletes every item itself."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "conversation.item.delete", "event_id": "d1"})
    assert up == [{"type": "conversation.item.delete", "event_id": "d1"}]
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["a"]


def test_a_client_delete_without_event_id_is_still_awaited() -> None:
    """A client delete with no event id still keeps the reset from deleting that item twice; its ack is the client's."""
    p = Play()
    p.items("a", "b")
    p.client({"type": "conversation.item.delete", "item_id": "a"})
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["b"]
    _, down = p.ack_all(up)
    assert down == []
    _, down = p.deleted("a")
    assert types(down) == ["conversation.item.deleted", "session.reset.completed"]
    assert down[1]["deleted_item_ids"] == ["b"]


def test_a_client_deleting_an_item_twice_is_answered_twice_and_then_forgotten() -> None:
    """Two client deletes of one item get the ack and then the error; neither is hidden, and none lingers."""
    p = Play()
    p.items("a")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    p.client({"type": "conversation.item.delete", "event_id": "d2", "item_id": "a"})
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert up == []  # the client's deletes are on their way: nothing to send
    _, down = p.deleted("a")
    assert types(down) == ["conversation.item.deleted", "session.reset.completed"]
    assert down[1]["deleted_item_ids"] == []
    _, down = p.error(UNKNOWN, "d2", gone("a"))
    assert types(down) == ["error"] and down[0]["error"]["event_id"] == "d2"
    # Nothing of those deletes is left: an item re-created with the same id is deleted by the next reset.
    p.item("a")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["a"]


def test_a_client_delete_refused_for_another_reason_leaves_the_item_to_the_reset() -> None:
    """When the client's delete fails (not as unknown item), its error is forwarded and the reset deletes the item."""
    p = Play()
    p.items("a")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert up == []
    up, down = p.error("server_error", "d1", "try again", error_type="server_error")
    assert types(down) == ["error"] and down[0]["error"]["event_id"] == "d1"
    assert [e["item_id"] for e in up] == ["a"]
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"] and down[0]["deleted_item_ids"] == ["a"]


# --- errors with a null event id: attribution by code and message ---------------------------------------


def test_null_id_does_not_exist_without_a_quoted_id_answers_the_oldest_delete() -> None:
    """A null-id 'no such item' error that quotes no id answers the oldest delete in flight: here ours (hidden), so
    the item is gone and the reset completes."""
    p = Play()
    p.items("a")
    p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.error(UNKNOWN, None, "the item does not exist")
    assert types(down) == ["session.reset.completed"] and p.session.conversation.item_ids == []


def test_null_id_unknown_item_error_for_the_clients_delete_is_forwarded_and_removes_the_item() -> None:
    """A null-id unknown-item error quoting an item the client is deleting answers the client's delete."""
    p = Play()
    p.items("a", "b")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["b"]
    _, down = p.error(UNKNOWN, None, gone("a"))
    assert types(down) == ["error"]
    assert p.session.conversation.item_ids == ["b"]
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"] and down[0]["deleted_item_ids"] == ["b"]


def test_null_id_unknown_item_error_naming_nobodys_delete_is_forwarded() -> None:
    """A null-id unknown-item error about an item no delete is on its way for is the client's; the model is kept."""
    p = Play()
    p.items("a")
    _, down = p.error(UNKNOWN, None, gone("a"))
    assert types(down) == ["error"]
    assert p.session.conversation.item_ids == ["a"]


def test_null_id_not_active_error_answers_our_pending_cancel() -> None:
    """With our cancel on its way, a null-id not-active error is its answer: hidden, the response ends, deletes go."""
    p = Play()
    p.items("a")
    p.response_created("r1")
    p.client({"type": "session.reset", "event_id": "x"})
    up, down = p.error(NOT_ACTIVE, None, "no active response")
    assert down == []
    assert p.session.conversation.active_responses == {}
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"] and down[0]["response_cancelled"] is False


def test_null_id_not_active_errors_after_our_cancel_was_answered_hide_exactly_one() -> None:
    """Once `response.done` answered our cancel, one null-id not-active error is ours; the next is the client's."""
    p = Play()
    p.response_created("r1")
    p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.response_done("r1", "completed")
    assert types(down) == ["response.done", "session.reset.completed"]
    _, down = p.error(NOT_ACTIVE, None, "no active response")
    assert down == []
    _, down = p.error(NOT_ACTIVE, None, "no active response")
    assert types(down) == ["error"] and down[0]["error"]["code"] == NOT_ACTIVE


# --- errors answering our commands ------------------------------------------------------------------------


def test_an_error_answering_our_clear_is_hidden_and_the_reset_goes_on() -> None:
    """If the reset's `input_audio_buffer.clear` is refused, the error is hidden and the reset still completes."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "session.reset"})
    clear, delete = up
    assert clear["type"] == "input_audio_buffer.clear"
    _, down = p.error("invalid_value", clear["event_id"], "cannot clear")
    assert down == []
    _, down = p.ack_all([delete])
    assert types(down) == ["session.reset.completed"] and down[0]["deleted_item_ids"] == ["a"]
    # the clear is no longer expected: a later cleared is nobody's and reaches the client
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert types(down) == ["input_audio_buffer.cleared"]


def test_a_cancel_refused_for_another_reason_deletes_alongside_and_waits_for_the_end() -> None:
    """A cancel refused otherwise than not-active (a server that cannot cancel) is hidden; the reset deletes while
    the response runs, deletes its later items as they appear, and completes with the response's own done."""
    p = Play()
    p.items("a")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    (cancel,) = up
    up, down = p.error("server_error", cancel["event_id"], "not implemented", error_type="server_error")
    assert down == [] and types(up) == ["conversation.item.delete"] and up[0]["item_id"] == "a"
    assert p.session.conversation.active_responses == {"r1": Kind.CONVERSATION}
    _, down = p.ack_all(up)
    assert down == []  # the response still runs: it may add items
    p.output_item("r1", "o1")
    up, _ = p.item("o1")
    assert types(up) == ["conversation.item.delete"] and up[0]["item_id"] == "o1"
    p.ack_all(up)
    up, down = p.response_done("r1", "completed")
    assert types(down) == ["response.done", "session.reset.completed"] and up == []
    assert down[1]["deleted_item_ids"] == ["a", "o1"] and down[1]["response_cancelled"] is False


def test_a_late_delete_error_after_a_timeout_is_hidden_and_reported_nowhere() -> None:
    """A refused delete answered after its reset timed out stays hidden, fails no later reset and keeps the item."""
    p = Play(reset_timeout=5.0)
    p.items("a")
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    _, down = p.take()
    assert types(down) == ["error"] and down[0]["error"]["code"] == "session_reset_timeout"
    assert [n.outcome for n in resets_finished(p)] == ["timed_out"]
    _, down = p.error("server_error", up[0]["event_id"], "boom", error_type="server_error")
    assert down == []
    assert p.session.conversation.item_ids == ["a"]
    assert resets_finished(p) == []


def test_a_response_outliving_a_timed_out_reset_is_cancelled_again_with_deletes_alongside() -> None:
    """A response outliving a timed-out reset is cancelled again by the next one, which deletes alongside and does
    not wait for it; the cancels' late answers stay hidden."""
    p = Play(reset_timeout=5.0)
    p.response_created("r1")
    p.client({"type": "session.reset", "event_id": "x1", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    p.take()
    p.items("a")
    up2, _ = p.client({"type": "session.reset", "event_id": "x2", "clear_input_audio": False})
    assert [(e["type"], e.get("response_id", e.get("item_id"))) for e in up2] == [
        ("response.cancel", "r1"),
        ("conversation.item.delete", "a"),
    ]
    _, down = p.ack_all(up2)
    assert types(down) == ["session.reset.completed"]
    assert down[0]["reset_event_id"] == "x2" and down[0]["deleted_item_ids"] == ["a"]
    _, down = p.response_done("r1", "cancelled")
    assert types(down) == ["response.done"]
    _, down = p.error(NOT_ACTIVE, up2[0]["event_id"], "no active response")
    assert down == []


# --- defensive guards: not reachable through client_frame / upstream_frame ------------------------------


def test_guard_advance_without_a_reset_sends_nothing() -> None:
    """_advance() with no reset running is a no-op (every caller already checks; the guard stays harmless)."""
    s = Session()
    s._advance()
    assert s.data_to_send() == ([], []) and s.take_notices() == []


def test_guard_a_cancel_without_response_id_is_sent_bare_and_its_error_answers_it() -> None:
    """A cancel command with no target goes out without response_id; an error naming it answers it, hidden."""
    p = Play()
    p.items("a")
    p.client({"type": "session.reset", "clear_input_audio": False})
    p.take()
    reset = p.session.reset
    assert reset is not None
    p.session._send_command("cancel", None)
    (cancel,) = p.take()[0]
    assert cancel == {"type": "response.cancel", "event_id": cancel["event_id"]}
    assert cancel["event_id"] in reset.outstanding
    _, down = p.error(NOT_ACTIVE, cancel["event_id"])
    assert down == [] and cancel["event_id"] not in reset.outstanding


def test_guard_a_clear_failure_for_a_clear_no_longer_queued_only_answers_it() -> None:
    """A failed clear command that is not in the queue of our clears just counts as answered."""
    p = Play()
    (clear,), _ = p.client({"type": "session.reset"})
    reset = p.session.reset
    assert reset is not None
    p.session._clears.clear()
    p.session._command_failed(clear["event_id"], Command("clear", None, reset.seq), "x")
    assert reset.outstanding == set()


# --- suspected bugs -----------------------------------------------------------------------------------------


def test_many_held_resets_that_complete_at_once_are_all_answered() -> None:
    """Held resets with nothing to do each complete in turn when released, however many there are."""
    s = Session()
    s.client_frame(orjson.dumps({"type": "session.reset"}))
    s.data_to_send()
    n = 1000
    for i in range(n):
        s.client_frame(orjson.dumps({"type": "session.reset", "event_id": f"r{i}", "clear_input_audio": False}))
    s.upstream_frame(orjson.dumps({"type": "input_audio_buffer.cleared"}))
    up, down = s.data_to_send()
    events = [orjson.loads(f) for f in down]
    assert up == [] and s.held_count == 0 and s.reset is None
    assert [e["type"] for e in events] == ["session.reset.completed"] * (n + 1)
    assert [e["reset_event_id"] for e in events[1:]] == [f"r{i}" for i in range(n)]


def test_a_refused_create_with_null_event_id_and_the_servers_wording_ends_the_wait() -> None:
    """A create refused for an unknown previous item (server wording, null event id) no longer holds a reset back."""
    p = Play()
    p.client(
        {
            "type": "conversation.item.create",
            "event_id": "c1",
            "previous_item_id": "nope",
            "item": {"id": "mine", "type": "message"},
        }
    )
    up, _ = p.client({"type": "session.reset", "event_id": "r1"})
    assert p.ack_all(up) == ([], [])
    message = "Error adding item: the previous item with id 'nope' does not exist."
    _, down = p.error("item_create_invalid_previous_item_id", None, message)
    assert types(down) == ["error", "session.reset.completed"]
    assert not p.session.conversation.items_on_their_way


@pytest.mark.parametrize("null_event_id", [False, True])
def test_a_reset_after_a_timeout_never_shows_the_client_an_answer_to_our_own_delete(null_event_id: bool) -> None:
    """Answers to deletes of a timed-out reset and of the next one both stay hidden, and none stays pending."""
    p = Play(reset_timeout=5.0)
    p.items("a")
    p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    p.take()
    second, _ = p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    # The server answers in order: the first delete removes the item, any second one finds it gone.
    shown: list[dict[str, object]] = []
    _, down = p.deleted("a")
    shown += down
    for delete in second:
        _, down = p.error(UNKNOWN, None if null_event_id else delete["event_id"], gone("a"))
        shown += down
    assert types(shown) == ["session.reset.completed"]
    assert shown[0]["reset_event_id"] == "r2"
    assert p.session.conversation.item_ids == []
    assert p.session._commands == {}
