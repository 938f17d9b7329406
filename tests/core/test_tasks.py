"""Tasks: usage summed per task (session.reset.completed, session.usage) and the auto-reset policies."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core.policy import AllBut, Policy
from proxy.core.session import Session, SessionConfig, TaskEnded, Usage
from proxy.core.usage import ResponseUsage, UsageSum, read_usage
from tests.core.playbook import Event, Play, types


def ga_usage(input_tokens: int, output_tokens: int, *, cached: int = 0, audio_in: int = 0) -> Event:
    """A GA `response.usage`, details and all (beta's lacks image_tokens and cached_tokens_details)."""
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {
            "cached_tokens": cached,
            "text_tokens": input_tokens - audio_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0},
    }


def done(p: Play, rid: str, usage: Any, status: str = "completed", **extra: Any) -> tuple[list[Event], list[Event]]:
    response = {"id": rid, "status": status, "output": [], "usage": usage, **extra}
    return p.upstream({"type": "response.done", "response": response})


def turn(p: Play, rid: str, out_item: str, usage: Any) -> tuple[list[Event], list[Event]]:
    """A client response.create, the response, its output item and its done; returns what the done produced."""
    p.client({"type": "response.create", "event_id": f"c_{rid}"})
    p.response_created(rid)
    p.item(out_item)
    return done(p, rid, usage)


def policy(p: Play, **fields: Any) -> Event:
    _, down = p.client({"type": "session.reset.policy", "event_id": "pol", **fields})
    (reply,) = down
    return reply


# --- usage per task --------------------------------------------------------------------------------------------


def test_completed_carries_the_tasks_usage_cancelled_response_included() -> None:
    """The sum of every response.done since the last reset, the one the reset cancelled too; then afresh."""
    p = Play()
    p.items("u1")
    turn(p, "r1", "o1", ga_usage(10, 5, cached=4, audio_in=3))
    p.client({"type": "response.create"})
    p.response_created("r2")
    up, _ = p.client({"type": "session.reset", "event_id": "reset-1"})
    assert types(up) == ["response.cancel"]
    up, down = done(p, "r2", ga_usage(20, 1), status="cancelled", status_details={"reason": "client_cancelled"})
    assert types(down) == ["response.done"]
    _, down = p.ack_all(up)
    (completed,) = down
    assert completed["usage"] == {
        "responses": 2,
        "input_tokens": 30,
        "output_tokens": 6,
        "cached_tokens": 4,
        "input_token_details": {"text_tokens": 27, "audio_tokens": 3, "image_tokens": 0},
        "output_token_details": {"text_tokens": 6, "audio_tokens": 0},
    }
    assert completed["auto"] is False and "auto_reason" not in completed
    up, _ = p.client({"type": "session.reset", "event_id": "reset-2"})
    _, down = p.ack_all(up)
    assert down[0]["usage"] == {"responses": 0, "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}


def test_usage_reads_both_generations_and_counts_what_is_not_reported_as_zero() -> None:
    """Beta's shape (no image tokens), a done without usage, and values that are not counts."""
    assert read_usage(None) is None
    beta = {"input_tokens": 7, "output_tokens": 2, "input_token_details": {"cached_tokens": 1, "text_tokens": 7}}
    assert read_usage(beta) == ResponseUsage(7, 2, 1, (("text_tokens", 7),), ())
    odd = {"input_tokens": True, "output_tokens": -1, "input_token_details": "x", "output_token_details": None}
    assert read_usage(odd) == ResponseUsage()
    total = UsageSum()
    for used in (read_usage(beta), None, read_usage(odd)):
        total.add(used)
    assert total.as_event() == {
        "responses": 3,
        "input_tokens": 7,
        "output_tokens": 2,
        "cached_tokens": 1,
        "input_token_details": {"text_tokens": 7},
    }


def test_session_usage_answers_the_running_sums_without_resetting() -> None:
    """session.usage is answered at once with the task's and the connection's sums; nothing goes upstream."""
    p = Play()
    done(p, "r1", ga_usage(10, 2))
    up, _ = p.client({"type": "session.reset"})
    p.ack_all(up)
    done(p, "r2", {"input_tokens": 3, "output_tokens": 1})
    up, down = p.client({"type": "session.usage", "event_id": "u1"})
    assert up == []
    (result,) = down
    assert result["type"] == "session.usage.result" and result["usage_event_id"] == "u1"
    assert result["usage"] == {"responses": 1, "input_tokens": 3, "output_tokens": 1, "cached_tokens": 0}
    assert result["connection_usage"]["responses"] == 2 and result["connection_usage"]["input_tokens"] == 13
    assert p.session.reset is None


def test_usage_notices_per_response_and_per_task() -> None:
    """The relay gets each response's tokens (Usage) and each task's sum (TaskEnded) for its metrics."""
    p = Play()
    done(p, "r1", ga_usage(10, 2, cached=3))
    up, _ = p.client({"type": "session.reset"})
    p.ack_all(up)
    notices = p.session.take_notices()
    assert notices[0] == Usage(input_tokens=10, cached_tokens=3, output_tokens=2)
    assert notices[-1] == TaskEnded(responses=1, input_tokens=10, output_tokens=2, auto=False)


# --- the policy event ----------------------------------------------------------------------------------------


def test_policy_event_sets_the_fields_it_names_and_confirms_the_policy_in_force() -> None:
    """Absent fields keep their value; the reply shows the whole policy; nothing goes upstream."""
    p = Play(policy=Policy(max_items=8))
    up, down = p.client({"type": "session.reset.policy", "event_id": "pol", "after": "response", "to": "checkpoint"})
    assert up == []
    assert down == [
        {
            "type": "session.reset.policy.updated",
            "event_id": down[0]["event_id"],
            "policy_event_id": "pol",
            "policy": {"after": "response", "to": "checkpoint", "max_input_tokens": 0, "max_items": 8},
        }
    ]
    reply = policy(p, after="never", max_items=0, max_input_tokens=None)
    assert reply["policy"] == {"after": "never", "to": "checkpoint", "max_input_tokens": 0, "max_items": 0}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"after": "always"}, "after"),
        ({"after": True}, "after"),
        ({"to": "start"}, "to"),
        ({"max_input_tokens": -1}, "max_input_tokens"),
        ({"max_input_tokens": 1.5}, "max_input_tokens"),
        ({"max_items": True}, "max_items"),
        ({"max_item": 3}, "max_item"),
        ({"event_id": 3}, "event_id"),
    ],
)
def test_bad_policy_values_are_refused_naming_the_param(fields: dict[str, Any], param: str) -> None:
    """Like a malformed reset: invalid_session_reset naming the param, and the policy stays as it was."""
    p = Play()
    up, down = p.client({"type": "session.reset.policy", "event_id": "pol", **fields})
    assert up == [] and types(down) == ["error"]
    err = down[0]["error"]
    assert (err["code"], err["type"], err["param"]) == ("invalid_session_reset", "invalid_request_error", param)
    assert param in err["message"]
    assert p.session.policy == Policy()


