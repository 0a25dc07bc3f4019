"""The ICL model over cutout files: the batch loop of ``predict.py`` and ``gradcam.py``.

Cutouts stream from disk in batches (``prep_data.cutout_dataset``) and each batch goes once
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
import logging
import os
import pathlib
import re

import numpy as np

import common
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


def read_finished_rows(out_path, partial):
    """Rows already predicted by earlier runs (the finished CSV and an interrupted run's rows).

    Rows are keyed by ``source``; a file whose header is not this tool's is refused rather
    than mixed into the new output.
    """
    rows, seen = [], set()
    for path in (out_path, partial):
        if not path.exists():
            continue
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                continue
            if tuple(header) != COLUMNS:
                raise ValueError(f"{path}: cannot resume, its columns {header} are not {list(COLUMNS)}")
            for row in reader:
                if len(row) == len(COLUMNS) and row[1] not in seen:
                    seen.add(row[1])
                    rows.append(row)
    return rows


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
    for batch in prep_data.cutout_dataset(refs, batch_size, image_size):
        messages = [message.decode() for message in batch["error"].numpy()]
        for message in filter(None, messages):
            if strict:
                raise prep_data.CutoutError(message)
            if log:
                logger.error("%s", message)
            errors.append(message)
        good = np.array([not message for message in messages])
        if good.any():
            images = batch["image"].numpy()[good]
            yield [refs[i] for i in batch["index"].numpy()[good]], images, predictor(images), len(messages)
        else:
            yield [], None, None, len(messages)


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
    return model.Predictor(model.load_icl_model(checkpoint, config), gradcam=gradcam), config.image_size


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
        style=None, progress=True, client=None, partition_size=parallel.PARTITION_SIZE):
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
    checkpoint = pathlib.Path(checkpoint) if checkpoint else model.default_checkpoint()
    config = model.read_config(checkpoint)
    refs, file_errors = prep_data.index_cutouts(inputs)
    errors = [message for _, message in file_errors]
    if errors and strict:
        raise prep_data.CutoutError(errors[0])
    for message in errors:
        logger.error("%s", message)
    # Loaded here even for a cluster: a checkpoint that cannot be read fails before any work.
    predictor = model.Predictor(model.load_icl_model(checkpoint, config), gradcam=gradcam_dir is not None)

    done_rows, handle, writer = [], None, None
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        done_rows = read_finished_rows(out, partial_path(out)) if resume else []
        handle = open(partial_path(out), "w", newline="")
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(done_rows)
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
        os.replace(partial_path(out), out)  # the partial file is complete: it becomes the CSV
    return n_predicted, list(overlays), errors
