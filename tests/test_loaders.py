"""The loaders (keras.utils.PyDataset) give the batches of the tf.data pipelines they stand for."""

import pickle
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from synthetic import write_cluster_hdf5, write_fits_cutout

import common
import data.files
import loaders
import nnclr_model
import prep_data
import tidal_data

SIZE = 32


@pytest.fixture(scope="module")
def cutouts(tmp_path_factory):
    """Ten cutouts of every kind, two of them bad: an HDF5 shard, FITS, prepared .npy."""
    folder = tmp_path_factory.mktemp("cutouts")
    labels = list(write_cluster_hdf5(folder / "a.h5", 5, size=40, seed=1))
    write_fits_cutout(folder / "b.fits", (50, 40), seed=2, nan_strip=True)
    (folder / "c.fits").write_text("garbage")
    prepared = np.stack([prep_data.prepare_image(np.random.default_rng(i).uniform(0, 1, (40, 40)), size=SIZE)[..., 0]
                         for i in range(2)])
    np.save(folder / "d.npy", prepared)
    np.save(folder / "e.npy", np.zeros((1, 5, 5), np.float32))  # not of the input size
    refs, errors = prep_data.index_cutouts([folder])
    assert not errors and [ref.source.rpartition("/")[2] for ref in refs] == [
        "a.h5:0", "a.h5:1", "a.h5:2", "a.h5:3", "a.h5:4", "b.fits", "c.fits", "d.npy:0", "d.npy:1", "e.npy:0"]
    return refs, np.asarray(labels + [0.1, 0.2, 0.3, 0.4, 0.5], np.float32)


def _tf_batches(dataset):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset]


def _strict_line(dataset):
    """The one line a command prints for the first bad cutout of a strict tf.data stream."""
    with pytest.raises(tf.errors.OpError) as raised:
        list(dataset)
    return common.tensorflow_error_line(raised.value)


# ----------------------------------------------------------------------------------------
# ICL cutouts


@pytest.mark.parametrize("workers", [1, 3])
def test_cutout_loader_gives_the_batches_of_cutout_dataset(cutouts, workers):
    refs, labels = cutouts
    expected = _tf_batches(prep_data.cutout_dataset(refs, 4, SIZE, labels))
    loader = loaders.CutoutLoader(refs, 4, SIZE, labels, workers=workers, max_queue_size=2)
    batches = list(loaders.iterate(loader))
    assert len(loader) == loader.num_batches == len(expected) == 3
    assert [len(batch["index"]) for batch in batches] == [4, 4, 2]  # the last partial batch is kept
    for mine, theirs in zip(batches, expected):
        np.testing.assert_array_equal(mine["image"], theirs["image"])
        assert mine["image"].dtype == np.float32 and mine["index"].dtype == np.int64
        np.testing.assert_array_equal(mine["index"], theirs["index"])
        np.testing.assert_array_equal(mine["label"], theirs["label"])
        assert list(mine["error"]) == [message.decode() for message in theirs["error"]]
    messages = [message for batch in batches for message in batch["error"]]
    assert [bool(message) for message in messages] == [False] * 6 + [True] + [False] * 2 + [True]
    assert "c.fits: cannot read FITS file" in messages[6] and "e.npy:0: prepared image must be 32x32" in messages[9]


def test_labelled_loader_gives_the_training_stream(cutouts):
    refs, labels = cutouts
    good = [refs[i] for i in (0, 1, 2, 3, 4, 5, 7, 8)]
    good_labels = labels[[0, 1, 2, 3, 4, 5, 7, 8]]
    expected = prep_data.cutout_dataset(good, 3, SIZE, good_labels, strict=True).map(lambda e: (e["image"], e["label"]))
    loader = loaders.LabelledCutoutLoader(good, good_labels, 3, SIZE)
    assert len(loader) == 3
    for (images, batch_labels), (tf_images, tf_labels) in zip(loader, expected):
        np.testing.assert_array_equal(images, tf_images.numpy())
        np.testing.assert_array_equal(batch_labels, tf_labels.numpy())


