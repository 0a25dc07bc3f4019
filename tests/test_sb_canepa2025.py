"""The original code's surface-brightness measurement (measure_sb_cut.canepa2025), step by step.

Each step is pinned on a small input whose answer can be worked out by hand; the whole chain is
pinned on two synthetic clusters against fractions the published code computed (run outside
this repository with the same library versions).
"""

import csv
import logging

import numpy as np
import pytest

import hsc
from measure_sb_cut import canepa2025
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.__main__ import main
from measure_sb_cut.validate import synthetic_cluster

SIZE = 224


def _edge_band():
    yy, xx = np.ogrid[:SIZE, :SIZE]
    inside = (xx < SIZE - 16) & (xx > 16) & (yy < SIZE - 16) & (yy > 16)
    return ~inside


def test_bad_mask_over_the_centre_is_dropped_whole(caplog):
    image = np.zeros((SIZE, SIZE))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[100:130, 100:130] = True  # a bright-star mask over the BCG
    mask[:10, :10] = True  # and another one elsewhere
    non_finite = np.zeros_like(mask)
    with caplog.at_level(logging.WARNING):
        bad = canepa2025.bad_pixels(image, mask, None, non_finite)
    assert not bad.any()
    assert "covers the image centre" in caplog.text
    mask[100:130, 100:130] = False
    assert canepa2025.bad_pixels(image, mask, None, non_finite).sum() == 100


def test_annuli_are_ten_pixel_rings_about_pixel_112_without_bad_pixels():
    yy, xx = np.indices((SIZE, SIZE))
    distance = np.hypot(xx - 112, yy - 112)
    # Ring i holds i - 1 < ... : the pixels with 10 i - 1 < d <= 10 i + 9; give each ring its index.
    image = np.floor((distance + 1 - 1e-9) / 10).astype(float)
    bad = np.zeros((SIZE, SIZE), bool)
    bad[112, 121] = True  # d = 9: the first ring's edge
    means = canepa2025.annulus_means(image, bad)
    assert len(means) == 11  # radii -1, 9, ..., 109
    np.testing.assert_allclose(means, np.arange(11), atol=1e-9)
    # d = 9 is in ring 0 (d <= 9), d = 9.06 in ring 1.
    assert image[112, 121] == 0 and image[113, 121] == 1


def test_background_adds_two_thirds_of_the_faintest_annulus_mean():
    image = np.full((SIZE, SIZE), 0.3)
    image[np.hypot(*np.indices((SIZE, SIZE)) - 112) > 60] = 0.6
    means = canepa2025.annulus_means(image, np.zeros((SIZE, SIZE), bool))
    assert means.min() == pytest.approx(0.3)
    assert canepa2025.AUTOMATIC_CONSTANT_FRACTION * means.min() == pytest.approx(0.2)


def test_edge_spline_is_fitted_to_the_mesh_ring_without_its_last_row_unless_fixed():
    flat = np.full((SIZE, SIZE), 1.0)
    reference = canepa2025.edge_spline_background(flat)
    inner = flat.copy()
    inner[48:-48, 48:-48] += 10.0  # mesh cells 3-10: out of the ring's reach, its 3 x 3 median filter included
    np.testing.assert_allclose(canepa2025.edge_spline_background(inner), reference, atol=1e-9)
    last_row = flat.copy()
    last_row[-16:, 48:-48] += 10.0  # boxes 3-10 of the mesh's last row
    np.testing.assert_allclose(canepa2025.edge_spline_background(last_row), reference, atol=1e-9)
    fixed = canepa2025.edge_spline_background(last_row, fix_edge_spline=True)
    assert np.abs(fixed - canepa2025.edge_spline_background(flat, fix_edge_spline=True)).max() > 1.0


def test_noise_comes_from_the_whole_image_unless_fixed():
    band = _edge_band()
    rng = np.random.default_rng(0)
    subtracted = np.zeros((SIZE, SIZE))
    signs = rng.choice([-1.0, 1.0], size=int(band.sum()))
    subtracted[band] = signs
    bad = np.zeros((SIZE, SIZE), bool)
    z = 0.3
    limit, sigma = canepa2025.surface_brightness_limit(subtracted, bad, z, set(), 300.0, helpers.MEASUREMENT_COSMOLOGY)
    # Whole image: a fraction p of +-1 among zeros, nothing clipped, std = sqrt(p - mean^2).
    p = band.mean()
    expected = np.sqrt(p - (signs.sum() / band.size) ** 2)
    assert sigma == pytest.approx(expected, rel=1e-9)
    assert limit == pytest.approx(-2.5 * np.log10(3 * expected / (0.168 * 10)) + 27.0, rel=1e-12)
    _, edge_sigma = canepa2025.surface_brightness_limit(
        subtracted, bad, z, {"sigma-region"}, 300.0, helpers.MEASUREMENT_COSMOLOGY
    )
    assert edge_sigma == pytest.approx(np.std(signs), rel=1e-9)


