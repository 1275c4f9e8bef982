"""UniPC (Zhao, Bai, Rao, Zhou, Lu, NeurIPS 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models"): the predictor UniP-p and the corrector UniC-p in data-prediction form, in sigma-space.

With alpha = 1, lambda = -log sigma, h = lambda_next - lambda_0 = log(t / t_next) and the data predictions m_k at
the history points sigma_k (newest first: m_0 = D(x, t) at the current point t = sigma_0), the multistep UniPC-p
with B(h) in data-prediction form (the paper's Sec. 3 and its appendix on the data-prediction variant) reads

    r_k = (lambda_k - lambda_0) / h          (k = 1 .. p-1; negative: the history lies behind),  r_p = 1,
    D1_k = (m_k - m_0) / r_k,
    x_base = (t_next / t) x - phi_1 m_0,      phi_1 = expm1(-h)        (the DDIM / DPM-Solver++-1 step),
    UniP-p:  x_pred = x_base - B(h) sum_{k<p} a_k D1_k,
    UniC-p:  x_corr = x_base - B(h) (sum_{k<p} c_k D1_k + c_p (m_next - m_0)),   m_next = D(x_pred, t_next),

B(h) = -h ('bh1') or expm1(-h) ('bh2'), the paper's two choices of B(h) = O(h), and the weights solve the order
conditions (Sec. 3.1-3.2) R a = b with R[i, k] = r_k^i (i = 0 .. p-1) and b_i = i! g_i / B(h), where
g_1 = phi_1 / (-h) - 1, g_{i+1} = g_i / (-h) - 1 / (i+1)!; the choices are those of zju-pi/diff-sampler:
  predictor: p = 1 no extrapolation term; p = 2 a = (1/2) (the simplified choice); p = 3 solve the 2x2 system;
  corrector: p = 1 c = (1/2); p >= 2 solve the p x p system.
(`unipc_coefficients` writes the recursion out.) The corrector reuses the evaluation m_next at the *predicted* point:
it becomes the next step's m_0, and the corrected x_corr the next step's x, so UniPC spends one call per step: the
first step's D(x_T, sigma_0) and one call per following step (the corrector's), no corrector after the last step.
UniP-2 with 'bh2' is DPM-Solver++(2M) exactly (B(h) = phi_1, a = 1/2).

Step schedule (diff-sampler's `unipc_sampler`): step i (0-based, N steps) uses order min(order, i + 1) (warm start);
with `lower_order_final` also at most N - i (the last step first order, the one before at most second), and a step
into sigma = 0 is first order without corrector (SPEC.md; h is infinite there).
"""
import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff.core.samplers import common
from jaxdiff.core.samplers.multistep import empty_history, push

VARIANTS = ('bh1', 'bh2')


def unipc_coefficients(sigma_hist, t_next, order, variant):
    """(ratio, phi_1, B_h, rks, rhos_p, rhos_c) of a UniPC step of `order` (Python int 1..3) from the history
    sigmas (newest first) to t_next > 0: ratio = t_next / t, rks = [r_1 .. r_{p-1}], rhos_p the predictor's
    weights (p - 1 of them), rhos_c the corrector's (p of them, the last one multiplying m_next - m_0)."""
    t = sigma_hist[0]
    h = jnp.log(t / t_next)
    hh = -h                                         # data prediction
    phi_1 = jnp.expm1(hh)
    b_h = hh if variant == 'bh1' else jnp.expm1(hh)
    rks = [jnp.log(t / sigma_hist[k]) / h for k in range(1, order)]
    # b_i = i! g_i / B(h), g_1 = phi_1 / hh - 1, g_{i+1} = g_i / hh - 1 / (i+1)!   (i = 1 .. order)
    g, b = phi_1 / hh - 1, []
    for i in range(1, order + 1):
        b.append(g * math.factorial(i) / b_h)
        g = g / hh - 1 / math.factorial(i + 1)
    nodes = rks + [jnp.ones_like(h)]
    R = jnp.stack([jnp.stack([r ** i for r in nodes]) for i in range(order)])       # R[i, k] = r_k^i
    b = jnp.stack(b)
    if order == 1:
        rhos_p, rhos_c = [], [jnp.asarray(0.5, h.dtype)]
    else:
        rhos_c = list(jnp.linalg.solve(R, b))
        if order == 2:
            rhos_p = [jnp.asarray(0.5, h.dtype)]
        else:
            rhos_p = list(jnp.linalg.solve(R[:-1, :-1], b[:-1]))
    return t_next / t, phi_1, b_h, rks, rhos_p, rhos_c


