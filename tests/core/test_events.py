"""The event shapes of the core: decoding frames, reading fields, parsing synthetic events, building our events."""

from __future__ import annotations

import orjson
import pytest

from proxy.core.errors import InvalidSyntheticEvent
from proxy.core.events import (
    CheckpointRequest,
    ResetRequest,
    cancel_event,
    clear_event,
    decode,
    delete_event,
    encode,
    error_event,
    parse_checkpoint,
    parse_reset,
    str_or_none,
)

# --- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [b'{"type":"x","n":1}', '{"type":"x","n":1}'])
def test_decode_reads_a_json_object_from_bytes_or_str(frame: bytes | str) -> None:
    """A text frame holding a JSON object decodes to that dict, whether it came as bytes or str."""
    assert decode(frame) == {"type": "x", "n": 1}


@pytest.mark.parametrize(
    "frame",
    [b"{not json", b"\xff\xfe", b"", b"[1,2]", b"1", b"null", b'"type"', b"[" * 5000 + b"]" * 5000],
    ids=["invalid", "not-utf8", "empty", "array", "number", "null", "string", "too-deep"],
)
def test_decode_returns_none_for_anything_but_a_json_object(frame: bytes) -> None:
    """Invalid JSON, non-objects and nesting too deep to parse all decode to None (and are forwarded untouched)."""
    assert decode(frame) is None


def test_encode_is_compact_json_bytes() -> None:
    """encode writes compact UTF-8 JSON bytes that decode gives back."""
    event = {"type": "x", "text": "é", "n": [1, None]}
    data = encode(event)
    assert data == '{"type":"x","text":"é","n":[1,null]}'.encode()
    assert decode(data) == event


@pytest.mark.parametrize(("value", "expected"), [("a", "a"), ("", ""), (None, None), (1, None), (["a"], None)])
def test_str_or_none_keeps_strings_only(value: object, expected: str | None) -> None:
    """Only str values are taken as ids; anything else reads as None."""
    assert str_or_none(value) == expected


# --- synthetic events ------------------------------------------------------------------------------


def test_parse_reset_defaults() -> None:
    """A bare reset means: to empty, keep nothing, cancel the response, clear the input audio."""
    assert parse_reset({"type": "session.reset"}) == ResetRequest(
        event_id=None, keep_item_ids=(), to="empty", cancel_response=True, clear_input_audio=True
    )


def test_parse_reset_reads_every_field() -> None:
    """Every documented field of a reset is read into the request."""
    event = {
        "type": "session.reset",
        "event_id": "r1",
        "keep_item_ids": ["a", "b"],
        "to": "checkpoint",
        "cancel_response": False,
        "clear_input_audio": False,
    }
    assert parse_reset(event) == ResetRequest("r1", ("a", "b"), "checkpoint", False, False)


def test_parse_reset_takes_null_keep_item_ids_as_none_kept() -> None:
    """`keep_item_ids: null` is the same as leaving it out: nothing is kept."""
    assert parse_reset({"type": "session.reset", "keep_item_ids": None}).keep_item_ids == ()


@pytest.mark.parametrize(
    ("event", "param"),
    [
        ({"event_id": 1}, "event_id"),
        ({"keep_item_ids": "a"}, "keep_item_ids"),
        ({"keep_item_ids": ["a", 2]}, "keep_item_ids"),
        ({"to": None}, "to"),
        ({"cancel_response": None}, "cancel_response"),
        ({"clear_input_audio": "false"}, "clear_input_audio"),
        ({"keep_item_id": []}, "keep_item_id"),
    ],
)
def test_parse_reset_names_the_bad_param(event: dict[str, object], param: str) -> None:
    """A malformed reset raises InvalidSyntheticEvent whose param names the offending field."""
    with pytest.raises(InvalidSyntheticEvent) as info:
        parse_reset({"type": "session.reset", **event})
    assert info.value.param == param
    assert info.value.message == str(info.value)


def test_parse_checkpoint_reads_the_event_id_and_refuses_other_fields() -> None:
    """A checkpoint takes only an event id; any other field is refused by name."""
    assert parse_checkpoint({"type": "session.checkpoint"}) == CheckpointRequest(None)
    assert parse_checkpoint({"type": "session.checkpoint", "event_id": "c"}) == CheckpointRequest("c")
    with pytest.raises(InvalidSyntheticEvent) as info:
        parse_checkpoint({"type": "session.checkpoint", "to": "x"})
    assert info.value.param == "to"
    with pytest.raises(InvalidSyntheticEvent) as info:
        parse_checkpoint({"type": "session.checkpoint", "event_id": 3})
    assert info.value.param == "event_id"


# --- builders --------------------------------------------------------------------------------------


def test_cancel_event_names_the_response_only_when_given() -> None:
    """A cancel carries response_id when one is given, and no response_id field at all otherwise."""
    assert orjson.loads(cancel_event("e1", "resp_1")) == {
        "type": "response.cancel",
        "event_id": "e1",
        "response_id": "resp_1",
    }
    assert orjson.loads(cancel_event("e2", None)) == {"type": "response.cancel", "event_id": "e2"}


def test_clear_and_delete_events() -> None:
    """The clear and delete the proxy sends carry our event id (and the item id for a delete)."""
    assert orjson.loads(clear_event("e1")) == {"type": "input_audio_buffer.clear", "event_id": "e1"}
    assert orjson.loads(delete_event("e2", "item_1")) == {
        "type": "conversation.item.delete",
        "event_id": "e2",
        "item_id": "item_1",
    }


def test_error_event_has_the_api_shape() -> None:
    """The proxy's own errors have the API's shape: type error, our event id, and the full inner error."""
    data = error_event("e1", error_type="proxy_error", code="c", message="m", param=None, client_event_id="ce")
    assert orjson.loads(data) == {
        "type": "error",
        "event_id": "e1",
        "error": {"type": "proxy_error", "code": "c", "message": "m", "param": None, "event_id": "ce"},
    }
