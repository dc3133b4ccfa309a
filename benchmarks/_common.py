"""Shared by the benchmark scripts: describe the machine, print a result and append it to a file."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """The device a benchmark ran on, in words."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def emit(lines: list[str], append: str | None) -> None:
    """Print the result block and, when asked, append it to a markdown file."""
    text = "\n".join(lines)
    print(text)
    if append:
        with open(append, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
