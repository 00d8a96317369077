"""A small, bounded pool of threads of its own for sync webhook handlers.

Sync handlers used to run on asyncio's default executor, which sync tools and
DNS lookups share. A handler that hangs cannot be stopped, and Retell retries
the event it timed out on, so each retry took one more shared thread until
every sync tool on every call timed out waiting for one. Here a handler takes a
thread from this pool or none: when all ``size`` are busy, the caller is told at
once (the webhook answers 503, and Retell retries later) instead of queueing
without end behind the hung ones.

Why not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined
when the interpreter exits, so one handler hung for good would keep
``callbrain serve`` from ever exiting after SIGTERM. These are daemon threads;
:meth:`shutdown` (at the end of the app's lifespan) lets idle ones go and
abandons hung ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

_Outcome: TypeAlias = tuple[Any, BaseException | None]
_Job: TypeAlias = tuple[
    contextvars.Context, Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, Any
]


class HandlerThreads:
    """Runs sync functions on at most ``size`` threads; see the module docstring."""

    def __init__(self, size: int, *, name: str = "callbrain-webhook") -> None:
        self.size = size
        self.name = name
        self.busy = 0
        """Jobs handed over and not yet finished (hung ones included); loop thread only."""
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._open = True

    def start(self) -> None:
        """Take jobs again after :meth:`shutdown` (an app's lifespan may run twice)."""
        self._open = True

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any] | None:
        """``fn(*args)`` on a thread of the pool, in a copy of the caller's context (so
        log lines keep their call id); None, at once, if no thread is free. Giving up
        on the future (a timeout) does not free the thread: only the end of ``fn`` does."""
        if not self._open or self.busy >= self.size:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.busy += 1
        # Every job in flight holds a thread or is about to be picked by an idle one.
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        if len(self._threads) < self.busy:
            thread = threading.Thread(
                target=self._work, args=(self._jobs,), name=self.name, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._jobs.put((contextvars.copy_context(), fn, args, loop, future))
        return future

    def shutdown(self) -> None:
        """Refuse new jobs; idle threads end now, busy ones when their job does."""
        self._open = False
        for _ in self._threads:
            self._jobs.put(None)
        # A fresh queue: the stop markers above are for the old threads only.
        self._jobs, self._threads = queue.SimpleQueue(), []

    def _work(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            context, fn, args, loop, future = job
            outcome: _Outcome
            try:
                outcome = (context.run(fn, *args), None)
            except BaseException as exc:  # reported to the caller, as an executor would
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._finished, future, outcome)
            del job, future, outcome  # not kept alive while waiting for the next job

    def _finished(self, future: asyncio.Future[Any], outcome: _Outcome) -> None:
        self.busy -= 1
        if future.done():  # the caller gave up on it
            return
        result, error = outcome
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
