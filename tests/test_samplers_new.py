"""UniPC, DEIS, iPNDM-v, Euler-ancestral and DPM-Solver++(2M) SDE against float64 NumPy transcriptions of their
papers' equations (written here, not calling the library) on the exact Gaussian mixture; their special cases, their
observed orders on an exact problem, the 'explicit' schedule and the errors of misuse."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import integrate

from jaxdiff.core import analytic, samplers, schedules
from jaxdiff.bench import problems
from jaxdiff.core.samplers import common

KEY = jax.random.key(11)


def _gmm():
    return problems.get('mixture_4d').target(jnp.float64)


def _x_T(n=4, sigma=80.0):
    return jax.random.normal(jax.random.key(2), (n, 4), jnp.float64) * sigma


def _numpy(denoiser):
    return lambda x, sigma: np.asarray(denoiser(jnp.asarray(x), jnp.float64(sigma)), np.float64)


def _run(name, gmm, x_T, sigmas, **options):
    """The sampler on a float64 grid, run op by op (no compilation: the grids here are short)."""
    with jax.disable_jit():
        out, info = samplers.get(name, **options)(gmm.denoiser, x_T, jnp.asarray(sigmas, jnp.float64), key=KEY)
    return np.asarray(out, np.float64), info


def _close(a, b, tol=1e-9):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


EDM6 = np.asarray(schedules.get('edm', num_steps=6), np.float64)     # ends at 0: covers the step into 0
ABOVE0 = np.geomspace(20.0, 0.1, 7)                                  # ends above 0: every step at full order


# --- UniPC (Zhao et al. 2023), data prediction --------------------------------------------------------------

def unipc_numpy(D, x, sig, order, variant, lower_order_final, corrector):
    """Zhao et al. 2023, multistep UniPC-p with B(h), data prediction, with the authors' choices (diff-sampler):
    alpha = 1, lambda = -log sigma; UniP-p x~ = (s_next/s) x - expm1(-h) m0 - B(h) sum a_k D1_k, UniC-p
    x = (s_next/s) x - expm1(-h) m0 - B(h) (sum c_k D1_k + c_p (D(x~) - m0)); a, c solve R a = b (the order
    conditions), with
    a = 1/2 at p = 2 and c = 1/2 at p = 1; the corrector's evaluation becomes the next step's model output."""
    n = len(sig) - 1
    ms, ss = [D(x, sig[0])], [sig[0]]                     # oldest first
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, n - i)
        m0 = ms[-1]
        if s_next == 0:
            x = m0
            break
        h = math.log(s) - math.log(s_next)
        B = -h if variant == 'bh1' else math.expm1(-h)
        r = [(math.log(s) - math.log(ss[-1 - k])) / h for k in range(1, p)] + [1.0]
        D1 = [(ms[-1 - k] - m0) / r[k - 1] for k in range(1, p)]
        # b_i = i! phi_{i+1}(-h) style terms: g_1 = expm1(-h)/(-h) - 1, g_{i+1} = g_i/(-h) - 1/(i+1)!
        g, b = math.expm1(-h) / (-h) - 1, []
        for k in range(1, p + 1):
            b.append(g * math.factorial(k) / B)
            g = g / (-h) - 1 / math.factorial(k + 1)
        R = np.array([[rk ** k for rk in r] for k in range(p)])
        a = [] if p == 1 else [0.5] if p == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        c = [0.5] if p == 1 else list(np.linalg.solve(R, b))
        base = s_next / s * x - math.expm1(-h) * m0
        x_pred = base - B * sum((ak * dk for ak, dk in zip(a, D1)), np.zeros_like(x))
        if i == n - 1:
            x = x_pred
            break
        m_next = D(x_pred, s_next)
        if corrector:
            x = base - B * (sum((ck * dk for ck, dk in zip(c[:-1], D1)), np.zeros_like(x)) + c[-1] * (m_next - m0))
        else:
            x = x_pred
        ms.append(m_next)
        ss.append(s_next)
    return x


@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('variant', ['bh1', 'bh2'])
def test_unipc_equals_numpy_algorithm(order, variant):
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T()
        D = _numpy(gmm.denoiser)
        for sig, lof, corrector in ((EDM6, True, True), (ABOVE0, False, True), (ABOVE0, False, False)):
            out, info = _run('unipc', gmm, x_T, sig, order=order, variant=variant, lower_order_final=lof,
                             corrector=corrector)
            _close(out, unipc_numpy(D, np.asarray(x_T), sig, order, variant, lof, corrector))
            assert info['nfe'] == len(sig) - 1 == int(info['network_evaluations'])


def test_unipc_special_cases():
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T()
        run = lambda name, **kw: _run(name, gmm, x_T, EDM6, **kw)[0]
        # UniP-2 with B(h) = expm1(-h) is DPM-Solver++(2M); UniP-1 is DDIM (= Euler in sigma-space)
        _close(run('unipc', order=2, variant='bh2', corrector=False, lower_order_final=False), run('dpmpp_2m'))
        _close(run('unipc', order=1, corrector=False), run('euler'), 1e-9)
        # the corrector is really applied, and changes nothing about the calls
        assert np.linalg.norm(run('unipc') - run('unipc', corrector=False)) > 1e-4
        assert np.linalg.norm(run('unipc', variant='bh1') - run('unipc')) > 1e-4


# --- DEIS (Zhang & Chen 2023) -------------------------------------------------------------------------------

def deis_numpy(D, x, sig, order, mode):
    """Zhang & Chen 2023 (exponential integrator, tAB / rhoAB) in sigma-space:
    x_{i+1} = x_i + sum_j C_ij eps_{i-j}, eps = (x - D)/sigma,
    C_ij = int_{t_i}^{t_{i+1}} (dsigma/dt) L_j(t) dt with L_j the Lagrange basis on the last points in t (tAB: the
    VP time of EDM's VP discretisation, beta fitted to sigma(1e-3) = 0.002, sigma(1) = 80) or in rho = sigma (rhoAB);
    adaptive quadrature (scipy quad); first order into sigma = 0."""
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(smin ** 2 + 1) / eps_s - math.log(smax ** 2 + 1)) / (eps_s - 1)
    beta_min = math.log(smax ** 2 + 1) - beta_d / 2
    sigma_of = lambda t: math.sqrt(math.exp(0.5 * beta_d * t * t + beta_min * t) - 1)
    dsigma_dt = lambda t: (beta_d * t + beta_min) * math.exp(0.5 * beta_d * t * t + beta_min * t) / (2 * sigma_of(t))
    t_of = lambda s: (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(1 + s * s)) - beta_min) / beta_d
    if mode == 'rhoab':
        u_of, weight = (lambda s: s), (lambda u: 1.0)
    else:
        u_of, weight = t_of, dsigma_dt
    eps = []
    for i in range(len(sig) - 1):
        eps.append((x - D(x, sig[i])) / sig[i])
        k = min(order, i + 1) if sig[i + 1] > 0 else 1
        nodes = [u_of(sig[i - j]) for j in range(k)]

        def basis(u, j):
            return np.prod([(u - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j])

        a, b = u_of(sig[i]), u_of(sig[i + 1])
        coeffs = [integrate.quad(lambda u: weight(u) * basis(u, j), a, b, epsabs=0, epsrel=1e-13, limit=200)[0]
                  for j in range(k)] if k > 1 else [sig[i + 1] - sig[i]]
        x = x + sum(c * eps[-1 - j] for j, c in enumerate(coeffs))
    return x


@pytest.mark.parametrize('mode', ['tab', 'rhoab'])
def test_deis_equals_numpy_exponential_integrator(mode):
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T()
        D = _numpy(gmm.denoiser)
        for order in (1, 2, 3, 4):
            for sig in (EDM6, ABOVE0):
                out, info = _run('deis', gmm, x_T, sig, mode=mode, order=order)
                _close(out, deis_numpy(D, np.asarray(x_T), sig, order, mode), 1e-8)
                assert info['nfe'] == len(sig) - 1


def test_deis_order_1_is_ddim_and_euler():
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T()
        run = lambda name, **kw: _run(name, gmm, x_T, EDM6, **kw)[0]
        euler = run('euler')
        for mode in ('tab', 'rhoab'):
            _close(run('deis', mode=mode, order=1), euler, 1e-12)
        _close(run('ddim', eta=0.0), euler, 1e-9)
        assert np.linalg.norm(run('deis', mode='tab') - run('deis', mode='rhoab')) > 1e-4


# --- iPNDM-v ------------------------------------------------------------------------------------------------

def ipndm_v_numpy(D, x, sig, max_order):
    """Variable-step Adams-Bashforth on dx/dsigma = d = (x - D)/sigma (Hairer, Norsett, Wanner I, III.5): the
    polynomial through the last k slopes at their own sigmas, integrated exactly over [s_i, s_{i+1}] (numpy poly1d
    products and polyint); warm start k = min(max_order, i + 1), first order into sigma = 0."""
    ds = []
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        ds.insert(0, (x - D(x, s)) / s)
        k = min(max_order, i + 1) if s_next > 0 else 1
        nodes = [sig[i - j] for j in range(k)]
        step = np.zeros_like(x)
        for j in range(k):
            basis = np.poly1d([1.0])
            for m in range(k):
                if m != j:
                    basis = basis * np.poly1d([1.0, -nodes[m]]) / (nodes[j] - nodes[m])
            antiderivative = np.polyint(basis)
            step = step + (antiderivative(s_next) - antiderivative(s)) * ds[j]
        x = x + step
    return x


@pytest.mark.parametrize('max_order', [1, 2, 3, 4])
def test_ipndm_v_equals_numpy_variable_step_adams_bashforth(max_order):
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T()
        D = _numpy(gmm.denoiser)
        for sig in (EDM6, ABOVE0):
            _close(_run('ipndm_v', gmm, x_T, sig, max_order=max_order)[0],
                   ipndm_v_numpy(D, np.asarray(x_T), sig, max_order))


def test_ipndm_v_special_cases():
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T(sigma=5.0)
        uniform = np.linspace(5.0, 0.5, 8)                    # uniform in sigma: iPNDM's fixed AB weights are exact
        log_uniform = np.geomspace(5.0, 0.5, 8)               # uniform in log sigma: steps shrink by a constant ratio
        run = lambda name, sig, **kw: _run(name, gmm, x_T, sig, **kw)[0]
        for max_order in (2, 3, 4):
            _close(run('ipndm_v', uniform, max_order=max_order), run('ipndm', uniform, max_order=max_order), 1e-12)
            # on a uniform-in-log grid iPNDM-v does NOT reduce to iPNDM (the steps in sigma are not uniform) ...
            assert np.linalg.norm(run('ipndm_v', log_uniform, max_order=max_order)
                                  - run('ipndm', log_uniform, max_order=max_order)) > 1e-6
            # ... it is DEIS rhoAB (the same variable-step AB in rho = sigma), on every grid
            _close(run('ipndm_v', log_uniform, max_order=max_order),
                   run('deis', log_uniform, mode='rhoab', order=max_order), 1e-10)
        _close(run('ipndm_v', log_uniform, max_order=1), run('euler', log_uniform), 1e-12)


# --- stochastic samplers ------------------------------------------------------------------------------------

def euler_ancestral_numpy(D, x, sig, eta, s_noise):
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`): sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)),
    sigma_down = sqrt(s'^2 - sigma_up^2), x = x + (sigma_down - s) (x - D)/s + s_noise sigma_up z_i."""
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        d = (x - D(x, s)) / s
        sigma_up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        sigma_down = math.sqrt(s_next ** 2 - sigma_up ** 2)
        x = x + d * (sigma_down - s)
        if s_next > 0:
            x = x + np.asarray(common.step_noise(KEY, i, x.shape, jnp.float64)) * s_noise * sigma_up
    return x


def dpmpp_2m_sde_numpy(D, x, sig, eta, s_noise, solver_type):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; k-diffusion `sample_dpmpp_2m_sde`), lambda = -log sigma."""
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        m0 = D(x, s)
        if s_next == 0:
            x = m0
        else:
            h = math.log(s) - math.log(s_next)
            eta_h = eta * h
            x = s_next / s * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * m0
            if old is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (m0 - old)
                else:
                    x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (m0 - old)
            if eta:
                z = np.asarray(common.step_noise(KEY, i, x.shape, jnp.float64))
                x = x + z * s_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old = m0
    return x


def test_stochastic_samplers_equal_numpy_and_reduce_at_eta_0():
    with jax.enable_x64(True):
        gmm, x_T = _gmm(), _x_T()
        D = _numpy(gmm.denoiser)
        for eta, s_noise in ((1.0, 1.0), (0.5, 1.003)):
            _close(_run('euler_ancestral', gmm, x_T, EDM6, eta=eta, s_noise=s_noise)[0],
                   euler_ancestral_numpy(D, np.asarray(x_T), EDM6, eta, s_noise))
            for solver_type in ('midpoint', 'heun'):
                _close(_run('dpmpp_2m_sde', gmm, x_T, EDM6, eta=eta, s_noise=s_noise, solver_type=solver_type)[0],
                       dpmpp_2m_sde_numpy(D, np.asarray(x_T), EDM6, eta, s_noise, solver_type))
        _close(_run('dpmpp_2m_sde', gmm, x_T, EDM6, eta=0.0, solver_type='heun')[0],
               dpmpp_2m_sde_numpy(D, np.asarray(x_T), EDM6, 0.0, 1.0, 'heun'))
        # eta = 0: the ODE solvers, and no key is needed
        sampler = samplers.get('dpmpp_2m_sde', eta=0.0)
        _close(sampler(gmm.denoiser, x_T, jnp.asarray(EDM6))[0], _run('dpmpp_2m', gmm, x_T, EDM6)[0], 1e-12)
        sampler = samplers.get('euler_ancestral', eta=0.0)
        _close(sampler(gmm.denoiser, x_T, jnp.asarray(EDM6))[0], _run('euler', gmm, x_T, EDM6)[0], 1e-12)
        with pytest.raises(ValueError, match='key'):
            samplers.get('euler_ancestral')(gmm.denoiser, x_T, jnp.asarray(EDM6))
        with pytest.raises(ValueError, match='key'):
            samplers.get('dpmpp_2m_sde')(gmm.denoiser, x_T, jnp.asarray(EDM6))


# --- observed order on an exact problem (float64) -----------------------------------------------------------

def test_observed_orders_on_a_short_interval():
    with jax.enable_x64(True):
        gmm = _gmm()
        x = jax.random.normal(jax.random.key(3), (8, 4), jnp.float64) * 2.5
        truth = analytic.reference_solve(gmm.denoiser, x, 2.0, 0.5, rtol=1e-12, atol=1e-12)
        counts = np.array([8, 16, 32])
        # (name, options, least slope): single-step-like methods show their declared order; multistep methods of
        # order >= 3 are held to about 2.2 here by their low-order warm-start steps (as dpmpp_3m / ipndm are)
        for name, options, least in (('unipc', dict(order=1, lower_order_final=False), 1.75),       # UniC-1: 2
                                     ('unipc', dict(order=2, lower_order_final=False), 2.5),        # UniC-2: 3
                                     ('unipc', dict(order=3, lower_order_final=False, variant='bh1'), 3.7),
                                     ('unipc', dict(order=2, corrector=False, lower_order_final=False), 1.75),
                                     ('deis', dict(mode='tab', order=2), 1.7),
                                     ('ipndm_v', dict(max_order=4), 2.2)):          # = DEIS rhoAB, order 4
            sampler = samplers.get(name, **options)
            errors = [float(jnp.linalg.norm(sampler(gmm.denoiser, x, jnp.geomspace(2.0, 0.5, n + 1))[0] - truth))
                      for n in counts]
            slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
            assert least <= slope <= sampler.order + 0.6, (name, options, slope, errors)
        assert samplers.get('unipc', order=3).order == 4 and samplers.get('unipc', corrector=False).order == 3
        assert samplers.get('deis', order=4).order == 4 and samplers.get('euler_ancestral').order is None


# --- transformations, misuse, the explicit schedule ---------------------------------------------------------

@pytest.mark.parametrize('name, options', [('unipc', {}), ('deis', {}), ('ipndm_v', {}), ('euler_ancestral', {}),
                                           ('dpmpp_2m_sde', {'solver_type': 'heun'})])
def test_jit_over_the_grid_and_vmap(name, options):
    gmm = problems.get('mixture_4d').target(jnp.float32)
    sampler = samplers.get(name, **options)
    sigmas = schedules.get('edm', num_steps=5)
    x_T = jax.random.normal(jax.random.key(1), (4, 4)) * 80.0
    eager, info = sampler(gmm.denoiser, x_T, sigmas, key=KEY)
    run = jax.jit(lambda x, s: sampler(gmm.denoiser, x, s, key=KEY))
    jitted, jit_info = run(x_T, sigmas)                                                      # grid traced
    np.testing.assert_allclose(jitted, eager, rtol=2e-4, atol=2e-4)
    assert int(jit_info['nfe']) == info['nfe'] == 5
    # the batch split over 4 devices: the same samples (step_noise does not depend on the device count)
    mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
    sharded = jax.device_put(x_T, NamedSharding(mesh, PartitionSpec('data')))
    np.testing.assert_allclose(run(sharded, sigmas)[0], jitted, rtol=2e-5, atol=2e-5)
    if sampler.order is not None:                                    # noise is drawn per batch shape
        per_example = jax.vmap(lambda x: sampler(gmm.denoiser, x[None], sigmas, key=KEY)[0][0])(x_T)
        np.testing.assert_allclose(per_example, eager, rtol=2e-5, atol=2e-5)


def test_unknown_or_invalid_options_are_value_errors():
    for name in ('unipc', 'deis', 'ipndm_v', 'euler_ancestral', 'dpmpp_2m_sde'):
        with pytest.raises(ValueError, match='valid options'):
            samplers.get(name, bogus=1)
    with pytest.raises(ValueError, match='bh1, bh2'):
        samplers.get('unipc', variant='bh3')
    with pytest.raises(ValueError, match='1, 2 or 3'):
        samplers.get('unipc', order=4)
    with pytest.raises(ValueError, match='tab, rhoab'):
        samplers.get('deis', mode='ab')
    with pytest.raises(ValueError, match='1, 2, 3 or 4'):
        samplers.get('deis', order=5)
    with pytest.raises(ValueError, match='1, 2, 3 or 4'):
        samplers.get('ipndm_v', max_order=0)
    with pytest.raises(ValueError, match='midpoint, heun'):
        samplers.get('dpmpp_2m_sde', solver_type='euler')
    with pytest.raises(ValueError, match='eta'):
        samplers.get('euler_ancestral', eta=-1.0)


def test_explicit_schedule():
    grid = [80.0, 10.98, 1.5, 0.002]
    sigmas = schedules.get('explicit', sigmas=grid)
    np.testing.assert_allclose(np.asarray(sigmas), grid, rtol=1e-6)          # as given: nothing appended
    assert sigmas.dtype == jnp.result_type(float)
    np.testing.assert_allclose(schedules.get('explicit', sigmas=(3.0, 1.0, 0.0)), [3.0, 1.0, 0.0])
    for bad in ([1.0, 2.0], [1.0, 1.0, 0.0], [2.0, -1.0], [5.0], [[2.0, 1.0]], [3.0, float('nan')], ['a', 'b']):
        with pytest.raises(ValueError, match='explicit'):
            schedules.get('explicit', sigmas=bad)
    with pytest.raises(ValueError, match='valid options'):
        schedules.get('explicit', sigmas=grid, num_steps=3)
    assert 'explicit' in schedules.names()
