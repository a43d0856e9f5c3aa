"""The benchmark harness (benchmarks/): every benchmark's --quick run writes a report of the one
schema; the peak memory of a measured setting is its own child process's, not a lifetime maximum."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.child import peak_rss_bytes  # noqa: E402
from benchmarks.harness.measure import run_child  # noqa: E402
from benchmarks.harness.report import compare, markdown  # noqa: E402

MIB = 2**20
NNUNET_COMPARISONS = {"plan_and_preprocess", "train_vs_nnunet", "predict_vs_nnunet"}


def numbers(obj):
    """Every number in a JSON value (bools excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_list_names_every_benchmark(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS)


@pytest.mark.subprocess
def test_peak_memory_is_the_child_process_own_peak():
    ballast = b"\x01" * (300 * MIB)  # the parent's own peak is now >= 300 MiB
    big = run_child("benchmarks.child:allocate", kwargs={"mib": 200}, poll_s=None)
    small = run_child("benchmarks.child:allocate", kwargs={"mib": 10}, poll_s=None)
    assert big["ok"] and small["ok"], (big["error"], small["error"])
    assert big["value"] == 200 and small["value"] == 10
    assert big["peak_rss"] >= 200 * MIB
    assert small["peak_rss"] < 100 * MIB  # neither the earlier child's peak nor the parent's
    assert small["peak_rss_before_call"] <= small["peak_rss"]
    assert len(ballast) == 300 * MIB


def test_peak_rss_reads_vmhwm_and_falls_back_to_ru_maxrss(monkeypatch):
    import benchmarks.child as child

    if Path("/proc/self/status").exists():
        assert peak_rss_bytes()[1] == "VmHWM"

    class NoProc:
        def __init__(self, *args):
            pass

        def read_text(self):
            raise OSError("no /proc here")

    monkeypatch.setattr(child, "Path", NoProc)
    value, source = child.peak_rss_bytes()
    assert source == "ru_maxrss" and value > 0


@pytest.mark.subprocess
def test_a_failing_setting_is_reported_not_raised():
    r = run_child("benchmarks.child:no_such_function", kwargs={}, poll_s=None)
    assert not r["ok"] and "no_such_function" in r["error"]


def test_ratios_read_above_one_when_autoliver_is_ahead():
    rows = compare({"autoliver": {"time (s)": 2.0, "rate": 4.0, "count": 3}, "nnunet": {"time (s)": 6.0, "rate": 1.0, "count": 5}},
                   higher_better=("rate",), no_ratio=("count",))
    by = {r["metric"]: r for r in rows}
    assert by["time (s)"]["advantage"] == 3.0 and by["rate"]["advantage"] == 4.0 and "advantage" not in by["count"]
    assert "| time (s) | 2 | 6 | lower | 3 |" in markdown(rows)
    assert "nnunet" not in compare({"autoliver": {"time (s)": 1.0}})[0]  # one side only: no ratio, no empty column


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("benchmarks")  # one cache for every quick run: tiny inputs built once


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the harness sets it; restored after the test
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_quick_run_writes_the_report(name, bench_dirs, restore_threads):
    out = bench_dirs / "out"
    assert main([name, "--quick", "--out", str(out), "--cache", str(bench_dirs / "cache")]) == 0
    report = json.loads((out / f"{name}.json").read_text())
    assert report["benchmark"] == name and report["quick"] is True and report["partial"] is False
    env = report["environment"]
    assert all(isinstance(env["versions"][p], str) for p in ("python", "torch", "numpy", "autoliver"))
    assert "nnunetv2" in env["versions"]
    assert env["cpu"]["model"] and isinstance(env["cpu"]["flags"], list)
    if Path("/proc/cpuinfo").exists():
        assert env["cpu"]["flags"], "no SIMD flags read from /proc/cpuinfo"
    assert env["threads"]["torch"] >= 1 and env["cpu"]["logical_cpus"] >= 1
    rows = report["results"]["rows"]
    assert rows and all(isinstance(r, dict) for r in rows)
    values = list(numbers(rows))
    assert values and all(math.isfinite(v) for v in values)
    assert all(math.isfinite(v) for v in numbers(report["results"]))
    if name in NNUNET_COMPARISONS:  # quick: autoliver's side only, said so
        assert report["nnunet"]["ran"] is False
        assert any("nnU-Net" in n for n in report["notes"])
        assert all("autoliver" in r and "nnunet" not in r and "advantage" not in r for r in rows if "metric" in r)
