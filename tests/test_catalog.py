"""`fairbench list` from the cached plugin catalog: no torch import when warm, broken plugins
reported, edited plugins seen."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fairbench import cache, registry

LIST = textwrap.dedent(
    """
    import sys
    from fairbench.cli import main
    sys.argv = ["fairbench", "list"]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    print("TORCH_IMPORTED", "torch" in sys.modules)
    """
)


@pytest.fixture
def plugin_dir(tmp_path):
    """A folder on PYTHONPATH holding an installed-looking distribution with one working method
    plugin (module ``uxplug``) and one whose module does not exist."""
    site = tmp_path / "site"
    info = site / "uxplug-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: uxplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fairbench.methods]\nuxmethod = uxplug:Mine\nuxbroken = no_such_module_uxplug:Thing\n"
    )
    write_plugin(site, "First version of the test plugin.")
    return site


def write_plugin(site: Path, summary: str) -> None:
    path = site / "uxplug.py"
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(
        "from fairbench.method import Method\n\n\n"
        f"class Mine(Method):\n    '''{summary}'''\n\n    uses_attributes_at_test = True\n"
    )
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a new mtime even on coarse clocks


def run_list(site: Path, catalog: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "FAIRBENCH_CATALOG": str(catalog),
        "COLUMNS": "250",
        "FAIRBENCH_DATA": str(site / "data"),
    }
    done = subprocess.run([sys.executable, "-c", LIST], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_warm_list_skips_torch_reports_broken_plugins_and_sees_edits(plugin_dir, tmp_path):
    catalog = tmp_path / "catalog.json"
    cold = run_list(plugin_dir, catalog)
    assert catalog.is_file()
    assert "First version of the test plugin." in cold.stdout
    assert "uxbroken" in cold.stderr and "failed to import" in cold.stderr

    warm = run_list(plugin_dir, catalog)
    assert "TORCH_IMPORTED False" in warm.stdout
    assert "First version of the test plugin." in warm.stdout
    row = next(line for line in warm.stdout.splitlines() if "uxmethod" in line)
    assert [cell.strip() for cell in row.split("│")[2:4]] == ["no", "yes"]  # in training, at test
    assert "warning: method plugin 'uxbroken'" in warm.stderr  # still reported from the cache
    assert "erm" in warm.stdout and "synthetic" in warm.stdout

    write_plugin(plugin_dir, "Second version of the test plugin.")
    edited = run_list(plugin_dir, catalog)
    assert "Second version of the test plugin." in edited.stdout
    assert "First version" not in edited.stdout


def test_fingerprint_follows_entry_points_and_module_files(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    (tmp_path / "fpmod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = registry.Registry("method", "fairbench.test")
    reg._entry_points = {"a": EntryPoint("a", "fpmod:X", "fairbench.test")}
    first = registry.fingerprint([reg])
    assert registry.fingerprint([reg]) == first
    stat = (tmp_path / "fpmod.py").stat()
    os.utime(tmp_path / "fpmod.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = registry.fingerprint([reg])
    assert second != first
    reg._entry_points = {"a": EntryPoint("a", "fpmod:Y", "fairbench.test")}
    assert registry.fingerprint([reg]) not in (first, second)


def test_prepared_state_reads_the_cache_manifest(tmp_path):
    assert registry.MANIFEST == cache.MANIFEST
    entry = {"needs_prepare": True, "folder": "ham10000"}
    assert not registry.is_prepared(tmp_path, entry)
    (tmp_path / "ham10000").mkdir()
    (tmp_path / "ham10000" / cache.MANIFEST).write_text("{}")
    assert registry.is_prepared(tmp_path, entry)
    assert registry.is_prepared(tmp_path, {"needs_prepare": False, "folder": "synthetic"})


def test_unreadable_catalog_is_rebuilt(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text("{not json")
    found = registry.catalog(path)
    assert found["methods"]["erm"] == {
        "uses_attributes": False,
        "uses_attributes_at_test": False,
        "summary": "Plain binary cross-entropy on the labels; no fairness intervention.",
    }
    assert found["datasets"]["synthetic"]["attributes"]["sex"] == ["female", "male"]
    assert registry.catalog(path)["fingerprint"] == found["fingerprint"]


def test_shell_completion_lists_plugin_names_without_torch(plugin_dir, tmp_path):
    code = (
        "import sys\nfrom fairbench.cli import main\ntry:\n    main(prog_name='fairbench')\n"
        "except SystemExit:\n    pass\nprint('TORCH_IMPORTED', 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(plugin_dir), "_FAIRBENCH_COMPLETE": "bash_complete",
           "COMP_WORDS": "fairbench run --method ux", "COMP_CWORD": "3"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["plain,uxbroken", "plain,uxmethod", "TORCH_IMPORTED False"], done.stderr
