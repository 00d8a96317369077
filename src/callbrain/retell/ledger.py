"""The ``response_id`` rules of one call, as a small state machine with no I/O.

Retell numbers its requests for an answer (``response_required``,
``reminder_required``) with increasing ids; the begin message is id 0. Three
rules follow, and every frame of an answer must respect them:

* **A newer id supersedes every older one.** Retell will never play an older
  answer once it has asked for a newer one, so from that moment no frame for
  an older id may be sent (not even the ``content_complete`` that would have
  ended it).
* **Only the newest id may speak, and only until it is complete.** After its
  ``content_complete: true`` a response is over.
* **The newest id is owed exactly one** ``content_complete: true``: without it
  the agent falls silent and Retell waits for ever, because it has no
  deadline of its own.

:class:`ResponseLedger` keeps those rules and nothing else, in the style of
the ``websockets`` library's sans-I/O protocol: no asyncio, no socket, no
clock. The session asks it before every send and tells it after; the tests
can drive it directly, through every order of events.
"""

from __future__ import annotations

from dataclasses import dataclass

BEGIN_ID = 0
"""The begin message's response id: Retell's requests all come after it."""


@dataclass(frozen=True, slots=True)
class Superseded:
    """A newer request arrived: ``previous`` can no longer send."""

    previous: int
    was_open: bool
    """Whether ``previous`` had not completed yet (its answer was cut off)."""


class ResponseLedger:
    """Which response may speak, and which one still owes a ``content_complete``."""

    def __init__(self) -> None:
        self._latest = BEGIN_ID
        self._completed = -1

    @property
    def latest(self) -> int:
        """The newest id Retell asked for (0 until its first request)."""
        return self._latest

    def admit(self, response_id: int) -> Superseded | None:
        """Take a new request. Returns what it superseded, or None when it is
        not newer than the latest id (a repeat or an old id: ignore it).

        From this call on, ``may_send`` refuses every older id.
        """
        if response_id <= self._latest:
            return None
        previous = self._latest
        was_open = previous > self._completed
        self._latest = response_id
        return Superseded(previous, was_open)

    def may_send(self, response_id: int) -> bool:
        """Whether a frame for ``response_id`` may go out now: it is the newest
        id and not complete."""
        return response_id == self._latest and response_id > self._completed

    def complete(self, response_id: int) -> None:
        """Record that ``response_id``'s ``content_complete: true`` went out.

        Raises ValueError when it may not send: completing twice, or
        completing a superseded id, is a bug in the caller.
        """
        if not self.may_send(response_id):
            raise ValueError(f"response {response_id} cannot complete: {self.describe()}")
        self._completed = response_id

    def is_complete(self, response_id: int) -> bool:
        return response_id <= self._completed

    @property
    def owed(self) -> int | None:
        """The id that still owes a ``content_complete``, if any."""
        return self._latest if self._latest > self._completed else None

    def describe(self) -> str:
        return f"latest {self._latest}, completed {self._completed}"
