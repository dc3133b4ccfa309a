from typing import Annotated, Literal

import pytest

from fairbench import options
from fairbench.errors import FairbenchError, UnknownNameError


class Plugin:
    def __init__(
        self,
        backbone=None,
        info=None,
        *,
        weight: float = 0.1,
        steps: int = 3,
        on: bool = False,
        side: Literal["positive", "both"] = "positive",
        name: str | None = None,
    ) -> None:
        pass


def test_values_are_converted_by_annotation():
    got = options.parse(Plugin, ["weight=0.5", "steps=7", "on=true", "side=both", "name=none"], "method 'p'")
    assert got == {"weight": 0.5, "steps": 7, "on": True, "side": "both", "name": None}
    assert options.defaults(Plugin) == {"weight": 0.1, "steps": 3, "on": False, "side": "positive", "name": None}


@pytest.mark.parametrize(
    ("pair", "error", "message"),
    [
        ("wieght=1", UnknownNameError, "method 'p' has no option 'wieght'; did you mean 'weight'?"),
        ("steps=1.5", FairbenchError, "option steps of method 'p': '1.5' is not a valid int"),
        ("side=left", FairbenchError, "'left' is not one of positive, both"),
        ("weight", FairbenchError, "must look like key=value"),
    ],
)
def test_bad_options_say_what_is_wrong(pair, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        options.parse(Plugin, [pair], "method 'p'")


class Ranged:
    def __init__(
        self,
        backbone=None,
        info=None,
        *,
        rate: Annotated[float, options.Interval(ge=0)] = 0.1,
        share: Annotated[float, options.Interval(gt=0, le=1)] | None = None,
        count: Annotated[int, options.Interval(ge=1)] = 2,
        free: float = 1.0,
    ) -> None:
        pass


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("rate=-1", r"option rate of method 'r': -1.0 is outside its range \[0, inf\)"),
        ("rate=nan", "option rate of method 'r': nan is not a finite number"),
        ("free=inf", "option free of method 'r': inf is not a finite number"),
        ("share=0", r"share of method 'r': 0.0 is outside its range \(0, 1\]"),
        ("count=0", r"count of method 'r': 0 is outside its range \[1, inf\)"),
    ],
)
def test_numbers_must_be_finite_and_in_range(pair, message):
    with pytest.raises(FairbenchError, match=message):
        options.parse(Ranged, [pair], "method 'r'")


def test_ranged_values_inside_their_range_pass():
    got = options.parse(Ranged, ["rate=0", "share=1", "share=none", "count=3"], "method 'r'")
    assert got == {"rate": 0.0, "share": None, "count": 3}
    assert options.validate(Ranged, {"rate": 2.0, "count": 5}, "method 'r'") == {"rate": 2.0, "count": 5}
    with pytest.raises(FairbenchError, match="outside its range"):
        options.validate(Ranged, {"share": 1.5}, "method 'r'")
