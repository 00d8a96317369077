"""The console in a real browser: Debian's Chromium, driven by Playwright, against
callbrain on loopback with a scripted fake model.

One walk through what a new user does: log in (by keyboard), talk to the
agent in the playground (a tool call, then a barge-in on a reply that is still
streaming), watch the call appear live in the calls list, open it, read its
waterfall, download its scenario and replay it with ``callbrain test``. Then
the pages at phone width, and the browser's protocol checker against the
Python one over the same frames. Replies that must still be streaming when the
caller cuts in stall (``stall_after``) instead of relying on a delay.

Screenshots of the main pages go to a temporary folder, and to
``$CALLBRAIN_SCREENSHOTS`` when set (``docs/images`` for the docs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml
from console_support import TOKEN, Served, console_agent, serve_console
from misbehaving_server import MODES
from misbehaving_server import app as misbehaving_app
from support import in_module_loop

from callbrain.testing import RetellClient, serve_asgi
from callbrain.testing.checker import ProtocolChecker
from callbrain.testing.fake_llm import FakeOpenAIServer, FakeToolCall, Reply

REQUIRED = os.environ.get("CALLBRAIN_REQUIRE_BROWSER") == "1"
"""In CI a browser test that cannot run fails: a skip would hide a broken console."""

try:
    from playwright import async_api as playwright_api
except ImportError:  # the dev extra brings it
    if REQUIRED:
        raise
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
ROOT = Path(__file__).resolve().parent.parent


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if REQUIRED:
            pytest.fail("chromium is not installed, and CALLBRAIN_REQUIRE_BROWSER=1 (CI)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs these")
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    executable = chromium()
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    fake: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    database = tmp_path_factory.mktemp("console") / "calls.db"
    agent = console_agent(fake, database, wait_for_call_details=True)
    async with serve_console(agent) as running:
        yield running


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Where screenshots go: a temporary folder, and $CALLBRAIN_SCREENSHOTS if set."""
    places = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("CALLBRAIN_SCREENSHOTS"):
        places.append(Path(os.environ["CALLBRAIN_SCREENSHOTS"]))
    return places


async def screenshot(page: Any, name: str, shots: list[Path], **options: Any) -> None:
    image = await page.screenshot(**options)
    for place in shots:
        place.mkdir(parents=True, exist_ok=True)
        (place / f"{name}.png").write_bytes(image)


@contextlib.asynccontextmanager
async def logged_in(browser: Any, served: Served, viewport: dict[str, int]) -> AsyncIterator[Any]:
    """A page of a new browser context, logged in by keyboard; the context (and its
    live event streams, which would hold the server's shutdown up) closed after."""
    context = await browser.new_context(viewport=viewport, base_url=served.http)
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        await page.goto("/console/")
        assert await page.evaluate("document.activeElement.id") == "token"  # autofocus
        await page.keyboard.type(TOKEN)
        await page.keyboard.press("Enter")
        await page.wait_for_url("**/console/calls")
        yield page
    finally:
        await context.close()


def agent_file(path: Path, fake: FakeOpenAIServer) -> Path:
    """The same agent for `callbrain test`, which serves it itself (no socket secret)."""
    path.write_text(
        yaml.safe_dump(
            {
                "name": "clinic",
                "begin_message": "Hi {{first_name}}, Sunrise Clinic.",
                "dynamic_variables": {"first_name": "there"},
                "wait_for_call_details": True,
                "retell_config": {"auto_reconnect": True, "call_details": True},
                "tools": [
                    {
                        "type": "python",
                        "function": "callbrain.examples.clinic_tools:check_availability",
                    },
                    {
                        "type": "python",
                        "function": "callbrain.examples.clinic_tools:book_appointment",
                        "side_effects": True,
                    },
                ],
                "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "k"},
                "server": {"records": False},
            }
        )
    )
    return path


