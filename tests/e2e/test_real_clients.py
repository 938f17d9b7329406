"""Real clients, unchanged, through the proxy to the simulator: the official Python SDK (GA and beta, sync and
async), openai-agents realtime, the JS SDK's Node class over TLS, a browser-style subprotocol client, Azure-style
URLs and a sideband call_id connection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trustme
from openai import AsyncAzureOpenAI, AsyncOpenAI, OpenAI

from proxy.simulator import SimSession, SimulatorConfig
from tests.e2e.conftest import INTERNAL, Client, StackFactory, item_event

JS_DIR = Path(__file__).resolve().parents[1] / "js"
Event = dict[str, Any]


def message(text: str) -> Any:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def as_dict(event: Any) -> Event:
    """The SDKs build unknown server events leniently: a model with to_dict(), or a plain mapping."""
    return event.to_dict() if hasattr(event, "to_dict") else dict(event)


def created_type(generation: str) -> str:
    return "conversation.item.created" if generation == "beta" else "conversation.item.added"


def expected_types(generation: str) -> list[str]:
    """What the client sees for two created items and a reset: the proxy's own delete acks stay hidden."""
    if generation == "beta":
        return ["session.created", *["conversation.item.created"] * 2, "session.reset.completed"]
    added_done = ["conversation.item.added", "conversation.item.done"]
    return ["session.created", *added_done, *added_done, "session.reset.completed"]


async def sdk_reset_async(conn: Any, generation: str) -> dict[str, Any]:
    """Create two items with the SDK's typed helpers, send session.reset through conn.send, read the completion."""
    await conn.conversation.item.create(item=message("one"))
    await conn.conversation.item.create(item=message("two"))
    types: list[str] = []
    item_ids: list[str] = []
    async for event in conn:
        types.append(event.type)
        if event.type == created_type(generation):
            item_ids.append(event.item.id)
        if types.count("conversation.item.done" if generation == "ga" else created_type(generation)) == 2:
            break
    await conn.send({"type": "session.reset", "event_id": "sdk-reset"})
    async for event in conn:
        types.append(event.type)
        if event.type == "session.reset.completed":
            return {"types": types, "item_ids": item_ids, "completed": as_dict(event)}
    raise AssertionError(f"the connection ended before session.reset.completed: {types}")


def sdk_reset_sync(conn: Any, generation: str) -> dict[str, Any]:
    """The same steps as sdk_reset_async on the SDK's sync connection (websockets' sync client)."""
    conn.conversation.item.create(item=message("one"))
    conn.conversation.item.create(item=message("two"))
    types: list[str] = []
    item_ids: list[str] = []
    for event in conn:
        types.append(event.type)
        if event.type == created_type(generation):
            item_ids.append(event.item.id)
        if types.count("conversation.item.done" if generation == "ga" else created_type(generation)) == 2:
            break
    conn.send({"type": "session.reset", "event_id": "sdk-reset"})
    for event in conn:
        types.append(event.type)
        if event.type == "session.reset.completed":
            return {"types": types, "item_ids": item_ids, "completed": as_dict(event)}
    raise AssertionError(f"the connection ended before session.reset.completed: {types}")


def run_sync_client(base_url: str, generation: str) -> dict[str, Any]:
    client = OpenAI(api_key="sk-sdk", websocket_base_url=base_url)
    realtime = client.beta.realtime if generation == "beta" else client.realtime
    with realtime.connect(model="gpt-realtime") as conn:
        return sdk_reset_sync(conn, generation)


@pytest.mark.parametrize(("generation", "mode"), [("ga", "sync"), ("beta", "async"), ("beta", "sync")])
async def test_openai_python_sdk_resets_through_the_proxy(make_stack: StackFactory, generation: str, mode: str) -> None:
    """The official SDK, GA sync and beta sync/async, creates items, resets, and the upstream conversation is empty."""
    stack = await make_stack(sim=SimulatorConfig(api_key="sk-sdk", delta_interval_s=0.001))
    base_url = f"ws://127.0.0.1:{stack.proxy.port}/v1"
    async with asyncio.timeout(10):  # a guard against a hang, not a wait: each step awaits its own event
        if mode == "sync":
            # The sync client blocks: it runs in a thread while the proxy and the simulator run on this loop.
            result = await asyncio.to_thread(run_sync_client, base_url, generation)
        else:
            client = AsyncOpenAI(api_key="sk-sdk", websocket_base_url=base_url)
            async with client.beta.realtime.connect(model="gpt-realtime") as conn:
                result = await sdk_reset_async(conn, generation)
    upstream = await stack.sim.wait_for_sessions(1)

    assert upstream.generation == generation
    assert upstream.headers["Authorization"] == "Bearer sk-sdk"
    assert upstream.headers.get("OpenAI-Beta") == ("realtime=v1" if generation == "beta" else None)
    assert upstream.query["model"] == "gpt-realtime"
    assert result["types"] == expected_types(generation)
    assert len(result["item_ids"]) == 2
    completed = result["completed"]
    assert completed["reset_event_id"] == "sdk-reset"
    assert completed["deleted_item_ids"] == result["item_ids"]
    assert completed["kept_item_ids"] == [] and completed["failed_item_ids"] == []
    assert upstream.item_ids == []
    sent = [e["type"] for e in upstream.received]
    assert sent == ["conversation.item.create"] * 2 + ["input_audio_buffer.clear"] + ["conversation.item.delete"] * 2
    assert [e["item_id"] for e in upstream.received if e["type"] == "conversation.item.delete"] == result["item_ids"]


