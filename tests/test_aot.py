"""AOT as a pairing of the Loss (jaxdiff.core.aot): the pool is the data of its steps, its pairs are the exact (per-class)
optimum on the augmented images, each pair is used once; 8 devices give the 1-device parameters; SIGTERM in the
middle of a pool resumes bit-identically; a class-conditional digits model trains and samples the requested class;
every AOT config runs a few steps (CIFAR-10 on tfds mock data)."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxdiff.core import aot, losses
from jaxdiff.drivers import checkpoint, sampling, trained as trained_lib, train_step
from jaxdiff import data
from jaxdiff.drivers.config_files import named as load_config   # configs/NAME.py with dotted overrides
from jaxdiff.core.errors import UserError
from jaxdiff.modes import train

MLP = dict(name='mlp', hidden_dim=32, num_layers=1, dropout=0.2)
TINY_UNET = dict(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.0)


def cost64(x, z):
    """||x_i - z_j|| in float64 on the flattened rows (AOT's cost, from its definition)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    return np.sqrt(((x[:, None] - z[None]) ** 2).sum(-1))


def optimum(C, labels=None):
    """The least total cost of any pairing (within each class when labels are given)."""
    labels = np.zeros(len(C), int) if labels is None else np.asarray(labels)
    best = 0.0
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rows, cols = linear_sum_assignment(C[np.ix_(idx, idx)])
        best += C[idx[rows], idx[cols]].sum()
    return best


def digits_mlp_config(steps, batch_size=16, pool_size=64, **overrides):
    """configs/digits_aot.py at 8x8 with a small MLP (class-conditional), augmentation and dropout on."""
    fields = {'data.shape': (8, 8, 1), 'augment.p': 0.5, 'training.batch_size': batch_size,
              'loss.pool_size': pool_size, 'training.total_images': batch_size * steps,
              'training.lr_rampup_images': batch_size, 'training.sample_every_steps': 0,
              'training.log_every_steps': 2, 'training.checkpoint_every_steps': 1000}
    config = load_config('digits_aot', **{**fields, **overrides})
    config.model = dict(MLP, label_dim=10)
    return config


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_pool_holds_exactly_the_minibatches_of_its_steps():
    """Rows('pool', P, period P/B) of stream 0 fetched at index k = the minibatches of steps kP/B .. (k+1)P/B - 1:
    AOT trains on the data order of a run without it, and no image is left over."""
    loss = losses.build(pairing='aot', pool_size=64)
    (rows,) = loss.rows(16)
    assert rows == losses.Rows('pool', 64, stream=0, period=4)
    source = data.build(dict(name='digits', shape=(8, 8, 1)))
    for k in (0, 23):     # 23: the pool crosses an epoch boundary (1500 images)
        pool = source.batch(k, rows.size, seed=0, stream=rows.stream)
        steps = [source.batch(s, 16, seed=0) for s in range(4 * k, 4 * k + 4)]
        np.testing.assert_array_equal(pool['image'], np.concatenate([b['image'] for b in steps]))
        np.testing.assert_array_equal(pool['label'], np.concatenate([b['label'] for b in steps]))
    # a fresh pool every step: the minibatch plus P - B images of stream 2; P = B: the minibatch alone
    assert losses.build(pairing='aot', pool_size=64, pool_reuse=False).rows(16) == (
        losses.Rows('pool_extra', 48, stream=2),)
    assert losses.build(pairing='aot').rows(16) == ()


def refreshed(per_class, augment_p, pool_size=120, seed=3):
    source = data.build(dict(name='digits', shape=(8, 8, 1)))
    loss = losses.build(pairing='aot', pool_size=pool_size, per_class=per_class)
    fetched = source.batch(0, pool_size, seed=seed)
    augment = train_step.augment_fn(dict(p=augment_p))
    out = jax.jit(lambda rows, key: loss.hooks.refresh(rows, key, augment))(
        {'pool': fetched['image'], 'pool_label': fetched['label']}, jax.random.key(seed))
    return fetched, jax.device_get(out)


@pytest.mark.parametrize('per_class', [False, True])
def test_refresh_pairs_the_augmented_pool_optimally(per_class):
    """The refreshed pool's (image, noise) pairs are the optimal assignment of the augmented images to the drawn
    unit noises (within each class with per_class: then no noise slot crosses to another class)."""
    fetched, out = refreshed(per_class, augment_p=0.5)
    image, noise, perm, label = out['aot_image'], out['aot_noise'], out['aot_perm'], out['aot_label']
    np.testing.assert_array_equal(label, fetched['label'])
    assert out['aot_augment_labels'].shape == (120, 9) and np.any(out['aot_augment_labels'] != 0)
    assert not np.allclose(image, fetched['image'])                 # augmented before the assignment
    assert np.array_equal(np.sort(perm), np.arange(120)) and not np.array_equal(perm, np.arange(120))
    z = np.empty_like(noise)
    z[perm] = noise                                                 # the noise as drawn (noise = z[perm])
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05        # unit Gaussian, not sigma-scaled
    C = cost64(image, z)
    paired = C[np.arange(120), perm].sum()
    np.testing.assert_allclose(paired, optimum(C, label if per_class else None), rtol=1e-6)
    crossing = np.sum(label[perm] != label)
    if per_class:
        assert crossing == 0
        assert paired > optimum(C) * (1 + 1e-4)                   # the class constraint binds
    else:
        assert crossing > 0                                         # (so the per-class check above can fail)


def test_augmentation_off_pairs_the_images_as_they_are():
    """p = 0 (the authors' code crashes): the pool images are used unchanged and no augment labels are made."""
    fetched, out = refreshed(per_class=False, augment_p=0.0)
    np.testing.assert_array_equal(out['aot_image'], fetched['image'])
    assert 'aot_augment_labels' not in out


def test_the_steps_of_a_pool_consume_each_pair_once_and_the_pairing_returns_it():
    """Loss.prepare at steps kP/B + j gives chunk j of the refreshed pool; the concatenated chunks are the pool."""
    fetched, out = refreshed(per_class=False, augment_p=0.5)
    loss = losses.build(pairing='aot', pool_size=120)
    batch = {'image': fetched['image'][:24], 'label': fetched['label'][:24], **out}
    chunks = [jax.jit(loss.prepare, static_argnums=2)(batch, jax.random.key(0), None, 5 * 7 + j)
              for j in range(5)]
    for name in ('image', 'label', 'noise', 'augment_labels'):
        np.testing.assert_array_equal(np.concatenate([c[name] for c in chunks]), out['aot_' + name])
    assert not any(name.startswith('aot_') for name in chunks[0])
    eps, penalty, _ = loss.pieces.pairing(jax.random.key(1), chunks[2]['image'], chunks[2], {}, {})
    np.testing.assert_array_equal(eps, out['aot_noise'][48:72])
    assert penalty == 0.0


@pytest.mark.parametrize('pool_size', [16, 48])
def test_a_fresh_pool_each_step_pairs_the_minibatch_within_the_pool(pool_size):
    """pool_reuse=False: each step pairs (minibatch + P - B others); P = B: the minibatch's own optimal pairing."""
    source = data.build(dict(name='digits', shape=(8, 8, 1)))
    loss = losses.build(pairing='aot', pool_size=pool_size, pool_reuse=False)
    batch = source.batch(0, 16, seed=0)
    if pool_size > 16:
        extra = source.batch(0, pool_size - 16, seed=0, stream=2)
        batch.update(pool_extra=extra['image'], pool_extra_label=extra['label'])
    out = jax.jit(loss.prepare, static_argnums=2)(batch, jax.random.key(4), None, 0)
    assert sorted(out) == ['image', 'label', 'noise']
    np.testing.assert_array_equal(out['image'], batch['image'])
    C = cost64(out['image'], out['noise'])
    identity = np.trace(C)
    if pool_size == 16:
        np.testing.assert_allclose(identity, optimum(C), rtol=1e-6)     # the minibatch's exact pairing
    else:
        assert identity <= C.sum() / 16                                 # better than the average pairing


@pytest.mark.parametrize('fields, parallelism, message', [
    (dict(pool_size=40), 'jit', r'config\.loss\.pool_size=40 must be a multiple of training\.batch_size=16'),
    (dict(pool_size=8), 'jit', r'config\.loss\.pool_size=8 must be a multiple'),
    (dict(pool_size=32), 'pmap', r"config\.loss\.pool_size=32: .*training\.parallelism='jit'"),
])
def test_bad_pools_are_one_line_errors(fields, parallelism, message):
    loss = losses.build(pairing='aot', **fields)
    with pytest.raises(UserError, match=message) as error:
        loss.check(batch_size=16, num_devices=8, parallelism=parallelism)
    assert '\n' not in str(error.value)


def test_bad_coupling_options_are_one_line_errors():
    with pytest.raises(UserError, match=r"config\.loss\.coupling_method='greedy'; valid choices: exact, sinkhorn"):
        losses.build(pairing='aot', coupling_method='greedy')
    with pytest.raises(UserError, match=r'config\.loss\.coupling_cost'):
        losses.build(pairing='aot', coupling_cost='l1')


def test_eight_devices_give_the_one_device_parameters(tmp_path):
    """One global pool and assignment: the same parameters on 8 simulated devices as on 1 (augmentation, dropout,
    per-class pools, two pools of 4 steps)."""
    assert len(jax.devices()) == 8
    config = digits_mlp_config(steps=8)
    sharded = train.run(config, str(tmp_path / 'eight'), devices=jax.devices())
    single = train.run(config, str(tmp_path / 'one'), devices=jax.devices()[:1])
    assert int(sharded.step) == 8
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded)), jax.tree.leaves(jax.device_get(single))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