@pytest.mark.parametrize("bad", ["c.fits", "no_data.h5"])
def test_a_bad_cutout_stops_a_strict_loader_with_the_line_of_tf_data(cutouts, bad, tmp_path):
    refs, _ = cutouts
    if bad == "no_data.h5":
        image = np.random.default_rng(0).uniform(0.1, 1, (2, 48, 48)).astype(np.float32)
        image[1, :, :40] = np.nan
        data.files.write_stacked_hdf5(tmp_path / bad, image, ids=["x", "y"], columns={"f_icl_sb": [0.1, 0.2]})
        bad_refs, _ = prep_data.index_cutouts([tmp_path / bad])
    else:
        bad_refs = [ref for ref in refs if ref.source.endswith(bad)]
    stream = [refs[0], *bad_refs, refs[1]]
    line = _strict_line(prep_data.cutout_dataset(stream, 2, SIZE, strict=True))
    with pytest.raises(prep_data.CutoutError) as raised:
        list(loaders.LabelledCutoutLoader(stream, np.full(len(stream), 0.1), 2, SIZE))
    assert str(raised.value) == line and "\n" not in line
    expected = "c.fits: cannot read FITS file" if bad == "c.fits" else "no_data.h5:1: 83% of the (padded) image is masked"
    assert expected in line


def test_shuffled_loader_reshuffles_every_epoch_reproducibly(cutouts):
    refs, labels = cutouts

    def epochs(loader, count):
        orders = []
        for _ in range(count):
            orders.append(np.concatenate([loader[i]["index"] for i in range(len(loader))]))
            loader.on_epoch_end()
        return orders

    first = epochs(loaders.CutoutLoader(refs, 4, SIZE, labels, shuffle_seed=5), 3)
    for order in first:
        assert sorted(order) == list(range(len(refs)))  # every cutout once an epoch
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    again = epochs(loaders.CutoutLoader(refs, 4, SIZE, labels, shuffle_seed=5), 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = epochs(loaders.CutoutLoader(refs, 4, SIZE, labels, shuffle_seed=6), 1)
    assert not np.array_equal(first[0], other[0])
    # Labels travel with their cutouts.
    loader = loaders.CutoutLoader(refs, 4, SIZE, labels, shuffle_seed=5)
    batch = loader[0]
    np.testing.assert_array_equal(batch["label"], labels[batch["index"]])


def test_fit_reads_a_loader_in_threads_and_moves_its_epochs(cutouts):
    refs, labels = cutouts
    good = [refs[i] for i in (0, 1, 2, 3, 4, 5, 7, 8)]
    loader = loaders.LabelledCutoutLoader(good, labels[:8], 3, SIZE, shuffle_seed=1, workers=2)
    regressor = keras.Sequential([keras.Input((SIZE, SIZE, 1)), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(1)])
    regressor.compile(optimizer="sgd", loss="mse")
    history = regressor.fit(loader, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert loader.epoch >= 2


def test_loaders_pickle_for_worker_processes(cutouts, tmp_path):
    refs, labels = cutouts
    cutout_loader = loaders.CutoutLoader(refs, 4, SIZE, labels, shuffle_seed=3, use_multiprocessing=True)
    copy = pickle.loads(pickle.dumps(cutout_loader))
    np.testing.assert_array_equal(copy[1]["image"], cutout_loader[1]["image"])
    stream = tidal_data.tidal_source_from_hdf5(_write_tidal(tmp_path / "t.h5", 8)).unlabelled
    tidal_loader = loaders.TidalUnlabelledLoader(stream, np.full(5, 0.02), 4, 4, seed=2, use_multiprocessing=True)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tidal_loader))[1], tidal_loader[1])


def test_view_loader_takes_one_view_of_every_cluster_each_epoch():
    clusters, views = 7, 3
    representations = np.arange(clusters)[:, None, None] * 10.0 + np.arange(views)[None, :, None] + np.zeros((1, 1, 4))
    labels = np.linspace(0.1, 0.7, clusters)
    loader = loaders.ViewLoader(representations, labels, 3, seed=4)
    assert len(loader) == 3 and loader.workers == 1
    drawn = []
    for _ in range(4):
        vectors, batch_labels = map(np.concatenate, zip(*(loader[i] for i in range(len(loader)))))
        cluster, view = (vectors[:, 0] // 10).astype(int), (vectors[:, 0] % 10).astype(int)
        assert sorted(cluster) == list(range(clusters)) and set(view) <= set(range(views))
        np.testing.assert_allclose(batch_labels, labels[cluster])
        drawn.append(view[np.argsort(cluster)])
        loader.on_epoch_end()
    assert len({tuple(v) for v in drawn}) > 1  # the views change from epoch to epoch


# ----------------------------------------------------------------------------------------
# Tidal galaxies


def _tidal_images(count, seed=0, size=24):
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:size, :size]
    galaxy = np.exp(-((rows - size / 2) ** 2 + (columns - size / 2) ** 2) / 8.0)
    return (rng.normal(0, 0.02, (count, size, size, 5)) + galaxy[None, :, :, None]).astype(np.float32)


