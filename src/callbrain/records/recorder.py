"""The call observer that writes every call to the records database.

The observer methods only append a reference to a queue: a call never waits
for the database and never sees its errors. One background task drains the
queue in batches (every ``flush_interval_s``, or sooner once ``batch_size``
records wait), turns them into rows, and writes each batch in one
transaction with a time limit. What cannot be written (a full queue, a write
that fails or times out) is dropped and counted in :attr:`CallRecorder.dropped`
(exported as ``callbrain_records_dropped_total``), with at most one log line
a minute saying how many and why.

The task starts with the app (or with the first call, for an app mounted in
another one, whose lifespan does not run), brings the tables up to date first
when ``migrate`` is on, deletes what is past ``retention_days`` every hour,
and on shutdown writes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from callbrain.call.record import CallRecord, TurnRecord
from callbrain.records.database import check_schema, load_migrations, migrate, open_engine
from callbrain.records.rows import Batch, CallKey
from callbrain.records.settings import RecordsSettings, database_url
from callbrain.records.write import purge, write_batch

logger = logging.getLogger("callbrain.records")

_PURGE_EVERY_S = 3600.0
_LOG_EVERY_S = 60.0
_CLOSE_TIMEOUT_S = 10.0

_Item = tuple[CallKey, CallRecord, TurnRecord | None]
"""A call (its start or end) or one of its turns, to write, with its socket's key."""
_ROWS_PER_STEP = 25
"""Rows made between two yields to the event loop, so a big batch holds no call up."""