class SignalAt:
    """Wraps a source; sends SIGTERM to this process when the minibatch of step `step` is read (not a pool)."""

    def __init__(self, source, step, batch_size):
        self.source, self.step, self.batch_size, self.shape = source, step, batch_size, source.shape

    def batch(self, step, size, **kwargs):
        if step == self.step and size == self.batch_size and kwargs.get('stream', 0) == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source.batch(step, size, **kwargs)


def test_sigterm_in_the_middle_of_a_pool_resumes_bit_identically(tmp_path):
    """Pools of 8 steps, stopped by SIGTERM inside the first pool, resumed across the next: the pool is rebuilt
    from its index (data, augmentation, noise and assignment), so the result equals an uninterrupted run."""
    config = digits_mlp_config(steps=12, pool_size=128)
    devices = jax.devices()[:1]
    uninterrupted = train.run(config, str(tmp_path / 'a'), devices=devices)
    source = SignalAt(data.build(config.data), step=5, batch_size=16)
    interrupted = train.run(config, str(tmp_path / 'b'), source=source, devices=devices)
    stopped_at = int(interrupted.step)
    assert 0 < stopped_at < 8, stopped_at                      # inside pool 0 (steps 0..7)
    assert checkpoint.Checkpoints(tmp_path / 'b').latest_step() == stopped_at
    resumed = train.run(config, str(tmp_path / 'b'), devices=devices)
    assert int(resumed.step) == 12
    assert leaves_equal(resumed, uninterrupted)


