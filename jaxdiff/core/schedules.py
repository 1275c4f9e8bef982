"""Sigma grids for sampling: `schedules.get(name, **options)` -> decreasing 1-D array ending with an appended 0.

Every grid lives in sigma-space (x = x0 + sigma * eps, SPEC.md). `num_steps` is the number of positive grid
points, so a grid has `num_steps + 1` entries and `num_steps` solver steps (EDM: 18 steps, 19 entries).

- 'edm'          Karras et al. 2022, Eq. 5:
                 sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
- 'logsnr'       uniform in log sigma (= uniform in half-logSNR lambda = -log sigma, as DPM-Solver's 'logSNR' skip).
- 'time_uniform' uniform in VP time t of the linear VP-SDE (Song et al. 2021; DPM-Solver, Lu et al. 2022 App. D):
                 log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2, sigma(t) = sqrt(alpha_t^-2 - 1),
                 either between t(sigma_max) and t(sigma_min) for a given beta (DPM-Solver's, the default), or, with
                 `epsilon_s`, on [epsilon_s, 1] with beta fitted to [sigma_min, sigma_max] (`fitted_vp_beta`: EDM's
                 VP discretisation; the AMED authors' 'time_uniform' with epsilon_s = 1e-3).
- 'ddpm'         the discrete DDPM alpha-bar grid (Ho et al. 2020: 1000 steps, beta linear 1e-4 .. 0.02), `num_steps`
                 timesteps taken evenly from [0, T-1] (both ends included), sigma = sqrt((1 - abar) / abar)
                 (DDIM, Song et al. 2021a, Eq. 12 rewritten in sigma-space).
- 'flow_uniform' uniform in rectified-flow time t = sigma / (1 + sigma) from t(sigma_max) to t(sigma_min), then 0;
                 sigma_min None (default): uniform down to 0, the Fast-ODE authors' Euler grid (`flow.uniform_schedule`).
- 'explicit'     the grid `sigmas=[...]` as given (validated, nothing appended).

The grids are computed in NumPy float64 and returned as a jnp array of the default float dtype.
"""
import inspect

import jax.numpy as jnp
import numpy as np

from jaxdiff.core import flow, precond


def _check_range(num_steps, sigma_min, sigma_max):
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
    if not 0 < sigma_min < sigma_max < np.inf:
        raise ValueError(f'need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}')


def _finish(sigmas):
    """Appends the final 0 and converts to the default float dtype."""
    return jnp.asarray(np.append(np.asarray(sigmas, np.float64), 0.0), dtype=jnp.result_type(float))


