"""Single-step solvers of the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma (EDM Sec. 2
with sigma(t) = t, s(t) = 1): `euler`, `heun` (EDM Algorithm 2) and `dpm2` (DPM-Solver-2).

Each is a step `step(denoiser, state, i, t, t_next) -> state` driven by common.fixed_grid's one lax.scan. A step into
sigma_next = 0 is a first-order (Euler) step (EDM, k-diffusion): the second evaluation is skipped with lax.cond on
sigma_next > 0, so no call is wasted and the counted evaluations equal `info['nfe']`, which each sampler declares
(`common.Cost`) with its order (`common.Sampler`). The updates (`euler_update`, `dpm2_update`) take the step size h
so that AMED's plugins (amed.py), which scale h by their learned c, reuse them; `heun_step` takes hooks so that the
DG authors' guided Heun (guided.py) reuses it.
Options shared where they apply: `afs` (analytical first step, saves the first call; common.afs_direction) and
`denoise_to_zero` (a final x0 = D(x, sigmas[-1]) on grids that end above 0).
"""
import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff.core.samplers import common


def direction(x, x0_hat, sigma):
    """d = (x - D(x, sigma)) / sigma: the PF-ODE slope dx/dsigma (EDM Algorithm 1); sigma a scalar or per example."""
    return (x - x0_hat) / common.per_example(sigma, x)


def euler_update(x, d, h):
    """x_next = x + h d: an Euler step of size h = t_next - t along the slope d (EDM Algorithm 1, line 5)."""
    return x + h * d


def edm_churn(x, t, gamma, s_noise, z):
    """EDM Algorithm 2 lines 5-6: t_hat = t + gamma t, x_hat = x + sqrt(t_hat^2 - t^2) s_noise z, with sqrt(t_hat^2 -
    t^2) written as t sqrt(gamma (2 + gamma)) (never negative after XLA fusion). gamma, s_noise: scalars or [B]."""
    x_hat = x + common.per_example(t * jnp.sqrt(gamma * (2 + gamma)) * s_noise, x) * z
    return x_hat, t + gamma * t


def dpm2_intermediate(t, t_next, r):
    """s = t^(1-r) t_next^r: a fraction r of the step t -> t_next in lambda = -log sigma (DPM-Solver-2)."""
    return t ** (1 - r) * t_next ** r


def dpm2_update(x, d_cur, d_s, h, r):
    """x_next = x + h ((1 / (2r)) d_s + (1 - 1 / (2r)) d_cur): DPM-Solver-2 (Lu et al. 2022, DPM-Solver, Algorithm 1
    with general r) in sigma-space, h = t_next - t, d_s the slope at y = x + (s - t) d_cur, s = dpm2_intermediate.
    With r = 1/2 this is the k-diffusion `sample_dpm_2` midpoint step; AMED (Zhou et al. 2024) learns r."""
    return x + h * ((1 / (2 * r)) * d_s + (1 - 1 / (2 * r)) * d_cur)


def cost(second_call, afs, denoise_to_zero):
    """1 call per step (2 with a second call), 1 into sigma = 0, minus the call AFS saves, plus denoise_to_zero's."""
    return common.Cost(per_step=2 if second_call else 1, into_zero=1, saved=int(afs), final=int(denoise_to_zero))


# --- steps ---------------------------------------------------------------------------------------------------

def euler_step(denoiser, state, i, t, t_next, *, afs=False):
    """Euler's method (EDM Algorithm 1): d_cur = (x - D(x, t)) / t, x_next = x + (t_next - t) d_cur."""
    x = state.x
    x0_hat, state = common.evaluate_first(denoiser, x, t, i, state, afs)
    return state._replace(x=euler_update(x, direction(x, x0_hat, t), t_next - t))


def heun_step(denoiser, state, i, t, t_next, *, afs=False, churn=None, first=None, second=None):
    """One step of EDM's Algorithm 2 from (x_i, t_i) = (state.x, t):

        lines 4-6   x_hat, t_hat = churn(state, i, t)                 (no churn: x_i, t_i)
        line 7      d_cur = (x_hat - D(x_hat, t_hat)) / t_hat          the first evaluation
        line 8      x_next = x_hat + (t_next - t_hat) d_cur            (the whole step into t_next = 0)
        lines 9-11  d_next = (x_next - D(x_next, t_next)) / t_next     the second evaluation, when t_next > 0,
                    x_next = x_hat + (t_next - t_hat) (d_cur + d_next) / 2

    Hooks, for samplers that change one evaluation (the DG authors' guided Heun, guided.py): `churn(state, i, t) ->
    (x_hat, t_hat)` (t_hat a scalar or [B]); `first(denoiser, x_hat, t_hat, i, state) -> (x0_hat, state)` replaces
    the first evaluation (default: common.evaluate_first, with AFS); `second` is the denoiser of the second one."""
    x_hat, t_hat = (state.x, t) if churn is None else churn(state, i, t)
    if first is None:
        x0_hat, state = common.evaluate_first(denoiser, x_hat, t_hat, i, state, afs)
    else:
        x0_hat, state = first(denoiser, x_hat, t_hat, i, state)
    d_cur = direction(x_hat, x0_hat, t_hat)
    h = common.per_example(t_next - t_hat, x_hat)
    x_euler = euler_update(x_hat, d_cur, h)

    def correct():
        x0_next, corrected = common.evaluate(denoiser if second is None else second, x_euler, t_next, state)
        d_next = direction(x_euler, x0_next, t_next)
        return corrected._replace(x=x_hat + h * (0.5 * d_cur + 0.5 * d_next))       # trapezoidal rule

    return jax.lax.cond(t_next > 0, correct, lambda: state._replace(x=x_euler))


