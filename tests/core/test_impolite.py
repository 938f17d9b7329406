"""Impolite servers: each test is a trace of something a real server does that once wedged or fooled the core.

Every test here failed on the core before the "survive real servers" change (issue 9) and passes after it.
"""

from __future__ import annotations

import pytest

import proxy.core.session as session_module
from proxy.core.events import ResetRequest
from proxy.core.reset import Reset
from proxy.core.session import LateResponse, Session
from tests.core.playbook import Play, types

NULL = None


def reset_completed(down: list[dict[str, object]]) -> dict[str, object]:
    (completed,) = [e for e in down if e["type"] == "session.reset.completed"]
    return completed


# --- 1. no stale state ----------------------------------------------------------------------------


def test_a_commit_refused_with_null_code_and_id_does_not_stall_the_next_reset() -> None:
    """An `error` with code and event_id null answers the oldest command in flight: the reset does not wait for a
    committed item that will never come."""
    p = Play()
    p.items("a")
    p.client({"type": "input_audio_buffer.commit", "event_id": "k1"})
    _, down = p.error(NULL, NULL, "buffer too small")
    assert types(down) == ["error"]  # the client's error reaches the client
    up, _ = p.client({"type": "session.reset", "event_id": "r1"})
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["a"]


def test_a_refused_response_create_with_null_code_and_id_leaves_no_phantom_response() -> None:
    """After a `response.create` refused with nulls, resets delete at once instead of waiting for a response."""
    p = Play()
    p.items("a", "b")
    p.client({"type": "response.create", "event_id": "c1"})
    p.error(NULL, NULL, "model overloaded", error_type="server_error")
    assert not p.session.conversation.response_in_progress
    up, _ = p.client({"type": "session.reset"})
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete", "conversation.item.delete"]
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["a", "b"]


def test_an_error_with_a_code_never_seen_answers_the_oldest_command_in_flight() -> None:
    """An unknown code with a null event_id is treated like a null code: the oldest create in flight failed."""
    p = Play()
    p.client({"type": "conversation.item.create", "event_id": "i1", "item": {"type": "message"}})
    _, down = p.error("some_new_code_2027", NULL, "no")
    assert types(down) == ["error"]
    up, down = p.client({"type": "session.reset", "clear_input_audio": False})
    assert up == [] and types(down) == ["session.reset.completed"]


def test_a_command_that_is_never_answered_is_forgotten_when_it_ages_out() -> None:
    """A create nobody answers holds a reset only until it is `reset_timeout` old: the reset then completes
    (not timed out), at the moment the deadline says."""
    p = Play(reset_timeout=10.0)
    p.client({"type": "conversation.item.create", "event_id": "i1", "item": {"type": "message"}})
    p.clock.now += 4.0
    up, down = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert up == [] and down == []
    assert p.session.paused and p.session.deadline == 1010.0  # when i1 ages out, before the reset's own 1014
    p.clock.now = 1010.0
    p.session.handle_timeout()
    _, down = p.take()
    assert types(down) == ["session.reset.completed"] and not p.session.paused
    assert p.session.deadline is None


def test_a_reset_long_after_an_unanswered_create_does_not_wait_at_all() -> None:
    """Entries older than the timeout are pruned when a reset starts."""
    p = Play(reset_timeout=10.0)
    p.client({"type": "response.create", "event_id": "c1"})
    p.client({"type": "input_audio_buffer.commit", "event_id": "k1"})
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "x"})
    p.clock.now += 11.0
    _, down = p.client({"type": "session.reset", "clear_input_audio": False})
    assert types(down) == ["session.reset.completed"]


def test_after_a_timed_out_reset_the_next_one_deletes_again_as_on_a_fresh_connection() -> None:
    """A delete lost by the server times the reset out; the next reset sends its own delete and completes, and the
    old delete's late answer stays hidden."""
    p = Play(reset_timeout=5.0)
    p.items("a")
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    (lost,) = up
    p.clock.now += 5.0
    p.session.handle_timeout()
    p.take()
    up, _ = p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    assert types(up) == ["conversation.item.delete"] and up[0]["event_id"] != lost["event_id"]
    _, down = p.deleted("a")
    assert reset_completed(down)["deleted_item_ids"] == ["a"]
    _, down = p.error("item_delete_invalid_item_id", lost["event_id"], "Error deleting item: the item with id 'a'")
    assert down == []


def test_a_late_ack_of_a_timed_out_delete_is_hidden_and_counts_for_the_running_reset() -> None:
    """The old delete's ack, after the timeout, is ours: not shown, and the item is gone."""
    p = Play(reset_timeout=5.0)
    p.items("a", "b")
    p.client({"type": "session.reset", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    p.take()
    p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    _, down = p.deleted("a")  # the answer to r2's delete of a
    _, down = p.deleted("b")
    assert reset_completed(down)["deleted_item_ids"] == ["a", "b"]
    _, down = p.deleted("a")  # the answer to the timed-out reset's delete of a, at last
    assert down == []


def test_a_replaced_response_ends_when_the_new_one_starts() -> None:
    """A server that replaces a running response without its `response.done`: the new one's `response.created`
    ends the old one, and a reset cancels only the new one."""
    p = Play()
    p.response_created("r1")
    p.response_created("r2")
    assert p.session.conversation.conversation_responses() == ["r2"]
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "r2")]
    _, down = p.response_done("r2", "cancelled")
    assert reset_completed(down)["response_cancelled"] is True


