"""The ICL model over cutout files: the batch loop of ``predict.py`` and ``gradcam.py``.

Cutouts stream from disk in batches (``prep_data.cutout_dataset`` on the TensorFlow backend,
``loaders.CutoutLoader`` on the others) and each batch goes once
through a :class:`model.Predictor`; with GradCAM on, the heat maps come from that same forward
pass. Each readable cutout gives a CSV row,

    id, source, f_icl (the mode), f_icl_p15, f_icl_p85, f_icl_mean

and, with GradCAM, an overlay PNG: the prepared image in grey with the heat map over it,
titled with the cutout id and the prediction. A cutout that cannot be read is logged (one line,
naming the file and the cutout) and skipped, or stops the run when ``strict``. Rows go to a
hidden partial file (:func:`partial_path`), flushed after every batch and renamed to the CSV
when every cutout is done, so an interrupted run never leaves a CSV that looks finished and
``resume`` skips the cutouts already predicted.
"""

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re

import keras
import numpy as np

import common
import loaders
import locks
import model
import parallel
import plots
import prep_data

#: Cutouts per batch.
BATCH_SIZE = 32
#: Columns of the CSV.
COLUMNS = ("id", "source", "f_icl", "f_icl_p15", "f_icl_p85", "f_icl_mean")
#: The predictor's summaries written to the CSV after id and source, in column order.
SUMMARY_KEYS = ("mode", "p15", "p85", "mean")
#: Ending of every overlay file name.
OVERLAY_SUFFIX = "_gradcam.png"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OverlayStyle:
    """How an overlay draws its heat map; checked when made."""

    alpha: float = 0.6  # opacity of the heat map where it is 1 (it fades to transparent at 0)
    colormap: str = "jet"  # Matplotlib colour map of the heat map
    display_percentiles: tuple = (1.0, 99.5)  # percentiles of the image shown as black and white

    def __post_init__(self):
        import matplotlib

        if not 0 <= self.alpha <= 1:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {self.alpha}")
        if self.colormap not in matplotlib.colormaps:
            raise ValueError(f"colormap must be a Matplotlib colour map name, got '{self.colormap}'")
        low_high = tuple(self.display_percentiles)
        if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1] <= 100:
            raise ValueError(f"display_percentiles must be (low, high) with 0 <= low < high <= 100, got {low_high}")


def overlay_filename(identifier):
    """File name of a cutout's overlay: the id with characters outside [A-Za-z0-9._-] replaced.

    An id that had to be changed (or would start with a dot) also gets a short hash of the
    original, so ids that differ only in replaced characters never share a file.
    """
    identifier = str(identifier)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", identifier).lstrip(".")[:100]
    if safe != identifier or not safe:
        digest = hashlib.sha1(identifier.encode()).hexdigest()[:8]
        safe = f"{safe}_{digest}" if safe else digest
    return safe + OVERLAY_SUFFIX


