"""Call control: what tools and application code can make Retell do on a live call.

Two scopes, because Retell attaches actions to different frames:

* **This turn** (:class:`~callbrain.retell.actions.TurnActions`, reached
  through a tool's :class:`~callbrain.tools.ToolContext`): hang up, transfer
  or press digits *after* the turn's content has been spoken, and mark the
  rest of the turn uninterruptible. These ride on a ``response`` frame of the
  turn that asked, so a caller who barges in cancels them, as Retell intends.
* **The whole call** (:class:`CallControl`, here): speak unprompted
  (``agent_interrupt``, e.g. when a background job finishes), change
  turn-taking settings (``update_agent``) and send ``metadata`` to a web
  frontend. These are frames of their own and work from any task, any time
  while the call is connected.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from callbrain.retell.actions import Action
from callbrain.retell.frames import (
    AgentConfigUpdate,
    AgentInterruptFrame,
    MetadataFrame,
    OutboundFrame,
    UpdateAgentFrame,
)

logger = logging.getLogger("callbrain.call")


class FrameSink(Protocol):
    """How :class:`CallControl` reaches the socket (the session implements it)."""

    async def send_frame(self, frame: OutboundFrame) -> bool:
        """Send ``frame`` if the call is still connected; True if it went out."""


class CallControl:
    """A handle on one live call, safe to keep and use from background tasks.

    Every method returns False (and logs) instead of raising once the call has
    hung up, so a late background job cannot crash anything.
    """

    def __init__(
        self,
        call_id: str,
        sink: FrameSink,
        variables: Mapping[str, str],
        call: Callable[[], Mapping[str, Any] | None],
    ) -> None:
        self.call_id = call_id
        self._sink = sink
        self._variables = variables
        self._call = call
        self.interrupt_id = 0
        """The last ``agent_interrupt`` id used (restored after a reconnect)."""
        self.overrides: dict[str, Any] = {}
        """The ``update_agent`` settings sent so far (restored after a reconnect)."""
        self.on_change: Callable[[], None] | None = None
        """Called after either of the above changes, to save the call's memory."""

    @property
    def variables(self) -> Mapping[str, str]:
        """The call's template variables (agent defaults, call fields, dynamic variables)."""
        return self._variables

    @property
    def details(self) -> Mapping[str, Any] | None:
        """The ``call`` object from ``call_details``, once it has arrived."""
        return self._call()

    async def interrupt(
        self,
        text: str,
        *,
        no_interruption_allowed: bool = True,
        action: Action | None = None,
    ) -> bool:
        """Speak ``text`` now, unprompted (``agent_interrupt``).

        It cuts off whoever is speaking, so it is uninterruptible by default, as
        Retell recommends; otherwise a caller mid-sentence talks over it. Each
        call uses a new ``interrupt_id``, which discards an earlier interrupt
        still playing. ``action`` (hang up, transfer, digits) runs after it.
        """
        self.interrupt_id += 1
        self._changed()
        fields = action.frame_fields() if action else {}
        fields.pop("show_transferee_as_caller", None)  # not defined for agent_interrupt
        frame = AgentInterruptFrame(
            interrupt_id=self.interrupt_id,
            content=text,
            content_complete=True,
            no_interruption_allowed=no_interruption_allowed or None,
            **fields,
        )
        return await self._send(frame)

    async def update_agent(
        self,
        *,
        responsiveness: float | None = None,
        interruption_sensitivity: float | None = None,
        reminder_trigger_ms: float | None = None,
        reminder_max_count: int | None = None,
    ) -> bool:
        """Change Retell's turn-taking for the rest of the call (``update_agent``).

        Values are checked before sending: responsiveness and sensitivity in
        [0, 1], a positive reminder delay, a non-negative reminder count.
        """
        update = AgentConfigUpdate(
            responsiveness=responsiveness,
            interruption_sensitivity=interruption_sensitivity,
            reminder_trigger_ms=reminder_trigger_ms,
            reminder_max_count=reminder_max_count,
        )
        settings = update.model_dump(exclude_none=True)
        if not settings:
            raise ValueError("update_agent needs at least one setting")
        sent = await self._send(UpdateAgentFrame(agent_config=update))
        if sent:
            self.overrides.update(settings)
            self._changed()
        return sent

    async def resend_overrides(self) -> bool:
        """Send the ``update_agent`` settings of earlier sockets again: a
        reconnected socket starts from the agent's own settings on Retell's side."""
        if not self.overrides:
            return True
        update = AgentConfigUpdate.model_validate(self.overrides)
        return await self._send(UpdateAgentFrame(agent_config=update))

    async def send_metadata(self, metadata: Mapping[str, Any]) -> bool:
        """Forward ``metadata`` to a web call's frontend (its "metadata" event)."""
        return await self._send(MetadataFrame(metadata=dict(metadata)))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _send(self, frame: OutboundFrame) -> bool:
        sent = await self._sink.send_frame(frame)
        if not sent:
            logger.info("%s not sent: the call is no longer connected", frame.response_type)
        return sent


CallHook = Callable[[CallControl], Awaitable[None]]
"""Application code run when a call starts, with the call's :class:`CallControl`."""