def test_a_replaced_response_of_unknown_kind_ends_when_a_requested_one_starts() -> None:
    """No conversation_id anywhere: a response the client asked to have in the conversation, started while an
    earlier one runs, shows the earlier one was replaced; one asked for out of band shows nothing."""
    p = Play()
    unnamed = {"type": "response.created", "response": {"id": "r1", "status": "in_progress"}}
    p.client({"type": "response.create", "event_id": "c1"})
    p.upstream(unnamed)
    p.client({"type": "response.create", "event_id": "c2", "response": {"conversation": "none"}})
    p.upstream({**unnamed, "response": {"id": "r2"}})
    assert p.session.conversation.conversation_responses() == ["r1", "r2"]
    p.client({"type": "response.create", "event_id": "c3"})
    p.upstream({**unnamed, "response": {"id": "r3"}})
    assert p.session.conversation.conversation_responses() == ["r3"]
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "r3")]
    _, down = p.response_done("r3", "cancelled")
    assert reset_completed(down)["response_cancelled"] is True


def test_a_response_replaced_unseen_holds_one_reset_until_its_timeout_and_the_next_not_at_all() -> None:
    """No conversation_id, and the replacement started by the server itself (no request to pair it with): the
    core cannot tell the old response is over. The reset that waits for it times out; the next one does not wait
    for it (it cancels it again, if asked, without awaiting the answer) and completes at once."""
    p = Play(reset_timeout=10.0)
    p.client({"type": "response.create", "event_id": "c1"})
    p.upstream({"type": "response.created", "response": {"id": "r1", "status": "in_progress"}})
    p.upstream({"type": "response.created", "response": {"id": "r2", "status": "in_progress"}})  # server VAD's
    p.upstream({"type": "response.done", "response": {"id": "r2", "status": "completed"}})
    up, down = p.client(
        {"type": "session.reset", "event_id": "x1", "cancel_response": False, "clear_input_audio": False}
    )
    assert up == [] and down == []
    p.clock.now += 10.0
    p.session.handle_timeout()
    _, down = p.take()
    assert down[0]["error"]["code"] == "session_reset_timeout" and "the response r1" in down[0]["error"]["message"]
    up, down = p.client(
        {"type": "session.reset", "event_id": "x2", "cancel_response": False, "clear_input_audio": False}
    )
    assert up == [] and reset_completed(down)["reset_event_id"] == "x2"
    up, down = p.client({"type": "session.reset", "event_id": "x3", "clear_input_audio": False})
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "r1")]  # not awaited
    assert reset_completed(down)["reset_event_id"] == "x3"
    _, down = p.error("response_cancel_not_active", NULL, "Cancellation failed: no active response found with id 'r1'.")
    assert down == [] and p.session.conversation.conversation_responses() == []  # ours; r1 is over


def test_a_replacement_settles_our_cancel_for_the_replaced_response() -> None:
    """Our cancel for r1 is settled when r2 replaces r1: the reset then cancels r2 and does not wait for r1."""
    p = Play()
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["response_id"] for e in up] == ["r1"]
    up, _ = p.response_created("r2")
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "r2")]
    _, down = p.response_done("r2", "cancelled")
    assert types(down) == ["response.done", "session.reset.completed"]


def test_vad_interrupting_the_response_before_our_cancel_is_handled_hides_the_not_active_error() -> None:
    """Server VAD ends the response (`turn_detected`) just before our cancel lands; the server's not-active error
    for our cancel, named or null, never reaches the client, and our cancel is not credited."""
    for named in (True, False):
        p = Play()
        p.items("a")
        p.response_created("r1")
        up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
        (cancel,) = up
        done = {"id": "r1", "status": "cancelled", "status_details": {"type": "cancelled", "reason": "turn_detected"}}
        up, down = p.upstream({"type": "response.done", "response": {**done, "output": []}})
        assert types(down) == ["response.done"] and types(up) == ["conversation.item.delete"]
        _, down = p.error("response_cancel_not_active", cancel["event_id"] if named else NULL, "no active response")
        assert down == []
        _, down = p.ack_all(up)
        assert reset_completed(down)["response_cancelled"] is False


def test_a_clients_id_less_cancel_is_never_credited_with_an_out_of_band_response() -> None:
    """An out-of-band response cancelled (by its own cancel) does not take the client's id-less cancel, which
    applies to the conversation response; the reset's cancel then gets the not-active answer, hidden."""
    p = Play()
    p.response_created("oob", conversation_id=None)
    p.response_created("r1")
    p.client({"type": "response.cancel", "event_id": "c1"})  # the conversation response
    p.response_done("oob", "cancelled")  # ended by something else (e.g. its own cancel by id)
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    (ours,) = up
    _, down = p.response_done("r1", "cancelled")  # the client's cancel, sent first, ended it
    assert types(down) == ["response.done", "session.reset.completed"]
    assert down[1]["response_cancelled"] is False
    _, down = p.error("response_cancel_not_active", ours["event_id"], "no active response")
    assert down == []


# Found by the property runs over the model's quirks (issue 9, second session): null-id errors in order.


