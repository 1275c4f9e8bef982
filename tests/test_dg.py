"""Discriminator guidance end to end (jaxdiff.drivers.discriminator_training, --mode=train_discriminator, guided sampling by
config): the authors' sigma distribution and optimizer against transcriptions, the OT-paired noise against brute
force, a discriminator on toy2d against the exact log ratio, bit-identical resume after a crash, 8 devices = 1
(frozen SongUNet features, OT pairing), and `--mode=sample` with config.sampling.guidance (weight 0 = unguided)."""
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.scipy.special import logsumexp

from jaxdiff.core import analytic, discriminator as discriminator_math, guidance
from jaxdiff.drivers import config_files, discriminator_guidance, discriminator_training as dt, mesh as mesh_lib
from jaxdiff.drivers import sampling, trained as trained_lib
from jaxdiff import data
from jaxdiff import models
from jaxdiff.core import precond
from jaxdiff.core.errors import UserError
from jaxdiff.modes import train as train_mode, train_discriminator

from configs import dg_common
from test_cli import run_main


def test_vp_importance_sigma_draws_t_with_density_beta_over_sigma_vp_squared():
    """t = sigma^-1(sigma) of the draws has the CDF of p(t) ~ beta(t) / (1 - exp(-B(t))) on [1e-5, 1], integrated
    numerically (the authors' importance density, written from its definition)."""
    sigma = np.asarray(discriminator_math.vp_importance_sigma(jax.random.key(0), (200_000,)), np.float64)
    t = np.sort(precond.vp_t_of_sigma(sigma))
    grid = np.geomspace(1e-5, 1.0, 100_001)
    density = (0.1 + 19.9 * grid) / -np.expm1(-(0.1 * grid + 19.9 * grid ** 2 / 2))
    cdf = np.concatenate([[0], np.cumsum(np.diff(grid) * (density[1:] + density[:-1]) / 2)])
    cdf /= cdf[-1]
    empirical = np.searchsorted(t, grid, side='right') / len(t)
    assert np.max(np.abs(empirical - cdf)) < 0.006        # Kolmogorov-Smirnov; 1% critical value ~0.0036
    assert t[0] > 1e-5 * (1 - 1e-3) and t[-1] < 1 + 1e-6
    assert 0.3 < np.mean(t < 0.05) < 0.7                 # concentrated at small t, as the issue says


def test_optimizer_is_torch_adam_with_l2_weight_decay():
    """A NumPy transcription of torch.optim.Adam(lr, weight_decay): g + wd p before the moments (not AdamW)."""
    lr, wd, b1, b2, eps = 0.01, 0.3, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=5)
    grads = rng.normal(size=(4, 5))

    def run(optimizer):
        params = jnp.asarray(p0, jnp.float32)
        state = optimizer.init(params)
        for g in grads:
            updates, state = optimizer.update(jnp.asarray(g, jnp.float32), state, params)
            params = optax.apply_updates(params, updates)
        return np.asarray(params)

    p, m, v = p0, np.zeros(5), np.zeros(5)
    for k, g in enumerate(grads, start=1):
        g = g + wd * p
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        p = p - lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps)
    np.testing.assert_allclose(run(dt.make_optimizer(lr=lr, weight_decay=wd)), p, rtol=1e-5, atol=1e-6)
    assert np.abs(run(optax.adamw(lr, weight_decay=wd)) - p).max() > 1e-4    # decoupled AdamW is another rule


def test_aot_noise_is_the_optimal_assignment_of_each_half():
    half, d = 6, 3
    rng = np.random.default_rng(1)
    batch = {'real': jnp.asarray(rng.normal(size=(half, d)), jnp.float32),
             'generated': jnp.asarray(rng.normal(size=(half, d)) + 2.0, jnp.float32),
             'real_label': jnp.zeros(half, jnp.int32), 'generated_label': jnp.zeros(half, jnp.int32)}
    sigma_fn = lambda key, shape: jnp.full(shape, 0.7)
    x, sigma, target, _ = discriminator_math.perturb(jax.random.key(2), batch, sigma_fn=sigma_fn, pairing='aot',
                                                     coupling_options=dict(method='exact'))
    np.testing.assert_array_equal(target, [1] * half + [0] * half)
    images = np.concatenate([batch['real'], batch['generated']])
    z = (np.asarray(x) - images) / 0.7
    for rows in (slice(0, half), slice(half, None)):
        cost = np.linalg.norm(images[rows][:, None] - z[rows][None], axis=-1)
        best = min(sum(cost[i, p[i]] for i in range(half)) for p in itertools.permutations(range(half)))
        np.testing.assert_allclose(np.trace(cost), best, rtol=1e-5)
    x_independent = discriminator_math.perturb(jax.random.key(2), batch, sigma_fn=sigma_fn)[0]
    z_independent = (np.asarray(x_independent) - images) / 0.7
    assert np.linalg.norm(images - z, axis=-1).sum() < np.linalg.norm(images - z_independent, axis=-1).sum()


