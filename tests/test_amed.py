"""AMED (Zhou et al., CVPR 2024): reductions to DPM-Solver-2 and to the plugins' base solvers, honest NFE with and
without AFS, the bottleneck input, gradients through r, one training round, and the predictor checkpoint;
against exact mixture denoisers."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.drivers import amed_train as T
from jaxdiff.core import analytic, samplers, schedules
from jaxdiff.drivers import config_files
from jaxdiff.bench import problems
from jaxdiff.core.errors import UserError
from jaxdiff.models.amed_predictor import AMEDPredictor
from jaxdiff.core.samplers import amed as A

SHAPE = (4, 4, 3)


def _mixture(dtype=jnp.float32):
    """Three Gaussians of 4x4x3 images (the truth problem 'mixture_4x4x3'), exact denoiser in `dtype`."""
    return problems.get('mixture_4x4x3').target(dtype)


def _x_T(sigma_max, batch=8, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch,) + SHAPE) * sigma_max, dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _neutral_params(module):
    """Predictor parameters whose heads give r = sigmoid(0) = 1/2, c = a = 1 whatever the input."""
    params = module.init(jax.random.key(0), jnp.zeros((1, module.num_bottleneck)), jnp.ones(1), jnp.ones(1))
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if 'head' in jax.tree_util.keystr(path) else p, params)
    return params


class _WithBottleneck:
    """The exact mixture denoiser plus a fake 8x8x2 bottleneck, through the aux convention (common.call_with_aux)."""

    def __init__(self, denoiser, scale):
        self.denoiser, self.scale = denoiser, scale

    def __call__(self, x, sigma):
        return self.denoiser(x, sigma)

    def with_aux(self, x, sigma):
        bottleneck = self.scale * jnp.tile(x[:, :, :, :2], (1, 2, 2, 1))          # [B, 8, 8, 2]
        return self.denoiser(x, sigma), {'bottleneck': bottleneck}


def test_predictor_none_and_neutral_predictor_equal_dpm2_exactly():
    gmm, sigmas = _mixture(), schedules.get('edm', num_steps=6)
    x_T = _x_T(float(sigmas[0]))
    module = AMEDPredictor()
    neutral = (module, _neutral_params(module))
    for afs in (False, True):
        ref, ref_info = samplers.get('dpm2', afs=afs)(gmm.denoiser, x_T, sigmas)
        out, info = samplers.get('amed', afs=afs)(gmm.denoiser, x_T, sigmas)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
        assert info['nfe'] == ref_info['nfe']
        # per-sample r, c, a arrays from the module: the same formulas up to float32 rounding
        base = 'dpm2' if afs else None      # the dpm2 plugin's weights 1/(2r), 1 - 1/(2r) are 1 and 0 at r = 1/2
        out, info = samplers.get('amed', predictor=neutral, base=base, afs=afs)(gmm.denoiser, x_T, sigmas)
        assert _rel(out, ref) < 1e-5 and info['nfe'] == ref_info['nfe']
    # the module's input is the bottleneck: a with_aux denoiser still reduces to dpm2 under neutral heads
    out, _ = samplers.get('amed', predictor=neutral)(_WithBottleneck(gmm.denoiser, 1.0), x_T, sigmas)
    ref, _ = samplers.get('dpm2')(gmm.denoiser, x_T, sigmas)
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize('base', ['euler', 'ipndm', 'dpmpp_2m'])
def test_plugin_without_predictor_is_its_base_on_the_interleaved_grid(base):
    """r = 1/2, c = a = 1: the plugin is the base solver on t_0, s_0, t_1, s_1, ... with s_n = sqrt(t_n t_{n+1})
    (into sigma = 0 no intermediate point: first order, as the base does)."""
    gmm, sigmas = _mixture(), schedules.get('edm', num_steps=5)
    x_T = _x_T(float(sigmas[0]))
    mids = jnp.sqrt(sigmas[:-2] * sigmas[1:-1])
    interleaved = jnp.concatenate([jnp.stack([sigmas[:-2], mids], axis=1).reshape(-1), sigmas[-2:]])
    out, info = samplers.get('amed', base=base)(gmm.denoiser, x_T, sigmas)
    ref, ref_info = samplers.get(base)(gmm.denoiser, x_T, interleaved)
    assert _rel(out, ref) < 1e-5 and info['nfe'] == ref_info['nfe'] == len(interleaved) - 1


def test_declared_order_without_predictor_on_a_short_interval(x64):
    """predictor=None: the observed global order of each base on the interleaved grid is the declared one."""
    gmm = problems.get('mixture_4d').target(jnp.float64)
    x = jax.random.normal(jax.random.key(3), (16, 4), jnp.float64) * 2.5
    truth = analytic.reference_solve(gmm.denoiser, x, 2.0, 0.5, rtol=1e-12, atol=1e-12)
    counts = np.array([8, 16, 32])
    for base in (None, 'euler', 'ipndm', 'dpmpp_2m'):
        sampler = samplers.get('amed', base=base)
        errors = [float(jnp.linalg.norm(sampler(gmm.denoiser, x, jnp.geomspace(2.0, 0.5, n + 1))[0] - truth))
                  for n in counts]
        slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
        assert abs(slope - sampler.order) <= 0.3, (base, slope, errors)
    assert samplers.get('amed', predictor=A.constant_predictor(r=0.4)).order is None
    assert samplers.get('amed', afs=True).order == 1


@pytest.mark.parametrize('base', [None, 'ipndm'])
def test_nfe_is_counted_calls_with_and_without_afs(base):
    gmm = _mixture()
    module = AMEDPredictor()
    params = module.init(jax.random.key(1), jnp.zeros((1, 64)), jnp.ones(1), jnp.ones(1))
    calls = {'n': 0}

    class Counting(_WithBottleneck):
        def with_aux(self, x, sigma):
            calls['n'] += 1
            return super().with_aux(x, sigma)

        def __call__(self, x, sigma):
            calls['n'] += 1
            return super().__call__(x, sigma)

    with_zero = schedules.get('edm', num_steps=4)                      # 5 entries, last step into 0
    for sigmas, expected in ((with_zero[:-1], 2 * (4 - 1)), (with_zero, 2 * (4 - 1) + 1)):
        for afs in (False, True):
            calls['n'] = 0
            with jax.disable_jit():
                out, info = samplers.get('amed', predictor=(module, params), base=base, afs=afs)(
                    Counting(gmm.denoiser, 1.0), _x_T(80.0, batch=2), sigmas)
            assert info['nfe'] == calls['n'] == expected - int(afs)
            assert np.all(np.isfinite(np.asarray(out)))
            sampler = samplers.get('amed', base=base, afs=afs)      # the declared cost of this grid
            assert sampler.nfe(len(sigmas), ends_at_zero=sigmas[-1] == 0) == calls['n']
    # NFE 3/5/7/9 = N 3/4/5/6 with AFS (grids ending above 0, AMED's own)
    with_afs = samplers.get('amed', afs=True)
    assert [with_afs.num_points_for(nfe, ends_at_zero=False) for nfe in (3, 5, 7, 9)] == [3, 4, 5, 6]
    assert [samplers.get('amed').num_points_for(nfe, ends_at_zero=False) for nfe in (2, 4, 6)] == [2, 3, 4]
    with pytest.raises(ValueError, match='no grid gives NFE 4'):
        with_afs.num_points_for(4, ends_at_zero=False)


def _numpy_dpmpp_plugin(D, x_T, sigmas, r, c, a, lower_order_final):
    """AMED-Plugin on multistep DPM-Solver++ (max order 2) as the authors' loop builds it (diff-sampler, solvers_amed
    `dpm_pp_sampler` with a predictor giving constant r, c, a), float64 NumPy: sub-steps k = 1, 2, ... over the
    interleaved grid t_0, s_0, t_1, ..., of K = 2 (N - 1) sub-steps; order k if k < 2, else
    min(2, K + 1 - k) with lower_order_final (the last sub-step first order), else 2; the second sub-step of each
    interval calls D at a * s and scales the update's model terms by c."""
    lam = lambda sigma: -np.log(sigma)
    x, models, times = np.asarray(x_T, np.float64), [], []
    num_substeps = 2 * (len(sigmas) - 1)

    def update(x, u, k, scale):
        t = times[-1]
        h = lam(u) - lam(t)
        phi_1 = np.expm1(-h)
        order = k if k < 2 else (min(2, num_substeps + 1 - k) if lower_order_final else 2)
        if order == 1:
            return (u / t) * x - scale * phi_1 * models[-1]
        r0 = (lam(times[-1]) - lam(times[-2])) / h
        return (u / t) * x - scale * phi_1 * (models[-1] + 0.5 * (models[-1] - models[-2]) / r0)

    for n in range(len(sigmas) - 1):
        t, t_next = sigmas[n], sigmas[n + 1]
        s = t ** (1 - r) * t_next ** r
        models.append(D(x, t))
        times.append(t)
        y = update(x, s, 2 * n + 1, 1.0)
        models.append(D(y, a * s))
        times.append(s)
        x = update(y, t_next, 2 * n + 2, c)
    return x


