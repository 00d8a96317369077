"""``callbrain chat``: the caller's side of a call, against a real server on real sockets.

The core (:class:`ChatCall`) is driven directly against callbrain serving an
agent whose model is a scripted fake OpenAI server; replies that must still be
streaming when the caller cuts in stall (``stall_after``) instead of relying on
a delay, so nothing here depends on timing. The command itself runs once piped,
as a script would run it, on the shipped local model.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from support import agent_on
from terminal import Terminal
from websockets.asyncio.server import ServerConnection, serve

from callbrain.agent import Agent
from callbrain.call.control import CallControl
from callbrain.testing import FakeOpenAIServer, FakeToolCall, Reply, RetellClient, serve_agent
from callbrain.testing.chat import ChatCall
from callbrain.testing.chat_output import ConsoleOutput
from callbrain.testing.client import agent, call_url, user
from callbrain.tools import tool

REMINDER = "(REMIND THE CALLER)"


@tool
def check_availability(day: str) -> dict[str, Any]:
    """Free appointment times on a day.

    Args:
        day: The day, e.g. "friday".
    """
    return {"day": day, "free": ["09:00", "15:30"]}


class RecordingOutput(ConsoleOutput):
    """The real console output, into a string, also noting each streamed chunk."""

    def __init__(self) -> None:
        super().__init__(Console(file=io.StringIO(), color_system=None, width=200))
        self.chunks: list[str] = []

    def stream(self, key: str, prefix: Text, text: Text) -> None:
        self.chunks.append(text.plain)
        super().stream(key, prefix, text)

    @property
    def text(self) -> str:
        file = self.console.file
        assert isinstance(file, io.StringIO)
        return file.getvalue()

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


@dataclass
class Session:
    chat: ChatCall
    client: RetellClient
    out: RecordingOutput
    fake: FakeOpenAIServer


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll: the conditions span the output, the chat's counters and the socket,
    which share no event to wait on."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def make_agent(
    fake: FakeOpenAIServer, llm: dict[str, Any] | None = None, **overrides: Any
) -> Agent:
    fields: dict[str, Any] = {
        "name": "chat-test",
        "begin_message": "Hello!",
        "reminder_prompt": REMINDER,
        "holding_messages": ["One moment."],
        "tool_filler_after_s": None,
        "frame_coalesce_ms": 0,  # a frame per delta: what the chat shows is under test
        "tools": [
            check_availability,
            {"type": "end_call", "message": "Goodbye!"},
            {"type": "transfer_call", "number": "+14155550100"},
            {"type": "press_digit"},
        ],
    }
    return agent_on(fake, llm={"model": "test-model", **(llm or {})}, **{**fields, **overrides})


@contextlib.asynccontextmanager
async def chatting(
    *replies: Reply, variables: dict[str, str] | None = None, **options: Any
) -> AsyncIterator[Session]:
    """A chat with the agent, its greeting already shown."""
    agent_options = options.pop("agent", {})
    hook = options.pop("on_call_start", None)
    async with (
        FakeOpenAIServer(*replies) as fake,
        serve_agent(make_agent(fake, **agent_options), on_call_start=hook) as url,
        RetellClient.connect(url, "chat-test") as client,
    ):
        out = RecordingOutput()
        chat = ChatCall(client, out, call_id="chat-test", dynamic_variables=variables, **options)
        chat.start()
        try:
            assert await chat.wait_idle(10)
            yield Session(chat, client, out, fake)
        finally:
            await chat.aclose()


async def test_the_greeting_and_a_reply_stream_in_and_join_the_transcript() -> None:
    async with chatting(Reply("We open at nine on Monday.")) as s:
        assert await s.chat.handle_line("When do you open?")
        assert await s.chat.wait_idle(10)
        assert s.out.lines[-3:] == [
            "agent: Hello!",
            "you: When do you open?",
            "agent: We open at nine on Monday.",
        ]
        assert len(s.out.chunks) > 3  # word by word, not one line at the end
        assert s.client.transcript == [
            agent("Hello!"),
            user("When do you open?"),
            agent("We open at nine on Monday."),
        ]


async def test_tool_invocations_and_results_are_shown() -> None:
    async with chatting(
        Reply(
            "",
            tool_calls=[
                FakeToolCall("check_availability", {"day": "friday"}),
                FakeToolCall("check_availability", '{"weekday": 5}'),
            ],
        ),
        Reply("Friday at nine."),
    ) as s:
        await s.chat.handle_line("Anything on Friday?")
        assert await s.chat.wait_idle(10)
        lines = s.out.lines
        assert '  tool   check_availability {"day":"friday"}' in lines
        assert '  tool   check_availability {"weekday": 5}' in lines  # as sent
        [ok] = [line for line in lines if line.startswith("  result ok")]
        assert json.loads(ok.removeprefix("  result ok ")) == {
            "day": "friday",
            "free": ["09:00", "15:30"],
        }
        assert any(line.startswith("  result failed") and "day" in line for line in lines)
        # The holding line, the tool lines, then the rest of the same reply.
        assert lines.index("agent: One moment.") < lines.index("agent: ... Friday at nine.")


async def test_the_agent_hanging_up_ends_the_chat() -> None:
    async with chatting(Reply("", tool_calls=[FakeToolCall("end_call")])) as s:
        await s.chat.handle_line("That's all, bye.")
        await asyncio.wait_for(s.chat.ended.wait(), 10)
        assert s.out.lines[-2:] == ["agent: Goodbye!", "  the agent hung up"]
        assert s.chat.exit_code == 0
        assert not await s.chat.handle_line("hello?")


async def test_call_control_frames_are_shown() -> None:
    async def on_call_start(control: CallControl) -> None:
        await control.send_metadata({"screen": "intake"})
        await control.update_agent(responsiveness=0.5)
        await control.interrupt("Quick note before we start.")

    async with chatting(
        Reply("Sure.", tool_calls=[FakeToolCall("transfer_call")]),
        Reply("", tool_calls=[FakeToolCall("press_digit", {"digits": "1#"})]),
        on_call_start=on_call_start,
    ) as s:
        await until(lambda: "agent (unprompted): Quick note before we start." in s.out.lines)
        assert 'metadata {"screen":"intake"}' in s.out.lines
        assert 'update_agent {"responsiveness":0.5}' in s.out.lines
        await s.chat.handle_line("Can I talk to a person?")
        assert await s.chat.wait_idle(10)
        assert s.out.lines[-1] == "  transfer to +14155550100 (Retell would transfer the call now)"
        await s.chat.handle_line("Press one for me.")
        assert await s.chat.wait_idle(10)
        assert s.out.lines[-1] == "  presses digits 1#"


async def test_typing_over_a_streaming_reply_supersedes_it() -> None:
    async with chatting(
        Reply("One two three four.", stall_after=2),  # keeps streaming until cut off
        Reply("Okay, I'll stop."),
    ) as s:
        await s.chat.handle_line("Tell me a story.")
        await until(lambda: "agent: One two" in s.out.text)
        assert s.chat.replying  # still open: the next line barges in
        await s.chat.handle_line("Stop.")
        assert s.client.latest_response_id == 2
        assert await s.chat.wait_idle(10)
        assert s.out.lines[-4:] == [
            "you: Tell me a story.",
            "agent: One two [interrupted]",
            "you: Stop.",
            "agent: Okay, I'll stop.",
        ]
        assert s.client.transcript == [
            agent("Hello!"),
            user("Tell me a story."),
            agent("One two"),
            user("Stop."),
            agent("Okay, I'll stop."),
        ]
        # The server answered response 2 knowing what the caller had heard.
        history = s.fake.requests[1].body["messages"]
        assert {"role": "assistant", "content": "One two"} in history


async def test_remind_asks_for_a_reminder_and_shows_it() -> None:
    async with chatting(Reply("Hmm", stall_after=0), Reply("Are you still there?")) as s:
        await s.chat.handle_line("/bogus")
        assert s.out.lines[-1] == "unknown command /bogus; /help lists them"
        await s.chat.handle_line("Hello?")
        await s.fake.wait_for_requests(1, timeout=10)
        # Retell asks for no reminder while a reply is open.
        assert await s.chat.remind() is None
        await s.chat.handle_line("Hi again.")  # supersedes the stalled reply
        assert "agent: [interrupted]" in s.out.lines
        await s.fake.wait_for_requests(2, timeout=10)
        assert await s.chat.wait_idle(10)  # "Are you still there?" was its answer
        s.fake.script(Reply("Still with me?"))
        await s.chat.handle_line("/remind")
        assert await s.chat.wait_idle(10)
        assert s.out.lines[-2:] == ["(caller stays silent)", "agent (reminder): Still with me?"]
        assert REMINDER in json.dumps(s.fake.requests[-1].body["messages"][-1])
        assert await s.chat.handle_line("/help") and "/remind" in s.out.text
        assert not await s.chat.handle_line("/quit")


async def test_config_gets_call_details_and_pings_that_are_echoed() -> None:
    async with chatting(
        variables={"first_name": "Sam"},
        agent={"begin_message": "Hi {{first_name}}!", "wait_for_call_details": True},
        ping_interval=0.02,
    ) as s:
        assert "agent: Hi Sam!" in s.out.lines
        assert s.chat.config
        assert s.chat.config["auto_reconnect"] is True and s.chat.config["call_details"] is True
        await until(lambda: s.chat.pongs_received >= 3)
        echoes = [f for f in s.client.frames if f.get("response_type") == "ping_pong"]
        assert len(echoes) >= 3
        assert "no ping_pong echo" not in s.out.text


async def test_missing_echoes_warn_and_a_server_close_is_reported() -> None:
    """A server that greets but never answers pings, then fails."""
    fail = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"response_type": "config", "config": {"auto_reconnect": True}}))
        await ws.send(
            json.dumps(
                {
                    "response_type": "response",
                    "response_id": 0,
                    "content": "Hi.",
                    "content_complete": True,
                }
            )
        )
        await fail.wait()
        await ws.close(1011)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1] if server.sockets else 0
        async with RetellClient.connect(f"ws://127.0.0.1:{port}/llm-websocket") as client:
            out = RecordingOutput()
            chat = ChatCall(client, out, ping_interval=0.02, ping_timeout=0.1)
            chat.start()
            try:
                await until(lambda: "no ping_pong echo" in out.text)
                assert chat.pings_sent > 0 and chat.pongs_received == 0
                fail.set()
                await asyncio.wait_for(chat.ended.wait(), 10)
            finally:
                await chat.aclose()
        assert out.lines[-1] == "the server closed the socket: code 1011 (a server error)"
        assert chat.exit_code == 1


# ------------------------------------------------------------------ the command


def callbrain(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callbrain", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def test_piped_chat_with_no_url_talks_to_the_shipped_agent() -> None:
    result = callbrain(stdin="hello\n/quit\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("agent: Hi there, thanks for calling Sunrise Clinic")
    you = lines.index("you: hello")
    assert lines[you + 1].startswith("agent: ") and lines[you + 1].removeprefix("agent: ").strip()
    assert "Starting agent clinic" in result.stderr and "Traceback" not in result.stderr


def test_agent_with_a_url_is_a_usage_error() -> None:
    result = callbrain("ws://127.0.0.1:9/llm-websocket", "--agent", "x.yaml")
    assert result.returncode == 2
    assert "--agent" in result.stderr and "URL" in result.stderr


def test_a_connection_that_fails_is_one_clear_line() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = callbrain(f"http://127.0.0.1:{port}/llm-websocket", "--call-id", "c1")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: cannot connect to ws://127.0.0.1:{port}/llm-websocket/c1"
    )
    assert "Traceback" not in result.stderr


async def test_protocol_violations_are_shown_as_they_happen() -> None:
    from misbehaving_server import app as misbehaving_app

    from callbrain.testing import serve_asgi

    async with serve_asgi(misbehaving_app) as http:
        url = "ws" + http.removeprefix("http") + "/llm-websocket"
        async with RetellClient.connect(url, "duplicate_complete") as client:
            out = RecordingOutput()
            chat = ChatCall(client, out, call_id="duplicate_complete")
            chat.start()
            try:
                await chat.handle_line("When do you close?")
                await until(lambda: "protocol: duplicate_complete" in out.text)
            finally:
                await chat.aclose()
    assert "more than one content_complete for one response_id" in out.text


# ------------------------------------------------------- URLs and refusals


def test_the_call_id_goes_into_the_path_and_the_query_stays_last() -> None:
    assert call_url("ws://h/llm-websocket?token=abc", "c1") == "ws://h/llm-websocket/c1?token=abc"
    assert call_url("wss://h/llm-websocket/", "c 1") == "wss://h/llm-websocket/c%201"


async def chat_command(*args: str, stdin: str = "/quit\n") -> tuple[int, str, str]:
    """``callbrain chat`` piped, as a subprocess the event loop (and the server in it) outlives."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", "chat", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