def save_overlays(images, heatmaps, ids, out_dir, predictions=None, style=None):
    """Write one PNG per image: the prepared image in grey with the heat map over it.

    Parameters
    ----------
    images : array-like, shape (B, S, S, 1) or (B, S, S)
        Prepared images, drawn with row 0 at the bottom (FITS convention).
    heatmaps : array-like, shape (B, S, S)
        Heat maps in [0, 1] (``model.gradcam_heatmaps``).
    ids : sequence of str
        One id per image, for the title and the file name (:func:`overlay_filename`).
    out_dir : str or path
        Output folder, created if missing.
    predictions : mapping, optional
        ``mode``, ``p15`` and ``p85``, each (B,) (a ``model.Predictor`` result); the title then
        shows f_ICL = mode with its 15-85% range.
    style : OverlayStyle, optional
        The default style when omitted.

    Returns
    -------
    list of pathlib.Path
        The PNG files, in image order, each written atomically.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    images = np.asarray(images, dtype=np.float32)
    images = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    ids = [str(identifier) for identifier in ids]
    if images.ndim != 3:
        raise ValueError(f"images must have shape (B, S, S, 1) or (B, S, S), got {images.shape}")
    if heatmaps.shape != images.shape:
        raise ValueError(f"heatmaps must have the images' shape {images.shape}, got {heatmaps.shape}")
    if len(ids) != len(images):
        raise ValueError(f"ids must hold one id per image ({len(images)}), got {len(ids)}")
    if predictions is not None:
        missing = {"mode", "p15", "p85"} - set(predictions)
        if missing:
            raise ValueError(f"predictions must have keys 'mode', 'p15' and 'p85', missing {sorted(missing)}")
    style = style or OverlayStyle()
    norm = Normalize(0.0, 1.0)
    paths = []
    for index, (image, heatmap, identifier) in enumerate(zip(images, heatmaps, ids)):
        low, high = np.percentile(image, style.display_percentiles)
        figure, axes = plots.new_figure(figsize=(4.6, 4.2))
        axes.imshow(image, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6), interpolation="nearest")
        # Opacity grows with the heat, so the image stays visible where the map is zero.
        axes.imshow(heatmap, cmap=style.colormap, norm=norm, origin="lower", alpha=style.alpha * np.clip(heatmap, 0, 1))
        figure.colorbar(ScalarMappable(norm, style.colormap), ax=axes, fraction=0.046, pad=0.04, label="GradCAM (normalised)")
        axes.set_axis_off()
        title = identifier
        if predictions is not None:
            mode, p15, p85 = (float(np.reshape(predictions[key], -1)[index]) for key in ("mode", "p15", "p85"))
            title += f"\nf_ICL = {mode:.3f} (15-85%: {p15:.3f}-{p85:.3f})"
        axes.set_title(title, fontsize=9)
        paths.append(pathlib.Path(out_dir) / overlay_filename(identifier))
        plots.save_figure(figure, paths[-1], dpi=100)
    return paths


def partial_path(out_path):
    """The hidden file that holds the rows of an unfinished run of ``out_path``."""
    out_path = pathlib.Path(out_path)
    return out_path.with_name(f".{out_path.name}.partial")


def lock_path(out_path):
    """The lock file that marks ``out_path`` as being written by a running process."""
    out_path = pathlib.Path(out_path)
    return out_path.with_name(f".{out_path.name}.lock")


def identity_path(out_path):
    """The sidecar of the partial file: which checkpoint and inputs its rows come from."""
    out_path = pathlib.Path(out_path)
    return out_path.with_name(f".{out_path.name}.partial.json")


def record_path(out_path):
    """The sidecar of a finished CSV: the partial file's sidecar, kept when the CSV is complete."""
    out_path = pathlib.Path(out_path)
    return out_path.with_name(f".{out_path.name}.run.json")


def acquire_lock(out_path):
    """Create the lock of ``out_path`` (:func:`locks.acquire`), or raise ValueError: a second run
    on the same output while the first is alive is refused, so two runs never mix their rows."""
    return locks.acquire(lock_path(out_path), f"--out {out_path}", "--out")


def run_identity(checkpoint, inputs):
    """What the rows of a run depend on: the checkpoint (path, size, SHA-256 of the weights, of
    the config and of the interval calibration) and the inputs, as resolved paths."""
    checkpoint = pathlib.Path(checkpoint)
    identity = {"checkpoint": str(checkpoint.resolve()), "size": checkpoint.stat().st_size,
                "sha256": _sha256(checkpoint)}
    config = model.config_path_for(checkpoint) if checkpoint.name.endswith(".weights.h5") else None
    if config is not None and config.exists():
        identity["config_sha256"] = _sha256(config)
    calibration = model.calibration_path_for(checkpoint)
    if calibration.exists():  # the intervals depend on it
        identity["calibration_sha256"] = _sha256(calibration)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    identity["inputs"] = [str(pathlib.Path(item).resolve()) for item in inputs]
    return identity


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_identity(sidecar, partial, identity):
    """Refuse to resume the rows of ``partial`` (a partial file or a finished CSV) when its
    ``sidecar`` says another checkpoint or other inputs produced them."""
    if not sidecar.exists():
        logger.warning("%s: no record of the checkpoint that made these rows (%s); resuming without checking",
                       partial, sidecar.name)
        return
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{sidecar}: cannot resume, the record of the earlier run is unreadable ({error})") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{sidecar}: cannot resume, the record of the earlier run is unreadable")
    if stored.get("inputs") != identity["inputs"]:
        raise ValueError(f"cannot resume: the rows in {partial} were predicted from other inputs "
                         f"({' '.join(stored.get('inputs') or [])}); rerun without --resume or with the same inputs")
    for key in ("checkpoint", "size", "sha256", "config_sha256"):
        if stored.get(key) != identity.get(key):
            raise ValueError(f"cannot resume: the rows in {partial} were predicted with another checkpoint "
                             f"({stored.get('checkpoint')}, sha256 {str(stored.get('sha256'))[:12]}), not "
                             f"{identity['checkpoint']} (sha256 {identity['sha256'][:12]}); rerun without --resume "
                             "or with the same --checkpoint")