def test_a_malformed_usage_request_is_refused_naming_the_param() -> None:
    p = Play()
    _, down = p.client({"type": "session.usage", "event_id": "u", "reset": True})
    assert down[0]["error"]["param"] == "reset" and down[0]["error"]["event_id"] == "u"


# --- after = "response" --------------------------------------------------------------------------------------


def test_after_response_resets_once_the_done_is_forwarded_and_before_later_client_events() -> None:
    """The done reaches the client first; the reset's deletes go next; a client event sent meanwhile waits."""
    p = Play()
    policy(p, after="response")
    p.items("u1")
    up, down = turn(p, "r1", "o1", ga_usage(20, 4))
    assert types(down) == ["response.done"]
    # No cancel (nothing runs) and no clear: an auto-reset leaves the input audio buffer alone.
    assert types(up) == ["conversation.item.delete"] * 2 and [e["item_id"] for e in up] == ["u1", "o1"]
    append = {"type": "input_audio_buffer.append", "audio": "AAAA"}
    assert p.client(append) == ([], [])
    held_up, down = p.ack_all(up)
    (completed,) = down
    assert completed["auto"] is True and completed["auto_reason"] == "response"
    assert completed["reset_event_id"] is None and completed["deleted_item_ids"] == ["u1", "o1"]
    assert completed["usage"]["responses"] == 1 and completed["usage"]["input_tokens"] == 20
    assert held_up == [append]
    assert p.session.take_notices()[-1] == TaskEnded(1, 20, 4, auto=True)


def test_after_response_to_the_checkpoint_keeps_it_and_without_one_says_so() -> None:
    """`to: "checkpoint"` keeps the checkpoint; with none yet the reset is not run and the client is told why."""
    p = Play()
    policy(p, after="response", to="checkpoint")
    p.items("sys", "shot")
    up, down = turn(p, "r0", "o0", None)
    assert up == [] and types(down) == ["response.done", "error"]
    err = down[1]["error"]
    assert err["code"] == "invalid_session_reset" and err["param"] == "to" and err["event_id"] is None
    assert "session.checkpoint" in err["message"]
    p.deleted("o0")
    p.client({"type": "session.checkpoint"})
    p.items("turn1")
    up, _ = turn(p, "r1", "o1", ga_usage(40, 1))
    assert [e["item_id"] for e in up] == ["turn1", "o1"]
    _, down = p.ack_all(up)
    assert down[0]["kept_item_ids"] == ["sys", "shot"]
    assert p.session.conversation.item_ids == ["sys", "shot"]


