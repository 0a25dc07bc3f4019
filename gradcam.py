"""GradCAM heat maps of the ICL regressor: which pixels drive the predicted ICL fraction.

GradCAM (Selvaraju et al. 2017, arXiv:1610.02391) weighs each channel c of the encoder's
last convolutional feature map A (before global pooling) by the spatial mean of the gradient
of a scalar score y with respect to it (their eq. 1), and keeps the positive part of the
weighted sum of channels (their eq. 2):

    w_c = 1 / (H W) * sum_ij dy / dA_ij^c,      L = ReLU(sum_c w_c A^c)

Here y is the mean of the predicted Beta mixture, sum_k w_k a_k / (a_k + b_k) (SPEC Part A,
GradCAM). The map is upsampled bilinearly to the input size and divided by its maximum, so each
image's map lies in [0, 1]; a map with no positive evidence stays all zero. Because the model
reads the feature map through its global average, the gradient is the same at every position
of a channel, so w_c is the head's derivative by the pooled feature c divided by H W, and L is
the class activation map of Zhou et al. (2016, arXiv:1512.04150) with those derivatives as
weights. The computation is ``model.gradcam_heatmaps``; the batch loop is ``predict.py``'s
(``inference.run``), so ``predict.py --gradcam-dir DIR`` writes the same files beside its CSV.

Each INPUT is a FITS cutout, an HDF5 file of cutouts, a .npy file of prepared images, or a
directory of them, read exactly as ``predict.py`` reads them. One PNG per cutout is written to
the output directory: the prepared image with the heat map over it, titled with the cutout id
and the predicted f_ICL (the mode) with its 15-85% range. Cutouts that cannot be read are
reported one line each and the exit status is 1; the others are still processed.

Example::

    python gradcam.py clusters/ --out-dir gradcam/
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import logging
import sys

import inference
import model
import prep_data

#: Cutouts per batch.
BATCH_SIZE = 16


def build_parser():
    defaults = inference.OverlayStyle
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FITS/HDF5/.npy files or directories of them")
    parser.add_argument("--out-dir", required=True, help="directory for the overlay PNGs")
    parser.add_argument("--checkpoint", help="weights (.weights.h5 with its .config.json, or .keras); default: the shipped one")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"cutouts per batch (default {BATCH_SIZE})")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad cutout")
    parser.add_argument("--overlay-alpha", type=float, default=defaults.alpha,
                        help=f"heat-map opacity where it is 1 (default {defaults.alpha})")
    parser.add_argument("--colormap", default=defaults.colormap,
                        help=f"Matplotlib colour map of the heat map (default {defaults.colormap})")
    parser.add_argument("--display-percentiles", type=float, nargs=2, default=defaults.display_percentiles,
                        metavar=("LOW", "HIGH"), help="image percentiles shown as black and white (default %(default)s)")
    common.add_verbose_argument(parser)
    return parser


@common.interruptible("interrupted: each overlay already written is complete; rerun the same command to "
                      "write them all")
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        style = inference.OverlayStyle(args.overlay_alpha, args.colormap, tuple(args.display_percentiles))
        _, paths, errors = inference.run(args.inputs, gradcam_dir=args.out_dir, checkpoint=args.checkpoint,
                                         batch_size=args.batch_size, strict=args.strict, style=style,
                                         gradcam_option="--out-dir")
    except (ValueError, OSError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} GradCAM overlays to {args.out_dir}")
    return common.report_bad_cutouts(errors, "processed")


if __name__ == "__main__":
    sys.exit(main())