async def test_openai_agents_realtime_session_with_a_raw_reset(make_stack: StackFactory) -> None:
    """openai-agents' RealtimeRunner talks through the proxy; a reset sent as a raw event empties the conversation."""
    realtime = pytest.importorskip(
        "agents.realtime", reason="openai-agents is not installed (pip install -e '.[test]')"
    )
    from agents.realtime.model_inputs import RealtimeModelSendRawMessage
    from agents.realtime.openai_realtime import OpenAIRealtimeWebSocketModel

    class PassThroughModel(OpenAIRealtimeWebSocketModel):
        """The SDK's own model, except that a raw session.reset goes out as it is instead of being dropped."""

        async def send_event(self, event: Any) -> None:
            if isinstance(event, RealtimeModelSendRawMessage) and event.message["type"] == "session.reset":
                assert self._websocket is not None
                await self._websocket.send(json.dumps({"type": "session.reset", **event.message.get("other_data", {})}))
            else:
                await super().send_event(event)

    stack = await make_stack(sim=SimulatorConfig(api_key="sk-agents", delta_interval_s=0.001))
    model = PassThroughModel()
    runner = realtime.RealtimeRunner(realtime.RealtimeAgent(name="assistant", instructions="Be brief."), model=model)
    url = f"ws://127.0.0.1:{stack.proxy.port}/v1/realtime?model=gpt-realtime"
    session = await runner.run(model_config={"url": url, "headers": {"Authorization": "Bearer sk-agents"}})
    errors: list[str] = []

    async def until(predicate: Any) -> Any:
        async for event in session:
            if event.type == "error":
                errors.append(str(event.error))
            if predicate(event):
                return event
        raise AssertionError("the agents session ended early")

    def raw(kind: str) -> Any:
        return lambda e: (
            e.type == "raw_model_event" and e.data.type == "raw_server_event" and e.data.data["type"] == kind
        )

    async with asyncio.timeout(10), session:
        upstream = await stack.sim.wait_for_sessions(1)
        await session.send_message("hello")
        await until(lambda e: e.type == "agent_end")
        before = list(upstream.item_ids)
        assert len(before) == 2  # the user message and the assistant's reply

        # openai-agents 0.24 validates a raw message against the SDK's client events and drops an unknown type
        # (it only logs "Failed to convert raw message"): through its stock path a reset never leaves the client.
        dropped = RealtimeModelSendRawMessage(message={"type": "session.reset", "other_data": {"event_id": "dropped"}})
        await OpenAIRealtimeWebSocketModel.send_event(model, dropped)
        reset = RealtimeModelSendRawMessage(
            message={"type": "session.reset", "other_data": {"event_id": "agents-reset"}}
        )
        await session.model.send_event(reset)
        completed = (await until(raw("session.reset.completed"))).data.data
        assert completed["reset_event_id"] == "agents-reset", "openai-agents now sends unknown raw events itself"
        assert completed["deleted_item_ids"] == before
        assert upstream.item_ids == []

        await session.send_message("again")
        await until(lambda e: e.type == "agent_end")
        assert len(upstream.item_ids) == 2 and not set(upstream.item_ids) & set(before)

    assert upstream.headers["Authorization"] == "Bearer sk-agents"
    assert upstream.query == {"model": "gpt-realtime"}
    assert upstream.generation == "ga"
    # The agents SDK turns every server event its schema rejects into an "error" session event without closing:
    # the proxy's session.reset.completed is the only one. Nothing else went wrong.
    assert errors and all("session.reset.completed" in e for e in errors), errors


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A trustme CA and a certificate for 127.0.0.1: (CA pem, cert pem, key pem)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(files[0])
    cert.cert_chain_pems[0].write_to_path(files[1])
    cert.private_key_pem.write_to_path(files[2])
    return files


