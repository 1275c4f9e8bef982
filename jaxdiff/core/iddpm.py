"""iDDPM / ADM preconditioning: a discrete-time epsilon network (Nichol & Dhariwal 2021's cosine schedule; ADM,
Dhariwal & Nichol 2021) as a sigma-space denoiser, the way EDM's `iDDPMPrecond` does it (Karras et al. 2022,
Table 1 column "iDDPM" and App. C.3.4; EDM's training/networks.py).

The network knows M = 1000 noise levels, u_0 > u_1 > ... > u_{M-1} > u_M = 0, with (EDM App. C.3.4, eq. 276-277)

    alpha_bar(j) = sin(pi / 2 * j / (M (C_2 + 1)))^2
    u_M = 0,  u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1),   j = M, ..., 1

with C_1 = 0.001, C_2 = 0.008, and

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)[..., :C]   (the first C channels: the mean / epsilon part of
                                                                  a learn_sigma network's 2C outputs)
    c_skip = 1,  c_out = -sigma,  c_in = 1 / sqrt(sigma^2 + 1),  c_noise = M - 1 - argmin_j |u_j - sigma|

(`round_sigma` rounds sigma to that nearest u_j). The sampler's grid (`sigmas`, EDM's 'iddpm' discretisation,
EDM generate.py) takes its steps among the u_j in [sigma_min, sigma_max].

Pure functions (no Flax). The u grid is computed on the host in float64, as EDM's sampler does, and used in float32
for rounding. (EDM's iDDPMPrecond runs the same recursion in float32: its smallest levels carry up to 5e-4 relative
cancellation error, so its buffer and this grid differ by that much there; the nearest level, hence c_noise, is the
same except for sigma within that distance of a midpoint between two levels.)
"""
import functools

import jax.numpy as jnp
import numpy as np

from jaxdiff.core.precond import Coefficients, per_example

C_1 = 0.001     # timestep adjustment at low noise levels (EDM Table 1)
C_2 = 0.008     # timestep adjustment at high noise levels (iDDPM's cosine offset s)
M = 1000        # number of discrete timesteps of the DDPM formulation


def alpha_bar(j, *, M=M, C_2=C_2):
    """alpha_bar(j) = sin(pi / 2 * j / (M (C_2 + 1)))^2 (EDM App. C.3.4), NumPy float64."""
    return np.sin(0.5 * np.pi * np.asarray(j, np.float64) / M / (C_2 + 1)) ** 2


@functools.lru_cache(maxsize=16)
def _u_grid(M, C_1, C_2):
    u = np.zeros(M + 1, np.float64)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1, M=M, C_2=C_2) / alpha_bar(j, M=M, C_2=C_2),
                                                  C_1) - 1)
    u.setflags(write=False)
    return u


def u_grid(*, M=M, C_1=C_1, C_2=C_2):
    """[u_0, ..., u_M] (decreasing, u_M = 0), NumPy float64 (EDM App. C.3.4)."""
    return _u_grid(int(M), float(C_1), float(C_2)).copy()


def sigma_min(*, M=M, C_1=C_1, C_2=C_2):
    """u_{M-1}: the smallest positive noise level (iDDPMPrecond.sigma_min)."""
    return float(_u_grid(int(M), float(C_1), float(C_2))[M - 1])


def sigma_max(*, M=M, C_1=C_1, C_2=C_2):
    """u_0: the largest noise level (iDDPMPrecond.sigma_max)."""
    return float(_u_grid(int(M), float(C_1), float(C_2))[0])


