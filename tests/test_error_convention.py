"""Every command finds an output it cannot write before any work: one line, exit status 2."""

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