def test_limit_uses_the_native_pixel_scale_unless_fixed():
    subtracted = np.random.default_rng(1).normal(0, 0.01, (SIZE, SIZE))
    bad = np.zeros((SIZE, SIZE), bool)
    z = 0.25
    original, _ = canepa2025.surface_brightness_limit(subtracted, bad, z, set(), 300.0, helpers.MEASUREMENT_COSMOLOGY)
    fixed, _ = canepa2025.surface_brightness_limit(subtracted, bad, z, {"limit-scale"}, 300.0, helpers.MEASUREMENT_COSMOLOGY)
    scale = helpers.cutout_pixel_scale(z, SIZE)
    assert scale > hsc.PIXEL_SCALE
    assert original - fixed == pytest.approx(2.5 * np.log10(scale / hsc.PIXEL_SCALE), rel=1e-9)


def test_pixels_at_or_fainter_than_the_limit_and_non_positive_ones_are_dropped():
    limit = 28.0
    at_limit = hsc.sb_to_counts(limit)
    subtracted = np.array([[2 * at_limit, at_limit * (1 - 1e-9), 0.0, -1.0]])
    _, counts = canepa2025.kept_counts(subtracted, limit)
    assert counts[0, 0] == pytest.approx(2 * at_limit, rel=1e-12)
    assert np.isnan(counts[0, 1:]).all()


def test_dropped_pixels_are_closed_with_a_cross():
    dropped = np.zeros((7, 7), bool)
    dropped[2, 3] = dropped[4, 3] = dropped[3, 2] = dropped[3, 4] = True  # a hole inside a cross is filled
    dropped[0, 0] = dropped[1, 1] = True  # a diagonal pair is not joined
    dropped[6, 1] = dropped[6, 3] = True  # nor a one-pixel gap along a row
    closed = canepa2025.close_cross(dropped)
    assert closed[3, 3]
    assert not closed[0, 1] and not closed[1, 0] and not closed[6, 2]
    assert (closed >= dropped).all()
    # The same as scikit-image's binary closing with its default footprint, borders included.
    from skimage.morphology import binary_closing

    random = np.random.default_rng(2).random((40, 40)) < 0.3
    np.testing.assert_array_equal(canepa2025.close_cross(random), binary_closing(random))


def test_aperture_is_the_circle_of_radius_112_about_pixel_112():
    circle = canepa2025.circle(SIZE)
    assert circle[112, 0] and circle[0, 112] and circle[112, 223]
    assert not circle[0, 0] and not circle[223, 223]


def test_galaxies_need_ten_connected_pixels():
    subtracted = np.zeros((SIZE, SIZE))
    subtracted[50:52, 50:55] = 1.0  # 10 pixels
    subtracted[150:153, 150:153] = 1.0  # 9 pixels
    labels = canepa2025.detect_galaxies(subtracted, 0.5)
    assert (labels > 0).sum() == 10 and labels[51, 52] > 0 and labels[151, 151] == 0


def test_hot_mask_finds_compact_sources_outside_galaxies_only():
    rng = np.random.default_rng(3)
    image = rng.normal(0, 0.01, (SIZE, SIZE))
    image[60:62, 60:62] += 1.0  # a compact source on the sky
    image[150:152, 150:152] += 1.0  # one inside a galaxy segment
    galaxies = np.zeros((SIZE, SIZE), bool)
    galaxies[140:160, 140:160] = True
    hot = canepa2025.unsharp_hot_mask(image, galaxies)
    assert hot[60:62, 60:62].all()
    assert not hot[galaxies].any()


@pytest.mark.parametrize(
    "z, fraction, seed, original",
    # f_ICL from the published code's calc_icl_frac on these inputs (photutils 3, astropy 8).
    [(0.2, 0.15, 1, 0.11023125135034517), (0.35, 0.3, 2, 0.07392997362013068)],
)
def test_whole_chain_matches_the_published_code(z, fraction, seed, original):
    image, _ = synthetic_cluster(z, fraction, np.random.default_rng(seed), native_noise=0.03, n_members=12)
    bad = np.zeros(image.shape, bool)
    bad[20:40, 150:190] = True
    result = canepa2025.measure_icl_fraction_canepa2025(image.astype(np.float32), z, bad)
    assert result.f_icl == pytest.approx(original, abs=1e-6)
    assert 0 < result.f_icl_err < result.f_icl
    fixed = canepa2025.measure_icl_fraction_canepa2025(image.astype(np.float32), z, bad, fixes=canepa2025.FIXES)
    assert fixed.f_icl != pytest.approx(original, abs=1e-4)


