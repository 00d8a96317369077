"""Pizzeria Roma's tools: an order per call, and the kitchen it goes to.

The orders live in this process, so the example needs nothing else; a real
pizzeria would call its till here. ``callbrain`` reads each tool's arguments
from the type hints and the docstring, and injects the ``ToolContext``.
"""

from typing import Literal

from callbrain.tools import ToolContext, ToolError, tool

PRICES = {"margherita": 9, "marinara": 8, "diavola": 11, "quattro formaggi": 12}
SIZES = {"small": 0.8, "medium": 1.0, "large": 1.3}
Pizza = Literal["margherita", "marinara", "diavola", "quattro formaggi"]
Size = Literal["small", "medium", "large"]

orders: dict[str, dict[tuple[str, str], int]] = {}  # call id -> (pizza, size) -> quantity
placed: list[str] = []  # what the kitchen received


@tool(instant=True)
def add_to_order(
    context: ToolContext, pizza: Pizza, size: Size = "medium", quantity: int = 1
) -> str:
    """Put pizzas on the caller's order; asking again for the same pizza and size
    sets its quantity rather than adding more.

    Args:
        pizza: The pizza, from the menu.
        size: Its size.
        quantity: How many of this pizza in this size.
    """
    if quantity < 1:
        raise ToolError("The quantity must be at least 1.")  # the model reads this
    order = orders.setdefault(context.call_id, {})
    order[(pizza, size)] = quantity
    return f"The order is now: {describe(order)}; total {total(order):.2f} euros."


@tool(holding_message="Sending it to the kitchen.")
def place_order(context: ToolContext, name: str) -> str:
    """Send the order to the kitchen, once the caller has confirmed it.

    Args:
        name: The caller's name, for the pickup.
    """
    order = orders.get(context.call_id)
    if not order:
        raise ToolError("The order is empty: add pizzas first.")
    placed.append(f"{name}: {describe(order)}")
    return f"Placed for {name}: {describe(order)}, {total(order):.2f} euros, ready in 20 minutes."


def describe(order: dict[tuple[str, str], int]) -> str:
    return ", ".join(f"{n} {size} {pizza}" for (pizza, size), n in order.items())


def total(order: dict[tuple[str, str], int]) -> float:
    return sum(PRICES[pizza] * SIZES[size] * n for (pizza, size), n in order.items())
