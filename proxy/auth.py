"""Who may connect, and which credentials go upstream.

- Client tokens (`[auth] client_tokens_env`): a client presents one as `Authorization: Bearer <token>` or as
  the browser subprotocol `openai-insecure-api-key.<token>`; compared in constant time. A proxy token is the
  proxy's business: it is never forwarded upstream. With tokens set, /metrics on the main port asks for one.
- An injected key (`[upstream] api_key_env`): sent upstream as `Authorization: Bearer <key>` (or `api-key`
  for Azure), and every credential the client sent (header or subprotocol) is dropped, and so is what it
  said about billing (`OpenAI-Organization`, `OpenAI-Project`, or their `openai-organization.` /
  `openai-project.` subprotocols): `[upstream] organization` / `project` pin those instead.
- Browser origins (`[auth] allowed_origins`): a request with an `Origin` outside the list is refused. With an
  injected key an empty list admits no browser at all: browsers apply no CORS to WebSockets, so any page the
  user opens could otherwise spend the key. Requests without `Origin` (SDKs, servers) are never refused here.
- DNS rebinding: with an injected key on a loopback listener, a `Host` that is neither a loopback name or
  address nor in `[auth] allowed_hosts` is refused: a page whose name was re-pointed at 127.0.0.1 sends its own.
All decided before any upstream connection is opened.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.config import Config
from proxy.core.errors import ConfigError

# The headers the Realtime API (OpenAI and Azure) reads; nothing else of the client's goes upstream.
FORWARDED_HEADERS = ("Authorization", "OpenAI-Beta", "OpenAI-Organization", "OpenAI-Project", "api-key")
KEY_SUBPROTOCOL = "openai-insecure-api-key."


@dataclass(frozen=True, slots=True)
class Secrets:
    """Secrets read from the environment at start; never logged, never in the TOML file."""

    upstream_key: str | None = None
    client_tokens: tuple[bytes, ...] = ()

    def __repr__(self) -> str:  # a stray log of this object must not print a key
        return f"Secrets(upstream_key={'set' if self.upstream_key else None}, client_tokens={len(self.client_tokens)})"


def load_secrets(config: Config, environ: Mapping[str, str] | None = None) -> Secrets:
    env = os.environ if environ is None else environ
    key: str | None = None
    if config.upstream.api_key_env:
        key = env.get(config.upstream.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                "upstream.api_key_env", f"environment variable {config.upstream.api_key_env} is not set or empty"
            )
    tokens: tuple[bytes, ...] = ()
    if config.auth.client_tokens_env:
        raw = env.get(config.auth.client_tokens_env, "")
        tokens = tuple(t.strip().encode() for t in raw.split(",") if t.strip())
        if not tokens:
            raise ConfigError(
                "auth.client_tokens_env", f"environment variable {config.auth.client_tokens_env} holds no token"
            )
    return Secrets(upstream_key=key, client_tokens=tokens)


def _bearer(headers: CIMultiDictProxy[str]) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _token_ok(presented: Sequence[str], tokens: Sequence[bytes]) -> bool:
    ok = False
    for candidate in presented:
        for token in tokens:
            # No early exit: the time taken does not tell how much of a token matched, or which.
            ok |= hmac.compare_digest(candidate.encode(), token)
    return ok


def _same_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


def origin_refusal(config: Config, secrets: Secrets, origin: str | None) -> str | None:
    """Why this Origin may not connect, or None. No Origin (not a browser) always passes."""
    allowed = config.auth.allowed_origins
    if origin is None or "*" in allowed:
        return None
    if not allowed and secrets.upstream_key is None:
        return None  # clients bring their own key: the operator asked for no check
    if _same_origin(origin) in {_same_origin(a) for a in allowed}:
        return None
    return f"origin {origin!r} is not allowed: list it in [auth] allowed_origins"


def _host_name(host: str) -> str:
    """The name in a Host header, lower case, without port, brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, _ = host.rpartition(":")
    return (name if colon else host).rstrip(".")


def host_refusal(config: Config, secrets: Secrets, host: str | None) -> str | None:
    """Why this Host may not be served, or None: a loopback proxy holding a key answers loopback names only.

    A DNS-rebinding page reaches 127.0.0.1 under its own name, which it sends as Host. A request without Host
    (HTTP/1.0) is not a browser's and passes.
    """
    allowed = config.auth.allowed_hosts
    if secrets.upstream_key is None or not is_loopback(config.listen.host) or host is None or "*" in allowed:
        return None
    name = _host_name(host)
    if is_loopback(name) or name.endswith(".localhost") or name in {_host_name(a) for a in allowed}:
        return None
    return f"host {host!r} is not allowed: list it in [auth] allowed_hosts"


