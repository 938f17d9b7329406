"""The conversation model on its own: which events add, place, remove and announce items, and which answer creates."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from proxy.core import conversation as conversation_module
from proxy.core.conversation import Conversation, Kind

Event = dict[str, Any]


def feed(conv: Conversation, event: Event) -> None:
    conv.on_server_event(event["type"], event)


def feed_ended(conv: Conversation, event: Event) -> list[str]:
    """Feed an event; the responses it showed to be over."""
    return conv.on_server_event(event["type"], event)


def created(item_id: str, previous: str | None = None) -> Event:
    return {"type": "conversation.item.created", "item": {"id": item_id}, "previous_item_id": previous}


def client(conv: Conversation, event: Event) -> None:
    conv.on_client_event(event["type"], event)


def creates(conv: Conversation) -> list[tuple[str | None, str | None]]:
    """(client event id, chosen item id) of the item creates in flight and still waited for."""
    return [(e.event_id, e.item_id) for e in conv.item_creates if not e.expired]


def ids(queue: deque[Any]) -> list[str | None]:
    return [e.event_id for e in queue]


# --- items ------------------------------------------------------------------------------------------


def test_membership_and_length_follow_the_items() -> None:
    """`in` and len() answer for the items present, not for pending or removed ones."""
    conv = Conversation()
    feed(conv, created("a"))
    feed(conv, created("b", "a"))
    feed(conv, {"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": "b"})
    assert "a" in conv and "b" in conv and "u1" not in conv and 7 not in conv
    assert len(conv) == 2
    feed(conv, {"type": "conversation.item.deleted", "item_id": "a"})
    assert "a" not in conv and len(conv) == 1


def test_add_and_remove_report_whether_anything_changed() -> None:
    """add() is False for a known item and remove() is False for an unknown one; neither changes the list then."""
    conv = Conversation()
    assert conv.add("a", None) is True
    assert conv.add("a", None) is False
    assert conv.remove("zz") is False
    assert conv.item_ids == ["a"]
    assert conv.remove("a") is True
    assert conv.item_ids == []


def test_removing_an_announced_item_drops_the_announcement() -> None:
    """A delete for an item that was committed but not yet added ends the wait for it."""
    conv = Conversation()
    feed(conv, {"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None})
    assert conv.items_on_their_way
    feed(conv, {"type": "conversation.item.deleted", "item_id": "u1"})
    assert not conv.pending_items and not conv.items_on_their_way and conv.item_ids == []


def test_previous_item_id_root_places_the_item_first() -> None:
    """`previous_item_id: "root"` (insert at the start) puts the item first, like null does."""
    conv = Conversation()
    feed(conv, created("a"))
    feed(conv, created("b", "a"))
    feed(conv, created("r", "root"))
    assert conv.item_ids == ["r", "a", "b"]


def test_a_trailing_ga_done_does_not_revive_a_deleted_item_but_a_new_added_does() -> None:
    """A GA `.done` after the item's delete is ignored; an `.added` for the same id is a new item and enters."""
    conv = Conversation()
    feed(conv, {"type": "conversation.item.added", "item": {"id": "a"}, "previous_item_id": None})
    feed(conv, {"type": "conversation.item.deleted", "item_id": "a"})
    feed(conv, {"type": "conversation.item.done", "item": {"id": "a"}, "previous_item_id": None})
    assert conv.item_ids == []
    feed(conv, {"type": "conversation.item.added", "item": {"id": "a"}, "previous_item_id": None})
    assert conv.item_ids == ["a"]


