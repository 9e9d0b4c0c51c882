"""Smoke tests of ``python -m xloss.bench``: tiny sizes, worker processes, CSV contents and the skip logic."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

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


# ----------------------------------------------------------------------------------------------------------
# Late interaction at training scale (issue 14): the families late_interaction_distill and xtr
# ----------------------------------------------------------------------------------------------------------

HAS_ST = importlib.util.find_spec("sentence_transformers") is not None


def test_late_interaction_training_preset():
    """Both families registered; the preset runs them on the CPU in fp32 up to the bar-setting shapes, and on CUDA
    at the same shapes in bf16."""
    assert {"late_interaction_distill", "xtr"} <= set(bench.FAMILIES)
    assert "reference" in bench.FAMILIES["xtr"].extras
    preset = bench.PRESETS["late-interaction-training"]["cpu"]
    assert set(bench.PRESETS["late-interaction-training"]) == {"cpu", "cuda"} and preset.dtype == "float32"
    gpu = bench.PRESETS["late-interaction-training"]["cuda"]
    assert gpu.dtype == "bfloat16" and (gpu.shapes, gpu.family_shapes) == (preset.shapes, preset.family_shapes)
    assert preset.families == ("late_interaction_distill", "xtr") and preset.baselines == ("naive",)
    assert preset.shapes == ((64, 16, 128), (128, 16, 128), (256, 16, 128))  # (N, n, D)
    assert preset.family_shapes["xtr"] == ((16, 64, 128), (32, 128, 128), (64, 256, 128))  # (Nq, Nd, D)
    cfg = bench.resolve_config(bench.build_parser().parse_args(["--preset", "late-interaction-training"]),
                               bench.build_parser())
    assert cfg.families == ["late_interaction_distill", "xtr"] and cfg.device == "cpu"
    # The naive distillation at the bar (d is 377 MB): its estimate stays well within a 16 GiB machine.
    estimate = bench.FAMILIES["late_interaction_distill"].naive.estimate_peak_bytes(
        (256, 16, 128), torch.float32, torch.device("cpu"))
    assert 2**30 < estimate < 2 * 2**30


def _grads(family, impl, shape):
    inputs = family.make_inputs(shape, torch.float32, torch.device("cpu"))
    family.impl(impl).run(inputs)
    return inputs["q"].grad, inputs["d"].grad


@pytest.mark.parametrize("name, shape, impls", [
    ("late_interaction_distill", (6, 3, 16), ("naive",)),
    ("xtr", (3, 6, 16), ("reference", *(("naive",) if HAS_ST else ()))),
    ("xtr", (4, 6, 16), ("reference", *(("naive",) if HAS_ST else ()))),  # Nq does not divide Nd
])
def test_training_family_baselines_compute_the_same_gradients(name, shape, impls):
    """The baselines compute what xloss computes: the same gradients of q and d on the family's inputs."""
    family = bench.FAMILIES[name]
    expected = _grads(family, "xloss", shape)
    assert all(g is not None and g.abs().sum() > 0 for g in expected)
    for impl in impls:
        for got, want in zip(_grads(family, impl, shape), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, baselines", [("late_interaction_distill", "naive"), ("xtr", "naive,reference")])
def test_training_family_run_writes_csv(tmp_path, name, baselines):
    """Each family runs at a tiny shape in worker processes and writes finite ratios."""
    rc = bench.main(["--family", name, "--sizes", "4", "--dim", "16", "--runs", "1", "--device", "cpu",
                     "--baselines", baselines, "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    columns, rows = _read_csv(tmp_path / f"{name}_cpu_float32.csv")
    assert columns == bench.CSV_COLUMNS
    assert [r["baseline"] for r in rows] == baselines.split(",")
    for row in rows:
        assert (row["family"], row["n"], row["m"], row["d"]) == (name, "4", "4", "16")
        assert row["xloss_status"] == "ok"
        if row["baseline"] == "naive" and name == "xtr" and not HAS_ST:
            assert row["baseline_status"] == "unavailable: sentence_transformers is not installed"
            continue
        assert row["status"] == "ok", row["status"]
        for key in ("xloss_time_s", "baseline_time_s", "time_ratio", "xloss_tflops"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, key
        # A tiny run may fit in memory the priming run freed: its resident-set growth can be 0 (no mem_ratio
        # when the baseline's is).
        peaks = [int(row["xloss_peak_bytes"]), int(row["baseline_peak_bytes"])]
        assert min(peaks) >= 0
        if peaks[1] > 0:
            assert math.isfinite(float(row["mem_ratio"])) and float(row["mem_ratio"]) >= 0


def test_xtr_without_sentence_transformers(tmp_path, monkeypatch):
    """Where sentence-transformers is not installed the xtr baseline is reported unavailable, not an error."""
    launched = []

    def fake_child(args, timeout):
        launched.append(json.loads(args[1])["impl"])
        return {"status": "ok", "times_s": [0.5], "median_s": 0.5, "peak_bytes": 1024, "backend": "chunked",
                "threads": 1}

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers" else find_spec(name, *a))
    monkeypatch.setattr(bench.worker, "_run_child", fake_child)
    rc = bench.main(["--family", "xtr", "--sizes", "4", "--dim", "16", "--runs", "1", "--device", "cpu",
                     "--no-plot", "--out", str(tmp_path)])
    assert rc == 0 and launched == ["xloss"]
    (row,) = _read_csv(tmp_path / "xtr_cpu_float32.csv")[1]
    assert row["baseline_status"] == "unavailable: sentence_transformers is not installed"
    assert row["time_ratio"] == row["mem_ratio"] == ""


def test_workspace_ratio_compares_the_peaks_beyond_the_inputs_gradients():
    from xloss.bench.report import _workspace_ratio

    xl = {"peak_bytes": 110, "grad_bytes": 100}
    assert _workspace_ratio(xl, {"peak_bytes": 300}) == pytest.approx(0.05)
    assert _workspace_ratio({"peak_bytes": 90, "grad_bytes": 100}, {"peak_bytes": 300}) == 0.0  # RSS noise
    assert _workspace_ratio(xl, {"peak_bytes": 100}) is None  # the baseline holds nothing beyond them
    assert _workspace_ratio({"peak_bytes": None, "grad_bytes": 1}, {"peak_bytes": 300}) is None


def test_measure_records_the_inputs_gradient_bytes():
    from xloss.bench.worker import _grad_bytes

    inputs = {"q": torch.zeros(3, 4, requires_grad=True), "d": torch.zeros(5, dtype=torch.float64,
                                                                           requires_grad=True),
              "mask": torch.ones(3, dtype=torch.bool), "n": 7}
    assert _grad_bytes(inputs) == 3 * 4 * 4 + 5 * 8


def test_rounds_pool_the_runs_of_each_implementation():
    from xloss.bench.runner import merge_rounds

    a = {"status": "ok", "times_s": [1.0, 3.0], "median_s": 2.0, "peak_bytes": 10, "backend": "dense"}
    b = {"status": "ok", "times_s": [5.0, 6.0], "median_s": 5.5, "peak_bytes": 30, "backend": "dense"}
    merged = merge_rounds([a, b])
    assert merged["times_s"] == [1.0, 3.0, 5.0, 6.0] and merged["median_s"] == 4.0 and merged["peak_bytes"] == 30
    assert merge_rounds([a]) is a
    bad = {"status": "oom (RuntimeError)"}
    assert merge_rounds([a, bad]) is bad
    assert bench.PRESETS["small"]["cpu"].rounds == 5


def test_rounds_alternate_the_workers(monkeypatch, tmp_path):
    from xloss.bench import runner

    calls = []

    def fake_run_impl(family, impl, shape, cfg, probed_free):
        calls.append(impl.name)
        return {"status": "ok", "times_s": [0.001], "median_s": 0.001, "peak_bytes": 0, "backend": "x"}

    monkeypatch.setattr(runner, "run_impl", fake_run_impl)
    cfg = runner.Config(families=["info_nce"], shapes=[(8, 8, 4)], dtype="float32", device="cpu", runs=1,
                        baselines=("naive",), preset="test", out=tmp_path, plot=False, mem_limit_bytes=None,
                        timeout_s=None, rounds=3)
    rows = runner.run_family(bench.FAMILIES["info_nce"], cfg, {}, None)
    assert calls == ["xloss", "naive"] * 3
    assert len(rows) == 1 and rows[0]["rounds"] == 3 and rows[0]["time_ratio"] == 1.0
