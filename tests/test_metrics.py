"""Metrics on cases with closed-form answers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic, metrics, samplers, schedules


def test_curvature_is_zero_for_the_straight_flow_of_a_point_mass():
    # D = mu for a point mass: the PF-ODE flow x(sigma) = mu + sigma / sigma_T (x_T - mu) is a straight line at
    # constant speed; Euler follows it exactly.
    mu = jnp.array([[1.0, -2.0, 0.5]])
    point = analytic.GaussianMixture(mu, jnp.array([0.0]), jnp.array([1.0]))
    x_T = jax.random.normal(jax.random.key(0), (4, 3)) * 10
    sigmas = schedules.get('edm', num_steps=6, sigma_min=0.01, sigma_max=10.0)
    _, info = samplers.get('euler')(point.denoiser, x_T, sigmas, return_trajectory=True)
    assert float(metrics.curvature(info['trajectory'], sigmas)) < 1e-8


def test_curvature_of_a_bent_path_by_hand():
    # 1-D path 0 -> 1 -> 1 over sigma 2 -> 1 -> 0
    trajectory = jnp.array([[0.0], [1.0], [1.0]])[:, None]
    sigmas = jnp.array([2.0, 1.0, 0.0])
    # v_k = 2 * (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k) = [-2, 0]; chord = 0 - 1 = -1
    assert float(metrics.curvature(trajectory, sigmas)) == pytest.approx(((-2 + 1) ** 2 + (0 + 1) ** 2) / 2)


def test_endpoint_rmse():
    assert float(metrics.endpoint_rmse(jnp.ones((2, 3)), jnp.zeros((2, 3)))) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.endpoint_rmse(jnp.ones((2, 3)), jnp.zeros((3, 2)))


def test_frechet_distance_closed_forms():
    # diagonal Gaussians: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    mu_a, mu_b = np.zeros(3), np.array([1.0, 2.0, 0.0])
    got = metrics.frechet_distance_from_statistics(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    # a shifted copy has identical covariance: the distance is exactly |shift|^2
    x = np.random.default_rng(0).normal(size=(500, 6)) @ np.random.default_rng(1).normal(size=(6, 6))
    shift = np.arange(6.0) / 3
    assert metrics.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)
    assert abs(metrics.frechet_distance(x, x)) < 1e-6


def test_sliced_wasserstein():
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (400, 8))
    assert float(metrics.sliced_wasserstein(x, x, key)) < 1e-6
    shift = jnp.full((8,), 1.0)
    # every projection is shifted by theta . c, so SW^2 = E (theta . c)^2 = |c|^2 / d for uniform directions
    sw = float(metrics.sliced_wasserstein(x, x + shift, key, num_projections=4096))
    assert sw == pytest.approx(1.0, rel=0.05)
    # different sizes: compared at common quantiles
    assert float(metrics.sliced_wasserstein(x, jnp.concatenate([x, x]), key)) < 0.05


def test_straightness_by_hand_and_equal_to_curvature_on_a_uniform_time_grid():
    # 1-D path 0 -> 1 -> 1 over t = 1, 1/2, 0: v_i = (traj[i-1] - traj[i]) / (1/2) = [-2, 0], base = 0 - 1 = -1
    trajectory = jnp.array([[0.0], [1.0], [1.0]])[:, None]
    assert float(metrics.straightness(trajectory)) == pytest.approx(((-2 + 1) ** 2 + (0 + 1) ** 2) / 2)
    # the authors' straightness is curvature with sigmas = the uniform t grid 1 -> 0 (span 1)
    trajectory = jax.random.normal(jax.random.key(0), (7, 3, 4, 2))
    times = jnp.linspace(1.0, 0.0, 7)
    assert float(metrics.straightness(trajectory)) == pytest.approx(float(metrics.curvature(trajectory, times)),
                                                                     rel=1e-5)
    with pytest.raises(ValueError):
        metrics.straightness(trajectory[:1])