# ---------------------------------------------------------------- a discriminator on toy2d

def _wrong_mixture():
    """The 'model' of the toy data: eight Gaussians with other weights, a larger radius and wider modes."""
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.3 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    weights = np.array([3, 1, 3, 1, 3, 1, 3, 1], np.float64)
    return analytic.GaussianMixture(means.astype(np.float32), np.full(8, 0.2, np.float32),
                                    (weights / weights.sum()).astype(np.float32))


def _log_density(mixture, x, sigma):
    var = mixture.stds[None] ** 2 + sigma[:, None] ** 2
    sq = jnp.sum((x[:, None] - mixture.means[None]) ** 2, -1)
    return logsumexp(jnp.log(mixture.weights)[None] - 0.5 * sq / var - jnp.log(2 * jnp.pi * var), axis=1)


def _toy_discriminator_config(**fields):
    config = ml_collections.ConfigDict()
    config.data = dict(name='eight_gaussians', shape=(2,))
    config.discriminator = dg_common.discriminator(
        model_workdir=None, network=dict(name='mlp', hidden_dim=64, num_layers=2, embedding_dim=32, sigma_data=1.4),
        **{**dict(num_generated=4096, num_heldout=512, batch_size=128, num_steps=600, lr=2e-3, log_every_steps=200,
                  eval_every_steps=600, checkpoint_every_steps=600), **fields})
    return config


def test_discriminator_on_toy2d_beats_chance_and_follows_the_exact_log_ratio(tmp_path):
    real = data.build(dict(name='eight_gaussians'))
    wrong = _wrong_mixture()
    generated = np.asarray(wrong.sample(jax.random.key(3), 4096 + 512))
    rows = lambda points: {'image': points, 'label': np.zeros(len(points), np.int32)}
    heldout = {'real': dt.heldout_real(dict(name='eight_gaussians'), real, 512), 'generated': rows(generated[4096:])}
    config = _toy_discriminator_config()
    state = dt.train(config, str(tmp_path), real_source=real, heldout=heldout, generated=rows(generated[:4096]),
                     mesh=mesh_lib.make_mesh(jax.devices()[:1]))
    assert int(state.step) == 600
    last = [line for line in open(tmp_path / 'metrics.jsonl') if 'heldout_accuracy' in line][-1]
    accuracy = json.loads(last)['heldout_accuracy']

    # the Bayes classifier (the exact log ratio) on fresh held-out pairs perturbed by the training distribution
    trained = discriminator_guidance.restore(str(tmp_path), mesh_lib.make_mesh(jax.devices()[:1]))
    logit_fn = trained.logit_fn(trained.params, None)
    keys = jax.random.split(jax.random.key(4), 4)
    n = 2048
    x0 = jnp.concatenate([real.mixture.sample(keys[0], n), wrong.sample(keys[1], n)])
    sigma = discriminator_math.vp_importance_sigma(keys[2], (2 * n,))
    x = x0 + sigma[:, None] * jax.random.normal(keys[3], x0.shape)
    target = np.r_[np.ones(n), np.zeros(n)]
    exact = _log_density(real.mixture, x, sigma) - _log_density(wrong, x, sigma)
    learned = logit_fn(x, sigma)
    bayes, ours = (float(np.mean((np.asarray(v) > 0) == target)) for v in (exact, learned))
    assert bayes > 0.65, bayes
    assert ours > 0.5 + 0.75 * (bayes - 0.5), (ours, bayes)        # clearly beats chance, near the optimum
    assert abs(accuracy - ours) < 0.05, (accuracy, ours)           # the logged held-out accuracy agrees
    small = np.asarray(sigma) < 0.3                                # where the two distributions differ most
    assert np.corrcoef(np.asarray(exact)[small], np.asarray(learned)[small])[0, 1] > 0.8


# ---------------------------------------------------------------- the mode: a trained toy model

