"""Who may open the call socket, decided before it is accepted, and the cut that
keeps an admitted call's transcript within its limit.

Retell sends no credentials on this socket (protocol reference, section 5), so
the defences are a secret in the URL and Retell's published address. Both are
checked before ``websocket.accept()``: a refused client gets a bare HTTP 403 to
its handshake and never a frame. A missing secret, a wrong one, an address not
allowed, a full server and a draining one all get the same 403, so probing
learns nothing; only the log line says which it was. A path where no call socket
is served (a URL without the prefix, an agent name that does not exist) is
answered 404 instead, so whoever set the URL can tell a wrong path from a
refused secret; that says nothing about the secret.

Refusals are logged without the secret or whatever was presented in its place,
at most ``rejections_per_minute`` per client address (then one line saying the
rest are suppressed), so a scanner cannot flood the logs. uvicorn's own lines
would print the URL verbatim, secret included, so a filter on its logger
rewrites them the same way (see :mod:`callbrain.logs`).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Literal
from urllib.parse import parse_qsl, quote, quote_plus

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from callbrain.call.record import RefusedSocket
from callbrain.logs import REDACTED, HandshakeLine, handshake_line_var, redact_secret
from callbrain.server.settings import AccessSettings

logger = logging.getLogger("callbrain.server.access")

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

SECRET_PARAM = "secret"
"""The path parameter of the ``{prefix}/{secret}/{call_id}`` route."""
TOKEN_PARAM = "token"
"""The query parameter that may carry the secret instead."""
MAX_TRACKED_ADDRESSES = 10_000

# Before accept, Starlette's close becomes an HTTP 403 whatever the code: no close
# frame is sent. 1008 (policy violation) only documents the intent.
_CLOSE_REFUSED = 1008
_WINDOW_S = 60.0
_MAX_SHOWN_PATH = 300
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


# ----------------------------------------------------------------- rate limit

Verdict = Literal["log", "suppress", "quiet"]
"""What to do with one refusal: log it, log that further ones are suppressed, or stay quiet."""


@dataclass(slots=True)
class _Window:
    start: float
    count: int = 0


class RejectionLimiter:
    """How many refusals per client address are logged: ``per_minute`` in each
    fixed one-minute window, then one "suppressed" line, then none until the
    window is over.

    At most ``max_addresses`` addresses are tracked, the least recently refused
    dropped first, so refusals from ever new addresses cannot grow memory; an
    address dropped early merely starts a fresh window.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, key: str) -> Verdict:
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= _WINDOW_S:
            window = _Window(now)
            self._windows[key] = window
        self._windows.move_to_end(key)
        window.count += 1
        # Least recently refused first: drop what is over the cap or has expired anyway.
        while self._windows:
            oldest = next(iter(self._windows.values()))
            if len(self._windows) <= self.max_addresses and now - oldest.start < _WINDOW_S:
                break
            self._windows.popitem(last=False)
        if window.count <= self.per_minute:
            return "log"
        return "suppress" if window.count == self.per_minute + 1 else "quiet"

    def count(self, key: str) -> int:
        """Refusals of ``key`` in its current window (0 when it has none)."""
        window = self._windows.get(key)
        if window is None or self._clock() - window.start >= _WINDOW_S:
            return 0
        return window.count


# ------------------------------------------------------------------ addresses