def test_a_null_id_unknown_item_error_answers_the_oldest_delete_of_that_item_ours_before_the_clients() -> None:
    """A timed-out reset's late delete of `a`, then ours, then the client's: the ack is the late one's, the
    "does not exist" error ours (hidden), and only the next answer is the client's."""
    p = Play(reset_timeout=10.0)
    p.items("a")
    p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    p.clock.now += 11.0
    p.session.handle_timeout()
    p.take()
    up, _ = p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    assert types(up) == ["conversation.item.delete"]
    up, _ = p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    assert up == []  # held behind r2
    _, down = p.deleted("a")  # the late answer to r1's delete: the item is gone, r2 is done
    assert reset_completed(down)["deleted_item_ids"] == ["a"]
    assert types(p.take()[0]) == []
    gone = "Error deleting item: the item with id 'a' does not exist."
    _, down = p.error(NULL, NULL, gone)  # r2's delete's answer: ours
    assert down == []
    _, down = p.error(NULL, NULL, gone)  # the client's d1's
    assert types(down) == ["error"]


@pytest.mark.parametrize("with_wording", [True, False])
def test_a_null_error_for_a_refused_create_names_the_create_not_a_delete(with_wording: bool) -> None:
    """ "Error adding item: the previous item with id 'x' does not exist" is a create's failure, whoever deletes
    `x`; without the wording, order says the same (the create is the oldest command unanswered)."""
    p = Play()
    p.client(
        {"type": "conversation.item.create", "event_id": "i1", "item": {"type": "message"}, "previous_item_id": "x"}
    )
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "cancel_response": False})
    assert types(up) == ["input_audio_buffer.clear"]
    message = "Error adding item: the previous item with id 'x' does not exist." if with_wording else "nope"
    _, down = p.error(NULL, NULL, message)
    assert types(down) == ["error"]  # the client's, shown
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert reset_completed(down)["deleted_item_ids"] == []


def test_a_late_null_error_for_an_aged_out_commit_is_not_taken_for_a_newer_create() -> None:
    """A commit forgotten by age is answered at last by an error no wording explains: it is the commit's (the
    oldest unanswered), so the reset still waits for the newer create's item."""
    p = Play(reset_timeout=10.0)
    p.client({"type": "input_audio_buffer.commit", "event_id": "k1"})
    p.clock.now += 11.0
    p.client({"type": "conversation.item.create", "event_id": "i1", "item": {"id": "mine", "type": "message"}})
    up, down = p.client({"type": "session.reset", "event_id": "r1", "keep_item_ids": ["mine"]})
    assert types(up) == ["input_audio_buffer.clear"] and down == []
    _, down = p.error(NULL, NULL, "buffer too small")  # k1's answer, at last
    assert types(down) == ["error"]
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert down == [] and p.session.paused  # i1's item is still on its way
    _, down = p.item("mine")
    assert types(down) == ["conversation.item.created", "session.reset.completed"]
    assert reset_completed(down)["kept_item_ids"] == ["mine"]


def test_a_null_already_active_error_is_the_clients_even_when_server_vad_took_its_requests_place() -> None:
    """Server VAD starts a response before the client's `response.create` arrives; the create's refusal (null
    code, the API's wording) reaches the client, and is not taken for the reset's cancel."""
    p = Play()
    p.client({"type": "response.create", "event_id": "c1"})
    p.response_created("resp_vad")  # server VAD's, taken for c1's
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    _, down = p.error(NULL, NULL, "Conversation already has an active response in progress: resp_vad.")
    assert types(down) == ["error"]
    _, down = p.upstream({"type": "response.done", "response": {"id": "resp_vad", "status": "cancelled", "output": []}})
    completed = reset_completed(down)
    assert completed["response_cancelled"] is True


def test_a_clients_cancel_refused_with_an_unknown_code_and_null_id_is_the_clients() -> None:
    """A server that cannot cancel answers the client's cancel with "not_implemented" and a null id: the oldest
    command unanswered is the client's cancel, not the reset's clear."""
    p = Play()
    p.client({"type": "response.cancel", "event_id": "x1"})
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "cancel_response": False})
    assert types(up) == ["input_audio_buffer.clear"]
    _, down = p.error("not_implemented", NULL, "response.cancel is not implemented by this server.")
    assert types(down) == ["error"]
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert types(down) == ["session.reset.completed"]


def test_a_null_error_no_wording_explains_answers_a_timed_out_resets_late_delete_first() -> None:
    """The oldest command unanswered may be one a timed-out reset stopped waiting for: the error is ours."""
    p = Play(reset_timeout=10.0)
    p.items("a")
    p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    p.clock.now += 11.0
    p.session.handle_timeout()
    p.take()
    p.client({"type": "input_audio_buffer.clear", "event_id": "k1"})
    _, down = p.error(NULL, NULL, "internal error")  # r1's delete of a, at last
    assert down == [] and "a" in p.session.conversation
    _, down = p.error(NULL, NULL, "internal error")  # the client's clear
    assert types(down) == ["error"]
    _, down = p.error(NULL, NULL, "internal error")  # nothing left to answer: shown
    assert types(down) == ["error"]


def test_a_null_error_no_wording_explains_may_answer_the_resets_cancel() -> None:
    """The reset's cancel is the oldest command unanswered: refused, so the reset deletes alongside and waits for
    the response to end."""
    p = Play()
    p.items("a")
    p.response_created("resp_1")
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    up, down = p.error(NULL, NULL, "internal error")
    assert down == [] and types(up) == ["conversation.item.delete"]
    p.deleted("a")
    _, down = p.response_done("resp_1")
    assert reset_completed(down)["deleted_item_ids"] == ["a"]


