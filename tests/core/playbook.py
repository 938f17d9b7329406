"""A playbook for the sans-I/O core: one line feeds an event, the next checks what came out each way."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.session import Binary, Frame, Session, SessionConfig

Event = dict[str, Any]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _decode(frames: list[Frame]) -> list[Event]:
    out: list[Event] = []
    for frame in frames:
        assert not isinstance(frame, Binary)
        out.append(orjson.loads(frame))
    return out


class Play:
    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.session = Session(SessionConfig(**config), clock=self.clock)

    def client(self, event: Event) -> tuple[list[Event], list[Event]]:
        """Feed a client event; returns (decoded frames sent upstream, decoded frames sent to the client)."""
        self.session.client_frame(orjson.dumps(event))
        return self.take()

    def upstream(self, event: Event) -> tuple[list[Event], list[Event]]:
        self.session.upstream_frame(orjson.dumps(event))
        return self.take()

    def take(self) -> tuple[list[Event], list[Event]]:
        up, down = self.session.data_to_send()
        return _decode(up), _decode(down)

    # --- upstream event shorthands (beta names unless ga=True) ---

    def item(self, item_id: str, previous: str | None = "", *, ga: bool = False) -> tuple[list[Event], list[Event]]:
        event: Event = {"type": "conversation.item.added" if ga else "conversation.item.created"}
        event["item"] = {"id": item_id, "type": "message", "role": "user"}
        if previous != "":
            event["previous_item_id"] = previous
        elif self.session.conversation.item_ids:
            event["previous_item_id"] = self.session.conversation.item_ids[-1]
        else:
            event["previous_item_id"] = None
        return self.upstream(event)

    def items(self, *ids: str) -> None:
        for item_id in ids:
            self.item(item_id)

    def deleted(self, item_id: str) -> tuple[list[Event], list[Event]]:
        return self.upstream({"type": "conversation.item.deleted", "event_id": "ev", "item_id": item_id})

    def ack_all(self, up: list[Event]) -> tuple[list[Event], list[Event]]:
        """Answer every clear and delete in `up` as the server would; returns everything that came out."""
        all_up: list[Event] = []
        all_down: list[Event] = []
        for event in up:
            if event["type"] == "conversation.item.delete":
                u, d = self.deleted(event["item_id"])
            elif event["type"] == "input_audio_buffer.clear":
                u, d = self.upstream({"type": "input_audio_buffer.cleared", "event_id": "ev"})
            else:
                continue
            all_up += u
            all_down += d
        return all_up, all_down

    def response_created(self, rid: str, conversation_id: str | None = "conv_1") -> tuple[list[Event], list[Event]]:
        return self.upstream(
            {
                "type": "response.created",
                "response": {"id": rid, "status": "in_progress", "conversation_id": conversation_id},
            }
        )

    def response_done(self, rid: str, status: str = "completed") -> tuple[list[Event], list[Event]]:
        return self.upstream({"type": "response.done", "response": {"id": rid, "status": status, "output": []}})

    def error(
        self,
        code: str | None,
        event_id: str | None = None,
        message: str = "",
        error_type: str = "invalid_request_error",
    ) -> tuple[list[Event], list[Event]]:
        """Feed an upstream `error`; `event_id` is the client event it names (None: the server left it null)."""
        error = {"type": error_type, "code": code, "message": message, "param": None, "event_id": event_id}
        return self.upstream({"type": "error", "event_id": "ev_err", "error": error})

    def output_item(self, rid: str, item_id: str) -> tuple[list[Event], list[Event]]:
        """Feed `response.output_item.added`: response `rid` announces its output item `item_id`."""
        return self.upstream(
            {"type": "response.output_item.added", "response_id": rid, "item": {"id": item_id, "type": "message"}}
        )


def types(events: list[Event]) -> list[str]:
    return [e["type"] for e in events]