def round_index(sigma, *, M=M, C_1=C_1, C_2=C_2):
    """argmin_j |u_j - sigma| over j = 0 .. M (float32, the first index on ties), int32 shaped like sigma."""
    u = jnp.asarray(_u_grid(int(M), float(C_1), float(C_2)), jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    return jnp.argmin(jnp.abs(sigma[..., None] - u), axis=-1).astype(jnp.int32)


def round_sigma(sigma, *, M=M, C_1=C_1, C_2=C_2):
    """The grid level u_j nearest to sigma (iDDPMPrecond.round_sigma), float32 shaped like sigma."""
    u = jnp.asarray(_u_grid(int(M), float(C_1), float(C_2)), jnp.float32)
    return u[round_index(sigma, M=M, C_1=C_1, C_2=C_2)]


def noise_label(sigma, *, M=M, C_1=C_1, C_2=C_2):
    """c_noise = M - 1 - argmin_j |u_j - sigma| (EDM Table 1, iDDPM column): the network's timestep, float32."""
    return (M - 1 - round_index(sigma, M=M, C_1=C_1, C_2=C_2)).astype(jnp.float32)


def precond(sigma, *, M=M, C_1=C_1, C_2=C_2):
    """c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|
    (EDM Table 1, iDDPM column), each shaped like sigma."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return Coefficients(c_skip=jnp.ones_like(sigma),
                        c_out=-sigma,
                        c_in=1 / jnp.sqrt(sigma ** 2 + 1),
                        c_noise=noise_label(sigma, M=M, C_1=C_1, C_2=C_2))


def mean_part(F_x, channels):
    """The first `channels` channels (last axis) of a network output: the epsilon part of a learn_sigma network's
    [mean, variance] output; unchanged when it has exactly `channels`."""
    return F_x[..., :channels]


def apply(F, x, coefficients):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)[..., :C], C = x.shape[-1] (EDM eq. 7 with iDDPMPrecond's
    output slice). F: `F(x_in, c_noise)` -> [..., C] or [..., 2C]; the coefficients are [B] (`precond(sigma)`)."""
    c_skip, c_out, c_in = (per_example(c, x) for c in coefficients[:3])
    F_x = mean_part(F(c_in * x, coefficients.c_noise), x.shape[-1])
    return c_skip * x + c_out * F_x.astype(x.dtype)


def denoiser(F, *, M=M, C_1=C_1, C_2=C_2):
    """The SPEC denoiser D(x, sigma) of a network F(x_in, c_noise) (e.g. `lambda x, c: model.apply(variables, x,
    c, class_labels)`), sigma a scalar or [B]."""
    def D(x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        return apply(F, x, precond(sigma, M=M, C_1=C_1, C_2=C_2))
    return D


def mean_channels(apply_fn, channels):
    """A Flax-style `apply_fn` whose output keeps only its first `channels` channels (also when it returns
    (output, state) with mutable collections), so that models/denoiser.py's `Denoiser(mean_channels(model.apply,
    C), params, iddpm.precond)` runs a learn_sigma ADM network."""
    def wrapped(*args, **kwargs):
        result = apply_fn(*args, **kwargs)
        if isinstance(result, tuple):
            return (mean_part(result[0], channels),) + tuple(result[1:])
        return mean_part(result, channels)
    return wrapped


def sigmas(num_steps=None, *, sigma_min=0.002, sigma_max=81.0, M=M, C_1=C_1, C_2=C_2):
    """The 'discrete' sampling grid of an iDDPM network (EDM generate.py, discretization 'iddpm'), decreasing, with
    the final 0 appended (SPEC), NumPy float64.

    sigma_min / sigma_max (EDM's defaults for this discretisation, 0.002 and 81) are first clamped to the network's
    range [u_{M-1}, u_0] (u_0 is about 2e4: the first levels come from the clipped alpha_bar ratios); the grid is
    made of the n levels u_j inside it: all of them for num_steps=None, else the ones at the indices
    round((n - 1) / (num_steps - 1) * i), i = 0 .. num_steps - 1 (round half to even, as torch)."""
    u = _u_grid(int(M), float(C_1), float(C_2))
    low = max(float(sigma_min), u[M - 1])
    high = min(float(sigma_max), u[0])
    filtered = u[(u >= low) & (u <= high)]
    if not len(filtered):
        raise ValueError(f'no iDDPM noise level lies in [sigma_min, sigma_max] = [{low}, {high}]')
    if num_steps is None:
        steps = filtered
    else:
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
        if num_steps == 1:
            steps = filtered[:1]
        else:
            index = np.round((len(filtered) - 1) / (num_steps - 1) * np.arange(num_steps, dtype=np.float64))
            steps = filtered[index.astype(np.int64)]
    return np.append(steps, 0.0)
