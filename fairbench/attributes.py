"""Intersectional (crossed) sensitive attributes such as ``race×sex``.

A crossed attribute is spelled ``a×b``, ``a*b`` or ``a_x_b``; its canonical name is ``a_x_b``
because MLflow metric keys cannot contain ``×``. Its groups are every pair of the parts' groups,
named ``<group of a>×<group of b>`` (e.g. ``Black×female``), with code
``code_a * len(groups_b) + code_b``; a sample whose code is unknown (-1) in either part is
unknown (-1) in the crossing. Crossed columns are appended to a :class:`~fairbench.data.Splits`,
so training, evaluation, saved predictions and the leaderboard treat them like any other
attribute.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from fairbench.errors import UnknownNameError

if TYPE_CHECKING:  # fairbench.data imports torch; this module stays light for ``prepare``
    import pandas as pd

    from fairbench.data import Splits

SEPARATOR = "_x_"
GROUP_SEPARATOR = "×"
_SPLIT = re.compile(r"\s*(?:×|\*|_x_)\s*")


def parts(name: str) -> tuple[str, str] | None:
    """The two attributes of a crossed name (any spelling), or None for a plain attribute."""
    pieces = _SPLIT.split(name.strip())
    if len(pieces) == 1:
        return None
    if len(pieces) != 2 or not all(pieces):
        raise UnknownNameError(f"attribute '{name}': cross exactly two attributes, e.g. race×sex (or race_x_sex)")
    return pieces[0], pieces[1]


def canonical(name: str) -> str:
    """``a_x_b`` for any spelling of a crossing; a plain name unchanged."""
    pair = parts(name)
    return name.strip() if pair is None else f"{pair[0]}{SEPARATOR}{pair[1]}"


def resolve(name: str, attributes: Mapping[str, Sequence[str]], dataset: str) -> str:
    """The canonical name of ``name`` after checking that it (or both its parts) exist."""
    known = list(attributes)
    pair = parts(name)
    for part in pair or (name.strip(),):
        if part not in attributes:
            raise UnknownNameError(f"dataset '{dataset}' has no attribute '{part}'; attributes: {', '.join(known)}")
    if pair is not None and pair[0] == pair[1]:
        raise UnknownNameError(f"attribute '{name}': cross two different attributes, e.g. race×sex")
    return canonical(name)


def groups(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Group names of the crossing in code order: ``a0×b0, a0×b1, …, a1×b0, …``."""
    return [f"{ga}{GROUP_SEPARATOR}{gb}" for ga in a for gb in b]


def codes(a: np.ndarray, b: np.ndarray, n_b: int) -> np.ndarray:
    """Crossed codes ``a * n_b + b``; -1 where either part is unknown (-1)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    return np.where((a >= 0) & (b >= 0), a * n_b + b, -1)


def add_crossed(splits: Splits, names: Iterable[str]) -> Splits:
    """``splits`` with one more attribute column per crossed name (already present ones are kept once)."""
    attributes = {k: list(v) for k, v in splits.attributes.items()}
    columns: list[tuple[int, int, int]] = []
    order = list(attributes)
    for name in dict.fromkeys(canonical(n) for n in names):
        pair = parts(name)
        if pair is None or name in attributes:
            continue
        a, b = pair
        columns.append((order.index(a), order.index(b), len(attributes[b])))
        attributes[name] = groups(attributes[a], attributes[b])
    if not columns:
        return splits

    def extend(attrs: np.ndarray) -> np.ndarray:
        attrs = np.asarray(attrs, dtype=np.int64)
        extra = [codes(attrs[:, i], attrs[:, j], n_b) for i, j, n_b in columns]
        return np.column_stack([attrs, *extra])

    return replace(
        splits,
        train=replace(splits.train, attrs=extend(splits.train.attrs)),
        val=replace(splits.val, attrs=extend(splits.val.attrs)),
        test=replace(splits.test, attrs=extend(splits.test.attrs)),
        attributes=attributes,
    )


def cross_table(
    table: pd.DataFrame, attributes: Mapping[str, Sequence[str]], names: Iterable[str]
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """``table`` with a code column per crossing in ``names``, and the attributes including them."""
    out = {k: list(v) for k, v in attributes.items()}
    table = table.copy() if names else table
    for name in names:
        pair = parts(name)
        if pair is None:
            raise ValueError(f"'{name}' is not a crossing of two attributes")
        a, b = pair
        key = canonical(name)
        table[key] = codes(table[a].to_numpy(), table[b].to_numpy(), len(out[b]))
        out[key] = groups(out[a], out[b])
    return table, out
