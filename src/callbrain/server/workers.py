"""``callbrain serve --workers N``: several processes serving one port.

One Python process serves calls on one core. With N workers the supervisor
(this module, the process you started) binds the port once, brings the
records' tables up to date once, and starts N workers
(:mod:`callbrain.server.worker`), each a whole server on the shared socket;
the kernel hands each new connection to one of them. What they must share,
they share outside any one of them:

* the store (a call's memory, tools' results and run locks): Redis when
  ``server.store.redis_url`` is set, else one SQLite file on this machine
  (``server.store.path``, default :func:`default_store_path`), so a reconnect
  that lands on another worker finds its call;
* the metrics: prometheus_client's multiprocess mode, in a fresh folder of
  the supervisor's, so a scrape of any worker counts every worker's calls;
* the records database (SQLite in WAL mode with a busy timeout, or PostgreSQL):
  each worker writes its own calls.

The first SIGTERM or Ctrl-C is passed to every worker as SIGTERM, and each
drains as a single server does (``/healthz`` 503, open turns finished, calls
handed back to Retell); the supervisor exits 0 once all have. A second signal
is passed on too, which stops the workers at once. A worker that dies
otherwise is logged and replaced (after a pause that grows if replacements keep
dying young).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from callbrain.agent import Agent
from callbrain.errors import StartupError
from callbrain.server.settings import ServerSettings
from callbrain.server.worker import MODULE, WorkerSpec

logger = logging.getLogger("callbrain.workers")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_YOUNG_S = 30.0
"""A worker that dies sooner than this after it started is replaced after a pause."""
_MAX_PAUSE_S = 30.0


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS
        return os.cpu_count() or 1


def default_store_path(port: int) -> Path:
    """``$XDG_DATA_HOME/callbrain/store-<port>.db`` (``~/.local/share`` by default):
    one file per port, so two servers on one machine never share a store, and a
    server restarted on its port finds the calls of the one before."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "callbrain" / f"store-{port}.db"


def one_worker_reason(agents: Sequence[Agent], settings: ServerSettings) -> str | None:
    """Why a worker each would not do, or None."""
    if settings.console:
        return "the web console keeps its live view and logins in one process"
    if any(c.provider == "local" for a in agents for c in (a.llm, *a.fallback_llms)):
        return "an agent runs a local model, which every worker would load again"
    return None


def worker_count(
    requested: int | None, agents: Sequence[Agent], settings: ServerSettings
) -> tuple[int, str | None]:
    """How many workers, and a note for the log after the banner (why one, or
    what several cost), if there is one to make."""
    asked = requested if requested is not None else settings.workers
    reason = one_worker_reason(agents, settings)
    if asked is None:
        if reason is not None and available_cores() > 1:
            return 1, f"serving with one worker: {reason} (--workers N to choose)"
        return (1 if reason else available_cores()), None
    if asked > 1 and settings.console:
        raise StartupError(
            f"--workers {asked} with server.console on: the web console keeps its live view "
            "and logins in one process; serve it with --workers 1"
        )
    if asked > 1 and reason is not None:
        return asked, f"{asked} workers: {reason} ({asked} copies in memory)"
    return asked, None


def shared_store(settings: ServerSettings, port: int) -> str | None:
    """The SQLite file the workers share (None: Redis), checked now: one that
    cannot be used fails the start with a :class:`StartupError` naming it."""
    from callbrain.stores.sqlite import open_sqlite_store

    stored = settings.store
    if stored.redis_url is not None:
        return None
    path = stored.path or str(default_store_path(port))
    store = open_sqlite_store(path)
    asyncio.run(store.aclose())
    return str(store.path)


def describe(count: int, store_path: str | None) -> str:
    """The banner's Workers line."""
    store = "Redis" if store_path is None else f"SQLite {store_path}"
    return f"{count} processes on this port; store: {store}"


