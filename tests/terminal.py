"""A command run on a pseudo-terminal, as a person runs it: for the tests of what
``callbrain chat`` shows and does while someone types (imported by test modules).

The output is read as it comes (in the test's event loop, so an in-process
server keeps serving) and waited on by content, never by time. prompt_toolkit
asks the terminal where its cursor is (``ESC[6n``) and waits for the answer;
the answer is given here, as a terminal would.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import termios
from collections.abc import Sequence

_ANSI = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")
_CURSOR_QUERY = b"\x1b[6n"


class Terminal:
    """``args`` running with a terminal of ``columns`` x ``rows`` as its stdin,
    stdout and stderr. Use as an async context manager."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        columns: int = 80,
        rows: int = 24,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.columns = columns
        self.rows = rows
        self.env = {**os.environ, "TERM": "xterm-256color", **(env or {})}
        self.raw = b""
        self._master = -1
        self._changed = asyncio.Event()
        self._eof = False
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Terminal:
        master, slave = pty.openpty()
        size = struct.pack("HHHH", self.rows, self.columns, 0, 0)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdin=slave, stdout=slave, stderr=slave, env=self.env,
            start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self._master = master
        os.set_blocking(master, False)
        asyncio.get_running_loop().add_reader(master, self._read)
        return self

    async def __aexit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_reader(self._master)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self.proc is not None:
            await self.proc.wait()
        os.close(self._master)

    def _read(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the other side has closed
            data = b""
        if not data:
            self._eof = True
            asyncio.get_running_loop().remove_reader(self._master)
        if _CURSOR_QUERY in data:
            os.write(self._master, b"\x1b[1;1R")
        self.raw += data
        self._changed.set()

    @property
    def text(self) -> str:
        """Everything shown so far, without escape sequences."""
        return _ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    async def wait_for(self, pattern: str, timeout: float = 20.0) -> None:
        """Until ``pattern`` (a regular expression) is in :attr:`text`."""
        try:
            async with asyncio.timeout(timeout):
                while not re.search(pattern, self.text):
                    if self._eof:
                        raise AssertionError(f"closed before {pattern!r}:\n{self.text}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text}") from None

    def type(self, keys: str) -> None:
        os.write(self._master, keys.encode())

    async def exit_code(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)
