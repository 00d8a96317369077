"""One worker of ``callbrain serve --workers N``: the child side.

The supervisor (:mod:`callbrain.server.workers`) starts each worker as
``python -m callbrain.server.worker '<spec as JSON>'``, a fresh interpreter
(never a fork: the parent's threads, event loop and prometheus_client state
must not be copied), in a process group of its own, with two descriptors:

* the listening socket, bound once by the supervisor, on which every worker
  accepts (the kernel hands each new connection to one of them);
* one end of a socket pair, its *link*: the worker says ``ready`` on it once it
  listens, or the one-line error that stopped its start-up; and when the
  supervisor goes away (even killed), the link reads end-of-file and the
  worker drains as on SIGTERM, so no worker outlives its supervisor.

A worker is otherwise ``callbrain serve`` of one process: it loads the agent
files, builds the app, checks the store, loads the models and drains on
SIGTERM. Ctrl-C is the supervisor's: it reaches the worker as SIGTERM.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

MODULE = "callbrain.server.worker"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told on its command line."""

    index: int
    """1 to N, in its log lines (a replacement keeps the number of the one it replaces)."""
    files: list[str]
    prefix: str
    host: str
    log_level: str
    log_json: bool
    debug: bool
    listen_fd: int
    link_fd: int
    store_path: str | None
    """The SQLite store the workers share (None: Redis, as the agent file says)."""

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**orjson.loads(text))


class SupervisorLink:
    """The worker's end of its socket pair (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self.socket = socket.socket(fileno=fd)
        self._lock = threading.Lock()
        self.go = threading.Event()
        """Set when the supervisor says to listen (all workers have started)."""

    def say(self, **message: object) -> None:
        # OSError: the supervisor is gone; the watcher drains us.
        with self._lock, contextlib.suppress(OSError):
            self.socket.sendall(orjson.dumps(message) + b"\n")

    def loaded(self) -> None:
        """Everything has started: say so, and wait to be told to listen."""
        self.say(loaded=True)
        self.go.wait()

    def ready(self) -> None:
        self.say(ready=True, pid=os.getpid())

    def watch(self) -> None:
        """Hear "go"; drain (SIGTERM to ourselves) when the supervisor's end closes."""

        def wait_for_end() -> None:
            with contextlib.suppress(OSError):
                while data := self.socket.recv(64):
                    if b"go" in data:
                        self.go.set()
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=wait_for_end, name="callbrain-supervisor-link", daemon=True).start()


def run(spec: WorkerSpec, link: SupervisorLink) -> int:
    """Serve as ``callbrain serve`` would, in this worker; the exit status."""
    from callbrain.logs import configure_logging
    from callbrain.server.app import create_app, server_settings
    from callbrain.server.process import serve_when_ready
    from callbrain.startup import EXIT_BUG, EXIT_CONFIG, load_agents, user_errors

    configure_logging(spec.log_level, json=spec.log_json, worker=spec.index)
    try:
        agents = load_agents([Path(file) for file in spec.files])
        if spec.store_path is not None:
            for agent in agents:  # every agent's block, so they still compare equal
                agent.server.store.path = spec.store_path
        application = create_app(agents, prefix=spec.prefix)
        settings = server_settings(agents)
        sock = socket.socket(fileno=spec.listen_fd)

        def ready() -> None:
            # As in `callbrain serve`: the start-up's objects are never walked again.
            gc.collect()
            gc.freeze()
            link.loaded()

        serve_when_ready(
            application,
            sock,
            host=spec.host,
            settings=settings,
            ready=ready,
            listening=link.ready,
            signals=(signal.SIGTERM,),
        )
    except user_errors() as exc:
        if spec.debug:
            traceback.print_exc()
        link.say(error=str(exc))
        return EXIT_CONFIG
    except Exception as exc:
        if spec.debug:
            traceback.print_exc()
        hint = "" if spec.debug else " (--debug shows the traceback)"
        link.say(error=f"unexpected {type(exc).__name__}: {exc}{hint}")
        return EXIT_BUG
    return 0


def main(argv: list[str]) -> int:
    # Before anything else: a Ctrl-C meant for the supervisor must not interrupt
    # our start-up (the supervisor passes it on as SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = WorkerSpec.from_json(argv[0])
    link = SupervisorLink(spec.link_fd)
    link.watch()
    return run(spec, link)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
