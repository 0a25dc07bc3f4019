"""The classical tidal-feature baselines on small synthetic galaxies with and without a one-sided arc."""

import numpy as np
import pytest

import tidal_baselines

NOISE = np.array([0.017, 0.020, 0.022, 0.061, 0.089])  # sky sigma per band (counts), as in the mocks


def _galaxy(size=64, centre=None, flux=1.0, q=0.6, angle=0.4):
    """A smooth elliptical exponential host, the same in every band, peak ``flux`` counts."""
    centre = ((size - 1) / 2, (size - 1) / 2) if centre is None else centre
    rows, columns = np.mgrid[:size, :size]
    y, x = rows - centre[0], columns - centre[1]
    u = x * np.cos(angle) + y * np.sin(angle)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / q
    return flux * np.exp(-np.hypot(u, v) / 3.0)


def _arc(size=64, radius=16.0, amplitude=0.03, start=0.2, span=1.6, width=2.0):
    """A faint arc of a ring on one side of the centre (a shell or a stream), in counts per pixel."""
    rows, columns = np.mgrid[:size, :size]
    y, x = rows - (size - 1) / 2, columns - (size - 1) / 2
    angle = np.mod(np.arctan2(y, x) - start, 2 * np.pi)
    return amplitude * np.exp(-0.5 * ((np.hypot(x, y) - radius) / width) ** 2) * (angle < span)


def _images(galaxies, count=1, seed=0, size=64):
    """(count, size, size, 5) images: each 2-D light map in every band plus sky noise."""
    rng = np.random.default_rng(seed)
    light = np.broadcast_to(np.asarray(galaxies, dtype=np.float64)[..., None], (count, size, size, 5))
    return (light + rng.normal(size=(count, size, size, 5)) * NOISE).astype(np.float32)


def test_host_flux_sums_the_i_band_inside_the_radius_only():
    images = np.zeros((2, 32, 32, 5), np.float32)
    images[:, 15:17, 15:17, 2] = 1.0  # the four central pixels (centre at 15.5, 15.5)
    images[:, 15:17, 15:17, (0, 1, 3, 4)] = 50.0  # other bands do not count
    images[1, 0, 0, 2] = 1000.0  # light outside the aperture does not count
    images[1, 15, 24, 2] = 1000.0  # 8.5 px from the centre: outside radius 5
    np.testing.assert_allclose(tidal_baselines.host_flux_statistic(images), [4.0, 4.0])
    assert tidal_baselines.host_flux_statistic(images, radius=10.0)[1] == pytest.approx(1004.0)
    assert tidal_baselines.host_flux_statistic(images[0]).shape == (1,)  # one (H, W, bands) image


def test_a_one_sided_arc_raises_the_rotation_residual():
    host = _galaxy(flux=2.0)
    symmetric = _images(np.repeat(host[None], 20, axis=0), 20, seed=1)
    with_arc = symmetric + _arc()[None, :, :, None].astype(np.float32)  # the same scenes and noise, plus an arc
    plain = tidal_baselines.rotation_residual_statistic(symmetric)
    arc = tidal_baselines.rotation_residual_statistic(with_arc)
    assert (arc > plain).all()
    assert np.median(arc) > np.median(plain) + 5
    # More asymmetric faint light, a higher score.
    brighter = tidal_baselines.rotation_residual_statistic(symmetric + 1.5 * _arc()[None, :, :, None].astype(np.float32))
    assert (brighter > arc).all()


def test_a_symmetric_galaxy_in_noise_scores_near_zero_even_off_the_pixel_grid():
    noise_only = tidal_baselines.rotation_residual_statistic(_images(np.zeros((60, 64, 64)), 60, seed=2))
    assert abs(np.mean(noise_only)) < 1.5 and np.std(noise_only) < 5
    # A host 0.3 px off the image centre is recentred before the rotation: still symmetric.
    shifted = _galaxy(flux=5.0, centre=(31.8, 31.3))
    off_centre = tidal_baselines.rotation_residual_statistic(_images(np.repeat(shifted[None], 30, axis=0), 30, seed=2))
    assert abs(np.median(off_centre)) < 2.0
    arc = tidal_baselines.rotation_residual_statistic(_images((shifted + _arc())[None].repeat(30, axis=0), 30, seed=2))
    assert np.median(arc) > np.median(off_centre) + 5


