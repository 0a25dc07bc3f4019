"""Usage and environment errors of the training and evaluation commands: one line, exit status 2,
before any work (outputs that cannot be written, broken inputs, wrong checkpoints)."""

import pathlib

import pytest

import finetune
import nnclr_test
import nnclr_train
import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
GALAXIES = str(ROOT / "demos" / "data" / "galaxies.h5")
CLUSTERS = str(ROOT / "demos" / "data" / "finetune_clusters.h5")


@pytest.mark.parametrize("command, arguments", [
    (train.main, [CLUSTERS, "--tiny", "--label-key", "f_icl_sb_ideal"]),
    (finetune.main, [CLUSTERS, "--label-key", "f_icl_sb_ideal"]),
    (nnclr_train.main, [GALAXIES, "--tiny"]),
    (nnclr_test.main, [GALAXIES, "--run-dir", str(ROOT / "checkpoints" / "nnclr"), "--test-all"]),
])
def test_an_output_folder_that_cannot_be_made_is_refused_first(command, arguments, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    try:
        status = command([*arguments, "--out-dir", str(tmp_path / "a_file" / "run")])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: --out-dir {tmp_path / 'a_file' / 'run'}: cannot create the folder (Not a directory)"]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A small corpus of broken training inputs, made here (nothing stored)."""
    import numpy as np
    from synthetic import write_cluster_hdf5

    import data.files
    import tidal_data

    folder = tmp_path_factory.mktemp("broken")
    write_cluster_hdf5(folder / "good.h5", 12, size=48, seed=1)
    write_cluster_hdf5(folder / "one.h5", 1, size=48, seed=2)
    (folder / "garbage.h5").write_bytes(b"junk")
    images = np.random.default_rng(0).normal(1, 0.1, (12, 48, 48)).astype(np.float32)
    ids = [f"x{i}" for i in range(12)]
    data.files.write_stacked_hdf5(folder / "nan_label.h5", images, ids=ids, columns={"f_icl_sb": [np.nan] + [0.1] * 11})
    data.files.write_stacked_hdf5(folder / "big_label.h5", images, ids=ids, columns={"f_icl_sb": [1.5] + [0.1] * 11})
    (folder / "labels.csv").write_text("id,f_icl\nc1_000,0.1\n")
    data.files.write_stacked_hdf5(folder / "text_label.h5", images, ids=ids, columns={"f_icl_sb": ["a"] * 12})
    holes = images.copy()
    holes[3, :40] = np.nan  # 83% of one cutout has no data
    data.files.write_stacked_hdf5(folder / "no_data.h5", holes, ids=ids, columns={"f_icl_sb": [0.1] * 12})
    good_ids = [f"c1_{i:03d}" for i in range(12)]
    rows = "".join(f"{i},0.1\n" for i in good_ids[1:])
    for name, text in {"no_id_column.csv": "name,f_icl\nc1_000,0.1\n",
                       "repeated.csv": f"id,f_icl\n{good_ids[0]},0.1\n{rows}{good_ids[0]},0.2\n",
                       "text_value.csv": f"id,f_icl\n{good_ids[0]},abc\n{rows}",
                       "empty.csv": ""}.items():
        (folder / name).write_text(text)
    (folder / "binary.csv").write_bytes(b"\x00\xff\xfe" * 40)
    (folder / "not_a_zip.keras").write_bytes(b"junk" * 100)

    def tidal(name, images, ids=None):
        count = len(images)
        tidal_data.write_tidal_hdf5(folder / name, images, ids or [f"{name}{i}" for i in range(count)],
                                    {"has_tidal": np.arange(count) % 2})

    galaxies = np.random.default_rng(1).normal(1, 0.02, (40, 24, 24, 5)).astype(np.float32)
    tidal("t_repeated_id.h5", galaxies, ["same"] + [f"g{i}" for i in range(1, 39)] + ["same"])
    no_sky = galaxies.copy()
    no_sky[5, :12] = np.nan
    tidal("t_no_data.h5", no_sky)
    constant = galaxies.copy()
    constant[7] = 0.0
    tidal("t_constant.h5", constant)
    shipped = np.random.default_rng(2).normal(0, 0.02, (6, 128, 128, 5)).astype(np.float32)
    shipped[2] = 0.0
    tidal("t_shipped_constant.h5", shipped)
    return folder


def _run_copy(folder, mutate):
    """A copy of the shipped NNCLR run with its config changed by ``mutate(config_dict)``."""
    import json
    import shutil

    run = folder / "run"
    shutil.copytree(ROOT / "checkpoints" / "nnclr", run, ignore=shutil.ignore_patterns("*.png", "*.npy", "test*"))
    config = json.loads((run / "config.json").read_text())
    mutate(config)
    (run / "config.json").write_text(json.dumps(config))
    return str(run)


@pytest.mark.parametrize("command, arguments, message", [
    (train.main, ["garbage.h5"], "garbage.h5: cannot read HDF5 file"),
    (train.main, ["nan_label.h5"], "label 'f_icl_sb' is nan"),
    (train.main, ["big_label.h5"], "label 'f_icl_sb' is 1.5, not a fraction in [0, 1]"),
    (train.main, ["one.h5"], "need at least 2 examples"),
    (train.main, ["missing.h5"], "missing.h5: no such file or directory"),
    (finetune.main, ["one.h5"], "need at least 5 clusters for 5-fold cross-validation, got 1"),
    (finetune.main, ["good.h5", "--labels", "labels.csv"], "labels.csv: no label for clusters"),
    (finetune.main, ["good.h5", "--checkpoint", "garbage.h5"], "garbage.h5"),
    (finetune.main, ["good.h5", "--checkpoint", str(ROOT / "checkpoints" / "nnclr" / "encoder.keras")], "not an ICL model"),
    (nnclr_train.main, ["good.h5"], "good.h5: not a tidal file"),
    (train.main, ["text_label.h5"], "label 'f_icl_sb' is"),
    (train.main, ["no_data.h5"], "no_data.h5:3: 83% of the (padded) image is masked or non-finite"),
    (finetune.main, ["good.h5", "--labels", "no_id_column.csv"], "no_id_column.csv: needs the columns id and f_icl"),
    (finetune.main, ["good.h5", "--labels", "repeated.csv"], "repeated.csv: id 'c1_000' is given 2 times (lines 2, 14)"),
    (finetune.main, ["good.h5", "--labels", "text_value.csv"],
     "text_value.csv, line 2: f_icl of cluster 'c1_000' is 'abc', not a number"),
    (finetune.main, ["good.h5", "--labels", "empty.csv"], "empty.csv: not a readable CSV of labels"),
    (finetune.main, ["good.h5", "--labels", "binary.csv"], "binary.csv: not a readable CSV of labels"),
    (finetune.main, ["good.h5", "--labels", "missing.csv"], "missing.csv: no such file"),
    (finetune.main, ["good.h5", "--checkpoint", "not_a_zip.keras"], "not_a_zip.keras: not a Keras model file"),
    (nnclr_train.main, ["t_repeated_id.h5"], "galaxy id 'same' is given 2 times"),
    (nnclr_train.main, ["t_no_data.h5"], "galaxy 't_no_data.h55' (row 5): 50% of the pixels are non-finite"),
    (nnclr_train.main, ["t_constant.h5"], "galaxy 't_constant.h57' (row 7): the image is constant"),
    (nnclr_train.main, ["t_no_data.h5", "--noise-range", "3", "1"], "noise_range must satisfy 0 <= low <= high"),
    (nnclr_train.main, ["t_no_data.h5", "--load-encoder", "not_a_zip.keras"], "not_a_zip.keras as a Keras model"),
    (nnclr_test.main, ["t_shipped_constant.h5", "--run-dir", "run", "--test-all"], "the image is constant"),
    (nnclr_test.main, [GALAXIES, "--run-dir", "run-without-band-scale", "--test-all"], "no 'band_scale' entry"),
    (nnclr_test.main, [GALAXIES, "--run-dir", "run-with-bad-band-scale", "--test-all"], "band_scale must be 5 finite"),
    (nnclr_test.main, [GALAXIES, "--run-dir", "run", "--test-all", "--contamination", "1.5"],
     "--contamination must be between 0 and 1"),
    (nnclr_test.main, [GALAXIES, "--run-dir", "run", "--test-all", "--top-k", "0"], "--top-k (0) must be >= 1"),
    (nnclr_test.main, ["garbage.h5", "--run-dir", str(ROOT / "checkpoints" / "nnclr"), "--test-all"],
     "garbage.h5: cannot read HDF5 file"),
])
def test_broken_training_inputs_are_one_line(command, arguments, message, broken, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(broken)
    runs = {"run": lambda config: None, "run-without-band-scale": lambda config: config.pop("band_scale"),
            "run-with-bad-band-scale": lambda config: config.update(band_scale=[0.1, -1])}
    for index, argument in enumerate(arguments):
        if argument in runs:
            arguments = [*arguments[:index], _run_copy(tmp_path, runs[argument]), *arguments[index + 1:]]
    extra = ["--tiny"] if command in (train.main, nnclr_train.main) else []
    try:
        status = command([*arguments, *extra, "--out-dir", str(tmp_path / "out")])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


# Raised by the first import that follows the command's quiet_interrupt() call, as a Ctrl-C
# while the libraries load would be.
_INTERRUPT_WHILE_STARTING = """
import builtins, runpy, sys
sys.argv = [sys.argv[1], "--help"]
real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if getattr(sys.excepthook, "quiet_interrupt", False):
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_a_command_starts_is_one_line():
    import signal
    import subprocess
    import sys

    import console

    for module, _ in console.COMMANDS.values():
        done = subprocess.run([sys.executable, "-c", _INTERRUPT_WHILE_STARTING, module], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.stderr == "interrupted\n", (module, done.stderr[-2000:])
        assert done.returncode in (-signal.SIGINT, 130), (module, done.returncode)


@pytest.mark.parametrize("command, arguments", [
    (train.main, [CLUSTERS, "--tiny", "--label-key", "f_icl_sb_ideal"]),
    (finetune.main, [CLUSTERS, "--label-key", "f_icl_sb_ideal"]),
    (nnclr_train.main, [GALAXIES, "--tiny"]),
    (nnclr_test.main, [GALAXIES, "--run-dir", str(ROOT / "checkpoints" / "nnclr"), "--test-all"]),
    ("generate", ["clusters", "--n", "2"]),
])
def test_a_second_run_into_the_same_output_folder_is_refused(command, arguments, tmp_path, capsys):
    """A live process holds the folder's lock (here: this test's own process): one line, exit 2,
    nothing written; the lock is left to its holder."""
    import os

    import data.generate
    import locks

    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(locks.lock_text())
    command = data.generate.main if command == "generate" else command
    try:
        status = command([*arguments, "--out-dir", str(out)])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"process {os.getpid()} is writing this output" in error[0], error
    assert sorted(path.name for path in out.iterdir()) == [".lock"]


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path):
    import subprocess
    import sys

    import data.generate
    import locks

    out = tmp_path / "mocks.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    lock = tmp_path / ".mocks.h5.lock"
    lock.write_text(f"{dead} 1 {locks.socket.gethostname()}\n")
    assert data.generate.main(["clusters", "--n", "2", "--out", str(out), "--quiet"]) == 0
    assert out.is_file() and not lock.exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, arguments, target, message", [
    (train.main, [CLUSTERS, "--tiny", "--label-key", "f_icl_sb_ideal"], (train, "train"), "rerun the same command"),
    (finetune.main, [CLUSTERS, "--label-key", "f_icl_sb_ideal"], (finetune, "cross_validate"), "rerun the same command"),
    (nnclr_train.main, [GALAXIES, "--tiny"], (nnclr_train, "train_encoder"), "rerun the same command"),
    (nnclr_test.main, [GALAXIES, "--run-dir", str(ROOT / "checkpoints" / "nnclr"), "--test-all"],
     ("nnclr_model", "load_encoder"), "metrics.json was not written"),
])
def test_ctrl_c_in_a_training_or_evaluation_run_is_one_line_and_frees_the_folder(command, arguments, target, message,
                                                                                  tmp_path, capsys, monkeypatch):
    import importlib

    module, name = target
    monkeypatch.setattr(importlib.import_module(module) if isinstance(module, str) else module, name, _interrupt)
    out = tmp_path / "out"
    assert command([*arguments, "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: ") and message in err[0], err
    assert not list(out.glob(".lock*"))  # the next run is not refused
