"""``GET /metrics``: the app's registry in the Prometheus text format, for those allowed.

A scrape is served to an address in ``server.metrics.allow_ips`` (loopback by
default) or to a request carrying ``Authorization: Bearer <token>`` with the
configured token. The client address is the call socket's rule
(:meth:`~callbrain.server.access.AccessGuard.client_address`: the peer, or
``X-Forwarded-For`` from a trusted proxy), so a proxy cannot make the world
look like loopback. Others get 401 when a token would do, 403 otherwise, with
an empty body; refusals are logged, at most ``rejections_per_minute`` per
address, and never with what was presented as a token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from callbrain.observe.settings import MetricsSettings
from callbrain.server.access import RejectionLimiter

logger = logging.getLogger("callbrain.observe")

PATH = "/metrics"

ClientAddress = Callable[[str | None, Sequence[str]], IPv4Address | IPv6Address | None]
"""``(peer, X-Forwarded-For values)`` to the address that counts."""


def metrics_route(
    settings: MetricsSettings,
    registry: CollectorRegistry,
    client_address: ClientAddress,
    *,
    rejections_per_minute: int = 30,
) -> Route:
    """The ``GET /metrics`` route serving ``registry`` (see the module docstring)."""
    token = settings.token.get_secret_value().encode() if settings.token is not None else None
    limiter = RejectionLimiter(rejections_per_minute)

    def allowed(request: Request) -> tuple[bool, str]:
        peer = request.client.host if request.client is not None else None
        address = client_address(peer, request.headers.getlist("x-forwarded-for"))
        if address is not None and any(address in net for net in settings.allow_ips):
            return True, str(address)
        who = str(address) if address is not None else f"? {peer}"
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if token is not None and scheme.lower() == "bearer" and presented:
            return hmac.compare_digest(presented.strip().encode(), token), who
        return False, who

    async def metrics(request: Request) -> Response:
        ok, who = allowed(request)
        if ok:
            # The format the scraper asks for: OpenMetrics for Prometheus, else plain text.
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encode(registry), headers={"Content-Type": content_type})
        if limiter.hit(who) == "log":
            logger.warning(
                "refused a /metrics scrape from %s: %s",
                who,
                "no valid token" if token is not None else "address not in metrics.allow_ips",
            )
        if token is not None:
            return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(status_code=403)

    return Route(PATH, metrics, methods=["GET"])
