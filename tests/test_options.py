from typing import Literal

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
