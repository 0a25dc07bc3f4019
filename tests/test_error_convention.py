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

    folder = tmp_path_factory.mktemp("broken")
    write_cluster_hdf5(folder / "good.h5", 12, size=48, seed=1)
    write_cluster_hdf5(folder / "one.h5", 1, size=48, seed=2)
    (folder / "garbage.h5").write_bytes(b"junk")
    images = np.random.default_rng(0).normal(1, 0.1, (12, 48, 48)).astype(np.float32)
    ids = [f"x{i}" for i in range(12)]
    data.files.write_stacked_hdf5(folder / "nan_label.h5", images, ids=ids, columns={"f_icl_sb": [np.nan] + [0.1] * 11})
    data.files.write_stacked_hdf5(folder / "big_label.h5", images, ids=ids, columns={"f_icl_sb": [1.5] + [0.1] * 11})
    (folder / "labels.csv").write_text("id,f_icl\nc1_000,0.1\n")
    return folder


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
    (nnclr_test.main, ["garbage.h5", "--run-dir", str(ROOT / "checkpoints" / "nnclr"), "--test-all"],
     "garbage.h5: cannot read HDF5 file"),
])
def test_broken_training_inputs_are_one_line(command, arguments, message, broken, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(broken)
    extra = ["--tiny"] if command in (train.main, nnclr_train.main) else []
    try:
        status = command([*arguments, *extra, "--out-dir", str(tmp_path / "out")])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
