"""HMAC-SHA256 request signatures, both ways: Retell's webhooks to us, our tool
webhooks to their receivers.

Both schemes sign the raw body with a shared secret and a timestamp, and both
checks need the same three details to be sound:

* **The raw body.** The digest covers the exact bytes sent. Parsing and
  re-serialising changes them (key order, spacing, ``"José"`` vs
  ``"Jos\\u00e9"``), so a check on a re-serialised body refuses genuine requests.
* **Constant time.** ``==`` on strings returns at the first differing
  character, which lets an attacker find a valid digest byte by byte by timing
  the answers; :func:`hmac.compare_digest` takes the same time whatever differs.
* **The replay window.** A captured request stays validly signed forever; the
  signed timestamp limits its replay to ``tolerance_s`` either side of now.

Every function takes ``(secret, body, header)`` in that order.

Retell's scheme (``X-Retell-Signature``)::

    v=<unix ms>,d=<hex HMAC-SHA256(api_key, raw_body + str(v))>

callbrain's scheme for tool webhooks (``X-Callbrain-Signature``), Stripe's
layout, which receivers know::

    t=<unix ms>,v1=<hex HMAC-SHA256(secret, f"{t}." + raw_body)>
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

# As Retell's SDK, but ASCII-only: \d would take other scripts' digits, which int()
# accepts but which Retell never sends. At most 20 digits, so int() cannot fail
# on a huge number (and any longer timestamp is out of the window anyway).
_RETELL = re.compile(r"v=([0-9]{1,20}),d=([0-9a-f]{64})")
_CALLBRAIN = re.compile(r"t=([0-9]{1,20}),v1=([0-9a-f]{64})")


def sign_tool_request(secret: str, body: bytes, timestamp_ms: int | None = None) -> str:
    """The ``X-Callbrain-Signature`` value for ``body`` sent at ``timestamp_ms`` (now)."""
    stamp = _now_ms() if timestamp_ms is None else timestamp_ms
    return f"t={stamp},v1={_digest(secret, f'{stamp}.'.encode(), body)}"


def verify_tool_request(
    secret: str,
    body: bytes,
    header: str | None,
    *,
    tolerance_s: float = 300,
    now_ms: int | None = None,
) -> bool:
    """Whether ``header`` (``X-Callbrain-Signature``) signs ``body`` with ``secret``
    within ``tolerance_s`` of ``now_ms`` (default: the clock). For receivers of
    callbrain's tool webhooks written in Python. Never raises."""
    match = _CALLBRAIN.fullmatch(header.strip()) if isinstance(header, str) else None
    if match is None or not secret:
        return False
    stamp = int(match.group(1))
    if _skew(stamp, now_ms, tolerance_s) is not None:
        return False
    return hmac.compare_digest(_digest(secret, f"{stamp}.".encode(), body), match.group(2))


def retell_refusal(
    secret: str,
    body: bytes | bytearray,
    header: str | None,
    *,
    tolerance_s: float = 300,
    now_ms: int | None = None,
) -> str | None:
    """Why Retell's ``X-Retell-Signature`` ``header`` does not sign ``body`` with the
    webhook key ``secret`` (for the log, never the client), or None if it does."""
    refusal = retell_header_refusal(header, tolerance_s=tolerance_s, now_ms=now_ms)
    if refusal is not None:
        return refusal
    match = _RETELL.fullmatch(header) if isinstance(header, str) else None
    if match is None or not secret or not isinstance(body, bytes | bytearray):
        return "no key or no body to check"  # an empty key would let anyone sign
    # The SDK signs (body_str + str(v)) encoded as UTF-8: the same bytes as these,
    # with str(int) dropping any leading zeros of the header's digits as it does.
    stamp = str(int(match.group(1))).encode()
    if not hmac.compare_digest(_digest(secret, body, stamp), match.group(2)):
        return "signature does not match the body"
    return None


def retell_header_refusal(
    header: str | None, *, tolerance_s: float = 300, now_ms: int | None = None
) -> str | None:
    """What :func:`retell_refusal` can tell from the header alone (missing, malformed,
    outside the replay window), so a request can be refused before its body is read."""
    if header is None:
        return "no X-Retell-Signature header"
    match = _RETELL.fullmatch(header) if isinstance(header, str) else None
    if match is None:
        return "malformed X-Retell-Signature header"
    return _skew(int(match.group(1)), now_ms, tolerance_s)


def verify_retell_webhook(
    secret: str,
    body: bytes | bytearray,
    header: str | None,
    *,
    tolerance_s: float = 300,
    now_ms: int | None = None,
) -> bool:
    """Whether ``header`` (``X-Retell-Signature``) signs ``body`` with the webhook
    key ``secret`` within ``tolerance_s`` of ``now_ms``. Never raises."""
    return retell_refusal(secret, body, header, tolerance_s=tolerance_s, now_ms=now_ms) is None


def _digest(secret: str, *parts: bytes | bytearray) -> str:
    # Part by part: joining them would copy a webhook body of megabytes.
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _skew(stamp_ms: int, now_ms: int | None, tolerance_s: float) -> str | None:
    """Why ``stamp_ms`` is outside the replay window, or None if it is inside
    (exactly the tolerance is inside, as in Retell's SDK)."""
    skew_ms = stamp_ms - (_now_ms() if now_ms is None else now_ms)
    if abs(skew_ms) <= tolerance_s * 1000:
        return None
    side = "ahead" if skew_ms > 0 else "old"
    return f"timestamp {abs(skew_ms) / 1000:.0f} s {side} (window {tolerance_s:g} s)"