class CallRecorder:
    """Records every call it is told about (see the module docstring)."""

    def __init__(self, settings: RecordsSettings) -> None:
        self.settings = settings
        self.url = database_url(settings.url)
        # A missing driver fails here; SQLite waits for a lock as long as we wait for it.
        self.engine: AsyncEngine = open_engine(self.url, busy_s=settings.write_timeout_s)
        if settings.migrate:
            load_migrations()  # Alembic's imports take 0.25 s: now, not on a call's loop
        self.dropped = 0
        """Records (turns, call starts and ends) that could not be written."""
        self.on_drop: Callable[[int], None] | None = None
        """Told how many each time records are dropped (the metrics of a worker)."""
        self.written = 0
        self._queue: deque[_Item] = deque()
        self._keys: dict[int, CallKey] = {}
        """Open sockets' row ids and redactors, by ``id()`` of their CallRecord
        (alive until its ``call_ended``, so the id is its own until then)."""
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._queued = 0
        self._settled = 0
        """Records queued so far, and of those, how many were written or dropped."""
        self._drain_to = 0
        """:meth:`flush` asked for every record up to this one to be settled."""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._ready = False
        self._purged_at: float | None = None
        self._unlogged: dict[str, int] = {}
        self._logged_at = -_LOG_EVERY_S

    # ------------------------------------------------------------ the observer

    def call_started(self, call: CallRecord) -> None:
        self._put(call, None)

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        pass  # a turn is written once it has ended

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        self._put(call, turn)

    def call_ended(self, call: CallRecord) -> None:
        self._put(call, None, last=True)

    def _put(self, call: CallRecord, turn: TurnRecord | None, *, last: bool = False) -> None:
        # The key goes with the record: once the call has ended its id() may be reused.
        key = self._keys.pop(id(call), None) if last else self._keys.get(id(call))
        if key is None:
            key = CallKey.new(self.settings.redact)
            if not last:
                self._keys[id(call)] = key
        if self._closing:
            self._drop(1, "the recorder has stopped")
            return
        if len(self._queue) >= self.settings.max_queue:
            self._drop(1, f"{self.settings.max_queue} records were already waiting (max_queue)")
            return
        self._queue.append((key, call, turn))
        self._queued += 1
        if self._task is None:
            self._spawn()  # an app mounted in another: its lifespan did not start us
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    # --------------------------------------------------------------- the task

    async def start(self) -> None:
        """Bring the tables up to date, then write in the background. A database
        that does not answer is logged, not fatal: calls go on, and their records
        are dropped (and counted) until it does."""
        if self._task is not None or self._closing:
            return
        try:
            async with asyncio.timeout(self.settings.write_timeout_s):
                await self._ensure_tables()
        except Exception as exc:
            logger.warning(
                "call records: cannot use the database %s yet (%s); calls go on, and "
                "their records are lost until it answers",
                _safe_url(self.url),
                _describe(exc),
            )
        else:
            logger.info("call records: writing to %s", _safe_url(self.url))
            await self._maybe_purge()
        self._spawn()

    def _spawn(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="call-records")

    async def flush(self) -> None:
        """Wait until every record queued so far is written (or dropped)."""
        target = self._queued
        if self._closing:
            return
        self._drain_to = max(self._drain_to, target)
        self._spawn()
        self._wake.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._settled >= target)

    async def aclose(self) -> None:
        """Write what is queued (for up to 10 s), then stop."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._queue:
            self._drop(len(self._queue), "the server stopped before they were written")
            self._queue.clear()
        await self._settle(self._queued - self._settled)
        self._log_drops(force=True)
        await self.engine.dispose()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                while self._queue:
                    await self._flush()
                    # A part batch waits for more, unless the queue is to be emptied.
                    draining = self._closing or self._settled < self._drain_to
                    if not draining and len(self._queue) < self.settings.batch_size:
                        break
                await self._maybe_purge()
            except Exception:  # a bug here must not end the recording
                logger.exception("call records: the writer failed; it goes on")
            self._log_drops()
            if self._closing and not self._queue:
                return

    async def _flush(self) -> None:
        size = min(len(self._queue), self.settings.batch_size)
        items = [self._queue.popleft() for _ in range(size)]
        try:
            batch = await self._rows(items)
        except Exception:
            logger.exception("call records: could not make rows of %d record(s)", size)
            self._drop(size, "they could not be made into rows")
        else:
            try:
                async with asyncio.timeout(self.settings.write_timeout_s):
                    await self._ensure_tables()
                    async with self.engine.begin() as connection:
                        await write_batch(connection, batch)
            except Exception as exc:
                self._drop(size, _reason(exc))
            else:
                self.written += size
        await self._settle(size)

    async def _settle(self, count: int) -> None:
        async with self._progress:
            self._settled += count
            self._progress.notify_all()

    async def _rows(self, items: list[_Item]) -> Batch:
        batch = Batch()
        for n, (key, call, turn) in enumerate(items):
            if n and n % _ROWS_PER_STEP == 0:
                await asyncio.sleep(0)
            if turn is None:
                batch.add_call(key, call)
            else:
                batch.add_turn(key, call, turn)
        return batch

    async def _ensure_tables(self) -> None:
        if self._ready:
            return
        if self.settings.migrate:
            await migrate(self.engine)
        else:
            await check_schema(self.engine)
        self._ready = True

    async def _maybe_purge(self) -> None:
        now = time.monotonic()
        due = self._purged_at is None or now - self._purged_at >= _PURGE_EVERY_S
        if self._ready and due:
            self._purged_at = now
            await self.purge_expired()

    async def purge_expired(self) -> int:
        """Delete the calls older than ``retention_days`` (the task does it hourly);
        returns how many sockets' records went."""
        days = self.settings.retention_days
        if days is None:
            return 0
        cutoff = datetime.now(UTC) - timedelta(days=days)
        try:
            async with asyncio.timeout(self.settings.write_timeout_s * 6):
                async with self.engine.begin() as connection:
                    gone = await purge(connection, cutoff)
        except Exception as exc:
            logger.warning("call records: could not delete old calls (%s)", _describe(exc))
            return 0
        if gone:
            logger.info("call records: deleted %d call(s) older than %g days", gone, days)
        return gone

    # ---------------------------------------------------------- what is lost

    def _drop(self, count: int, reason: str) -> None:
        self.dropped += count
        if self.on_drop is not None:
            self.on_drop(count)
        self._unlogged[reason] = self._unlogged.get(reason, 0) + count

    def _log_drops(self, *, force: bool = False) -> None:
        """At most one warning a minute, saying how many records went and why."""
        now = time.monotonic()
        if not self._unlogged or (not force and now - self._logged_at < _LOG_EVERY_S):
            return
        self._logged_at = now
        reasons = "; ".join(f"{n} because {why}" for why, n in self._unlogged.items())
        self._unlogged.clear()
        logger.warning(
            "call records: dropped %s (%d dropped since the start; database %s)",
            reasons,
            self.dropped,
            _safe_url(self.url),
        )


def _reason(exc: BaseException) -> str:
    """Why a write failed, as the end of "dropped N because ..."."""
    if isinstance(exc, TimeoutError):
        return "the database did not answer in time (write_timeout_s)"
    return f"the write failed ({_describe(exc)})"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within write_timeout_s"
    lines = str(exc).strip().splitlines()  # SQLAlchemy adds a help link on a second line
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _safe_url(url: str) -> str:
    """The URL without its password, for the log."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
