"""Streaming prepare: resuming after an interruption, and the manifest's file check at load."""

import json

import fairbench.datasets.chexpert as chexpert_module
import numpy as np
import pytest
from click.testing import CliRunner
from rawdata import write_chexpert

from fairbench import cache
from fairbench import prepare as prepare_module
from fairbench.cli import main
from fairbench.errors import FairbenchError

CALLS: list[str] = []
LIMIT: list[int] = []


def counting_reader(path, size):
    """Records every decoded file; raises KeyboardInterrupt once ``LIMIT`` files were decoded."""
    if LIMIT and len(CALLS) >= LIMIT[0]:
        raise KeyboardInterrupt
    CALLS.append(str(path))
    return prepare_module.read_gray(path, size)


def prepare(source, data_dir, *extra):
    args = ["prepare", "chexpert", "--source", str(source), "--data-dir", str(data_dir), "--workers", "1"]
    return CliRunner().invoke(main, [*args, "--size", "32", *extra])


class _NoBar:
    def advance(self, n):
        pass

    def close(self):
        pass


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK", 8)
    monkeypatch.setattr(chexpert_module, "read_gray", counting_reader)
    CALLS.clear()
    LIMIT.clear()
    yield
    CALLS.clear()
    LIMIT.clear()


def test_interrupted_prepare_resumes_without_decoding_finished_chunks(tmp_path, counted, monkeypatch):
    bars = []
    monkeypatch.setattr(prepare_module, "_Bar", lambda total, completed, enabled: bars.append(completed) or _NoBar())
    info = write_chexpert(tmp_path / "raw", n_patients=30)
    data = tmp_path / "data"
    LIMIT.append(20)  # chunks 0 and 1 (16 files) finish, chunk 2 is cut off after 4 files
    out = prepare(tmp_path / "raw", data)
    assert out.exit_code == 130, out.output
    assert "run the same command again to resume" in out.output
    assert not (data / "chexpert").exists()
    partial = cache.partial_location(data, "chexpert")
    assert len((partial / prepare_module.DECODED).read_text().splitlines()) == 2
    first = list(CALLS)
    CALLS.clear()
    LIMIT.clear()
    out = prepare(tmp_path / "raw", data)
    assert out.exit_code == 0, out.output
    assert not partial.exists()
    assert bars == [0, 16]  # the progress bar starts where the interrupted run stopped
    n = len(first) - 4 + len(CALLS)
    assert set(CALLS).isdisjoint(first[:16])  # finished chunks are not decoded again
    assert CALLS[:4] == first[16:]  # the cut-off chunk is decoded from its start
    monkeypatch.setattr(chexpert_module, "read_gray", prepare_module.read_gray)
    assert prepare(tmp_path / "raw", tmp_path / "whole").exit_code == 0
    resumed = cache.load(data, "chexpert")[0]
    whole = cache.load(tmp_path / "whole", "chexpert")[0]
    assert len(resumed) == n == info["images"] - 2
    assert np.array_equal(np.asarray(resumed), np.asarray(whole))
    assert (data / "chexpert" / "metadata.csv").read_bytes() == (
        tmp_path / "whole" / "chexpert" / "metadata.csv"
    ).read_bytes()
    assert {"build.json", "decode.json", "decoded.jsonl"}.isdisjoint(p.name for p in (data / "chexpert").iterdir())


def test_other_settings_or_force_start_over(tmp_path, counted):
    write_chexpert(tmp_path / "raw", n_patients=12)
    LIMIT.append(10)
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 130
    CALLS.clear()
    LIMIT.clear()
    out = prepare(tmp_path / "raw", tmp_path / "data", "--size", "24")  # another size: nothing reused
    assert out.exit_code == 0, out.output
    n = cache.load(tmp_path / "data", "chexpert")[0].shape[0]
    assert len(CALLS) == n
    LIMIT.append(10)
    CALLS.clear()
    assert prepare(tmp_path / "raw", tmp_path / "data", "--size", "24", "--force").exit_code == 130
    CALLS.clear()
    LIMIT.clear()
    assert prepare(tmp_path / "raw", tmp_path / "data", "--size", "24", "--force").exit_code == 0
    assert len(CALLS) == n  # --force discards the partial build too


def test_a_crash_keeps_the_partial_build_and_bad_input_removes_it(tmp_path, monkeypatch):
    write_chexpert(tmp_path / "raw", n_patients=12)
    monkeypatch.setattr(prepare_module, "CHUNK", 4)

    def crash(path, size):
        raise MemoryError

    monkeypatch.setattr(chexpert_module, "read_gray", crash)
    with pytest.raises(MemoryError):
        prepare_module.prepare(chexpert_module.CheXpert(), tmp_path / "raw", tmp_path / "data", size=32, workers=1)
    assert cache.partial_location(tmp_path / "data", "chexpert").is_dir()
    monkeypatch.setattr(chexpert_module, "read_gray", prepare_module.read_gray)
    sorted((tmp_path / "raw").rglob("*.jpg"))[0].write_bytes(b"broken")
    with pytest.raises(FairbenchError, match="not a readable image"):
        prepare_module.prepare(chexpert_module.CheXpert(), tmp_path / "raw", tmp_path / "data", size=32, workers=1)
    assert list((tmp_path / "data").iterdir()) == []


@pytest.fixture
def prepared(tmp_path):
    write_chexpert(tmp_path / "raw", n_patients=12)
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    return tmp_path / "data"


def test_manifest_records_sizes_and_checksums(prepared):
    manifest = json.loads((prepared / "chexpert" / "manifest.json").read_text())
    for name in ("images.npy", "metadata.csv"):
        record = manifest["files"][name]
        assert record["bytes"] == (prepared / "chexpert" / name).stat().st_size
        assert record == cache.file_record(prepared / "chexpert" / name)


def test_a_truncated_cache_is_refused_with_the_rebuild_command(prepared):
    images = prepared / "chexpert" / "images.npy"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(FairbenchError, match=r"\(truncated or altered\); run .fairbench prepare chexpert .*--force."):
        cache.load(prepared, "chexpert")


@pytest.mark.parametrize("full", [True, False])
def test_an_altered_byte_is_refused_by_the_full_or_the_sampled_checksum(prepared, monkeypatch, full):
    if not full:
        monkeypatch.setattr(cache, "FULL_CHECK_BYTES", 0)  # as for a cache larger than the full-check limit
    images = prepared / "chexpert" / "images.npy"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF  # the last block is always among the sampled ones
    images.write_bytes(bytes(raw))
    with pytest.raises(FairbenchError, match="checksum differs from the manifest"):
        cache.load(prepared, "chexpert")


def test_run_on_a_damaged_cache_prints_one_line(prepared, tmp_path):
    (prepared / "chexpert" / "metadata.csv").write_text("Path\n")
    args = ["run", "-d", "chexpert", "--data-dir", str(prepared), "--results-dir", str(tmp_path / "results")]
    out = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert out.exit_code == 1
    assert "metadata.csv" in out.output and "--force" in out.output
    assert len(out.output.strip().splitlines()) == 1