async def test_js_sdk_node_realtime_ws_over_tls(make_stack: StackFactory, tls_files: tuple[Path, Path, Path]) -> None:
    """The JS SDK's OpenAIRealtimeWS in Node connects over the TLS listener, resets, and the upstream is empty."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the JS SDK test needs Node.js (>= 20)")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        pytest.skip(f"{JS_DIR / 'node_modules'} is missing: run `npm ci --prefix tests/js`")
    ca, cert, key = tls_files
    listen = {"port": 0, "tls_cert_file": str(cert), "tls_key_file": str(key)}
    stack = await make_stack(sim=SimulatorConfig(api_key="sk-js"), listen=listen)
    assert stack.proxy.url.startswith("wss://")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env |= {"NODE_EXTRA_CA_CERTS": str(ca), "OPENAI_API_KEY": "sk-js"}
    base_url = f"https://127.0.0.1:{stack.proxy.port}/v1"
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS_DIR / "realtime_reset.mjs"),
        base_url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert proc.returncode == 0, (out + err).decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    upstream = stack.sim.sessions[0]

    assert result["ok"] is True
    assert result["url"] == f"wss://127.0.0.1:{stack.proxy.port}/v1/realtime?model=gpt-realtime"
    assert result["received"] == [
        "session.created",
        "conversation.item.added",
        "conversation.item.done",
        "session.reset.completed",
    ]
    assert result["completed"]["reset_event_id"] == "js-reset"
    assert result["completed"]["deleted_item_ids"] == [result["item_id"]]
    assert upstream.item_ids == []
    assert upstream.headers["Authorization"] == "Bearer sk-js"
    assert upstream.query == {"model": "gpt-realtime"}
    assert "session.reset" not in [e["type"] for e in upstream.received]


async def test_browser_style_subprotocols_carry_key_and_beta(make_stack: StackFactory) -> None:
    """A browser-style client offering only subprotocols gets `realtime`; its key and beta flag reach the upstream."""
    stack = await make_stack(sim=SimulatorConfig(api_key="sk-browser"))
    protocols: Any = ["realtime", "openai-insecure-api-key.sk-browser", "openai-beta.realtime-v1"]
    client, upstream = await stack.client(subprotocols=protocols, origin="https://app.example")
    assert client.ws.subprotocol == "realtime"
    await client.send(item_event("from a browser"))
    created = await client.until("conversation.item.created")
    await client.send({"type": "session.reset", "event_id": "browser-reset"})
    completed = await client.until("session.reset.completed")

    assert completed["deleted_item_ids"] == [created["item"]["id"]]
    assert client.types() == ["session.created", "conversation.item.created", "session.reset.completed"]
    assert upstream.item_ids == []
    assert upstream.generation == "beta"
    assert upstream.subprotocol == "realtime"
    assert "Authorization" not in upstream.headers and "api-key" not in upstream.headers
    assert "openai-insecure-api-key.sk-browser" in upstream.headers["Sec-WebSocket-Protocol"]


async def reset_one_item(client: Client, upstream: SimSession, created: str) -> None:
    await client.send(item_event("azure"))
    item_id = (await client.until(created))["item"]["id"]
    await client.send({"type": "session.reset"})
    assert (await client.until("session.reset.completed"))["deleted_item_ids"] == [item_id]
    assert upstream.item_ids == []
    assert not INTERNAL & set(client.types())


async def test_azure_preview_url_with_the_python_azure_client(make_stack: StackFactory) -> None:
    """AsyncAzureOpenAI's beta realtime reaches the upstream with api-version, deployment and the api-key header."""
    stack = await make_stack(sim=SimulatorConfig(api_key="azure-key"))
    client = AsyncAzureOpenAI(
        api_key="azure-key",
        api_version="2024-10-01-preview",
        azure_endpoint=f"http://127.0.0.1:{stack.proxy.port}",
        websocket_base_url=f"ws://127.0.0.1:{stack.proxy.port}/openai",
    )
    async with client.beta.realtime.connect(model="dep") as conn:
        result = await sdk_reset_async(conn, "beta")
    upstream = stack.sim.sessions[0]

    assert upstream.query == {"api-version": "2024-10-01-preview", "deployment": "dep"}
    assert upstream.headers["api-key"] == "azure-key"
    assert "Authorization" not in upstream.headers
    assert upstream.generation == "beta"
    assert result["types"] == expected_types("beta")
    assert result["completed"]["deleted_item_ids"] == result["item_ids"]
    assert upstream.item_ids == []


async def test_azure_v1_url_with_api_key_header(make_stack: StackFactory) -> None:
    """The Azure GA path /openai/v1/realtime?model=… with an api-key header reaches the upstream, and resets work."""
    stack = await make_stack(sim=SimulatorConfig(api_key="azure-key"))
    client, upstream = await stack.client(
        query="?model=dep", path="/openai/v1/realtime", additional_headers={"api-key": "azure-key"}
    )
    await reset_one_item(client, upstream, "conversation.item.added")
    assert upstream.query == {"model": "dep"}
    assert upstream.headers["api-key"] == "azure-key"
    assert upstream.generation == "ga"


async def test_sideband_call_id_connection_with_the_python_sdk(make_stack: StackFactory) -> None:
    """The SDK's sideband connect(call_id=…) sends no model; the call_id reaches the upstream and a reset works."""
    stack = await make_stack(sim=SimulatorConfig(api_key="sk-sdk"))
    client = AsyncOpenAI(api_key="sk-sdk", websocket_base_url=f"ws://127.0.0.1:{stack.proxy.port}/v1")
    async with client.realtime.connect(call_id="rtc_123") as conn:
        result = await sdk_reset_async(conn, "ga")
    upstream = stack.sim.sessions[0]

    assert upstream.query == {"call_id": "rtc_123"}
    assert result["types"] == expected_types("ga")
    assert result["completed"]["deleted_item_ids"] == result["item_ids"]
    assert upstream.item_ids == []
