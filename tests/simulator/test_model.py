"""The server model without sockets or a clock: client frames in, server events out, time as an argument.

One test (at least) per quirk shows that the quirk does what it says, beside the documented behaviour it changes.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from proxy.simulator.model import Model, ModelConfig
from proxy.simulator.shapes import Event

AUDIO = base64.b64encode(b"\x00" * 960).decode()  # 20 ms


def make(*quirks: str, generation: Any = "ga", **config: Any) -> Model:
    """A model driven by hand: responses move only when told (unless the test streams them with time)."""
    config.setdefault("stream_responses", False)
    config.setdefault("vad_commit_bytes", None)
    model = Model(ModelConfig(quirks=frozenset(quirks), **config), generation)
    model.session_created()
    take(model)
    return model


def take(model: Model) -> list[Event]:
    """Every server event queued since the last call, in order."""
    events = [out.event for out in model.outbox]
    model.outbox.clear()
    return events


def send(model: Model, event: Event, now: float | None = None) -> list[Event]:
    model.receive(orjson.dumps(event), now=now)
    return take(model)


def types(events: list[Event]) -> list[str]:
    return [e["type"] for e in events]


def speak(model: Model) -> None:
    send(model, {"type": "input_audio_buffer.append", "audio": AUDIO})


def start_response(model: Model, **params: Any) -> str:
    events = send(model, {"type": "response.create", **({"response": params} if params else {})})
    assert types(events) == ["response.created"], events
    return str(events[0]["response"]["id"])


# --- the documented behaviour -------------------------------------------------------------------------


def test_unknown_quirk_is_refused_naming_the_known_ones() -> None:
    """A misspelt quirk fails at configuration, with the list of known ones."""
    with pytest.raises(ValueError, match=r"unknown quirk.*'nul_errors'.*null_errors"):
        ModelConfig(quirks=frozenset({"nul_errors"}))


def test_cause_tags_every_event_and_item() -> None:
    """Each event and item remembers the cause the caller gave, so a test can tell whose command an ack answers."""
    model = make()
    model.receive(orjson.dumps({"type": "conversation.item.create", "item": {"id": "a", "type": "message"}}), "mine")
    model.receive(orjson.dumps({"type": "conversation.item.delete", "item_id": "a"}), "proxy")
    assert [(out.type, out.cause) for out in model.outbox] == [
        ("conversation.item.added", "mine"),
        ("conversation.item.done", "mine"),
        ("conversation.item.deleted", "proxy"),
    ]
    assert model.items["a"].origin == "mine" and model.items["a"].deleted_by == "proxy"


def test_streamed_response_runs_on_the_callers_clock() -> None:
    """With streaming on, deltas fall due one interval apart; advance(now) emits what is due, in order."""
    model = make(stream_responses=True, delta_count=3, delta_interval_s=0.5)
    assert model.next_deadline is None
    events = send(model, {"type": "response.create"}, now=10.0)
    assert types(events) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert model.next_deadline == 10.5
    model.advance(10.4)
    assert take(model) == []
    model.advance(11.0)
    assert types(take(model)) == ["response.output_text.delta", "response.output_text.delta"]
    model.advance(20.0)
    assert types(take(model)) == [
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert model.next_deadline is None and model.responses == {}


def test_stepped_response_adds_items_after_others_were_deleted() -> None:
    """By hand, a response adds output items one at a time; one deleted meanwhile does not stop the next."""
    model = make()
    rid = start_response(model)
    model.server_response_step(rid, add_item=True)
    first = take(model)[1]["item"]["id"]
    send(model, {"type": "conversation.item.delete", "item_id": first})
    model.server_response_step(rid, add_item=True)
    events = take(model)
    # The first item is finished (GA: its conversation.item.done names its old predecessor), the second starts.
    assert types(events)[:4] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
    ]
    second = next(e for e in events if e["type"] == "conversation.item.added")["item"]["id"]
    assert model.item_ids == [second]


def test_session_cap_sends_session_expired_then_asks_for_a_close() -> None:
    """At the cap the model sends error session_expired (null event id) and asks the wire to close with 1001."""
    model = make(session_max_s=60.0)
    assert model.next_deadline == 60.0
    model.advance(59.0)
    assert model.close_request is None
    model.advance(61.0)
    (error,) = take(model)
    assert error["error"]["code"] == "session_expired" and error["error"]["event_id"] is None
    assert error["error"]["message"] == "Your session hit the maximum duration of 60 minutes."
    assert model.close_request == (1001, "Your session hit the maximum duration of 60 minutes.")
    assert model.next_deadline is None


def test_session_cap_without_the_error_only_closes() -> None:
    """With session_expired_error off the cap sends nothing and asks for the close with OpenAI's reason alone."""
    model = make(session_max_s=60.0, session_expired_error=False)
    model.advance(61.0)
    assert take(model) == []
    assert model.close_request == (1001, "Your session hit the maximum duration of 60 minutes.")


# --- quirks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {"type": "input_audio_buffer.commit", "event_id": "c1"},
        {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}, "previous_item_id": "x"},
        {"type": "response.create", "event_id": "c1", "response": {"conversation": "sideways"}},
        {"type": "conversation.item.delete", "event_id": "c1", "item_id": "ghost"},
        {"type": "response.cancel", "event_id": "c1"},
    ],
    ids=["commit", "create", "response.create", "delete", "cancel"],
)
def test_null_errors_leave_code_and_event_id_null(event: Event) -> None:
    """null_errors: any refused client event draws an error whose code and event_id are both null."""
    assert send(make(), event)[0]["error"]["event_id"] == "c1"
    (error,) = send(make("null_errors"), event)
    assert error["type"] == "error"
    assert error["error"]["code"] is None and error["error"]["event_id"] is None
    assert error["error"]["message"]


