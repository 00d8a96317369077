"""Python functions as tools: the signature is the schema, the docstring the description.

::

    @tool(side_effects=True)
    async def book_table(context: ToolContext, day: date, party: int = 2) -> str:
        '''Book a table.

        Args:
            day: The day of the booking.
            party: How many people.
        '''

A pydantic model built from the signature gives both the JSON schema the model
sees and the validation that turns its JSON into the declared Python types
(``"2026-11-22"`` becomes a ``date``). A parameter annotated ``ToolContext`` is
filled in at run time and hidden from the model. Sync functions run in a worker
thread: a slow database call must not freeze every other call on the server.

Agent YAML refers to functions as ``"package.module:function"``;
:func:`function_tool_from_ref` loads one and applies the YAML's settings. The
module is looked up beside the agent file first, then on the normal import path
(:mod:`callbrain.tools.references`), so a ``tools.py`` next to ``agent.yaml`` just works.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, ParamSpec, TypeVar, overload

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.errors import PydanticUserError

from callbrain import errors
from callbrain.tools.arguments import arguments_error
from callbrain.tools.base import DEFAULT_TIMEOUT_S, Tool, ToolContext
from callbrain.tools.references import ToolReferenceError, load_callable, resolve

__all__ = [
    "SETTINGS",
    "FunctionTool",
    "ToolReferenceError",
    "function_tool_from_ref",
    "load_callable",
    "portable_schema",
    "tool",
    "with_settings",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T", bound=Tool)

SETTINGS = ("name", "description", "timeout_s", "side_effects", "holding_message", "instant")
"""The tool settings agent YAML may override."""


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    field: str | None
    """The pydantic field holding its value; None for the injected ToolContext."""
    positional_only: bool


class FunctionTool(Tool, Generic[P, R]):
    """A Python function as a tool. Still callable as the function itself."""

    __name__: str  # copied from the function, like __doc__ and __wrapped__

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        side_effects: bool = False,
        holding_message: str | None = None,
        instant: bool = False,
    ) -> None:
        if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
            raise TypeError(f"@tool needs a function or method, got {type(fn).__name__}")
        functools.update_wrapper(self, fn)
        doc = docstring_parser.parse(inspect.getdoc(fn) or "")
        self.fn: Callable[P, R] = fn
        self._params, self._model = _arguments_model(fn, doc)
        self._is_async = inspect.iscoroutinefunction(fn)
        if description is None:
            description = (doc.description or "").strip()
        super().__init__(
            name=name or fn.__name__,
            description=description,
            parameters=portable_schema(self._model.model_json_schema()),
            timeout_s=timeout_s,
            side_effects=side_effects,
            holding_message=holding_message,
            instant=instant,
        )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Validate and convert with the signature's types; keys are parameter names."""
        try:
            parsed = self._model.model_validate(arguments)
        except ValidationError as exc:
            raise arguments_error(self._problems(exc)) from None
        return {p.name: getattr(parsed, p.field) for p in self._params if p.field is not None}

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        """Call the function with :meth:`validate`'s output (and the context).

        A sync function runs in a worker thread (asyncio's default pool). If the
        runner's timeout fires, the thread cannot be stopped and finishes in the
        background, holding a pool slot: sync tools should set their own
        timeouts on whatever they wait for.
        """
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for param in self._params:
            if param.field is None:
                value = context
            elif param.name in arguments:
                value = arguments[param.name]
            else:
                continue  # left to the function's default
            if param.positional_only:
                args.append(value)
            else:
                kwargs[param.name] = value
        fn: Callable[..., Any] = self.fn
        if self._is_async:
            return await fn(*args, **kwargs)
        result = await asyncio.to_thread(fn, *args, **kwargs)
        if inspect.isawaitable(result):  # a sync function handing back a coroutine
            return await result
        return result

    def _problems(self, exc: ValidationError) -> list[tuple[str, str]]:
        names = ", ".join(p.name for p in self._params if p.field is not None) or "none"
        problems = []
        for problem in errors.problems(exc):
            where, what = problem.where, problem.what
            if problem.unknown_key is not None:
                where = f"{where}.{problem.unknown_key}" if where else problem.unknown_key
                what = f"not a parameter of this tool (its parameters: {names})"
            problems.append((where or "arguments", what))
        return problems


