"""Mock HSC cutouts rendered by worker processes into HDF5 shards (the library behind
``python -m data.generate``).

Cutouts are written in shards of ``shard_size`` cutouts, each shard by one worker process of
this machine, or, given a Dask client, by one task on the cluster's workers (which must see the
output folder). Cutout ``i`` is drawn from its own random stream, seeded by (kind, seed, ``i``),
so the output is identical for any number of workers, local or on a cluster. Shards are written atomically, so a shard that exists
is complete; a rerun with the same settings keeps them and renders only the missing ones.

* :func:`generate_shards` leaves the shards in a folder, as ``KIND-00000-of-00012.h5``;
* :func:`generate_file` builds them in ``FILE.h5.shards/`` and, once all exist, merges them
  into FILE.h5 (the shard folder is then removed unless ``keep_shards``).
The layouts of the files: :func:`write_shard` and ``data/README.md``.
"""

import glob
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import sys

import h5py
import numpy as np

import common
import data.files
import hsc
import locks
import parallel
import prep_data

logger = logging.getLogger(__name__)

WORKERS = os.cpu_count() or 1
SHARD_SIZE = 256
PREVIEW_COUNT = 16
#: Parameter distributions of the clusters (``data.clusters``), by name.
#: ``visible`` applies to tidal pairs only: every pair's feature is visible (``data.tidal.feature_visibility``).
DISTRIBUTIONS = ("training", "real-like", "randomised", "visible")
#: Kinds of cutout the generator writes. ``tidal_pairs``: host-matched twins, each scene with its
#: tidal feature and without it (``data.tidal.render_tidal_pair``); ``--n`` counts the pairs.
KINDS = ("clusters", "backgrounds", "tidal", "tidal_pairs")
#: Kinds written in the tidal layout.
TIDAL_KINDS = ("tidal", "tidal_pairs")
#: Mixed into every cutout's seed so that each kind draws its own streams from the same seed.
KIND_CODES = {"clusters": 1, "backgrounds": 2, "tidal": 3, "tidal_pairs": 4}
#: Version of the generator recorded in every shard; a rerun refuses shards of another version.
GENERATOR_VERSION = 2
#: How ``--measure-sb`` measures ``f_icl_sb`` (stored as the ``sb_method`` attribute): the paper's method.
SB_METHOD = "canepa2025"
_SHARD_PATTERN = re.compile(r"^(?P<kind>[a-z_]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.h5$")


class GenerationError(ValueError):
    """Arguments or existing files that make the requested generation impossible."""


def cutout_rng(kind, seed, index):
    """The random generator of cutout ``index``: a function of (kind, seed, index) only."""
    return np.random.default_rng(np.random.SeedSequence([KIND_CODES[kind], int(seed), int(index)]))


def cutout_id(kind, seed, index):
    """Identifier of cutout ``index``, e.g. ``clusters-s1-0000042``."""
    return f"{kind}-s{seed}-{index:07d}"


def render_one(kind, seed, index, distribution="training"):
    """Render cutout ``index``.

    Returns
    -------
    image : ndarray
        (224, 224) float32 counts for clusters and backgrounds; (128, 128, 5) for tidal.
    mask : ndarray or None
        (224, 224) int32 mask plane (None for tidal).
    truth : dict
        The truth columns, with ``params`` a dict.
    """
    rng = cutout_rng(kind, seed, index)
    if kind == "tidal":
        from data import tidal

        image, truth = tidal.render_tidal_galaxy(rng)
        return image, None, truth
    if kind == "tidal_pairs":
        raise ValueError("tidal pairs are two cutouts per index: use render_cutouts")
    from data import clusters

    population = {"training": clusters.TRAINING_DISTRIBUTION, "real-like": clusters.REAL_LIKE_DISTRIBUTION,
                  "randomised": clusters.RANDOMISED_DISTRIBUTION}[distribution]
    if kind == "backgrounds":
        population = clusters.BACKGROUND_DISTRIBUTION if distribution == "training" else population
        return clusters.render_cluster(rng, population, include_icl=False)
    return clusters.render_cluster(rng, population, include_icl=True)