def migrate_records(settings: ServerSettings) -> None:
    """Bring the records' tables up to date once, before the workers start (each
    would otherwise race the others on a new SQLite file). A database that does
    not answer is the workers' to report, as it is for a single server."""
    from callbrain.records.settings import database_url, settings_of

    records = settings_of(settings.records)
    if records is None or not records.migrate:
        return
    from callbrain.records.database import migrate, open_engine

    engine = open_engine(database_url(records.url), busy_s=records.write_timeout_s)

    async def upgrade() -> None:
        try:
            async with asyncio.timeout(records.write_timeout_s):
                await migrate(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(upgrade())
    except Exception as exc:
        logger.warning("call records: could not update the tables before the start (%s)", exc)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    link: socket.socket
    started: float
    loaded: bool = False
    """Its agents are built, the store checked, the models loaded."""
    ready: bool = False
    """It listens."""
    buffer: bytes = b""
    error: str | None = None


@dataclass
class Supervisor:
    """Starts, watches, replaces and stops the workers (see the module docstring)."""

    count: int
    spec: WorkerSpec
    """Every worker's spec but for its number and link."""
    sock: socket.socket
    workers: dict[int, _Worker] = field(default_factory=dict)
    _metrics_dir: str = ""
    _selector: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)
    _restarts: dict[int, float] = field(default_factory=dict)
    """Worker numbers to start again, and when."""
    _failures: int = 0
    _signals: int = 0
    _announced: bool = False
    _listening: bool = False

    def run(self, ready: Callable[[], None]) -> int:
        """Serve until a signal stops every worker. As a single server does, the
        workers first start everything (agents, store, models) and wait; once
        all N have, ``ready`` prints the banner and they are told to listen,
        so a port that accepts means the server is announced and whole. A
        worker that cannot start fails the whole start with its
        :class:`StartupError` (the others are stopped first)."""
        self._metrics_dir = tempfile.mkdtemp(prefix="callbrain-metrics-")
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        self._selector.register(wake_read, selectors.EVENT_READ, None)
        try:
            for index in range(1, self.count + 1):
                self._spawn(index)
            return self._loop(wake_read, ready)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in list(self.workers.values()):  # only after a failed start
                worker.process.kill()
                self._reap(worker)
            wake_read.close()
            wake_write.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _loop(self, wake: socket.socket, ready: Callable[[], None]) -> int:
        announced = False
        failure: str | None = None
        while self.workers or self._restarts:
            timeout = None
            if self._restarts:
                timeout = max(0.0, min(self._restarts.values()) - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._signalled(wake)
                else:
                    failure = self._heard(key.data, announced) or failure
            if failure is not None and not self._signals:
                self._stop("a worker could not start", log=logging.DEBUG)
            healthy = not self._signals and failure is None
            if not announced and healthy and self._all("loaded"):
                announced = self._announced = True
                for worker in self.workers.values():
                    logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)
                ready()
                for worker in self.workers.values():
                    self._go(worker)
            if announced and healthy and not self._listening and self._all("ready"):
                self._listening = True
                host, port = self.sock.getsockname()[:2]
                logger.info("listening on http://%s:%d (%d workers)", host, port, self.count)
            now = time.monotonic()
            for index, when in list(self._restarts.items()):
                if when <= now and not self._signals:
                    del self._restarts[index]
                    self._spawn(index)
        if failure is not None and not announced:
            raise StartupError(failure)
        return 0

    def _all(self, state: str) -> bool:
        workers = self.workers.values()
        return len(workers) == self.count and all(getattr(w, state) for w in workers)

    @staticmethod
    def _go(worker: _Worker) -> None:
        """Tell a worker that has started to listen."""
        with contextlib.suppress(OSError):  # it died meanwhile: its end is read next
            worker.link.sendall(b"go\n")

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        spec = replace(self.spec, index=index, link_fd=theirs.fileno())
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, spec.to_json()],
            pass_fds=(self.sock.fileno(), theirs.fileno()),
            env=env,
            process_group=0,  # a terminal's Ctrl-C is ours to pass on, once
        )
        theirs.close()
        ours.setblocking(False)
        worker = _Worker(index, process, ours, time.monotonic())
        self.workers[index] = worker
        self._selector.register(ours, selectors.EVENT_READ, worker)
        # The first ones are named once all are up: a failed start says one line.
        if self._announced:
            logger.info("worker %d started (pid %d)", index, process.pid)

    def _heard(self, worker: _Worker, announced: bool) -> str | None:
        """Read the worker's link; a start-up failure's message, if that is what it said."""
        try:
            data = worker.link.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            worker.buffer += data
            *lines, worker.buffer = worker.buffer.split(b"\n")
            for line in lines:
                message = orjson.loads(line)
                if message.get("loaded"):
                    worker.loaded = True
                    if announced:  # a replacement: at once
                        self._go(worker)
                elif message.get("ready"):
                    worker.ready = True
                    if announced:
                        logger.info(
                            "worker %d (pid %d) is taking calls", worker.index, worker.process.pid
                        )
                elif "error" in message:
                    worker.error = str(message["error"])
                    if announced:
                        logger.error("worker %d could not start: %s", worker.index, worker.error)
            return None if announced else worker.error
        return self._exited(worker, announced)

    def _exited(self, worker: _Worker, announced: bool) -> str | None:
        status = self._reap(worker)
        if self._signals:
            level = logging.INFO if self._announced else logging.DEBUG  # a failed start: one line
            logger.log(level, "worker %d (pid %d) has stopped", worker.index, worker.process.pid)
            return None
        if not announced:
            return worker.error or (
                f"worker {worker.index} exited {status} before it was ready "
                "(its log lines above say why)"
            )
        lived = time.monotonic() - worker.started
        self._failures = self._failures + 1 if lived < _YOUNG_S else 0
        pause = 0.0 if not self._failures else min(_MAX_PAUSE_S, 0.5 * 2 ** (self._failures - 1))
        logger.warning(
            "worker %d (pid %d) exited %s; starting another%s",
            worker.index,
            worker.process.pid,
            status,
            f" in {pause:g} s" if pause else "",
        )
        self._restarts[worker.index] = time.monotonic() + pause
        return None

    def _reap(self, worker: _Worker) -> str:
        """Forget an exited worker (its live metrics too); how it ended."""
        from prometheus_client.multiprocess import mark_process_dead

        self._selector.unregister(worker.link)
        worker.link.close()
        del self.workers[worker.index]
        code = worker.process.wait()
        mark_process_dead(worker.process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"with status {code}"

    def _signalled(self, wake: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            for number in wake.recv(64):
                name = signal.Signals(number).name
                self._signals += 1
                if self._signals == 1:
                    self._stop(f"{name}: shutting down gracefully")
                else:
                    self._stop(f"{name} again: stopping the workers now", log=logging.WARNING)

    def _stop(self, why: str, *, log: int = logging.INFO) -> None:
        """SIGTERM to every worker: the first drains it, the second stops it."""
        self._signals = max(self._signals, 1)
        self._restarts.clear()
        # No worker will be started again: let go of our copy of the port, so it
        # refuses connections once the workers have closed theirs.
        self.sock.close()
        logger.log(log, "%s (%d worker(s))", why, len(self.workers))
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)


def serve_workers(
    agents: Sequence[Agent], spec: WorkerSpec, count: int, *, port: int, note: str | None
) -> int:
    """``callbrain serve`` with ``count`` workers: bind, migrate, start them, and
    announce the server once all listen; the exit status. ``spec``: what every
    worker is told (its number, socket and store are filled in here)."""
    from callbrain.server.app import create_app, server_settings
    from callbrain.server.process import listening_socket
    from callbrain.startup import announce

    settings = server_settings(agents)
    # Built here and dropped, as a single server builds it before it binds: a
    # tool that does not import, a missing key or extra is one line, before any
    # worker starts (the workers build their own).
    create_app(agents, prefix=spec.prefix)
    sock = listening_socket(spec.host, port)
    bound = int(sock.getsockname()[1])
    store_path = shared_store(settings, bound)
    migrate_records(settings)
    spec = replace(spec, listen_fd=sock.fileno(), store_path=store_path)

    def ready() -> None:
        announce(
            agents,
            settings,
            host=spec.host,
            port=bound,
            prefix=spec.prefix,
            json=spec.log_json,
            workers=describe(count, store_path),
        )
        if note is not None:
            logger.info("%s", note)

    try:
        return Supervisor(count, spec, sock).run(ready)
    finally:
        sock.close()
