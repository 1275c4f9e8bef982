"""The training loop: EDM's schedules, learning on a 2-D mixture, 8-device == 1-device, bit-identical resume after
SIGTERM, NaN handling, and the full CIFAR-10 recipe (shapes only) plus a reduced one on tfds mock data."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.drivers import checkpoint, config_files, mesh as mesh_lib, train_step
from jaxdiff import data, models
from jaxdiff.core import losses as losses_lib
from jaxdiff.modes import train as train_mode
from jaxdiff.models.denoiser import Denoiser

load_config = config_files.named     # configs/NAME.py with dotted overrides, e.g. **{'training.batch_size': 8}


def toy_config(steps, **overrides):
    fields = {'training.batch_size': 64, 'training.total_images': 64 * steps, 'training.log_every_steps': 2,
              'training.checkpoint_every_steps': 3, 'training.sample_every_steps': 0,
              'training.lr_rampup_images': 640, 'training.ema_halflife_images': 640,
              'model.hidden_dim': 32, 'model.num_layers': 1, 'model.dropout': 0.1,
              'sampling.num_samples': 16, 'sampling.batch_size': 16}
    return load_config('toy2d_edm', **{**fields, **overrides})


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_edm_learning_rate_ramp_and_ema_schedule():
    kw = dict(lr=1e-3, lr_rampup_images=10_000_000, batch_size=512)
    assert train_step.learning_rate(0, **kw) == 0.0                                   # EDM's first step has lr 0
    np.testing.assert_allclose(train_step.learning_rate(1000, **kw), 1e-3 * 512_000 / 10_000_000, rtol=1e-6)
    assert train_step.learning_rate(10 ** 6, **kw) == pytest.approx(1e-3)
    ema = dict(batch_size=512, ema_halflife_images=500_000, ema_rampup_ratio=0.05)
    assert train_step.ema_beta(0, **ema) == 0.0                                       # EMA starts as a copy
    # 100 steps: halflife = min(5e5, 51200 * 0.05) = 2560 images
    np.testing.assert_allclose(train_step.ema_beta(100, **ema), 0.5 ** (512 / 2560), rtol=1e-6)
    np.testing.assert_allclose(train_step.ema_beta(10 ** 6, **ema), 0.5 ** (512 / 500_000), rtol=1e-6)


def test_mlp_learns_a_2d_mixture(tmp_path):
    """A few hundred steps lower the loss clearly and bring the EMA denoiser close to the exact one."""
    config = toy_config(300, **{'training.batch_size': 256, 'training.total_images': 256 * 300,
                                'training.log_every_steps': 50, 'training.checkpoint_every_steps': 300,
                                'model.hidden_dim': 64, 'model.num_layers': 2, 'model.dropout': 0.0,
                                'training.lr': 3e-3})
    state = train_mode.run(config, str(tmp_path), devices=jax.devices()[:1])
    with open(tmp_path / 'metrics.jsonl') as f:
        losses = [json.loads(line)['loss'] for line in f]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    source = data.build(config.data)
    setup = train_step.build(config)
    model, precond = setup.model, setup.loss.pieces.parameterization.precond
    loss_fn = losses_lib.make_loss(train_step.make_network(model), setup.loss.pieces)
    eval_batch = source.batch(10 ** 6, 8192, seed=1)
    initial = train_step.init_state({'model': model}, setup.optimizer, (2,),
                                   train_step.root_keys(config.training.seed)[0]).params['model']
    initial_loss, trained_loss = (float(loss_fn(p, eval_batch, jax.random.key(3))[0])
                                  for p in (initial, state.ema_params['model']))

    def exact_network(params, x_in, c_noise, batch, key):   # F that makes D the exact posterior mean
        c = precond(jnp.exp(4 * c_noise))                     # EDM: c_noise = ln(sigma) / 4
        x = x_in / c.c_in[:, None]
        return (source.mixture.denoiser(x, jnp.exp(4 * c_noise)) - c.c_skip[:, None] * x) / c.c_out[:, None]

    exact_loss = float(losses_lib.make_loss(exact_network, setup.loss.pieces)(None, eval_batch, jax.random.key(3))[0])
    # the loss is bounded below by the exact denoiser's; training closes most of the gap from the initial network
    assert trained_loss - exact_loss < 0.3 * (initial_loss - exact_loss), (initial_loss, trained_loss, exact_loss)
    x0 = source.mixture.sample(jax.random.key(5), 2048)
    for sigma in (0.3, 1.0):   # (at large sigma c_skip x is already nearly exact, since sigma_data ~ data std)
        x = x0 + sigma * jax.random.normal(jax.random.key(6), x0.shape)
        exact = source.mixture.denoiser(x, sigma)
        trained = Denoiser(model.apply, state.ema_params['model'], precond)(x, sigma)
        untrained = precond(jnp.full((1,), sigma)).c_skip * x   # an initial network outputs F ~ 0
        error = lambda D: float(jnp.mean(jnp.sum((D - exact) ** 2, -1)))
        assert error(trained) < 0.5 * error(untrained), (sigma, error(trained), error(untrained))


def test_sharded_step_matches_single_device():
    """8 simulated devices (batch split 8 ways) give the 1-device parameters, with augmentation and dropout on."""
    assert len(jax.devices()) == 8
    config = load_config('digits_edm', **{
        'model.name': 'mlp', 'data.shape': (8, 8, 1), 'augment.p': 0.5, 'training.batch_size': 16,
        'training.lr_rampup_images': 16})
    config.model = dict(name='mlp', hidden_dim=32, num_layers=1, dropout=0.2)
    setup = train_step.build(config)
    source = data.build(config.data)
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = mesh_lib.make_mesh(devices)
        state = jax.device_put(train_step.init_state(setup.modules, setup.optimizer, (8, 8, 1), jax.random.key(0)),
                               mesh_lib.replicated(mesh))
        metrics = jax.device_put(train_step.zero_metrics(), mesh_lib.replicated(mesh))
        step = train_step.Jit(mesh).compile(setup.train_step)
        for s in range(3):
            state, metrics = step(state, metrics, mesh_lib.global_batch(source.batch(s, 16, seed=0), mesh))
        assert len(state.params['model']['input']['kernel'].sharding.device_set) == len(devices)
        results.append(jax.device_get(state))
    sharded, single = results
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), sharded.params,
                                         train_step.init_state(setup.modules, setup.optimizer, (8, 8, 1),
                                                               jax.random.key(0)).params))
    assert max(moved) > 1e-4   # the steps did change the parameters
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


class SignalAt:
    """Wraps a source; sends SIGTERM to this process when the batch of step `step` is read (mid-run)."""

    def __init__(self, source, step):
        self.source, self.step, self.shape = source, step, source.shape

    def batch(self, step, size, **kwargs):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source.batch(step, size, **kwargs)


def test_resume_after_sigterm_is_bit_identical(tmp_path):
    config = toy_config(10)
    devices = jax.devices()[:1]   # (8 devices: test_sharded_step_matches_single_device and test_cli)
    uninterrupted = train_mode.run(config, str(tmp_path / 'a'), devices=devices)
    source = SignalAt(data.build(config.data), step=3)
    interrupted = train_mode.run(config, str(tmp_path / 'b'), source=source, devices=devices)
    stopped_at = int(interrupted.step)
    assert 1 <= stopped_at < 10
    assert checkpoint.Checkpoints(tmp_path / 'b').latest_step() == stopped_at   # saved on SIGTERM
    resumed = train_mode.run(config, str(tmp_path / 'b'), devices=devices)
    assert int(resumed.step) == 10
    assert leaves_equal(resumed, uninterrupted)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is removed after training


class PoisonAt:
    """Wraps a source; the batch of step `step` (0-based) is all NaN."""

    def __init__(self, source, step):
        self.source, self.step, self.shape = source, step, source.shape

    def batch(self, step, size, **kwargs):
        batch = self.source.batch(step, size, **kwargs)
        if step == self.step:
            batch['image'] = np.full_like(batch['image'], np.nan)
        return batch


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = toy_config(10, **{'training.log_every_steps': 4, 'training.checkpoint_every_steps': 2})
    source = PoisonAt(data.build(config.data), step=4)   # the 5th step sees NaN; detected at the step-6 save
    with pytest.raises(train_mode.NonFiniteLoss, match=r'NaN/Inf at step 5;.*checkpoints/4$'):
        train_mode.run(config, str(tmp_path), source=source, devices=jax.devices()[:1])
    checkpoints = checkpoint.Checkpoints(tmp_path)
    assert checkpoints.latest_step() == 4
    setup = train_step.build(config)
    restored = checkpoints.restore(train_step.abstract_state(config, setup.modules, setup.optimizer,
                                                        mesh_lib.make_mesh(jax.devices()[:1])))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_cifar_edm_full_step_shapes():
    """EDM's CIFAR-10 recipe: the full step traces (jax.eval_shape: nothing allocated or compiled)."""
    config = load_config('cifar_edm')
    setup = train_step.build(config)
    mesh = mesh_lib.make_mesh()
    state = train_step.abstract_state(config, setup.modules, setup.optimizer, mesh)
    assert models.count_params(state.params['model']) == 55_733_891
    batch = {'image': jax.ShapeDtypeStruct((512, 32, 32, 3), jnp.float32),
             'label': jax.ShapeDtypeStruct((512,), jnp.int32)}
    new_state, metrics = jax.eval_shape(setup.train_step, state, train_step.zero_metrics(), batch)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert metrics['loss_sum'].shape == ()


