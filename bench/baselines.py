"""The original code's ways of computing what the project now computes faster: the baselines
that the benchmarks time against."""


def original_summary(params, grid):
    """Mode and 15/85 percentiles as the original computed them: one density call per grid point."""
    import numpy as np

    import model

    mixture = model.beta_mixture(params)
    pdf = np.stack([mixture.prob(np.float32(x)).numpy() for x in grid], axis=-1)
    cdf = np.cumsum(pdf, axis=-1)
    cdf /= cdf[:, -1:]
    return {
        "mode": grid[np.argmax(pdf, axis=-1)],
        "p15": grid[np.argmax(cdf >= 0.15, axis=-1)],
        "p85": grid[np.argmax(cdf >= 0.85, axis=-1)],
    }
