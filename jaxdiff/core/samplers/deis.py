"""DEIS (Zhang & Chen, ICLR 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"): the exponential
integrator with polynomial extrapolation of the noise prediction, in sigma-space.

In sigma-space (x = x0 + sigma eps, alpha = 1) the exponential integrator of the paper (Sec. 3-4) is exact in
its linear part, and the PF-ODE reads dx/dsigma = eps(x, sigma) with eps = (x - D) / sigma. DEIS replaces eps on
[sigma_i, sigma_{i+1}] by the polynomial through its last `order` values (newest first, nodes u_j of the
points sigma_{i-j}) and integrates it exactly:

    x_{i+1} = x_i + sum_j C_ij eps_{i-j},     C_ij = int_{sigma_i}^{sigma_{i+1}} L_j(u(sigma)) dsigma,
    L_j(u) = prod_{k != j} (u - u_k) / (u_j - u_k)                           (Lagrange basis).

The variable u in which the polynomial lives is the `mode`:
  'tab'    u = t, the VP time (the paper's tAB-DEIS): the coefficient int (dsigma/dt) L_j(t) dt is written as the
           integral in sigma of L_j(t(sigma)) (the change of variables), with the linear VP-SDE fitted to
           [0.002, 80] on t in [1e-3, 1] (`schedules.fitted_vp_beta`; EDM's VP discretisation, as the
           zju-pi/diff-sampler implementation does with its `edm2t`).
  'rhoab'  u = rho = sigma (the paper's rhoAB-DEIS): variable-step Adams-Bashforth in sigma.
Order 1 is Euler / DDIM in sigma-space (C_i0 = sigma_{i+1} - sigma_i) in both modes. Warm start: step i uses
min(order, i + 1) points; a step into sigma = 0 is first order (SPEC.md).

The coefficients are computed once per grid before the scan, by Gauss-Legendre quadrature in sigma (exact for
'rhoab', whose integrand is a polynomial; round-off for 'tab', whose integrand is smooth in sigma): in float64 on
the host for a concrete grid (the usual case), and with the same formulas in the grid's dtype inside the graph when
the grid is traced (a user's jit over the grid).
"""
import functools

import jax.numpy as jnp
import numpy as np

from jaxdiff.core.samplers import common
from jaxdiff.core.samplers.multistep import empty_history, push
from jaxdiff.core.samplers.ode import direction

MODES = ('tab', 'rhoab')
QUADRATURE_NODES = 32
# the linear VP-SDE of EDM's VP discretisation fitted to sigma in [0.002, 80] on t in [1e-3, 1]
# (schedules.fitted_vp_beta(0.002, 80.0, 1e-3)); diff-sampler's `edm2t`
_SIGMA_MIN, _SIGMA_MAX, _EPSILON_S = 0.002, 80.0, 1e-3


def vp_beta():
    """(beta_d, beta_min) of the VP time of 'tab'."""
    log_max, log_min = np.log1p(_SIGMA_MAX ** 2), np.log1p(_SIGMA_MIN ** 2)
    beta_d = 2 * (log_min / _EPSILON_S - log_max) / (_EPSILON_S - 1)
    return beta_d, log_max - beta_d / 2


def vp_time(sigma, xp=np):
    """t(sigma) of the VP-SDE sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1's inverse)."""
    beta_d, beta_min = vp_beta()
    return (xp.sqrt(beta_min ** 2 + 2 * beta_d * xp.log1p(sigma ** 2)) - beta_min) / beta_d


def lagrange_integrals(nodes, u, weights, xp=np):
    """[len(nodes)]: sum_q weights_q L_j(u_q), the quadrature of each Lagrange basis polynomial on `nodes`."""
    out = []
    for j in range(len(nodes)):
        basis = xp.ones_like(u)
        for k in range(len(nodes)):
            if k != j:
                basis = basis * (u - nodes[k]) / (nodes[j] - nodes[k])
        out.append(xp.sum(weights * basis))
    return out


def coefficients(sigmas, order, mode, xp=np):
    """[num_steps, order]: C_ij of every step (zeros past the step's number of points), newest point first."""
    gauss_x, gauss_w = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
    to_u = (lambda s: vp_time(s, xp)) if mode == 'tab' else (lambda s: s)
    rows = []
    num_steps = sigmas.shape[0] - 1
    for i in range(num_steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        k = min(order, i + 1)
        row = [t_next - t] if k == 1 else None
        if k > 1:
            sigma_q = 0.5 * (t_next - t) * gauss_x + 0.5 * (t_next + t)
            weights = 0.5 * (t_next - t) * gauss_w
            row = lagrange_integrals([to_u(sigmas[i - j]) for j in range(k)], to_u(sigma_q), weights, xp)
            if xp is np and t_next == 0:
                row = [t_next - t] + [0.0] * (k - 1)
            elif xp is not np:                     # traced: first order into sigma = 0, chosen in the graph
                euler = [t_next - t] + [xp.zeros_like(t)] * (k - 1)
                row = [xp.where(t_next > 0, c, e) for c, e in zip(row, euler)]
        row = list(row) + [0.0 * t] * (order - len(row))
        rows.append(xp.stack([xp.asarray(c) for c in row]) if xp is not np else np.array(row, np.float64))
    return xp.stack(rows)


def deis_step(denoiser, state, i, t, t_next, *, table, afs):
    """eps_i = (x - D(x, t)) / t joins the history; x_next = x + sum_j C_ij eps_{i-j} (C_ij = 0 past the history)."""
    x = state.x
    x0_hat, state = common.evaluate_first(denoiser, x, t, i, state, afs)
    history = push(state.memory, direction(x, x0_hat, t), t)
    c = table[i].reshape(table.shape[1:] + (1,) * x.ndim)
    return state._replace(x=x + jnp.sum(c * history.values, axis=0), memory=history)


def deis(*, mode='tab', order=3, afs=False, denoise_to_zero=False):
    """DEIS (Zhang & Chen 2023): `mode` tab (Lagrange extrapolation of eps in VP time t) | rhoab (in rho = sigma),
    `order` 1..4 points (global order `order`), one call per step (NFE = number of steps). See the module doc."""
    if mode not in MODES:
        raise ValueError(f'deis: mode must be one of {", ".join(MODES)}, got {mode!r}')
    if order not in (1, 2, 3, 4):
        raise ValueError(f'deis: order must be 1, 2, 3 or 4, got {order!r}')

    def init(x_T, sigmas, key):
        del key
        if common.is_concrete(sigmas):
            table = coefficients(np.asarray(sigmas, np.float64), order, mode, np)
        else:
            table = coefficients(sigmas, order, mode, jnp)
        step = functools.partial(deis_step, table=jnp.asarray(table, x_T.dtype), afs=afs)
        return step, empty_history(order, x_T, sigmas[0])

    return common.fixed_grid('deis', init,
                             cost=common.Cost(per_step=1, into_zero=1, saved=int(afs), final=int(denoise_to_zero)),
                             order=order, options=dict(mode=mode, order=order, afs=afs,
                                                       denoise_to_zero=denoise_to_zero))
