"""Configuration errors, and the one way pydantic's validation errors are worded.

Agent files, scenario files, inbound frames and tool arguments are all checked
by pydantic, whose raw messages are written for Python developers:
``steps.0.function-after[_interrupts_is_positive(), CallerTurn].expect.say:
Extra inputs are not permitted``. Whoever reads ours wrote a YAML file or is a
model calling a tool, so :func:`problems` turns each error into a location in
the document's own terms (``steps[0].expect``) and a sentence (``unknown key
'say' (did you mean 'said'?)``). Every reader of a validation error goes
through it, so the wording cannot drift between them.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


class AgentConfigError(ValueError):
    """An agent definition (or the server settings in it) is invalid.

    The message is one line or a short list naming the file, the key and what
    to do; the CLI prints it as it is and exits with status 2.
    """


class StartupError(Exception):
    """The server cannot start: a port that is taken, a store that does not answer,
    a model that does not load. One line saying what and what to do; the CLI
    prints it as it is and exits with status 2."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a document: where (``tools[0].number``) and what."""

    where: str
    what: str
    unknown_key: str | None = None
    """For an unknown key: the key itself (``where`` is the object holding it)."""
    suggestion: str | None = None
    """For an unknown key: the valid key it is closest to, if any."""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" if self.where else self.what


# pydantic's own steps inside a location: union members, validators, wrappers.
_BOOKKEEPING = ("tagged-union[", "is-instance[", "function-after[", "function-before[",
                "function-wrap[", "function-plain[", "union[", "nullable[", "lax-or-strict[",
                "json-or-python[", "chain[", "constrained-str", "model[")  # fmt: skip


def location(
    loc: tuple[int | str, ...], model: type[BaseModel] | None = None, *, root: str = ""
) -> str:
    """``steps[0].expect``: field names dotted, list indices in brackets, without
    pydantic's bookkeeping in between (union members, validators, and the tag
    value it inserts after a discriminated union field, which ``model`` tells
    apart from a key)."""
    return _walk(model, loc, root)[0]


def problems(
    exc: ValidationError,
    model: type[BaseModel] | None = None,
    *,
    root: str = "",
    limit: int | None = None,
) -> list[Problem]:
    """Each error in ``exc`` as a :class:`Problem`.

    With ``model`` (the model that was validated), an unknown key gets the
    closest valid key as a suggestion. Errors from union members that were
    only tried (a tools entry can also be a Python ``Tool`` object, which a
    file never holds) are left out.
    """
    found: list[Problem] = []
    errors = [
        error
        for error in exc.errors(include_url=False, include_input=False)
        if not any(str(part).startswith("is-instance[") for part in error["loc"])
    ]
    for error in _closest_branches(errors, model, root):
        loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden" and loc:
            key = str(loc[-1])
            where, known = _walk(model, loc[:-1], root)
            what = f"unknown key {key!r}"
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            if close:
                what += f" (did you mean {close[0]!r}?)"
            elif known:
                what += f" (valid keys: {', '.join(sorted(known))})"
            found.append(Problem(where, what, key, close[0] if close else None))
        elif kind == "missing":
            found.append(Problem(location(loc, model, root=root), "required but missing"))
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            walked = _walk_types(model, loc, root)
            found.append(Problem(walked.where, _tag_problem(error, walked.tags)))
        elif kind in _IP_ERRORS:
            # One line for an address that is neither IPv4 nor IPv6 (two union members).
            what = "not an IP address or network (CIDR), e.g. 100.20.5.228/32"
            found.append(Problem(location(loc, model, root=root), what))
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            found.append(Problem(location(loc, model, root=root), message))
    # A misspelt required key is one problem, not two: the unknown key says it.
    misspelt = {_join(p.where, p.suggestion) for p in found if p.suggestion is not None}
    kept = [p for p in found if not (p.what == "required but missing" and p.where in misspelt)]
    unique = list(dict.fromkeys(kept))
    return unique if limit is None else unique[:limit]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_IP_ERRORS = frozenset(
    {"ip_v4_network", "ip_v6_network", "ip_v4_address", "ip_v6_address", "ip_any_network"}
)


def _tag_problem(error: Any, expected: list[str]) -> str:
    """A discriminated union's tag (``provider``, ``type``) missing or unknown, in words."""
    ctx = error.get("ctx") or {}
    key = str(ctx.get("discriminator", "type")).strip("'")
    if error["type"] == "union_tag_not_found":
        return f"{key!r} is required" + (f": one of {', '.join(expected)}" if expected else "")
    tag = str(ctx.get("tag", ""))
    what = f"unknown {key} {tag!r}"
    close = difflib.get_close_matches(tag, expected, n=1, cutoff=0.6)
    if close:
        what += f" (did you mean {close[0]!r}?)"
    return what + (f"; one of: {', '.join(expected)}" if expected else "")


