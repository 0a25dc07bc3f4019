"""TFDS builders icl_artificial and icl_real_like, built from shards generated earlier."""

import sys
import tempfile
import types

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

import prep_data
from data import clusters, icl_datasets, shards

SHARD_COUNT = 3


def _make_shards(folder):
    shards.generate_shards("clusters", SHARD_COUNT, 9, folder, workers=1, shard_size=2, progress=False)
    return folder


class IclArtificialTest(tfds.testing.DatasetBuilderTestCase):
    """The standard TFDS builder checks on three generated clusters given as the manual directory."""

    DATASET_CLASS = icl_datasets.IclArtificial
    BUILDER_CONFIG_NAMES_TO_TEST = ["small_true"]
    SPLITS = {"train": SHARD_COUNT}
    SKIP_CHECKSUMS = True
    # The builder lists shards with glob and os.path (local files written by data.generate).
    MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = False

    @classmethod
    def setUpClass(cls):
        cls._shard_folder = tempfile.TemporaryDirectory()
        cls.EXAMPLE_DIR = str(_make_shards(cls._shard_folder.name + "/shards"))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls._shard_folder.cleanup()


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    return _make_shards(tmp_path_factory.mktemp("icl") / "shards")


@pytest.mark.parametrize("column", ["f_icl_true", "f_icl_sb_ideal"])
def test_label_source_is_selectable(shard_folder, column):
    paths = icl_datasets.find_shards(shard_folder)
    examples = dict(icl_datasets.read_shard_examples(paths, column))
    assert len(examples) == SHARD_COUNT
    for path in paths:
        with h5py.File(path, "r") as f:
            for row, key in enumerate(f["id"][()]):
                example = examples[key.decode()]
                assert example["label"] == pytest.approx(f[column][row])
                assert example["z"] == pytest.approx(f["z"][row])
                image = f["image"][row].astype(np.float32)
                bad = (f["mask"][row] & 0b1100000001) != 0
                np.testing.assert_array_equal(example["image"], prep_data.prepare_image(image, bad))


def test_missing_sb_label_is_measured_with_measure_sb_cut(shard_folder, monkeypatch):
    module = types.ModuleType("measure_sb_cut")
    module.measure_icl_fraction_canepa2025 = lambda image, z, mask=None, mask_bits=None, **options: types.SimpleNamespace(
        f_icl=float(image.mean()) + z
    )
    monkeypatch.setitem(sys.modules, "measure_sb_cut", module)
    paths = icl_datasets.find_shards(shard_folder)
    examples = dict(icl_datasets.read_shard_examples(paths, "f_icl_sb"))
    with h5py.File(paths[0], "r") as f:
        first = f["id"][0].decode()
        expected = float(f["image"][0].astype(np.float32).mean()) + float(f["z"][0])
    assert examples[first]["label"] == pytest.approx(expected, rel=1e-5)


def test_missing_other_label_is_an_error(shard_folder):
    with pytest.raises(ValueError, match="has no column 'f_icl_missing'"):
        next(icl_datasets.read_shard_examples(icl_datasets.find_shards(shard_folder), "f_icl_missing"))


def test_load_from_manual_shards(shard_folder, tmp_path):
    dataset = tfds.load(
        "icl_real_like/small_ideal",
        data_dir=str(tmp_path),
        split="train",
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir=str(shard_folder))},
    )
    elements = list(dataset.as_numpy_iterator())
    assert len(elements) == SHARD_COUNT
    assert elements[0]["image"].shape == (224, 224, 1) and elements[0]["image"].dtype == np.float32
    assert all(0.0 <= e["label"] <= 1.0 for e in elements)


def test_default_sizes_and_the_real_like_domain_shift():
    artificial = {c.name: c for c in icl_datasets.IclArtificial.BUILDER_CONFIGS}
    real_like = {c.name: c for c in icl_datasets.IclRealLike.BUILDER_CONFIGS}
    assert icl_datasets.IclArtificial.BUILDER_CONFIGS[0].name == "sb"
    assert artificial["sb"].size == 50000 and artificial["sb"].label_column == "f_icl_sb"
    assert 100 <= real_like["sb"].size <= 200
    assert artificial["small_true"].size == real_like["small_true"].size == icl_datasets.SMALL_SIZE
    assert real_like["sb"].distribution == "real-like" and artificial["sb"].distribution == "training"
    training, shifted = clusters.TRAINING_DISTRIBUTION, clusters.REAL_LIKE_DISTRIBUTION
    assert shifted.psf_fwhm_arcsec[0] > training.psf_fwhm_arcsec[0]
    assert shifted.icl_sersic_n_range != training.icl_sersic_n_range


def test_builder_generates_its_own_cutouts_without_shards(tmp_path):
    builder = tfds.builder("icl_artificial/small_true", data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    elements = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert len(elements) == icl_datasets.SMALL_SIZE
    assert sorted(e["id"].decode() for e in elements) == [f"clusters-s0-{i:07d}" for i in range(icl_datasets.SMALL_SIZE)]
    assert all(0.02 <= e["label"] <= 0.45 for e in elements)  # f_icl_true of the training distribution
