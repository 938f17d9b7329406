"""An observer: a second realtime connection that labels each turn of another conversation, from a clean context.

    make observer                                        # the bundled simulator, no key
    OPENAI_API_KEY=sk-... .venv/bin/python examples/observer.py --openai

Two connections go through the proxy, both with the official `openai` SDK: the main conversation (a customer's
lines, an assistant that answers aloud) and the observer. The observer's instructions (`session.update`) and its
few-shot examples (items) are recorded as a checkpoint, and its auto-reset policy is
`{"after": "response", "to": "checkpoint"}`: after each answer the proxy itself deletes the turn and keeps the
examples, before the observer's next event goes upstream, with no round trip of the observer's own. Each turn
the observer gets the customer's line and the assistant's spoken reply (its audio, as input audio) and answers
yes or no to "is this going well?". Printed per turn: the label, the reset's time (the proxy's
`duration_ms`, and from the answer's `response.done` to the `session.reset.completed`) and the turn's tokens,
read from that `session.reset.completed`'s `usage`. The observer's input stays flat; the main conversation,
never reset, pays for its whole history on every turn (`session.usage` shows its running sum).

With `--openai` the proxy relays to wss://api.openai.com/v1/realtime and sends the key from OPENAI_API_KEY itself
(the clients hold none). The simulator does not judge: its answers echo the question, so the labels read "?".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI

from proxy.config import LoggingConfig, config_from_dict
from proxy.logs import configure_logging
from proxy.server import ProxyServer
from proxy.simulator import Simulator, SimulatorConfig

Event = dict[str, Any]
OPENAI_URL = "wss://api.openai.com/v1/realtime"

INSTRUCTIONS = (
    "You watch a customer-support call. For each turn you get the customer's line as text and the agent's spoken "
    "reply as audio. Answer with one word: yes if the call is going well, no if it is not."
)
FEW_SHOT = [  # (turn, label): the observer's examples, kept by every reset
    ("Customer: My parcel never arrived. Agent (spoken): I'm sorry, I've sent a new one today.", "yes"),
    ("Customer: I want a refund. Agent (spoken): That's not my problem.", "no"),
]
CUSTOMER_LINES = [
    "Hi, my order 1042 arrived damaged.",
    "Can you send a replacement before Friday?",
    "Thanks, and can I keep the damaged one?",
]


@dataclass(frozen=True)
class Turn:
    turn: int
    label: str  # "yes", "no", or "?" when the answer is neither
    answer: str
    reset_ms: float  # the proxy's duration_ms for the auto-reset
    reset_wait_ms: float  # the observer's wait: its answer's response.done → session.reset.completed
    usage: Event  # the observer's turn, from session.reset.completed
    auto: bool  # the reset was the policy's (always, here: the observer never sends session.reset)
    kept: int
    deleted: int
    main_input_tokens: int  # what the main conversation's response of this turn read


def message(role: str, text: str) -> Event:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


class Connection:
    """One realtime connection through the proxy with the `openai` SDK; events read as plain JSON."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def send(self, event: Event) -> None:
        await self.conn.send(event)  # the synthetic events go through the SDK like any other

    async def recv(self) -> Event:
        event: Event = json.loads(await self.conn.recv_bytes())
        return event

    async def until(self, etype: str, on: Callable[[Event], None] | None = None) -> Event:
        """Read until an event of type `etype`; `on` sees every event before it. A server error stops the run."""
        while True:
            event = await self.recv()
            if event.get("type") == "error":
                raise RuntimeError(f"error event: {event['error']}")
            if on is not None:
                on(event)
            if event.get("type") == etype:
                return event


@asynccontextmanager
async def realtime(client: AsyncOpenAI, model: str) -> AsyncIterator[Connection]:
    async with client.realtime.connect(model=model) as conn:
        connection = Connection(conn)
        await connection.until("session.created")
        yield connection


async def set_up_observer(observer: Connection, out: Callable[[str], object]) -> None:
    """Instructions and few-shot examples, a checkpoint of them, and the policy that resets to it."""
    await observer.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": INSTRUCTIONS,
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": None}},  # the observer commits each turn itself
            },
        }
    )
    await observer.until("session.updated")
    for turn, label in FEW_SHOT:
        for item in (message("user", turn), message("assistant", label)):
            await observer.send({"type": "conversation.item.create", "item": item})
            await observer.until("conversation.item.added")
    await observer.send({"type": "session.checkpoint", "event_id": "examples"})
    checkpoint = await observer.until("session.checkpoint.created")
    await observer.send({"type": "session.reset.policy", "after": "response", "to": "checkpoint"})
    policy = await observer.until("session.reset.policy.updated")
    out(f"observer: checkpoint of {len(checkpoint['item_ids'])} items (the examples), policy {policy['policy']}")


