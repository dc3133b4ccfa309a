"""One registry type for methods and datasets, filled from entry-point groups.

Built-in methods and datasets are declared in the same entry-point groups as third-party
plugins (``fairbench.methods``, ``fairbench.datasets``), so every run exercises the plugin path.
Entry points are read when first needed and a plugin module is imported only when that plugin
is used.

``fairbench list`` reads a :func:`catalog` instead of importing the plugins (which imports
torch): what it shows per plugin, cached in a JSON file and rebuilt, by importing every plugin
once, whenever its fingerprint changes. The fingerprint covers the installed distributions
(names and versions, from their metadata folder names), each entry point's name and value, and
the size and modification time of each plugin's module file, so installing, upgrading or
editing a plugin (editable installs included) is seen on the next listing.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
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


CATALOG_FORMAT = 1
MANIFEST = "manifest.json"
"""The file that marks a complete prepared cache (``fairbench.cache.MANIFEST``, repeated here
because importing fairbench.cache loads pandas)."""


def _installed() -> list[str]:
    """Metadata folder names (``name-version.dist-info``) of everything on ``sys.path``."""
    found = set()
    for entry in sys.path:
        try:
            found.update(n for n in os.listdir(entry or ".") if n.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
    return sorted(found)


def _module_stamp(module: str) -> list[Any] | None:
    """Path, size and mtime of a plugin's module file, found without executing the module
    (its parent packages are imported, as locating a submodule requires)."""
    try:
        spec = importlib.util.find_spec(module)
    except Exception:  # a missing or broken parent package: the import error is cached instead
        return None
    origin = spec.origin if spec is not None else None
    if not origin or not os.path.isfile(origin):
        return None
    stat = os.stat(origin)
    return [origin, stat.st_size, stat.st_mtime_ns]


def fingerprint(registries: list[Registry]) -> str:
    """What the catalog depends on: installed distributions, entry points, plugin module files."""
    parts: list[Any] = [CATALOG_FORMAT, _installed()]
    for reg in registries:
        for name, ep in sorted(reg._discover().items()):
            parts.append([reg.group, name, ep.value, _module_stamp(ep.module)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def describe_method(cls: Any) -> dict[str, Any]:
    return {
        "uses_attributes": bool(cls.uses_attributes),
        "uses_attributes_at_test": bool(getattr(cls, "uses_attributes_at_test", False)),
        "summary": cls.summary(),
    }


def describe_dataset(name: str, cls: Any) -> dict[str, Any]:
    return {
        "attributes": {a: list(g) for a, g in cls.attributes.items()},
        "needs_prepare": bool(cls.needs_prepare),
        "folder": cls.name or name,
    }


def _build_catalog(stamp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"fingerprint": stamp, "methods": {}, "datasets": {}}
    for reg, key in ((methods, "methods"), (datasets, "datasets")):
        for name in sorted(reg._discover()):
            try:
                cls = reg.get(name)
            except FairbenchError as exc:
                out[key][name] = {"error": str(exc)}
                continue
            out[key][name] = describe_method(cls) if reg is methods else describe_dataset(name, cls)
    return out


def catalog(path: Path | None = None) -> dict[str, Any]:
    """What ``fairbench list`` shows for every installed plugin, from the cache file when its
    fingerprint is current, else by importing every plugin once and rewriting the cache.

    A plugin that fails to import is kept with its ``error`` message instead of its fields.
    """
    from fairbench.paths import catalog_file

    path = Path(path) if path is not None else catalog_file()
    stamp = fingerprint([methods, datasets])
    try:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == stamp:
            return cached
    except (OSError, ValueError):
        pass
    fresh = _build_catalog(stamp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(fresh, indent=1))
        partial.replace(path)
    except OSError:  # a read-only home: list still answers, just not faster next time
        pass
    return fresh


def is_prepared(data_dir: Path, entry: dict[str, Any]) -> bool:
    """Whether a catalogued dataset has a complete prepared cache in ``data_dir``."""
    return not entry["needs_prepare"] or (Path(data_dir) / entry["folder"] / MANIFEST).is_file()
