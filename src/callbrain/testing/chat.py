"""Play the caller in a terminal: the core of ``callbrain chat``, with no terminal in it.

:class:`ChatCall` acts like Retell on one socket (answers ``config``, pings,
sends the caller's lines with the live transcript, supersedes a reply the caller
talks over) and describes everything the agent does to an :class:`ChatOutput`.
The terminal layer (:mod:`callbrain.testing.chat_terminal`) only feeds it lines
and chooses the output, so tests drive this class directly over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

from rich.text import Text
from websockets.exceptions import ConnectionClosed

from callbrain.retell.frames import PING_INTERVAL_S
from callbrain.testing.chat_output import (
    CLOSE_MEANING,
    HELP,
    ChatOutput,
    Kind,
    action_name,
    compact,
    prefix,
    shorten,
)
from callbrain.testing.checker import RULES, ProtocolChecker
from callbrain.testing.client import Frame, agent, user


class Connection(Protocol):
    """What :class:`ChatCall` needs of :class:`~callbrain.testing.RetellClient`."""

    frames: list[Frame]
    transcript: list[Frame]
    close_code: int | None

    async def next_frame(self, timeout: float = ...) -> Frame: ...
    async def send(self, frame: Frame | str | bytes) -> None: ...
    async def update(self, turntaking: str | None = None) -> None: ...
    async def request(self, *, reminder: bool = False, response_id: int | None = None) -> int: ...
    async def close(self) -> None: ...


@dataclass
class _Reply:
    """One response (or agent interrupt) as the caller hears it."""

    key: str
    kind: Kind
    parts: list[str] = field(default_factory=list)
    complete: bool = False
    interrupted: bool = False
    action: Frame = field(default_factory=dict)
    warned_late: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ChatCall:
    """One simulated Retell call over ``connection``, shown on ``output``.

    Call :meth:`start` once connected, feed it lines with :meth:`handle_line`, and
    :meth:`aclose` it. ``ended`` is set when the agent hangs up or the server closes
    the socket; ``exit_code`` then says whether that was a normal end.
    """

    def __init__(
        self,
        connection: Connection,
        output: ChatOutput,
        *,
        call_id: str = "chat-call",
        dynamic_variables: dict[str, str] | None = None,
        ping_interval: float = PING_INTERVAL_S,
        ping_timeout: float = 5.0,
    ) -> None:
        self.connection = connection
        self.output = output
        self.call_id = call_id
        self.dynamic_variables = dict(dynamic_variables or {})
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.ended = asyncio.Event()
        self.exit_code = 0
        self.pings_sent = 0
        self.pongs_received = 0
        """Echoes of our own pings (the timestamp matched one we sent)."""
        self.config: Frame | None = None
        # The begin message is response 0: the caller waits for it like any reply.
        self._replies: dict[int, _Reply] = {0: _Reply("r0", "greeting")}
        self._interrupts: dict[int, _Reply] = {}
        self._latest = 0
        self._idle = asyncio.Event()
        self._frames_seen = 0
        self._violations_shown = 0
        self._sent_pings: set[int] = set()
        self._last_echo = 0.0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read(), name="chat-reader"))

    async def aclose(self) -> None:
        """Hang up: stop pinging and reading, close the socket (Retell closes it too)."""
        self._closing = True
        reply = self._replies[self._latest]
        if self.replying and not reply.interrupted:
            reply.interrupted = True
            self.output.end_stream(
                reply.key, prefix(reply.kind), Text(" [caller hung up]", style="red")
            )
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.connection.close()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the latest reply is complete (or superseded) or the call ended.
        False if ``timeout`` passed first, which is shown: Retell would keep waiting."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._idle, self.ended)]
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not done:
            self._note(f"no content_complete for response {self._latest} yet; going on", "yellow")
        return bool(done)

    # --------------------------------------------------------------------- input

    async def handle_line(self, line: str) -> bool:
        """One line from the caller: an utterance or a command. False means hang up."""
        if self.ended.is_set():
            return False
        text = line.strip()
        if not text:
            return True
        command = text.lower()
        if command == "/quit":
            return False
        if command == "/help":
            for entry in HELP:
                self.output.line(Text(entry, style="dim"))
            return True
        try:
            if command == "/remind":
                await self.remind()
            elif command.startswith("/"):
                self._note(f"unknown command {text.split()[0]}; /help lists them", "yellow")
            else:
                await self.say(text)
        except ConnectionClosed:
            # The reader reports the close and its code; give it the moment it needs.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), 2)
            return False
        return True

    async def say(self, text: str) -> int:
        """The caller says ``text`` (barging in if the agent is speaking); returns its id."""
        self._interrupt_open_reply()
        self.output.line(Text("you: ", style="bold green") + Text(text))
        self.connection.transcript.append(user(text))
        await self.connection.update(turntaking="agent_turn")
        return await self._request("reply")

    async def barge_in(self) -> bool:
        """The caller starts talking over the agent (a key pressed before Enter):
        the reply is cut where it is, what was said of it joins the transcript,
        and the server hears ``update_only`` with ``turntaking: user_turn``, as
        from Retell when a caller speaks up. The words follow with :meth:`say`.
        False when the agent was not speaking."""
        if not self.speaking:
            return False
        self._interrupt_open_reply()
        self._idle.set()  # what the caller hears of it is over
        with contextlib.suppress(ConnectionClosed):
            await self.connection.update(turntaking="user_turn")
        return True

    @property
    def replying(self) -> bool:
        """The latest response (or the greeting) is still open."""
        return not self._idle.is_set() and not self.ended.is_set()

    @property
    def speaking(self) -> bool:
        """A reply or an unprompted line is still open: the caller would talk over it."""
        unprompted = any(not (r.complete or r.interrupted) for r in self._interrupts.values())
        return self.replying or (unprompted and not self.ended.is_set())

    async def remind(self) -> int | None:
        """The caller stays silent. Retell asks for no reminder while a reply is open."""
        if self.replying:
            self._note("the agent is still replying; Retell sends no reminder until it is done")
            return None
        self.output.line(Text("(caller stays silent)", style="dim"))
        return await self._request("reminder")

    async def _request(self, kind: Kind) -> int:
        rid = await self.connection.request(reminder=kind == "reminder")
        self._replies[rid] = _Reply(f"r{rid}", kind)
        self._latest = rid
        self._idle.clear()
        return rid

    def _interrupt_open_reply(self) -> None:
        for reply in [self._replies[self._latest], *self._interrupts.values()]:
            self._cut(reply, "interrupted")

    def _cut(self, reply: _Reply, why: str) -> None:
        if reply.complete or reply.interrupted:
            return
        reply.interrupted = True
        # Retell's transcript keeps what the agent got out before it was cut off.
        if reply.text:
            self.connection.transcript.append(agent(reply.text))
        dropped = f" (its {action_name(reply.action)} is dropped)" if reply.action else ""
        self.output.end_stream(
            reply.key, prefix(reply.kind), Text(f" [{why}]{dropped}", style="red")
        )

    # ------------------------------------------------------------------- frames

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.connection.next_frame(timeout=3600)
            except TimeoutError:
                continue
            except ConnectionError:
                self._on_closed()
                return
            self._frames_seen += 1
            self._show_violations()
            try:
                await self._dispatch(frame)
            except ConnectionClosed:
                continue  # next_frame reports the close, with its code
            except Exception as exc:
                # Keep the terminal usable and say so, rather than a reader that died mute.
                self._note(f"chat failed on a {frame.get('response_type')} frame: {exc!r}", "red")
                self.exit_code = 1
                self.ended.set()
                return

    def _show_violations(self) -> None:
        """What the connection's protocol checker (a RetellClient has one) found since."""
        checker: ProtocolChecker | None = getattr(self.connection, "checker", None)
        if checker is None:
            return
        for violation in checker.violations[self._violations_shown :]:
            self._note(f"protocol: {violation} ({RULES[violation.rule]})", "red")
        self._violations_shown = len(checker.violations)

    async def _dispatch(self, frame: Frame) -> None:
        # Retell reads a frame without response_type as a response (backward compatibility).
        kind = frame.get("response_type", "response")
        if kind == "config":
            await self._on_config(frame)
        elif kind == "ping_pong":
            self._on_pong(frame)
        elif kind == "response":
            await self._on_content(frame, self._replies.get(_int(frame, "response_id")))
        elif kind == "agent_interrupt":
            iid = _int(frame, "interrupt_id")
            if iid not in self._interrupts:
                # A new interrupt_id discards any earlier interrupt still playing.
                for older in self._interrupts.values():
                    self._cut(older, "discarded")
                self._interrupts[iid] = _Reply(f"i{iid}", "unprompted")
            await self._on_content(frame, self._interrupts[iid])
        elif kind == "tool_call_invocation":
            arguments = shorten(str(frame.get("arguments", "")))
            self.output.line(Text(f"  tool   {frame.get('name')} {arguments}", style="yellow"))
        elif kind == "tool_call_result":
            self._on_tool_result(frame)
        elif kind == "update_agent":
            self._note(f"update_agent {compact(frame.get('agent_config'))}")
        elif kind == "metadata":
            self._note(f"metadata {compact(frame.get('metadata'))}")
        else:
            self._note(f"unknown frame {shorten(compact(frame))}", "yellow")

    async def _on_config(self, frame: Frame) -> None:
        raw = frame.get("config")
        flags: Frame = raw if isinstance(raw, dict) else {}
        on = ", ".join(name for name, value in flags.items() if value is True) or "nothing on"
        if self._frames_seen > 1:
            self._note(f"config ({on}) ignored: it must be the first frame", "yellow")
            return
        self.config = flags
        self._note(f"config: {on}")
        if flags.get("call_details") is True:
            await self.connection.send(
                {"interaction_type": "call_details", "call": self.call_object()}
            )
        if flags.get("auto_reconnect") is True:
            self._last_echo = time.monotonic()
            self._tasks.append(asyncio.create_task(self._ping(), name="chat-pinger"))

    def call_object(self) -> Frame:
        """The ``call`` of the ``call_details`` frame, shaped like Retell's inbound call."""
        return {
            "call_id": self.call_id,
            "call_type": "phone_call",
            "agent_id": "agent_callbrain_chat",
            "call_status": "registered",
            "direction": "inbound",
            "from_number": "+12025550143",
            "to_number": "+12025550187",
            "metadata": {},
            "retell_llm_dynamic_variables": self.dynamic_variables,
        }

    async def _on_content(self, frame: Frame, reply: _Reply | None) -> None:
        if reply is None or reply.interrupted:
            # Content for a superseded or never-requested id: Retell drops it silently.
            return
        if reply.complete:
            if not reply.warned_late:
                reply.warned_late = True
                self._note(f"content after content_complete on {reply.key} (Retell ignores it)")
            return
        content = frame.get("content")
        if isinstance(content, str) and content:
            reply.parts.append(content)
            self.output.stream(reply.key, prefix(reply.kind), Text(content))
        for name in ("end_call", "transfer_number", "digit_to_press"):
            if frame.get(name) not in (None, False):
                reply.action = {name: frame[name]}
        if frame.get("content_complete") is True:
            await self._on_complete(reply)

    async def _on_complete(self, reply: _Reply) -> None:
        reply.complete = True
        if reply.text:
            self.output.end_stream(reply.key, prefix(reply.kind), Text())
            self.connection.transcript.append(agent(reply.text))
        else:
            silent = "(no greeting: the caller speaks first)" if reply.kind == "greeting" else ""
            self.output.end_stream(
                reply.key, prefix(reply.kind), Text(silent or "(says nothing)", style="dim")
            )
        if reply.key == f"r{self._latest}":
            self._idle.set()
        # Actions run once the content has been spoken, which is now.
        if "end_call" in reply.action:
            self.output.line(Text("  the agent hung up", style="bold magenta"))
            self.ended.set()
            return
        if "transfer_number" in reply.action:
            number = reply.action["transfer_number"]
            self._note(f"  transfer to {number} (Retell would transfer the call now)", "magenta")
        elif "digit_to_press" in reply.action:
            self._note(f"  presses digits {reply.action['digit_to_press']}", "magenta")
        with contextlib.suppress(ConnectionClosed):
            await self.connection.update(turntaking="user_turn")

    def _on_tool_result(self, frame: Frame) -> None:
        ok = frame.get("successful")
        # An omitted `successful` means "not reported", not "failed".
        status, style = ("ok", "green") if ok is True else ("failed", "red")
        if not isinstance(ok, bool):
            status, style = "done", "yellow"
        content = shorten(str(frame.get("content", "")))
        self.output.line(
            Text("  result ", style="yellow") + Text(status, style=style) + f" {content}"
        )

    def _on_closed(self) -> None:
        if self._closing or self.ended.is_set():
            return
        code = self.connection.close_code
        meaning = CLOSE_MEANING.get(code or 0, "unexpected")
        self.output.line(
            Text(f"the server closed the socket: code {code} ({meaning})", style="red")
        )
        self.exit_code = 0 if code == 1000 else 1
        self.ended.set()

    # -------------------------------------------------------------------- pings

    async def _ping(self) -> None:
        warned = False
        last = 0
        try:
            while True:
                last = max(int(time.time() * 1000), last + 1)  # distinct, so echoes match
                self._sent_pings.add(last)
                await self.connection.send({"interaction_type": "ping_pong", "timestamp": last})
                self.pings_sent += 1
                await asyncio.sleep(self.ping_interval)
                silent = time.monotonic() - self._last_echo
                if silent > self.ping_timeout and not warned:
                    warned = True
                    self._note(
                        f"no ping_pong echo for {silent:.0f} s: Retell would close this socket "
                        "and reconnect",
                        "bold yellow",
                    )
                elif warned and silent <= self.ping_timeout:
                    warned = False
                    self._note("ping_pong echoes are back")
        except ConnectionClosed:
            return

    def _on_pong(self, frame: Frame) -> None:
        # Any ping_pong keeps Retell's connection alive; only our own count as echoes.
        self._last_echo = time.monotonic()
        timestamp = frame.get("timestamp")
        if isinstance(timestamp, int) and timestamp in self._sent_pings:
            self._sent_pings.discard(timestamp)
            self.pongs_received += 1

    def _note(self, text: str, style: str = "dim") -> None:
        self.output.line(Text(text, style=style))


def _int(frame: Frame, key: str) -> int:
    value = frame.get(key)
    return value if isinstance(value, int) else -1
