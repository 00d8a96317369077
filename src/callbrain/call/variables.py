"""A call's template variables: where each comes from and which one wins, in one place.

Prompts and the begin message use ``{{name}}`` (see
:func:`~callbrain.call.conversation.render_template`). The values, in
increasing priority:

1. the agent's ``dynamic_variables``: defaults;
2. built-ins, there without anyone passing them: ``call_id``; the call
   object's ``call_type``, ``direction``, ``from_number``, ``to_number`` and
   ``agent_id``; ``caller_number`` (the caller's: ``from_number`` on an inbound
   call, ``to_number`` on an outbound one); and the clock in the agent's
   ``timezone``, computed for every turn (a call can outlast a minute, or
   midnight): ``current_time`` (``Thursday, March 28, 2024 at 11:46 PM GMT``,
   to the minute, as Retell's own agents say it but without the seconds, so a
   prompt that uses it changes once a minute, not at every turn, and a model's
   prompt cache keeps working), ``current_date`` (``2024-03-28``) and
   ``current_weekday`` (``Thursday``);
3. the call's ``retell_llm_dynamic_variables``: what Retell (and whoever
   started the call) passed wins over any built-in of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from callbrain.retell.frames import dynamic_variables

CALL_FIELDS = ("call_id", "call_type", "direction", "from_number", "to_number", "agent_id")
"""Fields of the call object that prompts may use as variables."""
CLOCK = ("current_time", "current_date", "current_weekday")
BUILT_IN = (*CALL_FIELDS, "caller_number", *CLOCK)
"""Every built-in variable's name (for the docs and the tests)."""


def call_variables(
    defaults: Mapping[str, str], call_id: str, call: Mapping[str, Any] | None
) -> dict[str, str]:
    """The variables fixed for the whole call: all but the clock."""
    variables = {**defaults, "call_id": call_id}
    if call is None:
        return variables
    for key in CALL_FIELDS:
        value = call.get(key)
        if isinstance(value, str):
            variables[key] = value
    caller = {"inbound": "from_number", "outbound": "to_number"}.get(str(call.get("direction")))
    number = call.get(caller) if caller else None
    if isinstance(number, str):
        variables["caller_number"] = number
    variables.update(dynamic_variables(dict(call)))
    return variables


def turn_variables(
    variables: Mapping[str, str],
    call: Mapping[str, Any] | None,
    zone: ZoneInfo,
    now: datetime | None = None,
) -> dict[str, str]:
    """``variables`` (from :func:`call_variables`) with the clock for this turn;
    a dynamic variable of the same name keeps its value."""
    passed = dynamic_variables(dict(call)) if call is not None else {}
    clock = clock_variables(zone, now)
    return {**variables, **{k: v for k, v in clock.items() if k not in passed}}


def clock_variables(zone: ZoneInfo, now: datetime | None = None) -> dict[str, str]:
    """``current_time``, ``current_date`` and ``current_weekday`` in ``zone``."""
    local = (now or current_time()).astimezone(zone)
    hour = local.hour % 12 or 12
    return {
        "current_time": (
            f"{local:%A}, {local:%B} {local.day}, {local.year} at "
            f"{hour}:{local:%M} {local:%p} {local.tzname()}"
        ),
        "current_date": local.date().isoformat(),
        "current_weekday": f"{local:%A}",
    }


def current_time() -> datetime:
    """Now, aware (the one place the clock is read)."""
    return datetime.now().astimezone()
