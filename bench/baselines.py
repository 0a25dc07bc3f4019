"""The original code's ways of computing what the project now computes faster: the baselines
that the benchmarks time against."""


def original_summary(params, grid):
    """Mode and 15/85 percentiles as the original computed them: one density call per grid point."""
    import keras
    import numpy as np

    import model

    if keras.backend.backend() == "tensorflow":  # the original's own call: tfp's mixture ``prob``
        mixture = model.beta_mixture(params)

        def density(x):
            return mixture.prob(np.float32(x)).numpy()
    else:

        def density(x):
            return keras.ops.convert_to_numpy(model.mixture_pdf(params, np.array([x], np.float32)))[:, 0]

    pdf = np.stack([density(x) for x in grid], axis=-1)
    cdf = np.cumsum(pdf, axis=-1)
    cdf /= cdf[:, -1:]
    return {
        "mode": grid[np.argmax(pdf, axis=-1)],
        "p15": grid[np.argmax(cdf >= 0.15, axis=-1)],
        "p85": grid[np.argmax(cdf >= 0.85, axis=-1)],
    }
