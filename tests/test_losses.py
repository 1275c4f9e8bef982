"""The denoising loss: exact values for an exact denoiser and for F = 0, and the piece registries."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sigma_of_c_noise
from jaxdiff.core import losses, precond

POINT = 0.7  # every training example is the constant image POINT: the exact denoiser is D = POINT


@pytest.mark.parametrize('parameterization', ['edm', 'vp', 've'])
def test_exact_denoiser_has_zero_loss(parameterization):
    """A network whose D is the exact posterior mean of a point mass gives loss 0; F = 0 does not (so the
    preconditioning, sigma, noise and target are wired consistently)."""
    pieces = losses.build(parameterization=parameterization)

    def exact_network(params, x_in, c_noise, batch, key):
        sigma = sigma_of_c_noise(parameterization, c_noise)
        c = pieces.parameterization.precond(sigma)
        x = x_in / precond.per_example(c.c_in, x_in)
        return (POINT - precond.per_example(c.c_skip, x) * x) / precond.per_example(c.c_out, x)

    zero_network = lambda params, x_in, c_noise, batch, key: jnp.zeros_like(x_in)
    batch = {'image': jnp.full((256, 4, 4, 1), POINT), 'label': jnp.zeros((256,), jnp.int32)}
    key = jax.random.key(1)
    exact, _ = losses.make_loss(exact_network, pieces)(None, batch, key)
    baseline, _ = losses.make_loss(zero_network, pieces)(None, batch, key)
    assert baseline > 0.1
    assert exact < 1e-6 * baseline


def test_edm_loss_of_zero_network_on_zero_data_matches_quadrature():
    """y = 0, F = 0: D = c_skip sigma n, so E[loss] = E[lambda c_skip^2 sigma^2] = E[sd^2 / (sigma^2 + sd^2)]
    over ln sigma ~ N(P_mean, P_std^2), computed here by Gauss-Hermite quadrature."""
    sigma_data, P_mean, P_std = 0.5, -1.2, 1.2
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    sigma = np.exp(P_mean + P_std * nodes)
    expected = np.sum(weights * sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)) / math.sqrt(2 * math.pi)
    pieces = losses.build(parameterization='edm', sigma_data=sigma_data, P_mean=P_mean, P_std=P_std)
    zero_network = lambda params, x_in, c_noise, batch, key: jnp.zeros_like(x_in)
    batch = {'image': jnp.zeros((32768, 2))}
    loss, _ = losses.make_loss(zero_network, pieces)(None, batch, jax.random.key(0))
    np.testing.assert_allclose(loss, expected, rtol=0.02)


def test_registries_reject_unknown_choices_and_options():
    for kind in ('parameterization', 'target', 'pairing'):
        with pytest.raises(ValueError, match=f"unknown loss.{kind} 'nope'"):
            losses.build(**{kind: 'nope'})
    with pytest.raises(ValueError, match='P_meen'):
        losses.build(P_meen=-1.2)
    # an option of another parameterization is ignored, so configs can switch pieces from the command line
    vp = losses.build(parameterization='vp', P_mean=-1.2, beta_d=10.0)
    np.testing.assert_allclose(vp.parameterization.precond(jnp.array([1.0])).c_noise,
                               precond.vp(jnp.array([1.0]), beta_d=10.0).c_noise)


def test_a_registered_pairing_and_target_plug_in(monkeypatch):
    """New pieces are registry entries: zero noise + a target equal to the noisy input make D = x exact."""
    monkeypatch.setitem(losses.PAIRINGS, 'none', f'{__name__}:no_noise_pairing')
    monkeypatch.setitem(losses.TARGETS, 'identity', f'{__name__}:noisy_input_target')
    pieces = losses.build(pairing='none', target='identity')

    def identity_network(params, x_in, c_noise, batch, key):   # D = x: F = (1 - c_skip) x / c_out
        c = precond.edm(jnp.exp(4 * c_noise))
        x = x_in / precond.per_example(c.c_in, x_in)
        return precond.per_example((1 - c.c_skip) / c.c_out, x) * x

    batch = {'image': jax.random.normal(jax.random.key(0), (64, 3))}
    assert losses.make_loss(identity_network, pieces)(None, batch, jax.random.key(2))[0] < 1e-10


def no_noise_pairing():
    return (lambda key, y, *_: (jnp.zeros_like(y), 0.0, {})), losses.Hooks()


def noisy_input_target():
    return (lambda x_noisy, sigma, batch: x_noisy), losses.Hooks()