def test_after_response_ignores_out_of_band_responses_and_those_it_cancelled_itself() -> None:
    """Only a response in the conversation ends a task; a late response the proxy cancelled is no task either."""
    p = Play(policy=Policy(after="response"))
    p.client({"type": "response.create", "response": {"conversation": "none"}})
    p.response_created("oob", conversation_id=None)
    up, _ = done(p, "oob", ga_usage(5, 1))
    assert up == [] and p.session.reset is None
    done(p, "no-such", ga_usage(5, 1))  # a done for a response never seen: not in the conversation either
    p.upstream({"type": "response.done", "response": {"status": "completed"}})  # no id: nothing to decide on
    assert p.session.reset is None
    # A late auto-response after a reset: cancelled by the proxy, its done starts no reset of its own.
    up, _ = p.client({"type": "session.reset"})
    p.ack_all(up)
    up, _ = p.response_created("late")
    assert types(up) == ["response.cancel"]
    up, _ = done(p, "late", None, status="cancelled")
    assert up == [] and p.session.reset is None


def test_a_configured_policy_applies_without_any_event() -> None:
    """`[reset]` sets every connection's policy: the first response ends its task."""
    p = Play(policy=Policy(after="response"))
    p.items("u1")
    up, _ = turn(p, "r1", "o1", None)
    assert types(up) == ["conversation.item.delete"] * 2


# --- max_input_tokens ----------------------------------------------------------------------------------------


def test_max_input_tokens_resets_when_a_response_reads_more_than_the_cap() -> None:
    """At the cap nothing happens; above it (an out-of-band response counts too: it paid for the context) a reset."""
    p = Play()
    policy(p, max_input_tokens=30)
    p.items("u1")
    up, _ = turn(p, "r1", "o1", ga_usage(30, 1))
    assert up == []
    p.client({"type": "response.create", "response": {"conversation": "none"}})
    p.response_created("oob", conversation_id=None)
    up, _ = done(p, "oob", ga_usage(31, 1))
    assert [e["item_id"] for e in up] == ["u1", "o1"]
    _, down = p.ack_all(up)
    assert down[0]["auto_reason"] == "max_input_tokens" and down[0]["usage"]["input_tokens"] == 61


# --- max_items -----------------------------------------------------------------------------------------------


def test_max_items_trims_the_oldest_items_beyond_the_window_but_not_the_checkpoint() -> None:
    """A sliding window: the oldest non-checkpoint items go, one completed per trim; newer arrivals stay."""
    p = Play()
    p.items("sys")
    p.client({"type": "session.checkpoint"})
    policy(p, max_items=3)
    p.items("u1")
    up, _ = turn(p, "r1", "o1", ga_usage(30, 1))
    assert up == []  # 3 items: within the window
    p.items("u2")
    up, _ = turn(p, "r2", "o2", ga_usage(50, 1))
    assert [e["item_id"] for e in up] == ["u1", "o1"]  # 5 items: the two oldest after the checkpoint
    p.item("u3")  # arrives while the trim runs: not chosen, so it stays
    _, down = p.ack_all(up)
    (completed,) = down
    assert completed["auto_reason"] == "max_items" and completed["deleted_item_ids"] == ["u1", "o1"]
    assert completed["kept_item_ids"] == ["sys", "u2", "o2", "u3"]
    assert completed["usage"]["responses"] == 2
    # After a trim a response the server starts (say, for audio committed meanwhile) is no late one.
    up, _ = p.response_created("r3")
    assert up == []


def test_max_items_never_trims_the_checkpoint_itself() -> None:
    """When the checkpoint alone passes the window only the newer items go; with no newer ones, no reset."""
    p = Play(policy=Policy(max_items=1))
    p.items("a", "b")
    p.client({"type": "session.checkpoint"})
    up, _ = turn(p, "r1", "o1", None)
    assert [e["item_id"] for e in up] == ["o1"]
    p.ack_all(up)
    p.client({"type": "response.create"})
    p.response_created("r2")
    up, _ = done(p, "r2", None)  # it added nothing: a and b, both in the checkpoint, are all there is
    assert up == [] and p.session.reset is None


def test_all_but_keeps_everything_it_was_not_told_to_delete() -> None:
    keep = AllBut(["x"])
    assert "y" in keep and "x" not in keep and 3 in keep


# --- races ---------------------------------------------------------------------------------------------------


