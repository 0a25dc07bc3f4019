"""Multi-worker training: two worker processes on this machine, a TF_CONFIG cluster on loopback ports."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
from synthetic import write_cluster_hdf5

import common

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Seconds both workers together may take before they are killed (a tiny run takes ~10-20 s).
TIMEOUT = 240

#: Largest difference between the weights of two workers and of one process after the same
#: steps at learning rate 1e-3 (Adam moves a weight by up to ~1e-3 a step). Measured: 8e-5
#: after three steps, 2.4e-4 after six (resumed); the gradients of two half batches, summed
#: across the workers, round differently from the whole batch's in float32, and Adam turns
#: rounding in the smallest gradients into steps of ordinary size.
WEIGHT_TOLERANCE = 5e-4
#: Relative tolerance of the losses per epoch (measured: 4e-4 at most).
LOSS_TOLERANCE = 2e-3

#: Worker 1 of the ICL test: train.py's main, keeping the worker's own folder (removed at the
#: end of a run otherwise) so that the test can compare its weights with the chief's.
KEEP_WORKER_FOLDER = """
import sys
import common
common.quiet_start()
import train
common.remove_worker_folder = lambda folders: None
sys.exit(train.main(sys.argv[1:]))
"""


def free_ports(count):
    """``count`` loopback ports free at the time of the call."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_workers(commands, log_dir, timeout=TIMEOUT):
    """Run one process per command as the workers 0, 1... of a TF_CONFIG cluster; returns their logs.

    Fails (and kills every worker still running) as soon as one worker fails, since the others
    would then wait for it, or when ``timeout`` seconds pass.
    """
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(commands))]}
    processes, logs = [], []
    try:
        for index, command in enumerate(commands):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            environment = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": ""}
            logs.append(log_dir / f"worker{index}.log")
            with open(logs[-1], "w") as log:
                processes.append(subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(process.poll() is None for process in processes):
            failed = [i for i, process in enumerate(processes) if process.poll() not in (None, 0)]
            assert not failed and time.monotonic() < deadline, _report(processes, logs)
            time.sleep(0.2)
        assert all(process.returncode == 0 for process in processes), _report(processes, logs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [log.read_text() for log in logs]


def _report(processes, logs):
    return "\n".join(f"worker {i} (status {process.poll()}):\n{log.read_text()[-3000:]}"
                     for i, (process, log) in enumerate(zip(processes, logs)))


def weights(path, prefix=""):
    """The arrays of a Keras weights file whose path in the file starts with ``prefix``."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.update({name: item[()]})
                     if isinstance(item, h5py.Dataset) and name.startswith(prefix) else None)
    return arrays


def largest_difference(a, b):
    assert a.keys() == b.keys() and a
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def norm_of_difference(a, b):
    return float(np.sqrt(sum(np.sum((a[name] - b[name]) ** 2) for name in a)))


def test_two_workers_train_the_icl_model_as_one_process(tmp_path):
    write_cluster_hdf5(tmp_path / "clusters.h5", 40, size=48, seed=1)  # 36 training, 4 validation clusters
    # Global batch 12: three steps per epoch, six clusters per worker and step. No augmentation,
    # whose random draws depend on the number of replicas.
    options = [str(tmp_path / "clusters.h5"), "--tiny", "--batch-size", "12", "--validation-batch-size", "4",
               "--learning-rate", "1e-3", "--no-augment"]
    run, one = tmp_path / "run", tmp_path / "one"
    one_weights = []
    for epochs in (1, 2):  # the second runs resume from the first ones' backups
        argv = [*options, "--epochs", str(epochs), "--strategy", "multiworker", "--out-dir", str(run)]
        logs = run_workers([[sys.executable, "train.py", *argv], [sys.executable, "-c", KEEP_WORKER_FOLDER, *argv]],
                           tmp_path)
        assert "worker 1 finished" in logs[1]
        if epochs == 2:  # every worker resumed after the first epoch
            assert all("Epoch 2/2" in log and "Epoch 1/2" not in log for log in logs)
        assert (run / "metrics.json").is_file() and (run / "binned_validation.png").is_file()
        worker = run / "tmp-worker-1"
        assert not (worker / "metrics.json").exists()  # the chief alone evaluates
        # The workers hold the same weights and optimiser state: every step applied the same
        # all-reduced gradients.
        assert largest_difference(weights(run / "final.weights.h5"), weights(worker / "final.weights.h5")) == 0

        # One process with one replica, in a fresh process as the workers (the shuffling depends on
        # whether a process has seeded TensorFlow before). MirroredStrategy, not the default: Keras
        # builds a model made under a distribution strategy on a batch of an extra pass over the
        # data, which moves the reshuffling on by one epoch.
        command = [sys.executable, "train.py", *options, "--epochs", str(epochs), "--strategy", "mirrored",
                   "--out-dir", str(one)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 0, result.stderr[-3000:]
        one_weights.append(weights(one / "final.weights.h5", "layers/"))
        run_weights = weights(run / "final.weights.h5", "layers/")
        difference = largest_difference(run_weights, one_weights[-1])
        print(f"after {3 * epochs} steps: largest weight difference to one process {difference:.1e}")
        assert difference < WEIGHT_TOLERANCE
        history, one_history = pd.read_csv(run / "history.csv"), pd.read_csv(one / "history.csv")
        assert history["epoch"].tolist() == list(range(epochs))
        np.testing.assert_allclose(history[["loss", "val_loss"]], one_history[["loss", "val_loss"]], rtol=LOSS_TOLERANCE)
    # The difference is a small part of what the second epoch changed.
    share = norm_of_difference(run_weights, one_weights[1]) / norm_of_difference(one_weights[0], one_weights[1])
    print(f"difference after 6 steps / change in the second epoch (L2 norms): {share:.1e}")
    assert share < 0.01


def test_two_workers_train_nnclr(tmp_path):
    import test_nnclr_scripts

    tidal = test_nnclr_scripts._write(tmp_path / "tidal.h5")
    run = tmp_path / "run"
    argv = [sys.executable, "nnclr_train.py", str(tidal), "--tiny", "--strategy", "multiworker", "--out-dir", str(run)]
    logs = run_workers([argv, argv], tmp_path)
    assert all("strategy multiworker: 2 replicas in sync" in log for log in logs)
    assert "(written by the chief)" in logs[1]
    for name in ("encoder.keras", "classifier.keras", "nnclr_history.json", "train_loss.npy", "val_loss.npy",
                 "classifier_loss.png", "splits.json", "config.json"):
        assert (run / name).stat().st_size > 0, name
    # The worker's own folder and the backups are gone.
    assert sorted(path.name for path in run.iterdir() if path.is_dir()) == []
    assert len(json.loads((run / "nnclr_history.json").read_text())["loss"]) == 2


def test_one_process_is_its_own_chief(tmp_path):
    strategy = common.make_strategy("default")
    folders = common.worker_folders(tmp_path / "run", strategy)
    assert folders.chief and folders.own == folders.run == tmp_path / "run" and folders.run.is_dir()
    common.remove_worker_folder(folders)  # nothing to remove on the chief
    assert folders.run.is_dir()
