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


def test_departure_measurements_run_on_a_few_mocks(tmp_path):
    import json

    from data import shards

    mocks = tmp_path / "mocks.h5"
    shards.generate_file("clusters", 6, 2000, mocks, workers=1)
    checkpoint = BENCH.parent / "checkpoints" / "icl_trained.weights.h5"
    out = tmp_path / "orientations.json"
    result = subprocess.run([sys.executable, str(BENCH / "departures_icl.py"), "orientations", str(checkpoint), str(mocks),
                             "--json", str(out)], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert len(numbers["per_orientation"]) == 8 and numbers["mean_abs_R90_minus_R0"] >= 0
    result = subprocess.run([sys.executable, str(BENCH / "departures_icl.py"), "padding", str(checkpoint), str(mocks),
                             "--widths", "168"], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"168_centred: MAE padded [\d.]+ / stretched [\d.]+", result.stdout)
    broken = subprocess.run([sys.executable, str(BENCH / "departures_icl.py"), "padding", str(checkpoint),
                             str(tmp_path / "missing.h5")], capture_output=True, text=True, timeout=900, check=False)
    assert broken.returncode == 2 and broken.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "missing.h5" in broken.stderr.strip().splitlines()[-1]
