"""The example clinic's tools: look up free times and book one.

The calendar is a dictionary in this process, so the example runs with nothing
else installed; a real agent would call its practice-management system here
(or declare an ``http`` tool for it). Everything else is as in production:
typed arguments the model must respect, errors written for the model, and a
booking marked ``side_effects`` so a caller who talks over the agent, or a
model that repeats itself, never books twice.
"""

from __future__ import annotations

import threading
from typing import Annotated, Literal

from pydantic import Field

from callbrain.tools import ToolError, tool

Day = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]
Time = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="HH:MM, 24h")]

_WEEKDAY_SLOTS = ("09:00", "10:30", "13:00", "15:30", "17:00")
_SATURDAY_SLOTS = ("09:00", "10:30")

_lock = threading.Lock()  # sync tools run in worker threads
_booked: dict[tuple[str, str], str] = {}


def _slots(day: str) -> tuple[str, ...]:
    return _SATURDAY_SLOTS if day == "saturday" else _WEEKDAY_SLOTS


@tool(holding_message="Let me check the calendar.")
def check_availability(day: Day) -> str:
    """List the free appointment times on a day of the coming week.

    Args:
        day: The day the caller asked about. The clinic is closed on Sundays.
    """
    with _lock:
        free = [time for time in _slots(day) if (day, time) not in _booked]
    if not free:
        return f"Nothing is free on {day.capitalize()}."
    return f"Free on {day.capitalize()}: {', '.join(free)}."


@tool(side_effects=True, holding_message="Let me book that for you.")
def book_appointment(patient_name: str, day: Day, time: Time, reason: str = "") -> str:
    """Book an appointment. Only call it once the caller has confirmed the day and time.

    Args:
        patient_name: The caller's full name.
        day: The day of the appointment.
        time: A free time on that day, as returned by check_availability.
        reason: Why they are coming in, in a few words.
    """
    if time not in _slots(day):
        raise ToolError(f"{time} is not an appointment time on {day}; check availability first.")
    with _lock:
        holder = _booked.get((day, time))
        if holder is not None:
            raise ToolError(f"{day.capitalize()} at {time} was just taken; offer another time.")
        _booked[(day, time)] = patient_name
    note = f" for {reason}" if reason else ""
    return f"Booked {patient_name} on {day.capitalize()} at {time}{note}."
