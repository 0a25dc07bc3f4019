"""TFDS datasets of mock HSC Ultradeep galaxies for the tidal-feature detector.

Importing this module registers two builders (Desmons et al. 2023 trained on the same two
kinds of set, drawn from HSC-SSP PDR2):

* ``tidal_unlabelled``: galaxies for the self-supervised encoder, about 6% of them with tidal
  features that the set does not reveal. Features: ``image`` (128, 128, 5) float32 counts in
  g, r, i, z, y and ``id``. One split, ``train``.
* ``tidal_labelled``: balanced positives (with a tidal feature) and negatives for the linear
  classifier, split per class into ``train`` / ``validation`` / ``test`` (300 / 30 / 50 by
  default, as in the paper). Features: ``image``, ``id``, ``label`` (0 or 1), ``feature_type``
  (none, shell, stream, tail, plume) and ``feature_sb`` (intensity-weighted mean i-band
  surface brightness of the feature, mag/arcsec^2; NaN for negatives).

Each builder has these configs:

* ``default``: the paper's sizes, rendered with :func:`data.tidal.render_tidal_galaxy` from a
  fixed seed (about 15 GB of float32 images for ``tidal_unlabelled``);
* ``small``: a few thousand images for CPU runs;
* ``tiny``: a handful of images for tests;
* ``shards``: built from HDF5 shards written earlier in the tidal stacked layout
  (:func:`data.tidal.write_tidal_hdf5`, ``python -m data.generate tidal``), found in the
  manual directory (``*.h5`` / ``*.hdf5``, read in sorted order)::

      tfds.load("tidal_labelled/shards", data_dir=DATA_DIR, download_and_prepare_kwargs={
          "download_config": tfds.download.DownloadConfig(manual_dir=SHARD_DIR)})

Every rendered example has its own seed derived from the config's seed and the example's
index, so a dataset is the same whatever order TFDS generates it in.
"""

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds

import prep_data
import tidal_data
from data import tidal

logger = logging.getLogger(__name__)

#: Sub-streams of the seed, so that unlabelled, positive and negative examples never share draws.
UNLABELLED_STREAM, NEGATIVE_STREAM, POSITIVE_STREAM = 0, 1, 2
#: Label names of ``tidal_labelled`` (label 0 and 1).
LABEL_NAMES = ("no_tidal", "tidal")
_SHARD_PATTERNS = ("*.h5", "*.hdf5")
_IMAGE_SHAPE = (tidal.IMAGE_SIZE, tidal.IMAGE_SIZE, len(tidal.BANDS))

_MANUAL_INSTRUCTIONS = """\
Only the `shards` config reads files: put HDF5 shards in the tidal stacked layout (written by
`python -m data.generate tidal` or `data.tidal.write_tidal_hdf5`) in the manual directory.
The other configs render their images and need nothing.
"""


@dataclasses.dataclass
class TidalConfig(tfds.core.BuilderConfig):
    """Size and source of a tidal dataset."""

    # "render" draws fresh mocks from `seed`; "shards" reads HDF5 shards from the manual directory.
    source: str = "render"
    # Images of tidal_unlabelled (rendered source only).
    n_images: int = 45_000
    # Images per class in each split of tidal_labelled.
    n_train: int = 300
    n_validation: int = 30
    n_test: int = 50
    # Seed of the rendered images.
    seed: int = 2023


def _configs(unlabelled):
    """The default, small, tiny and shards configs of one builder."""
    if unlabelled:
        sizes = {name: f"{config.n_images:,} images" for name, config in _SIZES.items()}
    else:
        sizes = {
            name: f"{config.n_train}/{config.n_validation}/{config.n_test} images per class (train/validation/test)"
            for name, config in _SIZES.items()
        }
    purposes = {"default": "Paper-sized mock set", "small": "Small mock set for CPU runs", "tiny": "Tiny mock set for tests"}
    configs = [
        dataclasses.replace(config, description=f"{purposes[name]}: {sizes[name]}") for name, config in _SIZES.items()
    ]
    configs.append(TidalConfig(name="shards", description="Built from HDF5 shards in the manual directory", source="shards"))
    return configs


