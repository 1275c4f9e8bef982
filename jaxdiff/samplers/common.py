"""Conventions every sampler shares: the denoiser call (with optional aux), grid checks, per-step noise, output checks.

Denoiser interface: a denoiser is a pure function `D(x, sigma) -> x0_hat`. A denoiser that can also expose
internal activations (the UNet bottleneck that AMED's predictor reads) additionally carries an attribute
`with_aux(x, sigma) -> (x0_hat, aux)` where `aux` is a dict (e.g. {'bottleneck': [B, 8, 8, C]}).
`call_denoiser` is the one place that knows this.
"""
import jax
import jax.numpy as jnp
import numpy as np


def call_denoiser(denoiser, x, sigma, with_aux=False):
    """Returns x0_hat (and aux, {} for a plain denoiser, when `with_aux`). sigma: scalar or [B]."""
    if not with_aux:
        return denoiser(x, sigma)
    if hasattr(denoiser, 'with_aux'):
        return denoiser.with_aux(x, sigma)
    return denoiser(x, sigma), {}


def is_concrete(*arrays):
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def validate_sigmas(sigmas, min_len=2):
    """Checks a sigma grid: 1-D, at least `min_len` points, strictly decreasing, non-negative, finite.

    Only concrete grids can be checked (inside a user's jit the grid is a tracer and is trusted).
    """
    sigmas = jnp.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < min_len:
        raise ValueError(f'sigmas must be a 1-D grid with at least {min_len} points, got shape {sigmas.shape}')
    if is_concrete(sigmas):
        s = np.asarray(sigmas, np.float64)
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError(f'sigmas must be finite and non-negative, got {s}')
        if np.any(np.diff(s) >= 0):
            raise ValueError(f'sigmas must be strictly decreasing (sigmas[0] > ... > sigmas[-1]), got {s}')
    return sigmas


def step_noise(key, i, shape, dtype=jnp.float32):
    """The Gaussian noise z of step i: N(0, I) from fold_in(key, i). Every stochastic sampler draws its
    per-step noise exactly this way, so samplers that reduce to one another agree sample for sample."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def check_finite(x, name):
    """Raises ValueError when a concrete sampler output holds NaN/Inf (e.g. a denoiser that returned NaN)."""
    if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f'sampler {name!r} produced NaN/Inf: the denoiser returned non-finite values '
                         f'(check the model parameters and the sigma grid)')
    return x