def render_cutouts(kind, seed, index, distribution="training"):
    """The cutouts of index ``index``: one, or the two twins of a tidal pair (with, then without, its feature).

    Returns
    -------
    list of (image, mask, truth, id)
    """
    if kind != "tidal_pairs":
        return [(*render_one(kind, seed, index, distribution), cutout_id(kind, seed, index))]
    from data import tidal

    pair_id = cutout_id(kind, seed, index)
    visible = True if distribution == "visible" else None
    image_with, image_without, truth_with, truth_without = tidal.render_tidal_pair(
        cutout_rng(kind, seed, index), pair_id, visible=visible
    )
    return [(image_with, None, truth_with, f"{pair_id}-with"), (image_without, None, truth_without, f"{pair_id}-without")]


def measure_sb_label(image, mask, z):
    """The SB-method label ``f_icl_sb`` of one noisy cutout, measured as the paper labelled its training set.

    ``measure_sb_cut.measure_icl_fraction_canepa2025``: the original code's automatic
    measurement. A cutout the method cannot measure gets NaN and a warning rather than stopping
    its shard; readers refuse NaN labels when training.
    """
    import measure_sb_cut

    try:
        measurement = measure_sb_cut.measure_icl_fraction_canepa2025(image, z, mask=mask, mask_bits=hsc.DEFAULT_MASK_BITS)
    except ValueError as error:
        logger.warning("SB measurement failed, label f_icl_sb = NaN: %s", error)
        return float("nan")
    return float(measurement.f_icl)


# ----------------------------------------------------------------------------------------
# Shards


def shard_plan(n, shard_size):
    """(first index, count) of every shard."""
    return [(start, min(shard_size, n - start)) for start in range(0, n, shard_size)]


def shard_name(kind, shard_index, shard_count):
    return f"{kind}-{shard_index:05d}-of-{shard_count:05d}.h5"


def _run_attributes(kind, seed, n, shard_size, distribution, measure_sb=False):
    return dict(kind=kind, seed=int(seed), n_total=int(n), shard_size=int(shard_size),
                distribution=distribution, measure_sb=int(measure_sb), generator_version=GENERATOR_VERSION,
                sb_method=SB_METHOD if measure_sb else "")


def write_shard(path, kind, images, masks, truths, ids, attributes):
    """Write one shard atomically; ``attributes`` go to the file's attributes.

    Clusters and backgrounds use the stacked ICL layout of ``prep_data`` (``image`` (N, 224, 224)
    float16 counts, ``mask`` int32, ``id``, ``z``, ``f_icl_true``, ``f_icl_sb_ideal``,
    ``f_icl_sb_ideal_scene``, optionally ``f_icl_sb``, ``params`` JSON); tidal galaxies the tidal
    layout (``image`` (N, 128, 128, 5) float32 counts in g, r, i, z, y, ``id`` and the columns of
    :func:`data.tidal.truth_columns`).
    """
    if kind in TIDAL_KINDS:
        from data import tidal

        images, masks, columns = np.asarray(images, dtype=np.float32), None, tidal.truth_columns(truths)
        attributes = dict(attributes, bands=hsc.TIDAL_BANDS)
    else:
        images, masks = np.asarray(images, dtype=np.float16), np.asarray(masks, dtype=np.int32)
        names = ("z", "f_icl_true", "f_icl_sb_ideal", "f_icl_sb_ideal_scene") + (("f_icl_sb",) if "f_icl_sb" in truths[0] else ())
        columns = {name: [float(t[name]) for t in truths] for name in names}
        columns["params"] = [json.dumps(truth["params"], sort_keys=True) for truth in truths]
    data.files.write_stacked_hdf5(path, images, masks, ids, columns, mask_bits=hsc.DEFAULT_MASK_BITS,
                                 pixel_scale=hsc.PIXEL_SCALE, attributes=attributes)


_progress_counter = None


