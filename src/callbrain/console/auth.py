"""Who may use the console: a login token, a signed session cookie, and no
request from another site.

* The login form's token is compared in constant time; failed attempts are
  limited per client address (then 429) and logged within the call socket's
  rate limit, never with what was typed.
* A login sets ``callbrain_console``: ``HttpOnly``, ``SameSite=Strict``,
  ``Path=/console``, holding an expiry and a random id signed with HMAC-SHA256
  under a key made for this process (a restart ends every session). Logging
  out revokes that id.
* Requests from another site are refused before anything else: a request that
  changes something (a POST) or opens the playground's socket must carry an
  ``Origin`` of this server (its own ``Host``, or one of ``console.origins``);
  any other request a browser marks as cross-site (``Sec-Fetch-Site``) is
  refused unless it is a plain navigation, which, without the Strict cookie,
  lands on the login page.
* With ``allow_loopback_without_token``, a request from loopback needs no login,
  the client address being the call socket's rule (``X-Forwarded-For`` believed
  from ``trusted_proxies`` only). A loopback peer that is not a trusted proxy
  but forwards for someone (forwarding headers) is a proxy we do not know:
  its requests must log in like anyone else's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from callbrain.console.settings import PATH, ConsoleSettings
from callbrain.server.access import RejectionLimiter

logger = logging.getLogger("callbrain.console")

COOKIE = "callbrain_console"
_FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
_SAFE_METHODS = ("GET", "HEAD")
_MAX_REVOKED = 10_000

ClientAddress = Callable[[str | None, Sequence[str]], IPv4Address | IPv6Address | None]


class ConsoleAuth:
    """Login, sessions and the same-site rule (see the module docstring)."""

    def __init__(
        self,
        settings: ConsoleSettings,
        client_address: ClientAddress,
        *,
        is_trusted_proxy: Callable[[str | None], bool] = lambda _: False,
        rejections_per_minute: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``client_address`` and ``is_trusted_proxy`` are the call socket's rules
        (:class:`~callbrain.server.access.AccessGuard`); ``rejections_per_minute``
        its limit on refusals logged per address."""
        self.settings = settings
        self._client_address = client_address
        self._is_trusted_proxy = is_trusted_proxy
        self._clock = clock
        self.generated_token: str | None = None
        """The token made at start-up when none is set (logged once, by the caller)."""
        if settings.token is not None:
            token = settings.token.get_secret_value()
            if len(token) < 16:
                logger.warning(
                    "server.console.token is short (%d characters); use a long random one, "
                    'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"',
                    len(token),
                )
        else:
            token = self.generated_token = secrets.token_urlsafe(24)
        self._token = token.encode("utf-8", "surrogatepass")
        self._key = secrets.token_bytes(32)
        self._revoked: OrderedDict[str, float] = OrderedDict()
        self._attempts = RejectionLimiter(settings.login_attempts_per_minute)
        self._log_limit = RejectionLimiter(rejections_per_minute)

    # ----------------------------------------------------------------- sessions

    def token_matches(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), self._token)

    def new_session(self) -> str:
        """A cookie value for a fresh login."""
        expires = int(self._clock() + self.settings.session_hours * 3600)
        body = f"{expires}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign(body)}"

    def session_valid(self, value: str | None) -> bool:
        body, signature = _split(value)
        if body is None or not hmac.compare_digest(signature, self._sign(body)):
            return False
        expires, _, session_id = body.partition(".")
        return int(expires) > self._clock() and session_id not in self._revoked

    def revoke(self, value: str | None) -> None:
        """Log out: the session's id is refused from now on, until it would expire."""
        if not self.session_valid(value):
            return
        body, _ = _split(value)
        assert body is not None
        expires, _, session_id = body.partition(".")
        self._revoked[session_id] = float(expires)
        now = self._clock()
        while self._revoked and (
            len(self._revoked) > _MAX_REVOKED or next(iter(self._revoked.values())) < now
        ):
            self._revoked.popitem(last=False)

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def cookie_options(self, connection: HTTPConnection) -> dict[str, object]:
        secure = self.settings.secure_cookie
        if secure is None:
            secure = connection.url.scheme in ("https", "wss")
        return {
            "httponly": True,
            "samesite": "strict",
            "path": PATH,
            "secure": secure,
            "max_age": int(self.settings.session_hours * 3600),
        }

    # -------------------------------------------------------------- who is it

    def client(self, connection: HTTPConnection) -> str:
        """The client address that counts, as text for the logs and the limits."""
        peer = connection.client.host if connection.client is not None else None
        address = self._client_address(peer, connection.headers.getlist("x-forwarded-for"))
        return str(address) if address is not None else f"? {peer}"

    def signed_in(self, connection: HTTPConnection) -> bool:
        """A valid session cookie, or loopback when that is allowed."""
        if self.session_valid(connection.cookies.get(COOKIE)):
            return True
        return self.settings.allow_loopback_without_token and self._from_loopback(connection)

    def _from_loopback(self, connection: HTTPConnection) -> bool:
        peer = connection.client.host if connection.client is not None else None
        forwarded = any(name in connection.headers for name in _FORWARDING_HEADERS)
        if forwarded and not self._is_trusted_proxy(peer):
            return False  # a proxy on this host that nobody listed: its clients are strangers
        address = self._client_address(peer, connection.headers.getlist("x-forwarded-for"))
        return address is not None and address.is_loopback

    def may_try_login(self, connection: HTTPConnection) -> bool:
        """False once this address has failed too often this minute."""
        limit = self.settings.login_attempts_per_minute
        return self._attempts.count(self.client(connection)) < limit

    def login_failed(self, connection: HTTPConnection) -> None:
        self._attempts.hit(self.client(connection))
        self.log_refusal(connection, "a failed login")

    def log_refusal(self, connection: HTTPConnection, what: str) -> None:
        """One warning per refusal, within the call socket's per-address rate limit."""
        who = self.client(connection)
        if self._log_limit.hit(who) == "log":
            logger.warning("console: refused %s from %s", what, who)

    # ------------------------------------------------------------- same site

    def same_site(self, connection: HTTPConnection) -> bool:
        """Whether the request may be from this console's own pages (see the
        module docstring); a WebSocket counts as a request that changes things."""
        method = connection.scope.get("method", "WEBSOCKET")
        origin = connection.headers.get("origin")
        if method not in _SAFE_METHODS:
            return origin is not None and self._origin_allowed(origin, connection)
        if origin is not None and not self._origin_allowed(origin, connection):
            return False
        site = connection.headers.get("sec-fetch-site")
        if site in (None, "same-origin", "none"):
            return True
        return connection.headers.get("sec-fetch-mode") == "navigate"

    def _origin_allowed(self, origin: str, connection: HTTPConnection) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.settings.origins:
            return True
        host = connection.headers.get("host", "").strip().lower()
        parts = urlsplit(origin)
        # The scheme is not compared: a proxy terminating TLS serves https for our http.
        return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host


def _split(value: str | None) -> tuple[str | None, str]:
    """A cookie's signed part and its signature (None if it is not one of ours)."""
    if not value or value.count(".") != 2:
        return None, ""
    body, _, signature = value.rpartition(".")
    expires = body.partition(".")[0]
    if not expires.isdigit() or len(expires) > 12:
        return None, ""
    return body, signature
