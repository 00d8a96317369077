"""``callbrain chat``: the terminal around :class:`~callbrain.testing.chat.ChatCall`.

Two ways in. On a terminal, prompt_toolkit keeps the caller's half-typed line
while the reply streams just above it, every row of it; the first key the caller
presses while the agent speaks interrupts it (prompt_toolkit reports each key as
the line changes), and Enter sends the words. Piped, each line waits for the
reply to finish before the next is sent, so a file of lines is a repeatable script.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text
from websockets.exceptions import InvalidStatus, WebSocketException

from callbrain.agent import Agent, example_agent_path
from callbrain.extras import missing_extra
from callbrain.server.app import DEFAULT_PREFIX, create_app
from callbrain.startup import UsageError, fail, model_label, reporting
from callbrain.testing.chat import ChatCall
from callbrain.testing.chat_output import ChatOutput, ConsoleOutput, lstrip
from callbrain.testing.client import RetellClient, call_url, websocket_url
from callbrain.testing.serve import serve_asgi

REPLY_TIMEOUT_S = 60.0
"""Piped mode stops waiting for a reply after this long and sends the next line."""


class _Failed(Exception):
    """The call could not be set up: exit 1."""


def chat_command(
    url: Annotated[
        str | None,
        typer.Argument(
            metavar="URL",
            help="WebSocket URL as configured in Retell (the call id is appended to its "
            "path). Default: start the agent here.",
        ),
    ] = None,
    agent: Annotated[
        Path | None,
        typer.Option("--agent", "-a", help="Agent YAML to start (no URL). Default: the example."),
    ] = None,
    call_id: Annotated[
        str | None, typer.Option("--call-id", help="Call id to connect as. Default: random.")
    ] = None,
    var: Annotated[
        list[str] | None,
        typer.Option(
            "--var",
            metavar="KEY=VALUE",
            help="Dynamic variable for call_details, key=value (repeatable).",
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of a start-up error.")
    ] = False,
) -> None:
    """Talk to an agent as the caller, with this terminal playing Retell's side of the call."""
    status = Console(stderr=True, highlight=False)
    with reporting(debug):
        variables = dict(_variable(entry) for entry in var or [])
        target = None if url is None else websocket_url(url)
        if target is not None and agent is not None:
            raise UsageError(
                "--agent starts an agent here; it cannot be combined with a URL "
                "(the agent at the URL is already running)"
            )
        try:
            code = asyncio.run(
                _main(target, agent, call_id or f"chat_{secrets.token_hex(6)}", variables, status)
            )
        except _Failed as exc:
            raise fail(str(exc), 1) from None
        except KeyboardInterrupt:
            code = 0  # Ctrl-C while piped: the socket was closed on the way out.
    raise typer.Exit(code)


def _variable(entry: str) -> tuple[str, str]:
    key, sep, value = entry.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--var expects key=value, got {entry!r}")
    return key.strip(), value


def refusal_message(url: str, status: int) -> str:
    """What a refused handshake means, by its HTTP status (see :mod:`callbrain.server.access`)."""
    if status == 404:
        return (
            f"{url}: no call socket at this path (HTTP 404). Check the path: callbrain "
            "serves /llm-websocket (or its --prefix), and /llm-websocket/agent/<name> for "
            "each of several agents; leave the call id out, it is appended for you"
        )
    if status == 403:
        return (
            f"{url}: the server refused the call (HTTP 403): a missing or wrong secret "
            "(in the path, .../llm-websocket/<secret>, or as ?token=<secret>), an address "
            "not in allow_ips, or a server that is full or shutting down; its log says which"
        )
    return f"{url}: the server answered HTTP {status} instead of opening a WebSocket"


async def _main(
    url: str | None,
    agent_file: Path | None,
    call_id: str,
    variables: dict[str, str],
    status: Console,
) -> int:
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            url = await stack.enter_async_context(_local_agent(agent_file, status))
        target = call_url(url, call_id)
        try:
            client = await stack.enter_async_context(RetellClient.connect(url, call_id))
        except InvalidStatus as exc:
            raise _Failed(refusal_message(target, exc.response.status_code)) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise _Failed(f"cannot connect to {target}: {str(exc) or type(exc).__name__}") from None
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        status.print(
            f"Connected to {target}. You are the caller: type what you say"
            + ("; /help for commands." if interactive else "."),
            style="dim",
            soft_wrap=True,
        )

        def make_chat(output: ChatOutput) -> ChatCall:
            return ChatCall(client, output, call_id=call_id, dynamic_variables=variables)

        if interactive:
            code = await _run_prompt(make_chat)
        else:
            code = await _run_piped(make_chat(ConsoleOutput(Console(highlight=False))))
    return code


