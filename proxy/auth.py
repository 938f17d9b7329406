"""Who may connect, and which credentials go upstream.

- Client tokens (`[auth] client_tokens_env`): a client presents one as `Authorization: Bearer <token>` or as
  the browser subprotocol `openai-insecure-api-key.<token>`; compared in constant time. A proxy token is the
  proxy's business: it is never forwarded upstream.
- An injected key (`[upstream] api_key_env`): sent upstream as `Authorization: Bearer <key>` (or `api-key`
  for Azure), and every credential the client sent (header or subprotocol) is dropped.
- Browser origins (`[auth] allowed_origins`): a request with an `Origin` outside the list is refused.
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
_CREDENTIAL_HEADERS = frozenset({"authorization", "api-key"})


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


def refusal(
    config: Config, secrets: Secrets, headers: CIMultiDictProxy[str], subprotocols: Sequence[str]
) -> tuple[int, str] | None:
    """(status, message) when this client may not connect, else None."""
    origin = headers.get("Origin")
    allowed = config.auth.allowed_origins
    if origin is not None and allowed and "*" not in allowed and origin not in allowed:
        return 403, f"origin {origin!r} is not allowed"
    if secrets.client_tokens:
        presented = [p[len(KEY_SUBPROTOCOL) :] for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)]
        bearer = _bearer(headers)
        if bearer is not None:
            presented.append(bearer)
        if not _token_ok(presented, secrets.client_tokens):
            return 401, "a valid proxy token is required (Authorization: Bearer or openai-insecure-api-key subprotocol)"
    return None


def upstream_credentials(
    config: Config, secrets: Secrets, headers: CIMultiDictProxy[str], subprotocols: Sequence[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """The headers and subprotocols to send upstream for this client."""
    drop_client_credentials = secrets.upstream_key is not None
    out: list[tuple[str, str]] = []
    for name in FORWARDED_HEADERS:
        lower = name.lower()
        if lower in _CREDENTIAL_HEADERS and drop_client_credentials:
            continue
        if lower == "authorization" and secrets.client_tokens:
            continue  # it carried (or should have carried) a proxy token
        out.extend((name, value) for value in headers.getall(name, ()))
    protocols = list(subprotocols)
    if drop_client_credentials or secrets.client_tokens:
        protocols = [p for p in protocols if not p.startswith(KEY_SUBPROTOCOL)]
    if secrets.upstream_key is not None:
        if config.upstream.auth == "api-key":
            out.append(("api-key", secrets.upstream_key))
        else:
            out.append(("Authorization", f"Bearer {secrets.upstream_key}"))
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
    return warnings
