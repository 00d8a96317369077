"""``callbrain serve`` as a process: uvicorn, configured once, with a shutdown
that suits phone calls.

:func:`uvicorn_config` is the one place uvicorn's settings are chosen, for
``callbrain serve``, the loopback servers of the tests and the bench alike, so
what is tested is what runs.

Plain uvicorn, on SIGTERM, closes every WebSocket at once with 1012, and Retell
ends a call on a close code it does not expect: every caller in progress would
be cut off mid-sentence by a routine deploy. Here the first SIGTERM (or Ctrl-C)
drains instead:

1. ``/healthz`` turns 503 at once, so a load balancer sends new calls elsewhere,
   and new sockets are refused;
2. calls in progress go on for up to ``server.drain_s`` seconds;
3. the open turn of each call still up is then finished (``content_complete``,
   never cut inside a chunk), and its connection is dropped *without* a close
   frame. Retell reads that as a lost connection and reconnects to the same URL
   (with ``auto_reconnect``), which the load balancer routes to a healthy
   instance, instead of ending the call;
4. the process exits with status 0.

A second signal stops at once.

Every socket costs a file descriptor, and the default soft limit (often 1,024)
is far below what a server of calls needs, so ``callbrain serve`` raises it to
the hard limit at start-up (:func:`raise_open_file_limit`). Connections that
have not finished their handshake are limited to a quarter of it, so strangers
cannot take the descriptors that calls need (:mod:`callbrain.server.handshake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from callbrain.errors import StartupError
from callbrain.server.handshake import HalfOpenConnections, handshake_protocols
from callbrain.server.settings import AccessSettings, ServerSettings

try:
    import resource
except ImportError:  # not on Windows: the limits there are not per process
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:  # kept light: `callbrain fake-llm` runs on ProcessServer too
    from callbrain.server.runtime import AgentRuntime

logger = logging.getLogger("callbrain.server")

_HANDLED: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

DEFAULT_WS_MAX_SIZE = 16 * 2**20
_UNLIMITED_NOFILE = 2**20
"""What "as far as the hard limit allows" means when the hard limit is infinite."""
_MIN_PENDING_HANDSHAKES = 16


def uvicorn_config(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: ServerSettings | None = None,
    **overrides: Any,
) -> uvicorn.Config:
    """uvicorn's configuration for callbrain's apps; ``overrides`` for the rest
    (log level, graceful shutdown time)."""
    access = settings.access if settings is not None else AccessSettings()
    half_open = HalfOpenConnections(
        access.handshake_timeout_s,
        pending_handshake_limit(access.max_pending_handshakes),
        access.rejections_per_minute,
    )
    # uvicorn's httptools and websockets-sansio protocols, with handshake deadlines.
    http_protocol, ws_protocol = handshake_protocols(half_open)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "lifespan": "on",
        "http": http_protocol,
        "ws": ws_protocol,
        # Frames are a few words of JSON: compressing each costs more CPU than the
        # bytes are worth. Declining the extension is always compatible.
        "ws_per_message_deflate": False,
        # Whose X-Forwarded-For to believe is the access settings' call
        # (trusted_proxies); uvicorn's default would trust 127.0.0.1's.
        "proxy_headers": False,
        # The hard cap, where uvicorn closes the socket (1009): far above the soft
        # cap, max_frame_bytes, at which the session ignores a frame and goes on.
        "ws_max_size": max(DEFAULT_WS_MAX_SIZE, 4 * access.max_frame_bytes),
        **overrides,
    }
    return uvicorn.Config(app, **options)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port the system picks), for
    uvicorn to listen on. Bound before anything is announced, so a port that is
    taken fails the start-up (a :class:`~callbrain.errors.StartupError` saying
    what to change) instead of printing a banner for a server that is not there;
    not listening until uvicorn serves, so a connection that is accepted (a load
    balancer's TCP check, say) still means the agents are ready.

    ``IPPROTO_TCP``, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only
    on sockets whose proto says TCP; without it each streamed chunk on a reused
    keep-alive connection waited ~40 ms for the client's delayed ACK.
    """
    if not 0 <= port <= 65535:
        raise StartupError(
            f"port {port} is not a TCP port (1-65535, or 0 for any free one); "
            "choose one with --port"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn does
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(_bind_failure(host, port, exc)) from exc
    sock.set_inheritable(True)
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another callbrain serve?); "
            "stop it, or choose another port with --port"
        )
    if exc.errno == errno.EACCES:
        return (
            f"no permission to listen on port {port} (ports below 1024 need privileges); "
            "choose another with --port, e.g. --port 8080"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; use --host 127.0.0.1 or 0.0.0.0"
    if isinstance(exc, socket.gaierror):
        return f"--host {host!r} is not a known address ({exc.strerror})"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def open_file_limit() -> int | None:
    """This process's soft limit on open files; None where there is none to read."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit(max_pending_handshakes: int) -> int | None:
    """Raise the soft open-file limit as far as the hard limit allows, and log the
    figure (one line). Returns the limit in force."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else _UNLIMITED_NOFILE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # macOS caps the soft limit below an infinite hard one
            logger.debug("could not raise the open-file limit to %d", wanted, exc_info=True)
    limit = open_file_limit()
    if limit == soft:
        how = "the hard limit" if soft == hard else f"hard limit {hard}"
    else:
        how = f"raised from {soft}"
    logger.info(
        "open-file limit: %s (%s); at most %d connections may wait on a handshake",
        "unlimited" if limit is None else limit,
        how,
        pending_handshake_limit(max_pending_handshakes),
    )
    return limit


def pending_handshake_limit(configured: int) -> int:
    """``max_pending_handshakes``, but never more than a quarter of the open-file
    limit: the rest is for calls (a socket each, plus their model connections)."""
    limit = open_file_limit()
    if limit is None:
        return configured
    return min(configured, max(_MIN_PENDING_HANDSHAKES, limit // 4))


def serve_when_ready(
    app: Starlette,
    sock: socket.socket,
    *,
    host: str,
    settings: ServerSettings,
    ready: Callable[[], None],
    listening: Callable[[], None] | None = None,
    signals: Sequence[signal.Signals] = _HANDLED,
) -> None:
    """``callbrain serve``: start every agent of ``app`` (check the store, load
    the models), raise the open-file limit, call ``ready`` (the banner: all it
    announces works), then serve on ``sock`` (bound and listening) until a
    signal ends the drain; ``listening`` is called once calls are taken. A
    start that fails raises its :class:`~callbrain.errors.StartupError` before
    anything else is said. ``signals``: those that drain (a worker of several
    leaves Ctrl-C to its supervisor, which sends it SIGTERM)."""
    runtimes: list[AgentRuntime] = app.state.runtimes

    async def main() -> None:
        for runtime in runtimes:
            await runtime.start()
        # Before the config: the share of descriptors half-open connections may
        # take is worked out from the limit.
        raise_open_file_limit(settings.access.max_pending_handshakes)
        port = int(sock.getsockname()[1])
        config = uvicorn_config(app, host=host, port=port, settings=settings)
        server = CallbrainServer(
            config, runtimes, drain_s=settings.drain_s, finish_turn_s=settings.finish_turn_s
        )
        server.handled_signals = tuple(signals)
        server.on_listening = listening
        ready()
        await server.serve(sockets=[sock])

    # uvicorn's choice of event loop (uvloop when installed), which it makes in its run().
    loop_factory = uvicorn.Config(app, log_config=None).get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


class ProcessServer(uvicorn.Server):
    """uvicorn as the process's own server, ending with status 0 on SIGINT/SIGTERM.

    uvicorn's ``capture_signals`` re-raises the signal after shutting down, so
    the process would die "by SIGTERM" (or, for SIGINT, with click's "Aborted!"
    and status 1) even after a clean shutdown.
    """

    handled_signals: tuple[signal.Signals, ...] = _HANDLED

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self.handled_signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class CallbrainServer(ProcessServer):
    """uvicorn's server with a draining first signal (see the module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        runtimes: Sequence[AgentRuntime],
        *,
        drain_s: float,
        finish_turn_s: float,
    ) -> None:
        super().__init__(config)
        self.runtimes = list(runtimes)
        self.drain_s = drain_s
        self.finish_turn_s = finish_turn_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self.on_listening: Callable[[], None] | None = None
        """Called once the sockets are listening (a worker tells its supervisor)."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        # uvicorn says nothing when it is handed its sockets; this is the line that
        # says calls are being taken.
        for sock in sockets or []:
            host, port = sock.getsockname()[:2]
            # A worker's supervisor says it once for all, after the banner.
            level = logging.INFO if self.on_listening is None else logging.DEBUG
            logger.log(level, "listening on http://%s:%d", host, port)
        if self.on_listening is not None:
            self.on_listening()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, not in a loop callback.
        if self._drain is not None or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        if self._drain is None:
            logger.info("%s: shutting down gracefully", name)
            self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            drains = (r.drain(self.drain_s, grace=self.finish_turn_s) for r in self.runtimes)
            left = sum(await asyncio.gather(*drains))
            if left:
                dropped = self._drop_websockets()
                logger.info("dropped %d call socket(s) for Retell to reconnect elsewhere", dropped)
        finally:
            self.should_exit = True

    def _drop_websockets(self) -> int:
        """Abort the call sockets still open: no close frame, so Retell reconnects."""
        dropped = 0
        for connection in list(self.server_state.connections):
            transport: Any = getattr(connection, "transport", None)
            if transport is not None and "websocket" in type(connection).__name__.lower():
                transport.abort()
                dropped += 1
        return dropped
