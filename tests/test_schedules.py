"""Sigma grids against NumPy transcriptions of their defining formulas."""
import jax
import numpy as np
import pytest

from jaxdiff.core import schedules
from jaxdiff.core.samplers import common


def test_edm_matches_karras_eq5():
    s = np.asarray(schedules.get('edm', num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0), np.float64)
    i = np.arange(18)
    expect = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert s.shape == (19,) and s[-1] == 0.0
    np.testing.assert_allclose(s[:-1], expect, rtol=1e-6)


def test_logsnr_is_uniform_in_log_sigma():
    s = np.asarray(schedules.get('logsnr', num_steps=10, sigma_min=0.01, sigma_max=10.0), np.float64)
    assert s[-1] == 0.0 and s.shape == (11,)
    np.testing.assert_allclose(s[[0, -2]], [10.0, 0.01], rtol=1e-6)
    steps = np.diff(np.log(s[:-1]))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-5)


def test_time_uniform_is_uniform_in_vp_time():
    s = np.asarray(schedules.get('time_uniform', num_steps=12, sigma_min=0.002, sigma_max=80.0), np.float64)
    np.testing.assert_allclose(s[[0, -2]], [80.0, 0.002], rtol=1e-5)
    # independent transcription: VP-SDE with beta(t) = 0.1 + 19.9 t, alpha_t = exp(-int_0^t beta / 2)
    t = np.linspace(0.0, 1.0, 100_001)
    log_alpha = -0.5 * (0.1 * t + 0.5 * 19.9 * t ** 2)
    sigma_of_t = np.sqrt(np.exp(-2 * log_alpha) - 1)
    t_of_s = np.interp(np.log(s[:-1]), np.log(sigma_of_t[1:]), t[1:])
    np.testing.assert_allclose(np.diff(t_of_s), np.diff(t_of_s)[0], rtol=1e-3)
    np.testing.assert_allclose(schedules.vp_time(schedules.vp_sigma(np.array([0.01, 0.3, 1.0]))), [0.01, 0.3, 1.0])


def _numpy_authors_time_uniform(num_steps, sigma_min, sigma_max, epsilon_s=1e-3):
    """The AMED authors' 'time_uniform' grid (diff-sampler get_schedule, schedule_rho = 1), float64 NumPy: VP time
    1 -> epsilon_s in equal steps, beta fitted so that the end points map onto sigma_max and sigma_min."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    t = 1 + np.arange(num_steps) / (num_steps - 1) * (epsilon_s - 1)
    return (np.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5, beta_d, beta_min


@pytest.mark.parametrize('num_steps', [3, 5, 18])
def test_time_uniform_with_epsilon_s_is_the_amed_authors_grid(num_steps):
    with jax.enable_x64(True):                      # the grid in float64, the default float dtype there
        s = np.asarray(schedules.get('time_uniform', num_steps=num_steps, sigma_min=0.002, sigma_max=80.0,
                                     epsilon_s=1e-3))
    assert s.dtype == np.float64
    expect, beta_d, beta_min = _numpy_authors_time_uniform(num_steps, 0.002, 80.0)
    assert s.shape == (num_steps + 1,) and s[-1] == 0.0
    np.testing.assert_allclose(s[:-1], expect, rtol=1e-9)      # e ** x - 1 vs expm1 at sigma_min: ~1e-11
    np.testing.assert_allclose(s[[0, -2]], [80.0, 0.002], rtol=1e-9)
    assert beta_d == pytest.approx(17.54, abs=0.01) and beta_min == pytest.approx(-0.0048, abs=1e-4)
    np.testing.assert_allclose(schedules.fitted_vp_beta(0.002, 80.0, 1e-3), (beta_d, beta_min), rtol=1e-12,
                               atol=1e-12)          # beta_min: the difference of two numbers near 8.77
    if num_steps == 5:     # the interior points really differ from the beta 0.1 .. 20 grid (by up to ~2 %)
        default = np.asarray(schedules.get('time_uniform', num_steps=5), np.float64)
        assert np.max(np.abs(s[1:-2] / default[1:-2] - 1)) > 0.01
    with pytest.raises(ValueError, match='fitted'):
        schedules.get('time_uniform', num_steps=4, epsilon_s=1e-3, beta_min=0.1)
    with pytest.raises(ValueError, match='epsilon_s must be in'):
        schedules.get('time_uniform', num_steps=4, epsilon_s=1.5)


def test_ddpm_grid_is_the_discrete_alpha_bar():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    full = np.asarray(schedules.get('ddpm', num_steps=1000), np.float64)
    np.testing.assert_allclose(full[:-1], np.sqrt((1 - abar) / abar)[::-1], rtol=1e-5)
    s = np.asarray(schedules.get('ddpm', num_steps=10), np.float64)
    assert s.shape == (11,) and s[-1] == 0.0
    np.testing.assert_allclose(s[[0, -2]], np.sqrt((1 - abar) / abar)[[999, 0]], rtol=1e-5)
    assert set(np.round(s[:-1], 4)) <= set(np.round(full[:-1], 4))


@pytest.mark.parametrize('name', [name for name in schedules.names() if name != 'explicit'])
@pytest.mark.parametrize('num_steps', [1, 2, 7])
def test_every_grid_is_valid(name, num_steps):
    s = schedules.get(name, num_steps=num_steps)
    assert s.shape == (num_steps + 1,)
    common.validate_sigmas(s)


def test_the_explicit_grid_is_the_one_given():
    given = [80.0, 10.98, 1.5, 0.002]
    np.testing.assert_allclose(schedules.get('explicit', sigmas=given), given, rtol=1e-6)
    with pytest.raises(ValueError, match='decreasing'):
        schedules.get('explicit', sigmas=[1.0, 2.0])


def test_misuse_is_a_value_error():
    with pytest.raises(ValueError, match='valid schedules'):
        schedules.get('karras', num_steps=4)
    with pytest.raises(ValueError, match='rho'):
        schedules.get('logsnr', num_steps=4, rho=7.0)
    with pytest.raises(ValueError, match='sigma_min'):
        schedules.get('edm', num_steps=4, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match='num_steps'):
        schedules.get('edm', num_steps=0)
    with pytest.raises(ValueError, match='num_steps'):
        schedules.get('ddpm', num_steps=1001)
