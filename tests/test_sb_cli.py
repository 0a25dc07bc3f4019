"""Smoke and behaviour tests of the measure_sb_cut command line, validation and benchmark scripts."""

import csv
import importlib.util
import pathlib

import numpy as np
import pytest
from astropy.io import fits

import data.files
import hsc
import prep_data
from measure_sb_cut import measure_icl_fraction
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.__main__ import main
from measure_sb_cut.validate import main as validate_main
from measure_sb_cut.validate import synthetic_cluster, write_synthetic_shard

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def write_fits(path, image, z=None, mask=None):
    primary = fits.PrimaryHDU()
    if z is not None:
        primary.header["Z"] = z
    mask = np.zeros(image.shape, dtype=np.int32) if mask is None else mask
    hdus = [
        primary,
        fits.ImageHDU(image.astype(np.float32), name="IMAGE"),
        fits.ImageHDU(mask, name="MASK"),
        fits.ImageHDU(np.full(image.shape, 1e-3, dtype=np.float32), name="VARIANCE"),
    ]
    fits.HDUList(hdus).writeto(path)


def native_cutout(image_224, z, crop_rows=0):
    """The 224-px image blown up to native 0.168" pixels over +-300 kpc, optionally cut at an edge."""
    span = int(round(2 * hsc.CUTOUT_HALF_WIDTH_KPC / helpers.kpc_per_arcsec(z) / hsc.PIXEL_SCALE))
    from skimage.transform import resize

    native = resize(image_224, (span, span), order=1, preserve_range=True).astype(np.float32)
    return native[crop_rows:] if crop_rows else native


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cluster():
    image, truth = synthetic_cluster(0.3, 0.2, np.random.default_rng(11), native_noise=0.03, n_members=10)
    return image, truth


def test_help_of_every_script(capsys):
    for entry in (main, validate_main, load_bench().main):
        with pytest.raises(SystemExit) as exit_info:
            entry(["--help"])
        assert exit_info.value.code == 0
    assert "--report" in capsys.readouterr().out


def test_files_are_measured_in_order_and_bad_cutouts_reported(tmp_path, cluster, capsys):
    image, truth = cluster
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_fits(inputs / "a_native.fits", native_cutout(image, 0.3, crop_rows=30), z=0.3)
    write_fits(inputs / "b_no_redshift.fits", image)
    write_fits(inputs / "c_far.fits", image, z=0.7)
    write_fits(inputs / "d_small.fits", image[:150, :150], z=0.3)
    edge_masked = np.full(image.shape, 1 << hsc.DEFAULT_MASK_BITS["NO_DATA"], dtype=np.int32)
    edge_masked[40:-40, 40:-40] = 0
    write_fits(inputs / "e_no_sky.fits", image, z=0.3, mask=edge_masked)
    write_synthetic_shard(inputs / "f_mocks.h5", 2, seed=3)
    out = tmp_path / "m.csv"
    plots = tmp_path / "plots"

    status = main([str(inputs), "--out", str(out), "--plot-dir", str(plots), "--workers", "2"])

    assert status == 1
    rows = read_rows(out)
    assert [row["id"] for row in rows] == [
        "a_native", "b_no_redshift", "c_far", "d_small", "e_no_sky", "synthetic_00000", "synthetic_00001",
    ]
    assert set(rows[0]) >= {"id", "source", "z", "f_icl", "f_icl_err", "icl_flux", "total_flux", "sb_limit", "error"}
    errors = {row["id"]: row["error"] for row in rows}
    assert errors["b_no_redshift"].endswith("no redshift: give --z, a --catalog row for this id, or a Z/REDSHIFT header keyword")
    assert errors["c_far"].endswith("z must be in [0.1, 0.5], got 0.7")
    assert "cutout smaller than the aperture: 150 px" in errors["d_small"]
    assert "background estimate failed" in errors["e_no_sky"]
    for row in (rows[0], rows[5], rows[6]):
        assert row["error"] == ""
        assert 0 < float(row["f_icl"]) < 1
        assert float(row["f_icl_err"]) > 0
        assert (plots / f"{row['id']}.png").stat().st_size > 10_000
    assert not (plots / "b_no_redshift.png").exists()
    # A native, edge-cut cutout is padded, resized and measured like the 224-px image.
    assert float(rows[0]["f_icl"]) == pytest.approx(measure_icl_fraction(image, 0.3).f_icl, abs=0.03)
    console = capsys.readouterr()
    assert "error: " in console.err and "got 0.7" in console.err
    assert "measured 3 of 7 cutouts" in console.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "m.csv", "plots"]