@pytest.mark.parametrize('lower_order_final', [True, False])
def test_dpmpp_plugin_equals_the_authors_loop(x64, lower_order_final):
    """The DPM-Solver++ plugin (AMED's own grid, ending at sigma_min > 0) against a NumPy transcription of the
    authors' loop, with and without lower_order_final; True is the default."""
    gmm = _mixture(jnp.float64)
    D = lambda x, sigma: np.asarray(gmm.denoiser(jnp.asarray(x), jnp.float64(sigma)))
    sigmas, _ = T.grids(schedule='edm', num_points=5, sigma_min=0.002, sigma_max=80.0)
    sigmas = np.asarray(sigmas, np.float64)
    x_T = _x_T(80.0, batch=4, dtype=jnp.float64)
    r, c, a = 0.4, 1.02, 0.97
    expect = _numpy_dpmpp_plugin(D, x_T, sigmas, r, c, a, lower_order_final)
    predict = A.constant_predictor(r=r, c=c, a=a)
    out, info = samplers.get('amed', predictor=predict, base='dpmpp_2m', lower_order_final=lower_order_final)(
        gmm.denoiser, x_T, jnp.asarray(sigmas))
    assert _rel(out, expect) < 1e-12 and info['nfe'] == 8
    default, _ = samplers.get('amed', predictor=predict, base='dpmpp_2m')(gmm.denoiser, x_T, jnp.asarray(sigmas))
    other = _numpy_dpmpp_plugin(D, x_T, sigmas, r, c, a, not lower_order_final)
    assert _rel(expect, other) > 1e-4                           # the last sub-step's order really matters
    assert (_rel(default, expect) < 1e-12) == lower_order_final
    with pytest.raises(ValueError, match='lower_order_final applies to base dpmpp_2m only'):
        samplers.get('amed', base='ipndm', lower_order_final=True)


