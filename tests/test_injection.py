"""ICL injection (SPEC Part A, steps 1-6) into mock and real-format cutouts."""

import numpy as np
import pytest

import hsc
import prep_data
from data import clusters, injection, profiles

Z = 0.3


def _background(seed=0, size=224, noise=0.01):
    """A central galaxy, a neighbour touching it, a distant galaxy and sky noise."""
    rng = np.random.default_rng(seed)
    image = profiles.render_sersic((size, size), (size - 1) / 2, (size - 1) / 2, 1500.0, 5.0, 4.0, 0.6, 0.4)
    image += profiles.render_sersic((size, size), size / 2 + 12, size / 2 + 3, 500.0, 2.0, 2.0, 0.7, 1.0)
    image += profiles.render_sersic((size, size), 30, 180, 600.0, 3.0, 1.0, 0.5, 0.2)
    return (image + noise * rng.standard_normal((size, size))).astype(np.float32)


@pytest.fixture(scope="module")
def injected():
    background = _background()
    return background, injection.inject_icl(background, Z, seed=4)


def test_profile_amplitude_is_the_threshold_at_r_eff(injected):
    _, result = injected
    p = result.params
    threshold = float(hsc.sb_to_counts(hsc.observed_surface_brightness(25.0, Z)))
    assert p["threshold_counts"] == pytest.approx(threshold, rel=1e-12)
    unclipped = injection.exponential_profile((1, 1), -p["r_eff_px"], 0.0, threshold, p["r_eff_px"], p["ellipticity"], 0.0)
    assert unclipped[0, 0] == pytest.approx(threshold, rel=1e-5)


def test_profile_is_clipped_at_the_threshold_and_zero_on_galaxies(injected):
    background, result = injected
    p = result.params
    threshold = p["threshold_counts"]
    unclipped = injection.exponential_profile(background.shape, p["centre_x"], p["centre_y"], threshold, p["r_eff_px"],
                                              p["ellipticity"], p["position_angle"])
    galaxies = background > threshold
    assert result.profile.max() <= threshold
    np.testing.assert_array_equal(result.profile[galaxies], 0.0)
    np.testing.assert_allclose(result.profile[~galaxies], np.minimum(unclipped, threshold)[~galaxies], rtol=1e-6)


def test_background_is_faded_and_noise_scaled_by_the_profile(injected):
    background, result = injected
    p = result.params
    threshold = p["threshold_counts"]
    galaxies = background > threshold
    np.testing.assert_array_equal(result.image[galaxies], background[galaxies])
    weight = result.profile / threshold
    expected = background * (1 - weight) + result.profile + result.noise
    np.testing.assert_allclose(result.image, expected, rtol=1e-5, atol=1e-7)
    carries = weight > 0.05
    assert (result.noise[carries] / weight[carries]).std() == pytest.approx(p["noise_sigma"], rel=0.05)
    np.testing.assert_array_equal(result.noise[result.profile == 0], 0.0)


def test_noise_sigma_is_the_mad_std_of_the_image_with_bright_pixels_zeroed(injected):
    from astropy.stats import mad_std

    background, result = injected
    sky = np.where(background > result.params["threshold_counts"], 0.0, background)
    assert result.params["noise_sigma"] == pytest.approx(float(mad_std(sky)), rel=1e-6)
    assert result.params["noise_sigma"] == pytest.approx(0.01, rel=0.15)  # the sky noise, plus faint wings


def test_input_is_not_modified():
    background = _background(1)
    copy = background.copy()
    injection.inject_icl(background, Z, seed=0)
    np.testing.assert_array_equal(background, copy)


def test_neighbour_inside_the_central_isophote_stays_in_the_central_blob(injected):
    # The footprint has no neck between the central galaxy and a neighbour inside its isophote,
    # so the erosion leaves one seed and the distance watershed one segment, as in the paper.
    background, result = injected
    threshold = result.params["threshold_counts"]
    assert background[114, 124] > threshold
    assert result.segmentation[112, 112] == result.segmentation[114, 124] > 0
    assert result.params["centre_x"] == pytest.approx(111.5, abs=2.0)
    assert result.params["centre_y"] == pytest.approx(111.5, abs=2.0)
    assert result.params["centre_x"] == int(result.params["centre_x"])


