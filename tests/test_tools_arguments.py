"""The model's argument text: tolerant parsing, and schema errors the model can act on."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from callbrain.tools.arguments import (
    MAX_PROBLEMS,
    ArgumentsError,
    check_schema,
    parse_arguments,
    validate_against_schema,
)
from callbrain.tools.base import ToolError

BOOKING = {
    "type": "object",
    "properties": {
        "day": {"type": "string", "format": "date"},
        "party": {"type": "integer", "minimum": 1},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"dish": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["dish"],
            },
        },
    },
    "required": ["day", "party"],
    "additionalProperties": False,
}


# --- parsing -----------------------------------------------------------------------


def test_valid_json_takes_the_fast_path(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="callbrain.tools"):
        parsed = parse_arguments('{"day": "2026-11-22", "party": 2, "note": "ünïcode"}')

    assert parsed == {"day": "2026-11-22", "party": 2, "note": "ünïcode"}
    assert not caplog.records


@pytest.mark.parametrize("raw", ["", "   ", "\n\t"])
def test_empty_text_means_no_arguments(raw: str) -> None:
    assert parse_arguments(raw) == {}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"day": "2026-11-22", "party": 2,}', {"day": "2026-11-22", "party": 2}),
        ("{'day': '2026-11-22', 'party': 2}", {"day": "2026-11-22", "party": 2}),
        ('{day: "2026-11-22", party: 2}', {"day": "2026-11-22", "party": 2}),
        ('{"day": "2026-11-22", "party": 2', {"day": "2026-11-22", "party": 2}),
        ('{"day": "2026-11-22", "note": "by the win', {"day": "2026-11-22", "note": "by the win"}),
        (
            '{"items": [{"dish": "soup"}, {"dish": "sal',
            {"items": [{"dish": "soup"}, {"dish": "sal"}]},
        ),
        ('```json\n{"party": 2}\n```', {"party": 2}),
        ('```\n{"party": 2}\n```', {"party": 2}),
        ('Sure! {"party": 2}', {"party": 2}),
        ('"{\\"party\\": 2}"', {"party": 2}),  # encoded twice
    ],
    ids=[
        "trailing-comma",
        "single-quotes",
        "unquoted-keys",
        "truncated-object",
        "truncated-string",
        "truncated-nested",
        "json-fence",
        "bare-fence",
        "leading-prose",
        "double-encoded",
    ],
)
def test_near_json_is_repaired(
    raw: str, expected: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="callbrain.tools"):
        assert parse_arguments(raw) == expected

    if raw.startswith('"'):
        return  # valid JSON (a string): unwrapped, not repaired
    assert any("repaired malformed tool arguments" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("[1, 2]", "a list"),
        ("42", "a number"),
        ("4.5", "a number"),
        ('"book it"', "a string"),
        ("true", "a boolean"),
        ("null", "null"),
        ("[{'party': 2},", "a list"),  # repaired, still not an object
    ],
)
def test_non_objects_are_rejected(raw: str, kind: str) -> None:
    with pytest.raises(ArgumentsError, match=f"arguments must be a JSON object .*, got {kind}$"):
        parse_arguments(raw)


def test_text_with_no_json_in_it() -> None:
    with pytest.raises(ArgumentsError, match="not valid JSON"):
        parse_arguments("book a table for two")


def test_arguments_error_is_a_tool_error() -> None:
    assert issubclass(ArgumentsError, ToolError)


# --- schema validation --------------------------------------------------------------


def test_valid_arguments_pass() -> None:
    validate_against_schema({"day": "2026-11-22", "party": 2, "items": [{"dish": "soup"}]}, BOOKING)


def test_every_problem_is_listed_with_its_path() -> None:
    arguments = {
        "day": "next friday",
        "party": 0,
        "items": [{"dish": "soup"}, {"qty": "two"}],
        "time": "7pm",
    }

    with pytest.raises(ArgumentsError) as caught:
        validate_against_schema(arguments, BOOKING)

    problems = str(caught.value).split("; ")
    assert problems == [
        "arguments: Additional properties are not allowed ('time' was unexpected)",
        "day: 'next friday' is not a 'date'",
        "items[1]: 'dish' is a required property",
        "items[1].qty: 'two' is not of type 'integer'",
        "party: 0 is less than the minimum of 1",
    ]


def test_missing_required_properties() -> None:
    with pytest.raises(ArgumentsError) as caught:
        validate_against_schema({}, BOOKING)

    assert str(caught.value) == (
        "arguments: 'day' is a required property; arguments: 'party' is a required property"
    )


def test_many_problems_are_capped() -> None:
    schema = {"type": "object", "additionalProperties": {"type": "integer"}}
    arguments = {f"n{i}": "x" for i in range(MAX_PROBLEMS + 3)}

    with pytest.raises(ArgumentsError) as caught:
        validate_against_schema(arguments, schema)

    message = str(caught.value)
    assert message.count("is not of type 'integer'") == MAX_PROBLEMS
    assert message.endswith("; ... and 3 more")


def test_long_values_are_shortened() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}

    with pytest.raises(ArgumentsError) as caught:
        validate_against_schema({"n": "x" * 5000}, schema)

    assert len(str(caught.value)) < 300
    assert str(caught.value).endswith("...")


def test_the_same_schema_object_may_change_between_calls() -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {"n": {"type": "integer"}}}
    validate_against_schema({"n": "x"}, {"type": "object"})
    validate_against_schema({"n": 1}, schema)

    schema["properties"]["n"]["type"] = "string"  # the cache must not serve the old one

    validate_against_schema({"n": "x"}, schema)
    with pytest.raises(ArgumentsError):
        validate_against_schema({"n": 1}, schema)


def test_a_broken_schema_is_the_authors_bug() -> None:
    broken = {"type": "object", "properties": {"n": {"type": "integr"}}}

    with pytest.raises(ValueError, match="invalid JSON schema") as caught:
        check_schema(broken)
    assert not isinstance(caught.value, ToolError)
    with pytest.raises(ValueError, match="invalid JSON schema"):
        validate_against_schema({"n": 1}, broken)