def _init_worker(counter):
    global _progress_counter
    _progress_counter = counter
    logging.getLogger().setLevel(logging.WARNING)
    # Ctrl-C is the parent's to handle: it cancels the queued shards and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_shard(path, kind, seed, start, count, distribution, attributes, measure_sb=False):
    """Render cutouts ``start .. start + count - 1`` and write them to ``path``; returns ``path``.

    With ``measure_sb`` the SB-method label ``f_icl_sb`` is measured on each noisy cutout too.
    """
    images, masks, truths, ids = [], [], [], []
    for index in range(start, start + count):
        for image, mask, truth, cutout in render_cutouts(kind, seed, index, distribution):
            if measure_sb:
                truth["f_icl_sb"] = measure_sb_label(image.astype(np.float16).astype(np.float32), mask, truth["z"])
            images.append(image)
            masks.append(mask)
            truths.append(truth)
            ids.append(cutout)
        if _progress_counter is not None:
            with _progress_counter.get_lock():
                _progress_counter.value += 1
    write_shard(path, kind, images, masks, truths, ids, dict(attributes, first_index=start, count=count))
    return str(path)


def render_shard(job, kind, seed, distribution, attributes, measure_sb=False):
    """The Dask task of :func:`generate_shards`: ``job`` is ``(path, start, count)`` of one shard.

    Returns the shard's path (see :func:`make_shard`). The shard is written atomically, so a
    task that is run again after its worker died leaves one complete, identical file.
    """
    path, start, count = job
    return make_shard(path, kind, seed, start, count, distribution, attributes, measure_sb)


def _stored_attributes_differ(path, attributes):
    """The first attribute of ``attributes`` that the file ``path`` holds with another value, as (key, stored), or None."""
    with h5py.File(path, "r") as f:
        for key, value in attributes.items():
            stored = f.attrs.get(key)
            stored = stored.decode() if isinstance(stored, bytes) else stored
            if stored is None or str(stored) != str(value):
                return key, stored
    return None


def check_existing_shards(folder, kind, shard_count, attributes):
    """Complete shards already in ``folder`` for this run; raises GenerationError for foreign ones."""
    done = set()
    for name in sorted(os.listdir(folder)):
        match = _SHARD_PATTERN.match(name)
        if not match or match["kind"] != kind:
            continue
        path = os.path.join(folder, name)
        if int(match["count"]) != shard_count:
            raise GenerationError(
                f"{folder} holds shards of another run ({name}: {int(match['count'])} shards, not {shard_count}); "
                "use another output or the same --n and --shard-size"
            )
        try:
            differ = _stored_attributes_differ(path, attributes)
        except OSError as error:
            raise GenerationError(f"{path}: unreadable shard ({error}); delete it and rerun") from None
        if differ:
            key, stored = differ
            raise GenerationError(f"{path} was made with {key}={stored}, not {attributes[key]}; use another output")
        done.add(int(match["index"]))
    return done


def merge_shards(shard_paths, out_path):
    """Concatenate shards (same datasets) into one file along the first axis, atomically."""
    with h5py.File(shard_paths[0], "r") as first:
        names = [name for name in first.keys() if isinstance(first[name], h5py.Dataset)]
        attributes = {k: v for k, v in first.attrs.items() if k not in ("first_index", "count")}
        layout = {name: (first[name].shape[1:], first[name].dtype, first[name].chunks, first[name].compression) for name in names}
    total = 0
    for path in shard_paths:
        with h5py.File(path, "r") as f:
            total += f["id"].shape[0]
    with common.atomic_write(out_path) as temporary, h5py.File(temporary, "w") as out:
        out.attrs.update(attributes)
        for name, (shape, dtype, chunks, compression) in layout.items():
            out.create_dataset(name, shape=(total,) + shape, dtype=dtype,
                               chunks=(1,) + shape if chunks and len(shape) > 1 else None, compression=compression)
        offset = 0
        for path in shard_paths:
            with h5py.File(path, "r") as f:
                size = f["id"].shape[0]
                for name in names:
                    out[name][offset : offset + size] = f[name][()]
                offset += size


# ----------------------------------------------------------------------------------------
# Generating