def test_an_unasked_for_cleared_and_a_null_session_expired_answer_nothing() -> None:
    p = Play()
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
    assert types(down) == ["input_audio_buffer.cleared"]
    p.client({"type": "conversation.item.create", "event_id": "i1", "item": {"type": "message"}})
    _, down = p.error("session_expired", NULL, "Your session hit the maximum duration of 60 minutes.")
    assert types(down) == ["error"] and len(p.session.conversation.item_creates) == 1


def test_the_late_clears_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "_MAX_LATE", 1)
    p = Play(reset_timeout=10.0)
    for n in range(2):
        p.client({"type": "session.reset", "event_id": f"r{n}", "cancel_response": False})
        p.clock.now += 11.0
        p.session.handle_timeout()
    assert len(p.session._late_clears) == 1


def test_a_named_error_for_a_delete_we_stopped_waiting_for_takes_it_out_of_the_order() -> None:
    """The late delete's ack comes first (the item is gone, so our newer delete is waited for no more); then our
    newer delete's own error, naming it, and the client's delete's error with a null id: the client's, shown."""
    p = Play(reset_timeout=10.0)
    p.items("a")
    p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    p.clock.now += 11.0
    p.session.handle_timeout()
    p.take()
    up, _ = p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    (ours,) = up
    _, down = p.deleted("a")
    assert types(down) == ["session.reset.completed"]
    _, down = p.error("item_delete_invalid_item_id", ours["event_id"], "Error deleting item: the item with id 'a'")
    assert down == [] and p.session._late_deletes == {}
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    _, down = p.error("item_delete_invalid_item_id", NULL, "Error deleting item: the item with id 'a' does not exist.")
    assert types(down) == ["error"]


def test_a_named_error_for_a_late_clear_takes_it_out_of_the_order() -> None:
    """Errors naming commands of ours we stopped waiting for are ours, whatever they name; one naming a late
    clear also takes that clear out of the order, so the next clear's answer is not taken for it."""
    p = Play(reset_timeout=10.0)
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "cancel_response": False})
    (clear,) = up
    p.clock.now += 11.0
    p.session.handle_timeout()
    p.take()
    _, down = p.error("server_error", p.session.id_prefix + "cmd999", "boom")
    assert down == [] and len(p.session._late_clears) == 1
    _, down = p.error("server_error", clear["event_id"], "boom")
    assert down == [] and not p.session._late_clears


# --- 2. evidence over intent ----------------------------------------------------------------------


def test_an_out_of_band_request_the_server_ignored_is_cancelled_and_its_item_deleted() -> None:
    """The server ignores `conversation: "none"` and says so (conversation_id set): a reset cancels the response
    and deletes its item."""
    p = Play()
    p.client({"type": "response.create", "event_id": "c1", "response": {"conversation": "none"}})
    p.response_created("r1", conversation_id="conv_1")
    p.output_item("r1", "o1")
    p.item("o1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "r1")]
    up, _ = p.response_done("r1", "cancelled")
    assert [e["item_id"] for e in up] == ["o1"]
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["o1"]


def test_a_reset_waits_for_an_out_of_band_request_to_show_its_kind() -> None:
    """A reset right after an out-of-band request does not trust the request: it waits for its response.created.
    Here the server ignored the option; the reset waits for the response (no cancel asked) and deletes its item."""
    p = Play()
    p.client({"type": "response.create", "event_id": "c1", "response": {"conversation": "none"}})
    up, down = p.client({"type": "session.reset", "cancel_response": False, "clear_input_audio": False})
    assert up == [] and down == [] and p.session.paused
    p.response_created("r1", conversation_id="conv_1")
    p.output_item("r1", "o1")
    p.item("o1")
    up, _ = p.response_done("r1")
    assert [e["item_id"] for e in up] == ["o1"]
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["o1"]


def test_a_reset_after_an_out_of_band_request_completes_once_it_starts_out_of_band() -> None:
    p = Play()
    p.client({"type": "response.create", "event_id": "c1", "response": {"conversation": "none"}})
    p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.response_created("r1", conversation_id=None)
    assert types(down) == ["response.created", "session.reset.completed"]


def test_an_item_event_for_an_out_of_band_output_makes_the_reset_delete_it() -> None:
    """The server says out of band (conversation_id null) but announces the item with an item event: tracked."""
    p = Play()
    p.client({"type": "response.create", "response": {"conversation": "none"}})
    p.response_created("r1", conversation_id=None)
    p.output_item("r1", "o1")
    p.item("o1")
    p.response_done("r1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["o1"]


# --- 3. late auto-responses -------------------------------------------------------------------------


def test_a_late_auto_response_after_a_reset_is_cancelled_and_its_items_deleted() -> None:
    """After a reset, a response nobody asked for since (the auto-response for audio the reset removed, started
    after transcription) is cancelled and its output item deleted; our commands' answers stay hidden."""
    p = Play()
    p.items("u1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    p.ack_all(up)
    up, down = p.response_created("late")
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "late")]
    assert types(down) == ["response.created"]
    assert [n for n in p.session.take_notices() if isinstance(n, LateResponse)] == [LateResponse("late")]
    p.output_item("late", "o1")
    up, _ = p.item("o1")
    assert [(e["type"], e["item_id"]) for e in up] == [("conversation.item.delete", "o1")]
    _, down = p.ack_all(up)
    assert down == []
    _, down = p.response_done("late", "cancelled")
    assert types(down) == ["response.done"]
    assert p.session.conversation.item_ids == []


def test_a_late_response_whose_item_arrives_before_the_announcement_or_only_in_its_done_is_cleaned() -> None:
    """Output items already present, or listed only in `response.done`, are deleted too."""
    p = Play()
    up, _ = p.client({"type": "session.reset"})
    p.ack_all(up)
    p.response_created("late")
    p.item("o1")
    up, _ = p.output_item("late", "o1")  # announced after its item event
    assert [e["item_id"] for e in up] == ["o1"]
    p.ack_all(up)
    p.item("o2")
    done = {"id": "late", "status": "cancelled", "output": [{"id": "o2"}, {"id": "gone"}, "junk", {"id": 5}]}
    up, _ = p.upstream({"type": "response.done", "response": done})
    assert [e["item_id"] for e in up] == ["o2"]


def test_a_response_after_new_input_since_the_reset_is_left_alone() -> None:
    """A client response.create, a commit, or new speech since the reset makes a response legitimate."""
    starts = [
        lambda p: p.client({"type": "response.create"}),
        lambda p: p.client({"type": "input_audio_buffer.commit"}),
        lambda p: p.upstream({"type": "input_audio_buffer.speech_started", "item_id": "u2", "audio_start_ms": 0}),
        lambda p: p.upstream({"type": "input_audio_buffer.timeout_triggered", "item_id": "u3"}),
    ]
    for start in starts:
        p = Play()
        up, _ = p.client({"type": "session.reset"})
        p.ack_all(up)
        start(p)
        up, _ = p.response_created("fresh")
        assert up == []


def test_no_response_is_late_before_the_first_reset_or_while_one_runs() -> None:
    """Without a reset behind it a response is the server's own business; during a reset the reset cancels it."""
    p = Play()
    up, _ = p.response_created("r0")
    assert up == []
    p.response_done("r0")
    p.items("a")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    up, _ = p.response_created("r1")  # VAD mid-reset
    assert [(e["type"], e["response_id"]) for e in up] == [("response.cancel", "r1")]
    assert not [n for n in p.session.take_notices() if isinstance(n, LateResponse)]


def test_an_idle_timeout_commit_is_an_item_on_its_way() -> None:
    """`input_audio_buffer.timeout_triggered` names an item the server commits on its own: a reset waits for it,
    and its committed event answers no client commit."""
    p = Play()
    p.upstream({"type": "input_audio_buffer.timeout_triggered", "item_id": "idle1", "audio_start_ms": 0})
    up, down = p.client({"type": "session.reset", "clear_input_audio": False})
    assert up == [] and down == []
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "idle1", "previous_item_id": None})
    up, _ = p.item("idle1", None)
    assert [e["item_id"] for e in up] == ["idle1"]
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["idle1"]