def describe(
    exc: ValidationError,
    model: type[BaseModel] | None = None,
    *,
    root: str = "",
    limit: int | None = 5,
    sep: str = "; ",
) -> str:
    """:func:`problems` joined into one message (the first ``limit`` of them)."""
    found = problems(exc, model, root=root)
    shown = [str(p) for p in (found if limit is None else found[:limit])]
    if limit is not None and len(found) > limit:
        shown.append(f"and {len(found) - limit} more")
    return sep.join(shown)


@dataclass(frozen=True, slots=True)
class _Walked:
    where: str
    """The readable location."""
    keys: list[str]
    """The keys valid there (as far as the types of the model say; none without one)."""
    tags: list[str]
    """The tags of the discriminated union found there, if any."""
    branches: tuple[tuple[tuple[int | str, ...], str], ...]
    """The union members pydantic tried on the way: (location of the union, member)."""


def _walk(
    model: type[BaseModel] | None, loc: tuple[int | str, ...], root: str
) -> tuple[str, list[str]]:
    """The readable location of ``loc`` and the keys valid there."""
    walked = _walk_types(model, loc, root)
    return walked.where, walked.keys


def _walk_types(model: type[BaseModel] | None, loc: tuple[int | str, ...], root: str) -> _Walked:
    """Follow ``loc`` through the types of ``model``, skipping pydantic's own steps."""
    where = root
    candidates: list[Any] = [] if model is None else [model]
    branches: list[tuple[tuple[int | str, ...], str]] = []
    for index, part in enumerate(loc):
        if isinstance(part, int):
            where += f"[{part}]"
            candidates = [
                typing.get_args(m)[0]
                for kind in candidates
                for m in _members(kind)
                if typing.get_origin(m) in (list, tuple, set, frozenset) and typing.get_args(m)
            ]
            continue
        members = [m for kind in candidates for m in _members(kind)]
        models = [m for m in members if _is_model(m)]
        if part.startswith(_BOOKKEEPING):
            # A union member (or a validator around one) that pydantic tried.
            named = [m for m in members if _type_name(m) and part.endswith(f", {_type_name(m)}]")]
            branches.append((loc[:index], part))
            candidates = named or candidates
            continue
        if not any(_field(m, part) is not None for m in models):
            tagged = [m for m in models if _tag_of(m) == part]
            if tagged:
                candidates = tagged  # the tag pydantic put after a discriminated union
                continue
            named = [m for m in members if _type_name(m) == part]
            if named and len(members) > 1:
                branches.append((loc[:index], part))  # a plain union's member, by name
                candidates = named
                continue
        where += f".{part}" if where else part
        candidates = [f.annotation for m in models if (f := _field(m, part)) is not None]
    keys = [
        f.alias or name
        for kind in candidates
        for m in _members(kind)
        if _is_model(m)
        for name, f in m.model_fields.items()
    ]
    tags = [
        tag
        for kind in candidates
        for m in _members(kind)
        if _is_model(m) and (tag := _tag_of(m)) is not None
    ]
    return _Walked(where, list(dict.fromkeys(keys)), list(dict.fromkeys(tags)), tuple(branches))


def _type_name(kind: Any) -> str | None:
    return kind.__name__ if isinstance(kind, type) else None


def _closest_branches(errors: list[Any], model: type[BaseModel] | None, root: str) -> list[Any]:
    """Only the errors of the union member that came closest, wherever a plain
    union was tried member by member: a scenario step that is a caller turn with
    one typo is not also reported as a silence missing ``silence_ms``."""
    walks = [_walk_types(model, tuple(error["loc"]), root).branches for error in errors]
    counts: dict[tuple[tuple[int | str, ...], str], int] = {}
    for branches in walks:
        for branch in branches:
            counts[branch] = counts.get(branch, 0) + 1
    best: dict[tuple[int | str, ...], str] = {}
    for (where, member), count in counts.items():  # first seen wins a tie
        if where not in best or count < counts[(where, best[where])]:
            best[where] = member
    return [
        error
        for error, branches in zip(errors, walks, strict=True)
        if all(best[where] == member for where, member in branches)
    ]


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _field(model: type[BaseModel], key: str) -> Any:
    field = model.model_fields.get(key)
    if field is None:
        field = next((f for f in model.model_fields.values() if f.alias == key), None)
    return field


def _members(kind: Any) -> list[Any]:
    """A union's members (recursively, through Annotated and Optional), or the type."""
    origin = typing.get_origin(kind)
    if origin is typing.Annotated:
        return _members(typing.get_args(kind)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(kind) for m in _members(arg)]
    return [kind]


def _tag_of(model: type[BaseModel]) -> str | None:
    """The literal value of a discriminated union member's tag field, if it has one."""
    for name in ("type", "provider", "interaction_type"):
        field = model.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is typing.Literal:
            values = typing.get_args(field.annotation)
            if len(values) == 1 and isinstance(values[0], str):
                return values[0]
    return None
