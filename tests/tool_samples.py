"""Sample tools for the tool tests, importable as ``tool_samples:<name>`` the way
agent YAML refers to functions; plus a ToolContext factory."""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from callbrain.call.control import CallControl
from callbrain.retell.frames import OutboundFrame
from callbrain.tools.base import ToolContext
from callbrain.tools.function import tool


class RecordingSink:
    """A FrameSink that keeps what it is sent."""

    def __init__(self) -> None:
        self.frames: list[OutboundFrame] = []

    async def send_frame(self, frame: OutboundFrame) -> bool:
        self.frames.append(frame)
        return True


def make_context(
    *,
    call_id: str = "call-1",
    tool_call_id: str = "tc-1",
    variables: Mapping[str, str] | None = None,
) -> ToolContext:
    variables = dict(variables or {})
    control = CallControl(call_id, RecordingSink(), variables, lambda: None)
    return ToolContext(
        call_id=call_id, tool_call_id=tool_call_id, variables=variables, call=control
    )


class Seating(enum.Enum):
    INSIDE = "inside"
    TERRACE = "terrace"


class Guest(BaseModel):
    name: str
    title: str | None = None  # a property called "title" must survive title stripping


class Category(BaseModel):
    """Recursive: its schema cannot be inlined."""

    label: str
    children: list[Category] = []


def lookup_order(order_id: str, include_items: bool = False) -> dict[str, Any]:
    """Look up an order by its number.

    Use it when the caller asks where their order is.

    Args:
        order_id: The order number the caller reads out.
        include_items: Whether to list what was ordered.
    """
    return {"order_id": order_id, "include_items": include_items}


def whose_thread() -> int:
    """Which thread ran this (sync tools must not run on the event loop's)."""
    return threading.get_ident()


@tool(side_effects=True, timeout_s=5, holding_message="Let me book that.")
async def book_table(
    context: ToolContext,
    day: date,
    party: Annotated[int, Field(ge=1, le=12, description="Guests, 1 to 12.")] = 2,
    seating: Seating = Seating.INSIDE,
    occasion: Literal["birthday", "business"] | None = None,
) -> str:
    """Book a table.

    Args:
        day: The day of the booking.
        party: How many people (the Field description wins over this).
        seating: Where to sit.
    """
    return f"{context.call_id}: {party} on {day.isoformat()} ({seating.value}, {occasion})"


def numpy_style(city: str, days: int = 1) -> str:
    """Forecast the weather.

    Parameters
    ----------
    city : str
        The city name.
    days : int
        How many days ahead.
    """
    return f"{city} {days}"


def rest_style(city: str) -> str:
    """Forecast the weather.

    :param city: The city name.
    """
    return city


def untyped(order_id):  # type: ignore[no-untyped-def]
    """No annotations: cannot become a tool."""
    return order_id


NOT_CALLABLE = 42