def test_class_conditional_digits_trains_and_samples_the_requested_class(tmp_path):
    """configs/digits_aot.py (labels from the data, model.label_dim=10, per-class pools) with a tiny SongUNet:
    trains, then `--mode=sample` writes the requested class, or random classes, and the class changes the samples."""
    from jaxdiff.modes import sample
    config = load_config('digits_aot', **{
        'training.batch_size': 16, 'loss.pool_size': 32, 'training.total_images': 48, 'training.lr': 1e-2,
        'training.lr_rampup_images': 16, 'training.sample_every_steps': 0, 'sampling.schedule_options.num_steps': 3,
        'sampling.num_samples': 16, 'sampling.batch_size': 16})
    config.model.update(TINY_UNET)
    state = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert int(state.step) == 3 and np.isfinite(jax.tree.leaves(state.params)[0]).all()
    drawn = {}
    for label in (3, None):
        config.sampling.class_label = label
        drawn[label] = sample.run(config, str(tmp_path))
        drawn[label, 'labels'] = np.load(tmp_path / 'samples.npz')['labels']
    np.testing.assert_array_equal(drawn[3, 'labels'], np.full(16, 3))
    random_labels = drawn[None, 'labels']
    assert len(np.unique(random_labels)) >= 4 and random_labels.min() >= 0 and random_labels.max() < 10
    # the same starting noise (the batch index keys it): another class gives another sample, the same class the same
    change = np.abs(drawn[3] - drawn[None]).reshape(16, -1).max(axis=1)
    assert np.all(change[random_labels != 3] > 1e-4) and np.all(change[random_labels == 3] < 1e-5), change


def few_steps(name, batch_size, pool_size, **extra):
    config = load_config(name, **{'training.batch_size': batch_size, 'loss.pool_size': pool_size,
                                  'training.total_images': batch_size * 3, 'training.sample_every_steps': 0,
                                  'training.log_every_steps': 1, **extra})
    return config


def test_toy2d_aot_runs_with_sinkhorn_pairing(tmp_path):
    """configs/toy2d_aot.py (the exact pairing runs in the digits tests above) with ott-jax's Sinkhorn."""
    config = few_steps('toy2d_aot', 32, 64, **{'loss.coupling_method': 'sinkhorn', 'model.hidden_dim': 16,
                                               'model.num_layers': 1})
    state = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert int(state.step) == 3 and np.isfinite(jax.tree.leaves(state.params)[0]).all()


@pytest.mark.parametrize('name, pool_size, extra', [
    ('cifar_aot', 16, {}),
    ('cifar_aot_cond', 32, {}),
    ('cifar_stf_aot', 16, {'loss.reference_size': 16}),
])
def test_cifar_aot_configs_run_a_few_steps_on_mock_data(tmp_path, name, pool_size, extra):
    tfds = pytest.importorskip('tensorflow_datasets')
    config = few_steps(name, 8, pool_size, **{'data.data_dir': str(tmp_path / 'data'), **extra})
    config.model.update(TINY_UNET)
    with tfds.testing.mock_data(num_examples=96):
        state = train.run(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
    assert int(state.step) == 3 and np.isfinite(jax.tree.leaves(state.params)[0]).all()


def test_stf_target_and_aot_pairing_compose():
    """STF's reference batch starts with AOT's minibatch (a chunk of the paired pool), then R - B other images."""
    config = load_config('cifar_stf_aot')
    loss = losses.build(**{**dict(config.loss), 'pool_size': 32, 'reference_size': 24})
    assert [r.name for r in loss.rows(8)] == ['reference_extra', 'pool']
    rng = np.random.default_rng(0)
    pool = rng.uniform(-1, 1, (32, 4, 4, 3)).astype(np.float32)
    out = loss.hooks.refresh({'pool': pool, 'pool_label': np.zeros(32, np.int32)}, jax.random.key(0), None)
    batch = {'image': pool[:8], 'label': np.zeros(8, np.int32), 'reference_extra': pool[:16] * 0.5, **out}
    prepared = loss.prepare(batch, jax.random.key(1), None, 3)
    np.testing.assert_array_equal(prepared['image'], out['aot_image'][24:])
    np.testing.assert_array_equal(prepared['reference'][:8], prepared['image'])
    np.testing.assert_array_equal(prepared['reference'][8:], pool[:16] * 0.5)
    np.testing.assert_array_equal(prepared['noise'], out['aot_noise'][24:])


@pytest.mark.parametrize('name, nfe, rho, num_steps', [('cifar_aot_sample_rho90', 27, 90.0, 14),
                                                        ('cifar_aot_cond_sample_rho72', 29, 72.0, 15),
                                                        ('cifar_aot', 35, 7.0, 18)])
def test_sampling_presets_are_the_authors_grids(name, nfe, rho, num_steps):
    config = load_config(name)
    sampler, sigmas = sampling.sampler_and_grid(config.sampling)
    assert config.sampling.sampler == 'heun' and sampler.nfe(len(sigmas)) == nfe
    i = np.arange(num_steps)
    expected = (80.0 ** (1 / rho) + i / (num_steps - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    np.testing.assert_allclose(np.asarray(sigmas)[:num_steps], expected, rtol=1e-5)    # EDM eq. 5
    assert float(sigmas[-1]) == 0.0


def test_scipy_pairing_inside_the_step_is_refused_where_the_placement_cannot_run_host_callbacks():
    loss = losses.build(pairing='aot', pool_size=16, coupling_method='exact', coupling_solver='scipy')
    loss.check(batch_size=16, num_devices=8, parallelism='jit', host_callbacks_in_step=True)
    with pytest.raises(UserError, match=r"coupling_solver='scipy' pairs inside the training step") as error:
        loss.check(batch_size=16, num_devices=8, parallelism='jit', host_callbacks_in_step=False)
    assert '\n' not in str(error.value)
