"""Smoke runs of the ICL benchmarks on the tiny model: they run and print their figures."""

import pathlib
import re
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    "script, arguments, expected",
    [
        ("bench_icl_inference.py", ["--tiny", "--batch-sizes", "2", "--batches", "1", "--repeats", "1"], r"^\s+2\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+"),
        ("bench_train_step.py", ["--tiny", "--batch-size", "4", "--steps", "1"], r"fp32, no XLA \(baseline\):\s+[\d.]+ images/s"),
        ("bench_finetune.py", ["--tiny", "--clusters", "10", "--epochs", "1", "--views", "2"], r"speed-up of cached over full: [\d.]+x"),
        ("bench_predict.py", ["--tiny", "--n", "12", "--baseline-n", "4", "--batch-size", "4"], r"predict.py, 12 cutouts streamed: .* images/s"),
    ],
)
def test_benchmark_runs_and_reports(script, arguments, expected):
    result = subprocess.run([sys.executable, str(BENCH / script), *arguments], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("machine: ")
    assert re.search(expected, result.stdout, re.MULTILINE), result.stdout
