"""The sans-I/O session core: forwarding, tracking and the reset, with no event loop and no sockets."""

from __future__ import annotations

import orjson
import pytest

from proxy.core.conversation import Kind
from proxy.core.session import Binary, Session, TaskEnded
from tests.core.playbook import Play, types

# --- forwarding -------------------------------------------------------------------------------------


def test_frames_are_forwarded_as_the_same_objects() -> None:
    """Ordinary frames pass through untouched (same bytes object, no re-encoding), both ways, in order."""
    s = Session()
    a = b'{"type":"input_audio_buffer.append","audio":"AAAA"}'
    b = '{"type": "session.update", "session": {}}'
    s.client_frame(a)
    s.client_frame(b)
    c = b'{"type":"response.output_audio.delta","delta":"AAAA"}'
    s.upstream_frame(c)
    up, down = s.data_to_send()
    assert up[0] is a and up[1] is b and len(up) == 2
    assert down == [c] and down[0] is c
    assert s.data_to_send() == ([], [])


def test_binary_and_garbage_frames_pass_through() -> None:
    """Binary frames, invalid JSON, non-object JSON and typeless objects are forwarded, not dropped."""
    s = Session()
    frames = [Binary(b"\x00\x01"), b"{not json", b"[1,2]", b'{"no_type":1}', b"\xff\xfe", b'{"type":5}']
    for f in frames:
        s.client_frame(f)
        s.upstream_frame(f)
    up, down = s.data_to_send()
    assert up == frames and down == frames


def test_upstream_session_id_is_read_from_session_created() -> None:
    """The upstream session id is picked up for logs."""
    p = Play()
    p.upstream({"type": "session.created", "session": {"id": "sess_1"}})
    assert p.session.upstream_session_id == "sess_1"


# --- item tracking ----------------------------------------------------------------------------------


def test_beta_items_are_tracked_in_previous_item_id_order() -> None:
    """Beta `conversation.item.created` places items by previous_item_id: null first, known after, unknown last."""
    p = Play()
    p.item("a", None)
    p.item("b", "a")
    p.item("c", "a")  # inserted between a and b
    p.item("z", None)  # null: no predecessor → first
    p.item("u", "nonexistent")  # unknown predecessor → appended
    p.upstream({"type": "conversation.item.created", "item": {"id": "m"}})  # no previous_item_id → appended
    assert p.session.conversation.item_ids == ["z", "a", "c", "b", "u", "m"]


def test_ga_added_then_done_is_one_item_and_deleted_removes_it() -> None:
    """GA `.added` and `.done` name the same item once; `conversation.item.deleted` removes it."""
    p = Play()
    p.item("a", None, ga=True)
    p.item("b", "a", ga=True)
    p.upstream({"type": "conversation.item.done", "item": {"id": "a"}, "previous_item_id": None})
    assert p.session.conversation.item_ids == ["a", "b"]
    _, down = p.deleted("a")
    assert types(down) == ["conversation.item.deleted"]  # the client's own delete's ack is forwarded
    assert p.session.conversation.item_ids == ["b"]


def test_out_of_band_response_items_are_tracked_when_an_item_event_names_them() -> None:
    """Evidence beats intent: an out-of-band response's item that an item event announces is in the conversation."""
    p = Play()
    p.client({"type": "response.create", "response": {"conversation": "none"}})
    p.response_created("r1", conversation_id=None)
    assert not p.session.conversation.response_in_progress
    p.upstream({"type": "response.output_item.added", "response_id": "r1", "item": {"id": "oob1"}})
    assert p.session.conversation.item_ids == []  # announced as output only: not in the conversation yet
    p.upstream({"type": "conversation.item.added", "item": {"id": "oob1"}, "previous_item_id": None})
    assert p.session.conversation.item_ids == ["oob1"]
    assert p.session.conversation.response_in_progress  # it adds items: a reset waits for it
    p.response_done("r1")
    assert p.session.conversation.active_responses == {}


def test_a_response_without_conversation_id_is_of_unknown_kind() -> None:
    """Without conversation_id the kind is unknown, whatever the request it seems to answer asked for: a reset
    cancels it and waits for it."""
    p = Play()
    p.client({"type": "response.create", "response": {"conversation": "none"}})
    p.upstream({"type": "response.created", "response": {"id": "r1"}})
    assert p.session.conversation.active_responses == {"r1": Kind.UNKNOWN}
    p.upstream({"type": "response.created", "response": {"id": "r2"}})  # server VAD: nobody asked
    assert p.session.conversation.conversation_responses() == ["r1", "r2"]
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["response_id"] for e in up] == ["r1", "r2"]