def test_quantile_steps_down_until_the_profile_is_compact_enough():
    background = _background(2)
    result = injection.inject_icl(background, Z, seed=1, quantile=1.0)
    p = result.params
    if p["quantile"] > 0:  # a profile larger than the blob's nearest edge leaves a plateau at the threshold
        assert (result.profile == p["threshold_counts"]).any()
    # The area test counts the kept profile as injected: clipped and zero on the galaxies.
    extent = int((result.profile > p["faint_limit_counts"]).sum())
    assert p["area_ratio"] == pytest.approx(extent / p["blob_area_px"], abs=1.0 / p["blob_area_px"])
    assert p["quantile"] == 0.0 or p["area_ratio"] <= injection.MAX_AREA_RATIO
    assert p["quantile"] in (0.0, 0.25, 0.5, 0.75, 1.0) and p["quantile_start"] == 1.0


# ----------------------------------------------------------------------------------------
# The paper's steps on small images whose answers can be worked out by hand

#: 1 / Phi^-1(3/4): astropy's mad_std is this times the median absolute deviation.
MAD_TO_SIGMA = 1.482602218505602


def _disk(shape, row, col, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - row) ** 2 + (xx - col) ** 2 <= radius**2


def _threshold(z=Z):
    return float(hsc.sb_to_counts(hsc.observed_surface_brightness(25.0, z)))


@pytest.mark.parametrize(("ellipticity", "angle"), [(0.0, 0.0), (0.3, 0.7), (0.45, 2.0), (0.2, 4.5), (0.49, 6.1)])
def test_exponential_profile_is_astropys_sersic2d_with_n_1(ellipticity, angle):
    from astropy.modeling.functional_models import Sersic2D

    yy, xx = np.mgrid[:41, :53]
    expected = Sersic2D(amplitude=0.07, r_eff=6.3, n=1, x_0=30, y_0=17, ellip=ellipticity, theta=angle)(xx, yy)
    ours = injection.exponential_profile((41, 53), 30, 17, 0.07, 6.3, ellipticity, angle)
    np.testing.assert_allclose(ours, expected, rtol=2e-7, atol=0)


def test_exponential_profile_axes_by_hand():
    # Major axis along +y (angle pi/2), axis ratio 1 - 0.5: the amplitude lies 8 px along y
    # and 4 px along x from the centre; the centre is e^b1 brighter (b1 = 1.678).
    profile = injection.exponential_profile((41, 41), 20, 20, 1.0, 8.0, 0.5, np.pi / 2)
    assert profile[28, 20] == pytest.approx(1.0, rel=1e-6) and profile[20, 24] == pytest.approx(1.0, rel=1e-6)
    assert profile[20, 20] == pytest.approx(np.exp(1.678346990), rel=1e-6)


def test_faint_limit_has_no_k_correction():
    image = np.zeros((40, 40), np.float32)
    image[_disk(image.shape, 20, 20, 6)] = 1.0
    p = injection.inject_icl(image, Z, seed=0).params
    # mu = 30.2 + 10 log10(1.3) = 31.3394 mag/arcsec^2 -> 10**(-0.4 (mu - 27 - 5 log10 0.168)) counts
    assert p["faint_limit_counts"] == pytest.approx(10 ** (-0.4 * (30.2 + 10 * np.log10(1.3) - 27 - 5 * np.log10(0.168))),
                                                    rel=1e-12)
    assert p["faint_limit_counts"] == pytest.approx(5.18615e-4, rel=1e-5)
    # The threshold keeps k(0.3) = -0.11324 mag: 10**(0.4 * 5.31324) = 133.44 times the faint limit.
    assert p["threshold_counts"] / p["faint_limit_counts"] == pytest.approx(133.44, rel=1e-4)


def test_touching_disks_are_split_along_their_neck():
    # Two disks of radius 6 (113 pixels each) touch between columns 23 and 24. The 3 x 3 erosion
    # leaves two seeds; the distance watershed gives each disk its own label, offset by the one
    # photutils label: 2 for the first seed in raster order, 3 for the second.
    image = np.zeros((40, 40), np.float32)
    left, right = _disk(image.shape, 20, 17, 6), _disk(image.shape, 20, 30, 6)
    image[left | right] = 1.0
    segmentation = injection.segment_sources(image, _threshold())
    np.testing.assert_array_equal(segmentation[left], 2)
    np.testing.assert_array_equal(segmentation[right], 3)
    np.testing.assert_array_equal(segmentation[~(left | right)], 0)
    p = injection.inject_icl(image, Z, seed=0).params
    assert (p["blob_area_px"], p["centre_y"], p["centre_x"]) == (113, 20.0, 17.0)