@contextlib.asynccontextmanager
async def _local_agent(agent_file: Path | None, status: Console) -> AsyncIterator[str]:
    path = agent_file or example_agent_path()
    definition = Agent.from_yaml(path)
    # Built first: a bad tool, key or model file is one line before anything else.
    app = create_app(definition)
    status.print(
        Text.assemble(
            "Starting agent ",
            (definition.name, "cyan"),
            f" ({model_label(definition.llm)}) from {path} on this machine...",
        ),
        soft_wrap=True,
    )
    for runtime in app.state.runtimes:
        await runtime.start()  # the store and the model: a StartupError, not a traceback
    async with serve_asgi(app, settings=definition.server) as http:
        yield "ws" + http.removeprefix("http") + DEFAULT_PREFIX


async def _run_piped(chat: ChatCall) -> int:
    """One line at a time, each after the previous reply is done: a script, not a race."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    # A daemon thread, not an executor: a read blocked on a terminal must not hold up exit.
    threading.Thread(target=read_stdin, name="chat-stdin", daemon=True).start()
    chat.start()
    try:
        await chat.wait_idle(REPLY_TIMEOUT_S)  # the greeting
        while not chat.ended.is_set():
            line = await _next(lines, chat.ended)
            if line is None or not await chat.handle_line(line):
                break
            await chat.wait_idle(REPLY_TIMEOUT_S)
    finally:
        await chat.aclose()
    return chat.exit_code


async def _next(lines: asyncio.Queue[str | None], ended: asyncio.Event) -> str | None:
    """The next input line, or None at its end or when the call ends first."""
    get = asyncio.ensure_future(lines.get())
    stop = asyncio.ensure_future(ended.wait())
    done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
    get.cancel()
    stop.cancel()
    return get.result() if get in done else None


# ------------------------------------------------------------------ on a terminal


class _PromptOutput:
    """Open lines live in the prompt, just above what the caller is typing, until they
    end; then they print above it for good (through patch_stdout).

    prompt_toolkit shows the lines of a prompt above its last one without
    wrapping them, so a long reply would show its first row only until it
    completed: they are wrapped here, at the terminal's width at each redraw.
    """

    def __init__(
        self, console: Console, invalidate: Callable[[], None], width: Callable[[], int]
    ) -> None:
        self.console = console
        self._invalidate = invalidate
        self._width = width
        self._open: dict[str, Text] = {}
        self._render = Console(file=io.StringIO(), force_terminal=True, highlight=False)

    def stream(self, key: str, prefix: Text, text: Text) -> None:
        if key not in self._open:
            self._open[key] = prefix + lstrip(text)
        else:
            self._open[key].append_text(text)
        self._invalidate()

    def end_stream(self, key: str, prefix: Text, suffix: Text) -> None:
        line = self._open.pop(key, None)
        line = prefix + lstrip(suffix) if line is None else line + suffix
        self.line(line)
        self._invalidate()

    def line(self, text: Text) -> None:
        self.console.print(text, soft_wrap=True)

    def message(self) -> str:
        """The prompt: any open lines, wrapped into rows, then the caller's own, as ANSI."""
        self._render.width = max(20, self._width())
        with self._render.capture() as captured:
            for line in self._open.values():
                self._render.print(line)
            self._render.print(Text("you: ", style="bold green"), end="")
        return captured.get()


async def _run_prompt(make_chat: Callable[[ChatOutput], ChatCall]) -> int:
    # Imported here: prompt_toolkit costs every other callbrain command ~0.2 s to import.
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.buffer import Buffer
        from prompt_toolkit.formatted_text import ANSI
        from prompt_toolkit.patch_stdout import patch_stdout
    except ImportError as exc:
        raise missing_extra("testing", "callbrain chat on a terminal") from exc

    # erase_when_done: the core echoes the caller's line itself, after marking the
    # reply it cut into as interrupted, so the scrollback reads in spoken order.
    session: PromptSession[str] = PromptSession(erase_when_done=True)
    barging: set[asyncio.Task[bool]] = set()

    def on_typing(buffer: Buffer) -> None:
        # The first key of a line (not a /command) while the agent speaks barges in,
        # as a caller who starts talking does; Enter then sends the words.
        text = buffer.text.lstrip()
        if text and not text.startswith("/"):
            task = asyncio.ensure_future(chat.barge_in())
            barging.add(task)
            task.add_done_callback(barging.discard)

    async def ask(message: Callable[[], ANSI]) -> str | None:
        # Caught in here: a task that ends in KeyboardInterrupt takes the event loop down.
        try:
            return await session.prompt_async(message)
        except (EOFError, KeyboardInterrupt):
            return None

    with patch_stdout(raw=True):
        output = _PromptOutput(
            Console(highlight=False),
            session.app.invalidate,
            lambda: session.app.output.get_size().columns,
        )
        chat = make_chat(output)
        session.default_buffer.on_text_changed += on_typing
        chat.start()
        try:
            while not chat.ended.is_set():
                prompt = asyncio.ensure_future(ask(lambda: ANSI(output.message())))
                ended = asyncio.ensure_future(chat.ended.wait())
                done, _ = await asyncio.wait({prompt, ended}, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                if prompt not in done:
                    prompt.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await prompt
                    break
                line = prompt.result()
                if line is None or not await chat.handle_line(line):
                    break
        finally:
            await chat.aclose()
    return chat.exit_code
