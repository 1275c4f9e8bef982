"""Fixed-grid and adaptive samplers against exact ground truth: NumPy transcriptions of the papers' algorithms,
the exact mixture denoiser, float64 reference solves, counted denoiser calls."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.core import analytic, samplers, schedules
from jaxdiff.bench import problems
from jaxdiff.core.samplers import common, ddim as ddim_module, multistep

FIXED_GRID = [('euler', {}), ('heun', {}), ('heun', {'s_churn': 5.0}), ('dpm2', {}), ('dpmpp_2m', {}),
              ('dpmpp_3m', {}), ('dpmpp_3m', {'form': 'third_order'}), ('ipndm', {}), ('ipndm', {'max_order': 2}),
              ('ddim', {}), ('ddim', {'eta': 1.0})]
KEY = jax.random.key(7)


def _gmm(dtype=jnp.float32):
    """Three overlapping Gaussians in 4-D (the truth problem 'mixture_4d'), exact denoiser in `dtype`."""
    return problems.get('mixture_4d').target(dtype)


def _x_T(n=8, d=4, sigma=80.0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (n, d), dtype) * sigma


def _numpy(denoiser):
    return lambda x, sigma: np.asarray(denoiser(jnp.asarray(x, jnp.float32), jnp.float32(sigma)), np.float64)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# --- exact algorithm transcriptions -------------------------------------------------------------------------

@pytest.mark.parametrize('churn', [{}, {'s_churn': 20.0, 's_min': 0.05, 's_max': 30.0, 's_noise': 1.007}])
def test_heun_equals_numpy_edm_algorithm_2(churn):
    gmm = _gmm()
    D = _numpy(gmm.denoiser)
    sigmas = np.asarray(schedules.get('edm', num_steps=10), np.float64)
    x_T = _x_T()
    s_churn, s_min, s_max, s_noise = (churn.get('s_churn', 0.0), churn.get('s_min', 0.0),
                                      churn.get('s_max', np.inf), churn.get('s_noise', 1.0))
    # Karras et al. 2022, Algorithm 2, line by line (float64); the noise eps_i is the sampler's per-step draw.
    num_steps = len(sigmas) - 1
    x = np.asarray(x_T, np.float64)
    for i in range(num_steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / num_steps, np.sqrt(2) - 1) if s_min <= t <= s_max else 0.0
        eps = s_noise * np.asarray(common.step_noise(KEY, i, x.shape), np.float64)
        t_hat = t + gamma * t
        x_hat = x + np.sqrt(t_hat ** 2 - t ** 2) * eps
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d_prime = (x - D(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    out, info = samplers.get('heun', **churn)(gmm.denoiser, x_T, jnp.asarray(sigmas, jnp.float32), key=KEY)
    assert _rel(out, x) < 1e-5
    assert info['nfe'] == 19


def test_special_cases_reduce_exactly():
    gmm = _gmm()
    sigmas = schedules.get('edm', num_steps=8)
    x_T = _x_T()
    run = lambda name, **kw: samplers.get(name, **kw)(gmm.denoiser, x_T, sigmas, key=KEY)[0]
    euler = run('euler')
    assert _rel(run('ddim', eta=0.0), euler) < 1e-6                     # DDIM(eta=0) is Euler in sigma-space
    assert _rel(run('dpm2', r=1.0), run('heun')) < 1e-6                  # DPM-Solver-2 with r=1 is Heun
    assert _rel(run('ipndm', max_order=1), euler) < 1e-6                 # AB1 is Euler
    assert _rel(run('dpmpp_2m'), run('dpmpp_3m')) > 1e-4                 # the third-order term is really used
    assert _rel(run('dpmpp_3m', form='third_order'), run('dpmpp_3m')) > 1e-4   # and differs between the forms


def _numpy_dpmpp_3m_published(D, x_T, sigmas):
    """DPM-Solver++(3M) as published (DPM-Solver's reference multistep update in data prediction, order
    min(3, i + 1) at step i; k-diffusion sample_dpmpp_3m_sde at eta = 0, diffusers solver_order=3), in sigma-space
    (alpha = 1, lambda = -log sigma), float64, with SPEC's first-order step into sigma = 0:
      x_t = (sigma_t / sigma_0) x - phi_1 m0 + phi_2 D1 - phi_3 D2."""
    lam = lambda sigma: -np.log(sigma)
    x, models, times = np.asarray(x_T, np.float64), [], []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        models.append(D(x, t))
        times.append(t)
        if t_next == 0:
            x = models[-1]
            continue
        order = min(3, i + 1)
        h = lam(t_next) - lam(t)
        phi_1 = np.expm1(-h)
        if order == 1:
            x = (t_next / t) * x - phi_1 * models[-1]
        elif order == 2:
            r0 = (lam(times[-1]) - lam(times[-2])) / h
            d1_0 = (models[-1] - models[-2]) / r0
            x = (t_next / t) * x - phi_1 * models[-1] - 0.5 * phi_1 * d1_0
        else:
            r0 = (lam(times[-1]) - lam(times[-2])) / h
            r1 = (lam(times[-2]) - lam(times[-3])) / h
            d1_0 = (models[-1] - models[-2]) / r0
            d1_1 = (models[-2] - models[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x = (t_next / t) * x - phi_1 * models[-1] + phi_2 * d1 - phi_3 * d2
    return x


@pytest.mark.parametrize('num_steps', [2, 3, 9])
def test_dpmpp_3m_default_is_the_published_update(num_steps):
    with jax.enable_x64(True):
        gmm = _gmm(jnp.float64)
        D = lambda x, sigma: np.asarray(gmm.denoiser(jnp.asarray(x), jnp.float64(sigma)))
        sigmas = np.asarray(schedules.get('edm', num_steps=num_steps), np.float64)
        x_T = _x_T(dtype=jnp.float64)
        expect = _numpy_dpmpp_3m_published(D, x_T, sigmas)
        out, info = samplers.get('dpmpp_3m')(gmm.denoiser, x_T, jnp.asarray(sigmas))
        assert _rel(out, expect) < 1e-12
        assert info['nfe'] == num_steps
        if num_steps > 3:                           # the third-order form differs once order 3 is reached
            third, _ = samplers.get('dpmpp_3m', form='third_order')(gmm.denoiser, x_T, jnp.asarray(sigmas))
            assert _rel(third, expect) > 1e-6


def test_ddim_stochastic_step_is_mean_plus_sigma_up_times_step_noise():
    gmm = _gmm()
    sigmas = jnp.array([10.0, 3.0])
    x_T = _x_T(sigma=10.0)
    out, info = samplers.get('ddim', eta=0.7)(gmm.denoiser, x_T, sigmas, key=KEY)
    mean, sigma_up = ddim_module.ddim_step_moments(x_T, gmm.denoiser(x_T, 10.0), 10.0, 3.0, 0.7)
    np.testing.assert_allclose(out, mean + sigma_up * common.step_noise(KEY, 0, x_T.shape), rtol=1e-5, atol=1e-5)
    sigma_up, sigma_down = ddim_module.ddim_noise_scales(10.0, 3.0, 0.7)
    assert float(sigma_up ** 2 + sigma_down ** 2) == pytest.approx(9.0, rel=1e-6)
    assert float(sigma_up) == pytest.approx(0.7 * 3.0 * np.sqrt(1 - 0.09), rel=1e-6)


def test_afs_replaces_the_first_call_and_denoise_to_zero_adds_the_last():
    gmm = _gmm()
    x_T = _x_T()
    grid = jnp.array([80.0, 20.0, 1.0])
    calls = {'n': 0}

    def counted(x, sigma):
        calls['n'] += 1
        return gmm.denoiser(x, sigma)

    with jax.disable_jit():
        out, info = samplers.get('euler', afs=True, denoise_to_zero=True)(counted, x_T, grid)
    x1 = x_T + (20.0 - 80.0) * x_T / np.sqrt(1 + 80.0 ** 2)                           # AFS direction, no call
    x2 = x1 + (1.0 - 20.0) * (x1 - gmm.denoiser(x1, 20.0)) / 20.0
    np.testing.assert_allclose(out, gmm.denoiser(x2, 1.0), rtol=1e-5, atol=1e-5)
    assert info['nfe'] == calls['n'] == 2


# --- convergence order on an exact mixture, float64 ---------------------------------------------------------

def test_observed_global_order_on_a_short_interval():
    with jax.enable_x64(True):
        gmm = _gmm(jnp.float64)
        x = jax.random.normal(jax.random.key(3), (16, 4), jnp.float64) * 2.5
        truth = analytic.reference_solve(gmm.denoiser, x, 2.0, 0.5, rtol=1e-12, atol=1e-12)
        counts = np.array([8, 16, 32])
        for name, options, single_step in (('euler', {}, True), ('heun', {}, True), ('dpm2', {}, True),
                                           ('dpm2', {'r': 0.3}, True), ('dpmpp_2m', {}, False),
                                           ('dpmpp_3m', {}, False), ('dpmpp_3m', {'form': 'third_order'}, False),
                                           ('ipndm', {}, False), ('heun', {'afs': True}, True)):
            sampler = samplers.get(name, **options)
            errors = [float(jnp.linalg.norm(sampler(gmm.denoiser, x, jnp.geomspace(2.0, 0.5, n + 1))[0] - truth))
                      for n in counts]
            slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
            # multistep: the first-order warm-start step caps the global order at 2 (full order: next test)
            order = sampler.order if single_step else min(sampler.order, 2)
            ok = abs(slope - order) <= 0.3 if single_step else slope >= order - 0.3
            assert ok, (name, options, slope, errors)


@pytest.mark.parametrize('name, options, spacing, steps', [
    ('dpmpp_2m', {}, 'log', [0.02, 0.01, 0.005]),
    ('dpmpp_3m', {'form': 'third_order'}, 'log', [0.02, 0.01, 0.005]),
    ('dpmpp_3m', {}, 'log', [0.005, 0.0025, 0.00125]),      # published: its h^3 error term shows only at small h
    ('ipndm', {}, 'uniform', [0.02, 0.01, 0.005])])
def test_full_order_of_multistep_updates_from_exact_history(name, options, spacing, steps):
    # One step started from exact history (points and denoiser outputs on the reference solution): local error
    # O(h^(order + 1)) with the sampler's declared order; the global order is the local slope minus 1.
    order = samplers.get(name, **options).order
    assert order == {'dpmpp_2m': 2, 'dpmpp_3m': 3 if options else 2, 'ipndm': 4}[name]
    with jax.enable_x64(True):
        gmm = _gmm(jnp.float64)
        x_start = jax.random.normal(jax.random.key(3), (8, 4), jnp.float64) * 2.5
        t0 = 1.0
        grids = [[t0 * np.exp(k * h) for k in (3, 2, 1, 0, -1)] if spacing == 'log' else
                 [t0 + k * h for k in (3, 2, 1, 0, -1)] for h in steps]
        points = sorted({t for g in grids for t in g}, reverse=True)
        from jaxdiff.core.samplers import adaptive
        _, _, states = adaptive.solve_log_sigma(gmm.denoiser, x_start, 2.0, points[-1], solver='dopri5', rtol=1e-13,
                                                atol=1e-13, max_steps=100_000, save_sigmas=jnp.asarray(points))
        exact = dict(zip(points, states))
        errors = []
        for grid in grids:
            history = grid[:4][::-1]                                           # newest first: t0, t0+h, ...
            xs = [exact[t] for t in history]
            x0_hats = [gmm.denoiser(x, t) for x, t in zip(xs, history)]
            k = min(order, 4)
            if name == 'ipndm':
                d_hist = jnp.stack([(x - x0) / t for x, x0, t in zip(xs, x0_hats, history)])
                x_next = multistep.ipndm_update(xs[0], d_hist, history[0], grid[4], k)
            else:
                x_next = multistep.dpmpp_update(xs[0], jnp.stack(x0_hats), jnp.asarray(history), grid[4], k,
                                                options.get('form', 'published'))
            errors.append(float(jnp.linalg.norm(x_next - exact[grid[4]])))
        local_slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert abs(local_slope - 1 - order) <= 0.3, (name, local_slope, errors)


# --- honest NFE ---------------------------------------------------------------------------------------------

NFE_CASES = FIXED_GRID + [('euler', {'afs': True}), ('heun', {'afs': True}), ('dpm2', {'afs': True}),
                          ('dpmpp_3m', {'afs': True}), ('ipndm', {'afs': True}), ('ddim', {'afs': True}),
                          ('dpmpp_2m', {'afs': True}), ('dpm2', {'r': 0.3}), ('ipndm', {'max_order': 3}),
                          ('heun', {'s_churn': 5.0, 'afs': True}), ('ddim', {'eta': 0.5, 'afs': True}),
                          ('gmm_ddim', {}), ('gmm_ddim', {'eta': 0.5, 'scale': 0.5}),
                          ('gmm_ddim', {'eta': 1.0, 'variant': 'vub_star', 'covariance': 'exact'}),
                          ('heun_dg', {}), ('heun_dg', {'s_churn': 5.0}), ('heun_dg', {'first_evaluation_only': False}),
                          ('amed', {}), ('amed', {'afs': True}), ('amed', {'base': 'euler'}),
                          ('amed', {'base': 'dpm2', 'afs': True}), ('amed', {'base': 'ipndm'}),
                          ('amed', {'base': 'ipndm', 'max_order': 2, 'afs': True}), ('amed', {'base': 'dpmpp_2m'}),
                          ('amed', {'base': 'dpmpp_2m', 'lower_order_final': False}),
                          ('unipc', {}), ('unipc', {'order': 1}), ('unipc', {'order': 2, 'variant': 'bh1'}),
                          ('unipc', {'lower_order_final': False, 'afs': True}), ('unipc', {'corrector': False}),
                          ('deis', {}), ('deis', {'mode': 'rhoab', 'order': 4}), ('deis', {'order': 1, 'afs': True}),
                          ('ipndm_v', {}), ('ipndm_v', {'max_order': 2, 'afs': True}),
                          ('euler_ancestral', {}), ('euler_ancestral', {'eta': 0.0}),
                          ('dpmpp_2m_sde', {}), ('dpmpp_2m_sde', {'solver_type': 'heun', 'eta': 0.5}),
                          ('dpmpp_2m_sde', {'eta': 0.0})]


def test_nfe_cases_cover_every_fixed_grid_sampler():
    assert {name for name, _ in NFE_CASES} == set(samplers.names()) - {'adaptive'}


@pytest.mark.parametrize('name, options', NFE_CASES)
@pytest.mark.parametrize('grid', ['edm', 'above_zero'])
def test_reported_nfe_equals_counted_calls(name, options, grid):
    gmm = _gmm()
    calls = {'n': 0}

    def counted(x, sigma):
        calls['n'] += 1
        return gmm.denoiser(x, sigma)

    if grid == 'edm':
        sigmas, extra = schedules.get('edm', num_steps=6), {}
    else:        # a grid ending above 0, with the final jump where the sampler has it
        has_jump = 'denoise_to_zero' in inspect.signature(samplers.factory(name)).parameters
        sigmas, extra = jnp.geomspace(80.0, 0.5, 6), ({'denoise_to_zero': True} if has_jump else {})
    sampler = samplers.get(name, **options, **extra)
    with jax.disable_jit():
        _, info = sampler(counted, _x_T(n=2), sigmas, key=KEY)
    assert isinstance(info['nfe'], int) and info['nfe'] == calls['n'] > 0
    # the counted evaluations: one network evaluation per call of a plain denoiser, no gradient
    assert int(info['network_evaluations']) == calls['n'] and int(info['gradient_evaluations']) == 0
    jitted = jax.jit(lambda x: sampler(gmm.denoiser, x, sigmas, key=KEY)[1])(_x_T(n=2))
    assert int(jitted['network_evaluations']) == calls['n'] and int(jitted['gradient_evaluations']) == 0
    # the sampler's declared cost: NFE of this grid length, and the grid length for this NFE
    ends_at_zero = grid == 'edm'
    assert sampler.nfe(len(sigmas), ends_at_zero=ends_at_zero) == calls['n']
    assert sampler.num_points_for(calls['n'], ends_at_zero=ends_at_zero) == len(sigmas)


@pytest.mark.parametrize('name, options', NFE_CASES)
def test_declared_nfe_is_the_traced_count_and_covers_every_grid_length(name, options):
    sampler = samplers.get(name, **options)
    gmm = _gmm()
    for num_steps in (1, 2, 5):
        sigmas = schedules.get('edm', num_steps=num_steps)
        info = jax.jit(lambda s: sampler(gmm.denoiser, _x_T(n=2), s, key=KEY)[1])(sigmas)
        assert int(info['nfe']) == sampler.nfe(num_steps + 1) == int(info['network_evaluations'])
    for nfe in range(1, 12):     # every NFE either has its grid or names why not
        try:
            num_points = sampler.num_points_for(nfe)
        except ValueError as e:
            assert f'no grid gives NFE {nfe}' in str(e)
        else:
            assert sampler.nfe(num_points) == nfe


def test_adaptive_nfe_equals_counted_calls_and_it_converges():
    gmm = _gmm()
    calls = {'n': 0}

    def tick():
        calls['n'] += 1

    def counted(x, sigma):
        jax.debug.callback(tick)                       # runs once per executed call, also inside diffrax's loop
        return gmm.denoiser(x, sigma)

    sigmas = schedules.get('edm', num_steps=5)
    x_T = _x_T(n=4)
    out, info = samplers.get('adaptive', rtol=1e-4, atol=1e-4)(counted, x_T, sigmas, return_trajectory=True)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert int(info['nfe']) == calls['n'] == int(info['network_evaluations'])
    assert int(info['gradient_evaluations']) == 0
    assert info['trajectory'].shape == (6,) + x_T.shape
    fine, _ = samplers.get('heun')(gmm.denoiser, x_T, schedules.get('edm', num_steps=256))
    assert _rel(out, fine) < 1e-3


# --- transformations: jit, sharding, vmap -------------------------------------------------------------------

@pytest.mark.parametrize('name, options', [c for c in FIXED_GRID if c != ('ipndm', {'max_order': 2})])
def test_runs_under_jit_sharding_and_vmap(name, options):
    gmm = _gmm()
    sampler = samplers.get(name, **options)
    sigmas = schedules.get('edm', num_steps=4)
    x_T = _x_T(n=16)
    eager, info = sampler(gmm.denoiser, x_T, sigmas, key=KEY)
    run = jax.jit(lambda x, s: sampler(gmm.denoiser, x, s, key=KEY))
    jitted, jit_info = run(x_T, sigmas)
    np.testing.assert_allclose(jitted, eager, rtol=2e-5, atol=2e-5)
    assert int(jit_info['nfe']) == info['nfe']
    mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
    sharded = jax.device_put(x_T, NamedSharding(mesh, PartitionSpec('data')))
    np.testing.assert_allclose(run(sharded, sigmas)[0], eager, rtol=2e-5, atol=2e-5)
    if options.get('eta', 0) == 0 and options.get('s_churn', 0) == 0:    # noise is drawn per batch shape
        per_example = jax.vmap(lambda x: sampler(gmm.denoiser, x[None], sigmas, key=KEY)[0][0])(x_T)
        np.testing.assert_allclose(per_example, eager, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('name, options', FIXED_GRID)
def test_trajectory_starts_at_x_T_and_ends_at_x0(name, options):
    gmm = _gmm()
    sigmas = schedules.get('edm', num_steps=5)
    x_T = _x_T(n=3)
    x0, info = samplers.get(name, **options)(gmm.denoiser, x_T, sigmas, key=KEY, return_trajectory=True)
    trajectory = info['trajectory']
    assert trajectory.shape == (6, 3, 4)
    np.testing.assert_array_equal(trajectory[0], x_T)
    np.testing.assert_array_equal(trajectory[-1], x0)


# --- misuse -------------------------------------------------------------------------------------------------

def test_every_misuse_is_a_value_error():
    gmm = _gmm()
    sigmas = schedules.get('edm', num_steps=4)
    x_T = _x_T(n=2)
    with pytest.raises(ValueError, match='valid samplers'):
        samplers.get('rk45')
    with pytest.raises(ValueError, match='valid options'):
        samplers.get('heun', eta=1.0)
    with pytest.raises(ValueError, match='afs'):                          # no first step to save
        samplers.get('adaptive', afs=True)
    with pytest.raises(ValueError, match='decreasing'):
        samplers.get('euler')(gmm.denoiser, x_T, sigmas[::-1])
    with pytest.raises(ValueError, match='decreasing'):
        samplers.get('dpmpp_2m')(gmm.denoiser, x_T, jnp.array([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match='NaN'):
        samplers.get('heun')(lambda x, s: x * jnp.nan, x_T, sigmas)
    with pytest.raises(ValueError, match='key'):
        samplers.get('heun', s_churn=10.0)(gmm.denoiser, x_T, sigmas)
    with pytest.raises(ValueError, match='key'):
        samplers.get('ddim', eta=1.0)(gmm.denoiser, x_T, sigmas)
    with pytest.raises(ValueError, match='denoise_to_zero'):
        samplers.get('dpm2', denoise_to_zero=True)(gmm.denoiser, x_T, sigmas)
    with pytest.raises(ValueError, match='max_order'):
        samplers.get('ipndm', max_order=5)
    with pytest.raises(ValueError, match='r must be'):
        samplers.get('dpm2', r=0.0)
    with pytest.raises(ValueError, match='x_T'):
        samplers.get('euler')(gmm.denoiser, jnp.ones((2, 4), jnp.int32), sigmas)
    with pytest.raises(ValueError, match='form must be one of published, third_order'):
        samplers.get('dpmpp_3m', form='taylor')
    with pytest.raises(ValueError, match="no grid gives NFE 4 \\(nearest: 3, 5\\)"):
        samplers.get('heun').num_points_for(4)                  # 2 (N - 2) + 1 is odd
    with pytest.raises(ValueError, match='denoise_to_zero needs a grid ending above 0'):
        samplers.get('euler', denoise_to_zero=True).nfe(5)
    with pytest.raises(ValueError, match='known only after the solve'):
        samplers.get('adaptive').nfe(5)