# --- 4. hold-back by back-pressure --------------------------------------------------------------------


def test_the_session_is_paused_while_a_reset_runs() -> None:
    """`paused` is the flow-control value the relay obeys: true from the reset's start to its end."""
    p = Play()
    p.items("a")
    assert not p.session.paused
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert p.session.paused
    p.client({"type": "input_audio_buffer.append", "audio": "AAAA"})
    assert p.session.paused and p.session.held_count == 1
    up2, _ = p.ack_all(up)
    assert types(up2) == ["input_audio_buffer.append"] and not p.session.paused


def test_once_one_held_event_is_refused_every_later_one_is_until_the_reset_ends() -> None:
    """No hole in the audio: after a large append is refused, a small commit behind it is refused too; after the
    reset, events pass again."""
    p = Play(max_held_bytes=100)
    p.items("a")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.client({"type": "input_audio_buffer.append", "event_id": "big", "audio": "A" * 200})
    _, down2 = p.client({"type": "input_audio_buffer.commit", "event_id": "k1"})
    assert [e["error"]["event_id"] for e in down + down2] == ["big", "k1"]
    assert "every later event is refused too" in down2[0]["error"]["message"]
    up2, _ = p.ack_all(up)
    assert up2 == []  # nothing held: neither the append nor the commit went up
    up3, _ = p.client({"type": "input_audio_buffer.commit", "event_id": "k2"})
    assert types(up3) == ["input_audio_buffer.commit"]


# --- 5. honest timeouts -------------------------------------------------------------------------------


def test_a_timeout_says_what_was_awaited_and_what_was_deleted() -> None:
    """The timeout error names the running response the server refused to cancel, the items still on their way,
    the commands unanswered, and carries `deleted_item_ids` so far."""
    p = Play(reset_timeout=5.0)
    p.items("a", "b")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "event_id": "r1x"})
    (cancel,) = up
    up, _ = p.error(NULL, cancel["event_id"], "not implemented", error_type="server_error")
    p.deleted("a")  # b's delete and the clear stay unanswered
    p.clock.now += 5.0
    p.session.handle_timeout()
    _, down = p.take()
    (error,) = down
    assert error["error"]["code"] == "session_reset_timeout" and error["error"]["event_id"] == "r1x"
    message = error["error"]["message"]
    assert "the response r1 (the server refused to cancel it)" in message
    assert "2 command(s) unanswered" in message
    assert error["deleted_item_ids"] == ["a"] and error["reset_event_id"] == "r1x"