def test_predictor_reads_the_bottleneck_and_zeros_without_one():
    gmm, sigmas = _mixture(), schedules.get('edm', num_steps=4)[:-1]
    x_T = _x_T(80.0)
    module = AMEDPredictor()
    params = module.init(jax.random.key(3), jnp.zeros((1, 64)), jnp.ones(1), jnp.ones(1))
    sampler = samplers.get('amed', predictor=(module, params))
    plain, _ = sampler(gmm.denoiser, x_T, sigmas)
    zero_bottleneck, _ = sampler(_WithBottleneck(gmm.denoiser, 0.0), x_T, sigmas)
    with_bottleneck, _ = sampler(_WithBottleneck(gmm.denoiser, 1.0), x_T, sigmas)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(zero_bottleneck), rtol=1e-6, atol=1e-6)
    assert _rel(with_bottleneck, plain) > 1e-4
    # the features are the channel mean, flattened; a wrong bottleneck size is a clear error
    aux = {'bottleneck': jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)}
    np.testing.assert_allclose(A.bottleneck_features(aux, 2, 64), aux['bottleneck'].mean(-1).reshape(2, 64))
    with pytest.raises(ValueError, match='64-value bottleneck'):
        A.bottleneck_features({'bottleneck': jnp.zeros((2, 4, 4, 3))}, 2, 64)


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update('jax_enable_x64', True)
    yield
    jax.config.update('jax_enable_x64', previous)


