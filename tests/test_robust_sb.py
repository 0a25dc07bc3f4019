"""Broken inputs and interruptions of ``python -m measure_sb_cut``, its validation and ``data.generate``.

Every broken input is generated here (tmp_path), run through the command, and checked for the
exit status, the one-line message naming the file and the good rows still written.
"""

import csv
import os

import numpy as np
import pytest
from astropy.io import fits

import data.files
from measure_sb_cut import measure as measure_module
from measure_sb_cut.__main__ import main
from measure_sb_cut.validate import synthetic_cluster


def write_fits(path, image, z=0.3, mask=None, z_keyword=None):
    primary = fits.PrimaryHDU()
    if z is not None:
        primary.header["Z"] = z
    if z_keyword is not None:
        primary.header["Z"] = z_keyword
    mask = np.zeros(image.shape, dtype=np.int32) if mask is None else mask
    fits.HDUList([primary, fits.ImageHDU(image.astype(np.float32), name="IMAGE"),
                  fits.ImageHDU(mask, name="MASK")]).writeto(path)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cluster():
    image, _ = synthetic_cluster(0.3, 0.2, np.random.default_rng(11), native_noise=0.03, n_members=10)
    return image


def broken_corpus(folder, image):
    """Cutouts whose fraction would be silently wrong, by name -> the expected words of the error."""
    folder.mkdir()
    yy, xx = np.indices(image.shape)
    radius = np.hypot(yy - 111.5, xx - 111.5)
    write_fits(folder / "a_good.fits", image)
    ring = image.copy()
    ring[(radius > 40) & (radius < 100)] -= 0.5
    write_fits(folder / "b_dark_ring.fits", ring)
    sparse = image.copy()
    sparse[np.random.default_rng(0).random(image.shape) < 0.05] = -5
    write_fits(folder / "c_sparse_negative.fits", sparse)
    block = image.copy()
    block[:30, :30] = -1e6
    write_fits(folder / "d_block.fits", block)
    holes = image.copy()
    holes[radius < 85] = np.nan
    write_fits(folder / "e_mostly_nan.fits", holes)
    write_fits(folder / "f_empty.fits", np.zeros_like(image))
    return {
        "b_dark_ring": "outside [0, 1]: negative light",
        "c_sparse_negative": "outside [0, 1]: negative light",
        "d_block": "surface-brightness limit",
        "e_mostly_nan": "masked or not finite (at most 50% allowed)",
        "f_empty": "total light inside 300 kpc",
    }


def test_physically_wrong_measurements_are_refused(tmp_path, cluster, capsys):
    expected = broken_corpus(tmp_path / "in", cluster)
    out = tmp_path / "m.csv"
    status = main([str(tmp_path / "in"), "--out", str(out), "--workers", "1", "--method", "improved", "--no-reestimates"])
    assert status == 1
    rows = {row["id"]: row for row in read_rows(out)}
    assert rows["a_good"]["error"] == "" and 0 < float(rows["a_good"]["f_icl"]) < 1
    err = capsys.readouterr().err
    for name, words in expected.items():
        row = rows[name]
        assert words in row["error"] and row["error"].startswith(str(tmp_path / "in" / f"{name}.fits"))
        assert row["f_icl"] == row["f_icl_err"] == row["sb_limit"] == row["total_flux"] == ""
        lines = [line for line in err.splitlines() if f"{name}.fits" in line]
        assert len(lines) == 1 and lines[0].startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["in", "m.csv"]


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, cluster, capsys, monkeypatch):
    write_fits(tmp_path / "one.fits", cluster)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(measure_module, "measure_ref", lambda *a: pytest.fail("measured before the check"))
    for flags in (["--out", str(tmp_path / "file" / "m.csv")], ["--out", str(tmp_path)],
                  ["--out", str(tmp_path / "m.csv"), "--plot-dir", str(tmp_path / "file")]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "one.fits"), *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_duplicate_catalogue_ids_are_refused_with_their_lines(tmp_path, cluster, capsys):
    write_fits(tmp_path / "one.fits", cluster)
    catalogue = tmp_path / "z.csv"
    catalogue.write_text("id,z\none,0.3\ntwo,0.2\none,0.35\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "one.fits"), "--out", str(tmp_path / "m.csv"), "--catalog", str(catalogue)])
    assert exit_info.value.code == 2
    assert "lines 2 and 4: id 'one' is given twice" in capsys.readouterr().err


def test_plots_of_clashing_ids_do_not_overwrite_each_other(tmp_path, cluster):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_fits(tmp_path / folder / "same.fits", cluster)
    images = np.stack([cluster, cluster]).astype(np.float16)
    data.files.write_stacked_hdf5(tmp_path / "x" / "slash.h5", images, masks=np.zeros(images.shape, np.int32),
                                  ids=["a/b", "a_b"], columns={"z": [0.3, 0.3]})
    plots = tmp_path / "plots"
    status = main([str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "m.csv"), "--plot-dir",
                   str(plots), "--workers", "1", "--method", "improved", "--no-reestimates"])
    assert status == 0
    assert len(read_rows(tmp_path / "m.csv")) == 4
    assert len(list(plots.glob("*.png"))) == 4


