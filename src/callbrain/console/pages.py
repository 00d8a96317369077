"""The console's pages, rendered on the server from ``templates/`` (Jinja2,
every value escaped), and the two documents the scripts fetch: a call's
scenario and the protocol's rules.

Nothing secret reaches a template: the agents are shown by name, model and
variables' defaults, never their settings objects (which hold API keys and the
socket secret).
"""

from __future__ import annotations

import re
from functools import cache
from typing import TYPE_CHECKING, Any

import jinja2
import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from callbrain.console.settings import PATH
from callbrain.console.views import STEPS, call_view, ms, when
from callbrain.records.read import Call, list_calls

if TYPE_CHECKING:
    from callbrain.console.web import WebConsole

LIST_LIMIT = 50
ENDS = ("hangup", "drop", "error", "drain", "inactive", "open")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@cache
def _templates() -> jinja2.Environment:
    from callbrain.console.web import HERE

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["ms"] = ms
    env.filters["json"] = lambda value: orjson.dumps(value).decode()
    env.globals["PATH"] = PATH
    return env


def render(name: str, request: Request, **context: Any) -> HTMLResponse:
    console: WebConsole | None = getattr(request.state, "console", None)
    signed_in = console is not None and bool(console.auth and console.auth.signed_in(request))
    page = (
        _templates()
        .get_template(name)
        .render(request_path=request.url.path, signed_in=signed_in, **context)
    )
    return HTMLResponse(page)


def _console(request: Request) -> WebConsole:
    console: WebConsole = request.state.console
    return console


async def home(request: Request) -> Response:
    return RedirectResponse(f"{PATH}/calls", 303)


# ---------------------------------------------------------------------- calls


def _filters(request: Request) -> dict[str, Any]:
    """The list's filters from the query string; anything unreadable is ignored."""
    params = request.query_params
    search = params.get("q", "").strip()[:200] or None
    end = params.get("end") if params.get("end") in ENDS else None
    try:
        slowest = float(params.get("min_ms", ""))
    except ValueError:
        slowest = None
    kind = params.get("kind")
    playground = {"playground": True, "calls": False}.get(kind or "")
    return {"search": search, "end": end, "min_first_frame_ms": slowest, "playground": playground}


def matches(call: Call, filters: dict[str, Any]) -> bool:
    """The list's filters (as :func:`~callbrain.records.read.list_calls` applies
    them in SQL) on a call summary held in memory."""
    search = filters["search"]
    if search:
        haystack = " ".join(
            [call["call_id"], call["agent"], orjson.dumps(call["variables"]).decode()]
        )
        if search.lower() not in haystack.lower():
            return False
    if filters["end"] is not None and call["end"] != filters["end"]:
        return False
    slowest = filters["min_first_frame_ms"]
    if slowest is not None and (call["worst_first_frame_ms"] or 0) < slowest:
        return False
    playground = filters["playground"]
    return playground is None or bool((call.get("tags") or {}).get("playground")) == playground


async def calls_page(request: Request) -> Response:
    console = _console(request)
    filters = _filters(request)
    live = [console.feed.summary(record) for record in console.feed.open.values()]
    live.sort(key=lambda c: c["started_at"] or "", reverse=True)
    live_ids = {call["call_id"] for call in live}
    recent: dict[str, Call] = {}
    unreadable = False
    for recorder in console.recorders():
        found = await console.read(recorder, lambda c: list_calls(c, limit=LIST_LIMIT, **filters))
        unreadable |= found is None
        for call in found or []:
            recent.setdefault(call["call_id"], call)
    # Ended here moments ago: the database may not have them yet (or records are off).
    for record in console.feed.recent:
        summary = console.feed.summary(record)
        if record.call_id not in recent and matches(summary, filters):
            recent[record.call_id] = summary
    listed = [c for c in recent.values() if c["call_id"] not in live_ids]
    listed.sort(key=lambda c: c["started_at"] or "", reverse=True)
    return render(
        "calls.html",
        request,
        live=[c for c in live if matches(c, {**filters, "end": None, "min_first_frame_ms": None})],
        calls=listed[:LIST_LIMIT],
        filters=filters,
        query=dict(request.query_params),
        ends=ENDS,
        records_on=bool(console.recorders()),
        unreadable=unreadable,
    )


async def _call_or_404(request: Request) -> Call | Response:
    call_id = request.path_params["call_id"]
    call = await _console(request).find_call(call_id)
    if call is None:
        page = render("missing.html", request, call_id=call_id)
        page.status_code = 404
        return page
    return call


async def call_page(request: Request) -> Response:
    call = await _call_or_404(request)
    if isinstance(call, Response):
        return call
    return render("call.html", request, view=call_view(call), steps=STEPS)


async def call_fragment(request: Request) -> Response:
    """The call page's content alone, which the page fetches again as the call goes."""
    call = await _call_or_404(request)
    if isinstance(call, Response):
        return call
    return render("call_view.html", request, view=call_view(call), steps=STEPS)


async def scenario(request: Request) -> Response:
    """The call as a scenario file: the same export as ``callbrain calls export``."""
    from callbrain.records.export import export_scenario, scenario_yaml

    call = await _call_or_404(request)
    if isinstance(call, Response):
        return call
    script = request.query_params.get("script", "1") != "0"
    name = _SAFE_NAME.sub("_", call["call_id"])[:80] or "call"
    return Response(
        scenario_yaml(export_scenario(call, script=script)),
        media_type="application/yaml",
        headers={"Content-Disposition": f'attachment; filename="{name}.yaml"'},
    )


# ----------------------------------------------------------------- playground


async def playground_page(request: Request) -> Response:
    console = _console(request)
    agents = []
    for agent in console.agents.values():
        definition = agent.runtime.agent
        llm = definition.llm
        model = getattr(llm, "model", None) or getattr(llm, "model_path", None) or "local"
        agents.append(
            {
                "name": agent.name,
                "model": f"{llm.provider}: {model}",
                "variables": dict(definition.dynamic_variables),
                "call_details": bool(definition.retell_config.call_details),
            }
        )
    return render("playground.html", request, agents=agents)


async def protocol(request: Request) -> Response:
    """The checker's rules and the outbound frames' shapes, for ``static/checker.js``:
    the rules are the Python checker's, stated once."""
    return JSONResponse(protocol_document())


@cache
def protocol_document() -> dict[str, Any]:
    from callbrain.testing.checker import ACTIONS, FRAME_MODELS, PING_DEADLINE_S, RULES

    return {
        "rules": RULES,
        "ping_deadline_s": PING_DEADLINE_S,
        "frames": {kind: model.model_json_schema() for kind, model in FRAME_MODELS.items()},
        "exclusive_actions": list(ACTIONS),
    }
