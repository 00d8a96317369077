"""Turn the model's argument text into a checked dict, or tell the model what to fix.

Models write tool arguments as JSON text, and not always valid JSON: trailing
commas, single quotes, unquoted keys, a code fence, an object cut short by the
token limit. Failing the call over a missing brace wastes a turn the caller
hears as silence, so :func:`parse_arguments` repairs what it can (with
``json_repair``) and only rejects what has no object in it.

Every rejection is an :class:`ArgumentsError` whose message is written for the
model, which reads it as the tool's result and usually corrects its next call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import json_repair
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from callbrain.tools.base import ToolError

logger = logging.getLogger("callbrain.tools")

MAX_PROBLEMS = 5
"""More than a handful of problems means the model misunderstood the tool;
listing them all only costs context."""

_MAX_PROBLEM_CHARS = 200


class ArgumentsError(ToolError):
    """The model's arguments could not be parsed or do not fit the tool's parameters."""


def parse_arguments(raw: str) -> dict[str, Any]:
    """Parse the model's argument text into a dict, repairing near-JSON.

    Valid JSON takes the fast path (orjson). Anything else goes through
    ``json_repair``; a repair is logged at info (the text itself at debug: it
    may hold what the caller said). Empty text means no arguments. A JSON
    string holding an object (arguments encoded twice, which some models do)
    is unwrapped once.
    """
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = _repair(raw)
    if isinstance(value, str) and value.strip().startswith("{"):
        value = parse_arguments(value)
    if not isinstance(value, dict):
        raise ArgumentsError(
            f'arguments must be a JSON object such as {{"name": value}}, got {_json_kind(value)}'
        )
    return value


def _repair(raw: str) -> Any:
    value = json_repair.loads(raw, skip_json_loads=True)
    if value == "":  # json_repair's answer for "nothing JSON-like in here"
        raise ArgumentsError(
            'arguments are not valid JSON: send a JSON object such as {"name": value}'
        )
    logger.info("repaired malformed tool arguments (%d characters)", len(raw))
    logger.debug("malformed tool arguments were: %r", raw)
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def validate_against_schema(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Check ``arguments`` against a JSON schema (Draft 2020-12, formats checked).

    Raises :class:`ArgumentsError` listing up to :data:`MAX_PROBLEMS` problems,
    each with where it is, so the model can fix them all in one retry. A broken
    *schema* is the tool author's bug, not the model's: that raises ValueError.
    """
    validator = _validator(_schema_key(schema))
    errors = sorted(validator.iter_errors(arguments), key=lambda error: error.json_path)
    if errors:
        raise arguments_error((_where(error.json_path), error.message) for error in errors)


def check_schema(schema: Mapping[str, Any]) -> None:
    """Raise ValueError if ``schema`` is not a valid Draft 2020-12 schema.

    Worth calling when a tool is built, so a typo fails at startup rather than
    on the first call that uses the tool.
    """
    _validator(_schema_key(schema))


def arguments_error(problems: Iterable[tuple[str, str]]) -> ArgumentsError:
    """One :class:`ArgumentsError` from ``(where, what)`` pairs, shortened for the model.

    The message is just the problems (``day: required but missing; ...``): the
    runner puts it after "invalid arguments for <tool>:".
    """
    listed = list(problems)
    lines = [f"{where}: {_shorten(what)}" for where, what in listed[:MAX_PROBLEMS]]
    if len(listed) > MAX_PROBLEMS:
        lines.append(f"... and {len(listed) - MAX_PROBLEMS} more")
    return ArgumentsError("; ".join(lines))


def _shorten(text: str) -> str:
    if len(text) <= _MAX_PROBLEM_CHARS:
        return text
    return text[: _MAX_PROBLEM_CHARS - 3] + "..."


def _where(json_path: str) -> str:
    """``$.party[0].name`` as ``party[0].name``; the object itself as ``arguments``."""
    path = json_path.removeprefix("$").removeprefix(".")
    return path or "arguments"


def _schema_key(schema: Mapping[str, Any]) -> bytes:
    # Schemas are dicts (unhashable); their canonical JSON is a safe cache key,
    # unlike id(), which a new dict can reuse after the old one is freed.
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)


@functools.lru_cache(maxsize=512)
def _validator(key: bytes) -> Draft202012Validator:
    schema = orjson.loads(key)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"invalid JSON schema for tool arguments: {exc.message}") from exc
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