def dpm2_step(denoiser, state, i, t, t_next, *, r=0.5, afs=False):
    """DPM-Solver-2 (`dpm2_update`) for t_next > 0: y = x + (s - t) d_cur, d_s = d(y, s); an Euler step into 0."""
    x = state.x
    x0_hat, state = common.evaluate_first(denoiser, x, t, i, state, afs)
    d_cur = direction(x, x0_hat, t)

    def midpoint():
        s = dpm2_intermediate(t, t_next, r)
        y = euler_update(x, d_cur, s - t)
        x0_s, evaluated = common.evaluate(denoiser, y, s, state)
        return evaluated._replace(x=dpm2_update(x, d_cur, direction(y, x0_s, s), t_next - t, r))

    return jax.lax.cond(t_next > 0, midpoint, lambda: state._replace(x=euler_update(x, d_cur, t_next - t)))


def _deterministic(step):
    """init of a solver that draws nothing and keeps no memory."""
    def init(x_T, sigmas, key):
        del x_T, sigmas, key
        return step, ()
    return init


# --- samplers ------------------------------------------------------------------------------------------------

def euler(*, afs=False, denoise_to_zero=False):
    """Euler's method on the PF-ODE (EDM Algorithm 1 without the 2nd-order correction). NFE = number of steps."""
    return common.fixed_grid('euler', _deterministic(functools.partial(euler_step, afs=afs)),
                             cost=cost(False, afs, denoise_to_zero), order=1,
                             options=dict(afs=afs, denoise_to_zero=denoise_to_zero))


def heun(*, s_churn=0.0, s_min=0.0, s_max=float('inf'), s_noise=1.0, afs=False, denoise_to_zero=False):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2); deterministic Heun when s_churn = 0.

    Per step i of N = len(sigmas) - 1: gamma_i = min(s_churn / N, sqrt(2) - 1) if s_min <= t_i <= s_max else 0,
    t_hat = t_i (1 + gamma_i), x_hat = x_i + sqrt(t_hat^2 - t_i^2) s_noise z (z = common.step_noise(key, i)),
    then an Euler step from (x_hat, t_hat) and, when t_{i+1} > 0, the trapezoidal correction (`heun_step`).
    NFE = 2 N - 1 on a grid ending at 0 (18 EDM steps: 35)."""
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f'heun: s_churn and s_noise must be >= 0, got s_churn={s_churn!r}, s_noise={s_noise!r}')

    def init(x_T, sigmas, key):
        if s_churn == 0:
            return functools.partial(heun_step, afs=afs), ()
        common.require_key('heun', key, f's_churn={s_churn}')
        gamma_max = min(s_churn / (sigmas.shape[0] - 1), math.sqrt(2) - 1)

        def churn(state, i, t):
            x = state.x
            gamma = jnp.where((t >= s_min) & (t <= s_max), gamma_max, 0.0).astype(x.dtype)
            return edm_churn(x, t, gamma, s_noise, common.step_noise(key, i, x.shape, x.dtype))

        return functools.partial(heun_step, afs=afs, churn=churn), ()

    return common.fixed_grid('heun', init, cost=cost(True, afs, denoise_to_zero),
                             order=None if s_churn > 0 else 2,
                             options=dict(s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=s_noise, afs=afs,
                                          denoise_to_zero=denoise_to_zero))


def dpm2(*, r=0.5, afs=False, denoise_to_zero=False):
    """DPM-Solver-2 in sigma-space (Lu et al. 2022), intermediate sigma s = t^(1-r) t_next^r; a first-order step into
    sigma = 0. NFE = 2 N - 1 on a grid ending at 0. See `dpm2_update`."""
    if not 0 < r <= 1:
        raise ValueError(f'dpm2: r must be in (0, 1], got {r!r}')
    return common.fixed_grid('dpm2', _deterministic(functools.partial(dpm2_step, r=r, afs=afs)),
                             cost=cost(True, afs, denoise_to_zero), order=2,
                             options=dict(r=r, afs=afs, denoise_to_zero=denoise_to_zero))