def test_a_client_reset_that_cancels_the_response_ends_the_task_and_no_auto_reset_follows() -> None:
    """Policy set, a response running, the client resets: its cancel ends the response; the done (during the
    reset) counts for this task and starts no second reset."""
    p = Play()
    policy(p, after="response")
    p.items("u1")
    p.client({"type": "response.create", "event_id": "c1"})
    p.response_created("r1")
    p.item("o1")
    up, _ = p.client({"type": "session.reset", "event_id": "mine"})
    assert types(up) == ["response.cancel"]
    cancelled = {"reason": "client_cancelled"}
    up, down = done(p, "r1", ga_usage(12, 3), status="cancelled", status_details=cancelled)
    assert types(down) == ["response.done"]
    assert types(up) == ["input_audio_buffer.clear", "conversation.item.delete", "conversation.item.delete"]
    _, down = p.ack_all(up)
    (completed,) = down
    assert completed["reset_event_id"] == "mine" and completed["auto"] is False
    assert completed["response_cancelled"] is True and completed["usage"]["input_tokens"] == 12
    assert p.session.reset is None and p.session.take_upstream() == []


def test_a_client_reset_right_behind_the_done_runs_after_the_auto_reset() -> None:
    """The done came first: the auto-reset starts; the client's own reset, sent before it saw the done, is held,
    then runs on what is left and reports an empty task."""
    p = Play()
    policy(p, after="response")
    p.items("u1")
    up, _ = turn(p, "r1", "o1", ga_usage(9, 2))
    assert p.client({"type": "session.reset", "event_id": "mine"}) == ([], [])  # held behind the auto-reset
    up2, down = p.ack_all(up)
    (auto,) = down
    assert auto["auto"] is True and auto["usage"]["responses"] == 1
    assert types(up2) == ["input_audio_buffer.clear"]  # the client's reset, on an empty conversation
    _, down = p.ack_all(up2)
    (mine,) = down
    assert mine["reset_event_id"] == "mine" and mine["auto"] is False
    assert mine["usage"] == {"responses": 0, "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}


def test_an_auto_reset_waits_for_a_response_the_client_already_asked_for() -> None:
    """It cancels nothing: a response.create the client sent before it saw the done runs to its end first."""
    p = Play(policy=Policy(after="response"))
    p.items("u1")
    p.client({"type": "response.create", "event_id": "c1"})
    p.response_created("r1")
    p.client({"type": "response.create", "event_id": "c2"})  # pipelined: already upstream
    up, _ = done(p, "r1", None)
    assert up == [] and p.session.reset is not None  # waits for c2's response
    p.response_created("r2")
    p.item("o2")
    up, down = done(p, "r2", None)  # during the auto-reset: ends it, starts no other
    assert types(down) == ["response.done"] and [e["item_id"] for e in up] == ["u1", "o2"]
    _, down = p.ack_all(up)
    assert down[0]["auto"] is True and down[0]["usage"]["responses"] == 2 and p.session.reset is None


def test_an_auto_reset_that_times_out_reports_the_task_in_its_error() -> None:
    """A timed-out auto-reset ends the task too: the error carries its usage and says it was automatic."""
    p = Play(policy=Policy(after="response"))
    p.items("u1")
    turn(p, "r1", "o1", ga_usage(8, 1))
    p.clock.now += 11
    p.session.handle_timeout()
    _, down = p.take()
    (err,) = down
    assert err["error"]["code"] == "session_reset_timeout"
    assert err["auto"] is True and err["auto_reason"] == "response" and err["usage"]["input_tokens"] == 8
    assert p.session.take_notices()[-1] == TaskEnded(1, 8, 1, auto=True)


def test_session_config_defaults_to_no_policy() -> None:
    assert Session().policy == Policy() == SessionConfig().policy
    assert Policy().as_event() == {"after": "never", "to": "empty", "max_input_tokens": 0, "max_items": 0}


def test_the_late_end_of_a_response_a_timed_out_reset_cancelled_starts_no_policy_reset() -> None:
    """Under `after = "response"`, a client reset times out waiting for its cancel; the response's late
    `response.done` belongs to the task that reset ended: it does not wipe the next task's input."""
    p = Play(reset_timeout=5.0)
    p.client({"type": "session.reset.policy", "event_id": "p1", "after": "response"})
    p.response_created("r1")
    p.client({"type": "session.reset", "event_id": "x1", "clear_input_audio": False})
    p.clock.now += 5.0
    p.session.handle_timeout()
    p.take()
    p.item("u2")  # the next task's input
    up, down = p.response_done("r1", "cancelled")
    assert up == [] and [e["type"] for e in down] == ["response.done"] and p.session.reset is None
