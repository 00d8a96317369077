"""Whole sentences only: the rule that a caller never hears half a sentence.

A reply that runs into ``max_tokens`` stops wherever the count ran out ("...I'm
not available on"). Text is spoken as it streams, so a cut cannot be undone
once it is heard; instead :class:`SentenceGate` holds back the sentence being
written and passes text on only up to the last sentence end. When the
completion finishes, what is held back is released, unless ``max_tokens`` cut
it off: then it is dropped, and the reply ends with its last whole sentence.

A sentence ends at ``.``, ``!``, ``?`` or ``…`` (and any closing quote or
bracket) followed by white space. That space is what tells "8 am." from
"4.5", so the last sentence is only known to be whole once the model ends.
Periods after a single letter ("a.m.", "U.S.") or a title ("Dr.", "Mrs.")
are not sentence ends.

The price is latency for the first words: they are passed on when the first
sentence is written, not at the first token (for a 15-token sentence at
70 tokens/s, about 0.2 s). Speech starts at a sentence anyway.
"""

from __future__ import annotations

import re

_END = re.compile(r"[.!?…][\"')\]\u2019\u201d]*(?=\s)")
# Words whose period does not end a sentence (lower case, without the period).
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "st", "prof", "mt", "vs", "etc"})
_WORD_BEFORE = re.compile(r"(\w+)\.$")


def sentence_end(text: str) -> int:
    """Where the last whole sentence of ``text`` ends (0 if none has ended)."""
    for match in reversed(list(_END.finditer(text))):
        if _ends_sentence(text[: match.end()]):
            return match.end()
    return 0


def ends_sentence(text: str) -> bool:
    """Whether ``text`` (stripped) stops at the end of a sentence."""
    text = text.rstrip()
    return bool(text) and sentence_end(text + " ") == len(text)


def _ends_sentence(head: str) -> bool:
    word = _WORD_BEFORE.search(head.rstrip("\"')]\u2019\u201d"))
    if word is None:
        return True  # "!", "?", "…", or a period after a non-word such as ")"
    before = word.group(1)
    if len(before) == 1 and before.isalpha():
        return False  # "a.m.", "p.m.", "U.S.", "J. Smith"
    return before.lower() not in _ABBREVIATIONS


class SentenceGate:
    """Passes text on a whole sentence at a time; see the module docstring."""

    def __init__(self) -> None:
        self._held = ""
        self.released = ""
        """Everything passed on so far."""
        self.dropped = ""
        """What :meth:`finish` left unsaid."""

    def feed(self, text: str) -> str:
        """Take the next piece of the reply; returns what may be said now ("" if nothing)."""
        self._held += text
        end = sentence_end(self._held)
        if not end:
            return ""
        ready, self._held = self._held[:end], self._held[end:]
        self.released += ready
        return ready

    def finish(self, *, cut: bool) -> str:
        """The reply is over: the rest, or "" when ``max_tokens`` cut it (``cut``).
        Safe to call again: there is then nothing left."""
        rest, self._held = self._held, ""
        if cut:
            self.dropped += rest
            return ""
        self.released += rest
        return rest