def test_gradient_through_r_matches_finite_differences(x64):
    """d(output)/dr by jax.grad equals a central difference; dropping the second call's dependence on r (stop
    gradient on its output) gives a different gradient, so the check sees the path through D(y, a s)."""
    gmm, sigmas = _mixture(jnp.float64), jnp.asarray([5.0, 1.5, 0.4], jnp.float64)
    x_T = _x_T(5.0, batch=4, dtype=jnp.float64)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=x_T.shape))

    def objective(r, denoiser=gmm.denoiser):
        r_batch = jnp.full((x_T.shape[0],), r)
        out, _, _ = A.run(denoiser, x_T, sigmas, predict=A.constant_predictor(r=r_batch, c=1.003, a=0.97))
        return jnp.sum(out * weights)

    frozen_denoiser = lambda x, s: jax.lax.stop_gradient(gmm.denoiser(x, s))
    value, grad = jax.jit(objective), jax.jit(jax.grad(objective))
    frozen_grad = jax.jit(jax.grad(lambda r: objective(r, frozen_denoiser)))
    for r in (0.3, 0.5, 0.7):
        eps = 1e-6
        finite = (float(value(r + eps)) - float(value(r - eps))) / (2 * eps)
        assert abs(float(grad(r)) - finite) <= 1e-6 * max(1.0, abs(finite))
        assert abs(float(frozen_grad(r)) - finite) > 1e-3 * abs(finite)


def _round_losses(make_denoiser, module, *, base, afs, max_order=4, lower_order_final=False):
    """jitted (params, denoiser_params, points, sigmas) -> per-interval losses [N - 1] with the training's restart
    rule and no update (to measure what a round did)."""
    def losses(params, denoiser_params, points, sigmas):
        denoiser = make_denoiser(denoiser_params)
        x, history = points[0], A.init_history(base, points[0], max_order)
        out = []
        for n in range(points.shape[0] - 1):
            loss, (x_next, history) = T.interval_loss(params, module, denoiser, x, history, n, sigmas[n],
                                                      sigmas[n + 1], points[n + 1], base=base, afs=afs,
                                                      lower_order_final=lower_order_final,
                                                      num_intervals=points.shape[0] - 1)
            x = x_next if base in A.MULTISTEP_BASES else points[n + 1]
            out.append(loss)
        return jnp.stack(out)

    return jax.jit(losses)


@pytest.mark.parametrize('base, teacher, extra_points, schedule', [(None, 'heun', 1, 'time_uniform'),
                                                                   ('ipndm', 'ipndm', 2, 'edm')])
