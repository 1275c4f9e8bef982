"""Fast-ODE on the Loss hooks (loss.parameterization='flow', loss.pairing='fastode'; jaxdiff.core.flow): the sigma-space
loss is the flow-matching loss with the raw time, z comes from the encoder; the encoder lives in the state (its
gradients from both terms through the real step, 8 devices = 1, SIGTERM and resume bit-identical); the recipes'
tables (55.7M flow net, EMA 0.9999, warm-up, flips); every config runs a few steps (CIFAR-10 on tfds mock data); a
trained toy flow samples through --mode=sample and every sampler agrees with the flow's own ODE solved in t."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import run_main
from test_train import SignalAt

from jaxdiff.drivers import checkpoint, sampling, trained as trained_lib, mesh as mesh_lib, train_step
from jaxdiff import data, models
from jaxdiff.core import flow, losses
from jaxdiff.drivers.config_files import named as load_config
from jaxdiff.core.errors import UserError
from jaxdiff.modes import train

STEPS = 8
TINY_UNET = dict(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.1)


def toy_config(steps=STEPS, name='toy2d_fastode_eight_gaussians', **overrides):
    """configs/toy2d_fastode_eight_gaussians.py with small MLPs and batch 64 (lr 0 at step 0 as EDM, then 1e-3).
    (The eight Gaussians, not the authors' two at |x| ~ 11: there the tanh encoder starts saturated, and Adam turns
    float32 summation noise in its near-zero first-layer gradients into 1e-4 differences between device counts.)"""
    fields = {'training.batch_size': 64, 'training.total_images': 64 * steps, 'training.log_every_steps': 2,
              'training.checkpoint_every_steps': 3, 'training.sample_every_steps': 0,
              'training.ema_halflife_images': 640, 'model.hidden_dim': 16, 'encoder.hidden_dim': 16,
              'sampling.num_samples': 16, 'sampling.batch_size': 16}
    return load_config(name, **{**fields, **overrides})


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def single_device_run(tmp_path_factory):
    """The uninterrupted 1-device run of toy_config(): the reference of the 8-device and the resume tests."""
    config = toy_config()
    return config, train.run(config, str(tmp_path_factory.mktemp('single')), devices=jax.devices()[:1])


# ---------------------------------------------------------------- the pieces in the Loss

def test_the_flow_parameterization_feeds_the_raw_time_and_is_the_flow_matching_loss():
    """One-point data set x0 = mu: v = (x_t - mu) / t is the exact velocity of any coupling. Fed c_noise as t it
    makes the sigma-space loss vanish, so c_noise = t reaches the network (EDM's c_noise would not) and
    lambda (D - x0)^2 = (v - (z - x0))^2."""
    loss = losses.build(parameterization='flow')
    p = loss.parameterization
    assert p.precond is flow.precond and p.weight is flow.weight
    t = flow.t_of_sigma(p.sample_sigma(jax.random.key(0), (100_000,)))
    assert float(t.min()) >= 1e-5 - 1e-9 and float(t.max()) <= 1.0 and abs(float(t.mean()) - 0.5) < 5e-3
    mu = jnp.array([[2.0, -4.0, 8.0]])
    exact = lambda params, x_in, c_noise, batch, key: (x_in - mu) / c_noise[:, None]
    value, _ = loss.make(exact)(None, {'image': jnp.broadcast_to(mu, (512, 3))}, jax.random.key(1))
    assert float(value) < 1e-10
    edm_time = lambda params, x_in, c_noise, batch, key: exact(params, x_in, jnp.log(c_noise / (1 - c_noise)) / 4,
                                                               batch, key)
    assert float(loss.make(edm_time)(None, {'image': jnp.broadcast_to(mu, (512, 3))}, jax.random.key(1))[0]) > 1.0
    with pytest.raises(ValueError, match='t_min'):
        losses.build(parameterization='flow', t_min=1.5)


def test_the_fastode_pairing_takes_z_from_the_encoder_and_adds_beta_kl():
    """An encoder with mu = s (a constant) and logvar = -40 gives z = s (to 2e-9): the constant velocity s - x0 of
    a one-point data set is then exact, the flow term vanishes and the loss is beta * KL / dim in closed form;
    with independent noise the same network is far off."""
    mu0, s, beta = jnp.array([[1.0, -2.0]]), jnp.array([3.0, 0.5]), 7.0
    y = jnp.broadcast_to(mu0, (256, 2))
    networks = {'model': lambda params, x_in, c_noise, batch, key: jnp.broadcast_to(s - mu0, x_in.shape),
                'encoder': lambda params, x, key: (x * 0 + params['shift'], jnp.full_like(x, -40.0))}
    params = {'model': None, 'encoder': {'shift': s}}
    loss = losses.build(parameterization='flow', pairing='fastode', beta=beta)
    assert loss.hooks.extra_networks == ('encoder',)
    value, metrics = loss.make(networks)(params, {'image': y}, jax.random.key(2))
    kl_per_dim = float(jnp.mean(0.5 * (-1 + 40.0 + s ** 2 + np.exp(-40.0))))
    np.testing.assert_allclose(float(metrics['loss_prior']), kl_per_dim, rtol=1e-6)
    np.testing.assert_allclose(float(value), beta * kl_per_dim, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['encoder_mean_sq']), float(jnp.mean(s ** 2)), rtol=1e-6)
    baseline = losses.build(parameterization='flow', pairing='independent').make(networks)
    assert float(baseline(params, {'image': y}, jax.random.key(2))[0]) > 1.0
    for bad in (-1.0, 'large', True):
        with pytest.raises(UserError, match=r'config\.loss\.beta'):
            losses.build(parameterization='flow', pairing='fastode', beta=bad)


def test_the_encoder_gets_gradients_from_both_terms_through_the_real_step():
    """The loss the train step differentiates (train_step.build's networks and Loss): the encoder's gradient is
    nonzero with beta = 0 (the flow term, through z), and grad(beta = 1) - grad(beta = 0) is exactly the gradient
    of the KL term computed from the encoder module alone; the step then moves the encoder's parameters."""
    grads = {}
    for beta in (0.0, 1.0):
        config = toy_config(**{'loss.beta': beta})
        setup = train_step.build(config)
        assert set(setup.modules) == {'model', 'encoder'}
        state = train_step.init_state(setup.modules, setup.optimizer, (2,), jax.random.key(0))
        networks = {'model': train_step.make_network(setup.model, state.model_state),
                    'encoder': train_step.make_extra_network(setup.modules['encoder'])}
        batch = data.build(config.data).batch(0, 64, seed=0)
        loss_fn = setup.loss.make(networks)
        grads[beta] = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(3))[0]))(state.params)
    encoder = setup.modules['encoder']
    kl_grad = jax.grad(lambda p: flow.prior_loss(*encoder.apply({'params': p}, batch['image'])))(
        state.params['encoder'])
    norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
    assert norm(grads[0.0]['encoder']) > 1e-3 and norm(kl_grad) > 1e-3
    difference = jax.tree.map(lambda a, b: a - b, grads[1.0]['encoder'], grads[0.0]['encoder'])
    for got, want in zip(jax.tree.leaves(difference), jax.tree.leaves(kl_grad)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jax.tree.leaves(grads[1.0]['model'])[0], jax.tree.leaves(grads[0.0]['model'])[0],
                               rtol=1e-6)                                        # the KL does not reach the flow net


