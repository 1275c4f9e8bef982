"""DDIM with eta in sigma-space (Song et al. 2021a, Eq. 12 and 16, rewritten for x = x0 + sigma * eps).

From grid point sigma_t to sigma_s < sigma_t, with x0_hat = D(x, sigma_t) and eps_hat = (x - x0_hat) / sigma_t:

    sigma_up   = eta * sigma_s * sqrt(1 - sigma_s^2 / sigma_t^2)      (Eq. 16's sigma, divided by alpha_s)
    sigma_down = sqrt(sigma_s^2 - sigma_up^2)
    x_s        = x0_hat + sigma_down * eps_hat + sigma_up * z,        z = common.step_noise(key, i, x.shape)

with i the grid index of the current point. eta = 0 is the deterministic DDIM, which in sigma-space is exactly Euler's
method on the PF-ODE (x0_hat + sigma_s eps_hat = x + (sigma_s - sigma_t) eps_hat); eta = 1 is DDPM's ancestral step.

Reusable pieces (GMM-DDIM builds on them): `ddim_step_moments` gives the Gaussian transition
x_s ~ N(mean, sigma_up^2 I); `ddim_noise_scales` gives (sigma_up, sigma_down); `ddim_step` draws from it.
"""
import functools

import jax.numpy as jnp

from jaxdiff.core.samplers import common


def ddim_noise_scales(sigma_t, sigma_s, eta):
    """(sigma_up, sigma_down) of the sigma-space DDIM step sigma_t -> sigma_s (module docstring). sigma_up^2 +
    sigma_down^2 = sigma_s^2, so the marginal noise level at sigma_s is kept; both are 0 when sigma_s = 0."""
    sigma_up = eta * sigma_s * jnp.sqrt(jnp.maximum(1 - sigma_s ** 2 / sigma_t ** 2, 0.0))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_s ** 2 - sigma_up ** 2, 0.0))
    return sigma_up, sigma_down


def ddim_step_moments(x, x0_hat, sigma_t, sigma_s, eta):
    """Mean and std of the DDIM transition p(x_s | x_t): mean = x0_hat + sigma_down * eps_hat with
    eps_hat = (x - x0_hat) / sigma_t; returns (mean, sigma_up). x0_hat = D(x, sigma_t)."""
    sigma_up, sigma_down = ddim_noise_scales(sigma_t, sigma_s, eta)
    eps_hat = (x - x0_hat) / sigma_t
    return x0_hat + sigma_down * eps_hat, sigma_up


def ddim_step(x, x0_hat, sigma_t, sigma_s, eta, z=None):
    """x_s = mean + sigma_up * z (z: the step's N(0, I) noise; None for eta = 0)."""
    mean, sigma_up = ddim_step_moments(x, x0_hat, sigma_t, sigma_s, eta)
    return mean if z is None else mean + sigma_up * z


def ddim_sample_step(denoiser, state, i, t, t_next, *, eta, key, afs=False):
    """One DDIM step of the grid from sigma_t = t to sigma_s = t_next: x0_hat = D(x, t) (AFS at i == 0), then
    `ddim_step` with the step's noise z = common.step_noise(key, i) when eta > 0."""
    x = state.x
    x0_hat, state = common.evaluate_first(denoiser, x, t, i, state, afs)
    z = common.step_noise(key, i, x.shape, x.dtype) if eta > 0 else None
    return state._replace(x=ddim_step(x, x0_hat, t, t_next, eta, z))


def ddim(*, eta=0.0, afs=False, denoise_to_zero=False):
    """DDIM sampler (one call per step; NFE = number of steps). eta > 0 needs a key. Order 1 at eta = 0."""
    if not eta >= 0:
        raise ValueError(f'ddim: eta must be >= 0, got {eta!r}')

    def init(x_T, sigmas, key):
        if eta > 0:
            common.require_key('ddim', key, f'eta={eta}')
        return functools.partial(ddim_sample_step, eta=eta, key=key, afs=afs), ()

    # eta = 0 is Euler's method (first order); with noise it is no ODE solver
    return common.fixed_grid('ddim', init, cost=common.Cost(per_step=1, into_zero=1, saved=int(afs),
                                                            final=int(denoise_to_zero)),
                             order=1 if eta == 0 else None,
                             options=dict(eta=eta, afs=afs, denoise_to_zero=denoise_to_zero))