def _arguments_model(
    fn: Callable[..., Any], doc: docstring_parser.Docstring
) -> tuple[tuple[_Param, ...], type[BaseModel]]:
    """The signature as a pydantic model, one field per parameter but the context.

    Fields are named ``p0``, ``p1``... with the parameter name as alias, so a
    parameter may be called ``json`` or ``model_config`` without clashing with
    BaseModel's own attributes.
    """
    where = getattr(fn, "__qualname__", repr(fn))
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise TypeError(f"@tool {where}: cannot resolve its annotations: {exc}") from exc
    doc_params = {p.arg_name: p.description for p in doc.params if p.description}
    params: list[_Param] = []
    fields: dict[str, Any] = {}
    for index, param in enumerate(inspect.signature(fn).parameters.values()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"@tool {where}: *{param.name} / **{param.name} cannot be described to "
                "the model; declare each parameter with a type"
            )
        if param.name not in hints:
            raise TypeError(
                f"@tool {where}: parameter {param.name!r} needs a type annotation "
                "(the model's schema is built from it)"
            )
        positional_only = param.kind is param.POSITIONAL_ONLY
        annotation = hints[param.name]
        if _is_context(annotation):
            if any(p.field is None for p in params):
                raise TypeError(f"@tool {where}: more than one ToolContext parameter")
            params.append(_Param(param.name, None, positional_only))
            continue
        field = f"p{index}"
        params.append(_Param(param.name, field, positional_only))
        # Ours goes first among the Annotated metadata, so an explicit
        # Field(description=...) or alias in the annotation wins over the docstring.
        ours: dict[str, Any] = {"alias": param.name}
        if param.name in doc_params:
            ours["description"] = doc_params[param.name]
        base, *metadata = (
            typing.get_args(annotation)
            if typing.get_origin(annotation) is Annotated
            else (annotation,)
        )
        default = ... if param.default is param.empty else param.default
        fields[field] = (Annotated[(base, Field(**ours), *metadata)], default)
    try:
        model = create_model("Arguments", __config__=ConfigDict(extra="forbid"), **fields)
        model.model_json_schema()  # fail here, at decoration, for unschemable types
    except PydanticUserError as exc:
        raise TypeError(f"@tool {where}: {exc}") from exc
    return tuple(params), model


def _is_context(annotation: Any) -> bool:
    """``ToolContext``, or ``ToolContext | None`` (handy for calling it in tests)."""
    if annotation is ToolContext:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation)) == {ToolContext, type(None)}
    return False


@overload
def tool(fn: Callable[P, R], /) -> FunctionTool[P, R]: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    side_effects: bool = False,
    holding_message: str | None = None,
    instant: bool = False,
) -> Callable[[Callable[P, R]], FunctionTool[P, R]]: ...


def tool(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    side_effects: bool = False,
    holding_message: str | None = None,
    instant: bool = False,
) -> FunctionTool[P, R] | Callable[[Callable[P, R]], FunctionTool[P, R]]:
    """Make a typed function a tool; use as ``@tool`` or ``@tool(side_effects=True, ...)``."""

    def wrap(fn: Callable[P, R]) -> FunctionTool[P, R]:
        return FunctionTool(
            fn,
            name=name,
            description=description,
            timeout_s=timeout_s,
            side_effects=side_effects,
            holding_message=holding_message,
            instant=instant,
        )

    return wrap if fn is None else wrap(fn)


def portable_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as every provider takes it: no titles, refs inlined.

    ``$defs`` survive only for recursive types, which cannot be inlined.
    """
    defs: dict[str, Any] = schema.get("$defs", {})
    kept: dict[str, Any] = {}

    def expand(node: Any, expanding: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [expand(item, expanding) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = ref.removeprefix("#/$defs/")
            rest = {key: expand(value, expanding) for key, value in node.items() if key != "$ref"}
            if target in expanding:  # recursive: keep the reference
                if target not in kept:
                    kept[target] = None  # claimed; filled in below
                    kept[target] = expand(defs[target], frozenset({target}))
                return {"$ref": ref, **rest}
            return {**expand(defs[target], expanding | {target}), **rest}
        return {key: expand(value, expanding) for key, value in node.items() if key != "$defs"}

    result: dict[str, Any] = _strip_titles(expand(schema, frozenset()))
    if kept:
        result["$defs"] = _strip_titles(kept)
    return result


_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})
_VALUES = frozenset({"default", "const", "enum", "examples"})


def _strip_titles(node: Any) -> Any:
    """Drop pydantic's generated ``title``s, leaving properties and values named title."""
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    stripped: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key in _VALUES:
            stripped[key] = value
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):
            stripped[key] = {name: _strip_titles(schema) for name, schema in value.items()}
        else:
            stripped[key] = _strip_titles(value)
    return stripped


def function_tool_from_ref(ref: str, *, folder: Path | None = None, **overrides: Any) -> Tool:
    """The tool behind ``ref`` (looked up in ``folder`` first, see
    :func:`~callbrain.tools.references.import_agent_module`):
    a decorated tool gets ``overrides`` on a copy, a plain function is wrapped
    as ``@tool(**overrides)`` would."""
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise TypeError(f"tool {ref!r}: unknown settings {sorted(unknown)}; known: {SETTINGS}")
    obj = resolve(ref, folder)
    if isinstance(obj, Tool):
        return with_settings(obj, **overrides)
    if not callable(obj):
        raise ToolReferenceError(f"tool reference {ref!r}: a {type(obj).__name__}, not a tool")
    try:
        return FunctionTool(obj, **overrides)
    except TypeError as exc:
        raise ToolReferenceError(f"tool reference {ref!r}: {exc}") from exc


def with_settings(original: T, **overrides: Any) -> T:
    """A copy of ``tool`` with some of :data:`SETTINGS` changed, re-checked as new.

    Re-running :meth:`Tool.__init__` on the copy applies the same rules (valid
    name, positive timeout) as building the tool did, without repeating them here.
    """
    clone = copy.copy(original)
    settings = {key: getattr(original, key) for key in SETTINGS} | overrides
    Tool.__init__(clone, parameters=original.parameters, **settings)
    return clone