SECRET = "s3cret-for-the-chat-tests-0123456789"


async def test_a_url_with_a_token_query_connects() -> None:
    secret = {"server": {"access": {"secret": SECRET}}}
    async with FakeOpenAIServer() as fake, serve_agent(make_agent(fake, **secret)) as url:
        code, out, err = await chat_command(f"{url}?token={SECRET}", "--call-id", "c1")
    assert code == 0, err
    assert f"Connected to {url}/c1?token={SECRET}" in err
    assert "agent: Hello!" in out


async def test_a_wrong_path_and_a_refused_secret_are_told_apart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="callbrain.server.access")
    secret = {"server": {"access": {"secret": SECRET}}}
    async with FakeOpenAIServer() as fake, serve_agent(make_agent(fake, **secret)) as url:
        base = url.removesuffix("/llm-websocket")
        code, _, wrong_path = await chat_command(f"{base}/llm-websockets/{SECRET}")
        assert code == 1
        code, _, no_secret = await chat_command(url)
        assert code == 1
    [line] = wrong_path.splitlines()
    assert line.startswith("error: ") and "(HTTP 404)" in line and "Check the path" in line
    [line] = no_secret.splitlines()
    assert line.startswith("error: ") and "(HTTP 403)" in line and "secret" in line
    # The server's log says why, and never quotes the secret, wherever it was put.
    logged = [r.getMessage() for r in caplog.records]
    assert any(
        "/llm-websockets/<redacted>/<redacted>: no call socket at this path" in m for m in logged
    )
    assert any(m.endswith(": no secret given") for m in logged)
    assert not any(SECRET in m for m in logged)