def test_one_training_round_lowers_the_teacher_matching_loss(base, teacher, extra_points, schedule):
    """Each interval's Adam step lowers that interval's loss L_n at the same start; for the single-step AMED-Solver
    (restarts from the teacher) the whole round's loss drops too. The multistep iPNDM student continues from its
    own output, so a later interval's start moves with the earlier updates."""
    gmm = _mixture()
    module = AMEDPredictor()
    sigmas, teacher_sigmas = T.grids(schedule=schedule, num_points=4, sigma_min=0.002, sigma_max=80.0,
                                     extra_points=extra_points)
    assert np.allclose(np.asarray(teacher_sigmas[::extra_points + 1]), np.asarray(sigmas))
    make = lambda params: gmm.denoiser
    params = T.init_params(module, sigmas)
    optimizer = T.optax.adam(5e-3)
    opt_state = optimizer.init(params)
    step = T.make_interval_step(make, module, optimizer, base=base, afs=True)
    points = T.make_teacher(make, teacher_sigmas, teacher=teacher, extra_points=extra_points)((), _x_T(80.0, 64))
    loss_of = jax.jit(lambda p, x, h, n: T.interval_loss(p, module, gmm.denoiser, x, h, n, sigmas[n], sigmas[n + 1],
                                                         points[n + 1], base=base, afs=True)[0])
    x, history, new_params = points[0], A.init_history(base, points[0]), params
    for n in range(len(sigmas) - 1):
        loss_before = loss_of(new_params, x, history, n)
        new_params, opt_state, loss, x_next, history_next = step(new_params, opt_state, (), x, history, n,
                                                                  sigmas[n], sigmas[n + 1], points[n + 1])
        np.testing.assert_allclose(loss, loss_before, rtol=1e-5)
        assert loss_of(new_params, x, history, n) < loss_before
        x, history = (x_next, history_next) if base == 'ipndm' else (points[n + 1], history_next)
    trained, _, _ = T.train_round(step, params, optimizer.init(params), (), points, sigmas, base=base)
    jax.tree.map(np.testing.assert_array_equal, trained, new_params)                 # train_round = the loop above
    if base is None:
        round_losses = _round_losses(make, module, base=base, afs=True)
        before = np.asarray(round_losses(params, (), points, sigmas))
        after = np.asarray(round_losses(new_params, (), points, sigmas))
        assert after.sum() < before.sum()


def test_predictor_checkpoint_round_trip_and_mismatch_errors(tmp_path):
    gmm, module = _mixture(), AMEDPredictor(eps_c=0.02)
    sigmas, _ = T.grids(schedule='edm', num_points=4, sigma_min=0.002, sigma_max=80.0)
    params = T.init_params(module, sigmas, seed=4)
    settings = T.describe(T.Settings(schedule='edm', num_points=4, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                                     afs=True, base='ipndm', max_order=4, teacher='ipndm', extra_points=2,
                                     num_trajectories=128, batch_size=64, lr=5e-3, seed=4),
                          module, model={'analytic': 'mixture K=3 4x4x3'})
    T.save_predictor(str(tmp_path), params, settings)
    sampler, loaded_sigmas = T.load_sampler(str(tmp_path), nfe=5, model={'analytic': 'mixture K=3 4x4x3'})
    _, _, loaded = T.load_predictor(str(tmp_path))
    assert loaded == settings and loaded['nfe'] == 5
    np.testing.assert_array_equal(np.asarray(loaded_sigmas), np.asarray(sigmas))
    x_T = _x_T(80.0)
    out, info = sampler(gmm.denoiser, x_T, loaded_sigmas)
    ref, _ = samplers.get('amed', predictor=(module, params), base='ipndm', afs=True)(gmm.denoiser, x_T, sigmas)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert info['nfe'] == 5
    with pytest.raises(UserError, match='trained for NFE 5'):
        T.load_sampler(str(tmp_path), nfe=7)
    with pytest.raises(UserError, match='trained for model'):
        T.load_sampler(str(tmp_path), model={'analytic': 'another'})
    with pytest.raises(UserError, match='no AMED predictor'):
        T.load_sampler(str(tmp_path / 'missing'))


