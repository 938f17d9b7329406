"""Impolite-server traces from a fresh-eyes review of issue 9: each failed on the core it reviewed and passes now.

Two remain strict xfails, limits of attributing errors that carry no code, no event id and a wording of the
server's own: they pin what should happen (and xpass once the core gets it right).
"""

from __future__ import annotations

import pytest

from tests.core.playbook import Play, types

NULL = None


def reset_completed(down: list[dict[str, object]]) -> dict[str, object]:
    (completed,) = [e for e in down if e["type"] == "session.reset.completed"]
    return completed


@pytest.mark.xfail(
    strict=True,
    reason="known limit: order matching counts only commands whose success is answered (creates, commits, "
    "response.create, deletes, clears, cancels); a null error for a session.update, append or truncate is taken "
    "for the reset's delete. An append is never acknowledged, so it cannot hold a place in the order.",
)
@pytest.mark.parametrize(
    "command",
    [
        {"type": "session.update", "event_id": "u1", "session": {"voice": "nope"}},
        {"type": "input_audio_buffer.append", "event_id": "u1", "audio": "not base64!"},
        {"type": "conversation.item.truncate", "event_id": "u1", "item_id": "a", "content_index": 9, "audio_end_ms": 1},
    ],
    ids=["session.update", "append", "truncate"],
)
def test_a_null_error_for_an_untracked_client_event_is_not_taken_for_the_resets_delete(
    command: dict[str, object],
) -> None:
    """A null_errors server refuses a client event the core does not track, sent before the reset: the error is
    the client's (shown), and the reset's delete is still awaited and reported deleted once acked."""
    p = Play()
    p.items("a")
    p.client(command)
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert types(up) == ["conversation.item.delete"]
    _, down = p.error(NULL, NULL, "Invalid value.")  # the answer to u1, sent first
    assert types(down) == ["error"]
    _, down = p.deleted("a")
    assert types(down) == ["session.reset.completed"]
    completed = reset_completed(down)
    assert completed["deleted_item_ids"] == ["a"] and completed["failed_item_ids"] == []


def test_a_delete_failed_by_a_guess_is_still_ours_when_its_ack_comes() -> None:
    """OpenAI sends `server_error` with code and event_id null on its own. Taken for our delete of `a` by order,
    the guess may be wrong: the ack for `a` that follows must stay hidden and count as deleted."""
    p = Play()
    p.items("a", "b")
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert [e["item_id"] for e in up] == ["a", "b"]
    p.error(NULL, NULL, "The server had an error while processing your request.", error_type="server_error")
    _, down_a = p.deleted("a")
    _, down_b = p.deleted("b")
    down = down_a + down_b
    assert "conversation.item.deleted" not in types(down)  # both acks answer the proxy's own deletes
    completed = reset_completed(down)
    assert completed["deleted_item_ids"] == ["a", "b"] and completed["failed_item_ids"] == []


def test_a_response_that_never_ends_does_not_time_out_every_later_reset() -> None:
    """The server drops our cancel and never sends `response.done` for r1. The first reset times out; the next
    one deletes the items and completes by its deadline at the latest instead of timing out again."""
    p = Play(reset_timeout=5.0)
    p.items("a")
    p.response_created("r1")
    up, _ = p.client({"type": "session.reset", "event_id": "r1x", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    p.clock.now += 5.0
    p.session.handle_timeout()
    _, down = p.take()
    assert [e["error"]["code"] for e in down] == ["session_reset_timeout"]
    p.clock.now += 60.0  # a minute later: r1 is long stale
    up, _ = p.client({"type": "session.reset", "event_id": "r2x", "clear_input_audio": False})
    _, down = p.ack_all(up)
    if not types(down):
        p.clock.now += 5.0
        p.session.handle_timeout()
        _, down = p.take()
    assert types(down) == ["session.reset.completed"]
    assert reset_completed(down)["deleted_item_ids"] == ["a"]


def test_a_clients_clear_answered_after_it_aged_out_is_not_taken_for_the_resets_clear() -> None:
    """A slow server answers the client's clear k1 after the reset timeout; the reset that started meanwhile sent
    its own clear. The first `cleared` is k1's (shown); the reset completes on the second (hidden)."""
    p = Play(reset_timeout=10.0)
    p.client({"type": "input_audio_buffer.clear", "event_id": "k1"})
    p.clock.now += 11.0
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "cancel_response": False})
    assert types(up) == ["input_audio_buffer.clear"]
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev1"})  # k1's
    assert types(down) == ["input_audio_buffer.cleared"] and p.session.paused
    _, down = p.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev2"})  # ours
    assert types(down) == ["session.reset.completed"]