def _valid_row(row):
    if len(row) != len(COLUMNS) or not row[1]:
        return False
    try:
        return all(np.isfinite(float(value)) for value in row[2:])
    except ValueError:
        return False


def read_finished_rows(out_path, partial, identity=None):
    """Rows already predicted by earlier runs (the finished CSV and an interrupted run's rows).

    Rows are keyed by ``source``; a file whose header is not this tool's is refused rather
    than mixed into the new output. A torn row (too few fields or numbers that do not parse,
    as an interrupted write leaves) is dropped, so its cutout is predicted again. With
    ``identity`` (:func:`run_identity`), the rows of both must come from the same checkpoint
    and inputs, as recorded beside them (:func:`identity_path` for the partial file,
    :func:`record_path` for the finished CSV); rows without a record are kept with a warning.
    """
    rows, seen = [], set()
    for path in (out_path, partial):
        if path.is_symlink():
            raise ValueError(f"{path}: is a symbolic link; refusing to read or replace it")
        if not path.exists():
            continue
        if identity is not None:
            _check_identity(identity_path(out_path) if path == partial else record_path(out_path), path, identity)
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader, None)
                if header is None:
                    continue
                if tuple(header) != COLUMNS and path == partial and ",".join(COLUMNS).startswith(",".join(header)):
                    continue  # a header cut short: the interrupted run wrote no rows
                if tuple(header) != COLUMNS:
                    raise ValueError(f"{path}: cannot resume, its columns {header} are not {list(COLUMNS)}")
                torn = 0
                for row in reader:
                    if not _valid_row(row):
                        torn += 1
                    elif row[1] not in seen:
                        seen.add(row[1])
                        rows.append(row)
            except csv.Error as error:
                raise ValueError(f"{path}: cannot resume, the file is not a readable CSV ({error})") from None
        if torn:
            logger.warning("%s: %d incomplete row(s) dropped; their cutouts are predicted again", path, torn)
    return rows


def _open_partial(out):
    """Create the partial file of ``out`` anew, never through a symbolic link."""
    partial = partial_path(out)
    if partial.is_symlink():
        raise ValueError(f"{partial}: is a symbolic link; refusing to write through it (remove it)")
    try:
        return common.open_new_file(partial)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create {partial} ({error.strerror})") from None


def predicted_batches(refs, predictor, batch_size, image_size, errors, strict=False, log=True):
    """Stream ``refs`` through ``predictor``, one forward pass per batch.

    Yields
    ------
    refs : list of prep_data.CutoutRef
        The batch's readable cutouts.
    images : ndarray (B, S, S, 1)
        Their prepared images.
    result : dict of str -> ndarray
        The predictor's output for them (summaries, and heat maps with GradCAM).
    n_read : int
        Cutouts of the batch, bad ones included (for a progress bar).

    A bad cutout is logged (unless ``log`` is false) and its message appended to ``errors``;
    with ``strict`` it raises :class:`prep_data.CutoutError` instead.
    """
    for batch in cutout_batches(refs, batch_size, image_size):
        messages = batch["error"]
        for message in filter(None, messages):
            if strict:
                raise prep_data.CutoutError(message)
            if log:
                logger.error("%s", message)
            errors.append(message)
        good = np.array([not message for message in messages])
        if good.any():
            images = batch["image"][good]
            yield [refs[i] for i in batch["index"][good]], images, predictor(images), len(messages)
        else:
            yield [], None, None, len(messages)


def cutout_batches(refs, batch_size, image_size):
    """Prepared cutouts of ``refs`` in batches, in order, as NumPy: the stream of :func:`predicted_batches`.

    ``prep_data.cutout_dataset`` (tf.data) on the TensorFlow backend, ``loaders.CutoutLoader``
    on the others; either way each batch is a dict of ``image`` (B, S, S, 1), ``index`` (B,)
    positions in ``refs`` and ``error``, B messages (str, empty for a prepared cutout).
    """
    if keras.backend.backend() != "tensorflow":
        yield from loaders.iterate(loaders.CutoutLoader(refs, batch_size, image_size))
        return
    for batch in prep_data.cutout_dataset(refs, batch_size, image_size):
        yield {"image": batch["image"].numpy(), "index": batch["index"].numpy(),
               "error": [message.decode() for message in batch["error"].numpy()]}


