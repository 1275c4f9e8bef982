"""Linear multistep solvers (one denoiser call per step, NFE = number of steps): `dpmpp_2m`, `dpmpp_3m`, `ipndm`.

Both families reuse the last few denoiser outputs. They start with lower orders (warm start: order min(max_order,
i + 1) at step i) and take a first-order step into sigma = 0 (SPEC.md: the last step to 0 is first order; for
DPM-Solver++ it is forced, since h = lambda_next - lambda is infinite there).
Histories are stored newest first: hist[0] belongs to the current grid point, hist[1] to the previous one, ...
The one-step updates `dpmpp_update` and `ipndm_update` are public so tests can start them from exact history.
"""
import jax
import jax.numpy as jnp

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


def _step_order(i, t_next, max_order):
    """Warm start min(max_order, i + 1), and 1 for the step into sigma = 0 (an int32 scalar)."""
    order = jnp.minimum(max_order, i + 1)
    return jnp.where(t_next > 0, order, 1)


def _push(hist, new):
    return jnp.concatenate([new[None], hist[:-1]], axis=0)


def _multistep(name, max_order, afs, denoise_to_zero, history_of, update, order, options):
    """Driver: carry (x, value history, sigma history); `history_of(x, x0_hat, t)` is the stored value (D or d);
    `update(x, hist, sigma_hist, t, t_next, order)` a Python-int-order step, chosen with lax.switch. One call per
    step (`cost`); `order` is the declared order of the full-history update."""
    cost = common.Cost(per_step=1, into_zero=1, saved=int(afs), final=int(denoise_to_zero))

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        del key
        x_T, sigmas = common.prepare(name, x_T, sigmas)
        hist = jnp.zeros((max_order,) + x_T.shape, x_T.dtype)
        # unused history slots hold the current sigma: only the branch of the current order runs (lax.switch).
        sigma_hist = jnp.full((max_order,), sigmas[0])

        def step(carry, i, t, t_next):
            x, hist, sigma_hist = carry
            x0_hat = common.denoise(denoiser, x, t, i, afs)
            hist = _push(hist, history_of(x, x0_hat, t))
            sigma_hist = _push(sigma_hist, t)
            branches = [lambda k=k: update(x, hist, sigma_hist, t, t_next, k) for k in range(1, max_order + 1)]
            x_next = jax.lax.switch(_step_order(i, t_next, max_order) - 1, branches)
            return x_next, hist, sigma_hist

        (x, _, _), trajectory = common.scan_grid(step, (x_T, hist, sigma_hist), sigmas, lambda c: c[0],
                                                 return_trajectory)
        x = common.denoise_to_zero_step(name, denoiser, x, sigmas, denoise_to_zero)
        return common.finish(name, x, cost.of_grid(sigmas), trajectory)

    return common.Sampler(name, sampler, cost=cost, order=order,
                          options=dict(options, afs=afs, denoise_to_zero=denoise_to_zero))


def _dpmpp(name, max_order, afs, denoise_to_zero, form, order, options):
    return _multistep(name, max_order, afs, denoise_to_zero, lambda x, x0_hat, t: x0_hat,
                      lambda x, hist, sigma_hist, t, t_next, k: dpmpp_update(x, hist, sigma_hist, t_next, k, form),
                      order, options)


def dpmpp_2m(*, afs=False, denoise_to_zero=False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction, no thresholding; see `dpmpp_update`."""
    return _dpmpp('dpmpp_2m', 2, afs, denoise_to_zero, 'published', 2, {})


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
    return _dpmpp('dpmpp_3m', 3, afs, denoise_to_zero, form, 2 if form == 'published' else 3, dict(form=form))


def ipndm(*, max_order=4, afs=False, denoise_to_zero=False):
    """iPNDM (Zhang & Chen 2023, DEIS; as used by AMED): Adams-Bashforth on d = (x - D) / sigma, orders 1..max_order."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f'ipndm: max_order must be 1, 2, 3 or 4, got {max_order!r}')
    return _multistep('ipndm', max_order, afs, denoise_to_zero, lambda x, x0_hat, t: direction(x, x0_hat, t),
                      lambda x, hist, sigma_hist, t, t_next, k: ipndm_update(x, hist, t, t_next, k), max_order,
                      dict(max_order=max_order))
