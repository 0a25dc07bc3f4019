"""Tests of the TFDS builders tidal_unlabelled and tidal_labelled (data.tidal_datasets)."""

import logging
import shutil
import tempfile

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import tidal, tidal_datasets

#: Shard contents of the tests: positives and negatives, in two files.
SHARD_FLAGS = ([True, False, True, False, False, True, True, False, True, False], [True, False, True, False, True, False])


def write_test_shards(directory, seed=0):
    """Two small shards in the tidal layout; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number, flags in enumerate(SHARD_FLAGS):
        rendered = [tidal.render_tidal_galaxy(rng, has_tidal=flag) for flag in flags]
        tidal.write_tidal_hdf5(
            directory / f"tidal-{number:03d}.h5",
            [image for image, _ in rendered],
            [truth for _, truth in rendered],
            [f"mock-{number}-{row}" for row in range(len(flags))],
        )
    return directory


class _ShardsMixin:
    """Builder tests whose manual directory holds freshly written shards (mixed into the TFDS test case)."""

    SKIP_TF1_GRAPH_MODE = True
    SKIP_CHECKSUMS = True

    @classmethod
    def setUpClass(cls):
        cls._shard_directory = tempfile.mkdtemp(prefix="tidal-shards-")
        cls.EXAMPLE_DIR = str(write_test_shards(tfds.core.Path(cls._shard_directory)))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._shard_directory, ignore_errors=True)


class TidalUnlabelledTest(_ShardsMixin, tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tidal_datasets.TidalUnlabelled
    # The tiny config renders 16 images and the test shards hold 16 rows.
    BUILDER_CONFIG_NAMES_TO_TEST = ["tiny", "shards"]
    SPLITS = {"train": 16}


class TidalLabelledTest(_ShardsMixin, tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tidal_datasets.TidalLabelled
    BUILDER_CONFIG_NAMES_TO_TEST = [
        "tiny",
        tidal_datasets.TidalConfig(name="shards_4_1_2", source="shards", n_train=4, n_validation=1, n_test=2),
    ]
    SPLITS = {"train": 8, "validation": 2, "test": 4}


@pytest.fixture(scope="module")
def tiny_labelled(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return tfds.load("tidal_labelled/tiny", data_dir=str(data_dir))


def test_rendered_unlabelled_images_follow_the_documented_seeds(tmp_path):
    dataset = tfds.load("tidal_unlabelled/tiny", data_dir=str(tmp_path), split="train")
    examples = {element["id"].numpy().decode(): element["image"].numpy() for element in dataset}
    assert len(examples) == 16
    config = tidal_datasets.TidalUnlabelled.builder_configs["tiny"]
    expected, _ = tidal.render_tidal_galaxy(
        np.random.default_rng([config.seed, tidal_datasets.UNLABELLED_STREAM, 3])
    )
    np.testing.assert_array_equal(examples["unlabelled-000003"], expected)


def test_labelled_splits_are_balanced_and_consistent(tiny_labelled):
    sizes = {"train": 4, "validation": 1, "test": 2}
    seen = set()
    for split, per_class in sizes.items():
        elements = list(tiny_labelled[split])
        labels = [int(element["label"]) for element in elements]
        assert labels.count(0) == labels.count(1) == per_class
        for element in elements:
            assert element["image"].shape == (128, 128, 5)
            assert element["image"].dtype == np.float32
            feature_type = element["feature_type"].numpy().decode()
            if int(element["label"]) == 1:
                assert feature_type in tidal.FEATURE_TYPES
                assert 20.0 < float(element["feature_sb"]) < 30.0
            else:
                assert feature_type == "none"
                assert np.isnan(float(element["feature_sb"]))
            seen.add(element["id"].numpy().decode())
    assert len(seen) == 2 * sum(sizes.values())


def _prepare(name, config, data_dir, manual_dir):
    builder = tfds.builder(name, config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def test_labelled_shards_with_too_few_examples_scale_the_splits_down(tmp_path, caplog):
    shard_directory = write_test_shards(tmp_path / "shards")
    config = tidal_datasets.TidalConfig(name="shards_big", source="shards", n_train=8, n_validation=2, n_test=4)
    with caplog.at_level(logging.WARNING, logger="data.tidal_datasets"):
        builder = _prepare("tidal_labelled", config, tmp_path / "tfds", shard_directory)
    assert "the shards hold 8 tidal examples, fewer than the 14 requested; splits scaled down" in caplog.text
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert counts == {"train": 10, "validation": 2, "test": 4}
    train = tfds.as_numpy(builder.as_dataset(split="train"))
    with h5py.File(shard_directory / "tidal-000.h5", "r") as f:
        first_image = f["image"][0]
    first = [element for element in train if element["id"] == b"mock-0-0"]
    np.testing.assert_array_equal(first[0]["image"], first_image)


def test_shards_config_without_shards_says_so(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no shards here")
    with pytest.raises(ValueError, match=r"no HDF5 shards \(\*.h5, \*.hdf5\) found in the manual directory"):
        _prepare("tidal_unlabelled", "shards", tmp_path / "tfds", tmp_path / "notes")


def test_shards_with_the_wrong_image_shape_are_refused(tmp_path):
    (tmp_path / "bad").mkdir()
    with h5py.File(tmp_path / "bad" / "cutouts.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((2, 224, 224), np.float32))
    with pytest.raises(ValueError, match=r"cutouts.h5: image must be \(N, 128, 128, 5\), got \(2, 224, 224\)"):
        _prepare("tidal_unlabelled", "shards", tmp_path / "tfds", tmp_path / "bad")


def test_configs_are_validated(tmp_path):
    config = tidal_datasets.TidalConfig(name="bad_source", source="survey")
    with pytest.raises(ValueError, match="source must be 'render' or 'shards', got 'survey'"):
        _prepare("tidal_unlabelled", config, tmp_path / "tfds", tmp_path)


def test_default_configs_have_the_paper_sizes():
    unlabelled = tidal_datasets.TidalUnlabelled.builder_configs["default"]
    labelled = tidal_datasets.TidalLabelled.builder_configs["default"]
    assert unlabelled.n_images == 45_000
    assert (labelled.n_train, labelled.n_validation, labelled.n_test) == (300, 30, 50)