# ---------------------------------------------------------------- the encoder in the training state

def test_training_moves_the_encoder_and_its_ema(single_device_run):
    config, state = single_device_run
    setup = train_step.build(config)
    init = train_step.init_state(setup.modules, setup.optimizer, (2,), train_step.root_keys(0)[0])
    assert int(state.step) == STEPS and set(state.params) == {'model', 'encoder'}
    for tree in (state.params['encoder'], state.ema_params['encoder']):
        moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tree),
                                                              jax.tree.leaves(init.params['encoder'])))
        assert moved > 1e-4


@pytest.mark.parametrize('parallelism', ['jit', 'pmap'])
def test_eight_devices_give_the_one_device_parameters(single_device_run, tmp_path, parallelism):
    """jit over 8 devices (one global step) and pmap over 8 (eps drawn for the global batch, the KL averaged with
    pmean) give the 1-device flow net and encoder, their EMA and Adam state."""
    config, single = single_device_run
    config = toy_config(**{'training.parallelism': parallelism})
    sharded = train.run(config, str(tmp_path), devices=jax.devices())
    assert int(sharded.step) == STEPS
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded)), jax.tree.leaves(jax.device_get(single))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_sigterm_and_resume_is_bit_identical_with_the_encoder(single_device_run, tmp_path):
    config, uninterrupted = single_device_run
    devices = jax.devices()[:1]
    interrupted = train.run(config, str(tmp_path), source=SignalAt(data.build(config.data), step=5), devices=devices)
    stopped_at = int(interrupted.step)
    assert 0 < stopped_at < STEPS and checkpoint.Checkpoints(tmp_path).latest_step() == stopped_at
    resumed = train.run(config, str(tmp_path), devices=devices)
    assert int(resumed.step) == STEPS
    assert leaves_equal(resumed, uninterrupted)
    ema = trained_lib.restore(config, str(tmp_path), mesh_lib.make_mesh(devices))        # sampling's view: EMA only
    assert leaves_equal(ema.variables['params']['encoder'], uninterrupted.ema_params['encoder'])


