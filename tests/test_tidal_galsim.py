"""Tests of the GalSim renderer of host-matched tidal pairs (data.tidal_galsim)."""

import json

import h5py
import numpy as np
import pytest

from data import tidal_galsim

COLUMNS = ("has_tidal", "feature_type", "feature_sb", "pair_id", "visible", "feature_snr", "feature_contrast",
           "feature_light_fraction", "params")


@pytest.fixture(scope="module", params=tidal_galsim.FEATURE_TYPES)
def pair(request):
    """One pair of each kind, with its noiseless parts."""
    seed = tidal_galsim.FEATURE_TYPES.index(request.param)
    return tidal_galsim.render_pair(np.random.default_rng(seed), feature_type=request.param, components=True)


def test_twins_differ_by_the_noiseless_feature_alone(pair):
    image_with, image_without, truth, parts = pair
    for image in (image_with, image_without):
        assert image.shape == (128, 128, 5) and image.dtype == np.float32
    # float32 rounding of the brightest pixel bounds the difference; the sky noise is far above it.
    tolerance = 8 * np.spacing(np.float32(np.abs(image_with).max()))
    np.testing.assert_allclose(image_with - image_without, parts["feature"], rtol=0, atol=tolerance)
    # The same noise array in both twins.
    np.testing.assert_allclose(image_without - parts["rest"], parts["noise"], rtol=0, atol=tolerance)
    assert parts["feature"][..., 2].sum() > 0


def test_feature_light_is_one_to_five_percent_of_the_host(pair):
    _, _, truth, parts = pair
    measured = parts["feature"][..., 2].sum() / parts["host"][..., 2].sum()
    assert 0.01 * 0.99 <= measured <= 0.05 * 1.01
    assert truth["feature_light_fraction"] == pytest.approx(measured)
    assert 0.01 <= truth["params"]["feature"]["light_fraction_drawn"] <= 0.05


def test_feature_lies_about_the_host(pair):
    _, _, truth, parts = pair
    feature = parts["feature"][..., 2]
    rows, columns = np.indices(feature.shape)
    radius = np.hypot(rows - 63.5, columns - 63.5) * tidal_galsim.PIXEL_SCALE
    assert feature[radius > 11.0].sum() < 0.05 * feature.sum()
    # The host is centred on the cutout.
    host = parts["host"][..., 2]
    assert np.sum(host * columns) / host.sum() == pytest.approx(63.5, abs=0.05)
    assert np.sum(host * rows) / host.sum() == pytest.approx(63.5, abs=0.05)


def test_truth_is_json_ready_and_consistent(pair):
    _, _, truth, parts = pair
    assert json.loads(json.dumps(truth)) == truth
    assert truth["feature_type"] in tidal_galsim.FEATURE_TYPES
    expected_sb = tidal_galsim.intensity_weighted_sb(parts["feature"][..., 2])
    assert truth["feature_sb"] == pytest.approx(expected_sb)
    assert 20.0 < truth["feature_sb"] < 31.0
    for key in ("feature_snr", "feature_contrast"):
        assert np.isfinite(truth[key]) and truth[key] >= 0
    assert truth["visible"] in (0, 1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.h5"
    tidal_galsim.write_pairs(path, 3, seed=5, progress=False)
    return path


def test_written_file_holds_the_twins_in_the_tidal_layout(written):
    with h5py.File(written, "r") as f:
        assert f.attrs["bands"] == "grizy"
        assert f["image"].shape == (6, 128, 128, 5) and f["image"].dtype == np.float32
        for key in COLUMNS:
            assert key in f and len(f[key]) == 6, key
        text = {key: [v.decode() if isinstance(v, bytes) else str(v) for v in f[key][:]]
                for key in ("id", "pair_id", "feature_type", "params")}
        has_tidal = f["has_tidal"][:]
        assert has_tidal.dtype == np.int64
        numbers = {key: f[key][:] for key in ("feature_sb", "visible", "feature_snr", "feature_contrast",
                                               "feature_light_fraction")}
        first_pair = f["image"][:2]
    assert text["id"] == [f"galsim-s5-{i:07d}-{twin}" for i in range(3) for twin in ("with", "without")]
    for index in range(3):
        rows = [row for row, value in enumerate(text["pair_id"]) if value == f"galsim-s5-{index:07d}"]
        assert rows == [2 * index, 2 * index + 1]
        assert list(has_tidal[rows]) == [1, 0]
        assert text["params"][rows[0]] == text["params"][rows[1]]
    with_rows, without_rows = has_tidal == 1, has_tidal == 0
    assert set(np.asarray(text["feature_type"])[with_rows]) <= set(tidal_galsim.FEATURE_TYPES)
    assert set(np.asarray(text["feature_type"])[without_rows]) == {"none"}
    for key in ("feature_sb", "feature_snr", "feature_contrast", "feature_light_fraction"):
        assert np.all(np.isfinite(numbers[key][with_rows])), key
        assert np.all(np.isnan(numbers[key][without_rows])), key
    assert set(numbers["visible"][with_rows]) <= {0, 1} and not numbers["visible"][without_rows].any()
    # Pair 0 draws from SeedSequence([5, 0]): the file can be reproduced pair by pair.
    image_with, image_without, _ = tidal_galsim.render_pair(np.random.default_rng(np.random.SeedSequence([5, 0])))
    np.testing.assert_array_equal(first_pair[0], image_with)
    np.testing.assert_array_equal(first_pair[1], image_without)


def _run(argv):
    try:
        return tidal_galsim.main(argv)
    except SystemExit as stop:
        return stop.code


def test_command_line_refuses_an_unwritable_output_in_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    target = tmp_path / "a_file" / "out.h5"
    assert _run(["--n", "2", "--out", str(target)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: --out {target.parent}"), error
    assert "Traceback" not in "".join(error)


def test_command_line_refuses_no_pairs_in_one_line(tmp_path, capsys):
    assert _run(["--n", "0", "--out", str(tmp_path / "out.h5")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --n must be at least 1, got 0"]
    assert not (tmp_path / "out.h5").exists()


def test_command_line_writes_the_file_and_its_preview(tmp_path):
    out, preview = tmp_path / "pairs.h5", tmp_path / "preview.png"
    assert _run(["--n", "1", "--seed", "2", "--out", str(out), "--preview", str(preview), "--quiet"]) == 0
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (2, 128, 128, 5)
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
