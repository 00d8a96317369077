"""Call actions: hang up, transfer or press digits once a response has been spoken.

Retell attaches them to the frames of a response (``end_call``,
``transfer_number``, ``digit_to_press``) and runs them after that response's
content has played; a caller who barges in first cancels them. Retell runs at
most one per response, and its docs rank them: end call, then transfer, then
digits. :class:`TurnActions` keeps the same order when a turn asks for several
and logs what it dropped.

Values are checked where an action is made, not when its frame is built: a
tool that asks to transfer to ``4155550100`` (an int) fails there, with a
message its author can act on, instead of breaking the turn's final frame
and leaving the caller in silence.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("callbrain.call")

ActionKind = Literal["end_call", "transfer", "press_digit"]
_RANK: dict[ActionKind, int] = {"end_call": 0, "transfer": 1, "press_digit": 2}

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
"""A phone number as Retell transfers to it: ``+`` and 7 to 15 digits."""
DIGITS = re.compile(r"^[0-9*#]{1,32}$")
"""Keypad presses: digits, ``*`` and ``#``."""


@dataclass(frozen=True, slots=True)
class Action:
    """One call action and the line spoken with it (which the action rides on)."""

    kind: ActionKind
    message: str = ""
    """Said before the action runs."""
    default_message: str = ""
    """Said instead when ``message`` is empty and nothing else was said this turn."""
    transfer_number: str | None = None
    show_transferee_as_caller: bool = False
    digits: str | None = None

    def __post_init__(self) -> None:
        for name in ("message", "default_message"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{self.kind}: {name} must be a str, got {type(value).__name__}")
        if self.kind == "transfer":
            number = self.transfer_number
            if not isinstance(number, str) or not E164.match(number):
                raise ValueError(
                    f"transfer: the number must be a str in E.164 form such as "
                    f"'+14155550100', got {type(number).__name__} {number!r}"
                )
        if self.kind == "press_digit" and (
            not isinstance(self.digits, str) or not DIGITS.match(self.digits)
        ):
            raise ValueError(
                f"press_digit: digits must be a str of 1 to 32 keys (0-9, * and #), "
                f"got {type(self.digits).__name__} {self.digits!r}"
            )
        if not isinstance(self.show_transferee_as_caller, bool):
            raise TypeError("transfer: show_transferee_as_caller must be a bool")

    def line(self, *, spoke: bool) -> str:
        """What to say with the action, given whether the turn has spoken already.

        A transfer always says something: Retell staff report transfers lost
        when ``transfer_number`` rode only on a trailing empty frame, so it gets
        a frame with content. Hanging up on an empty frame is documented to work,
        so a goodbye already said is not repeated.
        """
        if self.message or self.kind == "transfer" or not spoke:
            return self.message or self.default_message
        return ""

    def frame_fields(self) -> dict[str, Any]:
        """The fields this action sets on a ``response`` / ``agent_interrupt`` frame."""
        if self.kind == "end_call":
            return {"end_call": True}
        if self.kind == "transfer":
            fields: dict[str, Any] = {"transfer_number": self.transfer_number}
            if self.show_transferee_as_caller:
                fields["show_transferee_as_caller"] = True
            return fields
        return {"digit_to_press": self.digits}


class TurnActions:
    """What one turn asked for, applied when the turn finishes."""

    def __init__(self) -> None:
        self.action: Action | None = None
        self.no_interruption_allowed = False
        self.by_tool: dict[str, str] = {}
        """Which tool call asked for which kind of action (for the call's record)."""

    def request(self, action: Action, *, by: str | None = None) -> None:
        """Ask for ``action`` (``by`` the tool call with that id); of several, the
        highest-ranked one wins."""
        if by is not None:
            self.by_tool[by] = action.kind
        current = self.action
        if current is None or _RANK[action.kind] < _RANK[current.kind]:
            if current is not None:
                logger.warning(
                    "%s overrides %s requested earlier in this turn (Retell runs one action)",
                    action.kind,
                    current.kind,
                )
            self.action = action
        else:
            logger.warning(
                "%s dropped: %s was already requested in this turn (Retell runs one action)",
                action.kind,
                current.kind,
            )