_SIZES = {
    "default": TidalConfig(name="default"),
    "small": TidalConfig(name="small", n_images=2_000, n_train=60, n_validation=10, n_test=20),
    "tiny": TidalConfig(name="tiny", n_images=16, n_train=4, n_validation=1, n_test=2),
}


def _validate(config):
    if config.source not in ("render", "shards"):
        raise ValueError(f"source must be 'render' or 'shards', got {config.source!r}")
    for name in ("n_images", "n_train", "n_validation", "n_test"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")


def _image_feature():
    return tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.float32)


def _shard_paths(directory):
    paths = sorted({path for pattern in _SHARD_PATTERNS for path in directory.glob(pattern)}, key=str)
    if not paths:
        raise ValueError(f"no HDF5 shards (*.h5, *.hdf5) found in the manual directory {directory}")
    return paths


def _open_shard(path):
    """Open a shard and check its layout; returns the open h5py file."""
    import h5py

    f = h5py.File(path, "r")
    image = f.get("image")
    if image is None or image.ndim != 4 or tuple(image.shape[1:]) != _IMAGE_SHAPE:
        shape = None if image is None else image.shape
        f.close()
        raise ValueError(f"{path}: image must be (N, {', '.join(map(str, _IMAGE_SHAPE))}), got {shape}")
    return f


def _row_id(f, path, row):
    return prep_data.decode_strings(f["id"][row])[0] if "id" in f else f"{path.stem}-{row}"


class TidalUnlabelled(tfds.core.GeneratorBasedBuilder):
    """Unlabelled mock HSC Ultradeep galaxies (g, r, i, z, y) for self-supervised training."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: mock HSC Ultradeep galaxies."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = _configs(unlabelled=True)
    DEFAULT_CONFIG_NAME = "default"

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({"image": _image_feature(), "id": tfds.features.Text()}),
            homepage="https://arxiv.org/abs/2308.07962",
        )

    def _split_generators(self, dl_manager):
        _validate(self.builder_config)
        if self.builder_config.source == "shards":
            return {"train": self._generate_examples(paths=_shard_paths(dl_manager.manual_dir))}
        return {"train": self._generate_examples()}

    def _generate_examples(self, paths=None):
        """Rendered examples, or with ``paths`` the rows of those HDF5 shards."""
        if paths is not None:
            yield from self._generate_from_shards(paths)
            return
        config = self.builder_config
        for index in range(config.n_images):
            image, _ = tidal.render_tidal_galaxy(np.random.default_rng([config.seed, UNLABELLED_STREAM, index]))
            identifier = f"unlabelled-{index:06d}"
            yield identifier, {"image": image, "id": identifier}

    def _generate_from_shards(self, paths):
        for path in paths:
            f = _open_shard(path)
            with f:
                for row in range(f["image"].shape[0]):
                    identifier = _row_id(f, path, row)
                    yield f"{path.name}:{row}", {"image": f["image"][row].astype(np.float32), "id": identifier}


def _split_sizes(config, available, label):
    """Per-split sizes for one class, scaled down (with a warning) when the shards hold too few."""
    wanted = {"train": config.n_train, "validation": config.n_validation, "test": config.n_test}
    total = sum(wanted.values())
    if available >= total:
        return wanted
    logger.warning(
        "the shards hold %d %s examples, fewer than the %d requested; splits scaled down",
        available,
        LABEL_NAMES[label],
        total,
    )
    sizes = {split: int(np.floor(size * available / total)) for split, size in wanted.items()}
    sizes["train"] += available - sum(sizes.values())
    return sizes


class TidalLabelled(tfds.core.GeneratorBasedBuilder):
    """Mock HSC Ultradeep galaxies with (label 1) and without (label 0) tidal features."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: mock HSC Ultradeep galaxies."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = _configs(unlabelled=False)
    DEFAULT_CONFIG_NAME = "default"

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": _image_feature(),
                    "id": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                    "feature_type": tfds.features.Text(),
                    "feature_sb": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://arxiv.org/abs/2308.07962",
        )

    def _split_generators(self, dl_manager):
        _validate(self.builder_config)
        if self.builder_config.source == "shards":
            return self._shard_splits(_shard_paths(dl_manager.manual_dir))
        config = self.builder_config
        splits = {}
        start = 0
        for split, size in (("train", config.n_train), ("validation", config.n_validation), ("test", config.n_test)):
            splits[split] = self._generate_examples(indices=range(start, start + size))
            start += size
        return splits

    def _generate_examples(self, indices=None, refs=None):
        """Rendered negatives and positives of these indices, or with ``refs`` the (path, row) shard rows."""
        if refs is not None:
            yield from self._generate_from_shards(refs)
            return
        config = self.builder_config
        for label, stream in ((0, NEGATIVE_STREAM), (1, POSITIVE_STREAM)):
            for index in indices:
                rng = np.random.default_rng([config.seed, stream, index])
                image, truth = tidal.render_tidal_galaxy(rng, has_tidal=bool(label))
                identifier = f"{LABEL_NAMES[label]}-{index:05d}"
                yield identifier, _labelled_example(image, truth, identifier)

    def _shard_splits(self, paths):
        rows = {0: [], 1: []}
        for path in paths:
            f = _open_shard(path)
            with f:
                if "has_tidal" not in f:
                    raise ValueError(f"{path}: the tidal_labelled shards need a has_tidal column")
                for row, value in enumerate(np.asarray(f["has_tidal"])):
                    rows[int(value != 0)].append((path, row))
        splits = {"train": [], "validation": [], "test": []}
        for label, refs in rows.items():
            start = 0
            for split, size in _split_sizes(self.builder_config, len(refs), label).items():
                splits[split].extend(refs[start : start + size])
                start += size
        return {split: self._generate_examples(refs=refs) for split, refs in splits.items()}

    def _generate_from_shards(self, refs):
        import h5py

        for path, row in refs:
            with h5py.File(path, "r") as f:
                truth = {
                    "has_tidal": int(f["has_tidal"][row]),
                    "feature_type": prep_data.decode_strings(f["feature_type"][row])[0] if "feature_type" in f else "unknown",
                    "feature_sb": float(f["feature_sb"][row]) if "feature_sb" in f else float("nan"),
                }
                identifier = _row_id(f, path, row)
                image = f["image"][row].astype(np.float32)
            yield f"{path.name}:{row}", _labelled_example(image, truth, identifier)


