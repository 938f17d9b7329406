"""Transparent relaying over loopback: handshake, headers, query, subprotocols, refusals, closes, garbage."""

from __future__ import annotations

import socket

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.simulator import SimulatorConfig
from tests.e2e.conftest import StackFactory, item_event


async def test_path_query_headers_and_subprotocols_reach_the_upstream(make_stack: StackFactory) -> None:
    """Any path is accepted; the query is merged (pinned keys win); API headers and subprotocols pass, others not."""
    stack = await make_stack(url_suffix="?api-version=pinned")
    headers = {
        "Authorization": "Bearer sk-test",
        "OpenAI-Organization": "org-1",
        "OpenAI-Project": "proj-1",
        "api-key": "azure-key",
        "X-Not-For-Upstream": "secret",
    }
    client, upstream = await stack.client(
        query="?deployment=dep&api-version=client&intent=transcription&extra=1",
        path="/openai/realtime",
        additional_headers=headers,
        subprotocols=["realtime", "openai-insecure-api-key.k"],  # type: ignore[list-item]
    )
    assert upstream.query == {"deployment": "dep", "intent": "transcription", "extra": "1", "api-version": "pinned"}
    assert upstream.path == "/v1/realtime"  # the configured path, whatever the client used
    for name, value in headers.items():
        if name.startswith("X-"):
            assert name not in upstream.headers
        else:
            assert upstream.headers[name] == value
    assert upstream.subprotocol == "realtime"
    assert client.ws.subprotocol == "realtime"


async def test_frames_pass_byte_for_byte_downstream(make_stack: StackFactory) -> None:
    """A server frame with odd spacing and key order reaches the client exactly as sent."""
    stack = await make_stack()
    client, upstream = await stack.client()
    raw = '{ "event_id" :"e1",  "type":"response.output_audio.delta", "delta":"\\u0041AA=" }'
    await upstream.send_raw(raw)
    assert await client.ws.recv() == raw


@pytest.mark.parametrize("status", [401, 403, 404, 429])
async def test_upstream_refusal_reaches_the_client_as_is(make_stack: StackFactory, status: int) -> None:
    """An upstream refusal comes back to the client as the same HTTP status and body, not as an opened socket."""
    stack = await make_stack(sim=SimulatorConfig(refuse_status=status))
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{stack.proxy.port}/v1/realtime?model=m"):
            pass
    response = info.value.response
    assert response.status_code == status
    body = orjson.loads(response.body or b"{}")
    assert "error" in body


async def test_wrong_api_key_is_a_401_with_the_upstream_body(make_stack: StackFactory) -> None:
    """The client's Authorization goes upstream; a wrong key is the upstream's 401."""
    stack = await make_stack(sim=SimulatorConfig(api_key="right"))
    url = f"ws://127.0.0.1:{stack.proxy.port}/v1/realtime?model=m"
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers={"Authorization": "Bearer wrong"}):
            pass
    assert info.value.response.status_code == 401
    async with connect(url, additional_headers={"Authorization": "Bearer right"}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "session.created"


async def test_unreachable_upstream_is_a_502_with_a_reason(make_stack: StackFactory) -> None:
    """With nothing listening upstream the client gets 502 and a one-line reason."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    stack = await make_stack(upstream={"url": f"ws://127.0.0.1:{free_port}/v1/realtime"})
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{stack.proxy.port}/v1/realtime?model=m"):
            pass
    assert info.value.response.status_code == 502
    body = (info.value.response.body or b"").decode()
    assert body.count("\n") == 1 and "unreachable" in body


async def test_plain_http_request_is_told_to_upgrade(make_stack: StackFactory) -> None:
    """A non-WebSocket request gets 426 with a line saying what this is."""
    import aiohttp

    stack = await make_stack()
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{stack.proxy.port}/v1/realtime") as r:
        assert r.status == 426
        assert "WebSocket" in await r.text()


async def test_upstream_close_code_and_reason_pass_through(make_stack: StackFactory) -> None:
    """When the upstream closes with 1011, the client is closed with 1011 and the same reason."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await upstream.close(1011, "upstream broke")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await client.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "upstream broke")


async def test_session_expired_error_then_close_reaches_the_client(make_stack: StackFactory) -> None:
    """With items in the conversation (no rollover) the upstream's session_expired error is forwarded, then its 1001
    close."""
    stack = await make_stack(sim=SimulatorConfig(session_max_s=0.3))
    client, _ = await stack.client()
    await client.send(item_event("keep me"))
    await client.until("conversation.item.added")
    error = await client.until("error")
    assert error["error"]["code"] == "session_expired"
    with pytest.raises(ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_client_close_closes_the_upstream_with_its_code(make_stack: StackFactory) -> None:
    """When the client closes with 4000, the upstream session is closed with 4000 promptly."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await client.ws.close(4000, "done")
    await upstream.wait_until(lambda s: s.closed)
    assert upstream.close_code == 4000


async def test_garbage_frames_do_not_break_this_or_another_connection(make_stack: StackFactory) -> None:
    """Invalid JSON, binary frames and odd values are forwarded; both connections keep working and can reset."""
    stack = await make_stack()
    client, upstream = await stack.client()
    other, other_upstream = await stack.client()
    for frame in ["{nope", "[]", '{"type": 12}', '{"type": "session.reset", "keep_item_ids": {"a": 1}}', "\x00"]:
        await client.ws.send(frame)
    await client.ws.send(b"\x00\xff binary")
    await client.send(item_event("still here"))
    await client.until("conversation.item.added")
    errors = [e for e in client.events if e["type"] == "error"]
    assert len(errors) == 6  # five upstream errors for five garbage frames + one invalid_session_reset
    await client.send({"type": "session.reset"})
    await client.until("session.reset.completed")
    assert upstream.item_ids == []
    await other.send(item_event("neighbour"))
    await other.until("conversation.item.added")
    assert len(other_upstream.item_ids) == 1


async def test_oversize_frame_closes_with_1009(make_stack: StackFactory) -> None:
    """A client frame over limits.max_message_bytes closes the client with 1009 and the upstream too."""
    stack = await make_stack(limits={"max_message_bytes": 4096})
    client, upstream = await stack.client()
    await client.ws.send('{"type":"input_audio_buffer.append","audio":"' + "A" * 8192 + '"}')
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await client.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    await upstream.wait_until(lambda s: s.closed)