def test_source_too_thin_for_the_erosion_keeps_its_photutils_label():
    image = np.zeros((40, 40), np.float32)
    image[5:7, 3:33] = 1.0  # 2 px wide: erodes away, no seed, photutils label 1
    disk = _disk(image.shape, 25, 20, 5)
    image[disk] = 1.0  # photutils label 2, seed 1 -> 1 + 2
    segmentation = injection.segment_sources(image, _threshold())
    np.testing.assert_array_equal(segmentation[5:7, 3:33], 1)
    np.testing.assert_array_equal(segmentation[disk], 3)


def test_erosion_pieces_touching_at_a_corner_seed_separate_sources():
    # Two overlapping 6 x 6 squares: the erosion leaves (11-14, 11-14) and (15-18, 15-18), which
    # touch only diagonally. The seeds are 4-connected pieces, so each square gets its own label.
    image = np.zeros((30, 30), np.float32)
    image[10:16, 10:16] = 1.0
    image[14:20, 14:20] = 1.0
    segmentation = injection.segment_sources(image, _threshold())
    assert (segmentation[10, 10], segmentation[19, 19]) == (2, 3)


def test_centre_is_the_truncated_unweighted_mean_of_the_blob_under_pixel_h_over_2():
    # Rows 15-24 and columns 15-26, brighter to the right: the mean pixel is (19.5, 20.5),
    # truncated to (19, 20) whatever the weights. Pixel (H // 2, W // 2) = (15, 15) is the
    # blob's corner; (14, 14) lies outside it.
    image = np.zeros((30, 30), np.float32)
    image[15:25, 15:27] = np.linspace(1.0, 3.0, 12)[None, :]
    p = injection.inject_icl(image, Z, seed=0).params
    assert (p["centre_y"], p["centre_x"], p["blob_area_px"]) == (19.0, 20.0, 120)


def test_area_test_counts_the_zeroed_profile_against_the_blob():
    # A plus of 2-px arms, 26 px long, in a 30 x 30 image: 100 blob pixels. Its hull vertices lie
    # 12-13.04 px from the centre (14, 14), so every profile reaches past the image corners
    # (r_eff (1 + ln(133.44) / 1.678) >= 47 px > 21.2 px / (1 - 0.5)): all 800 pixels off the blob
    # are above the faint limit. 800 / 100 = 8 is not more than 8, so the first try is kept; the
    # unzeroed count, 900, would have been.
    image = np.zeros((30, 30), np.float32)
    image[14:16, 2:28] = 1.0
    image[2:28, 14:16] = 1.0
    result = injection.inject_icl(image, Z, seed=0, quantile=1.0)
    p = result.params
    assert (p["blob_area_px"], p["centre_y"], p["centre_x"]) == (100, 14.0, 14.0)
    assert p["quantile"] == 1.0 and p["area_ratio"] == 8.0
    assert p["r_eff_px"] == pytest.approx(np.hypot(13, 1), rel=1e-12)
    assert (result.profile > p["faint_limit_counts"]).sum() == 800


def test_hull_is_taken_after_a_2x2_opening():
    # A 10 x 10 square (rows and columns 10-19) with a 1-px spike along row 14 to column 29:
    # 110 pixels, centre (14, 15). The opening removes the spike, leaving the square's corners
    # at 4 sqrt(2), 41**0.5 (twice) and 5 sqrt(2) px; the spike's tip would be 14 px away. In a
    # 30 x 30 image at most 900 - 110 = 790 <= 8 x 110 pixels can be above the faint limit, so
    # the first try is kept.
    image = np.zeros((30, 30), np.float32)
    image[10:20, 10:20] = 1.0
    image[14, 20:30] = 1.0
    for quantile, r_eff in ((1.0, 5 * np.sqrt(2)), (0.5, np.sqrt(41)), (0.0, 4 * np.sqrt(2))):
        p = injection.inject_icl(image, Z, seed=0, quantile=quantile).params
        assert (p["centre_y"], p["centre_x"], p["blob_area_px"], p["quantile"]) == (14.0, 15.0, 110, quantile)
        assert p["r_eff_px"] == pytest.approx(r_eff, rel=1e-12)


