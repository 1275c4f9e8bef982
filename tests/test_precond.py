"""EDM Table 1 preconditioning, loss weights and training noise levels against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sigma_of_c_noise
from jaxdiff.core import precond


def test_edm_coefficients_match_table_1_by_hand():
    # sigma = 1, sigma_data = 0.5: sigma^2 + sigma_data^2 = 1.25
    c = precond.edm(jnp.array([1.0, 2.0]), sigma_data=0.5)
    np.testing.assert_allclose(c.c_skip, [0.25 / 1.25, 0.25 / 4.25], rtol=1e-6)
    np.testing.assert_allclose(c.c_out, [0.5 / math.sqrt(1.25), 1.0 / math.sqrt(4.25)], rtol=1e-6)
    np.testing.assert_allclose(c.c_in, [1 / math.sqrt(1.25), 1 / math.sqrt(4.25)], rtol=1e-6)
    np.testing.assert_allclose(c.c_noise, [0.0, math.log(2.0) / 4], atol=1e-7)
    np.testing.assert_allclose(precond.edm_weight(jnp.array([1.0, 2.0]), sigma_data=0.5), [5.0, 4.25], rtol=1e-6)


def test_edm_weight_gives_the_network_unit_weight():
    """lambda(sigma) c_out(sigma)^2 = 1 (EDM Sec. 5): the effective loss on F has weight one at every sigma."""
    sigma = jnp.geomspace(0.002, 80.0, 50)
    for sigma_data in (0.5, 1.3):
        c = precond.edm(sigma, sigma_data=sigma_data)
        np.testing.assert_allclose(precond.edm_weight(sigma, sigma_data=sigma_data) * c.c_out ** 2, 1.0, rtol=1e-5)
        # and c_in normalises the input: Var(c_in (y + sigma n)) = 1 for Var(y) = sigma_data^2
        np.testing.assert_allclose(c.c_in ** 2 * (sigma_data ** 2 + sigma ** 2), 1.0, rtol=1e-5)


def test_vp_coefficients_match_table_1_by_hand():
    c = precond.vp(jnp.array([1.0]), beta_d=19.9, beta_min=0.1, M=1000)
    # sigma^-1(1) = (sqrt(0.1^2 + 2 * 19.9 * ln 2) - 0.1) / 19.9 = (sqrt(27.5972534) - 0.1) / 19.9 = 0.2589602
    t = (math.sqrt(0.01 + 2 * 19.9 * math.log(2.0)) - 0.1) / 19.9
    assert abs(t - 0.2589602) < 1e-6
    np.testing.assert_allclose(c.c_skip, [1.0])
    np.testing.assert_allclose(c.c_out, [-1.0])
    np.testing.assert_allclose(c.c_in, [1 / math.sqrt(2.0)], rtol=1e-6)
    np.testing.assert_allclose(c.c_noise, [999 * t], rtol=1e-5)
    np.testing.assert_allclose(precond.vp_weight(jnp.array([2.0])), [0.25])


def test_vp_schedule_endpoints_and_inverse():
    # sigma(1) = sqrt(exp(19.9 / 2 + 0.1) - 1) = sqrt(e^10.05 - 1) ~ 152.2 (EDM's VP sigma_max)
    np.testing.assert_allclose(precond.vp_sigma_of_t(1.0), math.sqrt(math.exp(10.05) - 1), rtol=1e-5)
    sigma = jnp.geomspace(0.01, 100.0, 20)
    np.testing.assert_allclose(precond.vp_sigma_of_t(precond.vp_t_of_sigma(sigma)), sigma, rtol=1e-4)


def test_vp_schedule_runs_in_float64_numpy_for_numpy_input():
    """schedules builds its grids on the host in float64 through these same two functions."""
    t = np.linspace(0.0, 1.0, 11)
    sigma = precond.vp_sigma_of_t(t)
    assert isinstance(sigma, np.ndarray) and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.sqrt(np.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1), rtol=1e-13)
    np.testing.assert_allclose(precond.vp_t_of_sigma(sigma[1:]), t[1:], rtol=1e-12)
    assert isinstance(precond.vp_sigma_of_t(jnp.asarray(t)), jax.Array)


def test_edm_noise_label_is_a_quarter_log_sigma():
    np.testing.assert_allclose(precond.edm_noise_label(jnp.array([1.0, math.e ** 4])), [0.0, 1.0], atol=1e-6)
    sigma = jnp.array([0.002, 0.3, 80.0])
    np.testing.assert_allclose(sigma_of_c_noise('edm', precond.edm_noise_label(sigma)), sigma, rtol=1e-6)


@pytest.mark.parametrize('c', [2.0, np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)])
def test_per_example_broadcasts_a_scalar_or_one_value_per_example(c):
    x = np.ones((3, 2, 4))
    got = precond.per_example(c, x)
    assert got.shape == (3, 1, 1)
    np.testing.assert_array_equal(np.asarray(got * x)[:, 1, 3], np.broadcast_to(np.ravel(c), (3,)))


def test_ve_coefficients_match_table_1_by_hand():
    c = precond.ve(jnp.array([2.0, 0.02]))
    np.testing.assert_allclose(c.c_skip, [1.0, 1.0])
    np.testing.assert_allclose(c.c_out, [2.0, 0.02])
    np.testing.assert_allclose(c.c_in, [1.0, 1.0])
    np.testing.assert_allclose(c.c_noise, [0.0, math.log(0.01)], atol=1e-6)
    np.testing.assert_allclose(precond.ve_weight(jnp.array([0.5])), [4.0])


def test_apply_is_eq_7():
    x = jnp.arange(2 * 3, dtype=jnp.float32).reshape(2, 3)
    sigma = jnp.array([0.5, 3.0])
    c = precond.edm(sigma)
    seen = {}

    def F(x_in, c_noise):
        seen['x_in'], seen['c_noise'] = x_in, c_noise
        return jnp.ones_like(x_in)

    D = precond.apply(F, x, c)
    np.testing.assert_allclose(seen['x_in'], c.c_in[:, None] * x, rtol=1e-6)
    np.testing.assert_allclose(seen['c_noise'], jnp.log(sigma) / 4, rtol=1e-6)
    np.testing.assert_allclose(D, c.c_skip[:, None] * x + c.c_out[:, None], rtol=1e-6)


@pytest.mark.parametrize('name', ['edm', 'vp', 've'])
def test_training_sigma_distributions(name):
    key = jax.random.key(0)
    n = 200_000
    if name == 'edm':
        log_sigma = np.log(np.asarray(precond.edm_sigma(key, (n,), P_mean=-1.2, P_std=1.2)))
        assert abs(log_sigma.mean() + 1.2) < 0.02 and abs(log_sigma.std() - 1.2) < 0.02
    elif name == 'vp':
        sigma = np.asarray(precond.vp_sigma(key, (n,), beta_d=19.9, beta_min=0.1, epsilon_t=1e-5))
        t = np.asarray(precond.vp_t_of_sigma(jnp.asarray(sigma)))
        assert t.min() >= 1e-5 * 0.99 and t.max() <= 1.0 + 1e-5
        assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005   # t ~ U(eps_t, 1)
    else:
        log_sigma = np.log(np.asarray(precond.ve_sigma(key, (n,), sigma_min=0.02, sigma_max=100.0)))
        lo, hi = math.log(0.02), math.log(100.0)
        assert log_sigma.min() >= lo - 1e-5 and log_sigma.max() <= hi + 1e-5
        assert abs(log_sigma.mean() - (lo + hi) / 2) < 0.02
        assert abs(log_sigma.var() - (hi - lo) ** 2 / 12) < 0.05