def test_cifar_edm_runs_on_tfds_mock_data_with_a_reduced_model(tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')
    config = load_config('cifar_edm', **{'training.batch_size': 8, 'training.total_images': 16,
                                         'training.sample_every_steps': 0})
    config.model.update(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(32,))
    with tfds.testing.mock_data(num_examples=32):
        state = train_mode.run(config, str(tmp_path))
    assert int(state.step) == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
    assert checkpoint.Checkpoints(tmp_path).latest_step() == 2


def test_denoiser_is_eq_7_with_scalar_or_per_example_sigma_and_exposes_the_bottleneck():
    model = models.build('mlp', hidden_dim=16, num_layers=1)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))['params']
    params = jax.tree.map(lambda p: p + 0.1, params)   # make F non-zero (the output layer starts at ~0)
    precond = losses_lib.build().parameterization.precond
    D = Denoiser(model.apply, params, precond)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    c = precond(jnp.full((5,), 0.7))
    F = model.apply({'params': params}, c.c_in[:, None] * x, c.c_noise)
    expected = c.c_skip[:, None] * x + c.c_out[:, None] * F
    np.testing.assert_allclose(D(x, 0.7), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D(x, jnp.full((5,), 0.7)), expected, rtol=1e-5, atol=1e-6)
    x0_hat, aux = D.with_aux(x, 0.7)
    np.testing.assert_allclose(x0_hat, expected, rtol=1e-5, atol=1e-6)
    assert aux['bottleneck'].shape == (5, 16)
