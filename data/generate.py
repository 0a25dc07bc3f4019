"""Generate mock HSC cutouts in parallel: ``python -m data.generate clusters|backgrounds|tidal``.

Cutouts are written in HDF5 shards of ``--shard-size`` cutouts, each shard by one worker
process. Cutout ``i`` is drawn from its own random stream, seeded by (kind, ``--seed``, ``i``),
so the output is identical for any number of workers. Shards are written atomically (to a
temporary name, then renamed), so a shard that exists is complete; a rerun of the same command
keeps them and renders only the missing ones.

Output
------
``--out DIR`` (no .h5 suffix): the shards stay in DIR as ``KIND-00000-of-00012.h5``.
``--out FILE.h5``: the shards are built in ``FILE.h5.shards/`` and, once all exist, merged into
FILE.h5 (the shard folder is then removed unless ``--keep-shards``).

Layouts (see ``prep_data`` and ``data/README.md``): clusters and backgrounds use the *stacked*
ICL layout (``image`` (N, 224, 224) float16 counts, ``mask`` int32, ``id``, ``z``,
``f_icl_true``, ``f_icl_sb_ideal``, ``params`` JSON); tidal galaxies ``image`` (N, 128, 128, 5)
float32 counts in g, r, i, z, y with ``id``, ``has_tidal``, ``feature_type``, ``feature_sb``,
``params``.

Examples
--------
python -m data.generate clusters --n 64 --seed 1 --out clusters.h5 --preview clusters.png
python -m data.generate backgrounds --n 50000 --seed 2 --out backgrounds/ --workers 16
"""

import argparse
import glob
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time

import h5py
import numpy as np

import common
import data.files
import hsc
import prep_data

logger = logging.getLogger(__name__)

# Defaults of the command line (each can be set with the option of the same name).
N = 64
SEED = 0
WORKERS = os.cpu_count() or 1
SHARD_SIZE = 256
PREVIEW_COUNT = 16
DISTRIBUTION = "training"

#: Kinds of cutout the generator writes.
KINDS = ("clusters", "backgrounds", "tidal")
#: Mixed into every cutout's seed so that each kind draws its own streams from the same --seed.
KIND_CODES = {"clusters": 1, "backgrounds": 2, "tidal": 3}
#: Version of the generator recorded in every shard; a rerun refuses shards of another version.
GENERATOR_VERSION = 1
_SHARD_PATTERN = re.compile(r"^(?P<kind>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.h5$")


class GenerationError(ValueError):
    """Arguments or existing files that make the requested generation impossible."""


def cutout_rng(kind, seed, index):
    """The random generator of cutout ``index``: a function of (kind, seed, index) only."""
    return np.random.default_rng(np.random.SeedSequence([KIND_CODES[kind], int(seed), int(index)]))


def cutout_id(kind, seed, index):
    """Identifier of cutout ``index``, e.g. ``clusters-s1-0000042``."""
    return f"{kind}-s{seed}-{index:07d}"


def render_one(kind, seed, index, distribution=DISTRIBUTION):
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
    from data import clusters

    population = {"training": clusters.TRAINING_DISTRIBUTION, "real-like": clusters.REAL_LIKE_DISTRIBUTION}[distribution]
    if kind == "backgrounds":
        population = clusters.BACKGROUND_DISTRIBUTION if distribution == "training" else population
        return clusters.render_cluster(rng, population, include_icl=False)
    return clusters.render_cluster(rng, population, include_icl=True)


# ----------------------------------------------------------------------------------------
# Shards


def shard_plan(n, shard_size):
    """(first index, count) of every shard."""
    return [(start, min(shard_size, n - start)) for start in range(0, n, shard_size)]


def shard_name(kind, shard_index, shard_count):
    return f"{kind}-{shard_index:05d}-of-{shard_count:05d}.h5"