def _write_tidal(path, count, seed=0, images=None):
    images = _tidal_images(count, seed) if images is None else images
    tidal_data.write_tidal_hdf5(path, images, [f"{path.stem}_{i}" for i in range(count)],
                                {"has_tidal": np.arange(count) % 2})
    return path


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tidal")
    return _write_tidal(folder / "first.h5", 10, seed=1), _write_tidal(folder / "second.h5", 7, seed=2)


def test_unlabelled_loader_gives_the_batches_of_the_tf_stream(two_files):
    first, second = (tidal_data.tidal_source_from_hdf5(path) for path in two_files)
    stream = first.unlabelled.concatenate(second.unlabelled)
    assert len(stream) == 17 and isinstance(first.unlabelled(), tf.data.Dataset)  # TensorFlow keeps its pipeline
    scale = np.array([0.02, 0.03, 0.02, 0.025, 0.04], np.float32)
    expected = list(tidal_data.tidal_unlabelled_dataset(stream(), scale, 4, shuffle_buffer=1).as_numpy_iterator())
    loader = loaders.TidalUnlabelledLoader(stream, scale, 4, shuffle_buffer=1)
    assert len(loader) == len(expected) == 4  # 17 images: the last partial batch is dropped
    for mine, theirs in zip(loaders.iterate(loader), expected):
        assert mine.shape == (4, 24, 24, 5) and mine.dtype == np.float32
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    # An array of counts streams alike.
    counts = np.concatenate([_tidal_images(10, 1), _tidal_images(7, 2)])
    from_array = loaders.TidalUnlabelledLoader(counts, scale, 4, shuffle_buffer=1)
    for index in range(len(loader)):
        np.testing.assert_array_equal(from_array[index], loader[index])


def test_on_other_backends_a_joined_unlabelled_stream_stays_a_stream_of_files(two_files, monkeypatch):
    source = nnclr_model.open_tidal_source([two_files[0]], labelled_files=[two_files[1]])
    assert isinstance(source.unlabelled(), tf.data.Dataset)
    monkeypatch.setattr(common, "keras_backend", lambda: "jax")
    stream = source.unlabelled()  # what the commands read on JAX: no tf.data anywhere
    assert isinstance(stream, tidal_data.TidalStream) and len(stream) == 17
    assert [catalogue.paths for catalogue in stream.catalogues] == [(str(two_files[0]),), (str(two_files[1]),)]
    np.testing.assert_array_equal(stream.read([16, 0]), np.stack([_tidal_images(7, 2)[6], _tidal_images(10, 1)[0]]))


def test_shuffle_buffer_order_follows_the_rule_of_tf_data():
    rng = np.random.default_rng(0)
    for count, buffer in ((50, 8), (50, 1), (20, 40)):
        order = loaders.buffer_order(count, buffer, rng)
        assert sorted(order) == list(range(count))
        # An example leaves the buffer no earlier than its arrival: the buffer holds `buffer` at once.
        assert (order < np.arange(count) + buffer).all()
    np.testing.assert_array_equal(loaders.buffer_order(50, 8, np.random.default_rng(3)),
                                  loaders.buffer_order(50, 8, np.random.default_rng(3)))