def _rows_and_overlays(batch_refs, images, result, gradcam_dir, style):
    """CSV rows of a predicted batch and, with ``gradcam_dir``, its overlays as (source, id, path)."""
    summaries = zip(*(result[key] for key in SUMMARY_KEYS))
    rows = [[ref.id, ref.source, *(f"{value:.5f}" for value in values)] for ref, values in zip(batch_refs, summaries)]
    overlays = []
    if gradcam_dir is not None:
        paths = save_overlays(images, result["heatmaps"], [ref.id for ref in batch_refs], gradcam_dir, result, style)
        overlays = [(ref.source, ref.id, path) for ref, path in zip(batch_refs, paths)]
    return rows, overlays


def _predict(refs, predictor, batch_size, image_size, gradcam_dir, style, errors, strict=False, log=True):
    """Yield ``(rows, overlays, n_read)`` per batch of ``refs`` (see :func:`predicted_batches`)."""
    for batch_refs, images, result, n_read in predicted_batches(refs, predictor, batch_size, image_size, errors,
                                                                strict, log):
        rows, overlays = _rows_and_overlays(batch_refs, images, result, gradcam_dir, style) if batch_refs else ([], [])
        yield rows, overlays, n_read


@functools.lru_cache(maxsize=2)
def _worker_predictor(checkpoint, gradcam):
    # One model per worker process and checkpoint, kept for the worker's later partitions.
    config = model.read_config(checkpoint)
    return model.Predictor(model.load_icl_model(checkpoint, config), gradcam=gradcam,
                           interval_scale=model.load_interval_scale(checkpoint)), config.image_size


def predict_partition(refs, checkpoint, batch_size, gradcam_dir=None, style=None):
    """The Dask task of :func:`run`: predict one partition of cutouts on a worker.

    Returns ``(rows, overlays, errors, n_read)``: the CSV rows and overlays (written by the worker
    into ``gradcam_dir``, which must be on a file system every machine sees) of the readable
    cutouts, one message per bad cutout, and the number of cutouts read.
    """
    parallel.quiet_worker()
    predictor, image_size = _worker_predictor(str(checkpoint), gradcam_dir is not None)
    rows, overlays, errors = [], [], []
    for batch_rows, batch_overlays, _ in _predict(refs, predictor, batch_size, image_size, gradcam_dir, style, errors,
                                                  log=False):
        rows += batch_rows
        overlays += batch_overlays
    return rows, overlays, errors, len(refs)


def _predict_on_cluster(client, parts, checkpoint, batch_size, gradcam_dir, style, errors, strict):
    """Yield ``(rows, overlays, n_read)`` per partition, in input order, from the cluster's tasks."""
    for rows, overlays, partition_errors, n_read in parallel.map_in_order(
            client, predict_partition, parts, checkpoint, batch_size, gradcam_dir, style):
        if partition_errors and strict:
            raise prep_data.CutoutError(partition_errors[0])
        for message in partition_errors:
            logger.error("%s", message)
        errors += partition_errors
        yield rows, overlays, n_read


