"""``module:function`` references, as agent files write them, and where they are looked up.

A reference is looked up beside the agent file first, then on the normal import
path (:func:`import_agent_module`), for tools (``tools[].function``) and the
webhook handler (``server.webhooks.handler``) alike, so a ``tools.py`` next to
``agent.yaml`` works from any directory, with no ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ToolReferenceError(ValueError):
    """A ``"package.module:function"`` reference that does not lead to a callable."""


def load_callable(ref: str, *, folder: Path | None = None) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (or ``module:Class.method``) and return it.

    ``folder`` (the agent file's) is looked in first; see :func:`import_agent_module`.
    """
    obj = resolve(ref, folder)
    if not callable(obj):
        raise ToolReferenceError(f"tool reference {ref!r}: a {type(obj).__name__}, not a function")
    return typing.cast(Callable[..., Any], obj)


def import_agent_module(name: str, folder: Path | None = None) -> types.ModuleType:
    """The module ``name``, looked up beside the agent file first (``folder``),
    then on the normal import path.

    A module found in ``folder`` is imported under its own name, as
    ``PYTHONPATH=<folder>`` would, so the agent's code and the user's own tests
    share one copy of it; ``folder`` is appended to ``sys.path`` (never put in
    front of the standard library or installed packages) so that it can import
    its sibling modules. Python keeps one module per name: when a module of the
    same name is already loaded from somewhere else (another agent's folder, an
    installed package), that is an error naming both files, never a quiet
    substitution of the other one. Raises :class:`ModuleNotFoundError` (with
    ``name`` set) when neither place has it, and whatever importing it raises.
    """
    top = name.partition(".")[0]
    if folder is not None:
        importlib.invalidate_caches()  # a file written a moment ago must be seen
        spec = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
        if spec is not None:
            _import_beside(top, spec, folder)
    return importlib.import_module(name)


def _import_beside(top: str, spec: importlib.machinery.ModuleSpec, folder: Path) -> None:
    here = _spec_location(spec)
    loaded = sys.modules.get(top)
    if loaded is not None:
        there = _module_location(loaded)
        if there != here:
            raise ToolReferenceError(
                f"the module {top!r} beside the agent file ({here}) has the same name as one "
                f"already loaded from {there or 'elsewhere'} (another agent's folder or an "
                "installed package); Python keeps one module per name: rename one of them"
            )
        return
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        assert spec.loader is not None  # PathFinder's specs for modules and packages have one
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(top, None)
        raise


def _spec_location(spec: importlib.machinery.ModuleSpec) -> Path | None:
    """The file (or, for a namespace package, the folder) a spec would load."""
    if spec.origin and spec.has_location:
        return Path(spec.origin).resolve()
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else None


def _module_location(module: types.ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    if file:
        return Path(file).resolve()
    locations = list(getattr(module, "__path__", []) or [])
    return Path(locations[0]).resolve() if locations else None


def resolve(ref: str, folder: Path | None = None) -> Any:
    """Whatever ``ref`` names (a function, a decorated tool, a method), or the
    :class:`ToolReferenceError` saying what is wrong with it."""
    module_name, sep, attribute = ref.partition(":")
    if not sep or not module_name or not attribute:
        raise ToolReferenceError(f"tool reference {ref!r}: expected 'package.module:function'")
    try:
        obj: Any = import_agent_module(module_name, folder)
    except ToolReferenceError as exc:
        raise ToolReferenceError(f"tool reference {ref!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            where = (
                f"beside the agent file (in {folder}) or on the Python import path"
                if folder is not None
                else "on the Python import path (an agent built in Python or from text "
                "has no folder of its own to look in)"
            )
            raise ToolReferenceError(
                f"tool reference {ref!r}: no module named {exc.name!r} {where}"
            ) from exc
        raise ToolReferenceError(f"tool reference {ref!r}: importing it failed: {exc}") from exc
    except Exception as exc:
        raise ToolReferenceError(
            f"tool reference {ref!r}: importing it failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ToolReferenceError(
                f"tool reference {ref!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj
