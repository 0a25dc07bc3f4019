"""A small library of test-particle simulations of satellites disrupting in a host potential.

Stellar streams in the tidal-galaxy mocks (:mod:`data.tidal`) are projections of these
particle distributions: the library is integrated once per process (well under a second),
and every image then rotates, scales and bins one snapshot in about a millisecond.

Physics (deliberately simple, in units where the host's circular velocity is 1 and a typical
orbit has size 1):

* Host: a spherical cored logarithmic potential,
  Phi(r) = v0^2 / 2 * ln(r^2 + r_core^2) (Binney & Tremaine 2008, eq. 2.71 without flattening).
* Satellite: a point on an orbit of moderate eccentricity in the host potential; its own
  gravity is ignored (test particles).
* Stripping: the satellite loses particles steadily from its inner and outer tidal points
  (the "particle spray" of Fardal et al. 2015, simplified: offset +-r_tidal along the radius,
  angular velocity kept, small velocity dispersion), which spread into leading and trailing
  arms along the orbit.

Integration is kick-drift-kick leapfrog with a fixed step, vectorised over every particle
of every run at once.
"""

import functools
import logging

import numpy as np

logger = logging.getLogger(__name__)

#: Circular velocity of the host potential (simulation units).
CIRCULAR_VELOCITY = 1.0
#: Core radius of the logarithmic potential (simulation units).
CORE_RADIUS = 0.08
#: Leapfrog time step (simulation units; the circular period at r = 1 is 2 pi).
TIME_STEP = 0.025
#: Particles per run.
PARTICLES_PER_RUN = 2500
#: Simulated satellites in the default library (three snapshots each).
N_RUNS = 8
#: Seed of the default library, so every process builds the same one.
LIBRARY_SEED = 20230807


def acceleration(positions, velocity_scale=CIRCULAR_VELOCITY, core_radius=CORE_RADIUS):
    """Acceleration in the cored logarithmic potential, -grad Phi = -v0^2 x / (r^2 + r_core^2).

    Parameters
    ----------
    positions : ndarray, shape (..., 3)
    velocity_scale, core_radius : float

    Returns
    -------
    ndarray, shape (..., 3)
    """
    r_squared = np.sum(positions * positions, axis=-1, keepdims=True)
    return -(velocity_scale**2) * positions / (r_squared + core_radius**2)


def _integrate_orbit(position, velocity, n_steps, time_step):
    """Leapfrog orbit of one point; returns positions and velocities at every step (n_steps + 1, 3)."""
    positions = np.empty((n_steps + 1, 3))
    velocities = np.empty((n_steps + 1, 3))
    positions[0], velocities[0] = position, velocity
    x, v = np.array(position, float), np.array(velocity, float)
    a = acceleration(x)
    for step in range(1, n_steps + 1):
        v = v + 0.5 * time_step * a
        x = x + time_step * v
        a = acceleration(x)
        v = v + 0.5 * time_step * a
        positions[step], velocities[step] = x, v
    return positions, velocities


def _spray(rng, orbit_positions, orbit_velocities, release_steps, tidal_fraction, dispersion):
    """Initial states of particles released from the satellite at the given steps."""
    x_sat = orbit_positions[release_steps]
    v_sat = orbit_velocities[release_steps]
    radius = np.linalg.norm(x_sat, axis=1, keepdims=True)
    radial = x_sat / radius
    side = rng.choice([-1.0, 1.0], size=(len(release_steps), 1))
    offset = side * tidal_fraction * radius
    # Keep the satellite's angular velocity: the tangential velocity scales with the radius.
    v_radial = np.sum(v_sat * radial, axis=1, keepdims=True) * radial
    v_tangential = v_sat - v_radial
    positions = x_sat + offset * radial
    velocities = v_radial + v_tangential * (1.0 + offset / radius)
    velocities = velocities + dispersion * rng.standard_normal(velocities.shape)
    return positions, velocities


def _random_orbit_start(rng):
    """Start (apocentre) position and velocity of a satellite on a moderately eccentric orbit."""
    apocentre = rng.uniform(0.9, 1.4)
    tangential_speed = rng.uniform(0.45, 0.8) * CIRCULAR_VELOCITY
    return np.array([apocentre, 0.0, 0.0]), np.array([0.0, tangential_speed, 0.0])


