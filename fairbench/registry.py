"""One registry type for methods and datasets, filled from entry-point groups.

Built-in methods and datasets are declared in the same entry-point groups as third-party
plugins (``fairbench.methods``, ``fairbench.datasets``), so every run exercises the plugin path.
Entry points are read when first needed and a plugin module is imported only when that plugin
is used or listed.
"""

from __future__ import annotations

import difflib
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from fairbench.errors import FairbenchError, UnknownNameError


class PluginWarning(UserWarning):
    """A plugin could not be loaded; everything else still works."""


class Registry:
    """Name -> class mapping for one kind of plugin (``method`` or ``dataset``)."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entry_points: dict[str, EntryPoint] | None = None
        self._loaded: dict[str, Any] = {}

    def _discover(self) -> dict[str, EntryPoint]:
        if self._entry_points is None:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group):
                if ep.name in found and found[ep.name].value != ep.value:
                    warnings.warn(
                        f"{self.kind} plugin '{ep.name}' is declared twice "
                        f"('{found[ep.name].value}' and '{ep.value}'); using the first",
                        PluginWarning,
                        stacklevel=3,
                    )
                    continue
                found[ep.name] = ep
            self._entry_points = found
        return self._entry_points

    def register(self, name: str, obj: Any) -> None:
        """Add ``obj`` under ``name`` without an entry point (tests, notebooks)."""
        self._loaded[name] = obj

    def names(self) -> list[str]:
        """All known names, sorted; nothing is imported."""
        return sorted(set(self._discover()) | set(self._loaded))

    def get(self, name: str) -> Any:
        """The class registered as ``name``; imports its module on first use."""
        if name in self._loaded:
            return self._loaded[name]
        eps = self._discover()
        if name not in eps:
            raise UnknownNameError(self._unknown_message(name))
        ep = eps[name]
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            raise FairbenchError(
                f"{self.kind} plugin '{name}' (entry point '{ep.value}' in group "
                f"'{self.group}') failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        self._loaded[name] = obj
        return obj

    def load_all(self) -> dict[str, Any]:
        """Every plugin that imports; each one that does not is reported as a PluginWarning."""
        out: dict[str, Any] = {}
        for name in self.names():
            try:
                out[name] = self.get(name)
            except FairbenchError as exc:
                warnings.warn(str(exc), PluginWarning, stacklevel=2)
        return out

    def _unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'{hint} available: {', '.join(names) or 'none'}"


methods = Registry("method", "fairbench.methods")
datasets = Registry("dataset", "fairbench.datasets")
