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


# --- shared pieces of the fixed-grid solvers (one lax.scan over the grid; see ode.py, multistep.py, ddim.py) ---

def prepare(name, x_T, sigmas, min_len=2):
    """Checks the start sample and the grid; returns (x_T, sigmas) with sigmas cast to x_T's float dtype."""
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f'sampler {name!r}: x_T must be a floating array [B, ...], got {x_T.dtype} {x_T.shape}')
    return x_T, validate_sigmas(sigmas, min_len).astype(x_T.dtype)


def require_key(name, key, why):
    if key is None:
        raise ValueError(f'sampler {name!r} draws noise ({why}): pass key=jax.random.PRNGKey(...)')
    return key


def count_calls(sigmas, per_positive_step, per_step_to_zero, extra=0):
    """Denoiser calls per sample of a solver whose step into sigma_next > 0 costs `per_positive_step` calls and
    a step into sigma_next = 0 costs `per_step_to_zero`; `extra` is added (negative for a saved call, AFS).

    A Python int when the grid is concrete; a traced int32 inside a user's jit."""
    t_next = sigmas[1:]
    if is_concrete(t_next):
        positive = int(np.sum(np.asarray(t_next) > 0))
        return positive * per_positive_step + (t_next.shape[0] - positive) * per_step_to_zero + extra
    positive = jnp.sum(t_next > 0).astype(jnp.int32)
    return positive * per_positive_step + (t_next.shape[0] - positive) * per_step_to_zero + extra


def afs_direction(x, sigma):
    """Analytical first step (AFS; Zhou et al. 2024, AMED-Solver): at sigma_max the data is negligible against
    the noise, so d = (x - D) / sigma is replaced by d = x / sqrt(1 + sigma^2) without calling the denoiser."""
    return x / jnp.sqrt(1 + sigma ** 2)


def denoise(denoiser, x, sigma, i=None, afs=False):
    """x0_hat = D(x, sigma); with `afs`, at grid index i == 0 the AFS estimate x - sigma * afs_direction(x, sigma)
    replaces the call (lax.cond: only the taken branch runs, so the call really is saved)."""
    if not afs:
        return denoiser(x, sigma)
    return jax.lax.cond(i == 0, lambda: x - sigma * afs_direction(x, sigma), lambda: denoiser(x, sigma))


def scan_grid(step, carry, sigmas, x_of, return_trajectory):
    """Runs `carry = step(carry, i, t, t_next)` for every grid step i in one lax.scan.

    Returns the final carry and, when `return_trajectory`, x at every grid point [len(sigmas), B, ...] (x_T first),
    `x_of(carry)` picking x out of the carry."""
    x_T = x_of(carry)

    def body(carry, inputs):
        i, t, t_next = inputs
        carry = step(carry, i, t, t_next)
        return carry, (x_of(carry) if return_trajectory else None)

    steps = (jnp.arange(sigmas.shape[0] - 1), sigmas[:-1], sigmas[1:])
    carry, xs = jax.lax.scan(body, carry, steps)
    trajectory = jnp.concatenate([x_T[None], xs], axis=0) if return_trajectory else None
    return carry, trajectory


def denoise_to_zero_step(name, denoiser, x, sigmas, enabled):
    """Optional final jump x0 = D(x, sigmas[-1]) for grids ending above 0 (`denoise_to_zero`, as in the score_sde /
    k-diffusion samplers). Returns (x, extra_calls). On a grid that already ends at 0 it is a ValueError."""
    if not enabled:
        return x, 0
    sigma_last = sigmas[-1]
    if is_concrete(sigma_last):
        if not float(sigma_last) > 0:
            raise ValueError(f'sampler {name!r}: denoise_to_zero needs a grid ending above 0; this grid already '
                             f'ends at sigma=0 (its last step is the jump to 0)')
        return denoiser(x, sigma_last), 1
    positive = sigma_last > 0
    return jax.lax.cond(positive, lambda: denoiser(x, sigma_last), lambda: x), positive.astype(jnp.int32)


def finish(name, x0, nfe, trajectory):
    """The (x0, info) pair every sampler returns; raises ValueError on a concrete non-finite result."""
    check_finite(x0, name)
    info = {'nfe': nfe}
    if trajectory is not None:
        info['trajectory'] = trajectory
    return x0, info