def _run_attributes(kind, seed, n, shard_size, distribution, measure_sb=False):
    return dict(kind=kind, seed=int(seed), n_total=int(n), shard_size=int(shard_size),
                distribution=distribution, measure_sb=int(measure_sb), generator_version=GENERATOR_VERSION)


def write_shard(path, kind, images, masks, truths, ids, attributes):
    """Write one shard atomically; ``attributes`` go to the file's attributes."""
    path = pathlib.Path(path)
    partial = common.atomic_path(path)
    params = [json.dumps(truth["params"], sort_keys=True) for truth in truths]
    if kind == "tidal":
        with h5py.File(partial, "w") as f:
            f.attrs["format"] = "tidal-cutouts"
            f.attrs["bands"] = "grizy"
            f.attrs["pixel_scale"] = hsc.PIXEL_SCALE
            stack = np.asarray(images, dtype=np.float32)
            f.create_dataset("image", data=stack, chunks=(1,) + stack.shape[1:])
            f.create_dataset("id", data=np.asarray(ids, dtype=h5py.string_dtype()))
            f.create_dataset("has_tidal", data=np.asarray([int(t["has_tidal"]) for t in truths], dtype=np.int64))
            f.create_dataset("feature_type", data=np.asarray([str(t["feature_type"]) for t in truths], dtype=h5py.string_dtype()))
            f.create_dataset("feature_sb", data=np.asarray([float(t["feature_sb"]) for t in truths], dtype=np.float64))
            f.create_dataset("params", data=np.asarray(params, dtype=h5py.string_dtype()))
            f.attrs.update(attributes)
    else:
        names = ("z", "f_icl_true", "f_icl_sb_ideal", "f_icl_sb_ideal_scene") + (("f_icl_sb",) if "f_icl_sb" in truths[0] else ())
        columns = {name: [float(t[name]) for t in truths] for name in names}
        columns["params"] = params
        data.files.write_stacked_hdf5(
            partial, np.asarray(images, dtype=np.float16), np.asarray(masks, dtype=np.int32), ids, columns,
            mask_bits=hsc.DEFAULT_MASK_BITS, pixel_scale=hsc.PIXEL_SCALE,
        )
        with h5py.File(partial, "r+") as f:
            f.attrs.update(attributes)
    os.replace(partial, path)


_progress_counter = None


def _init_worker(counter):
    global _progress_counter
    _progress_counter = counter
    logging.getLogger().setLevel(logging.WARNING)


def measure_sb_label(image, mask, z):
    """The SB-method label ``f_icl_sb`` of one noisy cutout (``measure_sb_cut.measure_icl_fraction``).

    Only the fraction is needed, so the background re-estimates behind the error bar are
    skipped. A cutout the method cannot measure gets NaN and a warning rather than stopping
    its shard; readers refuse NaN labels when training.
    """
    import measure_sb_cut

    try:
        measurement = measure_sb_cut.measure_icl_fraction(
            image, z, mask=mask, mask_bits=hsc.DEFAULT_MASK_BITS, reestimate_box_sizes=()
        )
    except ValueError as error:
        logger.warning("SB measurement failed, label f_icl_sb = NaN: %s", error)
        return float("nan")
    return float(measurement.f_icl)


def make_shard(path, kind, seed, start, count, distribution, attributes, measure_sb=False):
    """Render cutouts ``start .. start + count - 1`` and write them to ``path``; returns ``path``.

    With ``measure_sb`` the SB-method label ``f_icl_sb`` is measured on each noisy cutout too.
    """
    images, masks, truths, ids = [], [], [], []
    for index in range(start, start + count):
        image, mask, truth = render_one(kind, seed, index, distribution)
        if measure_sb:
            truth["f_icl_sb"] = measure_sb_label(image.astype(np.float16).astype(np.float32), mask, truth["z"])
        images.append(image)
        masks.append(mask)
        truths.append(truth)
        ids.append(cutout_id(kind, seed, index))
        if _progress_counter is not None:
            with _progress_counter.get_lock():
                _progress_counter.value += 1
    write_shard(path, kind, images, masks, truths, ids, dict(attributes, first_index=start, count=count))
    return str(path)