def simulate_run(rng, n_particles=PARTICLES_PER_RUN, time_step=TIME_STEP):
    """Set up one run: the satellite's orbit and its particles' release steps and states.

    Parameters
    ----------
    rng : numpy.random.Generator
    n_particles : int
        Number of particles stripped over the run.
    time_step : float
        Leapfrog step (simulation units).

    Returns
    -------
    dict
        ``release_step`` (n,), ``positions`` and ``velocities`` (n, 3) at release,
        ``n_steps`` (total steps of the run) and ``snapshot_steps`` (steps at which the
        library keeps the particle positions).
    """
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}")
    position, velocity = _random_orbit_start(rng)
    n_steps = int(rng.uniform(20.0, 32.0) / time_step)
    orbit_positions, orbit_velocities = _integrate_orbit(position, velocity, n_steps, time_step)
    release = np.sort(rng.integers(0, int(0.8 * n_steps), n_particles))
    tidal_fraction, dispersion = rng.uniform(0.03, 0.06), rng.uniform(0.005, 0.015)
    positions, velocities = _spray(rng, orbit_positions, orbit_velocities, release, tidal_fraction, dispersion)
    snapshot_steps = np.array([int(n_steps * f) for f in (0.8, 0.9, 1.0)])
    return {
        "release_step": release,
        "positions": positions,
        "velocities": velocities,
        "n_steps": n_steps,
        "snapshot_steps": snapshot_steps,
    }


def integrate_runs(runs, time_step=TIME_STEP):
    """Integrate the particles of many runs together and keep their snapshots.

    Particles wait (frozen) until their release step, then follow the host potential.

    Parameters
    ----------
    runs : list of dict
        As returned by :func:`simulate_run`.
    time_step : float

    Returns
    -------
    list of list of ndarray
        For each run, its snapshots, each an array (n_particles, 3) of positions.
    """
    release = np.concatenate([run["release_step"] for run in runs])
    # Sorting by release step makes the moving particles a prefix of the arrays, updated in place.
    order = np.argsort(release, kind="stable")
    release = release[order]
    x = np.concatenate([run["positions"] for run in runs])[order]
    v = np.concatenate([run["velocities"] for run in runs])[order]
    position_in_sorted = np.empty_like(order)
    position_in_sorted[order] = np.arange(len(order))
    offsets = np.cumsum([0] + [len(run["release_step"]) for run in runs])
    wanted = {}
    for i, run in enumerate(runs):
        for step in run["snapshot_steps"]:
            wanted.setdefault(int(step), []).append(i)
    snapshots = [[] for _ in runs]
    n_total = max(run["n_steps"] for run in runs)
    a = acceleration(x)
    for step in range(1, n_total + 1):
        n_active = int(np.searchsorted(release, step, side="left"))
        xa, va, aa = x[:n_active], v[:n_active], a[:n_active]
        va += 0.5 * time_step * aa
        xa += time_step * va
        aa[...] = acceleration(xa)
        va += 0.5 * time_step * aa
        for i in wanted.get(step, ()):
            rows = position_in_sorted[offsets[i] : offsets[i + 1]]
            snapshots[i].append(x[rows].astype(np.float32))
    return snapshots


@functools.lru_cache(maxsize=4)
def stream_library(n_runs=N_RUNS, n_particles=PARTICLES_PER_RUN, seed=LIBRARY_SEED):
    """The library of stream snapshots, built on first use and cached per process.

    Parameters
    ----------
    n_runs : int
        Number of simulated satellites (each gives three snapshots).
    n_particles : int
        Particles per run.
    seed : int
        Seed of the library (the same seed gives the same library in every process).

    Returns
    -------
    tuple of ndarray
        Snapshots, each (n_particles, 3) float32 positions in simulation units (orbits of
        size about 1, centred on the host).
    """
    if n_runs < 1:
        raise ValueError(f"n_runs must be >= 1, got {n_runs}")
    rng = np.random.default_rng(seed)
    runs = [simulate_run(rng, n_particles) for _ in range(n_runs)]
    logger.info("integrating the stream library: %d runs of %d particles", n_runs, n_particles)
    return tuple(snapshot for run_snapshots in integrate_runs(runs) for snapshot in run_snapshots)