def test_the_memory_of_deleted_items_is_bounded() -> None:
    """Only the most recent deletes are remembered: past the bound, a trailing `.done` of the oldest adds it back."""
    bound = conversation_module._REMEMBER_REMOVED
    conv = Conversation()
    for i in range(bound + 1):
        conv.add(f"i{i}", None)
        conv.remove(f"i{i}")
    feed(conv, {"type": "conversation.item.done", "item": {"id": "i0"}, "previous_item_id": None})
    feed(conv, {"type": "conversation.item.done", "item": {"id": "i1"}, "previous_item_id": None})
    assert conv.item_ids == ["i0"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "conversation.item.created", "previous_item_id": None},
        {"type": "conversation.item.created", "item": "x", "previous_item_id": None},
        {"type": "conversation.item.added", "item": {"id": 5}, "previous_item_id": None},
        {"type": "conversation.item.deleted"},
        {"type": "conversation.item.deleted", "item_id": None},
        {"type": "input_audio_buffer.committed"},
        {"type": "response.created", "response": "x"},
        {"type": "response.done", "response": None},
        {"type": "response.done", "response": {"status": "completed"}},
        {"type": "response.output_item.added", "response_id": "r1"},
        {"type": "response.output_item.added", "response_id": "r1", "item": {"type": "message"}},
        {"type": "response.output_text.delta", "item_id": "a", "delta": "hi"},
    ],
    ids=[
        "item-missing",
        "item-not-object",
        "item-id-not-str",
        "deleted-no-id",
        "deleted-null-id",
        "committed-no-id",
        "created-not-object",
        "done-not-object",
        "done-no-id",
        "output-no-item",
        "output-no-id",
        "unrelated",
    ],
)
def test_events_without_usable_ids_change_nothing(event: Event) -> None:
    """Server events whose ids are missing or malformed (and unrelated events) leave the model as it was."""
    conv = Conversation()
    feed(conv, created("a"))
    client(conv, {"type": "response.create", "event_id": "c1"})
    conv.active_responses["r0"] = Kind.CONVERSATION
    feed(conv, event)
    assert conv.item_ids == ["a"]
    assert not conv.pending_items
    assert conv.active_responses == {"r0": Kind.CONVERSATION}
    assert ids(conv.pending_creates) == ["c1"]
    assert not conv.items_on_their_way


def test_committed_for_an_item_already_present_announces_nothing() -> None:
    """A `committed` naming an item that is already there answers a commit but announces no pending item."""
    conv = Conversation()
    client(conv, {"type": "input_audio_buffer.commit", "event_id": "k1"})
    feed(conv, created("u1"))
    feed(conv, {"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None})
    assert not conv.pending_items and not conv.commits
    assert conv.item_ids == ["u1"]


# --- responses ----------------------------------------------------------------------------------------


def test_response_created_without_an_id_consumes_the_request_but_tracks_nothing() -> None:
    """A `response.created` with no id still answers the oldest `response.create`, yet no response is tracked."""
    conv = Conversation()
    client(conv, {"type": "response.create", "event_id": "c1"})
    feed(conv, {"type": "response.created", "response": {"status": "in_progress"}})
    assert not conv.pending_creates and conv.active_responses == {}
    assert not conv.response_in_progress


def test_an_out_of_band_request_counts_as_a_response_in_progress_until_it_starts_out_of_band() -> None:
    """Evidence over intent: a `response.create` asking for `conversation: "none"` may still add items (servers
    that ignore the option), so it counts until its `response.created` says it runs out of band."""
    conv = Conversation()
    client(conv, {"type": "response.create", "response": {"conversation": "none"}})
    assert conv.response_in_progress
    feed(conv, {"type": "response.created", "response": {"id": "r1", "conversation_id": None}})
    assert not conv.response_in_progress and conv.active_responses == {"r1": Kind.OUT_OF_BAND}


def test_end_response_of_an_unknown_response_is_harmless() -> None:
    """Ending a response the model never saw changes nothing."""
    conv = Conversation()
    conv.active_responses["r1"] = Kind.CONVERSATION
    assert conv.end_response("r2") is False
    assert conv.active_responses == {"r1": Kind.CONVERSATION} and conv.conversation_responses() == ["r1"]


def test_output_items_of_a_conversation_response_answer_no_create() -> None:
    """An item announced by `response.output_item.added` enters the conversation but answers no client create."""
    conv = Conversation()
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}})
    feed(conv, {"type": "response.created", "response": {"id": "r1", "conversation_id": "conv_1"}})
    feed(conv, {"type": "response.output_item.added", "response_id": "r1", "item": {"id": "o1"}})
    feed(conv, created("o1"))
    assert conv.item_ids == ["o1"]
    assert creates(conv) == [("c1", None)]
    feed(conv, created("x1", "o1"))  # the client's item: answers the create
    assert not conv.item_creates and conv.item_ids == ["o1", "x1"]


def test_output_item_added_for_an_item_already_present_is_ignored() -> None:
    """An output item that is already in the conversation is not announced again, so its next event is a no-op."""
    conv = Conversation()
    feed(conv, created("o1"))
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}})
    feed(conv, {"type": "response.output_item.added", "response_id": "r1", "item": {"id": "o1"}})
    feed(conv, {"type": "conversation.item.done", "item": {"id": "o1"}, "previous_item_id": None})
    assert conv.item_ids == ["o1"] and creates(conv) == [("c1", None)]