def test_interrupted_run_keeps_its_rows_and_resumes(tmp_path, cluster, capsys, monkeypatch):
    for name in "abcde":
        write_fits(tmp_path / f"{name}.fits", cluster)
    out = tmp_path / "m.csv"
    command = [str(tmp_path / f"{name}.fits") for name in "abcde"] + ["--out", str(out), "--workers", "1",
                                                                        "--method", "improved", "--no-reestimates"]
    real, calls = measure_module.measure_ref, []

    def interrupted(ref, *arguments):
        calls.append(ref.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(ref, *arguments)

    monkeypatch.setattr(measure_module, "measure_ref", interrupted)
    assert main(command) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists()
    (partial,) = tmp_path.glob(".m.partial-*.csv")
    assert [row["id"] for row in read_rows(partial)] == ["a", "b", "c"]
    with open(partial, "a") as handle:  # a row torn by a kill
        handle.write("d,/x/d.fits,0.3,0.1")

    calls.clear()
    monkeypatch.setattr(measure_module, "measure_ref", real)
    measured = []
    monkeypatch.setattr(measure_module, "measure_ref", lambda ref, *a: measured.append(ref.id) or real(ref, *a))
    assert main(command + ["--resume"]) == 0
    assert measured == ["d", "e"]
    rows = read_rows(out)
    assert [row["id"] for row in rows] == list("abcde")
    assert all(row["error"] == "" and float(row["f_icl"]) > 0 for row in rows)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_partial_file_does_not_follow_a_planted_link(tmp_path, cluster):
    write_fits(tmp_path / "a.fits", cluster)
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    from common import atomic_path

    os.symlink(target, atomic_path(tmp_path / "m.csv"))
    assert main([str(tmp_path / "a.fits"), "--out", str(tmp_path / "m.csv"), "--workers", "1",
                 "--method", "improved", "--no-reestimates"]) == 0
    assert target.read_text() == "keep"
    assert len(read_rows(tmp_path / "m.csv")) == 1


def test_generate_refuses_unwritable_outputs_before_rendering(tmp_path, capsys):
    from data.generate import main as generate_main

    (tmp_path / "file").write_text("")
    for flags in (["--out", str(tmp_path / "file" / "c.h5")], ["--out-dir", str(tmp_path / "file")],
                  ["--out-dir", str(tmp_path / "d"), "--preview", str(tmp_path / "file" / "p.png")]):
        with pytest.raises(SystemExit) as exit_info:
            generate_main(["backgrounds", "--n", "2", "--quiet", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_generate_ctrl_c_keeps_the_finished_shards_and_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "g"
    command = [sys.executable, "-m", "data.generate", "backgrounds", "--n", "40", "--shard-size", "1", "--workers",
               "2", "--out-dir", str(folder), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    started = time.time()
    while time.time() - started < 60 and len(list(folder.glob("backgrounds-*.h5"))) < 2:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    interrupted = time.time()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert time.time() - interrupted < 10
    assert "Traceback" not in err and "rerun the same command" in err
    kept = sorted(folder.glob("backgrounds-*.h5"))
    assert 2 <= len(kept) < 40


def test_validation_reports_skipped_inputs(tmp_path, cluster, capsys):
    from measure_sb_cut.validate import main as validate_main
    from measure_sb_cut.validate import write_synthetic_shard

    write_synthetic_shard(tmp_path / "good.h5", 2, seed=3)
    (tmp_path / "torn.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    write_fits(tmp_path / "no_truth.fits", cluster)
    report = tmp_path / "r.md"
    inputs = [str(tmp_path / name) for name in ("good.h5", "torn.h5", "no_truth.fits")]
    assert validate_main(inputs + ["--report", str(report), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "torn.h5" in line]) == 1
    assert len([line for line in err.splitlines() if "no_truth.fits" in line and "no truth" in line]) == 1
    assert "Clusters: 2 " in report.read_text()
    with pytest.raises(SystemExit) as exit_info:
        validate_main(inputs[1:] + ["--report", str(report), "--workers", "1"])
    assert exit_info.value.code == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        validate_main(inputs[:1] + ["--report", str(tmp_path / "file" / "r.md")])
    assert exit_info.value.code == 2 and "--report" in capsys.readouterr().err
