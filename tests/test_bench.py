"""Smoke tests of ``python -m xloss.bench``: tiny sizes, worker processes, CSV contents and the skip logic."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from xloss import _dispatch, bench


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_quick_run_writes_csv(tmp_path, capsys):
    rc = bench.main(["--quick", "--no-plot", "--device", "cpu", "--runs", "1", "--out", str(tmp_path)])
    assert rc == 0
    path = tmp_path / "info_nce_cpu_float32_quick.csv"
    assert path.exists()
    assert not list(tmp_path.glob("*.png"))
    columns, rows = _read_csv(path)
    assert columns == bench.CSV_COLUMNS
    assert len(rows) == len(bench.PRESETS["quick"]["cpu"].shapes)
    for row in rows:
        assert row["status"] == "ok", row["status"]
        assert row["xloss_status"] == row["baseline_status"] == "ok"
        for key in ("xloss_time_s", "baseline_time_s", "xloss_peak_bytes", "baseline_peak_bytes",
                    "time_ratio", "mem_ratio"):
            assert float(row[key]) > 0, key
        assert row["device"] == "cpu" and row["device_name"] and row["dtype"] == "float32"
        # The engine "auto" took is recorded: the dense path up to DENSE_CELLS, the chunked sweep beyond.
        n, m = int(row["n"]), int(row["m"])
        expected = _dispatch.resolve("info_nce", "auto", torch.device("cpu"), torch.float32, local=True, cells=n * m)
        assert row["backend"] == expected and row["baseline_backend"] == "reference"
        assert row["runs"] == "1" and len(row["xloss_times_s"].split()) == 1
        assert row["torch_version"] and row["xloss_version"] and row["date"]
    table = capsys.readouterr().out
    assert "xloss vs naive" in table and "wrote" in table


def test_naive_skipped_when_memory_is_short(tmp_path, monkeypatch):
    """--mem-limit-gib below the naive estimate: naive is reported as skipped and never launched."""
    launched = []

    def fake_child(args, timeout):  # stands in for the xloss worker: this test is about the decision
        launched.append(json.loads(args[1])["impl"])
        return {"status": "ok", "times_s": [0.5], "median_s": 0.5, "peak_bytes": 1024, "backend": "cpu",
                "threads": 1}

    monkeypatch.setattr(bench.worker, "_run_child", fake_child)
    rc = bench.main(["--family", "info_nce", "--sizes", "256", "--dim", "32", "--runs", "1", "--device", "cpu", "--no-plot",
                     "--mem-limit-gib", "0.0001", "--out", str(tmp_path)])
    assert rc == 0
    assert launched == ["xloss"]
    _, rows = _read_csv(tmp_path / "info_nce_cpu_float32.csv")
    (row,) = rows
    assert row["xloss_status"] == "ok"
    assert row["baseline_status"].startswith("skipped: needs ~")
    assert "GiB available" in row["baseline_status"]
    assert row["status"].startswith("naive: skipped")
    assert row["baseline_time_s"] == row["time_ratio"] == row["mem_ratio"] == ""
    assert int(row["baseline_peak_estimate_bytes"]) > 0


def test_skip_uses_available_memory(monkeypatch):
    """The decision itself: estimate against 85 % of MemAvailable, without running anything."""
    family = bench.FAMILIES["info_nce"]
    cfg = bench.Config(families=["info_nce"], shapes=[(4096, 4096, 64)], dtype="float32", device="cpu",
                       runs=1, baselines=("naive",), preset="default", out=None, plot=False,
                       mem_limit_bytes=None, timeout_s=None)
    estimate = family.naive.estimate_peak_bytes((4096, 4096, 64), torch.float32, torch.device("cpu"))
    monkeypatch.setattr(bench.memory, "cpu_available_bytes", lambda: int(estimate / bench.MEM_FRACTION) - 1)
    result = bench.run_impl(family, family.naive, (4096, 4096, 64), cfg, probed_free=None)
    assert result["status"].startswith("skipped")


@pytest.mark.parametrize("seconds, text", [(2.5, "2.5 s"), (0.0123, "12.3 ms"), (None, "-")])
def test_fmt_time(seconds, text):
    assert bench.fmt_time(seconds) == text


@pytest.mark.parametrize("nbytes, text", [(3 * 2**30, "3 GiB"), (1.5 * 2**20, "1.5 MiB"), (None, "-")])
def test_fmt_bytes(nbytes, text):
    assert bench.fmt_bytes(nbytes) == text


def test_worker_reports_oom_instead_of_raising():
    """A run that runs out of memory becomes status "oom"; other failures "error: ..."."""
    family = bench.FAMILIES["info_nce"]

    def out_of_memory(inputs):
        raise MemoryError

    def broken(inputs):
        raise ValueError("bad input")

    device = torch.device("cpu")
    for run, status in ((out_of_memory, "oom"), (broken, "error: ValueError: bad input")):
        impl = bench.Impl("fake", "fake", run, lambda device: "fake")
        result = bench.measure(family, impl, (8, 8, 4), torch.float32, device, runs=1)
        assert result["status"].startswith(status)
        assert result["median_s"] is None
    assert bench.worker._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    assert not bench.worker._is_oom(RuntimeError("shape mismatch"))