def test_an_item_event_for_an_out_of_band_output_is_evidence_it_is_in_the_conversation() -> None:
    """A server that ignored `conversation: "none"` announces the item: it is tracked, and the response is a
    conversation response from then on (a reset waits for it)."""
    conv = Conversation()
    feed(conv, {"type": "response.created", "response": {"id": "r1", "conversation_id": None}})
    assert not conv.response_in_progress
    feed(conv, {"type": "response.output_item.added", "response_id": "r1", "item": {"id": "o1"}})
    feed(conv, created("o1"))
    assert conv.item_ids == ["o1"]
    assert conv.active_responses == {"r1": Kind.CONVERSATION} and conv.conversation_responses() == ["r1"]
    assert feed_ended(conv, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}) == ["r1"]
    assert conv.active_responses == {}


def test_an_output_item_of_an_ended_response_answers_no_create_and_changes_no_kind() -> None:
    """After its response ended, an output item's late item event is just an item."""
    conv = Conversation()
    feed(conv, {"type": "response.created", "response": {"id": "r1", "conversation_id": None}})
    feed(conv, {"type": "response.output_item.added", "response_id": "r1", "item": {"id": "o1"}})
    feed(conv, {"type": "response.done", "response": {"id": "r1", "status": "completed"}})
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}})
    feed(conv, created("o1"))
    assert conv.item_ids == ["o1"] and creates(conv) == []  # no longer announced: it answers the create


# --- client events and their answers -----------------------------------------------------------------


def test_only_creates_and_commits_are_tracked_from_the_client() -> None:
    """on_client_event records response.create, item.create and commit; any other type records nothing."""
    conv = Conversation()
    client(conv, {"type": "session.update", "event_id": "s1", "session": {}})
    client(conv, {"type": "input_audio_buffer.append", "event_id": "a1", "audio": ""})
    assert not conv.pending_creates and not conv.item_creates and not conv.commits
    client(conv, {"type": "conversation.item.create", "event_id": 9, "item": "not an object"})
    client(conv, {"type": "input_audio_buffer.commit"})
    assert creates(conv) == [(None, None)] and ids(conv.commits) == [None]


def test_item_events_answer_creates_by_id_first_then_the_oldest_without_id() -> None:
    """An item answers the create that chose its id; otherwise the oldest create that chose none, skipping others."""
    conv = Conversation()
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"id": "mine"}})
    client(conv, {"type": "conversation.item.create", "event_id": "c2", "item": {"type": "message"}})
    client(conv, {"type": "conversation.item.create", "event_id": "c3", "item": {"type": "message"}})
    feed(conv, created("srv1"))
    assert creates(conv) == [("c1", "mine"), ("c3", None)]
    feed(conv, created("mine", "srv1"))
    assert creates(conv) == [("c3", None)]
    feed(conv, created("srv2", "mine"))
    assert not conv.item_creates and conv.item_ids == ["srv1", "mine", "srv2"]


def test_an_item_answering_no_create_leaves_creates_with_other_ids_waiting() -> None:
    """An unannounced item whose id no create chose answers nothing when every create chose an id."""
    conv = Conversation()
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"id": "mine"}})
    feed(conv, created("other"))
    assert creates(conv) == [("c1", "mine")] and conv.items_on_their_way


def test_errors_by_event_id_answer_exactly_the_named_client_event() -> None:
    """An error naming a client event id removes that event (create, item create or commit) and no other."""
    conv = Conversation()
    for i in (1, 2):
        client(conv, {"type": "response.create", "event_id": f"r{i}"})
        client(conv, {"type": "conversation.item.create", "event_id": f"i{i}", "item": {"type": "message"}})
        client(conv, {"type": "input_audio_buffer.commit", "event_id": f"k{i}"})
    for ref in ("r2", "i2", "k2", "unknown"):
        conv.client_event_failed(ref, "anything")
    assert ids(conv.pending_creates) == ["r1"]
    assert creates(conv) == [("i1", None)]
    assert ids(conv.commits) == ["k1"]


def test_an_error_by_event_id_is_never_guessed_from_its_code() -> None:
    """An error naming an id no tracked event has changes nothing, even if its code would match by guess."""
    conv = Conversation()
    client(conv, {"type": "response.create", "event_id": "r1"})
    conv.client_event_failed("someone_else", "conversation_already_has_active_response")
    assert ids(conv.pending_creates) == ["r1"]


@pytest.mark.parametrize(
    "code",
    [
        None,
        "invalid_value",
        "conversation_already_has_active_response",
        "input_audio_buffer_commit_empty",
        "item_create_invalid_previous_item_id",
    ],
)
def test_null_id_errors_with_nothing_to_answer_change_nothing(code: str | None) -> None:
    """With the event id null, a code is guessed only against the kind it names; with none in flight, nothing moves."""
    conv = Conversation()
    conv.client_event_failed(None, code)
    assert not conv.pending_creates and not conv.item_creates and not conv.commits