def _check_arguments(kind, n, seed, workers, shard_size, distribution, measure_sb):
    if kind not in KINDS:
        raise GenerationError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if n < 1:
        raise GenerationError(f"--n must be a positive number of cutouts, got {n}")
    if seed < 0:
        raise GenerationError(f"--seed must be a non-negative integer, got {seed}")
    if workers < 1:
        raise GenerationError(f"--workers must be at least 1, got {workers}")
    if shard_size < 1:
        raise GenerationError(f"--shard-size must be at least 1, got {shard_size}")
    if distribution not in DISTRIBUTIONS:
        raise GenerationError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if measure_sb and kind in TIDAL_KINDS:
        raise GenerationError("--measure-sb applies to clusters and backgrounds, not tidal galaxies")
    if (distribution == "visible") != (kind == "tidal_pairs" and distribution == "visible"):
        raise GenerationError("--distribution visible applies to tidal_pairs only")
    if measure_sb:
        try:
            import measure_sb_cut  # noqa: F401
        except ImportError as error:
            raise GenerationError(f"--measure-sb needs the package measure_sb_cut, which cannot be imported ({error})") from None


def _make_writable_folder(folder, option):
    """Create ``folder`` and check that files can be written in it; ``option`` names it in the error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise GenerationError(f"{option}: cannot write there ({error.strerror or error})") from None


def generate_shards(kind, n, seed, folder, workers=WORKERS, shard_size=SHARD_SIZE, distribution="training",
                    progress=True, measure_sb=False, start_method=None, client=None):
    """Generate ``n`` cutouts of ``kind`` (:data:`KINDS`) as HDF5 shards in ``folder``; returns the shard paths.

    ``folder`` is created if needed; complete shards of the same run already there are kept.
    ``distribution`` (:data:`DISTRIBUTIONS`) picks the clusters' parameters; ``measure_sb`` also
    measures the SB-method label ``f_icl_sb`` on each noisy cluster (needs ``measure_sb_cut``);
    ``progress`` shows a bar on standard error; ``start_method`` ("fork", "forkserver", "spawn")
    is how worker processes start, by default "fork", or "forkserver" when TensorFlow is loaded.
    With a Dask ``client`` the missing shards are rendered on its cluster, one task per shard
    (:func:`render_shard`), instead of by ``workers`` local processes; ``folder`` must then be
    on a file system every worker sees. The files are the same either way.

    Raises
    ------
    GenerationError
        For impossible arguments, an unwritable folder or shards of another run in the way.
    """
    _check_arguments(kind, n, seed, workers, shard_size, distribution, measure_sb)
    folder = pathlib.Path(folder)
    _make_writable_folder(folder, f"--out-dir {folder}")
    with locks.folder_lock(folder, "--out-dir", GenerationError):  # two runs at once would mix their shards
        return _generate_shards(kind, n, seed, folder, workers, shard_size, distribution, progress, measure_sb,
                                start_method, client)


def _generate_shards(kind, n, seed, folder, workers, shard_size, distribution, progress, measure_sb, start_method,
                     client):
    attributes = _run_attributes(kind, seed, n, shard_size, distribution, measure_sb)
    plan = shard_plan(n, shard_size)
    # Leftovers of interrupted writes (one run per folder at a time).
    for stale in glob.glob(str(folder / f".*{kind}-*.partial-*")):
        os.remove(stale)
    done = check_existing_shards(folder, kind, len(plan), attributes)
    paths = [folder / shard_name(kind, i, len(plan)) for i in range(len(plan))]
    todo = [i for i in range(len(plan)) if i not in done]
    if done:
        logger.info("%d of %d shards already complete; rendering the other %d", len(done), len(plan), len(todo))
    remaining = sum(plan[i][1] for i in todo)
    with common.progress(total=remaining, desc=kind, unit="cutout", disable=not progress, file=sys.stderr) as bar:
        if client is not None:
            # Absolute paths: a worker of a remote cluster does not share this process's folder.
            jobs = [(str(paths[i].resolve()), *plan[i]) for i in todo]
            rendered = parallel.map_in_order(client, render_shard, jobs, kind, seed, distribution, attributes, measure_sb)
            for position, _ in enumerate(rendered):
                bar.update(plan[todo[position]][1])
        elif workers == 1 or len(todo) <= 1:
            for i in todo:
                make_shard(paths[i], kind, seed, *plan[i], distribution, attributes, measure_sb)
                bar.update(plan[i][1])
        else:
            _run_pool(todo, plan, paths, kind, seed, distribution, attributes, workers, bar, measure_sb, start_method)
    return [str(p) for p in paths]


def generate_file(kind, n, seed, path, workers=WORKERS, shard_size=SHARD_SIZE, distribution="training",
                  keep_shards=False, progress=True, measure_sb=False, start_method=None, client=None):
    """Generate ``n`` cutouts of ``kind`` into the one HDF5 file ``path``; returns ``str(path)``.

    The shards are built in ``path.shards/`` by :func:`generate_shards` (same parameters, a Dask
    ``client`` included: the merge runs in this process), then
    merged into ``path`` and removed unless ``keep_shards``. An existing ``path`` made by the
    same run is kept as it is.

    Raises
    ------
    GenerationError
        For impossible arguments, a path that is not an HDF5 file name, an unwritable folder,
        or a file or shards of another run in the way.
    """
    _check_arguments(kind, n, seed, workers, shard_size, distribution, measure_sb)
    path = pathlib.Path(path)
    if path.is_dir() or path.suffix.lower() not in prep_data.HDF5_SUFFIXES:
        raise GenerationError(f"--out {path}: --out names one HDF5 file (FILE.h5); a folder of shards is --out-dir DIR")
    if path.exists():
        if _stored_attributes_differ(path, _run_attributes(kind, seed, n, shard_size, distribution, measure_sb)):
            raise GenerationError(f"--out {path} exists and was made by another run; choose another --out")
        logger.info("%s already exists; nothing to do", path)
        return str(path)
    _make_writable_folder(path.parent, f"--out {path}")
    folder = path.with_name(path.name + ".shards")
    with locks.file_lock(path, "--out", GenerationError):
        shards = generate_shards(kind, n, seed, folder, workers, shard_size, distribution, progress, measure_sb,
                                 start_method, client)
        merge_shards(shards, path)
        if not keep_shards:
            shutil.rmtree(folder)
    return str(path)


def _run_pool(todo, plan, paths, kind, seed, distribution, attributes, workers, bar, measure_sb, start_method):
    import concurrent.futures
    import multiprocessing

    # fork: workers start in milliseconds and see the modules already imported; but forking a
    # process in which TensorFlow runs threads (a TFDS build) can deadlock, so then forkserver.
    if start_method is None:
        start_method = "forkserver" if "tensorflow" in sys.modules else "fork"
    context = multiprocessing.get_context(start_method)
    counter = context.Value("q", 0)
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                                initializer=_init_worker, initargs=(counter,)) as pool:
        futures = [pool.submit(make_shard, paths[i], kind, seed, *plan[i], distribution, attributes, measure_sb) for i in todo]
        pending = set(futures)
        try:
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=0.5)
                for future in finished:
                    future.result()
                bar.update(counter.value - bar.n)
        except BaseException:
            # Ctrl-C or a failed shard: the queued shards are cancelled and the running ones
            # stopped (each shard is written atomically, so the finished ones are complete).
            # (The futures are not cancelled one by one: the pool then fails them as broken.)
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            raise
        bar.update(counter.value - bar.n)


# ----------------------------------------------------------------------------------------
# Preview


def preview_shards(kind, paths, preview_path, count=PREVIEW_COUNT):
    """Draw a PNG grid of the first ``count`` cutouts of ``kind`` stored in ``paths``, with their truth."""
    from data import profiles

    if kind in TIDAL_KINDS:
        import tidal_data
        from data import tidal

        catalogue = tidal_data.index_tidal_hdf5(paths)
        shown = np.arange(min(count, len(catalogue)))
        truths = [dict(has_tidal=catalogue.has_tidal[i], feature_type=catalogue.feature_type[i],
                       feature_sb=catalogue.feature_sb[i]) for i in shown]
        panels = [tidal.preview_panel(image, truth) for image, truth in zip(tidal_data.read_tidal_images(catalogue, shown), truths)]
        profiles.draw_preview(panels, preview_path, columns=6, title=tidal.PREVIEW_TITLE)
    else:
        from data import clusters

        refs, _ = prep_data.index_cutouts(paths)
        cutouts = [prep_data.read_cutout(ref) for ref in refs[:count]]
        profiles.draw_preview([clusters.preview_panel(c.image, c.meta, c.mask) for c in cutouts], preview_path, columns=8)
