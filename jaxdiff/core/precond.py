"""Network preconditioning, loss weights and training noise levels of EDM, VP and VE (Karras et al. 2022, Table 1).

A raw network F becomes a denoiser through (EDM eq. 7)

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

and is trained with the weight lambda(sigma) on noise levels sigma ~ p_train (EDM eq. 8 and Table 1).
Pure functions: no Flax, no config; sigma is an array (any shape) and every function is jittable.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Coefficients(NamedTuple):
    """The four preconditioning coefficients of EDM Table 1, each shaped like sigma."""
    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def per_example(c, x, dtype=None):
    """A per-example value c (a scalar, [B] or already [B, 1, ...]) as [B, 1, ..., 1], broadcasting against x [B, ...]
    (SPEC: sigma is a scalar or [B]), in `dtype` if given. The one helper for this across the library."""
    c = jnp.asarray(c, dtype)
    return jnp.broadcast_to(jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim)), x.shape[:1] + (1,) * (x.ndim - 1))


def apply(F: Callable, x, coefficients: Coefficients):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)  (EDM eq. 7).

    F: `F(x_in, c_noise) -> same shape as x`; the coefficients (e.g. `edm(sigma)`) are [B], one per example, and
    broadcast over the trailing axes of x.
    """
    c_skip, c_out, c_in = (per_example(c, x) for c in coefficients[:3])
    F_x = F(c_in * x, coefficients.c_noise)
    return c_skip * x + c_out * F_x.astype(x.dtype)


# ---------------------------------------------------------------- EDM (Table 1, column "EDM (ours)")

def edm(sigma, *, sigma_data=0.5):
    """c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4  (EDM Table 1)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma ** 2 + sigma_data ** 2
    return Coefficients(c_skip=sigma_data ** 2 / total,
                        c_out=sigma * sigma_data / jnp.sqrt(total),
                        c_in=1 / jnp.sqrt(total),
                        c_noise=edm_noise_label(sigma))


def edm_noise_label(sigma):
    """c_noise = ln(sigma) / 4  (EDM Table 1): the noise label an EDM network reads (also AMED's time input)."""
    return jnp.log(sigma) / 4


def edm_weight(sigma, *, sigma_data=0.5):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2  (EDM Table 1): unit loss weight on F."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_sigma(key, shape, *, P_mean=-1.2, P_std=1.2):
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2)  (EDM Table 1, log-normal)."""
    return jnp.exp(P_mean + P_std * jax.random.normal(key, shape, jnp.float32))


# ---------------------------------------------------------------- VP (Table 1, column "VP"; Song et al. 2021)

def _namespace(a):
    """NumPy for NumPy input (schedules builds its grids in float64 on the host), jax.numpy otherwise."""
    return np if isinstance(a, (np.ndarray, np.generic)) else jnp


def vp_sigma_of_t(t, *, beta_d=19.9, beta_min=0.1):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)  (EDM Table 1, VP schedule; beta_d = beta_max - beta_min).

    NumPy in, NumPy out (float64 stays float64); anything else runs in jax.numpy."""
    xp = _namespace(t)
    return xp.sqrt(xp.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_t_of_sigma(sigma, *, beta_d=19.9, beta_min=0.1):
    """sigma^{-1}(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d  (EDM Table 1).

    NumPy in, NumPy out; anything else runs in jax.numpy."""
    xp = _namespace(sigma)
    return (xp.sqrt(beta_min ** 2 + 2 * beta_d * xp.log1p(sigma ** 2)) - beta_min) / beta_d


def vp(sigma, *, beta_d=19.9, beta_min=0.1, M=1000):
    """c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^{-1}(sigma)
    (EDM Table 1, VP column)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return Coefficients(c_skip=jnp.ones_like(sigma),
                        c_out=-sigma,
                        c_in=1 / jnp.sqrt(sigma ** 2 + 1),
                        c_noise=(M - 1) * vp_t_of_sigma(sigma, beta_d=beta_d, beta_min=beta_min))


def vp_weight(sigma):
    """lambda(sigma) = 1 / sigma^2  (EDM Table 1, VP column)."""
    return 1 / sigma ** 2


def vp_sigma(key, shape, *, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
    """Training noise levels sigma = sigma(t), t ~ U(epsilon_t, 1)  (EDM Table 1, VP column)."""
    t = jax.random.uniform(key, shape, jnp.float32, minval=epsilon_t, maxval=1.0)
    return vp_sigma_of_t(t, beta_d=beta_d, beta_min=beta_min)


# ---------------------------------------------------------------- VE (Table 1, column "VE"; Song et al. 2021)

def ve(sigma):
    """c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)  (EDM Table 1, VE column)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return Coefficients(c_skip=jnp.ones_like(sigma), c_out=sigma, c_in=jnp.ones_like(sigma),
                        c_noise=jnp.log(0.5 * sigma))


def ve_weight(sigma):
    """lambda(sigma) = 1 / sigma^2  (EDM Table 1, VE column)."""
    return 1 / sigma ** 2


def ve_sigma(key, shape, *, sigma_min=0.02, sigma_max=100.0):
    """Training noise levels ln(sigma) ~ U(ln sigma_min, ln sigma_max)  (EDM Table 1, VE column)."""
    log_sigma = jax.random.uniform(key, shape, jnp.float32, minval=jnp.log(sigma_min), maxval=jnp.log(sigma_max))
    return jnp.exp(log_sigma)
