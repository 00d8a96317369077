"""The call-control tools every phone agent needs: hang up, transfer, press digits.

Each one asks the turn for a Retell action (see :mod:`callbrain.call.control`);
the action then rides on the turn's final frame, together with the line the
agent speaks first. They are *instant* (no holding line) and the model may give
the line itself through the optional ``message`` argument; otherwise the
configured line is spoken, but only if the agent has not already said something
in this turn (it usually has: "Let me transfer you").
"""

from __future__ import annotations

from typing import Any

from callbrain.retell.actions import DIGITS, Action
from callbrain.tools.base import Tool, ToolContext

_MESSAGE = {
    "type": "string",
    "description": "Optional. The short sentence to say first, unless you have already said it.",
}


def _message(arguments: dict[str, Any]) -> str:
    value = arguments.get("message")
    return value.strip() if isinstance(value, str) else ""


class _ActionTool(Tool):
    """A built-in that asks the turn for one Retell action, said with a line."""

    def __init__(
        self,
        *,
        name: str,
        description: str,
        message: str,
        properties: dict[str, Any] | None = None,
        required: tuple[str, ...] = (),
    ) -> None:
        parameters: dict[str, Any] = {
            "type": "object",
            "properties": {**(properties or {}), "message": _MESSAGE},
        }
        if required:
            parameters["required"] = list(required)
        super().__init__(name=name, description=description, parameters=parameters, instant=True)
        self.message = message
        """The line said with the action when the model gives none (see ``Action.line``)."""


class EndCallTool(_ActionTool):
    """Hang up after a goodbye."""

    def __init__(
        self,
        *,
        name: str = "end_call",
        description: str = (
            "End the call. Use it once the caller's needs are met and they have said goodbye, "
            "or they ask to hang up."
        ),
        message: str = "Thanks for calling. Goodbye!",
    ) -> None:
        super().__init__(name=name, description=description, message=message)

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        context.request_action(
            Action("end_call", message=_message(arguments), default_message=self.message)
        )
        return "The call will end after your goodbye."


class TransferCallTool(_ActionTool):
    """Cold-transfer the caller to a fixed number."""

    def __init__(
        self,
        *,
        number: str,
        name: str = "transfer_call",
        description: str = "Transfer the caller to a human colleague.",
        message: str = "Let me transfer you now.",
        show_transferee_as_caller: bool = False,
        no_interruption_allowed: bool = True,
    ) -> None:
        super().__init__(name=name, description=description, message=message)
        self.number = number
        self.show_transferee_as_caller = show_transferee_as_caller
        self.no_interruption_allowed = no_interruption_allowed
        """A barge-in drops a pending transfer, so by default the short line before
        it cannot be interrupted (Retell's advice for transfers)."""

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        context.request_action(
            Action(
                "transfer",
                message=_message(arguments),
                default_message=self.message,
                transfer_number=self.number,
                show_transferee_as_caller=self.show_transferee_as_caller,
            )
        )
        if self.no_interruption_allowed:
            context.no_interruption()
        return "The caller will be transferred after your last sentence."


class PressDigitTool(_ActionTool):
    """Send DTMF tones, for example to get through another company's phone menu."""

    def __init__(
        self,
        *,
        name: str = "press_digit",
        description: str = (
            "Press keys on the phone keypad (DTMF), for example to choose an option in a "
            "phone menu."
        ),
        message: str = "",
    ) -> None:
        digits = {
            "type": "string",
            "pattern": DIGITS.pattern,
            "description": "The keys to press, in order: digits, * or #.",
        }
        super().__init__(
            name=name,
            description=description,
            message=message,
            properties={"digits": digits},
            required=("digits",),
        )

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        digits = str(arguments["digits"])
        context.request_action(
            Action(
                "press_digit",
                message=_message(arguments),
                default_message=self.message,
                digits=digits,
            )
        )
        return f"The keys {digits} will be pressed after your last sentence."
