"""The replay record: what it takes to open an upstream session equivalent to the client's, and a spare set up by it.

Rules:
- The dial is the one the client's own upstream was opened with: the configured URL with the client's query
  merged in, and the headers and subprotocols sent (the client's forwarded credentials, or the injected key).
  It holds credentials, so its repr shows the URL only.
- The session's configuration is the client's `session.update` events, as they went upstream, in order. No
  merge of our own: the server merges each update into its session object, so the same updates in the same
  order from the same fresh start give the same session, whatever the server's merge rules are.
- A spare is an upstream session dialed the same way and sent the whole record at once. It is *ready* once it
  said `session.created` and answered every update it was sent with `session.updated` (updates are answered
  in order). Any `error` from a spare means it refused (or is ending): it is never used. A later client
  update is mirrored to it, and it is not ready again until it answered that one too. Everything a spare
  says is for us alone: none of it reaches the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.core.events import ERROR, SESSION_CREATED, SESSION_UPDATED, Event, decode, encode, str_or_none


@dataclass(frozen=True, slots=True)
class Dial:
    """How the client's upstream was opened: a spare is opened the same way."""

    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may carry a key: never printed
    subprotocols: tuple[str, ...] = field(default=(), repr=False)  # openai-insecure-api-key.<key> too


class ReplayRecord:
    """The dial and the client's `session.update` events, in the order they went upstream."""

    def __init__(self, dial: Dial) -> None:
        self.dial = dial
        self.updates: list[Event] = []

    def record(self, event: Event) -> None:
        self.updates.append(event)

    def refused(self, event_id: str) -> bool:
        """The client's own upstream refused the update `event_id`: it is not replayed. True if it was here."""
        kept = [u for u in self.updates if u.get("event_id") != event_id]
        dropped = len(kept) != len(self.updates)
        self.updates = kept
        return dropped


class Spare:
    """One spare upstream session being configured by the record (sans-I/O: frames in, frames out)."""

    def __init__(self, record: ReplayRecord, id_prefix: str, opened_at: float) -> None:
        self.opened_at = opened_at
        self.session_id: str | None = None
        self.session: Event | None = None  # its session object, as its last session.updated showed it
        self.refusal: str | None = None  # why it is not to be used (its error's message), once it refused
        self._prefix = id_prefix
        self._sent = 0
        self._awaited = 0  # updates sent and not yet answered
        self._to_spare: list[bytes] = []
        for update in record.updates:
            self.mirror(update)

    @property
    def ready(self) -> bool:
        return self.refusal is None and self.session_id is not None and self._awaited == 0

    @property
    def pending(self) -> bool:
        return bool(self._to_spare)

    def mirror(self, update: Event) -> None:
        """Send one update (replayed or mirrored) under an event id of ours; one more answer to wait for."""
        self._sent += 1
        self._awaited += 1
        self._to_spare.append(encode({**update, "event_id": f"{self._prefix}replay{self._sent}"}))

    def take(self) -> list[bytes]:
        frames, self._to_spare = self._to_spare, []
        return frames

    def spare_frame(self, data: bytes | str) -> None:
        event = decode(data)
        etype = event.get("type") if event is not None else None
        if event is None or etype == ERROR:
            err = event.get("error") if event is not None else None
            message = str_or_none(err.get("message")) if isinstance(err, dict) else None
            self.refusal = self.refusal or message or "the spare sent an error or a frame that is not an event"
            return
        session = event.get("session")
        if etype == SESSION_CREATED and isinstance(session, dict):
            self.session_id = str_or_none(session.get("id"))
            self.session = session
        elif etype == SESSION_UPDATED and self._awaited:
            self._awaited -= 1
            self.session = session if isinstance(session, dict) else self.session