MODEL = {'model.hidden_dim': 32, 'model.num_layers': 1, 'training.batch_size': 256, 'training.total_images': 256 * 40,
         'training.checkpoint_every_steps': 40, 'training.log_every_steps': 40, 'training.sample_every_steps': 0,
         'training.lr_rampup_images': 2560, 'sampling.num_samples': 64, 'sampling.batch_size': 64}
DISCRIMINATOR = {'discriminator.network.hidden_dim': 32, 'discriminator.network.num_layers': 1,
                 'discriminator.num_generated': 512, 'discriminator.num_heldout': 64,
                 'discriminator.batch_size': 64, 'discriminator.num_steps': 10, 'discriminator.log_every_steps': 5,
                 'discriminator.eval_every_steps': 10, 'discriminator.checkpoint_every_steps': 3}


@pytest.fixture(scope='module')
def toy_model(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('toy2d_dg'))
    train_mode.run(config_files.named('toy2d_dg', **MODEL), workdir, devices=jax.devices()[:1])
    return workdir


def _config(model_workdir, **overrides):
    return config_files.named('toy2d_dg', **{**MODEL, **DISCRIMINATOR,
                                             'discriminator.model_workdir': model_workdir, **overrides})


class CrashAt:
    """Wraps a source; raises (a killed run: nothing saved on the way out) when the batch of `step` is read."""

    def __init__(self, source, step):
        self.source, self.step, self.shape = source, step, source.shape

    def batch(self, step, size, **kwargs):
        if step == self.step and kwargs.get('stream', 0) == 0:
            raise RuntimeError('killed')
        return self.source.batch(step, size, **kwargs)


def test_kill_and_resume_of_discriminator_training_is_bit_identical(toy_model, tmp_path):
    config = _config(toy_model)
    devices = jax.devices()[:1]
    uninterrupted = train_discriminator.run(config, str(tmp_path / 'a'), devices=devices)
    with pytest.raises(RuntimeError, match='killed'):
        train_discriminator.run(config, str(tmp_path / 'b'), source=CrashAt(data.build(config.data), 7),
                                devices=devices)
    assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['3', '6']
    resumed = train_discriminator.run(config, str(tmp_path / 'b'), devices=devices)   # from step 6, npz reused
    assert int(resumed.step) == int(uninterrupted.step) == 10
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    with np.load(tmp_path / 'a' / 'generated.npz') as a, np.load(tmp_path / 'b' / 'generated.npz') as b:
        np.testing.assert_array_equal(a['samples'], b['samples'])


