"""Tools the model can call: Python functions, HTTP webhooks and call control.

Declare them in the agent file (see :mod:`callbrain.tools.config`) or in Python
with :func:`tool`::

    from callbrain.tools import ToolContext, ToolError, tool

    @tool(side_effects=True, holding_message="Let me book that for you.")
    async def book_appointment(patient_name: str, day: date, time: str) -> str:
        '''Book an appointment.

        Args:
            patient_name: The caller's full name.
            day: The day of the appointment.
            time: The time, as HH:MM.
        '''
        ...

The execution rules (parallel runs, timeouts, idempotency, Retell's bookkeeping
frames) are in :mod:`callbrain.tools.runner`.
"""

from __future__ import annotations

from callbrain.tools.arguments import ArgumentsError, parse_arguments
from callbrain.tools.base import Tool, ToolContext, ToolError
from callbrain.tools.builtin import EndCallTool, PressDigitTool, TransferCallTool
from callbrain.tools.config import ToolConfig, build_tool, build_tools
from callbrain.tools.function import FunctionTool, tool
from callbrain.tools.http import HttpTool
from callbrain.tools.idempotency import ResultStore, StoredResult, idempotency_key
from callbrain.tools.runner import Toolbox, ToolRun, ToolRunner

__all__ = [
    "ArgumentsError",
    "EndCallTool",
    "FunctionTool",
    "HttpTool",
    "PressDigitTool",
    "ResultStore",
    "StoredResult",
    "Tool",
    "ToolConfig",
    "ToolContext",
    "ToolError",
    "ToolRun",
    "ToolRunner",
    "Toolbox",
    "TransferCallTool",
    "build_tool",
    "build_tools",
    "idempotency_key",
    "parse_arguments",
    "tool",
]
