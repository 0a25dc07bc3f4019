"""predict.py, gradcam.py and prep_data.py on broken inputs, concurrent runs and interruptions.

Every broken input is generated here in tmp_path: each must cost one line naming the file (exit 1,
the good rows still written) or, for checkpoint and output problems, one ``error:`` line and exit
2 before any work; never a traceback, never a plausible number for a degenerate image.
"""

import os
import pathlib
import socket
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

import common
import gradcam
import inference
import locks
import model
import predict
import prep_data
from tests.synthetic import write_cluster_hdf5, write_fits_cutout


def _fits(path, image):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.asarray(image, np.float32), name="IMAGE")]).writeto(path)


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, values in datasets.items():
            f[name] = values


def _masked(shape, fraction):
    image = np.random.default_rng(0).normal(1, 0.1, shape)
    image.reshape(-1)[: int(fraction * image.size)] = np.nan
    return image


#: file name -> (writer, what its one line must say)
CORPUS = {
    "zeros.fits": (lambda p: _fits(p, np.zeros((64, 64))), "image is constant"),
    "constant.fits": (lambda p: _fits(p, np.full((64, 64), 3.0)), "image is constant"),
    "tiny4.fits": (lambda p: _fits(p, np.ones((4, 4))), "too small"),
    "sliver.fits": (lambda p: _fits(p, np.random.default_rng(0).normal(1, 0.1, (2000, 10))), "too small"),
    "long.fits": (lambda p: _fits(p, np.random.default_rng(0).normal(1, 0.1, (300, 30))), "aspect ratio"),
    "masked.fits": (lambda p: _fits(p, _masked((64, 64), 0.8)), "masked or non-finite"),
    "raw112.npy": (lambda p: np.save(p, np.random.default_rng(0).normal(0, 1, (112, 112)).astype(np.float32)),
                   "to match the checkpoint's input size"),
    "raw32.npy": (lambda p: np.save(p, np.random.default_rng(0).normal(0, 50, (32, 32)).astype(np.float32)),
                  "are not a prepared image"),
    "zero_d.npy": (lambda p: np.save(p, np.float32(3)), "must hold prepared images"),
    "unknown.h5": (lambda p: _h5(p, foo=np.zeros(3)), "unknown HDF5 layout"),
    "flat2d.h5": (lambda p: _h5(p, image=np.ones((64, 64), np.float32)), "the stacked layout needs (N, H, W)"),
    "empty.h5": (lambda p: _h5(p), "an empty file"),
    "none.h5": (lambda p: _h5(p, image=np.zeros((0, 64, 64), np.float32)), "holds no cutouts"),
    "tidal.h5": (lambda p: _h5(p, image=np.ones((2, 32, 32, 5), np.float32)), "5-band tidal-feature"),
    "badid.h5": (lambda p: _h5(p, image=np.ones((3, 32, 32), np.float32), id=np.array([b"a", b"b"])),
                 "dataset 'id' has shape (2,)"),
    "badmask.h5": (lambda p: _h5(p, image=np.ones((3, 32, 32), np.float32), mask=np.zeros((2, 32, 32), np.int32)),
                   "dataset 'mask' has shape"),
    "badcol.h5": (lambda p: _h5(p, image=np.ones((3, 32, 32), np.float32), z=np.zeros(2)), "dataset 'z' has shape"),
    "garbage.h5": (lambda p: p.write_bytes(b"not hdf5 at all" * 10), "cannot read HDF5 file"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_fits_cutout(folder / "a_good.fits", seed=1)
    write_cluster_hdf5(folder / "b_good.h5", 3, size=32)
    for name, (writer, _) in CORPUS.items():
        writer(folder / name)
    # A FITS cutout whose unused redshift keyword is not a number: predicted, with a warning.
    write_fits_cutout(folder / "z_text.fits", seed=3)
    with fits.open(folder / "z_text.fits", mode="update") as hdus:
        hdus[0].header["Z"] = "unknown"
    return folder


GOOD_IDS = ["a_good", "c0_000", "c0_001", "c0_002", "z_text"]


def _lines_naming(err, name):
    return [line for line in err.splitlines() if name in line]


def test_every_broken_input_is_one_line_and_good_rows_are_kept(corpus, tmp_path, tiny_checkpoint, capsys, caplog):
    out = tmp_path / "pred.csv"
    missing = tmp_path / "missing.fits"
    argv = [str(corpus), str(missing), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--batch-size", "4"]
    assert predict.main(argv) == 1
    summary = capsys.readouterr().err
    err = "\n".join([record.getMessage() for record in caplog.records] + [summary])  # the log goes to stderr
    assert "Traceback" not in err
    assert pd.read_csv(out)["id"].tolist() == GOOD_IDS
    for name, (_, message) in CORPUS.items():
        lines = _lines_naming(err, name)
        assert len(lines) == 1 and message in lines[0], (name, lines)  # named once, not again in the summary
    assert [line for line in _lines_naming(err, "missing.fits") if "no such file or directory" in line]
    assert f"{len(CORPUS) + 1} cutout(s) could not be predicted (each is named above)" in err
    assert not inference.lock_path(out).exists() and not inference.identity_path(out).exists()


def test_on_the_terminal_each_bad_file_is_one_line(tmp_path, tiny_checkpoint):
    """The command as a user runs it: each bad file named once on stderr, then the count."""
    write_fits_cutout(tmp_path / "good.fits", seed=1)
    _fits(tmp_path / "zeros.fits", np.zeros((64, 64)))
    (tmp_path / "garbage.h5").write_bytes(b"junk" * 10)
    done = subprocess.run([sys.executable, "predict.py", str(tmp_path), "--out", str(tmp_path / "p.csv"),
                           "--checkpoint", str(tiny_checkpoint)], capture_output=True, text=True, check=False,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    expected = (f"ERROR: {tmp_path / 'zeros.fits'}: image is constant (0 counts everywhere after clipping to "
                "[0, 10]); not a sky cutout")
    assert [line for line in lines if "zeros.fits" in line] == [expected]
    assert len([line for line in lines if "garbage.h5" in line]) == 1
    assert lines[-1] == "2 cutout(s) could not be predicted (each is named above)"


def test_gradcam_reports_the_same_broken_inputs(corpus, tmp_path, tiny_checkpoint, capsys, caplog):
    maps = tmp_path / "maps"
    assert gradcam.main([str(corpus), "--out-dir", str(maps), "--checkpoint", str(tiny_checkpoint)]) == 1
    err = "\n".join([record.getMessage() for record in caplog.records] + [capsys.readouterr().err])
    assert "Traceback" not in err and _lines_naming(err, "zeros.fits") and _lines_naming(err, "tidal.h5")
    assert len(list(maps.glob("*.png"))) == len(GOOD_IDS)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert gradcam.main([str(corpus), "--out-dir", str(not_a_folder), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out-dir {not_a_folder}: exists and is not a folder")


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _checkpoint_copy(tiny_checkpoint, folder, name="copy"):
    weights = folder / f"{name}.weights.h5"
    weights.write_bytes(tiny_checkpoint.read_bytes())
    model.config_path_for(weights).write_text(model.config_path_for(tiny_checkpoint).read_text())
    return weights


def test_checkpoint_and_output_problems_are_one_line_before_work(tmp_path, tiny_checkpoint, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    base = [str(tmp_path / "a.fits"), "--out"]
    garbage = _checkpoint_copy(tiny_checkpoint, tmp_path, "garbage")
    garbage.write_bytes(b"\0garbage" * 100)
    assert predict.main(base + [str(tmp_path / "p.csv"), "--checkpoint", str(garbage)]) == 2
    _one_error_line(capsys, "garbage.weights.h5")
    other = tmp_path / "other.weights.h5"
    model.save_weights(model.build_icl_model(model.ICLConfig(32, 1, 64, 8)), other, model.ICLConfig(32, 1, 64, 8))
    model.config_path_for(other).write_text(model.config_path_for(tiny_checkpoint).read_text())
    assert predict.main(base + [str(tmp_path / "p.csv"), "--checkpoint", str(other)]) == 2
    _one_error_line(capsys, "other.weights.h5", "does not match the ICL architecture")
    assert predict.main(base + [str(tmp_path / "p.csv"), "--checkpoint", str(tmp_path / "gone.weights.h5")]) == 2
    _one_error_line(capsys, "gone.weights.h5: checkpoint not found")
    (tmp_path / "afile").write_text("x")
    assert predict.main(base + [str(tmp_path / "afile" / "p.csv"), "--checkpoint", str(tiny_checkpoint)]) == 2
    _one_error_line(capsys, "--out", "is not a folder")
    assert predict.main(base + [str(tmp_path), "--checkpoint", str(tiny_checkpoint)]) == 2
    _one_error_line(capsys, "is a folder")
    assert not (tmp_path / "p.csv").exists()


def test_second_run_on_the_same_output_is_refused_and_stale_locks_are_taken_over(tmp_path, tiny_checkpoint, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    out = tmp_path / "p.csv"
    argv = [str(tmp_path / "a.fits"), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
    inference.lock_path(out).write_text(f"{os.getppid()}\n")  # a live process holds the lock
    assert predict.main(argv) == 2
    _one_error_line(capsys, f"process {os.getppid()} is writing this output")
    assert not out.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    inference.lock_path(out).write_text(dead.stdout)
    assert predict.main(argv) == 0
    assert pd.read_csv(out)["id"].tolist() == ["a"]
    assert not inference.lock_path(out).exists()
    # A lock whose process id now belongs to another process (a reused id): stale, taken over.
    live = locks.lock_text().split()
    assert live[0] == str(os.getpid()) and live[2] == socket.gethostname()
    if live[1] != "-":  # where process start times can be read (/proc)
        inference.lock_path(out).write_text(f"{os.getppid()} {int(live[1]) + 12345} {live[2]}\n")
        assert predict.main(argv + ["--resume"]) == 0 and not inference.lock_path(out).exists()
    # A lock from another host cannot be checked from here: refused, naming the host.
    inference.lock_path(out).write_text("1 1 another-host\n")
    assert predict.main(argv) == 2
    _one_error_line(capsys, "process 1 on another-host is writing this output")
    inference.lock_path(out).unlink()


def test_partial_file_symlink_is_refused(tmp_path, tiny_checkpoint, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    out, target = tmp_path / "p.csv", tmp_path / "precious.txt"
    target.write_text("keep me")
    inference.partial_path(out).symlink_to(target)
    assert predict.main([str(tmp_path / "a.fits"), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]) == 2
    _one_error_line(capsys, "symbolic link")
    assert target.read_text() == "keep me" and not out.exists()


def test_interrupted_run_resumes_only_with_its_checkpoint_and_drops_torn_rows(tmp_path, tiny_checkpoint, capsys,
                                                                             monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        write_fits_cutout(inputs / f"cl{i}.fits", seed=i)
    out = tmp_path / "p.csv"
    argv = [str(inputs), "--out", str(out), "--batch-size", "2"]
    original = inference._predict

    def interrupted(*args, **kwargs):
        units = original(*args, **kwargs)
        yield next(units)
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "_predict", interrupted)
    assert predict.main(argv + ["--checkpoint", str(tiny_checkpoint)]) == 130
    monkeypatch.setattr(inference, "_predict", original)
    assert "rerun with --resume" in capsys.readouterr().err
    partial = inference.partial_path(out)
    assert len(partial.read_text().splitlines()) == 3 and inference.identity_path(out).exists()
    assert not inference.lock_path(out).exists() and not out.exists()
    # A torn last row, as a write cut short leaves: dropped, its cutout predicted again.
    partial.write_text(partial.read_text() + f"cl2,{inputs / 'cl2.fits'},0.1")
    other = tmp_path / "other.weights.h5"
    model.save_weights(model.build_icl_model(model.TINY), other, model.TINY)
    assert predict.main(argv + ["--checkpoint", str(other), "--resume"]) == 2
    _one_error_line(capsys, "another checkpoint")
    assert predict.main([str(inputs / "cl0.fits"), *argv[1:], "--checkpoint", str(tiny_checkpoint), "--resume"]) == 2
    _one_error_line(capsys, "other inputs")
    assert predict.main(argv + ["--checkpoint", str(tiny_checkpoint), "--resume"]) == 0
    assert f"3 predicted now, 2 kept from the earlier run, 5 rows in {out}" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert table["id"].tolist() == [f"cl{i}" for i in range(5)] and np.isfinite(table["f_icl"]).all()
    assert not partial.exists() and not inference.identity_path(out).exists()
    # The finished CSV keeps its record: resuming from it checks the checkpoint too.
    assert inference.record_path(out).exists()
    assert predict.main(argv + ["--checkpoint", str(other), "--resume"]) == 2
    _one_error_line(capsys, "another checkpoint", str(out))
    assert pd.read_csv(out)["id"].tolist() == [f"cl{i}" for i in range(5)]
    assert predict.main(argv + ["--checkpoint", str(tiny_checkpoint), "--resume"]) == 0
    assert f"0 predicted now, 5 kept from the earlier run, 5 rows in {out}" in capsys.readouterr().out


def test_prep_data_checks_output_first_escapes_ids_and_goes_on_after_missing_inputs(tmp_path, tiny_checkpoint,
                                                                                    capsys):
    source = tmp_path / "c.h5"
    write_cluster_hdf5(source, 3, size=32)
    with h5py.File(source, "a") as f:
        del f["id"]
        f["id"] = np.array([b"one", b"two\nlines", b"three"])
    (tmp_path / "afile").write_text("x")
    assert prep_data.main([str(source), "--out", str(tmp_path / "afile" / "p.npy")]) == 2
    assert capsys.readouterr().err.startswith("error: --out")
    out = tmp_path / "p.npy"
    assert prep_data.main([str(source), str(tmp_path / "missing.fits"), "--out", str(out), "--size", "32"]) == 1
    assert "missing.fits: no such file or directory" in capsys.readouterr().err
    ids = out.with_suffix(".ids.txt").read_text().splitlines()
    assert ids == ["one", "two\\nlines", "three"] and np.load(out).shape == (3, 32, 32)
    # prep_data.py --size of the checkpoint's input size gives arrays predict.py accepts.
    csv_path = tmp_path / "pred.csv"
    assert predict.main([str(out), "--out", str(csv_path), "--checkpoint", str(tiny_checkpoint)]) == 0
    assert len(pd.read_csv(csv_path)) == 3


def test_prepared_image_range_and_degenerate_checks():
    ref = prep_data.CutoutRef("x.npy", None, "x")
    good = np.random.default_rng(0).uniform(0, prep_data.PREPARED_MAX, (32, 32)).astype(np.float32)
    assert prep_data.prepare_cutout(prep_data.Cutout(ref, good, prepared=True), 32).shape == (32, 32, 1)
    with pytest.raises(prep_data.CutoutError, match="prepared image is constant"):
        prep_data.prepare_cutout(prep_data.Cutout(ref, np.zeros((32, 32), np.float32), prepared=True), 32)
    with pytest.raises(prep_data.CutoutError, match="not a prepared image"):
        prep_data.prepare_cutout(prep_data.Cutout(ref, good + 8, prepared=True), 32)
    assert common.report_bad_cutouts([]) == 0


def test_resume_reads_torn_partial_files(tmp_path):
    out, partial = tmp_path / "p.csv", inference.partial_path(tmp_path / "p.csv")
    partial.write_text("id,sou")  # interrupted while writing the header
    assert inference.read_finished_rows(out, partial) == []
    partial.write_text("id,source,f_icl,f_icl_p15,f_icl_p85,f_icl_mean\n"
                       "a,a.fits,0.1,0.05,0.2,0.11\nb,b.fits,0.1,0.05,nan,0.1\nc,c.fits,0.1,0.0")
    assert [row[0] for row in inference.read_finished_rows(out, partial)] == ["a"]
