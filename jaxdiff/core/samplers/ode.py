"""Single-step solvers of the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma (EDM Sec. 2
with sigma(t) = t, s(t) = 1): `euler`, `heun` (EDM Algorithm 2) and `dpm2` (DPM-Solver-2).

Each is one lax.scan over the grid. A step into sigma_next = 0 is a first-order (Euler) step (EDM, k-diffusion):
the second evaluation is skipped with lax.cond on sigma_next > 0, so no call is wasted and `info['nfe']` counts
exactly the calls made; each sampler declares that count (`common.Cost`) and its order (`common.Sampler`).
Options shared where they apply: `afs` (analytical first step, saves the first call;
common.afs_direction) and `denoise_to_zero` (a final x0 = D(x, sigmas[-1]) on grids that end above 0).
"""
import math

import jax
import jax.numpy as jnp

from jaxdiff.core.samplers import common


def direction(x, x0_hat, sigma):
    """d = (x - D(x, sigma)) / sigma: the PF-ODE slope dx/dsigma (EDM Algorithm 1)."""
    return (x - x0_hat) / sigma


def heun_correct(denoiser, x, d_cur, t, x_next, t_next):
    """EDM Algorithm 2 lines 9-11: x_next = x + (t_next - t) (d_cur + d_next) / 2 with d_next at the Euler point."""
    d_next = direction(x_next, denoiser(x_next, t_next), t_next)
    return x + (t_next - t) * (0.5 * d_cur + 0.5 * d_next)


def dpm2_update(denoiser, x, d_cur, t, t_next, r=0.5):
    """DPM-Solver-2 (Lu et al. 2022, DPM-Solver, Algorithm 1 with general r) in sigma-space for t_next > 0:
    intermediate s = t^(1-r) t_next^r (a fraction r of the step in lambda = -log sigma),
      y = x + (s - t) d_cur,   d_s = d(y, s),
      x_next = x + (t_next - t) ((1 / (2r)) d_s + (1 - 1 / (2r)) d_cur).
    With r = 1/2 this is the k-diffusion `sample_dpm_2` midpoint step; AMED (Zhou et al. 2024) learns r."""
    s = t ** (1 - r) * t_next ** r
    y = x + (s - t) * d_cur
    d_s = direction(y, denoiser(y, s), s)
    return x + (t_next - t) * ((1 / (2 * r)) * d_s + (1 - 1 / (2 * r)) * d_cur)


def cost(second_call, afs, denoise_to_zero):
    """1 call per step (2 with a second call), 1 into sigma = 0, minus the call AFS saves, plus denoise_to_zero's."""
    return common.Cost(per_step=2 if second_call else 1, into_zero=1, saved=int(afs), final=int(denoise_to_zero))


def _run(name, denoiser, x_T, sigmas, second_call, return_trajectory, denoise_to_zero, afs, before=None):
    """Shared driver: Euler predictor, then `second_call(x, d_cur, t, x_euler, t_next)` when t_next > 0.

    `before(x, i, t) -> (x_hat, t_hat)` is an optional pre-step (Heun's churn)."""

    def step(x, i, t, t_next):
        x_hat, t_hat = (x, t) if before is None else before(x, i, t)
        d_cur = direction(x_hat, common.denoise(denoiser, x_hat, t_hat, i, afs), t_hat)
        x_euler = x_hat + (t_next - t_hat) * d_cur
        if second_call is None:
            return x_euler
        return jax.lax.cond(t_next > 0, lambda: second_call(x_hat, d_cur, t_hat, x_euler, t_next), lambda: x_euler)

    x, trajectory = common.scan_grid(step, x_T, sigmas, lambda x: x, return_trajectory)
    x = common.denoise_to_zero_step(name, denoiser, x, sigmas, denoise_to_zero)
    return common.finish(name, x, cost(second_call is not None, afs, denoise_to_zero).of_grid(sigmas), trajectory)


def euler(*, afs=False, denoise_to_zero=False):
    """Euler's method on the PF-ODE (EDM Algorithm 1 without the 2nd-order correction). NFE = number of steps."""

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        del key
        x_T, sigmas = common.prepare('euler', x_T, sigmas)
        return _run('euler', denoiser, x_T, sigmas, None, return_trajectory, denoise_to_zero, afs)

    return common.Sampler('euler', sampler, cost=cost(False, afs, denoise_to_zero), order=1,
                          options=dict(afs=afs, denoise_to_zero=denoise_to_zero))


def heun(*, s_churn=0.0, s_min=0.0, s_max=float('inf'), s_noise=1.0, afs=False, denoise_to_zero=False):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2); deterministic Heun when s_churn = 0.

    Per step i of N = len(sigmas) - 1: gamma_i = min(s_churn / N, sqrt(2) - 1) if s_min <= t_i <= s_max else 0,
    t_hat = t_i (1 + gamma_i), x_hat = x_i + sqrt(t_hat^2 - t_i^2) s_noise z (z = common.step_noise(key, i)),
    then an Euler step from (x_hat, t_hat) and, when t_{i+1} > 0, the trapezoidal correction.
    NFE = 2 N - 1 on a grid ending at 0 (18 EDM steps: 35)."""
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f'heun: s_churn and s_noise must be >= 0, got s_churn={s_churn!r}, s_noise={s_noise!r}')

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        x_T, sigmas = common.prepare('heun', x_T, sigmas)
        before = None
        if s_churn > 0:
            common.require_key('heun', key, f's_churn={s_churn}')
            gamma_max = min(s_churn / (sigmas.shape[0] - 1), math.sqrt(2) - 1)

            def before(x, i, t):
                gamma = jnp.where((t >= s_min) & (t <= s_max), gamma_max, 0.0).astype(x.dtype)
                t_hat = t + gamma * t
                z = common.step_noise(key, i, x.shape, x.dtype)
                # sqrt(t_hat^2 - t^2) written as t sqrt(gamma (2 + gamma)): never negative after XLA fusion
                return x + t * jnp.sqrt(gamma * (2 + gamma)) * s_noise * z, t_hat

        def second(x, d_cur, t, x_euler, t_next):
            return heun_correct(denoiser, x, d_cur, t, x_euler, t_next)

        return _run('heun', denoiser, x_T, sigmas, second, return_trajectory, denoise_to_zero, afs, before)

    return common.Sampler('heun', sampler, cost=cost(True, afs, denoise_to_zero), order=None if s_churn > 0 else 2,
                          options=dict(s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=s_noise, afs=afs,
                                       denoise_to_zero=denoise_to_zero))


def dpm2(*, r=0.5, afs=False, denoise_to_zero=False):
    """DPM-Solver-2 in sigma-space (Lu et al. 2022), intermediate sigma s = t^(1-r) t_next^r; a first-order step into
    sigma = 0. NFE = 2 N - 1 on a grid ending at 0. See `dpm2_update`."""
    if not 0 < r <= 1:
        raise ValueError(f'dpm2: r must be in (0, 1], got {r!r}')

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        del key
        x_T, sigmas = common.prepare('dpm2', x_T, sigmas)

        def second(x, d_cur, t, x_euler, t_next):
            del x_euler
            return dpm2_update(denoiser, x, d_cur, t, t_next, r)

        return _run('dpm2', denoiser, x_T, sigmas, second, return_trajectory, denoise_to_zero, afs)

    return common.Sampler('dpm2', sampler, cost=cost(True, afs, denoise_to_zero), order=2,
                          options=dict(r=r, afs=afs, denoise_to_zero=denoise_to_zero))
