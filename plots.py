"""Figures shared by the scripts: predicted against true ICL fractions, training curves,
galleries of tidal galaxies.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never through
``pyplot``, so writing a plot neither switches nor needs a user's backend (a notebook keeps
its inline plots) and leaves no open figure behind. Every figure is written atomically.
"""

import pathlib

import numpy as np

import common


def new_figure(nrows=1, ncols=1, **options):
    """A figure and its axes (``Figure.subplots``), outside pyplot; ``options`` go to ``Figure``."""
    import logging

    from matplotlib.figure import Figure

    # A missing optional font (mathtext asks for "DejaVu Sans Display") falls back silently.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    figure = Figure(**options)
    return figure, figure.subplots(nrows, ncols)


def save_figure(figure, path, dpi=120, tight=True):
    """Write a figure to ``path`` (the format from its suffix, PNG by default), atomically.

    ``tight`` trims the margins to the drawn content (``bbox_inches="tight"``).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight" if tight else None, format=path.suffix.lstrip(".") or "png")


def binned_statistics(labels, estimates, n_bins=20, lower=0.0, upper=None):
    """Median and percentile bands of ``estimates`` in bins of ``labels``.

    Returns a dict of arrays (one entry per non-empty bin): ``centre``, ``median``, and the
    bands ``p15``/``p85`` (median +- 35 percentiles) and ``p5``/``p95`` (+- 45 percentiles).
    """
    labels = np.asarray(labels, dtype=float)
    estimates = np.asarray(estimates, dtype=float)
    upper = float(labels.max()) if upper is None else upper
    edges = np.linspace(lower, max(upper, lower + 1e-6), n_bins + 1)
    which = np.clip(np.digitize(labels, edges) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        values = estimates[which == b]
        if values.size:
            rows.append([0.5 * (edges[b] + edges[b + 1]), *np.percentile(values, [50, 15, 85, 5, 95])])
    rows = np.asarray(rows).reshape(-1, 6)
    return dict(zip(("centre", "median", "p15", "p85", "p5", "p95"), rows.T))


def plot_binned(labels, estimates, path, n_bins=20, title=None, label_name="true $f_{ICL}$"):
    """Median predicted ICL fraction in bins of the true one, with 35 and 45 percentile bands."""
    stats = binned_statistics(labels, estimates, n_bins)
    figure, axis = new_figure(figsize=(5, 5))
    axis.fill_between(stats["centre"], stats["p5"], stats["p95"], color="tab:blue", alpha=0.2, label="5-95%")
    axis.fill_between(stats["centre"], stats["p15"], stats["p85"], color="tab:blue", alpha=0.4, label="15-85%")
    axis.plot(stats["centre"], stats["median"], "o-", color="tab:blue", label="median")
    top = max(float(np.max(labels)), float(np.max(estimates))) * 1.05
    axis.plot([0, top], [0, top], "k--", lw=1, label="1:1")
    axis.set(xlim=(0, top), ylim=(0, top), xlabel=label_name, ylabel="predicted $f_{ICL}$ (mode)", title=title)
    axis.legend(loc="upper left")
    save_figure(figure, path)


def plot_scatter(labels, summary, path, title=None, label_name="measured $f_{ICL}$"):
    """Predicted mode against the label, with 15-85% error bars."""
    labels = np.asarray(labels)
    mode = np.asarray(summary["mode"])
    errors = np.vstack([mode - np.asarray(summary["p15"]), np.asarray(summary["p85"]) - mode]).clip(min=0)
    figure, axis = new_figure(figsize=(5, 5))
    axis.errorbar(labels, mode, yerr=errors, fmt="o", ms=3, alpha=0.7, elinewidth=0.8)
    top = max(float(labels.max()), float(np.asarray(summary["p85"]).max())) * 1.05
    axis.plot([0, top], [0, top], "k--", lw=1)
    axis.set(xlim=(0, top), ylim=(0, top), xlabel=label_name, ylabel="predicted $f_{ICL}$ (mode, 15-85%)", title=title)
    save_figure(figure, path)


def display_rgb(image):
    """RGB (i, r, g) of a stretched 5-band tidal cutout, each band scaled to its 99.5th percentile."""
    rgb = np.stack([image[..., 2], image[..., 1], image[..., 0]], axis=-1)
    rgb = rgb - np.percentile(rgb, 1, axis=(0, 1))
    return np.clip(rgb / np.maximum(np.percentile(rgb, 99.5, axis=(0, 1)), 1e-6), 0, 1)


def plot_gallery(images, result, path, columns=6):
    """The query galaxy and its most similar galaxies (``nnclr_model.similarity_search``'s result).

    Each panel is titled with the galaxy's id and cosine similarity; tidal galaxies in red.
    """
    panels = [(result["query_index"], f"query {result['query']['id']}", result["query"]["has_tidal"])]
    panels += [(row["index"], f"{row['id']}\ncos {row['similarity']:.3f}", row["has_tidal"]) for row in result["top"]]
    rows = int(np.ceil(len(panels) / columns))
    figure, axes = new_figure(rows, columns, figsize=(1.8 * columns, 2.0 * rows))
    axes = np.asarray(axes).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, (index, title, tidal) in zip(axes, panels):
        axis.imshow(display_rgb(images[index]), origin="lower")
        axis.set_title(title + ("\ntidal" if tidal else ""), fontsize=7, color="C3" if tidal else "k")
    save_figure(figure, path)
