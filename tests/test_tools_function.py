"""Python functions as tools: schema from the signature, validation, running, references."""

from __future__ import annotations

import threading
from datetime import date
from typing import Annotated, Any

import pytest
import tool_samples
from pydantic import Field
from tool_samples import Category, Guest, Seating, make_context

from callbrain.tools.arguments import ArgumentsError, check_schema, validate_against_schema
from callbrain.tools.base import DEFAULT_TIMEOUT_S, Tool, ToolContext, ToolError
from callbrain.tools.function import (
    FunctionTool,
    ToolReferenceError,
    function_tool_from_ref,
    load_callable,
    tool,
    with_settings,
)


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every dict in a schema."""
    if isinstance(node, list):
        return [d for item in node for d in _walk(item)]
    if isinstance(node, dict):
        return [node, *(d for value in node.values() for d in _walk(value))]
    return []


# --- schema derivation ---------------------------------------------------------


def test_schema_from_signature_and_google_docstring() -> None:
    lookup = tool(tool_samples.lookup_order)

    assert lookup.name == "lookup_order"
    assert lookup.description == (
        "Look up an order by its number.\n\nUse it when the caller asks where their order is."
    )
    assert lookup.parameters == {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "description": "The order number the caller reads out."},
            "include_items": {
                "type": "boolean",
                "default": False,
                "description": "Whether to list what was ordered.",
            },
        },
        "required": ["order_id"],
        "additionalProperties": False,
    }
    assert lookup.spec.parameters == lookup.parameters


@pytest.mark.parametrize("fn", [tool_samples.numpy_style, tool_samples.rest_style])
def test_numpy_and_rest_docstrings(fn: Any) -> None:
    weather = tool(fn)

    assert weather.description == "Forecast the weather."
    assert weather.parameters["properties"]["city"]["description"] == "The city name."


def test_annotated_field_enum_literal_date_and_context() -> None:
    params = tool_samples.book_table.parameters
    properties = params["properties"]

    assert list(properties) == ["day", "party", "seating", "occasion"]  # no context
    assert params["required"] == ["day"]
    assert properties["day"] == {
        "type": "string",
        "format": "date",
        "description": "The day of the booking.",
    }
    # The explicit Field description wins over the docstring's.
    assert properties["party"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 12,
        "default": 2,
        "description": "Guests, 1 to 12.",
    }
    # The enum's $defs entry is inlined, keeping the field's own keys.
    assert properties["seating"] == {
        "type": "string",
        "enum": ["inside", "terrace"],
        "default": "inside",
        "description": "Where to sit.",
    }
    assert properties["occasion"]["anyOf"] == [
        {"type": "string", "enum": ["birthday", "business"]},
        {"type": "null"},
    ]
    assert "$defs" not in params


def test_schema_is_plain_valid_and_agrees_with_validation() -> None:
    def plan(guests: list[Guest], when: date | None = None) -> None:
        """Plan."""

    params = tool(plan).parameters

    check_schema(params)
    assert "$defs" not in params
    assert all("title" not in d for d in _walk(params) if "type" in d or "anyOf" in d)
    guest = params["properties"]["guests"]["items"]
    assert set(guest["properties"]) == {"name", "title"}  # a property named title survives
    validate_against_schema({"guests": [{"name": "Ada", "title": "Dr"}]}, params)
    with pytest.raises(ArgumentsError, match=r"guests\[0\]"):
        validate_against_schema({"guests": [{"title": "Dr"}]}, params)


def test_recursive_model_keeps_only_what_it_needs_in_defs() -> None:
    def classify(category: Category) -> None:
        """Classify."""

    params = tool(classify).parameters

    check_schema(params)
    assert set(params["$defs"]) == {"Category"}
    assert params["properties"]["category"]["properties"]["children"]["items"] == {
        "$ref": "#/$defs/Category"
    }
    validate_against_schema({"category": {"label": "a", "children": [{"label": "b"}]}}, params)


def test_optional_parameters_and_no_docstring() -> None:
    def find(query: str, limit: int | None = None, exact: bool = False) -> None:
        pass

    found = tool(find)

    assert found.description == ""
    assert found.parameters["required"] == ["query"]
    assert found.validate({"query": "x"}) == {"query": "x", "limit": None, "exact": False}


def test_parameter_names_that_clash_with_pydantic_are_fine() -> None:
    def odd(json: str, model_config: int, schema: bool = True) -> str:
        """Odd names."""
        return f"{json} {model_config} {schema}"

    odd_tool = tool(odd)

    assert set(odd_tool.parameters["properties"]) == {"json", "model_config", "schema"}
    assert odd_tool.validate({"json": "j", "model_config": "3"}) == {
        "json": "j",
        "model_config": 3,
        "schema": True,
    }


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(*args: int) -> None: ...", r"\*args"),
        ("def f(**kwargs: int) -> None: ...", r"\*\*kwargs"),
        ("def f(a, b: int) -> None: ...", r"parameter 'a' needs a type annotation"),
        ("def f(a: 'Missing') -> None: ...", r"cannot resolve its annotations"),
    ],
)
def test_signatures_that_cannot_be_tools(source: str, message: str) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)

    with pytest.raises(TypeError, match=message):
        tool(namespace["f"])


def test_only_functions() -> None:
    with pytest.raises(TypeError, match="function"):
        tool(print)


# --- validation ------------------------------------------------------------------


def test_validate_converts_to_the_declared_types() -> None:
    arguments = tool_samples.book_table.validate(
        {"day": "2026-11-22", "party": "4", "seating": "terrace"}
    )

    assert arguments == {
        "day": date(2026, 11, 22),
        "party": 4,
        "seating": Seating.TERRACE,
        "occasion": None,
    }


def test_validation_errors_are_written_for_the_model() -> None:
    with pytest.raises(ArgumentsError) as caught:
        tool_samples.book_table.validate(
            {"party": 20, "seating": "roof", "context": {}, "time": "7pm"}
        )

    message = str(caught.value)
    assert isinstance(caught.value, ToolError)
    assert "day: required but missing" in message
    assert "party: Input should be less than or equal to 12" in message
    assert "seating: Input should be 'inside' or 'terrace'" in message
    assert "time: not a parameter of this tool (its parameters: day, party, seating, occasion)" in (
        message
    )
    assert "context: not a parameter" in message  # injected, never sent by the model


def test_nested_error_locations() -> None:
    def plan(guests: list[Guest]) -> None:
        """Plan."""

    with pytest.raises(ArgumentsError, match=r"guests\[1\]\.name: required but missing"):
        tool(plan).validate({"guests": [{"name": "Ada"}, {}]})


# --- running ---------------------------------------------------------------------


async def test_async_function_gets_the_context_injected() -> None:
    context = make_context(call_id="call-42")
    arguments = tool_samples.book_table.validate({"day": "2026-11-22"})

    result = await tool_samples.book_table.run(arguments, context)

    assert result == "call-42: 2 on 2026-11-22 (inside, None)"


async def test_sync_function_runs_off_the_event_loop_thread() -> None:
    result = await tool(tool_samples.whose_thread).run({}, make_context())

    assert isinstance(result, int)
    assert result != threading.get_ident()


async def test_context_may_be_optional_and_positional_only_works() -> None:
    seen: list[ToolContext | None] = []

    def note(text: str, /, context: ToolContext | None = None, *, loud: bool = False) -> str:
        """Note."""
        seen.append(context)
        return text.upper() if loud else text

    note_tool = tool(note)
    context = make_context()

    assert set(note_tool.parameters["properties"]) == {"text", "loud"}
    result = await note_tool.run(note_tool.validate({"text": "hi", "loud": True}), context)
    assert result == "HI"
    assert seen == [context]


def test_more_than_one_context_is_an_error() -> None:
    def both(a: ToolContext, b: ToolContext) -> None:
        """Both."""

    with pytest.raises(TypeError, match="more than one ToolContext"):
        tool(both)


async def test_decorated_tool_is_still_the_function() -> None:
    context = make_context(call_id="direct")

    result = await tool_samples.book_table(context, date(2026, 1, 2), party=3)

    assert result == "direct: 3 on 2026-01-02 (inside, None)"
    assert tool_samples.book_table.__name__ == "book_table"
    assert tool_samples.book_table.__doc__ is not None


# --- decorator forms ---------------------------------------------------------------


def test_decorator_without_arguments() -> None:
    @tool
    def ping() -> str:
        """Check the line."""
        return "pong"

    assert isinstance(ping, FunctionTool)
    assert ping.name == "ping"
    assert ping.timeout_s == DEFAULT_TIMEOUT_S
    assert not ping.side_effects
    assert ping.parameters == {"type": "object", "properties": {}, "additionalProperties": False}
    assert ping() == "pong"


def test_decorator_with_arguments() -> None:
    @tool(
        name="check-line",
        description="Checks the line.",
        timeout_s=2,
        side_effects=True,
        holding_message="One moment.",
        instant=True,
    )
    def ping() -> str:
        """Ignored: description= wins."""
        return "pong"

    assert (ping.name, ping.description, ping.timeout_s) == ("check-line", "Checks the line.", 2)
    assert ping.side_effects and ping.instant
    assert ping.holding_message == "One moment."

    assert tool_samples.book_table.side_effects
    assert tool_samples.book_table.timeout_s == 5
    assert tool_samples.book_table.holding_message == "Let me book that."


def test_invalid_name_is_rejected() -> None:
    def f() -> None:
        """F."""

    with pytest.raises(ValueError, match="tool name"):
        tool(name="has spaces")(f)


def test_annotated_field_in_a_local_function() -> None:
    def rate(stars: Annotated[int, Field(ge=1, le=5, description="1 to 5")]) -> None:
        """Rate."""

    rated = tool(rate)

    assert rated.parameters["properties"]["stars"]["description"] == "1 to 5"
    with pytest.raises(ArgumentsError, match="stars: Input should be less than or equal to 5"):
        rated.validate({"stars": 9})


# --- references from agent YAML --------------------------------------------------------


def test_load_callable() -> None:
    assert load_callable("tool_samples:lookup_order") is tool_samples.lookup_order
    assert load_callable("tool_samples:Guest.model_json_schema") == Guest.model_json_schema


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("tool_samples.lookup_order", r"expected 'package\.module:function'"),
        ("tool_samples:", r"expected 'package\.module:function'"),
        ("no_such_module_xyz:f", r"'no_such_module_xyz:f': no module named 'no_such_module_xyz'"),
        ("tool_samples.sub:f", r"no module named 'tool_samples\.sub'"),
        ("tool_samples:missing", r"'tool_samples' has no attribute 'missing'"),
        ("tool_samples:NOT_CALLABLE", r"'tool_samples:NOT_CALLABLE': a int, not a function"),
    ],
)
def test_load_callable_errors_name_the_reference(ref: str, message: str) -> None:
    with pytest.raises(ToolReferenceError, match=message):
        load_callable(ref)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import missing_dependency_xyz\n", r"importing it failed: No module named 'missing_de"),
        ("def f(:\n", r"importing it failed: SyntaxError"),
        ("raise RuntimeError('no config')\n", r"importing it failed: RuntimeError: no config"),
    ],
)
def test_a_broken_module_is_reported_with_its_error(
    source: str, message: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"broken_tools_{abs(hash(source))}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ToolReferenceError, match=f"'{module}:f': {message}"):
        load_callable(f"{module}:f")


def test_ref_to_a_plain_function_is_wrapped_with_overrides() -> None:
    made = function_tool_from_ref(
        "tool_samples:lookup_order", name="find_order", side_effects=True, timeout_s=3
    )

    assert isinstance(made, FunctionTool)
    assert (made.name, made.side_effects, made.timeout_s) == ("find_order", True, 3)
    assert made.description.startswith("Look up an order")
    assert "order_id" in made.parameters["properties"]


async def test_ref_to_a_decorated_tool_gets_overrides_on_a_copy() -> None:
    made = function_tool_from_ref(
        "tool_samples:book_table", description="Reserve.", holding_message=None, instant=True
    )

    assert isinstance(made, FunctionTool)
    assert made is not tool_samples.book_table
    assert (made.name, made.description, made.holding_message, made.instant) == (
        "book_table",
        "Reserve.",
        None,
        True,
    )
    assert made.side_effects and made.timeout_s == 5  # kept from the decorator
    original = tool_samples.book_table
    assert (original.description, original.holding_message, original.instant) == (
        "Book a table.",
        "Let me book that.",
        False,
    )
    result = await made.run(made.validate({"day": "2026-11-22"}), make_context())
    assert result.endswith("2 on 2026-11-22 (inside, None)")


def test_overrides_are_checked() -> None:
    with pytest.raises(TypeError, match="unknown settings"):
        function_tool_from_ref("tool_samples:book_table", colour="red")
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        function_tool_from_ref("tool_samples:book_table", timeout_s=0)
    with pytest.raises(ValueError, match="tool name"):
        with_settings(tool_samples.book_table, name="no spaces please")


def test_ref_to_an_unsuitable_function() -> None:
    with pytest.raises(ToolReferenceError, match="needs a type annotation"):
        function_tool_from_ref("tool_samples:untyped")
    with pytest.raises(ToolReferenceError, match="not a tool"):
        function_tool_from_ref("tool_samples:NOT_CALLABLE")


def test_with_settings_keeps_the_tool_type() -> None:
    copy = with_settings(tool_samples.book_table, name="reserve")

    assert isinstance(copy, Tool)
    assert copy.name == "reserve"
    assert copy.parameters == tool_samples.book_table.parameters