def test_unlabelled_loader_shuffles_through_its_buffer_and_repeats_pass_by_pass(two_files):
    stream = tidal_data.tidal_source_from_hdf5(list(two_files)).unlabelled
    scale = np.full(5, 0.02, np.float32)
    counts = np.concatenate([_tidal_images(10, 1), _tidal_images(7, 2)])
    stretched = tidal_data.tidal_stretch(counts, scale)

    def positions(batch):  # which images a batch holds
        return [int(np.argmin(np.abs(stretched - image).reshape(len(stretched), -1).max(axis=1))) for image in batch]

    loader = loaders.TidalUnlabelledLoader(stream, scale, 4, shuffle_buffer=5, seed=1)
    passes = []
    for _ in range(2):
        seen = [p for index in range(len(loader)) for p in positions(loader[index])]
        assert len(seen) == len(set(seen)) == 16 and (np.asarray(seen) < np.arange(16) + 5).all()
        passes.append(seen)
        loader.on_epoch_end()
    assert passes[0] != passes[1]
    endless = loaders.TidalUnlabelledLoader(stream, scale, 4, shuffle_buffer=5, seed=1, repeat=True)
    assert endless.num_batches is None
    for index in range(2 * len(loader)):  # batch i is batch i mod n of pass i // n
        assert positions(endless[index]) == passes[index // len(loader)][4 * (index % 4) : 4 * (index % 4) + 4]


def test_labelled_loader_gives_the_batches_of_the_tf_classifier_set():
    images, labels = _tidal_images(7, 3), np.array([0, 1, 1, 0, 1, 0, 0])
    scale = np.full(5, 0.03, np.float32)
    expected = list(tidal_data.tidal_labelled_dataset(images, labels, scale, 3).as_numpy_iterator())
    loader = loaders.TidalLabelledLoader(images, labels, scale, 3)
    assert len(loader) == len(expected) == 3
    for (mine, mine_labels), (theirs, their_labels) in zip(loader, expected):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(mine_labels, their_labels)
    shuffled = loaders.TidalLabelledLoader(images, labels, scale, 3, shuffle=True, seed=0)
    batch, batch_labels = map(np.concatenate, zip(*shuffled))
    order = [int(np.argmin(np.abs(loader.images - image).reshape(7, -1).max(axis=1))) for image in batch]
    assert sorted(order) == list(range(7)) and order != list(range(7))
    np.testing.assert_array_equal(batch_labels, labels[order])


def test_unusable_galaxies_are_the_one_line_of_the_tf_stream(tmp_path):
    images = _tidal_images(80, 4)
    images[70, :12] = np.nan  # half the galaxy is no data
    images[75] = 1.0  # constant
    path = _write_tidal(tmp_path / "bad.h5", 80, images=images)
    stream = tidal_data.tidal_source_from_hdf5(path).unlabelled
    # The band scale's read: the first images, in the chunks of the tf.data stream.
    with pytest.raises(tf.errors.OpError) as raised:
        list(stream().take(70).as_numpy_iterator())
    line = common.tensorflow_error_line(raised.value)
    with pytest.raises(tidal_data.UnusableImageError) as mine:
        stream.head(70)
    assert str(mine.value) == line and "bad.h5: galaxy 'bad_70' (row 70): 50% of the pixels are non-finite" in line
    np.testing.assert_array_equal(stream.head(60), np.stack(list(stream().take(60).as_numpy_iterator())))
    loader = loaders.TidalUnlabelledLoader(stream, np.full(5, 0.02), 5, shuffle_buffer=1)
    with pytest.raises(tidal_data.UnusableImageError, match=r"galaxy 'bad_75' \(row 75\): the image is constant"):
        loader[15]


def test_loaders_refuse_what_the_pipelines_refuse(cutouts, two_files):
    refs, labels = cutouts
    with pytest.raises(ValueError, match="got 10 cutouts but 3 labels"):
        loaders.CutoutLoader(refs, 4, SIZE, labels[:3])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        loaders.CutoutLoader(refs, 0, SIZE)
    stream = tidal_data.tidal_source_from_hdf5(two_files[0]).unlabelled
    with pytest.raises(ValueError, match=r"images are 24x24 px, smaller than the crop: need at least 30x30"):
        loaders.TidalUnlabelledLoader(stream, np.full(5, 0.02), 4, 1, min_size=30)
    with pytest.raises(TypeError, match="other streams \\(TFDS\\) need the TensorFlow backend"):
        loaders.TidalUnlabelledLoader(lambda: None, np.full(5, 0.02), 4, 1)
    with pytest.raises(ValueError, match="got 7 images but 6 labels"):
        loaders.TidalLabelledLoader(_tidal_images(7), np.zeros(6), np.full(5, 0.02), 3)
    with pytest.raises(IndexError, match="batch 5 is out of range: the loader has 3 batches"):
        loaders.CutoutLoader(refs, 4, SIZE)[5]


def test_keras_backend_is_read_before_keras_loads(monkeypatch, tmp_path):
    assert common.keras_backend() == keras.backend.backend()
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert common.keras_backend() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert common.keras_backend() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert common.keras_backend() == "torch"


def test_other_backends_get_one_device_and_refuse_tensorflow_strategies(monkeypatch):
    monkeypatch.setattr(common, "keras_backend", lambda: "jax")
    strategy = common.make_strategy("default")
    assert isinstance(strategy, common.OneDevice) and strategy.num_replicas_in_sync == 1
    assert strategy.extended.should_checkpoint and strategy.cluster_resolver is None
    with strategy.scope():
        pass
    with pytest.raises(ValueError, match=r"^--strategy mirrored needs the TensorFlow backend \(KERAS_BACKEND=tensorflow\); "
                                         r"this run uses jax$"):
        common.make_strategy("mirrored")
    loader = object()
    assert common.split_batches_across_workers(loader) is loader