def token_refusal(secrets: Secrets, headers: CIMultiDictProxy[str], subprotocols: Sequence[str] = ()) -> str | None:
    """Why this client's proxy token is not accepted, or None (also when no tokens are configured)."""
    if not secrets.client_tokens:
        return None
    presented = [p[len(KEY_SUBPROTOCOL) :] for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)]
    bearer = _bearer(headers)
    if bearer is not None:
        presented.append(bearer)
    if _token_ok(presented, secrets.client_tokens):
        return None
    return "a valid proxy token is required (Authorization: Bearer or openai-insecure-api-key subprotocol)"


def refusal(
    config: Config, secrets: Secrets, headers: CIMultiDictProxy[str], subprotocols: Sequence[str]
) -> tuple[int, str] | None:
    """(status, message) when this client may not open a session, else None."""
    forbidden = origin_refusal(config, secrets, headers.get("Origin"))
    if forbidden is not None:
        return 403, forbidden
    unauthorized = token_refusal(secrets, headers, subprotocols)
    if unauthorized is not None:
        return 401, unauthorized
    return None


def upstream_credentials(
    config: Config, secrets: Secrets, headers: CIMultiDictProxy[str], subprotocols: Sequence[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """The headers and subprotocols to send upstream for this client."""
    injected = secrets.upstream_key is not None
    key_protocol = KEY_SUBPROTOCOL.rstrip(".")
    # Lower-case header names and subprotocol prefixes (before the first dot) that are not passed on.
    dropped: set[str] = set()
    if injected:
        dropped |= {"authorization", "api-key", key_protocol}
    if secrets.client_tokens:
        dropped |= {"authorization", key_protocol}  # they carried (or should have carried) a proxy token
    # Whom the key bills is its owner's call. Each header has a browser twin, the subprotocol
    # "openai-organization.<id>" / "openai-project.<id>". A pin replaces the client's word even without a key.
    pinned = {"OpenAI-Organization": config.upstream.organization, "OpenAI-Project": config.upstream.project}
    dropped |= {name.lower() for name, value in pinned.items() if injected or value}
    out = [
        (name, value) for name in FORWARDED_HEADERS if name.lower() not in dropped for value in headers.getall(name, ())
    ]
    protocols = [p for p in subprotocols if p.partition(".")[0].lower() not in dropped]
    if secrets.upstream_key is not None:
        if config.upstream.auth == "api-key":
            out.append(("api-key", secrets.upstream_key))
        else:
            out.append(("Authorization", f"Bearer {secrets.upstream_key}"))
    out.extend((name, value) for name, value in pinned.items() if value)
    return out, protocols


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_warnings(config: Config, secrets: Secrets) -> list[str]:
    """Set-ups that work but are very likely not what the operator meant; logged loudly at start."""
    warnings = []
    if secrets.upstream_key and not secrets.client_tokens and not is_loopback(config.listen.host):
        warnings.append(
            f"listening on {config.listen.host} with an injected upstream key and no client tokens: anyone who "
            "can reach this port uses your API key; set [auth] client_tokens_env"
        )
    if secrets.client_tokens and not secrets.upstream_key:
        warnings.append(
            "client tokens are set but no upstream key: the client's Authorization carries the proxy token and "
            "is not forwarded, so an OpenAI upstream gets no credential; set [upstream] api_key_env"
        )
    if secrets.upstream_key and "*" in config.auth.allowed_origins:
        warnings.append(
            'allowed_origins = ["*"] with an injected upstream key: any web page opened in a browser that can '
            "reach this port may spend your API key; list your app's origins instead"
        )
    if secrets.upstream_key and is_loopback(config.listen.host) and "*" in config.auth.allowed_hosts:
        warnings.append(
            'allowed_hosts = ["*"] with an injected upstream key: the DNS-rebinding check is off, so a web page '
            "that re-points its name at this machine may reach the proxy; list the host names you use instead"
        )
    if secrets.client_tokens and not config.admin.port and not is_loopback(config.listen.host):
        warnings.append(
            f"/healthz and /readyz answer anyone who reaches {config.listen.host}:{config.listen.port}, and "
            "/metrics any client-token holder; set [admin] port (and host) to serve them on a listener of their own"
        )
    return warnings