async def main_turn(main: Connection, line: str) -> tuple[list[str], int]:
    """The customer's line and the assistant's spoken answer: its audio chunks, and the input tokens it read."""
    await main.send({"type": "conversation.item.create", "item": message("user", line)})
    await main.send({"type": "response.create"})
    audio: list[str] = []

    def collect(event: Event) -> None:
        if event.get("type") in ("response.output_audio.delta", "response.audio.delta"):
            audio.append(event["delta"])

    done = await main.until("response.done", collect)
    return audio, int((done["response"].get("usage") or {}).get("input_tokens") or 0)


async def observe(observer: Connection, line: str, audio: list[str]) -> tuple[str, Event, float]:
    """One turn for the observer: the line, the reply's audio, a response; returns its answer, the auto-reset's
    session.reset.completed, and the wait for it after the answer's response.done (ms)."""
    turn = f"Customer: {line} Agent (spoken): the audio that follows. Is the call going well?"
    await observer.send({"type": "conversation.item.create", "item": message("user", turn)})
    for chunk in audio:
        await observer.send({"type": "input_audio_buffer.append", "audio": chunk})
    await observer.send({"type": "input_audio_buffer.commit"})
    await observer.send({"type": "response.create"})
    text: list[str] = []

    def collect(event: Event) -> None:
        if event.get("type") in ("response.output_text.delta", "response.text.delta"):
            text.append(event["delta"])

    await observer.until("response.done", collect)
    answered = time.perf_counter()
    completed = await observer.until("session.reset.completed")  # the proxy's own, no request of ours
    return "".join(text).strip(), completed, (time.perf_counter() - answered) * 1000


def label_of(answer: str) -> str:
    word = answer.split(maxsplit=1)[0].strip(".,!").lower() if answer else ""
    return word if word in ("yes", "no") else "?"


async def run_observer(
    proxy_url: str,
    *,
    api_key: str = "unused",
    model: str = "gpt-realtime",
    turns: int = len(CUSTOMER_LINES),
    out: Callable[[str], object] = print,
) -> list[Turn]:
    """The main conversation and the observer through the proxy at `proxy_url` (ws://host:port)."""
    client = AsyncOpenAI(api_key=api_key, websocket_base_url=f"{proxy_url}/v1")
    results: list[Turn] = []
    async with realtime(client, model) as main, realtime(client, model) as observer:
        await main.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}})
        await main.until("session.updated")
        await set_up_observer(observer, out)
        for n in range(1, turns + 1):
            line = CUSTOMER_LINES[(n - 1) % len(CUSTOMER_LINES)]
            audio, main_input = await main_turn(main, line)
            answer, completed, wait_ms = await observe(observer, line, audio)
            used = completed["usage"]
            turn = Turn(
                n,
                label_of(answer),
                answer,
                completed["duration_ms"],
                wait_ms,
                used,
                completed["auto"],
                len(completed["kept_item_ids"]),
                len(completed["deleted_item_ids"]),
                main_input,
            )
            results.append(turn)
            out(
                f"turn {n}: label {turn.label:<3} ({answer[:40]!r}); auto-reset {turn.reset_ms:.2f} ms "
                f"({turn.deleted} deleted, {turn.kept} kept; {wait_ms:.2f} ms after the answer); observer tokens "
                f"in {used['input_tokens']} out {used['output_tokens']}; main conversation read {main_input}"
            )
        await main.send({"type": "session.usage", "event_id": "main-usage"})
        total = (await main.until("session.usage.result"))["usage"]
    observed = ", ".join(str(t.usage["input_tokens"]) for t in results)
    read = ", ".join(str(t.main_input_tokens) for t in results)
    out(f"observer input tokens per turn: {observed} (flat: every turn starts from the examples alone)")
    out(
        f"main conversation per turn: {read} (it grows: never reset; session.usage: "
        f"{total['input_tokens']} input tokens in {total['responses']} responses)"
    )
    return results


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--openai", action="store_true", help="relay to OpenAI (key from OPENAI_API_KEY)")
    parser.add_argument("--model", default="gpt-realtime")
    parser.add_argument("--turns", type=int, default=len(CUSTOMER_LINES), help="turns to observe (lines repeat)")
    args = parser.parse_args(argv)
    if args.openai and not os.environ.get("OPENAI_API_KEY"):
        print("--openai needs OPENAI_API_KEY in the environment", file=sys.stderr)
        return 2
    configure_logging(LoggingConfig(level="warning", format="console"))  # the example prints its own lines
    async with AsyncExitStack() as stack:
        upstream = {"url": OPENAI_URL, "api_key_env": "OPENAI_API_KEY"}
        if not args.openai:
            sim = await stack.enter_async_context(Simulator(SimulatorConfig(delta_interval_s=0.002)))
            upstream = {"url": sim.url}
        config = config_from_dict({"listen": {"port": 0}, "upstream": upstream})
        proxy = await stack.enter_async_context(ProxyServer(config))
        print(f"upstream: {upstream['url']}\nproxy:    ws://127.0.0.1:{proxy.port}")
        await run_observer(f"ws://127.0.0.1:{proxy.port}", model=args.model, turns=args.turns)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