def test_response_in_progress_from_create_until_done_or_error() -> None:
    """A response runs from a forwarded `response.create` to its `response.done`, or until an error answers it."""
    p = Play()
    conv = p.session.conversation
    p.client({"type": "response.create", "event_id": "c1"})
    assert conv.response_in_progress
    p.response_created("r1")
    assert conv.response_in_progress
    p.response_done("r1")
    assert not conv.response_in_progress
    p.client({"type": "response.create", "event_id": "c2"})
    error = {"type": "invalid_request_error", "code": "conversation_already_has_active_response", "event_id": "c2"}
    p.upstream({"type": "error", "error": error})
    assert not conv.response_in_progress
    p.client({"type": "response.create"})
    error = {"type": "invalid_request_error", "code": "conversation_already_has_active_response", "event_id": None}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["error"]  # the client's error is the client's
    assert not conv.response_in_progress


def test_committed_audio_is_pending_until_its_item_arrives() -> None:
    """`input_audio_buffer.committed` announces an item that is tracked once its item event arrives."""
    p = Play()
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None})
    assert list(p.session.conversation.pending_items) == ["u1"]
    p.item("u1", None)
    assert not p.session.conversation.pending_items
    assert p.session.conversation.item_ids == ["u1"]


# --- the reset ---------------------------------------------------------------------------------------


def test_reset_of_empty_conversation_clears_audio_and_completes() -> None:
    """With nothing to delete, a reset sends only the buffer clear and completes on its ack."""
    p = Play()
    up, down = p.client({"type": "session.reset", "event_id": "r1"})
    assert types(up) == ["input_audio_buffer.clear"] and down == []
    assert up[0]["event_id"].startswith("rrp_")
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert types(down) == ["session.reset.completed"]
    done = down[0]
    assert done["reset_event_id"] == "r1"
    assert done["deleted_item_ids"] == [] and done["kept_item_ids"] == [] and done["failed_item_ids"] == []
    assert done["response_cancelled"] is False
    assert isinstance(done["duration_ms"], float)


def test_reset_pipelines_deletes_hides_acks_and_releases_held_events_after() -> None:
    """All deletes go out at once; their acks are hidden; events sent meanwhile go upstream after, in order."""
    p = Play()
    p.items("a", "b", "c")
    up, _ = p.client({"type": "conversation.delete.all", "event_id": "r1"})
    assert types(up) == ["input_audio_buffer.clear"] + ["conversation.item.delete"] * 3
    assert [e["item_id"] for e in up[1:]] == ["a", "b", "c"]
    assert len({e["event_id"] for e in up}) == 4
    held = [{"type": "conversation.item.create", "event_id": f"h{i}", "item": {"type": "message"}} for i in range(3)]
    for event in held:
        assert p.client(event) == ([], [])
    assert p.session.held_count == 3
    u1, d1 = p.ack_all(up[:3])
    assert u1 == [] and d1 == []  # acks hidden; c not yet deleted
    u2, d2 = p.ack_all(up[3:])
    assert types(d2) == ["session.reset.completed"]
    assert d2[0]["deleted_item_ids"] == ["a", "b", "c"]
    assert u2 == held  # released in order, after the deletes
    assert p.session.conversation.item_ids == [] and p.session.held_count == 0


def test_reset_during_response_cancels_first_then_deletes() -> None:
    """A running response is cancelled and its done awaited before any delete; its done reaches the client."""
    p = Play()
    p.items("a")
    p.client({"type": "response.create", "event_id": "c1"})
    p.response_created("r1")
    p.item("out1")  # the response's output item
    up, _ = p.client({"type": "session.reset"})
    assert types(up) == ["response.cancel"] and up[0]["response_id"] == "r1"
    up, down = p.item("out2")  # a late output item, while the cancel is on its way
    assert up == [] and types(down) == ["conversation.item.created"]
    up, down = p.response_done("r1", "cancelled")
    assert types(down) == ["response.done"]
    assert types(up) == ["input_audio_buffer.clear"] + ["conversation.item.delete"] * 3
    _, down = p.ack_all(up)
    assert down[-1]["type"] == "session.reset.completed"
    assert down[-1]["deleted_item_ids"] == ["a", "out1", "out2"]
    assert down[-1]["response_cancelled"] is True
    assert down[-1]["reset_event_id"] is None


