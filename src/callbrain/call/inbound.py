"""What an inbound frame must pass before the session acts on it.

A frame from Retell is skipped, with a log line and a count for the metrics,
when it is binary, not JSON, of an unknown type, malformed or nested too
deep, or larger than ``max_frame_bytes``; the call goes on. Requests for an
answer (``response_required``, ``reminder_required``) are the exception to the
size rule: one is always answered, whatever its size, because dead air is the
worse outcome. Every transcript is then cut to ``max_transcript_chars`` from
its oldest end (:func:`~callbrain.call.conversation.fit_transcript`), with one
warning per call.

Retell documents no limit on what it sends. Its word timings, about twelve
bytes a word, are most of a long transcript's bytes and are never parsed.
"""

from __future__ import annotations

import logging

from callbrain.call.conversation import fit_transcript
from callbrain.call.record import CallRecord, Observers
from callbrain.retell.frames import (
    FrameError,
    InboundFrame,
    ReminderRequired,
    ResponseRequired,
    UnknownInteraction,
    UpdateOnly,
    parse_inbound,
)
from callbrain.server.settings import AccessSettings

logger = logging.getLogger("callbrain.call")


class InboundFrames:
    """One call's gate for inbound frames (see the module docstring)."""

    def __init__(self, limits: AccessSettings, observers: Observers, record: CallRecord) -> None:
        self._limits = limits
        self._observers = observers
        self._record = record
        self._transcript_cut = False  # the first cut is a warning, later ones debug

    def read(self, raw: str | bytes) -> InboundFrame | None:
        """The frame to act on, or None if it is skipped."""
        if isinstance(raw, bytes):
            logger.warning("ignored a binary frame (%d bytes); Retell sends only text", len(raw))
            self._observers.frame_ignored(self._record, "binary")
            return None
        try:
            frame = parse_inbound(raw)
        except UnknownInteraction as exc:
            logger.info("ignored frame: %s", exc)
            self._observers.frame_ignored(self._record, "unknown_type")
            return None
        except FrameError as exc:
            logger.warning("ignored malformed frame (%d chars): %s", len(raw), exc)
            self._observers.frame_ignored(self._record, "malformed")
            return None
        request = isinstance(frame, ResponseRequired | ReminderRequired)
        if not request and self._oversized(raw):
            return None
        if isinstance(frame, UpdateOnly | ResponseRequired | ReminderRequired):
            frame, cut = fit_transcript(frame, self._limits.max_transcript_chars)
            if cut is not None:
                logger.log(logging.DEBUG if self._transcript_cut else logging.WARNING, "%s", cut)
                self._transcript_cut = True
        return frame

    def _oversized(self, raw: str) -> bool:
        size = len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))
        if size <= self._limits.max_frame_bytes:
            return False
        logger.warning(
            "ignored a %d-byte frame: over max_frame_bytes (%d); the call goes on",
            size,
            self._limits.max_frame_bytes,
        )
        self._observers.frame_ignored(self._record, "oversized")
        return True