@pytest.mark.parametrize(
    ("code", "left"),
    [
        ("conversation_already_has_active_response", ([], ["i1"], ["k1"])),
        ("input_audio_buffer_commit_empty", (["r1"], ["i1"], [])),
        ("item_create_duplicate_item_id", (["r1"], [], ["k1"])),
        # No code, or one we do not know: the session asks for the oldest command of any kind by order.
        ("invalid_value", ([], ["i1"], ["k1"])),
        (None, ([], ["i1"], ["k1"])),
    ],
)
def test_null_id_errors_answer_the_oldest_event_of_the_kind_their_code_names(
    code: str, left: tuple[list[str], list[str], list[str]]
) -> None:
    """With the event id null, the code picks the kind (response create, commit, item create) and its oldest goes;
    with no code or an unknown one, nothing here is settled, and `fail_oldest` takes the oldest of any kind."""
    conv = Conversation()
    for order, event in enumerate(
        [
            {"type": "response.create", "event_id": "r1"},
            {"type": "conversation.item.create", "event_id": "i1", "item": {}},
            {"type": "input_audio_buffer.commit", "event_id": "k1"},
        ],
        start=1,
    ):
        conv.on_client_event(str(event["type"]), event, order)
    if not conv.client_event_failed(None, code):
        assert code in ("invalid_value", None) and conv.oldest_unanswered() == 1
        conv.fail_oldest()
    assert [p.event_id for p in conv.pending_creates] == left[0]
    assert ids(conv.item_creates) == left[1]
    assert ids(conv.commits) == left[2]


def test_an_output_item_of_a_response_never_seen_starting_is_just_an_item() -> None:
    """An output item announced for a response we never saw created enters as an item and sets no kind."""
    conv = Conversation()
    feed(conv, {"type": "response.output_item.added", "response_id": "r9", "item": {"id": "o1"}})
    feed(conv, created("o1"))
    assert conv.item_ids == ["o1"] and conv.active_responses == {}


def test_the_late_item_of_a_create_forgotten_by_age_answers_no_other_create() -> None:
    """A create that chose its id and aged out: when its item finally comes, a newer id-less create still waits."""
    clock = [1000.0]
    conv = Conversation(lambda: clock[0], max_age=10.0)
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"id": "mine"}})
    clock[0] += 11.0
    client(conv, {"type": "conversation.item.create", "event_id": "c2", "item": {"type": "message"}})
    assert creates(conv) == [("c2", None)]
    feed(conv, created("mine"))
    assert creates(conv) == [("c2", None)] and conv.item_ids == ["mine"]


def test_the_memory_of_expired_ids_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound the oldest expired id is forgotten."""
    monkeypatch.setattr(conversation_module, "_REMEMBER_REMOVED", 1)
    monkeypatch.setattr(conversation_module, "_MAX_EXPIRED", 0)
    clock = [1000.0]
    conv = Conversation(lambda: clock[0], max_age=10.0)
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"id": "m1"}})
    client(conv, {"type": "conversation.item.create", "event_id": "c2", "item": {"id": "m2"}})
    clock[0] += 11.0
    conv.prune(clock[0])
    assert list(conv._expired_ids) == ["m2"]


def test_an_aged_out_create_past_the_bound_still_answers_no_other_create(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the few aged-out creates kept in order, one dropped still has its chosen id remembered: its late item
    leaves the newer id-less create waiting."""
    monkeypatch.setattr(conversation_module, "_MAX_EXPIRED", 0)
    clock = [1000.0]
    conv = Conversation(lambda: clock[0], max_age=10.0)
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"id": "mine"}})
    clock[0] += 11.0
    client(conv, {"type": "conversation.item.create", "event_id": "c2", "item": {"type": "message"}})
    assert ids(conv.item_creates) == ["c2"]
    feed(conv, created("mine"))
    assert ids(conv.item_creates) == ["c2"] and "mine" in conv


def test_a_named_answer_shows_that_older_aged_out_commands_of_its_kind_were_answered_or_lost() -> None:
    """Answers come in order: once a newer create is answered by its item, the aged-out ones before it wait for
    nothing any more, and leave the order."""
    clock = [1000.0]
    conv = Conversation(lambda: clock[0], max_age=10.0)
    client(conv, {"type": "conversation.item.create", "event_id": "c1", "item": {"type": "message"}})
    clock[0] += 11.0
    client(conv, {"type": "conversation.item.create", "event_id": "c2", "item": {"id": "mine"}})
    assert [(e.event_id, e.expired) for e in conv.item_creates] == [("c1", True), ("c2", False)]
    assert conv.items_coming() == 1
    feed(conv, created("mine"))
    assert list(conv.item_creates) == [] and conv.oldest_unanswered() is None
