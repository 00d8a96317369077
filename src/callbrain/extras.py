"""Optional parts of callbrain and the one error for a part that is not installed.

The core (the server, the OpenAI and Anthropic backends, tools) is what
``pip install callbrain`` brings. The rest is an extra, installed only by a
deployment that uses it: ``local`` (llama.cpp, about 100 MB), ``redis``,
``testing`` (the terminal chat, the bench), ``bench`` (the bench's curve
plot), ``records`` (PostgreSQL drivers)
and ``otel`` (OpenTelemetry). Code that needs one imports it where it is used
and turns the ImportError into :class:`MissingExtraError`, which names what to
install.
"""

from __future__ import annotations


class MissingExtraError(ImportError):
    """A feature needs an extra that is not installed; the message says which."""


def missing_extra(extra: str, feature: str) -> MissingExtraError:
    """The error for ``feature`` without the ``extra`` installed (raise it ``from`` the
    ImportError)."""
    return MissingExtraError(
        f"{feature} needs the '{extra}' extra: pip install 'callbrain[{extra}]'"
    )