def test_a_timeout_waiting_for_a_requested_response_and_items_says_so() -> None:
    """A reset waiting on a client's response.create and a commit names both."""
    p = Play(reset_timeout=5.0)
    p.client({"type": "response.create"})
    p.client({"type": "input_audio_buffer.commit"})
    p.client({"type": "session.reset"})
    p.clock.now += 5.0
    p.session.handle_timeout()
    _, down = p.take()
    message = down[-1]["error"]["message"]
    assert "still awaited: a requested response, 1 item(s) on their way" in message


def test_a_reset_with_nothing_left_to_await_says_so() -> None:
    """The description never comes out empty (a guard: a reset with nothing to await has completed)."""
    p = Play()
    p.client({"type": "session.reset", "clear_input_audio": False})
    reset = p.session.reset
    assert reset is None
    idle = Reset(seq=1, request=ResetRequest(event_id=None), keep=frozenset(), started_at=0.0, deadline=1.0)
    assert idle.awaiting(p.session.conversation) == "nothing it could name"


# --- 6. unguessable ids -------------------------------------------------------------------------------


def test_the_proxys_event_ids_carry_a_random_per_session_prefix() -> None:
    """Two sessions never share a prefix, and a client id like `rrp_1` is never mistaken for ours."""
    a, b = Session(), Session()
    assert a.id_prefix != b.id_prefix and len(a.id_prefix) >= 16
    p = Play()
    p.client({"type": "response.create", "event_id": "rrp_1"})
    _, down = p.error("conversation_already_has_active_response", "rrp_1", "busy")
    assert types(down) == ["error"]
    up, _ = p.client({"type": "input_audio_buffer.commit"})  # named by the proxy
    named = p.session.conversation.commits[0].event_id
    assert named is not None and named.startswith(p.session.id_prefix) and up[0]["event_id"] == named
    _, down = p.error(NULL, named, "no audio")
    assert types(down) == ["error"]  # a command the proxy named for the client is the client's


# --- bounds and the clean-up's own commands ---------------------------------------------------------


def late_response_with_item(p: Play, rid: str = "late", item_id: str = "o1") -> dict[str, object]:
    """A reset that removes the turn, then a late response with one output item; returns our clean-up delete."""
    p.items("turn")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    p.ack_all(up)
    p.response_created(rid)
    p.output_item(rid, item_id)
    up, _ = p.item(item_id)
    (delete,) = up
    return delete


def test_a_reset_waits_for_a_clean_up_delete_already_on_its_way() -> None:
    """A reset that starts while our clean-up delete is in flight waits for it instead of deleting twice."""
    p = Play()
    late_response_with_item(p)
    p.response_done("late", "cancelled")
    up, _ = p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    assert up == []
    _, down = p.deleted("o1")
    assert reset_completed(down)["deleted_item_ids"] == ["o1"]