def test_predictor_training_in_a_workdir_resumes_bit_identically(tmp_path):
    """train_predictor with a workdir runs on drivers/loop.py: a run stopped after 2 of 4 rounds (its checkpoint
    saved) and continued gives the parameters of 4 uninterrupted rounds, and the workdir samples (load_sampler)."""
    gmm, module = _mixture(), AMEDPredictor()
    make = lambda params: gmm.denoiser
    fields = dict(schedule='edm', schedule_options={}, num_points=4, base='ipndm', teacher='ipndm', extra_points=2,
                  batch_size=16, seed=2, log_every_rounds=0, checkpoint_every_rounds=3)
    model = {'analytic': 'mixture K=3 4x4x3'}
    straight, history = T.train_predictor(make, (), module, T.Settings(num_trajectories=64, **fields),
                                          sample_shape=SHAPE, workdir=str(tmp_path / 'a'), model=model)
    assert len(history) == 4 and sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['3', '4']
    T.train_predictor(make, (), module, T.Settings(num_trajectories=32, **fields), sample_shape=SHAPE,
                      workdir=str(tmp_path / 'b'), model=model)
    resumed, rest = T.train_predictor(make, (), module, T.Settings(num_trajectories=64, **fields),
                                      sample_shape=SHAPE, workdir=str(tmp_path / 'b'), model=model)
    assert len(rest) == 2
    np.testing.assert_array_equal(rest, history[2:])
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    in_memory, _ = T.train_predictor(make, (), module, T.Settings(num_trajectories=64, **fields), sample_shape=SHAPE)
    jax.tree.map(np.testing.assert_array_equal, in_memory, straight)
    sampler, sigmas = T.load_sampler(str(tmp_path / 'b'), model=model)
    ref, _ = samplers.get('amed', predictor=(module, straight), base='ipndm', afs=True)(gmm.denoiser, _x_T(80.0),
                                                                                       sigmas)
    np.testing.assert_array_equal(np.asarray(sampler(gmm.denoiser, _x_T(80.0), sigmas)[0]), np.asarray(ref))


def test_amed_settings_are_one_dataclass_checked_like_every_config_section():
    config = config_files.named('digits_amed')
    settings = T.settings_of(config)
    assert settings.num_points == config.amed.num_points and settings.schedule_options == {'epsilon_s': 1e-3}
    assert settings.num_rounds == config.amed.num_trajectories // config.amed.batch_size
    for field, value, message in (('teacher', 'rk4', r"config\.amed\.teacher='rk4'; valid choices: heun"),
                                  ('base', 'heun', r"config\.amed\.base='heun'; valid choices: None, euler"),
                                  ('num_points', 1, r'config\.amed\.num_points=1 must be an integer >= 2'),
                                  ('lr', 0.0, r'config\.amed\.lr=0\.0 must be > 0')):
        bad = config_files.named('digits_amed', **{f'amed.{field}': value})
        with pytest.raises(UserError, match=message):
            T.settings_of(bad)
    with config.unlocked():
        config.amed.nsteps = 3
    with pytest.raises(UserError, match='config.amed has no field nsteps; valid fields: '):
        T.settings_of(config)


def test_options_are_checked():
    with pytest.raises(ValueError, match='unknown base'):
        samplers.get('amed', base='heun')
    with pytest.raises(ValueError, match='no option'):
        samplers.get('amed', r=0.3)
    with pytest.raises(ValueError, match='needs its parameters'):
        samplers.get('amed', predictor=AMEDPredictor())
    with pytest.raises(ValueError, match='amed.schedule'):
        T.grids(schedule='ddpm', num_points=4, sigma_min=0.002, sigma_max=80.0)


def test_train_amed_mode_reports_missing_inputs(tmp_path):
    from jaxdiff.modes import train_amed
    config = config_files.named('digits_amed')
    with pytest.raises(UserError, match='--workdir is required'):
        train_amed.run(config, None)
    config.amed.model_workdir = str(tmp_path / 'no_model')
    with pytest.raises(UserError, match='no checkpoint found'):
        train_amed.run(config, str(tmp_path / 'predictor'))