def test_manual_variant_masks_non_members_and_counts_pixels_fainter_than_the_threshold():
    z = 0.3
    image, _ = synthetic_cluster(z, 0.2, np.random.default_rng(5), native_noise=0.03, n_members=0)
    threshold = hsc.sb_to_counts(hsc.observed_surface_brightness(26.0, z))
    yy, xx = np.indices(image.shape)
    galaxy = np.hypot(xx - 40, yy - 180) <= 6
    image = image + np.where(galaxy, 20 * threshold, 0.0).astype(np.float32)
    member = {"x": [40.5], "y": [180.2], "z_phot": [z + 0.05]}
    interloper = {"x": [40.5], "y": [180.2], "z_phot": [z + 0.3]}
    kept = canepa2025.measure_icl_fraction_manual_canepa2025(image, z, members=member, keep_maps=True)
    masked = canepa2025.measure_icl_fraction_manual_canepa2025(image, z, members=interloper, keep_maps=True)
    assert not kept.maps["extra"][180, 40] and masked.maps["extra"][180, 40]
    # The non-member's segment, grown by one pixel (diagonals included), is masked.
    assert masked.maps["extra"][np.hypot(xx - 40, yy - 180) <= 7].mean() > 0.9
    assert masked.total_flux < kept.total_flux
    # Member cut: strictly inside 3 x 0.05 (1 + z).
    width = 3 * 0.05 * (1 + z)
    x, _ = canepa2025.member_positions({"x": [1.0, 2.0], "y": [1.0, 1.0], "z_phot": [z + width * 0.999, z + width * 1.001]}, z)
    assert list(x) == [1.0]


def test_unknown_fix_and_bad_shape_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown fix 'sky'"):
        canepa2025.measure_icl_fraction_canepa2025(np.zeros((SIZE, SIZE)), 0.3, fixes=["sky"])
    with pytest.raises(ValueError, match="square 2-D array"):
        canepa2025.measure_icl_fraction_canepa2025(np.zeros((SIZE, 200)), 0.3)
    with pytest.raises(ValueError, match="no source brighter than the threshold"):
        canepa2025.measure_icl_fraction_canepa2025(np.random.default_rng(0).normal(0, 1e-4, (SIZE, SIZE)), 0.3)


def _write_cluster(path, z=0.3):
    from astropy.io import fits

    image, _ = synthetic_cluster(z, 0.2, np.random.default_rng(9), native_noise=0.03, n_members=8)
    hdu = fits.ImageHDU(image.astype(np.float32), name="IMAGE")
    hdu.header["Z"] = z
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    return image


def test_command_uses_the_original_method_by_default_and_names_it(tmp_path):
    image = _write_cluster(tmp_path / "a.fits")
    assert main([str(tmp_path / "a.fits"), "--out", str(tmp_path / "m.csv"), "--workers", "1"]) == 0
    assert main([str(tmp_path / "a.fits"), "--out", str(tmp_path / "f.csv"), "--workers", "1",
                 "--fix", "sigma-region", "--fix", "limit-scale"]) == 0
    with open(tmp_path / "m.csv") as plain, open(tmp_path / "f.csv") as with_fixes:
        row, fixed = next(csv.DictReader(plain)), next(csv.DictReader(with_fixes))
    assert row["method"] == "canepa2025" and fixed["method"] == "canepa2025+limit-scale+sigma-region"
    expected = canepa2025.measure_icl_fraction_canepa2025(image, 0.3).f_icl
    assert float(row["f_icl"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--aperture-kpc", "200"], "--aperture-kpc applies to --method improved only"),
        (["--no-reestimates"], "--no-reestimates applies to --method improved only"),
        (["--method", "improved", "--fix", "edge-spline"], "--fix applies to --method canepa2025 only"),
    ],
)
def test_options_of_the_other_method_are_refused(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "m.csv"), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_does_not_keep_rows_of_another_method(tmp_path):
    from measure_sb_cut.__main__ import read_finished_rows

    out = tmp_path / "m.csv"
    partial = tmp_path / ".m.partial-1.csv"
    from measure_sb_cut.measure import CSV_COLUMNS

    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerow({**dict.fromkeys(CSV_COLUMNS, ""), "id": "a", "source": "a.fits", "method": "improved"})
    assert set(read_finished_rows(out)) == {"a.fits"}
    assert read_finished_rows(out, "canepa2025") == {}
    assert set(read_finished_rows(out, "improved")) == {"a.fits"}
