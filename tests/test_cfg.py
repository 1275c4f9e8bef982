"""Classifier-free guidance and autoguidance as denoiser transforms, on exact ground truth: class-conditional
Gaussian mixtures whose noisy log densities are known in closed form, so the guided denoiser must equal
x + sigma^2 grad_x [(1 - w) log p_sigma(x | unguided) + w log p_sigma(x | guiding)] (Tweedie: D = x + sigma^2 grad log p),
and the network evaluations every sampler counts must equal the calls made."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from jaxdiff.core import analytic, guidance, samplers, schedules

MEANS = np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.0]])
STDS = np.array([0.3, 0.5, 0.4, 0.6])
CLASS_OF = np.array([0, 0, 1, 2])          # component -> class
WEIGHTS = np.array([0.2, 0.3, 0.25, 0.25])
NUM_CLASSES = 3


def log_density(x, sigma, components):
    """log p_sigma(x) of the mixture restricted to `components` (weights renormalised): N(mu_k, (s_k^2 + sigma^2) I)."""
    w = WEIGHTS[components] / WEIGHTS[components].sum()
    var = STDS[components] ** 2 + sigma ** 2
    sq = jnp.sum((x[None] - MEANS[components]) ** 2, -1)
    return logsumexp(jnp.log(w) - 0.5 * sq / var - jnp.log(2 * jnp.pi * var))


def conditional_denoiser_of(labels):
    """Exact D(x, sigma, c) for one-hot rows of `labels` [N, C]; the all-zero row is the unconditional mixture."""
    parts = [analytic.GaussianMixture(MEANS[CLASS_OF == c], STDS[CLASS_OF == c], WEIGHTS[CLASS_OF == c])
             for c in range(NUM_CLASSES)]
    full = analytic.GaussianMixture(MEANS, STDS, WEIGHTS)

    def denoiser(x, sigma):
        out = full.denoiser(x, sigma) * (1 - jnp.sum(labels, -1, keepdims=True))
        for c, part in enumerate(parts):
            out = out + labels[:, c:c + 1] * part.denoiser(x, sigma)
        return out
    return denoiser


@pytest.fixture(autouse=True)
def float64():
    jax.config.update('jax_enable_x64', True)
    yield
    jax.config.update('jax_enable_x64', False)


def points(n=6):
    x = jax.random.normal(jax.random.key(0), (n, 2), jnp.float64) * 2.0
    labels = jax.nn.one_hot(jnp.arange(n) % NUM_CLASSES, NUM_CLASSES, dtype=jnp.float64)
    return x, labels


@pytest.mark.parametrize('w', [0.0, 1.0, 2.5])
def test_cfg_is_the_score_of_the_tilted_density(w):
    x, labels = points()
    guided = guidance.classifier_free_guided(conditional_denoiser_of, labels, weight=w)
    for sigma in (0.1, 1.0, 5.0):
        expected = []
        for xi, c in zip(x, np.argmax(labels, -1)):
            tilted = lambda y: ((1 - w) * log_density(y, sigma, np.arange(4))
                                + w * log_density(y, sigma, np.flatnonzero(CLASS_OF == c)))
            expected.append(xi + sigma ** 2 * jax.grad(tilted)(xi))
        np.testing.assert_allclose(guided(x, sigma), np.stack(expected), rtol=1e-9, atol=1e-9)
    if w == 1.0:   # w = 1: the conditional model itself
        np.testing.assert_allclose(guided(x, 0.7), conditional_denoiser_of(labels)(x, 0.7), rtol=1e-12)


def test_cfg_interval_guides_inside_only_and_counts_two_evaluations_there():
    x, labels = points()
    guided = guidance.classifier_free_guided(conditional_denoiser_of, labels, weight=3.0, sigma_lo=0.5, sigma_hi=2.0)
    plain = conditional_denoiser_of(labels)
    np.testing.assert_allclose(guided(x, 0.3), plain(x, 0.3), rtol=1e-12)
    np.testing.assert_allclose(guided(x, 5.0), plain(x, 5.0), rtol=1e-12)
    assert float(jnp.max(jnp.abs(guided(x, 1.0) - plain(x, 1.0)))) > 1e-3
    # per example: sigma [B] half inside
    sigma = jnp.where(jnp.arange(6) < 3, 1.0, 4.0)
    mixed = guided(x, sigma)
    np.testing.assert_allclose(mixed[3:], plain(x, 4.0)[3:], rtol=1e-12)
    np.testing.assert_allclose(mixed[:3], guided(x, 1.0)[:3], rtol=1e-12)
    assert tuple(map(int, guided.evaluations(x, 1.0))) == (2, 0)
    assert tuple(map(int, guided.evaluations(x, 3.0))) == (1, 0)


def counting(denoiser_of, calls):
    """denoiser_of whose denoisers record the batch size of every call (Python side, eager runs only)."""
    def of(labels):
        inner = denoiser_of(labels)

        def denoiser(x, sigma):
            calls.append(x.shape[0])
            return inner(x, sigma)
        return denoiser
    return of


@pytest.mark.parametrize('name', ['heun', 'dpmpp_2m', 'euler'])
def test_samplers_count_the_network_evaluations_of_cfg(name):
    x, labels = points()
    sigmas = schedules.get('edm', num_steps=8, sigma_min=0.002, sigma_max=80.0)
    calls = []
    guided = guidance.classifier_free_guided(counting(conditional_denoiser_of, calls), labels, weight=2.0,
                                             sigma_lo=0.3, sigma_hi=5.0)
    with jax.disable_jit():
        x0, info = samplers.get(name)(guided, 10.0 * x, sigmas)
    batch = x.shape[0]
    # each call ran exactly one network call: of B rows (conditional alone) or 2B rows (both evaluations)
    assert set(calls) <= {batch, 2 * batch}
    assert int(info['network_evaluations']) == sum(c // batch for c in calls)
    assert info['nfe'] == len(calls) and int(info['gradient_evaluations']) == 0
    assert batch in calls and 2 * batch in calls          # the interval covers part of the grid
    jitted = jax.jit(lambda x: samplers.get(name)(guided, x, sigmas)[1]['network_evaluations'])
    assert int(jitted(10.0 * x)) == int(info['network_evaluations'])


@pytest.mark.parametrize('w', [1.0, 2.0])
def test_autoguidance_is_the_score_of_good_tilted_by_bad(w):
    good = analytic.GaussianMixture(MEANS, STDS, WEIGHTS)
    bad_stds = STDS * 2.0
    bad = analytic.GaussianMixture(MEANS, bad_stds, WEIGHTS)
    guided = guidance.autoguided(good.denoiser, bad.denoiser, weight=w, sigma_lo=0.05, sigma_hi=10.0)
    x, _ = points()

    def log_bad(y, sigma):
        var = bad_stds ** 2 + sigma ** 2
        sq = jnp.sum((y[None] - MEANS) ** 2, -1)
        return logsumexp(jnp.log(WEIGHTS) - 0.5 * sq / var - jnp.log(2 * jnp.pi * var))

    for sigma in (0.2, 2.0):
        tilted = lambda y: w * log_density(y, sigma, np.arange(4)) + (1 - w) * log_bad(y, sigma)
        expected = jax.vmap(lambda xi: xi + sigma ** 2 * jax.grad(tilted)(xi))(x)
        np.testing.assert_allclose(guided(x, sigma), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(guided(x, 20.0), good.denoiser(x, 20.0), rtol=1e-12)     # outside the interval
    assert tuple(map(int, guided.evaluations(x, 1.0))) == (2, 0)
    assert tuple(map(int, guided.evaluations(x, 20.0))) == (1, 0)


def test_bad_guidance_arguments_are_errors():
    x, labels = points()
    with pytest.raises(ValueError, match='class labels'):
        guidance.classifier_free_guided(conditional_denoiser_of, None, weight=2.0)
    with pytest.raises(ValueError, match='sigma_lo <= sigma_hi'):
        guidance.autoguided(lambda x, s: x, lambda x, s: x, weight=2.0, sigma_lo=2.0, sigma_hi=1.0)


# ---------------------------------------------------------------- label dropout and the config path

def test_label_dropout_draws_per_example_of_the_global_batch():
    from jaxdiff.drivers import train_step
    labels = jax.nn.one_hot(jnp.arange(4000) % 10, 10)
    key = jax.random.key(3)
    kept = train_step.drop_labels(labels, key, 0.1, {})
    dropped = np.asarray(jnp.sum(kept, -1) == 0)
    assert 300 < dropped.sum() < 500                                   # Binomial(4000, 0.1): 400 +- 19
    np.testing.assert_array_equal(np.asarray(kept)[~dropped], np.asarray(labels)[~dropped])
    rows = jnp.arange(1000, 1500)                                      # one device's rows of the global batch
    part = train_step.drop_labels(labels[rows], key, 0.1, {'index': rows, 'global_size': 4000})
    np.testing.assert_array_equal(part, kept[rows])
    np.testing.assert_array_equal(train_step.drop_labels(labels, key, 0.0, {}), labels)


TINY = ['--config=configs/digits_cfg.py', '--config.model.model_channels=8', '--config.training.batch_size=8',
        '--config.training.total_images=16', '--config.training.sample_every_steps=0',
        '--config.sampling.num_samples=8', '--config.sampling.batch_size=8',
        '--config.sampling.schedule_options.num_steps=6']


def test_cfg_and_autoguidance_from_the_command_line(tmp_path):
    from test_cli import assert_one_line_error, run_main
    jax.config.update('jax_enable_x64', False)
    workdir = str(tmp_path / 'cfg')
    trained = run_main(*TINY, f'--workdir={workdir}')
    assert trained.returncode == 0, trained.stderr[-3000:]

    def sample(*overrides):
        result = run_main(*TINY, f'--workdir={workdir}', '--mode=sample', '--config.sampling.class_label=3',
                          *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        with np.load(f'{workdir}/samples.npz') as f:
            return {name: f[name] for name in f.files}, result.stdout

    guided, stdout = sample()
    # 6 EDM steps: 11 denoiser calls at t_hat = 80, 28.4, 9.3, 2.7, 0.66, 0.13 and the second evaluations at the
    # next points; the interval [0.05, 20] holds 4 of the first and 4 of the second: 8 calls of two evaluations
    sigmas = guided['sigmas']
    inside = lambda s: (s >= 0.05) & (s <= 20.0)
    calls_inside = int(inside(sigmas[:-1]).sum() + inside(sigmas[1:-1]).sum())
    assert int(guided['nfe']) == 11 and int(guided['network_evaluations']) == 11 + calls_inside
    assert f'11 NFE, {11 + calls_inside} network and 0 gradient evaluations' in stdout, stdout
    assert np.all(guided['labels'] == 3)
    unguided, _ = sample('--config.sampling.guidance.weight=1.0')                  # w = 1: the conditional model
    plain, _ = sample('--config.sampling.guidance.name=autoguidance', f'--config.sampling.guidance.workdir={workdir}')
    # autoguidance by the model itself: D + w (D - D) = D
    np.testing.assert_allclose(plain['samples'], unguided['samples'], rtol=1e-5, atol=1e-5)
    assert int(plain['network_evaluations']) == 11 + calls_inside
    unknown = run_main(*TINY, f'--workdir={workdir}', '--mode=sample', '--config.sampling.guidance.name=cgf')
    assert_one_line_error(unknown, "config.sampling.guidance.name='cgf' is not a registered transform",
                          'autoguidance, cfg, discriminator')


def test_guidance_config_errors_are_one_line():
    from jaxdiff.core.errors import UserError
    from jaxdiff.drivers import config_files, model_guidance, sampling
    config = config_files.named('digits_cfg')
    with config.unlocked():
        config.model.label_dim = 0
    with pytest.raises(UserError, match="guidance.name='cfg' needs a class-conditional model"):
        model_guidance.classifier_free(config, None, None, weight=2.0)
    with pytest.raises(UserError, match=r'interval=\[3, 1\] needs 0 <= sigma_lo <= sigma_hi'):
        model_guidance.classifier_free(config_files.named('digits_cfg'), None, None, interval=[3, 1])
    with pytest.raises(UserError, match="bad model's workdir"):
        model_guidance.autoguidance(config, None, None)
    other = config_files.named('digits_cfg')
    with pytest.raises(UserError, match=r'the bad model in W has model.label_dim=0, this model 10'):
        model_guidance.autoguidance(other, None, None, workdir='W', config_file='configs/quickstart.py')
    config = config_files.named('digits_cfg', **{'sampling.guidance': dict(name='cfg', wieght=2.0)})
    with pytest.raises(UserError, match=r'guidance \(cfg\) has no field wieght; valid fields: name, weight, '
                                        r'interval'):
        sampling.check(config)


def test_a_class_label_outside_the_model_is_one_line():
    from jaxdiff.core.errors import UserError
    from jaxdiff.drivers import config_files, generate, sampling
    config = config_files.named('digits_cfg', **{'sampling.class_label': 12})
    with pytest.raises(UserError, match=r'class_label=12 is not a class of this model \(model.label_dim=10\)'):
        sampling.generator(config, None, None)
    with pytest.raises(ValueError, match='class_label=12 is not a class of a model with label_dim=10'):
        generate.Generator(None, None, None, sample_shape=(2,), batch_size=2, seed=0, mesh=None, label_dim=10,
                           class_label=12)