# ---------------------------------------------------------- on a terminal


def slow_agent(fake: FakeOpenAIServer) -> Agent:
    # A stalled reply must stay open for as long as the test looks at it.
    return make_agent(fake, llm={"idle_timeout_s": 120, "first_token_timeout_s": 60})


def chat_on_terminal(url: str, columns: int) -> Terminal:
    return Terminal([sys.executable, "-m", "callbrain", "chat", url], columns=columns)


async def test_every_row_of_a_long_reply_shows_while_it_streams() -> None:
    words = " ".join(f"word{n}x" for n in range(30))  # many rows at 40 columns
    async with (
        FakeOpenAIServer(Reply(words, stall_after=25)) as fake,  # streams, never completes
        serve_agent(slow_agent(fake)) as url,
        chat_on_terminal(url, columns=40) as term,
    ):
        await term.wait_for("you:")
        term.type("Tell me everything.\r")
        # Far past the first row, and the reply is still open.
        await term.wait_for("word22x")
        assert "word29x" not in term.text


async def test_the_first_key_pressed_interrupts_the_agent() -> None:
    async with (
        FakeOpenAIServer(Reply("One two three four.", stall_after=2), Reply("Okay.")) as fake,
        serve_agent(slow_agent(fake)) as url,
        chat_on_terminal(url, columns=100) as term,
    ):
        await term.wait_for("you:")
        term.type("Tell me a story.\r")
        await term.wait_for("One two")
        term.type("S")  # no Enter: a caller who starts to speak
        await term.wait_for(r"One two \[interrupted\]")
        term.type("top.\r")
        await term.wait_for("agent: Okay.")
        # The model heard what the caller heard before they cut in.
        history = fake.requests[1].body["messages"]
        assert {"role": "assistant", "content": "One two"} in history
        assert history[-1] == {"role": "user", "content": "Stop."}
        term.type("/quit\r")
        assert await term.exit_code() == 0