def test_eight_devices_equal_one_with_frozen_features_and_ot_pairing(tmp_path):
    """The batch sharded over 8 devices gives the 1-device parameters: frozen features (the toy MLP denoiser's last
    hidden layer through Denoiser.with_aux) and OT-paired noise (the host assignment inside the sharded step)."""
    model = models.build('mlp', hidden_dim=32, num_layers=1)
    frozen = {'params': {'model': models.init(model, (2,), jax.random.key(0))['params']}, 'model_state': {}}
    denoiser_fn = trained_lib.denoiser_fn_for(model, precond.edm)
    config = ml_collections.ConfigDict()
    config.data = dict(name='eight_gaussians', shape=(2,))
    config.discriminator = dg_common.discriminator(
        model_workdir=None, network=dict(name='mlp', hidden_dim=32, num_layers=1, embedding_dim=16),
        features='bottleneck', pairing='aot', num_generated=64, num_heldout=16, batch_size=16, num_steps=3,
        log_every_steps=3, eval_every_steps=3, checkpoint_every_steps=3)
    source = data.build(config.data)
    generated = {'image': np.asarray(jax.random.normal(jax.random.key(1), (80, 2))), 'label': np.zeros(80, np.int32)}
    heldout = {'real': dt.heldout_real(config.data, source, 16), 'generated': {k: v[64:] for k, v in generated.items()}}
    results = []
    for name, devices in (('eight', jax.devices()), ('one', jax.devices()[:1])):
        state = dt.train(config, str(tmp_path / name), real_source=source, heldout=heldout,
                         generated={k: v[:64] for k, v in generated.items()}, frozen=frozen, denoiser_fn=denoiser_fn,
                         mesh=mesh_lib.make_mesh(devices))
        assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == len(devices)
        results.append(jax.device_get(state))
    eight, one = results
    init = dt.Discriminator(dt._network(config.discriminator.network), 'bottleneck', 0).init(
        discriminator_math.root_keys(0)[0], (32,))
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(init))) > 1e-4
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_head_reads_the_frozen_songunet_bottleneck_and_guides_the_image():
    """features='bottleneck' on a (tiny) SongUNet: the head's input is the encoder output that Denoiser.with_aux
    exposes, and the guidance gradient reaches x through the frozen network."""
    fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
    model = models.build('ddpmpp', img_resolution=8, in_channels=1, out_channels=1, model_channels=8,
                         channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0, augment_dim=0)
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    frozen = {'params': {'model': fast_jit(model.init)(jax.random.key(0), x, jnp.zeros(2))['params']},
              'model_state': {}}
    denoiser_fn = trained_lib.denoiser_fn_for(model, precond.edm)
    discriminator = dt.Discriminator(dt._network(dict(name='head', model_channels=8, num_blocks=1, num_heads=1)),
                                     'bottleneck', 0, denoiser_fn)
    assert discriminator.input_shape(frozen, (8, 8, 1)) == (4, 4, 16)
    params = discriminator.init(jax.random.key(1), (4, 4, 16))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    trained = discriminator_guidance.TrainedDiscriminator(discriminator, params, 0, {})
    sigma = jnp.array([0.5, 3.0])

    @fast_jit
    def evaluate(x):
        denoiser = denoiser_fn(frozen)
        guided = guidance.discriminator_guided(denoiser, trained.logit_fn(denoiser), weight=2.0)
        return (discriminator.inputs(frozen, x, sigma, jnp.zeros(2, jnp.int32)), denoiser.with_aux(x, sigma)[1],
                guided.correction(x, sigma)[0])

    features, aux, delta = evaluate(x)
    np.testing.assert_array_equal(features, aux['bottleneck'])
    assert delta.shape == x.shape and float(jnp.min(jnp.abs(delta).reshape(2, -1).max(1))) > 0


# ---------------------------------------------------------------- guided sampling by config

def test_sample_mode_with_guidance_end_to_end_and_weight_zero_is_unguided(toy_model, tmp_path):
    disc = str(tmp_path / 'disc')
    args = ['--config=configs/toy2d_dg.py'] + [f'--config.{k}={v}' for k, v in {**MODEL, **DISCRIMINATOR}.items()]
    trained = run_main(*args, f'--workdir={disc}', '--mode=train_discriminator',
                       f'--config.discriminator.model_workdir={toy_model}')
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert 'held-out step 10: accuracy' in trained.stdout
    sampled = run_main(*args, f'--workdir={toy_model}', '--mode=sample',
                       f'--config.sampling.guidance.discriminator_workdir={disc}')
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert '(heun_dg, 35 NFE, 35 network and 15 gradient evaluations)' in sampled.stdout, sampled.stdout
    with np.load(os.path.join(toy_model, 'samples.npz')) as f:
        guided_cli = f['samples']

    mesh = mesh_lib.make_mesh()
    model = trained_lib.restore(_config(toy_model), toy_model, mesh)

    def samples(**guidance):
        config = _config(toy_model, **{f'sampling.guidance.{k}': v for k, v in guidance.items()})
        generator = sampling.generator(config, mesh, model.denoiser_fn)
        return generator(model.variables, 64), generator

    unguided, plain = samples()
    off, off_generator = samples(discriminator_workdir=disc, weight=0.0)
    guided, guided_generator = samples(discriminator_workdir=disc)
    np.testing.assert_array_equal(off, unguided)
    assert plain.info == off_generator.info == dict(nfe=35, network_evaluations=35, gradient_evaluations=0)
    assert guided_generator.sampler.name == 'heun_dg'
    assert guided_generator.info == dict(nfe=35, network_evaluations=35, gradient_evaluations=15)
    np.testing.assert_allclose(guided, guided_cli, rtol=1e-5, atol=1e-5)
    assert float(np.abs(guided - unguided).max()) > 1e-3
    with pytest.raises(UserError, match='no trained discriminator'):
        samples(discriminator_workdir=str(tmp_path / 'none'))
    with pytest.raises(UserError, match='boosting=True needs sampler heun'):
        sampling.generator(_config(toy_model, **{'sampling.guidance.discriminator_workdir': disc,
                                                 'sampling.guidance.boosting': True,
                                                 'sampling.sampler': 'dpmpp_2m'}), mesh, model.denoiser_fn)
