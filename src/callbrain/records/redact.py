"""What of a call's text is kept in its record: the ``redact`` setting.

* ``none``: everything, as said.
* ``pii``: runs of digits with 3 digits or more (phone, card and account
  numbers, dates; "3 pm" and "10:30" stay), email addresses, and names are
  replaced by ``[number]``, ``[email]`` and ``[name]``. A name is known when a
  call variable or a tool argument has a name-like key (``name``,
  ``first_name``, ``patient_name``...): its value is replaced there, and each
  of its words wherever it appears in the call's text from then on. A name
  the caller says that no variable or tool argument carries is not found.
* ``all_text``: every text (what was said, variables, tool arguments and
  results, the model's text) is replaced by its length; tool argument keys
  are kept, so the record still shows which tool got which fields.

It runs when a batch is written, in the recorder's task, never on a call's path.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from callbrain.records.settings import Redaction

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_NUMBER = re.compile(r"\+?\d(?:[\d\s().\-/]*\d)?")
_NAME_KEY = re.compile(r"(?:^|_)(?:first|last|full|given|family|sur)?_?name$", re.IGNORECASE)
_MIN_DIGITS = 3


class Redactor:
    """Applies one redaction mode to one call's texts; learns its names as it goes."""

    def __init__(self, mode: Redaction) -> None:
        self.mode = mode
        self._names: set[str] = set()
        self._name_pattern: re.Pattern[str] | None = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def learn(self, values: dict[str, Any]) -> None:
        """Remember the values of name-like keys (variables or tool arguments, nested too)."""
        if self.mode != "pii":
            return
        found = set(_names_in(values))
        if found - self._names:
            self._names |= found
            words = sorted(self._names, key=len, reverse=True)
            self._name_pattern = re.compile(
                r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE
            )

    def learn_arguments(self, arguments: str) -> None:
        """:meth:`learn` from a tool call's JSON arguments."""
        parsed = _object(arguments) if self.mode == "pii" else None
        if parsed is not None:
            self.learn(parsed)

    def text(self, value: str) -> str:
        if self.mode == "none" or not value:
            return value
        if self.mode == "all_text":
            return f"[redacted: {len(value)} chars]"
        value = _EMAIL.sub("[email]", value)
        value = _NUMBER.sub(_number, value)
        if self._name_pattern is not None:
            value = self._name_pattern.sub("[name]", value)
        return value

    def variables(self, values: dict[str, Any]) -> dict[str, Any]:
        """A redacted copy of a flat mapping (variables, tool arguments)."""
        if self.mode == "none":
            return dict(values)
        self.learn(values)
        return {key: self._value(key, value) for key, value in values.items()}

    def arguments(self, arguments: str) -> str:
        """Tool arguments (JSON text): values redacted, keys kept."""
        if self.mode == "none":
            return arguments
        parsed = _object(arguments)
        if parsed is None:
            return self.text(arguments)
        return orjson.dumps(self.variables(parsed)).decode()

    def _value(self, key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._value(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(key, item) for item in value]
        if not isinstance(value, str):
            if value is None or isinstance(value, bool):
                return value
            shown = self.text(str(value))
            return value if shown == str(value) else shown
        if self.mode == "pii" and _NAME_KEY.search(key):
            return "[name]"
        return self.text(value)


def _names_in(values: dict[str, Any]) -> Any:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _names_in(value)
        elif isinstance(value, str) and _NAME_KEY.search(key):
            yield from re.findall(r"\w{2,}", value)


def _object(text: str) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _number(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match.group())
    return "[number]" if digits >= _MIN_DIGITS else match.group()
