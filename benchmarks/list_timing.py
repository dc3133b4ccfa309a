"""Wall time of `fairbench list`, `--help` and shell completion, each in a fresh process.

Cold: the plugin catalog is deleted before each call, so every plugin (and torch) is imported
and the catalog rewritten, which is what every `fairbench list` cost before the catalog. Warm:
the catalog is current. Run: python benchmarks/list_timing.py [--repeat 7] [--append RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def _fairbench() -> list[str]:
    found = shutil.which("fairbench") or str(Path(sys.executable).with_name("fairbench"))
    return [found]


def timed(cmd: list[str], env: dict[str, str], before=None) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one call in a fresh process."""
    if before:
        before()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--cold-repeat", type=int, default=3)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    catalog = tmp / "catalog.json"
    env = {**os.environ, "FAIRBENCH_CATALOG": str(catalog), "FAIRBENCH_DATA": str(tmp / "data")}
    complete = {
        **env,
        "_FAIRBENCH_COMPLETE": "bash_complete",
        "COMP_WORDS": "fairbench run --method ",
        "COMP_CWORD": "3",
    }
    cmd = _fairbench()
    cold = "`fairbench list`, cold catalog (imports every plugin and torch)"
    cases = [
        (cold, [*cmd, "list"], env, lambda: catalog.unlink(missing_ok=True)),
        ("`fairbench list`, warm catalog", [*cmd, "list"], env, None),
        ("`fairbench --help`", [*cmd, "--help"], env, None),
        ("completion of `fairbench run --method <TAB>`", cmd, complete, None),
    ]  # fmt: skip
    timed([*cmd, "list"], env)  # warm the page cache and the catalog once
    rows = []
    for label, c, e, before in cases:
        repeat = args.cold_repeat if before else args.repeat
        walls, cpus = zip(*[timed(c, e, before) for _ in range(repeat)], strict=True)
        rows.append((label, statistics.median(walls), min(walls), statistics.median(cpus)))
    cold_median = rows[0][1]
    load = os.getloadavg()[0]
    lines = [
        "",
        f"## `fairbench list` latency ({date.today()}, {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()})",
        "",
        f"Fresh process per call, median of {args.repeat} ({args.cold_repeat} cold); load average {load:.1f} at the "
        "end; CPU = user + system time of the process. Command: `python benchmarks/list_timing.py`.",
        "",
        "| command | median wall | min wall | median CPU | wall vs cold list | target (wall) | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, med, lo, cpu in rows:
        target = "" if "cold" in label else "< 0.5 s"
        met = "" if "cold" in label else ("yes" if med < 0.5 else "no")
        lines.append(
            f"| {label} | {med:.3f} s | {lo:.3f} s | {cpu:.3f} s | {med / cold_median:.2f} | {target} | {met} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
