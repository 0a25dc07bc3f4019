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


def test_noise_sigma_is_the_background_mad_std(injected):
    from astropy.stats import mad_std

    background, result = injected
    sky = background[background <= result.params["threshold_counts"]]
    assert result.params["noise_sigma"] == pytest.approx(float(mad_std(sky)), rel=1e-6)
    assert result.params["noise_sigma"] == pytest.approx(0.01, rel=0.15)  # the sky noise, plus faint wings


def test_input_is_not_modified():
    background = _background(1)
    copy = background.copy()
    injection.inject_icl(background, Z, seed=0)
    np.testing.assert_array_equal(background, copy)


def test_central_blob_is_split_from_its_touching_neighbour(injected):
    background, result = injected
    threshold = result.params["threshold_counts"]
    centre_label = result.segmentation[111, 111]
    neighbour_label = result.segmentation[114, 124]
    assert centre_label > 0 and neighbour_label > 0 and centre_label != neighbour_label
    assert result.params["centre_x"] == pytest.approx(111.5, abs=2.0)
    assert result.params["centre_y"] == pytest.approx(111.5, abs=2.0)
    assert background[114, 124] > threshold


def test_quantile_steps_down_until_the_profile_is_compact_enough():
    background = _background(2)
    result = injection.inject_icl(background, Z, seed=1, quantile=1.0)
    p = result.params
    if p["quantile"] > 0:  # a profile larger than the blob's nearest edge leaves a plateau at the threshold
        assert (result.profile == p["threshold_counts"]).any()
    unclipped = injection.exponential_profile(background.shape, p["centre_x"], p["centre_y"], p["threshold_counts"],
                                              p["r_eff_px"], p["ellipticity"], p["position_angle"])
    extent = (unclipped > p["faint_limit_counts"]).sum()
    assert p["quantile"] == 0.0 or extent <= injection.MAX_AREA_RATIO * p["blob_area_px"]
    assert p["quantile"] in (0.0, 0.25, 0.5, 0.75, 1.0)


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
    (ref,), errors = prep_data.index_cutouts(str(path))
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
