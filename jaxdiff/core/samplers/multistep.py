"""Linear multistep solvers (one denoiser call per step, NFE = number of steps): `dpmpp_2m`, `dpmpp_3m`, `ipndm`.

Both families reuse the last few denoiser outputs. They start with lower orders (warm start: order min(max_order,
i + 1) at step i) and take a first-order step into sigma = 0 (SPEC.md: the last step to 0 is first order; for
DPM-Solver++ it is forced, since h = lambda_next - lambda is infinite there).
Each is a step `multistep_step` whose memory is a `History` (stored newest first: values[0] belongs to the current
grid point, values[1] to the previous one, ...), driven by common.fixed_grid's one lax.scan.
The one-step updates `dpmpp_update` and `ipndm_update` are public so tests can start them from exact history;
`push` and `advance` are shared with AMED's multistep plugins (amed.py), whose histories hold per-example sigmas.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.samplers import common
from jaxdiff.core.samplers.ode import direction


DPMPP_FORMS = ('published', 'third_order')


def dpmpp_update(x, x0_hist, sigma_hist, t_next, order, form='published'):
    """One DPM-Solver++ multistep step in data prediction (Lu et al. 2022b, "DPM-Solver++"; 2M is their Algorithm 2)
    in sigma-space, alpha = 1, lambda = -log sigma.

    x at sigma_hist[0]; x0_hist[j] = D at sigma_hist[j] (newest first); `order` a Python int in {1, 2, 3}.
    With h = lambda_next - lambda_0 and the exact solution
    x_next = (t_next/t) x + int_0^h e^{-(h - tau)} x0(lambda_0 + tau) dtau,
    the data prediction x0(lambda) is replaced by its Taylor polynomial m0 + tau m' + tau^2/2 m'' fitted to history:
      x_next = (t_next/t) x - phi_1 m0 + h phi_2 m' - h^2 phi_3 m'',
      phi_1 = expm1(-h), phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2  (so that -phi_1, h phi_2, -h^2 phi_3 are the
      integrals of e^{-(h - tau)} tau^k / k!, k = 0, 1, 2).
    Finite differences with r_j = h_j / h (h_0 = lambda_0 - lambda_1, h_1 = lambda_1 - lambda_2):
      D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
      order 2 (the paper's 2M): h m' ~ D1_0 and h phi_2 ~ -phi_1 / 2, so x_next = (t_next/t) x - phi_1 (m0 + D1_0 / 2);
      order 3: h m' ~ D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  h^2 m'' ~ 2 D2, D2 = (D1_0 - D1_1) / (r0 + r1).
    Order 3 has two forms (`form`):
      'published'   x_next = (t_next/t) x - phi_1 m0 + phi_2 D1 - phi_3 D2: the update of DPM-Solver's reference
                    code (`multistep_dpm_solver_third_update`, data prediction), k-diffusion's `sample_dpmpp_3m_sde`
                    at eta = 0 and diffusers' DPMSolverMultistepScheduler(solver_order=3). Its D2 term is half the
                    Taylor term, so the h^3 term of the local error does not cancel: globally second order.
      'third_order' x_next = (t_next/t) x - phi_1 m0 + phi_2 D1 - 2 phi_3 D2: the Taylor term itself, globally third
                    order. From exact history on a Gaussian mixture, halving h (0.01 -> 0.00125) divides the local
                    error by 15.6, 15.9, 16.0 (third order) and by 13.2, 11.6, 10.3 (tending to 8) with 'published'.
    tests/test_samplers.py checks both orders and the published form against a NumPy transcription.
    Order 1 is DDIM / the first-order DPM-Solver++: x_next = (t_next/t) x + (1 - t_next/t) m0 (valid at t_next = 0).
    """
    t = sigma_hist[0]
    ratio = t_next / t                                                                           # e^{-h}
    m0 = x0_hist[0]
    if order == 1:
        return ratio * x + (1 - ratio) * m0
    h = jnp.log(t / t_next)
    phi_1 = jnp.expm1(-h)
    r0 = jnp.log(sigma_hist[1] / t) / h
    d1_0 = (m0 - x0_hist[1]) / r0
    if order == 2:
        return ratio * x - phi_1 * (m0 + 0.5 * d1_0)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    r1 = jnp.log(sigma_hist[2] / sigma_hist[1]) / h
    d1_1 = (x0_hist[1] - x0_hist[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    d2_weight = 1.0 if form == 'published' else 2.0
    return ratio * x - phi_1 * m0 + phi_2 * d1 - d2_weight * phi_3 * d2


# Adams-Bashforth weights for a uniform step, newest first (iPNDM: Zhang & Chen 2023, DEIS, Sec. 4).
IPNDM_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_update(x, d_hist, t, t_next, order):
    """One iPNDM step: x_next = x + (t_next - t) sum_j w_j d_hist[j], AB weights of `order` (Python int 1..4), with
    d = (x - D) / sigma newest first. The weights are those of a uniform step (exact order on uniform grids)."""
    slope = sum(w * d_hist[j] for j, w in enumerate(IPNDM_WEIGHTS[order - 1]))
    return x + (t_next - t) * slope


# --- the history and the step -------------------------------------------------------------------------------

class History(NamedTuple):
    """Past model outputs of a multistep solver, newest first."""
    values: jax.Array    # [K, B, ...]: x0_hat (DPM-Solver++) or d = (x - x0_hat) / sigma (iPNDM)
    sigmas: jax.Array    # [K] or [K, B] (per example, where the steps differ across the batch): each value's sigma
    count: jax.Array     # int32: values stored so far, at most K


def empty_history(size, x, sigma):
    """A History of `size` slots for samples like x; unused sigma slots hold `sigma` (a scalar or [B]). Unused slots
    never reach an update: the order never exceeds `count` and lax.switch runs that order's branch only."""
    sigma = jnp.asarray(sigma, x.dtype)
    return History(jnp.zeros((size,) + x.shape, x.dtype), jnp.broadcast_to(sigma, (size,) + sigma.shape),
                   jnp.zeros((), jnp.int32))


def _push(stack, new):
    return jnp.concatenate([new[None], stack[:-1]], axis=0)


def push(history, value, sigma):
    """`history` with (value, sigma) in front; the oldest entry drops out."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, history.sigmas.dtype), history.sigmas.shape[1:])
    return History(_push(history.values, value), _push(history.sigmas, sigma),
                   jnp.minimum(history.count + 1, history.values.shape[0]))


def advance(update, x, history, t_next, order, form='published'):
    """x at history.sigmas[0] stepped to t_next by the `update` ('dpmpp': `dpmpp_update`, 'ipndm': `ipndm_update`)
    of `order`, an int32 scalar in 1..K chosen with lax.switch (only that branch runs)."""
    sigmas = history.sigmas
    if sigmas.ndim == 2:                           # per example: [K, B] -> [K, B, 1, ...]
        sigmas = sigmas.reshape(sigmas.shape + (1,) * (x.ndim - 1))
    if update == 'dpmpp':
        branch = lambda k: dpmpp_update(x, history.values, sigmas, t_next, k, form)
    else:
        branch = lambda k: ipndm_update(x, history.values, sigmas[0], t_next, k)
    return jax.lax.switch(order - 1, [lambda k=k: branch(k) for k in range(1, history.values.shape[0] + 1)])


def multistep_step(denoiser, state, i, t, t_next, *, update, form='published', afs=False):
    """One step of a linear multistep solver: x0_hat = D(x, t) (AFS at i == 0) joins the history (as x0_hat for
    'dpmpp', as d for 'ipndm'), then x_next = `advance` with order min(K, i + 1) (warm start), 1 into sigma = 0."""
    x = state.x
    x0_hat, state = common.evaluate_first(denoiser, x, t, i, state, afs)
    history = push(state.memory, x0_hat if update == 'dpmpp' else direction(x, x0_hat, t), t)
    order = jnp.where(t_next > 0, history.count, 1)
    return state._replace(x=advance(update, x, history, t_next, order, form), memory=history)


def _multistep(name, max_order, afs, denoise_to_zero, update, form, order, options):
    """The Sampler of `multistep_step` with a K = max_order history; one call per step (`cost`); `order` is the
    declared order of the full-history update."""
    def init(x_T, sigmas, key):
        del key
        step = functools.partial(multistep_step, update=update, form=form, afs=afs)
        return step, empty_history(max_order, x_T, sigmas[0])

    return common.fixed_grid(name, init, cost=common.Cost(per_step=1, into_zero=1, saved=int(afs),
                                                          final=int(denoise_to_zero)),
                             order=order, options=dict(options, afs=afs, denoise_to_zero=denoise_to_zero))


def dpmpp_2m(*, afs=False, denoise_to_zero=False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction, no thresholding; see `dpmpp_update`."""
    return _multistep('dpmpp_2m', 2, afs, denoise_to_zero, 'dpmpp', 'published', 2, {})


def dpmpp_3m(*, form='published', afs=False, denoise_to_zero=False):
    """DPM-Solver++(3M): multistep data prediction, warm start 1 -> 2 -> 3, first order into sigma = 0.

    form='published' (default): the update of DPM-Solver's reference code, k-diffusion (sample_dpmpp_3m_sde, eta=0)
    and diffusers (solver_order=3), ... + phi_2 D1 - phi_3 D2, globally second order; 'third_order': ... - 2 phi_3
    D2, the Taylor term (see `dpmpp_update`). The warm-up's second-order step is DPM-Solver++(2M)'s in both (as in
    DPM-Solver's reference; k-diffusion's uses phi_2 D1_0 there).

    Measured (jaxdiff/bench/solvers.py `convergence_rows`, the convergence table of configs/bench_solvers.py:
    float64 with the float64 exact denoiser, EDM grids rho 7 from 80 to 0.002 then 0, |x - x_ref| / |x_ref| over the
    batch against a float64 adaptive solve (rtol = atol = 1e-8) from the same x_T; NFE = steps):

        problem (samples)        form          9 steps  18       36       72       144
        mixture_2d (1000)        published     0.275    0.0362   4.27e-3  8.68e-4  1.70e-4
                                 third_order   0.479    0.0542   5.75e-3  1.21e-3  3.22e-4
        gmm_16x16 (500)          published     0.369    0.0569   1.16e-3  2.98e-4  5.97e-5
                                 third_order   0.568    0.0558   1.86e-3  3.00e-4  7.04e-5
        mixture_4d (500)         published     0.235    0.0260   2.88e-3  5.31e-4  9.97e-5
                                 third_order   0.390    0.0335   3.47e-3  4.70e-4  5.66e-5
        mixture_4x4x3 (500)      published     0.313    0.0102   1.25e-3  2.88e-4  5.88e-5
                                 third_order   0.503    0.0186   1.73e-3  2.57e-4  3.89e-5

    The published form is the more accurate one at few steps on every problem (9 to 36 steps); the third-order form
    wins from 72 steps on the overlapping mixtures (mixture_4d, mixture_4x4x3), where one halving (72 -> 144) divides
    its error by 8.3 and 6.6 (the published form's by 5.3 and 4.9); on the sharp mixtures (std 0.1 to 0.15) it does
    not win up to 144 steps. On the digits set both reach round-off by 72 steps.
    """
    if form not in DPMPP_FORMS:
        raise ValueError(f'dpmpp_3m: form must be one of {", ".join(DPMPP_FORMS)}, got {form!r}')
    return _multistep('dpmpp_3m', 3, afs, denoise_to_zero, 'dpmpp', form, 2 if form == 'published' else 3,
                      dict(form=form))


def ipndm(*, max_order=4, afs=False, denoise_to_zero=False):
    """iPNDM (Zhang & Chen 2023, DEIS; as used by AMED): Adams-Bashforth on d = (x - D) / sigma, orders 1..max_order."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f'ipndm: max_order must be 1, 2, 3 or 4, got {max_order!r}')
    return _multistep('ipndm', max_order, afs, denoise_to_zero, 'ipndm', 'published', max_order,
                      dict(max_order=max_order))


# --- iPNDM-v: variable-step Adams-Bashforth coefficients ------------------------------------------------------

def ipndm_v_weights(t_next, sigma_hist, order):
    """Weights w_j (newest first) of one iPNDM-v step x_next = x + (t_next - t) sum_j w_j d_j, `order` a Python int
    1..4, t = sigma_hist[0]: the variable-step Adams-Bashforth weights, i.e. the exact integral over [t, t_next] of
    the polynomial through the last `order` slopes d_j at their own sigmas s_j = sigma_hist[j] (Hairer, Norsett,
    Wanner, "Solving ODEs I", III.5, the variable-step Adams methods):
        w_j = (1 / (t_next - t)) int_t^{t_next} L_j(s) ds,   L_j(s) = prod_{m != j} (s - s_m) / (s_j - s_m),
    integrated exactly by a 4-point Gauss-Legendre rule (exact to degree 7; L_j has degree <= 3). Order 2 is
    w = (1 + h / (2 h1), -h / (2 h1)), h = t_next - t, h1 = t - s_1. On a uniform grid these are iPNDM's fixed weights
    (IPNDM_WEIGHTS); on any grid they are DEIS 'rhoab' (deis.py computes the same integrals per grid).
    Note: zju-pi/diff-sampler's `ipndm_v_sampler` uses closed forms that are exact only up to order 2: its order-3
    weights integrate a quadratic exactly only for constant step ratios, and its order-4 weights are not AB4 even on
    a uniform grid (backward-difference weight 11/24 for nabla^3 instead of 3/8), so they are not used here."""
    if order == 1:
        return (1.0,)
    t = sigma_hist[0]
    nodes = [sigma_hist[j] for j in range(order)]
    gauss_x, gauss_w = (jnp.asarray(a, jnp.result_type(t)) for a in np.polynomial.legendre.leggauss(4))
    s = 0.5 * (t_next - t) * gauss_x + 0.5 * (t_next + t)          # quadrature points on [t, t_next]
    weights = []
    for j in range(order):
        basis = 1.0
        for m in range(order):
            if m != j:
                basis = basis * (s - nodes[m]) / (nodes[j] - nodes[m])
        weights.append(0.5 * jnp.sum(gauss_w * basis))                # (1 / h) int_t^{t_next} L_j
    return tuple(weights)


def ipndm_v_update(x, d_hist, sigma_hist, t_next, order):
    """One iPNDM-v step: x_next = x + (t_next - t) sum_j w_j d_hist[j] with `ipndm_v_weights` (d newest first)."""
    weights = ipndm_v_weights(t_next, sigma_hist, order)
    return x + (t_next - sigma_hist[0]) * sum(w * d_hist[j] for j, w in enumerate(weights))


def ipndm_v_step(denoiser, state, i, t, t_next, *, afs=False):
    """d = (x - D(x, t)) / t joins the history; order min(K, i + 1) (warm start), 1 into sigma = 0."""
    x = state.x
    x0_hat, state = common.evaluate_first(denoiser, x, t, i, state, afs)
    history = push(state.memory, direction(x, x0_hat, t), t)
    order = jnp.where(t_next > 0, history.count, 1)
    branches = [lambda k=k: ipndm_v_update(x, history.values, history.sigmas, t_next, k)
                for k in range(1, history.values.shape[0] + 1)]
    return state._replace(x=jax.lax.switch(order - 1, branches), memory=history)


def ipndm_v(*, max_order=4, afs=False, denoise_to_zero=False):
    """iPNDM-v: iPNDM with the variable-step Adams-Bashforth weights of non-uniform grids (`ipndm_v_weights`), orders
    1..max_order (warm start), first order into sigma = 0, one call per step. Declared order max_order."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f'ipndm_v: max_order must be 1, 2, 3 or 4, got {max_order!r}')

    def init(x_T, sigmas, key):
        del key
        return functools.partial(ipndm_v_step, afs=afs), empty_history(max_order, x_T, sigmas[0])

    return common.fixed_grid('ipndm_v', init, cost=common.Cost(per_step=1, into_zero=1, saved=int(afs),
                                                               final=int(denoise_to_zero)),
                             order=max_order, options=dict(max_order=max_order, afs=afs,
                                                           denoise_to_zero=denoise_to_zero))