def test_last_try_at_quantile_0_is_kept_and_draws_come_in_the_papers_order():
    # A plus of 2-px arms 20 px long in a 64 x 64 image: 76 blob pixels, centre (32, 32), hull
    # vertices 9-10.05 px away. Every profile covers far more than 8 x 76 pixels, so the tries
    # step down to quantile 0 (r_eff = 9) and that try is kept. A RandomState draws the quantile,
    # then ellipticity and angle at every try, then the noise field.
    image = np.zeros((64, 64), np.float32)
    image[32:34, 23:43] = 1.0
    image[23:43, 32:34] = 1.0
    image += 0.001 * np.random.default_rng(0).standard_normal(image.shape).astype(np.float32)
    for seed in range(6):
        result = injection.inject_icl(image, Z, seed=np.random.RandomState(seed))
        p = result.params
        replay = np.random.RandomState(seed)
        start = float(replay.choice([0.0, 0.25, 0.5, 1.0]))
        tries = {0.0: 1, 0.25: 2, 0.5: 3, 1.0: 5}[start]  # 1, 0.75, 0.5, 0.25, 0 from 1
        draws = [(replay.uniform(0, 0.5), replay.uniform(0, 2 * np.pi)) for _ in range(tries)]
        noise = replay.normal(0.0, p["noise_sigma"], image.shape) * result.profile / p["threshold_counts"]
        assert (p["quantile_start"], p["quantile"], p["r_eff_px"]) == (start, 0.0, 9.0)
        assert p["area_ratio"] > injection.MAX_AREA_RATIO
        assert (p["ellipticity"], p["position_angle"]) == draws[-1]
        np.testing.assert_allclose(result.noise, noise, rtol=1e-6, atol=1e-12)
    # A start off the grid steps by 0.25 while it stays >= 0: 0.3, then 0.05, kept.
    assert injection.inject_icl(image, Z, seed=0, quantile=0.3).params["quantile"] == pytest.approx(0.05, abs=1e-12)


def test_noise_sigma_counts_the_zeroed_bright_pixels():
    # 144 bright pixels become zeros; the other 256 alternate s and 5 s. Median s, absolute
    # deviations 128 x 0, 144 x s, 128 x 4 s: median s, so sigma = 1.4826 s. Without the zeros
    # it would be 1.4826 x 2 s.
    image = np.zeros((20, 20), np.float32)
    bright = np.zeros(image.shape, bool)
    bright[4:16, 4:16] = True
    image[bright] = 1.0
    s = float(np.float32(0.005))
    sky = np.flatnonzero(~bright.ravel())
    image.ravel()[sky] = np.where(np.arange(sky.size) % 2 == 0, s, 5 * s)
    assert injection.inject_icl(image, Z, seed=0).params["noise_sigma"] == pytest.approx(MAD_TO_SIGMA * s, rel=1e-7)
    # NO_DATA pixels are left out rather than counted as zeros: flag 100 of the s pixels. The
    # 300 pixels left (144 zeros, 28 s, 128 x 5 s) have median s and deviations of median s.
    mask = np.zeros(image.shape, np.int32)
    mask.ravel()[sky[0:200:2]] = 1 << hsc.DEFAULT_MASK_BITS["NO_DATA"]
    assert injection.inject_icl(image, Z, mask, seed=0).params["noise_sigma"] == pytest.approx(MAD_TO_SIGMA * s,
                                                                                               rel=1e-7)


def test_bright_object_pixels_are_used_like_any_other():
    # The paper's cutouts had no mask: a BRIGHT_OBJECT flag over the central galaxy changes nothing.
    image = np.zeros((40, 40), np.float32)
    image[_disk(image.shape, 20, 20, 6)] = 1.0
    mask = np.zeros(image.shape, np.int32)
    mask[10:30, 10:30] = 1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"]
    plain = injection.inject_icl(image, Z, seed=3)
    flagged = injection.inject_icl(image, Z, mask, seed=3)
    np.testing.assert_array_equal(plain.image, flagged.image)


def test_degenerate_blob_uses_all_its_points():
    # A 1-px line of 25 pixels (columns 5-29): nothing survives the 2 x 2 opening and the points
    # are collinear, so the distances are those of all 25 pixels from the centre column 17:
    # median 6, maximum 12, minimum 0 (refused: r_eff = 0).
    image = np.zeros((5, 35), np.float32)
    image[2, 5:30] = 1.0
    assert injection.inject_icl(image, Z, seed=0, quantile=0.5).params["r_eff_px"] == 6.0
    assert injection.inject_icl(image, Z, seed=0, quantile=1.0).params["r_eff_px"] == 12.0
    with pytest.raises(injection.InjectionError, match=r"r_eff = 0: the central blob's centre \(row 2, column 17\)"):
        injection.inject_icl(image, Z, seed=0, quantile=0.0)


