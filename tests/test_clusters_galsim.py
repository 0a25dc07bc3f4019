"""Tests of the GalSim renderer of mock cluster cutouts (data.clusters_galsim)."""

import csv
import json

import numpy as np
import pytest

import hsc
import prep_data
from data import clusters, clusters_galsim

#: A seed whose first two clusters lie at z > 0.38 (small cutouts, fast to render).
FAST_SEED = 25
#: Cluster 0 of this seed has a NO_DATA strip (NaN) and a bright star under a BRIGHT_OBJECT disc.
MASKED_SEED = 81


def _run(argv):
    try:
        return clusters_galsim.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two clusters written by the command line (two worker processes) with a preview."""
    folder = tmp_path_factory.mktemp("galsim_clusters")
    out, preview = folder / "out", folder / "preview.png"
    status = _run(["--n", "2", "--seed", str(FAST_SEED), "--out-dir", str(out), "--preview", str(preview),
                   "--workers", "2", "--quiet"])
    assert status == 0
    return out, preview


def test_files_are_read_by_prep_data_with_the_cutout_geometry(written):
    out, preview = written
    refs, errors = prep_data.index_cutouts([str(out)])
    assert errors == []
    assert [ref.id for ref in refs] == [clusters_galsim.cluster_id(FAST_SEED, i) for i in range(2)]
    with open(out / "truth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == [ref.id for ref in refs]
    for ref, row in zip(refs, rows):
        cutout = prep_data.read_cutout(ref)
        prep_data.check_cutout(cutout)
        z = cutout.meta["z"]
        assert z == pytest.approx(float(row["z"]), rel=1e-5)
        assert hsc.Z_MIN <= z <= hsc.Z_MAX
        size = cutout.image.shape[0]
        assert cutout.image.shape == (size, size) and cutout.image.dtype == np.float32 and size % 2 == 1
        # The cutout spans +-300 kpc at z (H0 = 68.4, Om0 = 0.301) within a pixel.
        from astropy.cosmology import FlatLambdaCDM

        kpc_per_arcsec = FlatLambdaCDM(H0=68.4, Om0=0.301).kpc_proper_per_arcmin(z).value / 60.0
        assert abs(size - 600.0 / kpc_per_arcsec / hsc.PIXEL_SCALE) <= 1.0
        assert np.issubdtype(cutout.mask.dtype, np.integer) and cutout.mask.shape == (size, size)
        assert cutout.mask_bits == hsc.DEFAULT_MASK_BITS
        allowed = (1 << hsc.DEFAULT_MASK_BITS["NO_DATA"]) | (1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"])
        assert not np.any(cutout.mask.astype(np.int64) & ~allowed)
        assert prep_data.prepare_cutout(cutout).shape == (224, 224, 1)
    from astropy.io import fits

    with fits.open(refs[0].path) as hdus:
        assert [hdu.name for hdu in hdus[1:]] == ["IMAGE", "MASK", "VARIANCE"]
        assert hdus["MASK"].data.dtype.kind == "i" and hdus["MASK"].data.dtype.itemsize == 4
        header = hdus["IMAGE"].header
        assert header["F_ICL_T"] == pytest.approx(float(rows[0]["f_icl_true"]), rel=1e-5)
        assert header["F_ICL_SB"] == pytest.approx(float(rows[0]["f_icl_sb_ideal"]), rel=1e-5)
        sigma = header["SKYSIG"]
        variance = hdus["VARIANCE"].data
        assert np.nanmax(np.abs(variance - sigma**2)) < 1e-9
    records = [json.loads(line) for line in (out / "params.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [row["id"] for row in rows]
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_are_reproducible_whatever_the_workers_and_differ_between_seeds(written, tmp_path):
    out, _ = written
    clusters_galsim.write_clusters(tmp_path / "again", 2, FAST_SEED, workers=1, progress=False)
    for index in range(2):
        name = f"{clusters_galsim.cluster_id(FAST_SEED, index)}.fits"
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    assert (tmp_path / "again" / "truth.csv").read_bytes() == (out / "truth.csv").read_bytes()
    other = clusters_galsim.draw_params(clusters_galsim.cluster_rng(FAST_SEED + 1, 0))
    same = clusters_galsim.draw_params(clusters_galsim.cluster_rng(FAST_SEED, 0))
    assert other["z"] != same["z"] and other["noise"]["seed"] != same["noise"]["seed"]


def test_rendering_is_deterministic():
    first = clusters_galsim.render_cluster(np.random.default_rng(3), z=0.45)
    second = clusters_galsim.render_cluster(np.random.default_rng(3), z=0.45)
    for a, b in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(a, b)
    assert first[3] == second[3]
    third = clusters_galsim.render_cluster(np.random.default_rng(4), z=0.45)
    assert not np.array_equal(first[0][~np.isnan(first[0])][:1000], third[0][~np.isnan(third[0])][:1000])


@pytest.fixture(scope="module")
def with_and_without_icl():
    """One cluster at z = 0.45 rendered with and without its ICL (everything else the same)."""
    out = {}
    for include in (False, True):
        params = clusters_galsim.draw_params(np.random.default_rng(8), include_icl=include, z=0.45, icl_fraction=0.3)
        out[include] = (params, *clusters_galsim.render(params, components=True))
    return out


def test_an_icl_free_cluster_has_no_icl_and_adding_it_raises_both_truths(with_and_without_icl):
    params, image, _, _, truth, parts = with_and_without_icl[False]
    assert params["icl"] is None
    assert truth["f_icl_true"] == 0.0 and not parts["icl"].any()
    # Only galaxy outskirts, mostly the BCG's envelope, fall below the threshold (0.03-0.18 over
    # 20 ICL-free draws; 0.08 here).
    assert 0.0 < truth["f_icl_sb_ideal"] < 0.12
    _, image_icl, _, _, truth_icl, parts_icl = with_and_without_icl[True]
    assert truth_icl["f_icl_true"] == pytest.approx(0.3, abs=1e-6)
    assert truth_icl["f_icl_sb_ideal"] > truth["f_icl_sb_ideal"] + 0.05
    # The same BCG, members, field and noise: the two images differ by the ICL alone.
    np.testing.assert_array_equal(parts["bcg"], parts_icl["bcg"])
    np.testing.assert_array_equal(parts["members"], parts_icl["members"])
    np.testing.assert_array_equal(parts["noise"], parts_icl["noise"])
    difference = image_icl.astype(np.float64) - image
    assert np.nanmax(np.abs(difference - parts_icl["icl"])) < 1e-5


def test_truths_follow_the_definitions_of_data_clusters(with_and_without_icl):
    for include in (False, True):
        _, _, _, _, truth, parts = with_and_without_icl[include]
        z, size = truth["z"], truth["native_size"]
        assert truth["sb_threshold_counts"] == pytest.approx(float(clusters.sb_threshold_counts(z)), rel=1e-12)
        np.testing.assert_array_equal(clusters_galsim.aperture(size), clusters.aperture_mask(size))
        inside = clusters.aperture_mask(size)
        cluster = parts["bcg"] + parts["members"] + parts["icl"]
        assert truth["f_icl_true"] == pytest.approx(parts["icl"][inside].sum() / cluster[inside].sum(), abs=1e-12)
        np.testing.assert_allclose(parts["cluster_224"], prep_data.resize_image(cluster), rtol=1e-6, atol=1e-9)
        assert truth["f_icl_sb_ideal"] == pytest.approx(clusters.sb_threshold_fraction(parts["cluster_224"], z),
                                                         abs=1e-9)
        scene = prep_data.resize_image(cluster + parts["others"])
        assert truth["f_icl_sb_ideal_scene"] == pytest.approx(clusters.sb_threshold_fraction(scene, z), abs=1e-9)


def test_cluster_is_centred_and_its_light_is_positive(with_and_without_icl):
    params, _, _, _, truth, parts = with_and_without_icl[True]
    size = truth["native_size"]
    assert size == clusters_galsim.native_size(0.45)
    rows, columns = np.indices((size, size))
    bcg = parts["bcg"]
    assert np.sum(bcg * columns) / bcg.sum() == pytest.approx((size - 1) / 2, abs=0.3)
    assert np.sum(bcg * rows) / bcg.sum() == pytest.approx((size - 1) / 2, abs=0.3)
    assert np.unravel_index(np.argmax(bcg), bcg.shape) == ((size - 1) // 2, (size - 1) // 2)
    for key in ("bcg", "members", "icl", "others"):
        assert parts[key].min() > -1e-3 * parts[key].max(), key
    # The BCG's light in the cutout is close to its catalogue flux (a little falls outside).
    assert bcg.sum() == pytest.approx(float(clusters_galsim.mag_to_counts(params["bcg"]["mag"])), rel=0.1)


def test_masks_flag_no_data_and_bright_stars():
    params = clusters_galsim.draw_params(clusters_galsim.cluster_rng(MASKED_SEED, 0))
    assert params["no_data"]["fill"] == "nan" and any(params["stars"]["bright"])
    image, mask, variance, _ = clusters_galsim.render(params)
    no_data = (mask & (1 << hsc.DEFAULT_MASK_BITS["NO_DATA"])) != 0
    bright = (mask & (1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"])) != 0
    width = params["no_data"]["width"]
    assert no_data[:, :width].all() and not no_data[:, width:].any()
    assert np.isnan(image[no_data]).all() and np.isfinite(image[~no_data]).all()
    assert np.isnan(variance[no_data]).all()
    assert bright.sum() > 100
    # The bright star sits under its disc: the brightest pixels outside NO_DATA are masked.
    brightest = np.nanargmax(np.where(no_data, -np.inf, image))
    assert bright.ravel()[brightest]


@pytest.mark.parametrize("correlation", [None, 0.6])
def test_sky_noise_has_the_drawn_sigma_correlated_or_not(correlation):
    params = clusters_galsim.draw_params(np.random.default_rng(5), z=0.3)
    params["noise"].update(correlation_sigma=correlation, sky=None)
    noise = clusters_galsim.render_noise(params).astype(np.float64)
    assert noise.std() == pytest.approx(params["noise"]["sigma"], rel=0.02)
    neighbours = np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]
    assert (neighbours > 0.3) if correlation else (abs(neighbours) < 0.02)
    params["noise"]["sky"] = {"offset": 0.2, "gradient": 0.5, "angle": 0.0}
    with_sky = clusters_galsim.render_noise(params).astype(np.float64)
    # An offset of 0.2 sigma and a rise of 0.5 sigma from the left edge to the right one.
    rise = (with_sky - noise).mean(axis=0) / params["noise"]["sigma"]
    assert rise[0] == pytest.approx(-0.05, abs=1e-4) and rise[-1] == pytest.approx(0.45, abs=1e-4)


@pytest.mark.parametrize("kind, hlr, extra, tolerance", [
    ("devaucouleurs", 2.0, {}, 1e-3), ("exponential", 12.0, {}, 1e-3), ("sersic", 6.0, {"n": 2.5}, 1e-3),
    ("spergel", 3.0, {"nu": -0.6}, 1e-2),
])
def test_sampled_drawing_agrees_with_galsim_fft(kind, hlr, extra, tolerance, monkeypatch):
    # Wide BCG and ICL components are sampled and convolved as an interpolated image instead of
    # drawn by FFT: the two agree to 1e-3 in every annulus (measured: 1e-4), and to 1e-2 in the
    # centre of a Spergel cusp, which diverges (measured: 6e-3 within 2 pixels).
    psf = clusters_galsim._psf({"fwhm": 0.7, "wing": {"beta": 2.5, "fwhm": 2.1, "fraction": 0.03}})
    profile = clusters_galsim._galaxy(kind, 1000.0, hlr, 0.7, 0.4, **extra)
    images = {}
    for limit in (clusters_galsim.FFT_LIMIT, 0):
        monkeypatch.setattr(clusters_galsim, "FFT_LIMIT", limit)
        canvas = clusters_galsim._new_canvas(301)
        methods = clusters_galsim._draw_extended(canvas, [(profile, 0.3, -0.2, hlr)], psf)
        assert methods == ["fft" if limit else "sampled"]
        images[limit] = clusters_galsim._crop(canvas)
    fft, sampled = images[clusters_galsim.FFT_LIMIT], images[0]
    radius = np.hypot(*np.meshgrid(np.arange(301) - 150, np.arange(301) - 150))
    for low, high in ((0, 2), (2, 5), (5, 15), (15, 50), (50, 150)):
        ring = (radius >= low) & (radius < high)
        assert sampled[ring].sum() == pytest.approx(fft[ring].sum(), rel=tolerance), (low, high)


def test_a_sampled_spergel_cusp_on_a_pixel_centre_stays_finite():
    # nu < 0 diverges at the centre; a sample there would make the pixel, and after the PSF the
    # whole image, infinite.
    profile = clusters_galsim._galaxy("spergel", 1000.0, 10.0, 0.6, 0.3, nu=-0.7)
    canvas = clusters_galsim._new_canvas(201)
    image = clusters_galsim._sample(profile, canvas, 0.0, 0.0, 10.0)
    assert np.isfinite(image.array).all()
    # The centre holds the most light, but not an absurd share of it; the 55" canvas holds most
    # of the flux (1000) of this 10" profile.
    assert image.array.max() == image(0, 0) < 0.05 * image.array.sum()
    assert 500.0 < image.array.sum() < 1000.0


def test_labels_spread_over_thirty_draws():
    sb, true = [], []
    for index in range(30):
        params = clusters_galsim.draw_params(clusters_galsim.cluster_rng(1, index))
        truth = clusters_galsim.cluster_truth(params)
        sb.append(truth["f_icl_sb_ideal"])
        true.append(truth["f_icl_true"])
    sb, true = np.array(sb), np.array(true)
    assert np.std(sb) >= 0.05
    assert sb.max() > 0.3 and sb.min() < 0.1
    assert 0.03 <= true.min() and true.max() <= 0.6 and np.std(true) > 0.1


def test_command_line_refuses_no_clusters_in_one_line(tmp_path, capsys):
    assert _run(["--n", "0", "--out-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --n must be at least 1, got 0"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--n", "2"], "error: the following arguments are required: --out-dir"),
    (["--n", "two", "--out-dir", "x"], "error: argument --n: invalid int value: 'two'"),
    (["--n", "2", "--out-dir", "x", "--workers", "0"], "error: --workers must be at least 1, got 0"),
])
def test_command_line_usage_errors_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "x").exists()


def test_command_line_refuses_an_unwritable_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    target = tmp_path / "a_file" / "out"
    assert _run(["--n", "1", "--out-dir", str(target)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: --out-dir {target}: cannot create the folder (Not a directory)"]


def test_evaluate_scores_the_folder_with_its_truth_table(written, tmp_path):
    import subprocess
    import sys

    import model

    out, _ = written
    root = model.CHECKPOINT_DIR.parent
    command = [sys.executable, str(root / "checkpoints" / "evaluate.py"), str(model.CHECKPOINT_DIR / "icl_trained.weights.h5"),
               str(out), "--out-dir", str(tmp_path / "eval")]
    # The FITS headers hold the truth under short keywords only: without the table there is nothing to score.
    plain = subprocess.run(command, cwd=root, timeout=600, capture_output=True, text=True, check=False)
    assert plain.returncode == 2 and "none of the truth columns" in plain.stderr
    subprocess.run([*command, "--truth", str(out / "truth.csv")], cwd=root, timeout=600, capture_output=True, check=True)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 2 and {"f_icl_sb_ideal", "f_icl_true"} <= set(metrics["columns"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name,f_icl_sb_ideal\nx,0.1\n")
    broken = subprocess.run([*command, "--truth", str(bad)], cwd=root, timeout=600, capture_output=True, text=True,
                            check=False)
    assert broken.returncode == 2 and "bad.csv: a truth table needs an 'id' column" in broken.stderr