def test_no_cancel_refuses_and_the_response_runs_to_the_end() -> None:
    """no_cancel: response.cancel draws an error (not_implemented) and the response keeps running."""
    model = make("no_cancel")
    rid = start_response(model)
    (error,) = send(model, {"type": "response.cancel", "event_id": "c2", "response_id": rid})
    assert error["error"]["code"] == "not_implemented" and error["error"]["event_id"] == "c2"
    assert list(model.responses) == [rid]
    model.server_response_step(rid, add_item=False)
    assert take(model)[-1]["response"]["status"] == "completed"


def test_replace_response_drops_the_running_one_without_a_done() -> None:
    """replace_response: a second response.create starts a new response; the old one never gets response.done."""
    model = make("replace_response")
    old = start_response(model)
    model.server_response_step(old, add_item=True)
    take(model)
    new = start_response(model)
    assert list(model.responses) == [new]
    model.server_response_step(new, add_item=False)
    done = [e["response"]["id"] for e in take(model) if e["type"] == "response.done"]
    assert done == [new]
    assert [r.id for r in model.abandoned] == [old]
    # Without the quirk the second one is refused.
    plain = make()
    start_response(plain)
    assert send(plain, {"type": "response.create"})[0]["error"]["code"] == "conversation_already_has_active_response"


def test_ignore_out_of_band_puts_the_item_in_the_conversation() -> None:
    """ignore_out_of_band: conversation "none" is ignored: conversation_id set, the item announced and kept."""
    plain = make()
    rid = start_response(plain, conversation="none")
    plain.server_response_step(rid, add_item=True)
    assert "conversation.item.added" not in types(take(plain)) and plain.item_ids == []

    model = make("ignore_out_of_band")
    events = send(model, {"type": "response.create", "response": {"conversation": "none"}})
    assert events[0]["response"]["conversation_id"] == model.conversation_id
    model.server_response_step(events[0]["response"]["id"], add_item=True)
    added = next(e for e in take(model) if e["type"] == "conversation.item.added")
    assert model.item_ids == [added["item"]["id"]]


def test_late_auto_response_starts_after_the_transcription_delay() -> None:
    """late_auto_response: a VAD turn's response.created comes transcription_delay_s after the commit."""
    model = make("late_auto_response", server_vad=True, transcription_delay_s=2.0)
    speak(model)
    model.now = 5.0
    model.server_vad_turn()
    assert "response.created" not in types(take(model))
    assert model.next_deadline == 7.0
    model.advance(6.9)
    assert take(model) == []
    model.advance(7.0)
    (created,) = take(model)
    assert created["type"] == "response.created"
    assert model.conversation_response is not None and model.conversation_response.late
    # By hand (the property tests): the next pending one starts when the caller says.
    speak(model)
    model.server_response_step(created["response"]["id"], add_item=False)
    model.server_vad_turn()
    take(model)
    started = model.server_start_late_response("cause")
    assert started is not None and model.outbox[-1].cause == "cause"


def test_vad_interrupt_cancels_the_running_response_with_turn_detected() -> None:
    """vad_interrupt: speech during a response ends it (cancelled, turn_detected); a later cancel is not active."""
    model = make("vad_interrupt", server_vad=True)
    rid = start_response(model)
    speak(model)
    model.server_vad_turn(create_response=False)
    events = take(model)
    assert types(events) == [
        "input_audio_buffer.speech_started",
        "response.done",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    done = events[1]["response"]
    assert done["id"] == rid and done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    error = send(model, {"type": "response.cancel", "event_id": "late"})[0]["error"]
    assert error["code"] == "response_cancel_not_active"
    # Without the quirk the response keeps running through the turn.
    plain = make(server_vad=True)
    start_response(plain)
    speak(plain)
    plain.server_vad_turn(create_response=False)
    assert plain.conversation_response is not None


def test_idle_timeout_commits_an_empty_item_with_its_own_id() -> None:
    """idle_timeout: after the idle time, timeout_triggered names an item, committed like any, then a response."""
    model = make("idle_timeout", server_vad=True, idle_timeout_s=3.0)
    assert model.next_deadline == 3.0
    model.advance(3.5)
    events = take(model)
    assert types(events) == [
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    item_id = events[0]["item_id"]
    assert events[1]["item_id"] == item_id == events[2]["item"]["id"]
    assert model.item_ids == [item_id]
    # The session's turn_detection.idle_timeout_ms wins over the default; no quirk, no timer.
    model = make("idle_timeout", server_vad=True)
    send(
        model, {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"idle_timeout_ms": 500}}}}}
    )
    assert model.next_deadline == 0.5
    assert make(server_vad=True).next_deadline is None


def test_response_without_conversation_id_omits_the_key() -> None:
    """response_without_conversation_id: response.created and response.done carry no conversation_id key."""
    model = make("response_without_conversation_id")
    events = send(model, {"type": "response.create"})
    assert "conversation_id" not in events[0]["response"]
    model.server_response_step(events[0]["response"]["id"], add_item=False)
    assert "conversation_id" not in take(model)[-1]["response"]


def test_no_item_done_after_delete_skips_the_done_of_a_deleted_output_item() -> None:
    """no_item_done_after_delete: an output item deleted mid-stream gets no GA conversation.item.done."""
    for quirks, expected in (((), 1), (("no_item_done_after_delete",), 0)):
        model = make(*quirks)
        rid = start_response(model)
        model.server_response_step(rid, add_item=True)
        item_id = next(e for e in take(model) if e["type"] == "conversation.item.added")["item"]["id"]
        send(model, {"type": "conversation.item.delete", "item_id": item_id})
        model.server_response_step(rid, add_item=False)
        assert types(take(model)).count("conversation.item.done") == expected
