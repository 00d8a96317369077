"""Run a side-effecting tool once per call and arguments, whatever Retell does.

Retell asks for a response as soon as the caller *sounds* finished and throws
it away if they go on talking, so one caller request can reach the model two or
three times; the model may also repeat itself, and a dropped socket replays the
turn. A booking tool must not book twice. Retell's docs say the only real fix
is an idempotency key made from the call id and the tool's arguments, so that is
what :func:`idempotency_key` builds; a repeat gets the stored result.

Results live in the server's store (:mod:`callbrain.stores`), in this process
or in Redis, so a reconnect that lands on another instance finds them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from callbrain.stores.guard import GuardedStore

_RESULT = "result:"


@dataclass(frozen=True, slots=True)
class StoredResult:
    """The outcome of a side-effecting tool's one real run."""

    content: str
    successful: bool

    def to_json(self) -> bytes:
        return orjson.dumps({"content": self.content, "successful": self.successful})

    @classmethod
    def from_json(cls, data: bytes) -> StoredResult:
        raw = orjson.loads(data)
        return cls(content=str(raw["content"]), successful=bool(raw["successful"]))


def idempotency_key(call_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """``call_id:tool:sha256(arguments)``, the same for the same arguments in any key order."""
    canonical = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS, default=str)
    return f"{call_id}:{tool}:{hashlib.sha256(canonical).hexdigest()}"


class ResultStore:
    """Side-effecting tools' results by :func:`idempotency_key`, in the guarded store.

    A failing store answers "nothing stored" and "not written" (see
    :mod:`callbrain.stores.guard`); the runner still has the call's own history.
    """

    def __init__(self, store: GuardedStore) -> None:
        self.store = store

    async def get(self, key: str) -> StoredResult | None:
        data = await self.store.get(_RESULT + key)
        if data is None:
            return None
        try:
            return StoredResult.from_json(data)
        except (ValueError, KeyError, TypeError):
            return None  # written by something else under our prefix: not ours to trust

    async def put(self, key: str, result: StoredResult) -> bool:
        return await self.store.set(_RESULT + key, result.to_json())