# ---------------------------------------------------------------- the recipes

def test_the_cifar_recipe_is_the_authors():
    """configs/cifar_fastode.py, shapes only (jax.eval_shape): the authors' 55.7M flow net, the encoder at
    32x32x3, batch 128 x 500k steps, lr 2e-4 after 5k warm-up steps, EMA decay 0.9999 per step from the start,
    horizontal flips only; configs/cifar_rectified_flow.py differs in the pairing alone."""
    config = load_config('cifar_fastode')
    model, encoder = models.from_config(config), models.from_config(config, section='encoder')
    assert models.count_params(models.param_shapes(model, (32, 32, 3))) == 55_732_739     # cifar10_de.json
    assert (encoder.img_resolution, encoder.in_channels, encoder.model_channels, encoder.num_blocks,
            encoder.dropout) == (32, 3, 32, 2, 0.13)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    mu, logvar = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x)[0], x)
    assert mu.shape == logvar.shape == x.shape
    t = config.training
    assert train_step.total_steps(config) == 500_000 and t.batch_size == 128
    ramp = dict(lr=t.lr, lr_rampup_images=t.lr_rampup_images, batch_size=t.batch_size)
    assert float(train_step.learning_rate(2_500, **ramp)) == pytest.approx(1e-4)
    assert float(train_step.learning_rate(5_000, **ramp)) == pytest.approx(2e-4)
    for step in (1, 10 ** 6):
        beta = train_step.ema_beta(step, batch_size=128, ema_halflife_images=t.ema_halflife_images,
                                   ema_rampup_ratio=t.ema_rampup_ratio)
        assert float(beta) == pytest.approx(0.9999, abs=1e-7)            # float32
    assert dict(config.loss)['pairing'] == 'fastode' and config.loss.beta == 20.0
    images = jax.random.uniform(jax.random.key(0), (64, 4, 4, 3))
    flipped, _ = train_step.augment_fn(config.augment)(jax.random.key(1), images)
    same = np.all(np.asarray(flipped) == np.asarray(images), axis=(1, 2, 3))
    mirrored = np.all(np.asarray(flipped) == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and 10 < same.sum() < 54
    baseline = load_config('cifar_rectified_flow')
    assert baseline.loss.pairing == 'independent'
    assert baseline.to_dict() == {**config.to_dict(), 'loss': {**config.loss.to_dict(), 'pairing': 'independent'}}
    assert losses.build(**baseline.loss).hooks.extra_networks == ()


def test_two_gaussians_are_the_authors_toy():
    source = data.build(dict(name='two_gaussians', shape=(2,)))
    batch = source.batch(0, 200_000, seed=0)
    for k, mean in enumerate(([-8.0, 8.0], [8.0, 8.0])):
        points = batch['image'][batch['label'] == k]
        assert abs(len(points) / 200_000 - 0.5) < 0.01
        np.testing.assert_allclose(points.mean(0), mean, atol=0.02)
        np.testing.assert_allclose(np.cov(points.T), np.diag([3.0, 0.1]), rtol=0.02, atol=0.003)
    with pytest.raises(ValueError, match='data.variance'):
        data.build(dict(name='two_gaussians', variance=(1.0, -1.0)))


@pytest.mark.parametrize('name', ['toy2d_fastode', 'digits_fastode', 'cifar_fastode',
                                  'cifar_rectified_flow'])
def test_every_fastode_config_runs_a_few_steps(tmp_path, name):
    """Reduced sizes (tiny UNets with dropout for the flow net and the encoder); CIFAR-10 on tfds mock data."""
    fields = {'training.batch_size': 8, 'training.total_images': 24, 'training.log_every_steps': 1,
              'training.sample_every_steps': 0}
    if name.startswith('toy2d'):
        config = toy_config(3, name)
        run = lambda: train.run(config, str(tmp_path), devices=jax.devices()[:1])
    else:
        if name.startswith('digits'):
            fields['data.shape'] = (8, 8, 1)
        else:
            fields['data.data_dir'] = str(tmp_path / 'data')
        config = load_config(name, **fields)
        config.model.update(TINY_UNET)
        config.encoder.update(TINY_UNET)
        run = lambda: train.run(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
    if name.startswith('cifar'):
        tfds = pytest.importorskip('tensorflow_datasets')
        with tfds.testing.mock_data(num_examples=96):
            state = run()
    else:
        state = run()
    assert int(state.step) == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert ('encoder' in state.params) == (config.loss.pairing == 'fastode')


# ---------------------------------------------------------------- sampling a trained flow

def flow_ode_in_t(velocity, x_T, sigma_max, num_steps=2000):
    """The flow's own ODE dx_t/dt = v(x_t, t), Euler in t from t(sigma_max) to 0 (the authors' sampler), fine."""
    t_grid = np.linspace(float(flow.t_of_sigma(sigma_max)), 0.0, num_steps + 1)
    x_t = x_T / (1 + sigma_max)
    for t, t_next in zip(t_grid[:-1], t_grid[1:]):
        x_t = x_t + (t_next - t) * velocity(x_t, jnp.full((x_t.shape[0],), t, jnp.float32))
    return np.asarray(x_t)


def test_a_trained_toy_flow_samples_through_the_cli_with_every_sampler(tmp_path):
    """configs/toy2d_fastode.py trained (in-process, one device), sampled by `python -m jaxdiff.main --mode=sample`
    with Heun and DPM-Solver++(2M) (no encoder: z ~ N(0, I)); those and, in-process, iPNDM and AMED (r = 1/2:
    DPM-Solver-2) land next to the flow's ODE solved in t with the raw velocity network from the same x_T, and
    GMM-DDIM's samples have the reference's two modes."""
    sampling_fields = {'sampling.num_samples': 256, 'sampling.batch_size': 256,
                       'sampling.schedule_options.num_steps': 12}
    config = load_config('toy2d_fastode', **{'training.total_images': 2000 * 512, 'training.log_every_steps': 1000,
                                             'training.checkpoint_every_steps': 2000,
                                             'training.sample_every_steps': 0, **sampling_fields})
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
    args = ['--config=configs/toy2d_fastode.py', f'--workdir={tmp_path}', '--mode=sample',
            *(f'--config.{field}={value}' for field, value in sampling_fields.items())]
    restored = trained_lib.restore(config, str(tmp_path), mesh_lib.make_mesh(jax.devices()[:1]))
    assert restored.step == 2000
    model, params = restored.model, restored.variables['params']['model']
    velocity = jax.jit(lambda x_t, t: model.apply({'params': params}, x_t, t))
    noise_key = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 3)[0]       # Generator's batch 0
    z = jax.random.normal(noise_key, (256, 2), jnp.float32)
    references = {}

    def error(samples, sigmas):
        """RMS distance to the ODE solution in t from the grid's x_T = sigma_max z."""
        sigma_max = float(sigmas[0])
        if sigma_max not in references:
            references[sigma_max] = flow_ode_in_t(velocity, sigma_max * z, sigma_max)
        return float(np.sqrt(np.mean((samples - references[sigma_max]) ** 2)))

    # Heun on EDM's grid: sigma-space Heun extrapolates on the uniform-t grid (flow.uniform_schedule)
    errors = {}
    for sampler, schedule, nfe in (('heun', 'edm', 23), ('dpmpp_2m', 'flow_uniform', 12)):
        sampled = run_main(*args, f'--config.sampling.sampler={sampler}', f'--config.sampling.schedule={schedule}')
        assert sampled.returncode == 0, sampled.stderr[-3000:]
        with np.load(tmp_path / 'samples.npz') as f:
            assert int(f['nfe']) == nfe and int(f['step']) == 2000
            errors[sampler] = error(f['samples'], f['sigmas'])
    reference = references[999.0]
    assert abs(reference[:, 1].mean() - 8.0) < 1.0 and np.abs(reference[:, 0]).mean() > 5.0   # the two modes
    for sampler in ('euler', 'ipndm', 'amed', 'gmm_ddim'):
        config.sampling.sampler = sampler
        generator = sampling.generator(config, mesh_lib.make_mesh(jax.devices()[:1]), restored.denoiser_fn)
        samples = generator(restored.variables, 256)
        errors[sampler] = error(samples, generator.sigmas)
    del errors['gmm_ddim']         # its random mixture offsets (norm ~1) move samples, some across the modes
    assert max(errors.values()) < 0.4, errors        # the data spans ~20 units; a wrong precond is off by ~10
    assert abs(np.mean(samples[:, 0] > 0) - np.mean(reference[:, 0] > 0)) < 0.1
    assert abs(samples[:, 1].mean() - 8.0) < 1.0 and np.abs(samples[:, 0]).mean() > 5.0
