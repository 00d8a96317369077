"""The life of one call's socket as one explicit state, with checked transitions.

::

    CONNECTING --> OPEN --> DRAINING --> CLOSED
         |          |                      ^
         +----------+----------------------+

* ``CONNECTING``: accepted; the memory is being restored and ``config`` sent.
* ``OPEN``: serving frames and turns.
* ``DRAINING``: the server is shutting down: the open turn may finish, and a
  new request is completed empty (Retell asks again after it reconnects).
* ``CLOSED``: the socket is gone or closing; nothing more is sent.

Any state may go to ``CLOSED`` (the peer can vanish at any moment); nothing
comes back from it. An illegal transition is a bug and raises.
"""

from __future__ import annotations

import enum


class CallState(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


_NEXT: dict[CallState, frozenset[CallState]] = {
    CallState.CONNECTING: frozenset({CallState.OPEN, CallState.DRAINING, CallState.CLOSED}),
    CallState.OPEN: frozenset({CallState.DRAINING, CallState.CLOSED}),
    CallState.DRAINING: frozenset({CallState.CLOSED}),
    CallState.CLOSED: frozenset(),
}


class Lifecycle:
    """Holds a :class:`CallState` and refuses transitions the diagram does not have."""

    def __init__(self) -> None:
        self.state = CallState.CONNECTING

    def to(self, state: CallState) -> None:
        """Move to ``state``; moving to the state it is already in does nothing."""
        if state is self.state:
            return
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"call state {self.state.value} cannot become {state.value}")
        self.state = state

    @property
    def closed(self) -> bool:
        return self.state is CallState.CLOSED

    @property
    def draining(self) -> bool:
        return self.state is CallState.DRAINING
