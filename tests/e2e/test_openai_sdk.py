"""The official `openai` Python SDK as the client, pointed at the proxy with websocket_base_url."""

from __future__ import annotations

from typing import Any

from openai import AsyncOpenAI

from tests.e2e.conftest import StackFactory


async def test_openai_sdk_ga_client_resets_through_the_proxy(make_stack: StackFactory) -> None:
    """The SDK connects unchanged, creates items and a response, sends session.reset and reads the completion."""
    stack = await make_stack()
    client = AsyncOpenAI(api_key="sk-test", websocket_base_url=f"ws://127.0.0.1:{stack.proxy.port}/v1")
    async with client.realtime.connect(model="gpt-realtime") as conn:
        upstream = await stack.sim.wait_for_sessions(1)
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
        )
        await conn.response.create()
        seen: list[Any] = []
        async for event in conn:
            seen.append(event)
            if event.type == "response.done":
                break
        assert len(upstream.item_ids) == 2
        before = list(upstream.item_ids)

        await conn.send({"type": "session.reset", "event_id": "sdk-reset"})  # type: ignore[arg-type,misc]
        completed: Any = None
        async for event in conn:
            if event.type == "session.reset.completed":
                completed = event
                break
        assert completed is not None
        data = completed.to_dict() if hasattr(completed, "to_dict") else dict(completed)
        assert data["reset_event_id"] == "sdk-reset"
        assert data["deleted_item_ids"] == before
        assert upstream.item_ids == []
        assert upstream.headers["Authorization"] == "Bearer sk-test"
        assert upstream.query["model"] == "gpt-realtime"
        assert "session.reset" not in [e["type"] for e in upstream.received]