def check_existing_shards(folder, kind, shard_count, attributes):
    """Complete shards already in ``folder`` for this run; raises GenerationError for foreign ones."""
    done = set()
    for name in sorted(os.listdir(folder)):
        match = _SHARD_PATTERN.match(name)
        if not match or match["kind"] != kind:
            continue
        if int(match["count"]) != shard_count:
            raise GenerationError(
                f"{folder} holds shards of another run ({name}: {int(match['count'])} shards, not {shard_count}); "
                "use another --out or the same --n and --shard-size"
            )
        try:
            with h5py.File(os.path.join(folder, name), "r") as f:
                found = {key: f.attrs.get(key) for key in attributes}
        except OSError as error:
            raise GenerationError(f"{os.path.join(folder, name)}: unreadable shard ({error}); delete it and rerun") from None
        for key, value in attributes.items():
            stored = found[key]
            stored = stored.decode() if isinstance(stored, bytes) else stored
            if stored is None or str(stored) != str(value):
                raise GenerationError(
                    f"{os.path.join(folder, name)} was made with {key}={stored}, not {value}; use another --out"
                )
        done.add(int(match["index"]))
    return done


def merge_shards(shard_paths, out_path):
    """Concatenate shards (same datasets) into one file along the first axis, atomically."""
    out_path = pathlib.Path(out_path)
    partial = common.atomic_path(out_path)
    with h5py.File(shard_paths[0], "r") as first:
        names = [name for name in first.keys() if isinstance(first[name], h5py.Dataset)]
        attributes = {k: v for k, v in first.attrs.items() if k not in ("first_index", "count")}
        layout = {name: (first[name].shape[1:], first[name].dtype, first[name].chunks, first[name].compression) for name in names}
    total = 0
    for path in shard_paths:
        with h5py.File(path, "r") as f:
            total += f["id"].shape[0]
    with h5py.File(partial, "w") as out:
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
    os.replace(partial, out_path)


def generate(kind, n, seed, out, workers=WORKERS, shard_size=SHARD_SIZE, distribution=DISTRIBUTION,
             keep_shards=False, progress=True, measure_sb=False, start_method=None):
    """Generate ``n`` cutouts of ``kind`` into ``out`` (see the module docstring); returns the output paths.

    ``start_method`` picks how worker processes start ("fork", "forkserver", "spawn"); by
    default "fork", or "forkserver" when TensorFlow is loaded in this process.

    Raises
    ------
    GenerationError
        For impossible arguments, an unwritable output or shards of another run in the way.
    """
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
    if distribution not in ("training", "real-like"):
        raise GenerationError(f"--distribution must be 'training' or 'real-like', got {distribution!r}")
    out = pathlib.Path(out)
    merged = out.suffix.lower() in prep_data.HDF5_SUFFIXES
    folder = out.with_name(out.name + ".shards") if merged else out
    if measure_sb and kind == "tidal":
        raise GenerationError("--measure-sb applies to clusters and backgrounds, not tidal galaxies")
    if measure_sb:
        try:
            import measure_sb_cut  # noqa: F401
        except ImportError as error:
            raise GenerationError(f"--measure-sb needs the package measure_sb_cut, which cannot be imported ({error})") from None
    attributes = _run_attributes(kind, seed, n, shard_size, distribution, measure_sb)
    if merged and out.exists():
        with h5py.File(out, "r") as f:
            stored = {key: f.attrs.get(key) for key in attributes}
        if any(str(stored[k].decode() if isinstance(stored[k], bytes) else stored[k]) != str(v) for k, v in attributes.items()):
            raise GenerationError(f"--out {out} exists and was made by another run; choose another --out")
        logger.info("%s already exists; nothing to do", out)
        return [str(out)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise GenerationError(f"--out {out}: cannot write there ({error.strerror or error})") from None

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
    from tqdm import tqdm

    with tqdm(total=remaining, desc=f"{kind}", unit="cutout", disable=not progress, file=sys.stderr) as bar:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                start, count = plan[i]
                make_shard(paths[i], kind, seed, start, count, distribution, attributes, measure_sb)
                bar.update(count)
        else:
            _run_pool(todo, plan, paths, kind, seed, distribution, attributes, workers, bar, measure_sb, start_method)
    if not merged:
        return [str(p) for p in paths]
    merge_shards([str(p) for p in paths], out)
    if not keep_shards:
        shutil.rmtree(folder)
    return [str(out)]


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
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=0.5)
            for future in finished:
                future.result()
            bar.update(counter.value - bar.n)
        bar.update(counter.value - bar.n)