def test_a_clean_up_delete_unanswered_past_the_timeout_is_sent_again_by_the_next_reset() -> None:
    """Our clean-up delete that nobody answers ages out: the next reset sends its own, and a late answer to the
    first stays hidden."""
    p = Play(reset_timeout=5.0)
    first = late_response_with_item(p)
    p.response_done("late", "cancelled")
    p.clock.now += 5.0
    up, _ = p.client({"type": "session.reset", "event_id": "r2", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["o1"] and up[0]["event_id"] != first["event_id"]
    _, down = p.deleted("o1")
    assert reset_completed(down)["deleted_item_ids"] == ["o1"]
    _, down = p.error("item_delete_invalid_item_id", None, "Error deleting item: the item with id 'o1' does not exist.")
    assert down == []


def test_clean_up_commands_refused_are_hidden_and_touch_no_reset() -> None:
    """The server refuses our clean-up cancel and delete: both errors are ours, the item stays, nothing fails."""
    p = Play()
    p.items("turn")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    p.ack_all(up)
    (cancel,), _ = p.response_created("late")
    _, down = p.error(None, cancel["event_id"], "not implemented", error_type="server_error")
    assert down == []
    p.output_item("late", "o1")
    (delete,), _ = p.item("o1")
    _, down = p.error("server_error", delete["event_id"], "boom", error_type="server_error")
    assert down == [] and p.session.conversation.item_ids == ["o1"]


def test_the_memory_of_client_deletes_late_deletes_and_doomed_items_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client deletes nobody answers, late answers we wait for and a late response's items are kept to a bound."""
    monkeypatch.setattr(session_module, "_MAX_LATE", 2)
    p = Play(reset_timeout=5.0)
    for i in range(3):
        p.client({"type": "conversation.item.delete", "event_id": f"d{i}", "item_id": f"x{i}"})
    assert list(p.session._client_delete_ids) == ["d1", "d2"]
    p.items("a", "b", "c")
    p.client({"type": "session.reset", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    assert len(p.session._late_deletes) == 2 and set(p.session._late_deletes) < {"a", "b", "c"}
    p.take()
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    p.ack_all(up)
    p.response_created("late")
    for item_id in ("o1", "o2", "o3"):
        p.output_item("late", item_id)
    assert list(p.session._doomed_items) == ["o2", "o3"]


def test_a_clean_up_cancel_unanswered_past_the_timeout_stops_being_awaited_but_stays_ours() -> None:
    """Our clean-up cancel nobody answers ages out when the next reset starts (which cancels again); the done
    that finally comes is the first cancel's, and the second cancel's not-active error stays hidden."""
    p = Play(reset_timeout=5.0)
    p.items("turn")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    p.ack_all(up)
    (cancel,), _ = p.response_created("late")
    p.clock.now += 5.0
    (again,), _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert again["response_id"] == "late" and cancel["event_id"] not in p.session._commands
    _, down = p.response_done("late", "cancelled")
    assert types(down) == ["response.done", "session.reset.completed"]
    _, down = p.error("response_cancel_not_active", None, "no active response")
    assert down == []


def test_a_clients_stale_delete_answered_first_takes_the_ack_and_ours_waits_for_its_own() -> None:
    """A client delete older than the timeout is not waited for: the reset deletes too. The first answer is the
    client's (sent first); ours is then settled, and its own answer (does not exist) stays hidden."""
    p = Play(reset_timeout=5.0)
    p.items("x")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "x"})
    p.clock.now += 6.0
    (ours,), _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert ours["item_id"] == "x"
    _, down = p.deleted("x")
    assert types(down) == ["conversation.item.deleted", "session.reset.completed"]
    assert down[1]["deleted_item_ids"] == []  # the client's delete removed it, not the reset's
    _, down = p.error("item_delete_invalid_item_id", ours["event_id"], "Error deleting item: the item with id 'x'")
    assert down == []


def test_a_late_responses_item_during_a_new_reset_is_left_to_that_reset() -> None:
    """A clean-up never races a running reset: the reset deletes the late response's item itself."""
    p = Play()
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    p.ack_all(up)
    p.response_created("late")
    p.output_item("late", "o1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["type"] for e in up] == ["response.cancel"]  # the reset cancels it too, and waits
    up, _ = p.item("o1")
    assert up == []
    up, _ = p.response_done("late", "cancelled")
    assert [e["item_id"] for e in up] == ["o1"]
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["o1"]


def test_an_error_naming_one_of_several_client_clears_answers_that_one() -> None:
    """The client's clears in flight are told apart by event id; the others still take the next acks."""
    p = Play()
    p.client({"type": "input_audio_buffer.clear", "event_id": "k1"})
    p.client({"type": "input_audio_buffer.clear", "event_id": "k2"})
    _, down = p.error("server_error", "k2", "boom", error_type="server_error")
    assert types(down) == ["error"]
    assert [c for c, _, _ in p.session._client_clears] == ["k1"]


def test_two_timed_out_deletes_of_one_item_have_both_late_answers_hidden() -> None:
    """Two resets time out on the same item; the ack and the does-not-exist error that finally come are ours."""
    p = Play(reset_timeout=5.0)
    p.items("a")
    for _ in range(2):
        p.client({"type": "session.reset", "clear_input_audio": False})
        p.clock.now += 5.0
        p.session.handle_timeout()
        p.take()
    assert len(p.session._late_deletes["a"]) == 2
    _, down = p.deleted("a")
    assert down == []
    _, down = p.error("item_delete_invalid_item_id", None, "Error deleting item: the item with id 'a' does not exist.")
    assert down == [] and p.session._late_deletes == {}


def test_an_error_naming_our_cancel_behind_a_clients_finds_ours() -> None:
    """Cancels in flight are told apart by event id, whatever their place in the queue."""
    p = Play()
    p.response_created("r1")
    p.client({"type": "response.cancel", "event_id": "c1", "response_id": "other"})
    (ours,), _ = p.client({"type": "session.reset", "clear_input_audio": False})
    _, down = p.error("response_cancel_not_active", ours["event_id"], "no active response")
    assert types(down) == ["session.reset.completed"]
    _, down = p.error("response_cancel_not_active", "c1", "no active response")
    assert types(down) == ["error"]


def test_a_null_error_with_nothing_of_the_clients_in_flight_answers_our_oldest_command() -> None:
    """With no client command it could answer, an error no code explains is our oldest command's: the delete
    failed, and the reset ends reporting it instead of waiting."""
    p = Play()
    p.items("a", "b")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["a", "b"]
    _, down = p.error(NULL, NULL, "internal error", error_type="server_error")
    assert down == []
    _, down = p.deleted("b")
    completed = reset_completed(down)
    assert completed["failed_item_ids"] == ["a"] and completed["deleted_item_ids"] == ["b"]


def test_a_reset_waiting_for_an_announced_item_wakes_when_the_announcement_ages_out() -> None:
    """A committed item whose item event never comes holds a reset only until the announcement is old."""
    p = Play(reset_timeout=10.0)
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None})
    p.clock.now += 4.0
    p.client({"type": "session.reset", "clear_input_audio": False})
    assert p.session.deadline == 1010.0
    p.clock.now = 1010.0
    p.session.handle_timeout()
    _, down = p.take()
    assert types(down) == ["session.reset.completed"]


def test_a_timeout_settles_our_cancel_and_a_client_cancel_before_it_keeps_its_place() -> None:
    """At a timeout our cancel stops being awaited but stays ours; a client cancel sent before it is awaited by
    nothing, yet keeps its place: the first not-active error that finally comes is the client's, the next ours."""
    p = Play(reset_timeout=5.0)
    p.response_created("r1")
    p.client({"type": "response.cancel", "event_id": "c1"})
    p.client({"type": "session.reset", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    p.take()
    assert [(e.ours, e.settled) for e in p.session._cancel_fifo] == [(False, False), (True, True)]
    _, down = p.error("response_cancel_not_active", None, "no active response")
    assert types(down) == ["error"]
    _, down = p.error("response_cancel_not_active", None, "no active response")
    assert down == []


def test_a_not_active_error_that_quotes_a_response_answers_the_cancel_naming_it() -> None:
    """The client cancelled a response long gone, then a reset cancels the running one: the error quoting the
    client's id is the client's, even with our cancel first in line; one quoting an id no cancel names is
    nobody's we know of."""
    p = Play()
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "event_id": "x", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    p.client({"type": "response.cancel", "event_id": "c1", "response_id": "gone"})
    _, down = p.error(NULL, NULL, "Cancellation failed: no active response found with id 'gone'.")
    assert types(down) == ["error"]
    _, down = p.error(NULL, NULL, "Cancellation failed: no active response found with id 'other'.")
    assert types(down) == ["error"]
    _, down = p.response_done("r1", "cancelled")
    assert reset_completed(down)["response_cancelled"] is True


def test_a_clients_id_less_cancel_ends_a_response_of_unknown_kind() -> None:
    """A server that reports no conversation_id: the client's id-less cancel, sent first, ended the response;
    the not-active error that follows answers the reset's cancel (hidden), not the client's."""
    p = Play()
    p.client({"type": "response.cancel", "event_id": "c1"})
    p.upstream({"type": "response.created", "response": {"id": "r1", "status": "in_progress"}})  # no conversation_id
    up, _ = p.client({"type": "session.reset", "event_id": "x", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    _, down = p.upstream(
        {
            "type": "response.done",
            "response": {"id": "r1", "status": "cancelled", "status_details": {"reason": "client_cancelled"}},
        }
    )
    assert types(down) == ["response.done", "session.reset.completed"]
    assert reset_completed(down)["response_cancelled"] is False  # the client's cancel did it
    _, down = p.error(NULL, NULL, "Cancellation failed: no active response found with id 'r1'.")
    assert down == []


def test_a_null_error_no_wording_explains_may_answer_a_clients_delete_or_a_late_clear() -> None:
    p = Play(reset_timeout=10.0)
    p.client({"type": "session.reset", "event_id": "r1", "cancel_response": False})
    p.clock.now += 11.0
    p.session.handle_timeout()
    p.take()
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "x"})
    _, down = p.error(NULL, NULL, "internal error")  # r1's clear, at last
    assert down == []
    _, down = p.error(NULL, NULL, "internal error")  # d1's
    assert types(down) == ["error"] and p.session._client_delete_ids == {}


@pytest.mark.parametrize(
    "error",
    [None, "boom", {"event_id": ["x"], "code": None}, {"event_id": None, "code": {}}],
    ids=["missing", "string", "id-not-str", "code-not-str"],
)
def test_an_error_not_in_the_apis_shape_answers_nothing(error: object) -> None:
    """Garbage that calls itself an error is forwarded and settles no command, ours or the client's."""
    p = Play()
    p.items("a")
    p.client({"type": "conversation.item.create", "event_id": "i1", "item": {"type": "message"}})
    up, _ = p.client({"type": "session.reset"})
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete"]
    event = {"type": "error"} if error is None else {"type": "error", "error": error}
    _, down = p.upstream(event)
    assert types(down) == ["error"]
    assert len(p.session.conversation.item_creates) == 1 and len(p.session.reset.outstanding) == 2  # type: ignore[union-attr]


def test_a_cancel_failure_with_a_null_code_is_known_by_its_wording() -> None:
    """`Cancellation failed: ...` with code and event_id null is a not-active answer: ours stays hidden."""
    p = Play()
    p.items("a")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "clear_input_audio": False})
    done = {"id": "r1", "status": "cancelled", "status_details": {"type": "cancelled", "reason": "turn_detected"}}
    up, _ = p.upstream({"type": "response.done", "response": {**done, "output": []}})
    _, down = p.error(NULL, NULL, "Cancellation failed: no active response found.")
    assert down == []
    _, down = p.ack_all(up)
    assert reset_completed(down)["deleted_item_ids"] == ["a"]


def test_the_client_clears_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client clears keep their place in the order until answered, up to a bound."""
    monkeypatch.setattr(session_module, "_MAX_LATE", 2)
    p = Play()
    for n in range(3):
        p.client({"type": "input_audio_buffer.clear", "event_id": f"k{n}"})
    assert [c for c, _, _ in p.session._client_clears] == ["k1", "k2"]


def test_a_no_such_item_error_quoting_nothing_answers_the_clients_older_delete_or_nobody() -> None:
    """The oldest delete in flight is the client's: its error, shown. With no delete in flight, it answers none."""
    p = Play()
    p.items("a", "b")
    p.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": "a"})
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["b"]
    _, down = p.error("item_delete_invalid_item_id", NULL, "Item not found")
    assert types(down) == ["error"] and "a" not in p.session.conversation
    _, down = p.deleted("b")
    assert reset_completed(down)["deleted_item_ids"] == ["b"]
    _, down = p.error("item_delete_invalid_item_id", NULL, "Item not found")
    assert types(down) == ["error"]


def test_a_null_error_no_wording_explains_may_answer_the_resets_clear() -> None:
    """The reset's clear is the oldest command unanswered: the error is ours (hidden), and the reset completes."""
    p = Play()
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "cancel_response": False})
    assert types(up) == ["input_audio_buffer.clear"]
    _, down = p.error(NULL, NULL, "internal error")
    assert types(down) == ["session.reset.completed"] and p.session._late_deletes == {}