@pytest.mark.parametrize("with_event_id", [True, False])
def test_cancel_answered_by_not_active_error_moves_on(with_event_id: bool) -> None:
    """A cancel that raced the response's end is answered by an error: hidden, and the reset proceeds."""
    p = Play()
    p.items("a")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset"})
    cancel_id = up[0]["event_id"]
    p.response_done("r1", "completed")
    error = {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "no active response"}
    error["event_id"] = cancel_id if with_event_id else None
    up, down = p.upstream({"type": "error", "error": error})
    assert down == []
    # response.done came first, so the deletes went out already
    assert p.session.reset is not None


def test_cancel_error_before_done_ends_the_response() -> None:
    """A not-active error answering our cancel ends the response in our model and lets the deletes go."""
    p = Play()
    p.items("a")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset"})
    error = {"type": "invalid_request_error", "code": "response_cancel_not_active", "event_id": up[0]["event_id"]}
    up, down = p.upstream({"type": "error", "error": error})
    assert down == []
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"]
    assert down[0]["response_cancelled"] is False


def test_reset_waits_for_a_requested_response_to_start_then_cancels_it() -> None:
    """A `response.create` forwarded but not yet started is waited for, then cancelled."""
    p = Play()
    p.client({"type": "response.create"})
    up, _ = p.client({"type": "session.reset"})
    assert up == []
    up, _ = p.response_created("r1")
    assert types(up) == ["response.cancel"]
    up, _ = p.response_done("r1", "cancelled")
    assert types(up) == ["input_audio_buffer.clear"]


def test_cancel_response_false_lets_the_response_finish_then_deletes_its_items() -> None:
    """With cancel_response false no cancel is sent; the reset waits for the response to finish."""
    p = Play()
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "cancel_response": False, "clear_input_audio": False})
    assert up == []
    p.item("out1")
    up, _ = p.response_done("r1")
    assert types(up) == ["conversation.item.delete"]
    _, down = p.ack_all(up)
    assert down[0]["deleted_item_ids"] == ["out1"] and down[0]["response_cancelled"] is False


def test_items_appearing_mid_reset_are_deleted_and_committed_audio_is_awaited() -> None:
    """Items the upstream adds during a reset (VAD commit) are deleted too; a committed item is waited for."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "session.reset"})
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "vad1", "previous_item_id": "a"})
    _, down = p.ack_all(up)
    assert down == []  # still waiting for vad1
    up, _ = p.item("vad1")
    assert types(up) == ["conversation.item.delete"] and up[0]["item_id"] == "vad1"
    _, down = p.ack_all(up)
    assert down[0]["deleted_item_ids"] == ["a", "vad1"]


def test_response_started_by_server_vad_mid_reset_is_cancelled() -> None:
    """A response the upstream starts while deletes are out is cancelled before the reset completes."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "session.reset"})
    p.ack_all(up[:1])
    cancel_up, _ = p.response_created("r9")
    assert types(cancel_up) == ["response.cancel"] and cancel_up[0]["response_id"] == "r9"
    p.ack_all(up[1:])
    assert p.session.reset is not None
    up, _ = p.item("o9")
    assert up == []  # no delete while the response still runs
    up, down = p.response_done("r9", "cancelled")
    assert types(up) == ["conversation.item.delete"]  # clear not sent twice
    _, down = p.ack_all(up)
    assert down[0]["deleted_item_ids"] == ["a", "o9"] and down[0]["response_cancelled"] is True


@pytest.mark.parametrize("null_event_id", [True, False])
def test_unknown_item_error_counts_as_done(null_event_id: bool) -> None:
    """An unknown-item error answers a delete (matched by event id, or by the quoted id when it is null)."""
    p = Play()
    p.items("a", "b")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    delete_a = up[0]
    message = "Error deleting item: the item with id 'a' does not exist."
    error = {"type": "invalid_request_error", "code": "item_delete_invalid_item_id", "message": message}
    error["event_id"] = None if null_event_id else delete_a["event_id"]
    _, down = p.upstream({"type": "error", "event_id": "ev", "error": error})
    assert down == []
    _, down = p.deleted("b")
    assert types(down) == ["session.reset.completed"]
    assert down[0]["deleted_item_ids"] == ["b"]
    assert p.session.conversation.item_ids == []


