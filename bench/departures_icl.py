"""Measure two departures of the ICL regressor from the original code (DEPARTURES.md).

    python bench/departures_icl.py orientations CHECKPOINT MOCKS.h5 [--label-key KEY]
    python bench/departures_icl.py padding CHECKPOINT MOCKS.h5 [--widths 200 168 112] [--label-key KEY]

``orientations``: the original rotated every training image by exactly 90 degrees (its random
choice was never called), so after the random flips it trained on four of the eight symmetries
of the square (R90, R270 and the two transposes) and never on the image as it is; we rotate by
a random multiple of 90 degrees. This predicts the held-out mocks in all eight orientations and
reports the MAE per orientation, the mean MAE on the orientations the original trained on and
on the others, and how far the prediction moves between orientations.

``padding``: the original resized a non-square cutout straight to a square, stretching it along
its short axis; we pad it to a square first. The held-out mocks (224 x 224 pixels, +-300 kpc)
are cut to 224 rows x W columns, at one edge (the cluster centre stays put, as when a survey's
edge truncates a cutout) or about the centre, and predicted both ways.

MOCKS.h5: mocks with a truth column, e.g. ``python -m data.generate clusters --n 128 --seed 2000
--out heldout128.h5``. Both print a table; ``--json FILE`` also writes the numbers.
"""

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()

#: The eight symmetries of the square: (transpose first?, quarter turns counter-clockwise).
SYMMETRIES = {f"{'T' if transpose else ''}R{90 * k}": (transpose, k) for transpose in (False, True) for k in range(4)}
#: The orientations the original's training showed (flips, then one quarter turn).
SEEN_BY_ORIGINAL = ("R90", "R270", "TR0", "TR180")
BATCH = 64


def _modes(predictor, images):
    return np.concatenate([predictor(images[i : i + BATCH])["mode"] for i in range(0, len(images), BATCH)])


def orientations(predictor, images, labels):
    """MAE per orientation and how far the predictions move between orientations."""
    import model

    modes = {}
    for name, (transpose, k) in SYMMETRIES.items():
        turned = np.swapaxes(images, 1, 2) if transpose else images
        modes[name] = _modes(predictor, np.ascontiguousarray(np.rot90(turned, k, axes=(1, 2))))
    rotations = np.stack([modes[f"R{90 * k}"] for k in range(4)])
    unseen = [name for name in SYMMETRIES if name not in SEEN_BY_ORIGINAL]
    return {
        "per_orientation": {name: model.regression_metrics(labels, mode) for name, mode in modes.items()},
        "mae_on_orientations_the_original_trained_on": float(np.mean([np.abs(modes[n] - labels).mean() for n in SEEN_BY_ORIGINAL])),
        "mae_on_the_others": float(np.mean([np.abs(modes[n] - labels).mean() for n in unseen])),
        "mean_abs_R90_minus_R0": float(np.abs(modes["R90"] - modes["R0"]).mean()),
        "mean_std_over_the_4_rotations": float(rotations.std(axis=0).mean()),
        "std_of_predictions_between_clusters": float(modes["R0"].std()),
    }


def stretched(image, bad, size):
    """The original's preparation of a non-square cutout: resized straight to size x size."""
    import hsc
    import prep_data

    bad = bad | ~np.isfinite(image)
    resized = prep_data.resize_image(np.where(bad, 0.0, image).astype(np.float32), size)
    resized = np.arcsinh(np.clip(resized, *hsc.CLIP_RANGE) / hsc.ARCSINH_SCALE)
    resized[prep_data.resize_mask(bad, size)] = 0.0
    return resized[..., None].astype(np.float32)


def padding(predictor, cutouts, labels, size, widths):
    """Predictions of cut cutouts padded (ours) and stretched (the original's), by width and cut."""
    import model
    import prep_data

    full = _modes(predictor, np.stack([prep_data.prepare_image(c.image, prep_data.bad_pixels(c), size) for c in cutouts]))
    result = {"full": model.regression_metrics(labels, full), "cuts": {}}
    for width in widths:
        for where in ("edge", "centred"):
            first = 0 if where == "edge" else (cutouts[0].image.shape[1] - width) // 2
            ours, original = [], []
            for cutout in cutouts:
                image = cutout.image[:, first : first + width]
                bad = prep_data.bad_pixels(cutout)[:, first : first + width]
                ours.append(prep_data.prepare_image(image, bad, size))
                original.append(stretched(image, bad, size))
            ours, original = _modes(predictor, np.stack(ours)), _modes(predictor, np.stack(original))
            result["cuts"][f"{width}_{where}"] = {
                "ours": model.regression_metrics(labels, ours),
                "original": model.regression_metrics(labels, original),
                "mean_abs_ours_minus_original": float(np.abs(ours - original).mean()),
                "x_stretch_of_the_original": cutouts[0].image.shape[0] / width,
            }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("orientations", "padding"))
    parser.add_argument("checkpoint")
    parser.add_argument("mocks")
    parser.add_argument("--label-key", default="f_icl_sb_ideal")
    parser.add_argument("--widths", type=int, nargs="+", default=[200, 168, 112])
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    import model
    import prep_data

    try:
        # The inputs first: a missing file fails before TensorFlow starts its devices.
        refs, errors = prep_data.index_cutouts([args.mocks])
        if errors:
            raise prep_data.CutoutError(errors[0][1])
        labels = prep_data.read_labels(refs, args.label_key)
        predictor = model.Predictor(model.load_icl_model(args.checkpoint))
        size = predictor.model.input_shape[1]
        if args.what == "orientations":
            images = np.stack([prep_data.prepare_cutout(prep_data.read_cutout(ref), size) for ref in refs])
            result = orientations(predictor, images, labels)
            for name, metrics in result["per_orientation"].items():
                seen = "trained on by the original" if name in SEEN_BY_ORIGINAL else ""
                print(f"{name:>6}: MAE {metrics['mae']:.4f}  r {metrics['pearson_r']:.3f}  {seen}")
        else:
            cutouts = [prep_data.read_cutout(ref) for ref in refs]
            result = padding(predictor, cutouts, labels, size, args.widths)
            print(f"uncut: MAE {result['full']['mae']:.4f}  r {result['full']['pearson_r']:.3f}")
            for name, cut in result["cuts"].items():
                print(f"{name:>12}: MAE padded {cut['ours']['mae']:.4f} / stretched {cut['original']['mae']:.4f}, "
                      f"r {cut['ours']['pearson_r']:.3f} / {cut['original']['pearson_r']:.3f}, "
                      f"mean |padded - stretched| {cut['mean_abs_ours_minus_original']:.4f}")
    except (ValueError, model.CheckpointError) as error:  # CutoutError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key}: {value:.4f}")
    if args.json:
        common.write_json(args.json, {"checkpoint": args.checkpoint, "mocks": args.mocks, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
