"""The GPU kit's rehearsal: the whole chain at tiny size on the CPU, JAX backend, TensorFlow blocked."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KIT = ROOT / "bench" / "gpu" / "kit.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "out"
    result = subprocess.run([sys.executable, str(KIT), "--dry-run", "--stage", "all", "--out", str(out), "--workers", "2"],
                            capture_output=True, text=True, timeout=1200, cwd=ROOT, check=False)
    return out, result


def test_dry_run_completes_without_tensorflow(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for stage in ("icl", "nnclr", "bench"):
        results = json.loads((out / f"results_{stage}.json").read_text())
        assert results["complete"] and results["dry_run"]
        assert all(step["status"] == "ok" for step in results["steps"]), results["steps"]
    # What comes back from the device machine: at most 8 files, none over 16 MiB, no folders.
    files = list(out.iterdir())
    assert 0 < len(files) <= 8 and all(path.is_file() and path.stat().st_size < 16 * 2**20 for path in files)
    assert {path.name for path in files} == {
        "icl_paper.weights.h5", "icl_paper.config.json", "results_icl.json", "nnclr_encoder.keras",
        "nnclr_classifier.keras", "nnclr_config.json", "results_nnclr.json", "results_bench.json"}
    assert "what to commit where:" in result.stdout and "checkpoints/" in result.stdout


def test_dry_run_results_hold_the_measurements(dry_run):
    out, _ = dry_run
    icl = json.loads((out / "results_icl.json").read_text())
    assert len(icl["history"]) == 1 and np.isfinite(float(icl["history"][0]["val_loss"]))
    assert icl["heldout_metrics"]["n"] == 8
    nnclr = json.loads((out / "results_nnclr.json").read_text())
    assert len(nnclr["history"]["loss"]) == 1 and nnclr["test_metrics"] is not None
    bench = json.loads((out / "results_bench.json").read_text())
    assert bench["bench_icl_inference"]["rows"][0]["ratio"] > 0 and "JAX" in bench["bench_icl_inference"]["machine"]
    assert bench["bench_icl_inference_fast"]["rows"][0]["fast_images_per_s"] > 0
    assert bench["bench_train_step"]["rows"][0]["images_per_s"] > 0
    assert bench["bench_nnclr"]["train_images_per_second"] > 0 and bench["bench_nnclr"]["backend"] == "jax"


def test_weights_trained_on_jax_load_on_tensorflow(dry_run):
    """The returned ICL checkpoint is an ordinary checkpoint of the project (TensorFlow here)."""
    out, _ = dry_run
    import model

    icl_model = model.load_icl_model(out / "icl_paper.weights.h5")
    size = icl_model.input_shape[1]
    summary = model.Predictor(icl_model)(np.zeros((2, size, size, 1), np.float32))
    assert np.isfinite(summary["mode"]).all()


def test_wheel_download_command_targets_the_gpu_machine(tmp_path):
    fetch = load(ROOT / "bench" / "gpu" / "fetch_wheels.py", "fetch_wheels")
    command = fetch.download_command(tmp_path, "3.12")
    assert command[command.index("--python-version") + 1] == "3.12" and "cp312" in command
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert any(item.startswith("keras==") for item in command)
    requirements = (ROOT / "requirements.txt").read_text().split()
    # The carried Keras, astropy and photutils are the versions the project pins.
    for package in ("keras", "astropy", "photutils"):
        pinned = next(line for line in requirements if line.startswith(f"{package}=="))
        assert pinned in command


def test_what_to_commit_says_when_a_stage_is_incomplete():
    kit = load(KIT, "kit")
    stage = {"stage": "icl", "files": {}, "complete": False,
             "steps": [{"name": "train_icl", "status": "stopped at the deadline"}]}
    lines = kit.what_to_commit([stage])
    assert any("NOT complete" in line and "train_icl: stopped at the deadline" in line for line in lines)


def test_a_step_past_the_deadline_is_stopped_and_its_dependants_skipped(tmp_path):
    kit_module = load(KIT, "kit")
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    checkpoint = work / "best.weights.h5"

    def run(deadline):
        kit = kit_module.Kit(out, work, kit_module.DRY_RUN, dry_run=True, deadline=deadline, workers=1)
        kit.prepare()
        # The training keeps 7 s of the deadline for the step after it.
        slow = kit_module.Step("train", ["-c", "import time; time.sleep(60)"], reserve=7, produces=checkpoint)
        after = kit_module.Step("evaluate", ["-c", "pass"])
        started = time.monotonic()
        kit.run_all([(slow, []), (after, ["train"])])
        assert time.monotonic() - started < deadline + 20
        return slow, after

    slow, after = run(deadline=14)
    assert slow.status == "stopped at the deadline" and after.status == "skipped: needs train"
    # A training stopped at the deadline that has written its checkpoint still serves the next step.
    checkpoint.write_bytes(b"weights")
    slow, after = run(deadline=14)
    assert slow.status == "stopped at the deadline" and after.status == "ok"
