"""The web console at ``/console/``: recent and live calls, one call's timeline
and waterfall, and a playground to talk to an agent by typing.

* :mod:`.settings`: the ``server.console`` setting;
* :mod:`.auth`: the login token, the session cookie, the same-site rule;
* :mod:`.live`: the call observer that feeds the live views (server-sent events);
* :mod:`.views`: a recorded call as the call page draws it;
* :mod:`.web` and :mod:`.pages`: the routes, mounted by ``create_app``;
* ``templates/`` and ``static/``: the pages and their scripts, shipped in the
  package (no build step, nothing loaded from elsewhere). ``static/retell.js``
  plays Retell's side of a call in the browser, ``static/checker.js`` checks it
  with the Python protocol checker's rules.

Nothing here is imported unless the console is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from callbrain.call.control import CallHook
    from callbrain.console.web import WebConsole
    from callbrain.server.runtime import AgentRuntime
    from callbrain.server.settings import ServerSettings

__all__ = ["ConsoleAgent", "open_console"]


@dataclass
class ConsoleAgent:
    """An agent the console can show and talk to."""

    name: str
    runtime: AgentRuntime
    on_call_start: CallHook | None = None


def open_console(server: ServerSettings) -> WebConsole | None:
    """The console for a ``server:`` block (None when it is off)."""
    from callbrain.console.settings import console_settings

    settings = console_settings(server.console)
    if settings is None:
        return None
    from callbrain.console.web import WebConsole

    return WebConsole(settings, server)