def test_a_null_id_unknown_item_error_without_a_quoted_id_answers_our_delete_by_order() -> None:
    """A server that keeps OpenAI's codes but not its wording ("Item not found"): the error answers the oldest
    delete in flight, ours, so it is hidden and the reset completes."""
    p = Play()
    p.items("a")
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert types(up) == ["conversation.item.delete"]
    _, down = p.error("item_delete_invalid_item_id", NULL, "Item not found")
    assert types(down) == ["session.reset.completed"]
    assert reset_completed(down)["deleted_item_ids"] == []


@pytest.mark.xfail(
    strict=True,
    reason="known limit: after server VAD's response.created took the client's create's place (pairing a "
    "response with a request is a guess), a null error with a wording of the server's own for that create is taken "
    "for the reset's cancel: hidden from the client, and response_cancelled reported False",
)
def test_a_null_error_for_a_create_that_vad_answered_is_not_taken_for_the_resets_cancel() -> None:
    """Like test_impolite's already-active case, but from a server with its own wording ("busy"): the error is
    the client's, and our cancel is credited when the response ends cancelled."""
    p = Play()
    p.client({"type": "response.create", "event_id": "c1"})
    p.response_created("resp_vad")  # server VAD's, taken for c1's
    up, _ = p.client({"type": "session.reset", "event_id": "r1", "clear_input_audio": False})
    assert types(up) == ["response.cancel"]
    _, down = p.error(NULL, NULL, "busy: a response is already running")
    assert types(down) == ["error"]
    _, down = p.upstream({"type": "response.done", "response": {"id": "resp_vad", "status": "cancelled", "output": []}})
    assert reset_completed(down)["response_cancelled"] is True


def test_a_late_auto_response_for_input_the_reset_kept_is_left_alone() -> None:
    """Issue 9 item 3 cancels a late response only 'for input that the reset removed'. Here the reset kept the
    committed user turn u1 and the audio buffer, so the transcription-delayed auto-response for u1 is not late."""
    p = Play()
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None})
    p.item("u1", None)
    up, down = p.client({"type": "session.reset", "keep_item_ids": ["u1"], "clear_input_audio": False})
    assert up == [] and reset_completed(down)["kept_item_ids"] == ["u1"]
    up, _ = p.response_created("auto_for_u1")
    assert up == []


def test_an_out_of_band_responses_item_that_enters_the_conversation_after_a_reset_is_deleted() -> None:
    """A server that ignores `conversation: "none"` yet echoes a null conversation_id: the reset completes at once
    (nothing can add items, as far as the server said), then the response's item appears in the conversation.
    It was made by a response that ran through the reset, for nobody's request since: it should go, as a late
    response's items do."""
    p = Play()
    p.client({"type": "response.create", "event_id": "c1", "response": {"conversation": "none"}})
    p.response_created("r1", conversation_id=None)
    _, down = p.client({"type": "session.reset", "event_id": "r1x", "clear_input_audio": False})
    assert reset_completed(down)["deleted_item_ids"] == []
    p.output_item("r1", "o1")
    up, _ = p.item("o1")
    assert [(e["type"], e.get("item_id")) for e in up] == [("conversation.item.delete", "o1")]


def test_a_server_commit_of_new_audio_after_a_reset_makes_its_response_legitimate() -> None:
    """Issue 9 item 3: a response is late only with 'no new commit since' the reset. A server whose VAD sends no
    `speech_started` still commits the new turn (`committed` + its item) before answering it."""
    p = Play()
    p.items("old")
    up, _ = p.client({"type": "session.reset", "event_id": "r1"})
    p.ack_all(up)
    p.upstream({"type": "input_audio_buffer.committed", "item_id": "u2", "previous_item_id": None})
    p.item("u2", None)
    up, _ = p.response_created("answer_to_u2")
    assert up == []