@in_module_loop
async def test_a_new_user_talks_to_the_agent_and_reads_the_waterfall(
    browser: Any, served: Served, fake: FakeOpenAIServer, shots: list[Path], tmp_path: Path
) -> None:
    fake.reset(
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "tuesday"})]),
        Reply("On Tuesday I have nine, ten thirty and one.", stall_after=3),  # cut in on
        Reply("Thursday at one works.", ttft=0.05),
        Reply("Are you still there?"),
    )
    async with logged_in(browser, served, DESKTOP) as page:
        await walk_through(page, served, fake, shots, tmp_path)


async def walk_through(
    page: Any, served: Served, fake: FakeOpenAIServer, shots: list[Path], tmp_path: Path
) -> None:
    login_page = await page.context.new_page()
    await login_page.goto("/console/login")
    calls = await page.context.new_page()
    await calls.goto("/console/calls")
    await page.goto("/console/playground")

    # Every control of the set-up form is reachable by keyboard, in order.
    reached = []
    for _ in range(14):
        await page.keyboard.press("Tab")
        reached.append(
            await page.evaluate("document.activeElement.id || document.activeElement.className")
        )
    assert reached.index("agent") < reached.index("add-variable") < reached.index("start")
    await page.fill(".var-value", "Robin")
    await page.focus("#start")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("[data-reply=r0][data-end=complete]")
    assert "Hi Robin" in await page.inner_text("[data-reply=r0]")
    call_id = await page.inner_text("#call-id")
    assert call_id.startswith("playground-")
    assert await page.evaluate("document.activeElement.id") == "line"

    # Live in the calls list, in the other tab, as it happens.
    await calls.wait_for_selector(f"#live-calls tr[data-call-id='{call_id}']")

    await page.keyboard.type("Anything on Tuesday?")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("[data-tool=check_availability]")
    await page.wait_for_selector(".entry.result.ok")
    await page.wait_for_selector("[data-reply=r1] .text:has-text('On Tuesday')")
    await screenshot(calls, "console-calls", shots)
    # Barge in while the reply is still streaming.
    await page.keyboard.type("What about Thursday?")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("[data-reply=r1][data-end=interrupted]")
    await page.wait_for_selector("[data-reply=r2][data-end=complete]")
    assert await page.inner_text("[data-reply=r2] .text") == "Thursday at one works."
    assert await page.is_visible("#checks-none")
    assert await page.locator("#violations li").count() == 0
    # The caller stays silent: Retell asks for a reminder.
    await page.click("#remind")
    await page.wait_for_selector("[data-reply=r3][data-end=complete]")
    await screenshot(page, "console-playground", shots, full_page=True)
    await page.click("#hangup")
    await calls.wait_for_selector(f"#recent-calls tr[data-call-id='{call_id}'] .end-hangup")

    # The call's page: a waterfall row per turn with each step it reached.
    await asyncio.wait_for(served.app.state.runtime.idle.wait(), 10)
    await served.app.state.runtime.recorder.flush()
    await page.goto(f"/console/calls/{call_id}")
    rows = page.locator("tr.wf-turn")
    assert await rows.count() == 4
    assert await page.get_attribute("tr.wf-turn[data-response-id='3']", "data-kind") == "reminder"
    steps = {
        await row.get_attribute("data-response-id"): await row.locator(
            "rect[data-step]"
        ).evaluate_all("rects => rects.map(r => r.dataset.step)")
        for row in await rows.all()
    }
    assert steps["1"] == ["server", "model", "frame"]  # cut off before it completed
    assert steps["2"] == ["server", "model", "frame", "reply"]
    assert await rows.nth(1).locator("rect[data-lane=tool]").count() == 1
    assert await rows.nth(1).locator("rect[data-lane=model-request]").count() == 2
    assert await page.locator("tr.wf-turn.worst").count() == 1
    assert "the caller cut in here" in await page.inner_text("#turn-1-1")
    assert "check_availability" in await page.inner_text("#turn-1-1")
    await screenshot(page, "console-call", shots, full_page=True)
    await screenshot(login_page, "console-login", shots)

    # Its scenario, replayed by `callbrain test` on the same agent.
    async with page.expect_download() as downloading:
        await page.click("#download-scenario")
    download = await downloading.value
    scenario = tmp_path / download.suggested_filename
    await download.save_as(scenario)
    assert scenario.name == f"{call_id}.yaml"
    replay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", "test", str(scenario),
        "--agent", str(agent_file(tmp_path / "clinic.yaml", fake)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await replay.communicate()
    assert replay.returncode == 0, output.decode()
    assert page.errors == []


@in_module_loop
async def test_the_pages_fit_a_phone_and_a_laptop(
    browser: Any, served: Served, shots: list[Path]
) -> None:
    for viewport in (PHONE, DESKTOP):
        async with logged_in(browser, served, viewport) as page:
            await fits(page, viewport, shots)


async def fits(page: Any, viewport: dict[str, int], shots: list[Path]) -> None:
    recent = await page.locator("#recent-calls tr[data-call-id] a").all()
    paths = ["/console/calls", "/console/playground"]
    if recent:
        paths.append(await recent[0].get_attribute("href"))
    for path in paths:
        await page.goto(path)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{path} is {overflow}px too wide at {viewport['width']}px"
    if viewport is PHONE and recent:
        await screenshot(page, "console-call-phone", shots)
    assert page.errors == []


# ------------------------------------------------ the checker, in both languages


class RecordingChecker(ProtocolChecker):
    """The Python checker, keeping every frame it is fed, for the browser's."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def on_sent(self, frame: dict[str, Any], at: float) -> None:
        self.events.append({"sent": frame, "at": at})
        super().on_sent(frame, at)

    def on_received(self, raw: str | bytes, at: float) -> dict[str, Any] | None:
        shown = {"binary": len(raw)} if isinstance(raw, bytes) else raw
        self.events.append({"received": shown, "at": at})
        return super().on_received(raw, at)


async def recorded_call(url: str, mode: str) -> dict[str, Any]:
    """test_checker's call against the misbehaving server, frames kept."""
    async with RetellClient.connect(url, mode) as call:
        checker = call.checker = RecordingChecker()
        await call.send({"interaction_type": "ping_pong", "timestamp": 1})
        first = await call.say("When do you close?")
        await call.wait_for(lambda _: bool(call.response_turn(first).frames))
        last = await call.say("Sorry, when do you close today?")
        finished = {"finished": last}
        await call.wait_for(lambda frames: any(f.get("metadata") == finished for f in frames))
        if mode == "stale_frame":
            done = {"finished": first}
            await call.wait_for(lambda frames: any(f.get("metadata") == done for f in frames))
        if mode != "ping_missed":
            await call.wait_for(lambda fs: any(f["response_type"] == "ping_pong" for f in fs))
    return {"name": mode, "events": checker.events, "finish": time.monotonic() + 10}


def response(rid: Any, content: str = "x", **extra: Any) -> str:
    body = {"response_type": "response", "response_id": rid, "content": content}
    return orjson.dumps({**body, "content_complete": False, **extra}).decode()


def crafted() -> list[dict[str, Any]]:
    """Frames the misbehaving server does not send: the corners of the frame shapes."""
    ask = {"sent": {"interaction_type": "response_required", "response_id": 1, "transcript": []}}
    config = {"received": '{"response_type":"config","config":{"auto_reconnect":true}}'}
    cases = {
        "float id": [
            '{"response_type":"response","response_id":1.0,"content":"a","content_complete":true}'
        ],
        "exponent id": [
            '{"response_type":"response","response_id":1e0,"content":"a","content_complete":true}'
        ],
        "id past 2**63": [response(2**63)],
        "boolean id": [
            '{"response_type":"response","response_id":true,"content":"a","content_complete":false}'
        ],
        "string complete": [response(1, content_complete="true")],
        "unknown config flag": ['{"response_type":"config","config":{"louder":true}}'],
        "null config flag": ['{"response_type":"config","config":{"call_details":null}}'],
        "unknown top-level field": [response(1, volume=11)],
        "two actions, two frames": [response(1, end_call=True), response(1, transfer_number="+1")],
        "end_call false is no action": [response(1, end_call=False, transfer_number="+1")],
        "update_agent ranges": [
            '{"response_type":"update_agent","agent_config":{"responsiveness":1}}',
            '{"response_type":"update_agent","agent_config":{"responsiveness":1.5}}',
            '{"response_type":"update_agent","agent_config":{"reminder_max_count":2.0}}',
            '{"response_type":"update_agent","agent_config":{"reminder_trigger_ms":0}}',
        ],
        "metadata not an object": ['{"response_type":"metadata","metadata":[1]}'],
        "tool result ids": [
            '{"response_type":"tool_call_invocation","tool_call_id":"a","name":"t","arguments":"{}"}',
            '{"response_type":"tool_call_result","tool_call_id":"a","content":"ok"}',
            '{"response_type":"tool_call_result","tool_call_id":"b","content":"ok"}',
            '{"response_type":"tool_call_result","content":"no id"}',
        ],
        "not an object": ["[1,2]", "null", '"text"', "{bad"],
        "agent interrupt actions": [
            '{"response_type":"agent_interrupt","interrupt_id":1,"content":"a","content_complete":true,"end_call":true,"digit_to_press":"1"}'
        ],
        "no response_type": ['{"response_id":1,"content":"a"}'],
        "unknown pong": ['{"response_type":"ping_pong","timestamp":99}'],
    }
    sequences = []
    for name, frames in cases.items():
        events = [dict(config, at=0.0), dict(ask, at=0.1)]
        events += [{"received": frame, "at": 0.2 + n / 100} for n, frame in enumerate(frames)]
        sequences.append({"name": name, "events": events, "finish": 1.0})
    return sequences


def python_verdicts(sequence: dict[str, Any]) -> list[list[Any]]:
    checker = ProtocolChecker()
    for event in sequence["events"]:
        if "sent" in event:
            checker.on_sent(event["sent"], event["at"])
        else:
            raw = event["received"]
            checker.on_received(b"x" * raw["binary"] if isinstance(raw, dict) else raw, event["at"])
    return [[v.rule, _id(v.response_id)] for v in checker.finish(sequence["finish"])]


def _id(value: int | None) -> Any:
    # Past 2**53 a browser's number is not the integer: compare "some big id".
    return "big" if value is not None and value > 2**53 else value


BROWSER_VERDICTS = """async (sequences) => {
  const { ProtocolChecker, loadProtocol } = await import("/console/static/checker.js");
  const protocol = await loadProtocol();
  return sequences.map((sequence) => {
    const checker = new ProtocolChecker(protocol);
    for (const event of sequence.events) {
      if ("sent" in event) checker.onSent(event.sent, event.at);
      else checker.onReceived(event.received, event.at);
    }
    return checker.finish(sequence.finish).map((v) => [
      v.rule, v.responseId !== null && v.responseId > 2 ** 53 ? "big" : v.responseId,
    ]);
  });
}"""


@in_module_loop
async def test_the_browser_checker_flags_what_the_python_checker_flags(
    browser: Any, served: Served
) -> None:
    async with serve_asgi(misbehaving_app) as http:
        url = "ws" + http.removeprefix("http") + "/llm-websocket"
        sequences = [await recorded_call(url, mode) for mode in MODES]
    sequences += crafted()
    expected = [python_verdicts(sequence) for sequence in sequences]
    # Each rule caught in its mode, so agreeing is not agreeing on nothing.
    for sequence, verdicts in zip(sequences[: len(MODES)], expected, strict=False):
        if sequence["name"] != "good":
            assert sequence["name"] in {rule for rule, _ in verdicts}
    async with logged_in(browser, served, DESKTOP) as page:
        await page.goto("/console/playground")
        seen = await page.evaluate(BROWSER_VERDICTS, sequences)
    for sequence, python, javascript in zip(sequences, expected, seen, strict=True):
        assert javascript == python, sequence["name"]