def parse_address(text: str) -> IPAddress | None:
    """An address as a socket peer or an ``X-Forwarded-For`` entry gives it (IPv4
    with an optional port, IPv6 optionally in brackets with a port); None if it
    is not one. IPv4-mapped IPv6, a dual-stack listener's view of an IPv4 peer,
    becomes IPv4 so that ``100.20.5.228/32`` still matches it."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, networks: Sequence[Network]) -> bool:
    # A network of the other IP version simply does not contain the address.
    return any(address in network for network in networks)


# ---------------------------------------------------------------------- guard


class AccessGuard:
    """Admits or refuses each call socket before it is accepted (see the module doc)."""

    def __init__(
        self,
        settings: AccessSettings,
        *,
        on_refusal: Callable[[RefusedSocket], None] | None = None,
    ) -> None:
        """``on_refusal`` is told why each socket was refused (for the metrics)."""
        self.settings = settings
        self._on_refusal = on_refusal
        # Never empty: the settings refuse that (an unset ${VAR:-} must not quietly
        # turn into "any empty ?token= will do").
        secret = None if settings.secret is None else settings.secret.get_secret_value()
        self._secret = None if secret is None else secret.encode("utf-8", "surrogatepass")
        self.limiter = RejectionLimiter(settings.rejections_per_minute)
        if secret is not None:
            _check_secret(secret)
            for form in (secret, quote(secret, safe=""), quote_plus(secret)):
                redact_secret(form)

    @property
    def has_secret(self) -> bool:
        return self._secret is not None

    def secret_matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is the secret (always True when none is set),
        compared in constant time so its bytes cannot be guessed one by one."""
        if self._secret is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), self._secret)

    def client_address(self, peer: str | None, forwarded_for: Sequence[str]) -> IPAddress | None:
        """The caller's address: the socket peer, unless the peer is a trusted proxy
        and sent ``X-Forwarded-For``; then the right-most entry that is not itself
        a trusted proxy (the entries to its left are the client's own say, and
        could be anything). None when the address that counts is not an address."""
        address = None if peer is None else parse_address(peer)
        proxies = self.settings.trusted_proxies
        if address is None or not proxies or not _within(address, proxies):
            return address
        hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None or not _within(address, proxies):
                return address
        return address  # every hop is a trusted proxy: the left-most one called

    def is_trusted_proxy(self, peer: str | None) -> bool:
        """Whether ``peer`` (a socket peer's address) is one of ``trusted_proxies``."""
        address = None if peer is None else parse_address(peer)
        return address is not None and _within(address, self.settings.trusted_proxies)

    async def admit(self, websocket: WebSocket, *, active_calls: int) -> bool:
        """True to go on and accept. Otherwise the handshake has been refused (HTTP
        403, no frame) and logged, within the rate limit, without the secret."""
        peer = websocket.client.host if websocket.client is not None else None
        forwarded = websocket.headers.getlist("x-forwarded-for")
        address = self.client_address(peer, forwarded)
        presented = websocket.path_params.get(SECRET_PARAM)
        if presented is None:
            presented = websocket.query_params.get(TOKEN_PARAM)
        refusal = self._refusal(address, presented, active_calls)
        if refusal is None:
            if self._secret is not None:
                handshake_line_var.set(HandshakeLine(self._shown_path(websocket), quiet=False))
            return True
        await self.refuse(websocket, *refusal)
        return False

    async def refuse(
        self, websocket: WebSocket, kind: RefusedSocket, reason: str, *, not_found: bool = False
    ) -> None:
        """Refuse the handshake (HTTP 403, or 404 with ``not_found``), counted as
        ``kind`` and logged with ``reason`` within the rate limit, without the secret."""
        if self._on_refusal is not None:
            self._on_refusal(kind)
        peer = websocket.client.host if websocket.client is not None else None
        address = self.client_address(peer, websocket.headers.getlist("x-forwarded-for"))
        who = "an unparsable address" if address is None else str(address)
        if peer is None or address != parse_address(peer):
            who += f" (via {peer})"  # taken from X-Forwarded-For, or no usable peer
        verdict = self.limiter.hit(str(address) if address is not None else f"? {peer}")
        shown = self._shown_path(websocket, only_first=not_found)
        handshake_line_var.set(HandshakeLine(shown, quiet=verdict != "log"))
        if verdict == "log":
            logger.warning("refused a call socket from %s to %s: %s", who, shown, reason)
        elif verdict == "suppress":
            logger.warning(
                "refused %d call sockets from %s this minute (rejections_per_minute); "
                "its further refusals this minute are not logged",
                self.limiter.per_minute + 1,
                who,
            )
        if not_found and "websocket.http.response" in websocket.scope.get("extensions", {}):
            answer = "No call socket at this path.\n" if verdict == "log" else ""
            await websocket.send_denial_response(PlainTextResponse(answer, status_code=404))
        else:
            await websocket.close(_CLOSE_REFUSED)

    def _refusal(
        self, address: IPAddress | None, presented: str | None, calls: int
    ) -> tuple[RefusedSocket, str] | None:
        """Why to refuse: the kind (for the metrics) and the log line's words."""
        allowed = self.settings.allow_ips
        if allowed and (address is None or not _within(address, allowed)):
            return "address", "address not in allow_ips"
        if not self.secret_matches(presented):
            return "secret", "no secret given" if presented is None else "wrong secret"
        if self.full(calls):
            limit = self.settings.max_calls
            return "max_calls", f"too many calls ({calls} in progress, max_calls is {limit})"
        return None

    def full(self, active_calls: int) -> bool:
        """Whether ``max_calls`` calls are in progress already (the console's
        playground calls count and are refused too)."""
        limit = self.settings.max_calls
        return limit is not None and active_calls >= limit

    def _shown_path(self, websocket: WebSocket, *, only_first: bool = False) -> str:
        """The request path as logs may show it: the secret segment, the token and
        anything equal to the secret replaced, the rest percent-encoded (so a
        newline in a path cannot forge a log line), and cut short if very long.
        With ``only_first`` (a path that matched no route, so where a secret
        might be is unknown) every segment after the first is replaced too."""
        segments = str(websocket.scope.get("path", "")).split("/")
        secret_at = len(segments) - 2 if SECRET_PARAM in websocket.path_params else -1
        shown = "/".join(
            REDACTED if i == secret_at or (only_first and i > 1) or self._is_secret(s) else quote(s)
            for i, s in enumerate(segments)
        )
        query = websocket.scope.get("query_string", b"").decode("latin-1")
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            shown += "?" + "&".join(
                f"{quote(k)}={REDACTED if self._hides(k, v, only_first) else quote(v)}"
                for k, v in pairs
            )
        return shown if len(shown) <= _MAX_SHOWN_PATH else shown[:_MAX_SHOWN_PATH] + "..."

    def _hides(self, key: str, value: str, everything: bool) -> bool:
        return everything or key == TOKEN_PARAM or self._is_secret(value)

    def _is_secret(self, text: str) -> bool:
        return self._secret is not None and self.secret_matches(text)


def _check_secret(secret: str) -> None:
    if len(secret) < 16:
        logger.warning(
            "server.access.secret is short (%d characters); use a long random one, "
            'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"',
            len(secret),
        )
    if not _URL_SAFE.fullmatch(secret):
        logger.warning(
            "server.access.secret has characters that must be percent-encoded in a URL "
            "('/' cannot be in a path segment at all); a URL-safe one avoids surprises"
        )
