"""Plugin options: ``key=value`` strings converted by the plugin's own signature.

A method's or dataset's options are the keyword arguments of its ``__init__`` (after the
positional ones the framework passes). The CLI knows none of them: it forwards ``-o key=value``
(methods) and ``-D key=value`` (datasets), and this module converts each value by the
parameter's annotation and rejects names the plugin does not declare.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Iterable
from typing import Any, Literal

from fairbench.errors import FairbenchError, UnknownNameError

_SKIP = {"self", "backbone", "info"}


def declared(cls: type) -> dict[str, inspect.Parameter]:
    """The options ``cls`` declares: keyword parameters of ``__init__`` with defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p
        for name, p in params.items()
        if name not in _SKIP and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    }


def defaults(cls: type) -> dict[str, Any]:
    """Every option of ``cls`` with its default value."""
    return {name: p.default for name, p in declared(cls).items()}


def _convert(value: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in [str(a) for a in args]:
            raise FairbenchError(f"{where}: '{value}' is not one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == value)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        return _convert(value, annotation, where)
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
    except ValueError:
        raise FairbenchError(f"{where}: '{value}' is not a valid {annotation.__name__}") from None
    return value


def parse(cls: type, pairs: Iterable[str], what: str) -> dict[str, Any]:
    """Convert ``key=value`` strings into keyword arguments for ``cls``.

    ``what`` names the plugin in messages, e.g. ``"method 'nir'"``.
    """
    options = declared(cls)
    hints = typing.get_type_hints(cls.__init__)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FairbenchError(f"option '{pair}' for {what} must look like key=value")
        if key not in options:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            names = ", ".join(options) or "none"
            raise UnknownNameError(f"{what} has no option '{key}'{hint} options: {names}")
        out[key] = _convert(value.strip(), hints.get(key, str), f"option {key} of {what}")
    return out