def test_unknown_item_error_found_by_message_alone() -> None:
    """With no code and no event id, the quoted id in 'does not exist' still matches our delete."""
    p = Play()
    p.items("a")
    p.client({"type": "session.reset", "clear_input_audio": False})
    error = {"message": "the item with id 'a' does not exist."}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["session.reset.completed"]


def test_other_delete_errors_are_reported_as_failed() -> None:
    """A delete refused for another reason completes the reset with the item in failed_item_ids."""
    p = Play()
    p.items("a", "b")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    error = {"type": "server_error", "code": "internal", "message": "boom", "event_id": up[0]["event_id"]}
    p.upstream({"type": "error", "error": error})
    _, down = p.deleted("b")
    assert down[0]["deleted_item_ids"] == ["b"]
    assert down[0]["failed_item_ids"] == ["a"]
    assert p.session.conversation.item_ids == ["a"]


def test_keep_item_ids_are_kept() -> None:
    """Items named in keep_item_ids stay; ids that do not exist are ignored."""
    p = Play()
    p.items("sys", "a", "b")
    up, _ = p.client({"type": "session.reset", "keep_item_ids": ["sys", "ghost"], "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["a", "b"]
    _, down = p.ack_all(up)
    assert down[0]["kept_item_ids"] == ["sys"] and down[0]["deleted_item_ids"] == ["a", "b"]


def test_checkpoint_and_reset_to_it() -> None:
    """A checkpoint lists the items; a reset to it keeps those still there, plus keep_item_ids."""
    p = Play()
    p.items("s1", "s2")
    up, down = p.client({"type": "session.checkpoint", "event_id": "cp"})
    assert up == []
    assert down[0]["type"] == "session.checkpoint.created"
    assert down[0]["checkpoint_event_id"] == "cp" and down[0]["item_ids"] == ["s1", "s2"]
    p.deleted("s2")
    p.items("t1", "t2")
    up, _ = p.client({"type": "session.reset", "to": "checkpoint", "keep_item_ids": ["t2"], "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["t1"]
    _, down = p.ack_all(up)
    assert down[0]["kept_item_ids"] == ["s1", "t2"]


@pytest.mark.parametrize(
    ("event", "param"),
    [
        ({"type": "session.reset", "event_id": "e", "keep_item_ids": "a"}, "keep_item_ids"),
        ({"type": "session.reset", "event_id": "e", "keep_item_ids": [1]}, "keep_item_ids"),
        ({"type": "session.reset", "event_id": "e", "to": "start"}, "to"),
        ({"type": "session.reset", "event_id": "e", "to": "checkpoint"}, "to"),
        ({"type": "session.reset", "event_id": "e", "cancel_response": "yes"}, "cancel_response"),
        ({"type": "session.reset", "event_id": "e", "clear_input_audio": 1}, "clear_input_audio"),
        ({"type": "session.reset", "event_id": "e", "keep_items_ids": []}, "keep_items_ids"),
        ({"type": "session.reset", "event_id": 7}, "event_id"),
        ({"type": "session.checkpoint", "event_id": "e", "extra": 1}, "extra"),
    ],
)
def test_malformed_synthetic_events_get_an_error_and_send_nothing(event: dict[str, object], param: str) -> None:
    """A malformed reset or checkpoint is answered with invalid_session_reset naming the param; nothing goes up."""
    p = Play()
    p.items("a")
    up, down = p.client(event)
    assert up == []
    assert types(down) == ["error"]
    err = down[0]["error"]
    assert err["code"] == "invalid_session_reset" and err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["event_id"] == (event["event_id"] if isinstance(event["event_id"], str) else None)
    assert param in err["message"] or param == "to"
    assert p.session.reset is None and p.session.conversation.item_ids == ["a"]


def test_reset_timeout_reports_error_releases_held_and_hides_late_acks() -> None:
    """Past its deadline a reset ends with session_reset_timeout; held events go; late acks stay hidden."""
    p = Play(reset_timeout=10.0)
    p.items("a")
    up, _ = p.client({"type": "session.reset", "event_id": "r1"})
    assert p.session.deadline == p.clock.now + 10.0
    p.client({"type": "response.create", "event_id": "after"})
    p.clock.now += 9.0
    p.session.handle_timeout()
    assert p.take() == ([], [])
    p.clock.now += 1.0
    p.session.handle_timeout()
    up2, down = p.take()
    assert types(down) == ["error"]
    assert down[0]["error"]["type"] == "proxy_error"
    assert down[0]["error"]["code"] == "session_reset_timeout" and down[0]["error"]["event_id"] == "r1"
    assert types(up2) == ["response.create"]
    assert p.session.deadline is None
    _, late = p.ack_all(up)
    assert late == []
    assert p.session.conversation.item_ids == []


def test_a_reset_held_behind_another_runs_after_it_and_waits_for_items_sent_before_it() -> None:
    """A reset sent while one runs is held in order: it runs after, and deletes an item created before it."""
    p = Play()
    p.items("a")
    up1, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    p.client({"type": "conversation.item.create", "event_id": "x1", "item": {"type": "message"}})
    p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    p.client({"type": "response.create", "event_id": "after"})
    up, down = p.ack_all(up1)
    assert types(down) == ["session.reset.completed"] and down[0]["reset_event_id"] == "r1"
    assert types(up) == ["conversation.item.create"]
    assert p.session.reset is not None  # r2 waits: x1 is on its way
    up, down = p.item("x1")
    assert types(up) == ["conversation.item.delete"] and up[0]["item_id"] == "x1"
    up, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"] and down[0]["reset_event_id"] == "r2"
    assert down[0]["deleted_item_ids"] == ["x1"]
    assert types(up) == ["response.create"]


@pytest.mark.parametrize("answer", ["item", "error_by_id", "error_null_id"])
def test_reset_waits_for_a_client_create_sent_before_it(answer: str) -> None:
    """A create forwarded before the reset is waited for; answered by its item (deleted) or by an error."""
    p = Play()
    p.client({"type": "conversation.item.create", "event_id": "c1", "item": {"id": "mine", "type": "message"}})
    up, _ = p.client({"type": "session.reset"})
    _, down = p.ack_all(up)
    assert down == []
    if answer == "item":
        up, _ = p.item("mine")
        _, down = p.ack_all(up)
        assert down[-1]["deleted_item_ids"] == ["mine"]
    else:
        error = {"type": "invalid_request_error", "code": "item_create_invalid_previous_item_id"}
        error["event_id"] = "c1" if answer == "error_by_id" else None
        _, down = p.upstream({"type": "error", "error": error})
        assert types(down) == ["error", "session.reset.completed"]


@pytest.mark.parametrize("answer", ["committed", "empty_error"])
def test_reset_waits_for_a_client_commit_sent_before_it(answer: str) -> None:
    """An audio commit forwarded before the reset is waited for: its item is deleted, or its error ends the wait."""
    p = Play()
    p.client({"type": "input_audio_buffer.commit", "event_id": "k1"})
    up, _ = p.client({"type": "session.reset"})
    _, down = p.ack_all(up)
    assert down == []
    if answer == "committed":
        p.upstream({"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None})
        up, _ = p.item("u1", None)
        _, down = p.ack_all(up)
        assert down[-1]["deleted_item_ids"] == ["u1"]
    else:
        error = {"type": "invalid_request_error", "code": "input_audio_buffer_commit_empty", "event_id": None}
        _, down = p.upstream({"type": "error", "error": error})
        assert types(down) == ["error", "session.reset.completed"]


def test_held_event_limit_rejects_with_an_error_naming_the_event() -> None:
    """Beyond max_held_events an event is refused with held_events_overflow naming its event_id."""
    p = Play(max_held_events=2)
    p.client({"type": "session.reset"})
    p.client({"type": "input_audio_buffer.append", "event_id": "a1", "audio": ""})
    p.client({"type": "input_audio_buffer.append", "event_id": "a2", "audio": ""})
    up, down = p.client({"type": "input_audio_buffer.append", "event_id": "a3", "audio": ""})
    assert up == [] and types(down) == ["error"]
    assert down[0]["error"]["code"] == "held_events_overflow" and down[0]["error"]["event_id"] == "a3"
    assert p.session.held_count == 2


def test_client_clear_in_flight_keeps_its_own_ack() -> None:
    """A client's clear sent before the reset gets its ack forwarded; the reset's own is hidden."""
    p = Play()
    p.client({"type": "input_audio_buffer.clear", "event_id": "mine"})
    p.client({"type": "session.reset"})
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev1"})
    assert types(down) == ["input_audio_buffer.cleared"]
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev2"})
    assert types(down) == ["session.reset.completed"]


def test_client_delete_in_flight_is_not_duplicated() -> None:
    """An item the client is already deleting is waited for, not deleted twice; the client's ack is forwarded."""
    p = Play()
    p.items("a", "b")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["b"]
    _, down = p.deleted("b")
    assert down == []
    _, down = p.deleted("a")
    assert types(down) == ["conversation.item.deleted", "session.reset.completed"]
    assert down[1]["deleted_item_ids"] == ["b"]


def test_client_delete_error_in_flight_ends_the_wait() -> None:
    """If the client's own delete is answered by an unknown-item error, the reset stops waiting for that item."""
    p = Play()
    p.items("a")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    p.client({"type": "session.reset", "clear_input_audio": False})
    error = {"type": "invalid_request_error", "code": "item_delete_invalid_item_id", "event_id": "d1"}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["error", "session.reset.completed"]


def test_forward_internal_events_shows_acks() -> None:
    """With forward_internal_events the proxy's own acks reach the client too (debugging)."""
    p = Play(forward_internal_events=True)
    p.items("a")
    up, _ = p.client({"type": "session.reset"})
    _, down = p.ack_all(up)
    assert types(down) == ["input_audio_buffer.cleared", "conversation.item.deleted", "session.reset.completed"]


def test_configured_type_names() -> None:
    """Synthetic type names come from the config; the defaults then reach the upstream like any event."""
    p = Play(reset_types=frozenset({"x.reset"}), checkpoint_types=frozenset({"x.checkpoint"}))
    up, _ = p.client({"type": "session.reset"})
    assert types(up) == ["session.reset"]
    up, _ = p.client({"type": "x.reset"})
    assert types(up) == ["input_audio_buffer.clear"]


def test_frames_from_the_client_keep_order_behind_held_ones() -> None:
    """Binary and garbage frames sent during a reset are held too, so nothing overtakes."""
    s = Session()
    s.client_frame(orjson.dumps({"type": "session.reset"}))
    up, _ = s.data_to_send()
    s.client_frame(Binary(b"\x00"))
    s.client_frame(b"garbage")
    assert s.data_to_send() == ([], [])
    s.upstream_frame(orjson.dumps({"type": "input_audio_buffer.cleared"}))
    up, down = s.data_to_send()
    assert up == [Binary(b"\x00"), b"garbage"]
    assert orjson.loads(down[0])["type"] == "session.reset.completed"


def test_notices_report_finished_resets() -> None:
    """The relay learns of each finished reset (for logs and metrics) through notices."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "session.reset"})
    p.ack_all(up)
    notice, task = p.session.take_notices()  # the reset, then the task it ended (what it cost)
    assert notice.outcome == "completed" and notice.deleted == 1  # type: ignore[union-attr]
    assert task == TaskEnded(responses=0, input_tokens=0, output_tokens=0, auto=False)
    assert p.session.take_notices() == []


def test_tracked_client_commands_without_event_id_are_given_one() -> None:
    """A create, commit, delete, clear or cancel without event_id gets one, so an error can be matched to it."""
    p = Play()
    for event in (
        {"type": "response.create"},
        {"type": "conversation.item.create", "item": {"type": "message"}},
        {"type": "input_audio_buffer.commit"},
        {"type": "conversation.item.delete", "item_id": "x"},
        {"type": "input_audio_buffer.clear"},
        {"type": "response.cancel"},
    ):
        (sent,), _ = p.client(event)
        assert sent["event_id"].startswith("rrp_") and {k: v for k, v in sent.items() if k != "event_id"} == event
    kept = {"type": "response.create", "event_id": "mine"}
    assert p.client(kept)[0] == [kept]
    raw = b'{"type":"input_audio_buffer.append","audio":""}'
    p.session.client_frame(raw)
    assert p.session.data_to_send()[0][0] is raw  # untracked events stay byte for byte


def test_a_refused_create_without_event_id_does_not_stall_later_resets() -> None:
    """A response.create refused with an unexpected code is matched by the id the proxy gave it: resets proceed."""
    p = Play()
    (create,), _ = p.client({"type": "response.create"})
    error = {"type": "invalid_request_error", "code": "invalid_value", "event_id": create["event_id"]}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["error"]
    up, _ = p.client({"type": "session.reset"})
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"]


def test_a_refused_client_clear_does_not_shift_clear_answers() -> None:
    """An error answering the client's clear ends it; the reset's own cleared is then recognised as ours."""
    p = Play()
    (clear,), _ = p.client({"type": "input_audio_buffer.clear"})
    error = {"type": "server_error", "code": "boom", "event_id": clear["event_id"]}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["error"]
    up, _ = p.client({"type": "session.reset"})
    _, down = p.ack_all(up)
    assert types(down) == ["session.reset.completed"]


def test_a_client_cancel_sent_before_the_reset_is_answered_first() -> None:
    """The client's cancel (sent first) takes the cancelled response.done; the reset's cancel takes the error."""
    p = Play()
    p.response_created("r1")
    p.client({"type": "response.cancel", "event_id": "mine"})
    up, _ = p.client({"type": "session.reset"})
    assert types(up) == ["response.cancel"]
    up, down = p.response_done("r1", "cancelled")
    assert types(down) == ["response.done"] and types(up) == ["input_audio_buffer.clear"]
    _, down = p.ack_all(up)
    # The response is over (the client's cancel ended it): the reset is done; ours may still draw an error.
    assert types(down) == ["session.reset.completed"] and down[0]["response_cancelled"] is False
    error = {"type": "invalid_request_error", "code": "response_cancel_not_active", "event_id": None}
    _, down = p.upstream({"type": "error", "error": error})
    assert down == []  # that error answers our cancel: hidden


def test_a_client_cancels_null_id_error_reaches_the_client() -> None:
    """With a client cancel in flight, a null-id not-active error is the client's and is forwarded."""
    p = Play()
    p.client({"type": "response.cancel", "event_id": "mine"})
    error = {"type": "invalid_request_error", "code": "response_cancel_not_active", "event_id": None}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["error"]


def test_a_client_cancels_error_by_id_ends_it() -> None:
    """An error naming the client's cancel answers it; a later null-id not-active error is then ours."""
    p = Play()
    p.response_created("r1")
    p.client({"type": "response.cancel", "event_id": "mine"})
    error = {"type": "invalid_request_error", "code": "response_cancel_not_active", "event_id": "mine"}
    _, down = p.upstream({"type": "error", "error": error})
    assert types(down) == ["error"]
    up, _ = p.client({"type": "session.reset"})
    error["event_id"] = None
    up, down = p.upstream({"type": "error", "error": error})
    assert down == [] and types(up) == ["input_audio_buffer.clear"]


def test_settled_cancels_that_never_draw_an_error_are_not_kept_forever() -> None:
    """Cancels whose response ended on its own may never be refused: only the newest few are remembered."""
    p = Play()
    for i in range(300):
        p.response_created(f"r{i}")
        up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
        assert types(up) == ["response.cancel"]
        _, down = p.response_done(f"r{i}", "completed")
        assert types(down) == ["response.done", "session.reset.completed"]
    assert len(p.session._cancel_fifo) <= 257
    # A cancel behind all those settled ones still owns its response's cancellation.
    p.response_created("last")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.response_done("last", "cancelled")
    assert types(down) == ["response.done", "session.reset.completed"] and down[1]["response_cancelled"] is True


def test_a_server_vad_commit_does_not_answer_the_clients_commit() -> None:
    """A committed item that server VAD announced (speech_started) leaves the client's own commit on its way."""
    p = Play()
    p.upstream({"type": "input_audio_buffer.speech_started", "item_id": "vad1", "audio_start_ms": 0})
    p.upstream({"type": "input_audio_buffer.speech_started"})  # no item id: nothing to note
    p.client({"type": "input_audio_buffer.commit", "event_id": "k1"})
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "vad1", "previous_item_id": None})
    assert [c.event_id for c in p.session.conversation.commits] == ["k1"]
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": "vad1"})
    assert not p.session.conversation.commits
