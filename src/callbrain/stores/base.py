"""What a store must do: keep bytes under string keys, each for a limited time."""

from __future__ import annotations

from typing import Protocol


class Store(Protocol):
    """Bytes under string keys; every entry expires ``ttl_s`` after it was written.

    Implementations may raise anything on failure and may hang: callers reach
    a store only through :class:`~callbrain.stores.guard.GuardedStore`, which
    bounds and absorbs both.
    """

    async def get(self, key: str) -> bytes | None:
        """The value, or None if there is none (or it expired)."""

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        """Write ``value``, replacing any earlier one."""

    async def add(self, key: str, value: bytes, *, ttl_s: float) -> bool:
        """Write ``value`` only if the key holds nothing; True if it was written.

        Atomic across everyone sharing the store: this is the lock that keeps
        two instances from running one side effect twice.
        """

    async def delete(self, key: str) -> None:
        """Remove the key, if it is there."""

    async def ping(self) -> None:
        """Raise, with the reason, if the store cannot be reached (checked at start-up)."""

    async def aclose(self) -> None:
        """Release connections."""