def read_examples(paths, count):
    """The first ``count`` images, masks (or None) and truths stored in ``paths``."""
    images, masks, truths = [], [], []
    for path in paths:
        with h5py.File(path, "r") as f:
            take = min(count - len(images), f["id"].shape[0])
            images.extend(np.asarray(f["image"][:take], dtype=np.float32))
            masks.extend(f["mask"][:take] if "mask" in f else [None] * take)
            columns = [k for k in f.keys() if k not in ("image", "mask", "id") and f[k].ndim == 1]
            values = {k: f[k][:take] for k in columns}
            for row in range(take):
                truth = {}
                for key, column in values.items():
                    value = column[row]
                    value = value.decode() if isinstance(value, bytes) else value
                    truth[key] = json.loads(value) if key == "params" else (value.item() if hasattr(value, "item") else value)
                truths.append(truth)
        if len(images) >= count:
            break
    return images, masks, truths


def draw_preview(kind, paths, preview_path, count=PREVIEW_COUNT):
    """Draw a PNG grid of the first ``count`` generated cutouts with their truth."""
    images, masks, truths = read_examples(paths, count)
    if kind == "tidal":
        from data import tidal

        tidal.draw_preview(images, truths, preview_path)
    else:
        from data import clusters

        clusters.draw_preview(images, truths, preview_path, masks=masks)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data.generate",
        description="Generate mock HSC cutouts (clusters, ICL-free backgrounds, tidal galaxies) into HDF5 shards.",
    )
    parser.add_argument("kind", choices=KINDS, help="what to generate")
    parser.add_argument("--n", type=int, default=N, help=f"number of cutouts (default {N})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    parser.add_argument("--out", required=True, help="output FILE.h5 (shards merged) or DIR (shards kept)")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"worker processes (default: all {WORKERS} cores)")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"cutouts per shard (default {SHARD_SIZE})")
    parser.add_argument("--distribution", default=DISTRIBUTION, choices=("training", "real-like"),
                        help="cluster parameter distribution (default training)")
    parser.add_argument("--preview", help="PNG grid of the first cutouts with their truth")
    parser.add_argument("--preview-count", type=int, default=PREVIEW_COUNT, help=f"cutouts in the preview (default {PREVIEW_COUNT})")
    parser.add_argument("--measure-sb", action="store_true",
                        help="also measure the SB-method label f_icl_sb on each noisy cutout (needs measure_sb_cut)")
    parser.add_argument("--keep-shards", action="store_true", help="keep FILE.h5.shards/ after merging")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        paths = generate(args.kind, args.n, args.seed, args.out, args.workers, args.shard_size,
                         args.distribution, args.keep_shards, progress=not args.quiet, measure_sb=args.measure_sb)
        if args.preview:
            if args.preview_count < 1:
                raise GenerationError(f"--preview-count must be at least 1, got {args.preview_count}")
            draw_preview(args.kind, paths, args.preview, args.preview_count)
    except GenerationError as error:
        parser.exit(2, f"error: {error}\n")
    elapsed = time.perf_counter() - started
    logger.info("wrote %d %s to %s in %.1f s", args.n, args.kind, args.out, elapsed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
