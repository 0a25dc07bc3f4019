"""TFDS builders of the ICL datasets: ``icl_artificial`` (training) and ``icl_real_like`` (fine-tuning).

Importing this module registers both builders; load them as the original code did::

    import data.icl_datasets  # registers the builders
    dataset = tfds.load("icl_artificial/small_true", data_dir=..., split="train")

Every element holds ``image`` (224, 224, 1) float32, the prepared model input of
``prep_data.prepare_image`` (clip to [0, 10] counts, arcsinh(x / 0.017359), masked pixels 0),
``label`` float32 (the ICL fraction), ``id`` text and ``z`` float32. All examples are in the
``train`` split; take a validation part with TFDS slicing (``split="train[90%:]"``).

Configs choose the size and the label source:

* ``sb`` (default): ``f_icl_sb``, the surface-brightness method measured on the noisy image by
  ``measure_sb_cut.measure_icl_fraction_canepa2025`` (the paper's labels, the original code's method);
* ``ideal``: ``f_icl_sb_ideal``, the SB threshold applied to the noiseless cluster;
* ``true``: ``f_icl_true``, the physical ICL fraction;
* ``small_sb``, ``small_ideal``, ``small_true``: the same on a few cutouts, for tests and CPU runs.

``icl_artificial`` follows the paper's 50,000 images with the training distribution of
:mod:`data.clusters`; ``icl_real_like`` has 150 clusters drawn from
``REAL_LIKE_DISTRIBUTION`` (another cosmology, worse seeing, deeper noise, richer clusters,
non-exponential ICL), so that fine-tuning on it has a domain shift to correct.

Where the data come from
------------------------
HDF5 shards generated earlier by ``python -m data.generate clusters ...`` (any number of
``*.h5`` files in the stacked layout) are read from the manual directory
(``tfds.download.DownloadConfig(manual_dir=...)``), and then the set holds whatever those
files hold. Without them, the builder runs the generator itself (all CPU cores) into its
download directory. When a shard lacks ``f_icl_sb`` and the config asks for it, the label is
measured while the examples are written.
"""

import dataclasses
import glob
import json
import logging
import os

import h5py
import numpy as np
import tensorflow_datasets as tfds

import hsc
import prep_data

logger = logging.getLogger(__name__)

#: Config name suffix -> column holding the label.
LABEL_COLUMNS = {"sb": "f_icl_sb", "ideal": "f_icl_sb_ideal", "ideal_scene": "f_icl_sb_ideal_scene", "true": "f_icl_true"}
#: Cutouts of the small configs.
SMALL_SIZE = 8

_MANUAL_INSTRUCTIONS = """\
Optional. Put HDF5 shards made by `python -m data.generate clusters --out-dir DIR ...` (or the
one file of `--out FILE.h5`) in the manual directory to build from them; without them the builder
generates the cutouts itself.
"""


@dataclasses.dataclass(eq=False)
class IclConfig(tfds.core.BuilderConfig):
    """Size, label source and generation settings of one ICL dataset config."""

    size: int = 50000  # cutouts generated when no shards are given
    label_column: str = "f_icl_sb"  # column used as the label
    seed: int = 0  # generator seed
    distribution: str = "training"  # data.clusters parameter distribution ("training" or "real-like")


def _configs(full_size, distribution, seed):
    configs = []
    for prefix, size in (("", full_size), ("small_", SMALL_SIZE)):
        for suffix, column in LABEL_COLUMNS.items():
            configs.append(
                IclConfig(
                    name=f"{prefix}{suffix}",
                    description=f"{size} cutouts, label {column}",
                    size=size,
                    label_column=column,
                    seed=seed,
                    distribution=distribution,
                )
            )
    return configs


def find_shards(folder):
    """Sorted ``*.h5`` / ``*.hdf5`` files under ``folder`` (recursively)."""
    found = []
    for suffix in prep_data.HDF5_SUFFIXES:
        found.extend(glob.glob(os.path.join(str(folder), "**", f"*{suffix}"), recursive=True))
    return sorted(found)


def read_shard_examples(paths, label_column):
    """Yield (key, example) for every cutout of the shards, preparing images as the model reads them.

    Raises
    ------
    ValueError
        If a file is not in the stacked ICL layout or lacks the label column (``f_icl_sb`` is
        measured instead when missing).
    """
    flagged = hsc.mask_value(hsc.DEFAULT_MASK_BITS)
    for path in paths:
        with h5py.File(path, "r") as f:
            if "image" not in f or f["image"].ndim != 3:
                raise ValueError(f"{path}: not a stacked ICL cutout file (needs image (N, H, W))")
            bits = hsc.DEFAULT_MASK_BITS
            if "mask_bits" in f.attrs:
                bits = json.loads(f.attrs["mask_bits"])
                flagged = hsc.mask_value(bits)
            measure = label_column not in f
            if measure and label_column != "f_icl_sb":
                raise ValueError(f"{path}: has no column '{label_column}'")
            count = f["image"].shape[0]
            ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["id"][()]]
            redshifts = f["z"][()]
            labels = None if measure else f[label_column][()]
            for row in range(count):
                image = np.asarray(f["image"][row], dtype=np.float32)
                mask = np.asarray(f["mask"][row]) if "mask" in f else np.zeros(image.shape, np.int32)
                if measure:
                    from data.shards import measure_sb_label

                    label = measure_sb_label(image, mask, float(redshifts[row]))
                else:
                    label = float(labels[row])
                bad = (mask.astype(np.int64) & flagged) != 0
                yield ids[row], {
                    "image": prep_data.prepare_image(image, bad),
                    "label": np.float32(label),
                    "id": ids[row],
                    "z": np.float32(redshifts[row]),
                }


class _IclBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared machinery of the two ICL builders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Mock HSC clusters from data.clusters."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

    def _info(self):
        size = hsc.ICL_IMAGE_SIZE
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.float32),
                    "label": tfds.features.Scalar(dtype=np.float32),
                    "id": tfds.features.Text(),
                    "z": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://arxiv.org/abs/2501.08378",
        )

    def _split_generators(self, dl_manager):
        try:
            paths = find_shards(dl_manager.manual_dir)
        except (AssertionError, ValueError):
            paths = []
        if not paths:
            from data import shards

            config = self.builder_config
            folder = os.path.join(str(dl_manager.download_dir), f"{self.name}-{config.name}-shards")
            measure = config.label_column == "f_icl_sb"
            paths = shards.generate_shards("clusters", config.size, config.seed, folder, workers=os.cpu_count() or 1,
                                           distribution=config.distribution, measure_sb=measure)
        return {"train": self._generate_examples(paths)}

    def _generate_examples(self, paths):
        yield from read_shard_examples(paths, self.builder_config.label_column)


class IclArtificial(_IclBuilder):
    """Artificial ICL training set: 50,000 mock clusters (Canepa et al. 2025 trained on 50,000 images)."""

    BUILDER_CONFIGS = _configs(50000, "training", seed=0)


class IclRealLike(_IclBuilder):
    """150 "real-like" clusters from a different parameter distribution, for fine-tuning and its cross-validation."""

    BUILDER_CONFIGS = _configs(150, "real-like", seed=1)