def unipc_update(x, x0_hist, sigma_hist, t_next, order, variant='bh2', x0_next=None):
    """One UniP-`order` step (x0_next None) or UniC-`order` correction (x0_next = D(x_pred, t_next)) from x at
    sigma_hist[0], with data predictions x0_hist (newest first). `order` a Python int 1..3; t_next > 0 unless
    order == 1 and no correction (then x_next = x0_hist[0], the first-order step into 0)."""
    m0 = x0_hist[0]
    if order == 1 and x0_next is None:
        ratio = t_next / sigma_hist[0]
        return ratio * x + (1 - ratio) * m0                   # = ratio x - expm1(-h) m0, valid at t_next = 0
    ratio, phi_1, b_h, rks, rhos_p, rhos_c = unipc_coefficients(sigma_hist, t_next, order, variant)
    x_base = ratio * x - phi_1 * m0
    d1s = [(x0_hist[k] - m0) / rks[k - 1] for k in range(1, order)]
    if x0_next is None:
        return x_base - b_h * sum(a * d for a, d in zip(rhos_p, d1s))
    res = sum((c * d for c, d in zip(rhos_c[:-1], d1s)), rhos_c[-1] * (x0_next - m0))
    return x_base - b_h * res


def unipc_step(denoiser, state, i, t, t_next, *, max_order, num_steps, variant, corrector, lower_order_final, afs):
    """Step i: (at i = 0 only) m_0 = D(x, t) joins the history; the predictor UniP; then, unless this is the last
    step, m_next = D(x_pred, t_next) (the one call of the step), the corrector UniC, and m_next joins the history."""
    def first():
        x0_hat, evaluated = common.evaluate_first(denoiser, state.x, t, i, state, afs)
        return evaluated._replace(memory=push(evaluated.memory, x0_hat, t))

    state = jax.lax.cond(i == 0, first, lambda: state)
    x, history = state.x, state.memory
    order = jnp.minimum(history.count, max_order)
    if lower_order_final:
        order = jnp.minimum(order, num_steps - i)
    order = jnp.where(t_next > 0, order, 1)
    branches = range(1, max_order + 1)
    x_pred = jax.lax.switch(order - 1, [lambda k=k: unipc_update(x, history.values, history.sigmas, t_next, k,
                                                                 variant) for k in branches])

    def correct():
        x0_next, evaluated = common.evaluate(denoiser, x_pred, t_next, state)
        if corrector:
            x_next = jax.lax.switch(order - 1, [lambda k=k: unipc_update(x, history.values, history.sigmas, t_next,
                                                                         k, variant, x0_next) for k in branches])
        else:
            x_next = x_pred
        return evaluated._replace(x=x_next, memory=push(history, x0_next, t_next))

    return jax.lax.cond((i < num_steps - 1) & (t_next > 0), correct, lambda: state._replace(x=x_pred))


def unipc(*, order=3, variant='bh2', lower_order_final=True, corrector=True, afs=False, denoise_to_zero=False):
    """UniPC (Zhao et al. 2023) in data-prediction form: predictor UniP-`order` (1..3), corrector UniC-`order`
    (`corrector=False`: the predictor alone, the same calls), `variant` bh1 | bh2 (B(h) = -h | expm1(-h)),
    `lower_order_final` (diff-sampler: the last steps at orders 1, 2). NFE = number of steps: the corrector reuses
    the next step's evaluation and there is none after the last step. Declared order: order + 1 with the corrector
    (UniC raises the order of accuracy by one, Sec. 3.1), order without; a grid's warm-start steps and, with
    `lower_order_final`, its last two steps run at lower orders (on a grid ending above 0 this caps the observed
    global order at 2)."""
    if order not in (1, 2, 3):
        raise ValueError(f'unipc: order must be 1, 2 or 3, got {order!r}')
    if variant not in VARIANTS:
        raise ValueError(f'unipc: variant must be one of {", ".join(VARIANTS)}, got {variant!r}')

    def init(x_T, sigmas, key):
        del key
        step = functools.partial(unipc_step, max_order=order, num_steps=sigmas.shape[0] - 1, variant=variant,
                                 corrector=bool(corrector), lower_order_final=bool(lower_order_final), afs=afs)
        return step, empty_history(order, x_T, sigmas[0])

    return common.fixed_grid('unipc', init,
                             cost=common.Cost(per_step=1, into_zero=1, saved=int(afs), final=int(denoise_to_zero)),
                             order=order + 1 if corrector else order,
                             options=dict(order=order, variant=variant, lower_order_final=lower_order_final,
                                          corrector=corrector, afs=afs, denoise_to_zero=denoise_to_zero))
