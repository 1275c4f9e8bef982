"""Stochastic samplers with per-step noise: `euler_ancestral` and `dpmpp_2m_sde`, in sigma-space.

Both draw the noise of step i as common.step_noise(key, i, x.shape) (fold_in of the run's key), so that a sample does
not depend on how the batch is split over devices, and both take one denoiser call per step (NFE = number of steps).

euler_ancestral (the ancestral sampler of Ho et al. 2020 / Song et al. 2021 as an Euler step, k-diffusion's
`sample_euler_ancestral`): the DDIM-style split of the step t -> t_next into a deterministic part down to sigma_down
and fresh noise of std sigma_up,
    sigma_up = min(t_next, eta sqrt(t_next^2 (t^2 - t_next^2) / t^2)),  sigma_down = sqrt(t_next^2 - sigma_up^2),
    x_next = x + (sigma_down - t) (x - D(x, t)) / t + s_noise sigma_up z_i       (no noise into t_next = 0).
eta = 0 is Euler's method.

dpmpp_2m_sde (DPM-Solver++(2M) SDE, Lu et al. 2022b, "DPM-Solver++", Sec. 5 and App. B, the SDE variant of the
multistep data-prediction solver as in k-diffusion's `sample_dpmpp_2m_sde`): with h = log(t / t_next),
eta_h = eta h, m0 = D(x, t), m1 the previous step's D, r = h_last / h,
    x_next = (t_next / t) e^{-eta_h} x + (1 - e^{-h - eta_h}) m0
             + 'midpoint': (1/2) (1 - e^{-h - eta_h}) (m0 - m1) / r
               'heun':     ((1 - e^{-h - eta_h}) / (-h - eta_h) + 1) (m0 - m1) / r
             + s_noise t_next sqrt(1 - e^{-2 eta_h}) z_i,
the correction term from the second step on; a step into t_next = 0 is x_next = m0. eta = 0 with 'midpoint' is
DPM-Solver++(2M) (multistep.dpmpp_2m) exactly.
"""
import functools

import jax
import jax.numpy as jnp

from jaxdiff.core.samplers import common
from jaxdiff.core.samplers.multistep import empty_history, push
from jaxdiff.core.samplers.ode import direction

SOLVER_TYPES = ('midpoint', 'heun')


def _check(name, eta, s_noise):
    if not eta >= 0 or not s_noise >= 0:
        raise ValueError(f'{name}: eta and s_noise must be >= 0, got eta={eta!r}, s_noise={s_noise!r}')


def ancestral_step_sizes(t, t_next, eta):
    """(sigma_down, sigma_up) of the step t -> t_next (k-diffusion's `get_ancestral_step`); (0, 0) into 0."""
    sigma_up = jnp.minimum(t_next, eta * jnp.sqrt(t_next ** 2 * (t ** 2 - t_next ** 2) / t ** 2))
    return jnp.sqrt(t_next ** 2 - sigma_up ** 2), sigma_up


def euler_ancestral_step(denoiser, state, i, t, t_next, *, eta, s_noise, key):
    x = state.x
    x0_hat, state = common.evaluate(denoiser, x, t, state)
    sigma_down, sigma_up = ancestral_step_sizes(t, t_next, eta)
    x_next = x + (sigma_down - t) * direction(x, x0_hat, t)
    if key is not None:
        x_next = x_next + s_noise * sigma_up * common.step_noise(key, i, x.shape, x.dtype)
    return state._replace(x=x_next)


def euler_ancestral(*, eta=1.0, s_noise=1.0):
    """Euler-ancestral (see the module doc); `eta` scales the fresh noise (0: Euler), `s_noise` its std."""
    _check('euler_ancestral', eta, s_noise)

    def init(x_T, sigmas, key):
        if eta > 0 and s_noise > 0:
            common.require_key('euler_ancestral', key, f'eta={eta}')
        else:
            key = None
        return functools.partial(euler_ancestral_step, eta=eta, s_noise=s_noise, key=key), ()

    return common.fixed_grid('euler_ancestral', init, cost=common.Cost(per_step=1, into_zero=1),
                             order=1 if eta == 0 else None, options=dict(eta=eta, s_noise=s_noise))


def dpmpp_2m_sde_step(denoiser, state, i, t, t_next, *, eta, s_noise, solver_type, key):
    x = state.x
    m0, state = common.evaluate(denoiser, x, t, state)
    history = push(state.memory, m0, t)

    def step():
        h = jnp.log(t / t_next)
        eta_h = eta * h
        decay = -jnp.expm1(-h - eta_h)                               # 1 - e^{-h - eta_h}
        base = (t_next / t) * jnp.exp(-eta_h) * x + decay * m0

        def corrected():
            r = jnp.log(history.sigmas[1] / t) / h                   # h_last / h
            d = (m0 - history.values[1]) / r
            if solver_type == 'heun':
                return base + (decay / (-h - eta_h) + 1) * d
            return base + 0.5 * decay * d

        x_next = jax.lax.cond(history.count > 1, corrected, lambda: base)
        if key is not None:
            noise = common.step_noise(key, i, x.shape, x.dtype)
            x_next = x_next + noise * t_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
        return x_next

    return state._replace(x=jax.lax.cond(t_next > 0, step, lambda: m0), memory=history)


def dpmpp_2m_sde(*, eta=1.0, s_noise=1.0, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE (see the module doc): `eta` (0: the ODE solver), `s_noise`, `solver_type` midpoint |
    heun (the two second-order corrections of k-diffusion). Declared order 2 at eta = 0, None otherwise."""
    _check('dpmpp_2m_sde', eta, s_noise)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f'dpmpp_2m_sde: solver_type must be one of {", ".join(SOLVER_TYPES)}, got {solver_type!r}')

    def init(x_T, sigmas, key):
        if eta > 0 and s_noise > 0:
            common.require_key('dpmpp_2m_sde', key, f'eta={eta}')
        else:
            key = None
        step = functools.partial(dpmpp_2m_sde_step, eta=eta, s_noise=s_noise, solver_type=solver_type, key=key)
        return step, empty_history(2, x_T, sigmas[0])

    return common.fixed_grid('dpmpp_2m_sde', init, cost=common.Cost(per_step=1, into_zero=1),
                             order=2 if eta == 0 else None,
                             options=dict(eta=eta, s_noise=s_noise, solver_type=solver_type))