def test_redshift_from_option_then_catalogue_then_header(tmp_path, cluster):
    image, _ = cluster
    write_fits(tmp_path / "one.fits", image, z=0.3)
    write_fits(tmp_path / "two.fits", image)
    catalogue = tmp_path / "clusters.csv"
    catalogue.write_text("id,z,ra,dec\ntwo,0.35,150.1,2.2\n")
    inputs = [str(tmp_path / "one.fits"), str(tmp_path / "two.fits")]

    assert main(inputs + ["--out", str(tmp_path / "c.csv"), "--catalog", str(catalogue), "--workers", "1"]) == 0
    assert [float(row["z"]) for row in read_rows(tmp_path / "c.csv")] == [0.3, 0.35]
    assert main(inputs + ["--out", str(tmp_path / "z.csv"), "--z", "0.25", "--workers", "1"]) == 0
    assert [float(row["z"]) for row in read_rows(tmp_path / "z.csv")] == [0.25, 0.25]


def test_bad_options_and_catalogues_are_refused(tmp_path, cluster, capsys):
    write_fits(tmp_path / "one.fits", cluster[0], z=0.3)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "one.fits"), "--out", str(tmp_path / "x.csv"), "--z", "0.9"])
    assert "--z: z must be in [0.1, 0.5], got 0.9" in capsys.readouterr().err
    catalogue = tmp_path / "bad.csv"
    catalogue.write_text("name,redshift\none,0.3\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "one.fits"), "--out", str(tmp_path / "x.csv"), "--catalog", str(catalogue)])
    assert "catalogue must have columns 'id' and 'z'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.fits"), "--out", str(tmp_path / "x.csv")])
    assert "no such file or directory" in capsys.readouterr().err


def test_validation_report_on_synthetic_mocks(tmp_path):
    shard = tmp_path / "mocks.h5"
    write_synthetic_shard(shard, 4, seed=5)
    report = tmp_path / "VALIDATION.md"
    table = tmp_path / "v.csv"

    assert validate_main([str(shard), "--report", str(report), "--csv", str(table), "--workers", "1"]) == 0

    text = report.read_text()
    assert "python -m measure_sb_cut.validate" in text and "Machine:" in text and "Date:" in text
    assert "## Against `f_icl_sb_ideal`" in text and "## Against `f_icl_true`" in text
    overall = [line for line in text.splitlines() if line.startswith("| all |")]
    assert len(overall) == 2 and all("| 4 |" in line for line in overall)
    rows = read_rows(table)
    ideal = np.array([float(row["f_icl_sb_ideal"]) for row in rows])
    measured = np.array([float(row["f_icl"]) for row in rows])
    mae = float(overall[0].split("|")[3])
    assert mae == pytest.approx(np.mean(np.abs(measured - ideal)), abs=1e-4)
    assert mae < 0.03


def test_synthetic_shard_uses_the_stacked_layout(tmp_path):
    shard = tmp_path / "mocks.h5"
    write_synthetic_shard(shard, 2, seed=1)
    refs, errors = prep_data.index_cutouts([str(shard)])
    assert errors == [] and len(refs) == 2
    cutout = prep_data.read_cutout(refs[1])
    assert cutout.image.shape == (224, 224) and cutout.mask.shape == (224, 224)
    assert set(cutout.meta) >= {"z", "f_icl_true", "f_icl_sb_ideal", "params"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_sb_cut", REPOSITORY / "bench" / "bench_sb_cut.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert load_bench().main(["--n-cutouts", "4", "--workers", "2", "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["n_cutouts"] == 4
    assert result["parallel_cutouts_per_s"] > 0 and result["single_process_cutouts_per_s"] > 0
    assert "cutouts/s" in capsys.readouterr().out


def test_validation_also_compares_with_the_scene_ideal_when_present(tmp_path):
    rng = np.random.default_rng(8)
    images, truths = zip(*(synthetic_cluster(z, 0.2, rng, n_members=5) for z in (0.2, 0.4)))
    columns = {key: [truth[key] for truth in truths] for key in ("z", "f_icl_true", "f_icl_sb_ideal")}
    columns["f_icl_sb_ideal_scene"] = [truth["f_icl_sb_ideal"] - 0.01 for truth in truths]
    shard = tmp_path / "mocks.h5"
    data.files.write_stacked_hdf5(shard, np.asarray(images), ids=["a", "b"], columns=columns)
    report = tmp_path / "report.md"

    assert validate_main([str(shard), "--report", str(report), "--workers", "1", "--note", "two clusters"]) == 0

    text = report.read_text()
    assert "## Against `f_icl_sb_ideal_scene`" in text
    assert "- Note: two clusters" in text
    biases = [float(line.split("|")[4]) for line in text.splitlines() if line.startswith("| all |")]
    # The scene column is the ideal minus 0.01, so its bias is larger by exactly that.
    assert biases[1] == pytest.approx(biases[0] + 0.01, abs=2e-4)