def test_small_bright_source_at_the_centre_is_refused():
    # 16 pixels above the threshold are no segment (fewer than 20); the paper's code took such
    # unlabelled bright pixels as the central blob.
    image = np.zeros((30, 30), np.float32)
    image[13:17, 13:17] = 1.0
    with pytest.raises(injection.InjectionError, match=r"covers the image centre \(pixel row 15, column 15\)"):
        injection.inject_icl(image, Z, seed=0)


def test_injection_into_a_background_mock():
    image, mask, truth = clusters.render_cluster(np.random.default_rng(5), clusters.BACKGROUND_DISTRIBUTION,
                                                 include_icl=False, z=0.45)
    result = injection.inject_icl(image, truth["z"], mask, seed=0)
    assert 0.0 < result.params["f_icl_injected"] < 1.0
    assert result.image.shape == (224, 224) and result.image.dtype == np.float32


def test_entirely_masked_background_is_refused():
    background = _background()
    mask = np.full(background.shape, 1 << hsc.DEFAULT_MASK_BITS["NO_DATA"], np.int32)
    with pytest.raises(injection.InjectionError, match="background cutout is entirely masked"):
        injection.inject_icl(background, Z, mask)


def test_no_central_source_is_refused():
    sky = np.random.default_rng(0).normal(0, 0.01, (64, 64)).astype(np.float32)
    with pytest.raises(injection.InjectionError, match="covers the image centre"):
        injection.inject_icl(sky, Z)


def test_bad_arguments_are_refused():
    with pytest.raises(injection.InjectionError, match=r"z must be in \[0.1, 0.5\], got 0.9"):
        injection.inject_icl(_background(), 0.9)
    with pytest.raises(injection.InjectionError, match=r"image must be 2-D, got shape \(2, 3, 4\)"):
        injection.inject_icl(np.zeros((2, 3, 4)), Z)
    with pytest.raises(injection.InjectionError, match=r"quantile must be in \[0, 1\], got 2"):
        injection.inject_icl(_background(), Z, quantile=2)


def _write_hsc_fits(path, image, mask, z):
    from astropy.io import fits

    header = fits.Header()
    header["Z"] = z
    mask_header = fits.Header()
    mask_header["MP_BAD"] = 0
    mask_header["MP_NO_DATA"] = 8
    mask_header["MP_BRIGHT_OBJECT"] = 9
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(image, header=header, name="IMAGE"),
        fits.ImageHDU(mask, header=mask_header, name="MASK"),
        fits.ImageHDU(np.ones_like(image), name="VARIANCE"),
    ]).writeto(path)


def test_injection_into_a_real_format_cutout(tmp_path):
    # A non-square HSC-style FITS cutout (cut at a survey edge), read by prep_data.
    background = _background(3, size=301)[:, 10:290]
    mask = np.zeros(background.shape, np.int32)
    mask[:20, :20] = 1 << 9
    path = tmp_path / "lrg.fits"
    _write_hsc_fits(path, background, mask, Z)
    (ref,), _ = prep_data.index_cutouts(str(path))
    cutout = prep_data.read_cutout(ref)
    image, resized_mask = injection.resize_cutout(cutout)
    assert image.shape == resized_mask.shape == (224, 224)
    # The padding of the short axis is NO_DATA, the corner BRIGHT_OBJECT.
    assert resized_mask[112, 0] & (1 << 8) and resized_mask[0, 10] & (1 << 9)
    result = injection.inject_icl(image, cutout.meta["z"], resized_mask, seed=0)
    assert result.profile.max() <= result.params["threshold_counts"]


def test_command_line(tmp_path, capsys):
    background = _background(4, size=280)
    path = tmp_path / "lrg.fits"
    _write_hsc_fits(path, background, np.zeros(background.shape, np.int32), Z)
    out = tmp_path / "injected.h5"
    assert injection.main([str(path), "--out", str(out), "--seed", "3"]) == 0
    refs, errors = prep_data.index_cutouts(str(out))
    assert len(refs) == 1 and not errors
    cutout = prep_data.read_cutout(refs[0])
    assert cutout.image.shape == (224, 224) and cutout.meta["z"] == pytest.approx(Z)
    assert 0 < cutout.meta["f_icl_injected"] < 1


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        injection.main(["--help"])
    assert exit_info.value.code == 0
    assert "Inject ICL" in capsys.readouterr().out
