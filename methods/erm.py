"""erm: empirical risk minimisation, the baseline every method is compared against."""

from __future__ import annotations

from fairbench.method import Method


class ERM(Method):
    """Plain binary cross-entropy on the labels; no fairness intervention."""

    uses_attributes = False
