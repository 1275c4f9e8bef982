"""Sample-quality and trajectory metrics: curvature, endpoint error, Frechet distance, sliced Wasserstein.

Pure functions; `frechet_distance` works in NumPy float64 (symmetric eigendecompositions), the rest in JAX.
"""
import jax
import jax.numpy as jnp
import numpy as np


def curvature(trajectory, sigmas):
    """Curvature of discrete ODE trajectories (Lee et al. 2023, "Minimizing Trajectory Curvature of ODE-based
    Generative Models": E_t || (x_1 - x_0) - dx_t/dt ||^2 for a flow on t in [0, 1]).

    sigma-space form used here: rescale time to tau = (sigma - sigma_end) / (sigma_0 - sigma_end) in [0, 1], so
    the straight path has velocity x_T - x_end and the discrete velocity of step k is
      v_k = (sigma_0 - sigma_end) (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k)     (the secant slope d_k in tau units).
    Returns the mean over steps k, batch and dimensions of (v_k - (x_T - x_end))^2 (per-dimension mean, so the
    value does not grow with resolution). 0 exactly for straight trajectories traversed at constant speed.
    trajectory: [len(sigmas), B, ...] (x_T first, as samplers return it); sigmas: the grid, decreasing.
    """
    trajectory = jnp.asarray(trajectory)
    sigmas = jnp.asarray(sigmas, trajectory.dtype)
    if trajectory.shape[0] != sigmas.shape[0]:
        raise ValueError(f'curvature: trajectory has {trajectory.shape[0]} points but sigmas has {sigmas.shape[0]}')
    span = sigmas[0] - sigmas[-1]
    shape = (-1,) + (1,) * (trajectory.ndim - 1)
    velocity = span * jnp.diff(trajectory, axis=0) / jnp.diff(sigmas).reshape(shape)           # [K, B, ...]
    chord = trajectory[0] - trajectory[-1]
    return jnp.mean((velocity - chord[None]) ** 2)


def endpoint_rmse(x, x_ref):
    """Root-mean-square difference over all elements between samples and their reference-solve endpoints."""
    x, x_ref = jnp.asarray(x), jnp.asarray(x_ref)
    if x.shape != x_ref.shape:
        raise ValueError(f'endpoint_rmse: shapes differ, {x.shape} vs {x_ref.shape}')
    return jnp.sqrt(jnp.mean((x - x_ref.astype(x.dtype)) ** 2))


def gaussian_statistics(samples):
    """(mean [d], covariance [d, d]) of flattened samples [N, ...] in float64."""
    flat = np.asarray(samples, np.float64).reshape(len(samples), -1)
    return flat.mean(axis=0), np.cov(flat, rowvar=False)


def frechet_distance_from_statistics(mu_a, cov_a, mu_b, cov_b):
    """Frechet distance of two Gaussians (Dowson & Landau 1982; FID, Heusel et al. 2017):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    tr (C_a C_b)^(1/2) is the sum of the square roots of the eigenvalues of C_a C_b, which are those of the
    symmetric S C_b S with S = C_a^(1/2) (eig(S^2 C_b) = eig(S C_b S)); two symmetric eigendecompositions, exact
    also for singular covariances (fewer samples than dimensions), several times faster than a general sqrtm."""
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    w, v = np.linalg.eigh(cov_a)
    s = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s @ cov_b @ s
    trace_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def frechet_distance(a, b):
    """Frechet distance between the Gaussian fits of two sample sets a [N, ...], b [M, ...] (in their own space:
    pixels or features), float64."""
    if np.shape(a)[1:] != np.shape(b)[1:]:
        raise ValueError(f'frechet_distance: sample shapes differ, {np.shape(a)[1:]} vs {np.shape(b)[1:]}')
    if len(a) < 2 or len(b) < 2:
        raise ValueError('frechet_distance needs at least two samples per set')
    return frechet_distance_from_statistics(*gaussian_statistics(a), *gaussian_statistics(b))


def sliced_wasserstein(a, b, key, num_projections=128):
    """Sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015):
    sqrt(E_theta W_2^2(theta . a, theta . b)) over directions theta uniform on the unit sphere, each 1-D W_2 from
    sorted projections. Sets of different sizes are compared at the common quantile levels (i + 1/2) / n."""
    a = jnp.asarray(a).reshape(len(a), -1)
    b = jnp.asarray(b, a.dtype).reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'sliced_wasserstein: dimensions differ, {a.shape[1]} vs {b.shape[1]}')
    theta = jax.random.normal(key, (a.shape[1], num_projections), a.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    proj_a, proj_b = jnp.sort(a @ theta, axis=0), jnp.sort(b @ theta, axis=0)
    if proj_a.shape[0] != proj_b.shape[0]:
        n = max(proj_a.shape[0], proj_b.shape[0])
        levels = (jnp.arange(n) + 0.5) / n
        quantile = lambda p: jnp.quantile(p, levels, axis=0)
        proj_a, proj_b = quantile(proj_a), quantile(proj_b)
    return jnp.sqrt(jnp.mean((proj_a - proj_b) ** 2))


def straightness(trajectory):
    """The Fast-ODE authors' straightness of a solver's discrete trajectory (Lee, Kim, Ye, ICML 2023, their `utils.
    straightness`), for a flow on a uniform time grid t_i = 1 - i / N, i = 0..N, x(t=1) first:

        base = x(t=1) - x(t=0),   v_i = (traj[i-1] - traj[i]) / dt  (dt = 1 / N),
        value = mean over steps i of the element-wise mean of (v_i - base)^2.

    Relation to `curvature`: on the flow's own coordinates x_t and that grid, straightness(traj) equals
    curvature(traj, t_grid) exactly (span 1, the same secant velocities and chord). A jaxdiff sampler runs a flow in
    sigma-space (x = x_t / (1 - t), sigma = t / (1 - t)); convert its trajectory with `flow.trajectory_in_time`
    before calling this. curvature(traj_sigma, sigmas) measures the sigma-space path instead: the straight flow path
    x_t = (1 - t) x0 + t z is x = x0 + sigma z there, also straight at constant speed, so both vanish together, but
    their values differ in general (other coordinates, other time weighting). Both are reported.
    trajectory: [N + 1, B, ...].
    """
    trajectory = jnp.asarray(trajectory)
    if trajectory.shape[0] < 2:
        raise ValueError(f'straightness: the trajectory needs at least 2 points, got {trajectory.shape[0]}')
    dt = 1.0 / (trajectory.shape[0] - 1)
    base = trajectory[0] - trajectory[-1]
    v = (trajectory[:-1] - trajectory[1:]) / dt                                                   # [N, B, ...]
    return jnp.mean(jnp.mean((v - base[None]) ** 2, axis=tuple(range(1, trajectory.ndim))))