def _labelled_example(image, truth, identifier):
    return {
        "image": image,
        "id": identifier,
        "label": int(truth["has_tidal"]),
        "feature_type": truth["feature_type"],
        "feature_sb": np.float32(truth["feature_sb"]),
    }


# ----------------------------------------------------------------------------------------
# Reading the builders for the NNCLR scripts


def _load_tfds(name, data_dir, split="all"):
    return tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)


def tidal_source_from_tfds(unlabelled_name="tidal_unlabelled", labelled_name="tidal_labelled", data_dir=None):
    """A :class:`tidal_data.TidalSource` over the TFDS builders of this module.

    The labelled builder (small by design) is read into memory, and its train / validation /
    test splits are the classifier sets; its tidal galaxies join the unlabelled stream, as in
    Desmons et al. 2023. Builder configs go in the names (``"tidal_unlabelled/small"``).
    """
    labelled, splits = [], {}
    for name in tidal_data.TIDAL_SPLITS:
        elements = list(_load_tfds(labelled_name, data_dir, split=name).as_numpy_iterator())
        splits[name] = np.arange(len(labelled), len(labelled) + len(elements))
        labelled.extend(elements)
    if not labelled:
        raise prep_data.CutoutError(f"TFDS dataset {labelled_name} is empty")
    images = np.stack([element["image"] for element in labelled]).astype(np.float32)
    labels = np.asarray([int(element["label"]) for element in labelled])
    ids = np.asarray(prep_data.decode_strings([element["id"] for element in labelled]))
    tidal_data.check_tidal_shape(images.shape, name=f"{labelled_name} images")

    def unlabelled():
        import tensorflow as tf

        stream = _load_tfds(unlabelled_name, data_dir).map(lambda element: tf.cast(element["image"], tf.float32))
        return stream.concatenate(tf.data.Dataset.from_tensor_slices(images[labels == 1]))

    return tidal_data.TidalSource(
        description=f"tfds {unlabelled_name} + {labelled_name} ({data_dir or 'default data_dir'})",
        ids=ids,
        labels=labels,
        image_shape=images.shape[1:],
        read_labelled=lambda indices: images[np.asarray(indices, dtype=np.int64)],
        unlabelled=unlabelled,
        splits=splits,
    )