def edm(*, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM polynomial grid (Karras et al. 2022, Eq. 5) with the final 0 appended."""
    _check_range(num_steps, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f'rho must be positive, got {rho!r}')
    if num_steps == 1:
        return _finish([sigma_max])
    i = np.arange(num_steps, dtype=np.float64)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max ** inv_rho + i / (num_steps - 1) * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho
    return _finish(sigmas)


def logsnr(*, num_steps=18, sigma_min=0.002, sigma_max=80.0):
    """Uniform in log sigma from sigma_max to sigma_min, final 0 appended."""
    _check_range(num_steps, sigma_min, sigma_max)
    if num_steps == 1:
        return _finish([sigma_max])
    return _finish(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_steps)))


def vp_sigma(t, beta_min=0.1, beta_max=20.0):
    """sigma of VP time t for the linear VP-SDE, in float64 (`precond.vp_sigma_of_t`, EDM Table 1)."""
    return precond.vp_sigma_of_t(np.asarray(t, np.float64), beta_d=beta_max - beta_min, beta_min=beta_min)


def vp_time(sigma, beta_min=0.1, beta_max=20.0):
    """Inverse of `vp_sigma`, in float64 (`precond.vp_t_of_sigma`, EDM Table 1 sigma^-1)."""
    return precond.vp_t_of_sigma(np.asarray(sigma, np.float64), beta_d=beta_max - beta_min, beta_min=beta_min)


def fitted_vp_beta(sigma_min, sigma_max, epsilon_s):
    """(beta_d, beta_min) of the linear VP-SDE whose sigma(t) maps VP time [epsilon_s, 1] exactly onto [sigma_min,
    sigma_max]: the two conditions beta_d / 2 + beta_min = ln(sigma_max^2 + 1) and beta_d epsilon_s^2 / 2 +
    beta_min epsilon_s = ln(sigma_min^2 + 1) give
      beta_d = 2 (ln(sigma_min^2 + 1) / epsilon_s - ln(sigma_max^2 + 1)) / (epsilon_s - 1),
      beta_min = ln(sigma_max^2 + 1) - beta_d / 2
    (EDM's VP discretisation, Karras et al. 2022 App. D.1; diff-sampler's time_uniform). For EDM's 0.002 / 80 and
    epsilon_s = 1e-3: beta_d = 17.54, beta_min = -0.0048 (negative, unlike DPM-Solver's 0.1 .. 20)."""
    if not 0 < epsilon_s < 1:
        raise ValueError(f'epsilon_s must be in (0, 1), got {epsilon_s!r}')
    log_max, log_min = np.log1p(sigma_max ** 2), np.log1p(sigma_min ** 2)
    beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    return beta_d, log_max - beta_d / 2


def time_uniform(*, num_steps=18, sigma_min=0.002, sigma_max=80.0, beta_min=None, beta_max=None, epsilon_s=None):
    """Uniform in VP time t, final 0 appended. Two constructions:

    epsilon_s=None (default; DPM-Solver's 'time_uniform'): t uniform between t(sigma_max) and t(sigma_min) of the
      VP-SDE with beta_min, beta_max (default 0.1, 20).
    epsilon_s given (the AMED authors' recipe: 1e-3): t_i = 1 + i / (N - 1) (epsilon_s - 1), i = 0 .. N-1, i.e.
      uniform on [epsilon_s, 1], and beta fitted so that sigma(1) = sigma_max, sigma(epsilon_s) = sigma_min
      (`fitted_vp_beta`); beta_min / beta_max are then not options."""
    _check_range(num_steps, sigma_min, sigma_max)
    if epsilon_s is not None:
        if beta_min is not None or beta_max is not None:
            raise ValueError('time_uniform: with epsilon_s the VP beta is fitted to [sigma_min, sigma_max]; '
                             'pass beta_min / beta_max only without epsilon_s')
        beta_d, beta_min = fitted_vp_beta(sigma_min, sigma_max, epsilon_s)
        if num_steps == 1:
            return _finish([sigma_max])
        t = 1 + np.arange(num_steps, dtype=np.float64) / (num_steps - 1) * (epsilon_s - 1)
        return _finish(vp_sigma(t, beta_min, beta_min + beta_d))
    beta_min = 0.1 if beta_min is None else beta_min
    beta_max = 20.0 if beta_max is None else beta_max
    if not 0 <= beta_min < beta_max:
        raise ValueError(f'need 0 <= beta_min < beta_max, got beta_min={beta_min!r}, beta_max={beta_max!r}')
    if num_steps == 1:
        return _finish([sigma_max])
    t = np.linspace(vp_time(sigma_max, beta_min, beta_max), vp_time(sigma_min, beta_min, beta_max), num_steps)
    return _finish(vp_sigma(t, beta_min, beta_max))


def ddpm_alphas_cumprod(num_train_steps=1000, beta_start=1e-4, beta_end=0.02):
    """abar_t = prod_{s<=t} (1 - beta_s) for DDPM's linear beta schedule (Ho et al. 2020, Sec. 4)."""
    betas = np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ddpm(*, num_steps=18, num_train_steps=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM discrete grid mapped to sigma = sqrt((1 - abar_t) / abar_t) at `num_steps` timesteps, final 0 appended."""
    if int(num_steps) != num_steps or not 1 <= num_steps <= num_train_steps:
        raise ValueError(f'num_steps must be an integer in [1, num_train_steps={num_train_steps}], got {num_steps!r}')
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f'need 0 < beta_start < beta_end < 1, got {beta_start!r}, {beta_end!r}')
    abar = ddpm_alphas_cumprod(num_train_steps, beta_start, beta_end)
    timesteps = np.round(np.linspace(num_train_steps - 1, 0, num_steps)).astype(int)
    return _finish(np.sqrt((1.0 - abar[timesteps]) / abar[timesteps]))


def explicit(*, sigmas):
    """A grid given point by point (`config.sampling.schedule=explicit`, `schedule_options.sigmas=[80, ..., 0.002]`):
    returned as given (nothing appended), validated like every grid: 1-D, at least 2 points, finite, non-negative,
    strictly decreasing."""
    try:
        grid = np.asarray(sigmas, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f'explicit: sigmas must be a list of numbers, got {sigmas!r}') from e
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f'explicit: sigmas must be a 1-D grid with at least 2 points, got {sigmas!r}')
    if not np.all(np.isfinite(grid)) or np.any(grid < 0):
        raise ValueError(f'explicit: sigmas must be finite and non-negative, got {sigmas!r}')
    if np.any(np.diff(grid) >= 0):
        raise ValueError(f'explicit: sigmas must be strictly decreasing (sigmas[0] > ... > sigmas[-1]), '
                         f'got {sigmas!r}')
    return jnp.asarray(grid, dtype=jnp.result_type(float))


_SCHEDULES = {'edm': edm, 'logsnr': logsnr, 'time_uniform': time_uniform, 'ddpm': ddpm,
              'flow_uniform': flow.uniform_schedule,   # uniform in rectified-flow time t = sigma / (1 + sigma)
              'explicit': explicit}


def names():
    return sorted(_SCHEDULES)


def get(name, **options):
    """The sigma grid `name` built with keyword `options` (unknown name/option -> ValueError listing valid ones)."""
    if name not in _SCHEDULES:
        raise ValueError(f'unknown schedule {name!r}; valid schedules: {", ".join(names())}')
    make = _SCHEDULES[name]
    valid = list(inspect.signature(make).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f'schedule {name!r} has no option(s) {", ".join(unknown)}; valid options: {", ".join(valid)}')
    return make(**options)