def run(inputs, out=None, gradcam_dir=None, checkpoint=None, batch_size=BATCH_SIZE, strict=False, resume=False,
        style=None, progress=True, client=None, partition_size=parallel.PARTITION_SIZE, summary=None,
        gradcam_option="--gradcam-dir"):
    """Predict every cutout of ``inputs``: rows to the CSV ``out``, overlays to ``gradcam_dir``.

    Parameters
    ----------
    inputs : sequence of str or path
        FITS, HDF5 or .npy files, or folders of them (``prep_data.index_cutouts``).
    out : path, optional
        CSV of the predictions (see the module's description); None writes none.
    gradcam_dir : path, optional
        Folder for one GradCAM overlay PNG per cutout; None computes no heat maps. A cutout whose
        id repeats an earlier one's overwrites its overlay, with a warning.
    checkpoint : path, optional
        ICL checkpoint; ``model.default_checkpoint()`` when omitted.
    batch_size : int
    strict : bool
        Stop at the first bad cutout (:class:`prep_data.CutoutError`).
    resume : bool
        Keep the rows of ``out`` and of an interrupted run's partial file, and skip their cutouts.
    style : OverlayStyle, optional
        Of the overlays; the default style when omitted.
    progress : bool
        Show a progress bar.
    client : dask.distributed.Client, optional
        Run the predictions on this Dask cluster, ``partition_size`` cutouts per task
        (:mod:`parallel`); the output is the same as without it.
    partition_size : int
    summary : dict, optional
        Filled with ``started`` (True once the partial file is written), ``kept`` (rows kept from
        an earlier run) and ``rows`` (rows in ``out``).
    gradcam_option : str
        The option that named ``gradcam_dir``, for messages.

    A second run on the same ``out`` while one is running is refused (a lock file beside it);
    the partial file is created anew (never through a symbolic link), with a sidecar recording
    the checkpoint and inputs, which ``resume`` checks.

    Returns
    -------
    n_predicted : int
        Cutouts predicted by this call.
    overlays : list of pathlib.Path
        Distinct overlay files written, in input order.
    errors : list of str
        One message per cutout (or file) that could not be read.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    # Outputs and checkpoint first: a run that cannot finish fails before any work.
    if out is not None:
        out = common.check_output_file(out, "--out")
    if gradcam_dir is not None:
        common.check_output_dir(gradcam_dir, gradcam_option)
    checkpoint = pathlib.Path(checkpoint) if checkpoint else model.default_checkpoint()
    config = model.read_config(checkpoint)
    # Loaded here even for a cluster: a checkpoint that cannot be read fails before any work.
    predictor = model.Predictor(model.load_icl_model(checkpoint, config), gradcam=gradcam_dir is not None,
                                interval_scale=model.load_interval_scale(checkpoint))
    refs, file_errors = prep_data.index_cutouts(inputs, missing_ok=True)
    errors = [message for _, message in file_errors]
    if errors and strict:
        raise prep_data.CutoutError(errors[0])
    for message in errors:
        logger.error("%s", message)

    lock = acquire_lock(out) if out is not None else None
    try:
        return _run_locked(refs, errors, predictor, config, checkpoint, inputs, out, gradcam_dir, batch_size,
                           strict, resume, style, progress, client, partition_size, summary)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def _run_locked(refs, errors, predictor, config, checkpoint, inputs, out, gradcam_dir, batch_size, strict, resume,
                style, progress, client, partition_size, summary):
    done_rows, handle, writer = [], None, None
    if out is not None:
        identity = run_identity(checkpoint, inputs)
        done_rows = read_finished_rows(out, partial_path(out), identity) if resume else []
        handle = _open_partial(out)
        if summary is not None:
            summary["started"] = True
        common.write_json(identity_path(out), identity)
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(done_rows)
        handle.flush()
    done = {row[1] for row in done_rows}
    todo = [ref for ref in refs if ref.source not in done]
    if done:
        logger.info("resuming: %d cutouts already predicted, %d to go", len(refs) - len(todo), len(todo))
    n_predicted, overlays = 0, {}
    bar = common.progress(total=len(refs), initial=len(refs) - len(todo), unit="cutout", desc="predicting",
                          disable=not progress or len(refs) < 2 * batch_size)
    if client is None:
        units = _predict(todo, predictor, batch_size, config.image_size, gradcam_dir, style, errors, strict)
    else:
        units = _predict_on_cluster(client, parallel.partitions(todo, partition_size), str(checkpoint.resolve()),
                                    batch_size, gradcam_dir, style, errors, strict)
    try:
        for rows, batch_overlays, n_read in units:
            if rows and writer is not None:
                writer.writerows(rows)
                handle.flush()
            for source, identifier, path in batch_overlays:
                if path in overlays:
                    logger.warning("%s: id '%s' repeats an earlier cutout's; %s was overwritten",
                                   source, identifier, path.name)
                overlays.setdefault(path, source)
            n_predicted += len(rows)
            bar.update(n_read)
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    if out is not None:
        # The partial file is complete: it becomes the CSV, and its sidecar the CSV's record
        # (dropped first, so that a CSV is never next to another run's record).
        record_path(out).unlink(missing_ok=True)
        os.replace(partial_path(out), out)
        os.replace(identity_path(out), record_path(out))
    if summary is not None:
        summary.update(kept=len(done_rows), rows=len(done_rows) + n_predicted)
    return n_predicted, list(overlays), errors