def test_compact_neighbours_are_masked():
    """A bright star far from the host counts much less than a faint arc of the host."""
    rows, columns = np.mgrid[:64, :64]
    star = 20.0 * np.exp(-0.5 * ((rows - 8) ** 2 + (columns - 50) ** 2) / 1.5**2)
    host = _galaxy(flux=2.0)
    scores = {}
    for name, light in {"host": host, "star": host + star, "arc": host + _arc()}.items():
        scores[name] = np.median(tidal_baselines.rotation_residual_statistic(_images(light[None].repeat(10, 0), 10, seed=3)))
    assert scores["star"] - scores["host"] < 0.25 * (scores["arc"] - scores["host"])
    unmasked = tidal_baselines.rotation_residual_statistic(_images((host + star)[None], 1, seed=3), mask_sources=False)
    assert unmasked[0] > scores["star"] + 10


def test_twins_differing_outside_the_core_share_the_host_statistic_not_the_residual():
    twin = _images(_galaxy(flux=3.0)[None], 1, seed=4)
    with_feature = twin + _arc(radius=18.0)[None, :, :, None].astype(np.float32)
    pair = np.concatenate([with_feature, twin])
    host = tidal_baselines.host_flux_statistic(pair)
    assert host[0] == pytest.approx(host[1], rel=1e-6)
    residual = tidal_baselines.rotation_residual_statistic(pair)
    assert residual[0] > residual[1] + 5


def test_scores_do_not_depend_on_units_batch_or_chunks():
    images = _images(np.stack([_galaxy(flux=f) + _arc(amplitude=a) for f, a in ((1, 0), (3, 0.02), (0.5, 0.05))]), 3,
                     seed=5)
    scores = tidal_baselines.rotation_residual_statistic(images)
    # Counts at another zero point: everything is measured in units of the image's own noise.
    np.testing.assert_allclose(tidal_baselines.rotation_residual_statistic(images * 7.5), scores, rtol=1e-6, atol=1e-8)
    one_by_one = [tidal_baselines.rotation_residual_statistic(image)[0] for image in images]
    np.testing.assert_allclose(one_by_one, scores, rtol=1e-9)
    chunked = tidal_baselines.baseline_scores(lambda rows: images[rows], np.arange(3), chunk=2)
    np.testing.assert_allclose(chunked["rotation_residual"], scores, rtol=1e-9)
    np.testing.assert_allclose(chunked["host_flux"], tidal_baselines.host_flux_statistic(images))


def test_nan_pixels_are_left_out():
    images = _images((_galaxy(flux=2.0) + _arc())[None], 1, seed=6)
    images[0, :5, :, :] = np.nan
    assert np.isfinite(tidal_baselines.rotation_residual_statistic(images)).all()
    assert np.isfinite(tidal_baselines.host_flux_statistic(images)).all()


def test_boosting_baseline_on_residual_features_finds_arcs():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)

    def sample(count, seed):
        labels = np.arange(count) % 2
        light = [_galaxy(flux=rng.uniform(0.5, 4), q=rng.uniform(0.4, 1), angle=rng.uniform(0, np.pi))
                 + label * _arc(amplitude=rng.uniform(0.01, 0.04), start=rng.uniform(0, 2 * np.pi)) for label in labels]
        return _images(np.stack(light), count, seed=seed), labels

    train_images, train_labels = sample(40, 8)
    test_images, test_labels = sample(20, 9)
    train_features = tidal_baselines.residual_features(train_images)
    assert train_features.shape == (40, len(tidal_baselines.RESIDUAL_FEATURE_NAMES))
    model = tidal_baselines.fit_boosting_baseline(train_features, train_labels, seed=0)
    scores = model.predict_proba(tidal_baselines.residual_features(test_images))[:, 1]
    assert roc_auc_score(test_labels, scores) > 0.8
    again = tidal_baselines.fit_boosting_baseline(train_features, train_labels, seed=0)
    np.testing.assert_array_equal(again.predict_proba(tidal_baselines.residual_features(test_images))[:, 1], scores)
    with pytest.raises(ValueError, match="at least 2 labelled galaxies of each class"):
        tidal_baselines.fit_boosting_baseline(train_features[:3], [0, 0, 1], seed=0)
    # A feature undefined for every training galaxy (small images) is ignored, not a crash.
    undefined = train_features.copy()
    undefined[:, 0] = np.nan
    model = tidal_baselines.fit_boosting_baseline(undefined[:16], train_labels[:16], seed=0)
    assert np.isfinite(model.predict_proba(tidal_baselines.residual_features(test_images))[:, 1]).all()


def test_no_tensorflow_import():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(tidal_baselines.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"numpy", "scipy", "sklearn"}, imported
