"""Plugin options: ``key=value`` strings converted by the plugin's own signature.

A method's or dataset's options are the keyword arguments of its ``__init__`` (after the
positional ones the framework passes). The CLI knows none of them: it forwards ``-o key=value``
(methods) and ``-D key=value`` (datasets), and this module converts each value by the
parameter's annotation and rejects names the plugin does not declare.

Numbers are always finite. A plugin states an option's range in its annotation,
``Annotated[float, Interval(ge=0)]``, and a value outside it is refused with the range in the
message; :func:`check` applies the same rules to values that come from a suite file or a tuner.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fairbench.errors import FairbenchError, UnknownNameError

_SKIP = {"self", "backbone", "info"}


@dataclass(frozen=True)
class Interval:
    """The allowed range of a numeric option: ``Annotated[float, Interval(gt=0, le=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else "(-inf")
        high = f"{self.le:g}]" if self.le is not None else (f"{self.lt:g})" if self.lt is not None else "inf)")
        return f"{low}, {high}"

    def contains(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )


def _split_annotated(annotation: Any) -> tuple[Any, Interval | None]:
    """(base type, Interval or None) of ``Annotated[base, Interval(...)]``; others unchanged."""
    if typing.get_origin(annotation) is Annotated:
        base, *extra = typing.get_args(annotation)
        return base, next((e for e in extra if isinstance(e, Interval)), None)
    return annotation, None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType"


def check(value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it is finite and inside the annotation's :class:`Interval`; else a FairbenchError."""
    if _is_union(annotation):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    base, interval = _split_annotated(annotation)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not math.isfinite(value):
        raise FairbenchError(f"{where}: {value} is not a finite number")
    if interval is not None and not interval.contains(value):
        raise FairbenchError(f"{where}: {value} is outside its range {interval}")
    if base is int and isinstance(value, float) and not value.is_integer():
        raise FairbenchError(f"{where}: {value} is not a whole number")
    return value


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
    base, interval = _split_annotated(annotation)
    if interval is not None:
        return check(_convert(value, base, where), annotation, where)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in [str(a) for a in args]:
            raise FairbenchError(f"{where}: '{value}' is not one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == value)
    if _is_union(annotation):
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
        if annotation in (int, float):
            return check(annotation(value), annotation, where)
        if annotation is str:
            return value
    except ValueError:
        raise FairbenchError(f"{where}: '{value}' is not a valid {annotation.__name__}") from None
    return value


def parse(cls: type, pairs: Iterable[str], what: str) -> dict[str, Any]:
    """Convert ``key=value`` strings into keyword arguments for ``cls``.

    ``what`` names the plugin in messages, e.g. ``"method 'nir'"``.
    """
    options = declared(cls)
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
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


def validate(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """Check already-typed option values (from a suite file or a tuner) against ``cls``'s annotations."""
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    for key, value in values.items():
        if key in hints:
            check(value, hints[key], f"option {key} of {what}")
    return values
