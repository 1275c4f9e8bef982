"""stf.target against the float64 formula, the exact empirical posterior mean, its limits, chunking, the sharded
global-reference form on 8 simulated devices, variance reduction and the absence of gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import sigma_of_c_noise
from jaxdiff.core import analytic, precond, stf
from jaxdiff.drivers.config_files import named as load_config   # configs/NAME.py with dotted overrides
from jaxdiff.drivers.mesh import make_mesh


def formula(x, sigma, reference):
    """Xu et al. 2023 Eq. 3 in x0-space, written directly in float64: sum_j softmax_j(-|x - y_j|^2 / 2 sigma^2) y_j."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(reference, np.float64).reshape(len(reference), -1)
    sigma = np.broadcast_to(np.asarray(sigma, np.float64).reshape(-1), (len(x),))
    logits = -((x[:, None] - y[None]) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    return (w / w.sum(1, keepdims=True)) @ y


def noisy_batch(rng, reference, batch_size, sigma):
    """x_i = y_i + sigma_i eps_i for the first `batch_size` reference rows (the SPEC's layout)."""
    eps = rng.normal(size=(batch_size,) + reference.shape[1:]).astype(np.float32)
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), (batch_size,))
    return reference[:batch_size] + sigma.reshape((-1,) + (1,) * (reference.ndim - 1)) * eps


def target_local(x_noisy, sigma, reference, *, axis_name='data', chunk_size=None):
    """`stf.target` against the *global* reference, called per device inside `shard_map` over `axis_name`.

    Each device holds a shard of the minibatch ([B/n, ...]) and of the reference ([R/n, ...]). The minibatch is
    gathered (B x D, instead of the reference, R x D), each device streams the partial sums of every sample against
    its reference shard (`analytic.empirical_sums`), and the partial sums are merged across devices: pmax of the
    running max, psum of the rescaled sums, psum_scatter of the rescaled weighted image sums.
    """
    x_noisy, reference = jnp.asarray(x_noisy), jnp.asarray(reference)
    local_batch = x_noisy.shape[0]
    sigma = precond.per_example(jnp.asarray(sigma, x_noisy.dtype), x_noisy).reshape(local_batch)
    x_all = jax.lax.all_gather(x_noisy.reshape(local_batch, -1), axis_name, axis=0, tiled=True)     # [B, D]
    sigma_all = jax.lax.all_gather(sigma, axis_name, axis=0, tiled=True)                            # [B]
    m, s, acc = analytic.empirical_sums(x_all, sigma_all, reference.reshape(reference.shape[0], -1), chunk_size)
    m_global = jax.lax.pmax(m, axis_name)                                        # `analytic.merge_sums` across devices
    rescale = jnp.exp(m - m_global)
    s_global = jax.lax.psum(s * rescale, axis_name)                              # [B]
    acc_mine = jax.lax.psum_scatter(acc * rescale[:, None], axis_name, scatter_dimension=0, tiled=True)
    start = jax.lax.axis_index(axis_name) * local_batch
    s_mine = jax.lax.dynamic_slice_in_dim(s_global, start, local_batch)
    return (acc_mine / s_mine[:, None]).reshape(x_noisy.shape)


def target_sharded(x_noisy, sigma, reference, *, mesh, axis_name='data', chunk_size=None):
    """`target_local` under `shard_map` with the minibatch and the reference both sharded over `axis_name`."""
    num_devices = mesh.shape[axis_name]
    batch_size, num_ref = jnp.shape(x_noisy)[0], jnp.shape(reference)[0]
    if batch_size % num_devices or num_ref % num_devices:
        raise ValueError(f'stf: batch size {batch_size} and reference size {num_ref} must be multiples of the '
                         f'{num_devices} devices on mesh axis {axis_name!r}')
    sigma = precond.per_example(sigma, x_noisy).reshape(batch_size)                  # scalar or [B] -> [B]
    spec = PartitionSpec(axis_name)
    if mesh.axis_types[mesh.axis_names.index(axis_name)] == jax.sharding.AxisType.Explicit:
        # sharding-in-types meshes (the `jax.make_mesh` default) need the inputs laid out as in_specs say
        x_noisy, sigma, reference = jax.reshard((x_noisy, sigma, reference), NamedSharding(mesh, spec))
    local = functools.partial(target_local, axis_name=axis_name, chunk_size=chunk_size)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(x_noisy, sigma, reference)


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    reference = rng.uniform(-1, 1, size=(48, 4, 4, 3)).astype(np.float32)
    sigma = np.exp(rng.uniform(np.log(0.05), np.log(20.0), size=16)).astype(np.float32)
    return noisy_batch(rng, reference, 16, sigma), sigma, reference


@pytest.mark.parametrize('chunk_size', [None, 1, 5, 16, 48, 100])
def test_matches_float64_formula_chunked_or_not(images, chunk_size):
    x, sigma, reference = images
    got = jax.jit(lambda *a: stf.target(*a, chunk_size=chunk_size))(x, sigma, reference)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got).reshape(len(x), -1), formula(x, sigma, reference), atol=2e-6)


def test_chunked_equals_unchunked_on_points_with_scalar_sigma():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(1000, 2)).astype(np.float32)
    x = noisy_batch(rng, reference, 32, 0.3)
    unchunked = stf.target(x, 0.3, reference)
    for chunk_size in (7, 128, 999):
        np.testing.assert_allclose(stf.target(x, 0.3, reference, chunk_size=chunk_size), unchunked, atol=2e-6)
    np.testing.assert_allclose(unchunked, formula(x, 0.3, reference), atol=2e-6)


def test_whole_dataset_reference_equals_exact_posterior_mean():
    rng = np.random.default_rng(2)
    data = rng.uniform(-1, 1, size=(300, 8, 8, 1)).astype(np.float32)
    sigma = np.geomspace(0.02, 50.0, 24).astype(np.float32)
    x = noisy_batch(rng, data, 24, sigma)
    exact = analytic.Empirical(data, chunk_size=64).denoiser(jnp.asarray(x), jnp.asarray(sigma))
    np.testing.assert_allclose(stf.target(x, sigma, data, chunk_size=100), exact, atol=1e-5)


def test_small_sigma_gives_own_image_and_large_sigma_gives_reference_mean(images):
    _, _, reference = images
    rng = np.random.default_rng(3)
    x_small = noisy_batch(rng, reference, 16, 1e-3)
    np.testing.assert_allclose(stf.target(x_small, 1e-3, reference), reference[:16], atol=1e-6)
    x_large = noisy_batch(rng, reference, 16, 1e4)
    mean = np.broadcast_to(reference.mean(0), x_large.shape)
    np.testing.assert_allclose(stf.target(x_large, 1e4, reference), mean, atol=1e-3)


@pytest.mark.parametrize('explicit_axes', [False, True])
@pytest.mark.parametrize('chunk_size', [None, 2])
def test_sharded_global_reference_equals_single_device(images, explicit_axes, chunk_size):
    assert jax.device_count() == 8
    x, sigma, reference = images
    mesh = jax.make_mesh((8,), ('data',)) if explicit_axes else make_mesh()
    single = stf.target(x, sigma, reference)
    sharded = jax.jit(lambda *a: target_sharded(*a, mesh=mesh, chunk_size=chunk_size))(x, sigma, reference)
    assert sharded.sharding.spec[0] == 'data'
    # every device sees all R=48 reference rows: a per-device reference (6 rows each) would differ by O(1)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=2e-6)


def test_target_local_inside_shard_map_with_scalar_sigma(images):
    x, _, reference = images
    mesh = make_mesh()
    spec = PartitionSpec('data')
    local = lambda a, c: target_local(a, 0.7, c, axis_name='data')
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec))(x, reference)
    np.testing.assert_allclose(np.asarray(sharded).reshape(len(x), -1), formula(x, 0.7, reference), atol=2e-6)


def test_sharded_rejects_sizes_that_do_not_split(images):
    x, sigma, reference = images
    with pytest.raises(ValueError, match='reference size 44'):
        target_sharded(x, sigma, reference[:44], mesh=make_mesh())


def test_bad_shapes_are_one_line_errors(images):
    x, sigma, reference = images
    with pytest.raises(ValueError, match='same per-example shape'):
        stf.target(x, sigma, reference[:, :2])
    with pytest.raises(ValueError, match='sigma has shape'):
        stf.target(x, sigma[:3], reference)


def test_no_gradient_flows_through_the_target(images):
    x, sigma, reference = images
    grads = jax.grad(lambda *a: jnp.sum(stf.target(*a) ** 2), argnums=(0, 1, 2))(x, sigma, reference)
    for g in grads:
        assert np.all(np.asarray(g) == 0)
    # the loss gradient w.r.t. the prediction is unchanged: only the target is detached
    pred_grad = jax.grad(lambda p: jnp.sum((p - stf.target(x, sigma, reference)) ** 2))(jnp.zeros_like(x))
    np.testing.assert_allclose(pred_grad, -2 * stf.target(x, sigma, reference), rtol=1e-6)


def test_drawn_own_image_follows_the_exact_posterior():
    """y_1 of draw_reference_given_x is drawn from p(y | x): its average over draws is the exact posterior mean."""
    rng = np.random.default_rng(4)
    data = rng.uniform(-1, 1, size=(40, 6)).astype(np.float32)
    x = noisy_batch(rng, data, 4, 0.8)
    draws = jax.vmap(lambda k: stf.draw_reference_given_x(k, x, 0.8, data, 3))(
        jax.random.split(jax.random.key(0), 2000))                                     # [K, B, 3, 6]
    assert draws.shape == (2000, 4, 3, 6)
    exact = analytic.Empirical(data).denoiser(jnp.asarray(x), 0.8)
    np.testing.assert_allclose(draws[:, :, 0].mean(0), exact, atol=0.06)              # std of the mean <= 0.013


def test_stf_target_has_lower_variance_than_the_plain_target_at_intermediate_sigma():
    """Trace of Cov[target | x] (Xu et al. 2023, Sec. 4) on a fixed dataset: plain target y_1 ~ p(y|x) vs STF, R=32."""
    rng = np.random.default_rng(5)
    data = rng.uniform(-1, 1, size=(64, 8)).astype(np.float32)
    sigma = 1.0                                              # many data points have comparable posterior weight
    x = noisy_batch(rng, data, 16, sigma)
    keys = jax.random.split(jax.random.key(1), 256)

    def trace_cov(reference_size):
        def one(key):
            reference = stf.draw_reference_given_x(key, x, sigma, data, reference_size)   # [B, R, 8]
            return jax.vmap(lambda xi, ri: stf.target(xi[None], sigma, ri)[0])(x, reference)
        targets = jax.vmap(one)(keys)                                                    # [K, B, 8]
        return float(jnp.mean(jnp.sum(jnp.var(targets, axis=0), axis=-1)))

    plain, stable = trace_cov(1), trace_cov(32)
    assert plain > 0.5                                       # the one-sample target really is noisy here
    assert stable < 0.25 * plain, (plain, stable)


# ---------------------------------------------------------------- STF in the loss and the training loop

@pytest.mark.parametrize('parameterization', ['edm', 'vp', 've'])
def test_stf_loss_is_zero_for_the_exact_denoiser_in_every_parameterization(parameterization):
    """With the whole data set as reference, the STF target IS the exact posterior mean, so a network whose D is
    analytic.Empirical's denoiser has zero STF loss, and positive loss with the plain target. This checks that
    the target composes with EDM, VP and VE preconditioning (the authors' VE ignores STF, their VP crashes); the
    loss is also identical with the batch sharded over 8 devices (the reference is global under jit)."""
    from jaxdiff.core import losses
    rng = np.random.default_rng(6)
    data = rng.uniform(-1, 1, size=(32, 4, 4, 1)).astype(np.float32)
    exact = analytic.Empirical(data).denoiser
    results = {}
    for target in ('stf', 'x0'):
        pieces = losses.build(parameterization=parameterization, target=target, reference_size=32)

        def network(params, x_in, c_noise, batch, key):
            sigma = sigma_of_c_noise(parameterization, c_noise)
            c = pieces.parameterization.precond(sigma)
            x = x_in / c.c_in.reshape(-1, 1, 1, 1)
            return (exact(x, sigma) - c.c_skip.reshape(-1, 1, 1, 1) * x) / c.c_out.reshape(-1, 1, 1, 1)
        loss = jax.jit(losses.make_loss(network, pieces))
        batch = {'image': data[:16], 'reference': data, 'label': np.zeros(16, np.int32)}
        results[target] = float(loss(None, batch, jax.random.key(0))[0])
        if target == 'stf' and parameterization == 'edm':
            sharded = jax.device_put(batch, jax.sharding.NamedSharding(make_mesh(), PartitionSpec('data')))
            np.testing.assert_allclose(float(loss(None, sharded, jax.random.key(0))[0]), results['stf'],
                                       rtol=1e-4, atol=1e-9)
    assert results['stf'] < 1e-6 * results['x0'], results


def test_stf_target_needs_a_reference_size():
    from jaxdiff.core import losses
    with pytest.raises(ValueError, match='loss.reference_size'):
        losses.build(target='stf')


def test_reference_batch_is_the_minibatch_then_independently_augmented_extras():
    from jaxdiff.drivers import train_step
    rng = np.random.default_rng(7)
    batch = {'image': jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32),
             'reference_extra': jnp.asarray(rng.uniform(-1, 1, (24, 8, 8, 1)), jnp.float32)}
    plain = stf.prepare_reference(batch, jax.random.key(0), None)
    assert set(plain) == {'image', 'reference'}
    np.testing.assert_array_equal(plain['reference'], np.concatenate([batch['image'], batch['reference_extra']]))
    augmented = stf.prepare_reference(batch, jax.random.key(0), train_step.augment_fn({'p': 1.0}))['reference']
    np.testing.assert_array_equal(augmented[:8], batch['image'])            # the step augmented these already
    changed = np.abs(np.asarray(augmented[8:]) - np.asarray(batch['reference_extra'])).max(axis=(1, 2, 3)) > 1e-3
    assert changed.mean() > 0.5                                            # each extra image gets its own transform


def check_reference_size(config, mesh):
    """The STF loss's config check (a losses.Hooks.check), as the training mode calls it."""
    from jaxdiff.core import losses
    losses.build(**config.loss).check(batch_size=config.training.batch_size, num_devices=mesh.devices.size)


@pytest.mark.parametrize('reference_size, message', [(16, 'must be an integer >= training.batch_size=32'),
                                                     (100, 'not divisible by the number of devices')])
def test_bad_reference_sizes_are_one_line_errors(reference_size, message):
    from jaxdiff.core.errors import UserError
    config = load_config('digits_stf', **{'loss.reference_size': reference_size, 'training.batch_size': 32})
    with pytest.raises(UserError, match=message) as error:
        check_reference_size(config, make_mesh())
    assert 'config.loss.reference_size' in str(error.value) and '\n' not in str(error.value)
    assert check_reference_size(load_config('quickstart'), make_mesh()) is None


TINY_MODEL = dict(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.0)
FEW_STEPS = {'training.batch_size': 16, 'loss.reference_size': 64, 'training.total_images': 32,
             'training.log_every_steps': 1, 'sampling.schedule_options.num_steps': 2, 'sampling.num_samples': 8,
             'sampling.batch_size': 8}


def test_digits_stf_trains_and_samples(tmp_path):
    from jaxdiff.modes import train
    config = load_config('digits_stf', **FEW_STEPS)
    config.model.update(TINY_MODEL)
    state = train.run(config, str(tmp_path))
    assert int(state.step) == 2
    assert np.isfinite(jax.tree.leaves(state.params)[0]).all()
    assert list((tmp_path / 'samples').glob('step_*.png'))


def test_cifar_stf_without_data_fails_at_once_with_instructions(tmp_path):
    from jaxdiff.modes import train
    from jaxdiff.core.errors import UserError
    config = load_config('cifar_stf', **{'data.data_dir': str(tmp_path / 'no_cifar')})
    with pytest.raises(UserError, match='CIFAR-10.*not found.*data_dir'):
        train.run(config, str(tmp_path / 'run'))


def test_cifar_stf_runs_a_few_steps_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    from jaxdiff.modes import train
    config = load_config('cifar_stf', **{**FEW_STEPS, 'data.data_dir': str(tmp_path / 'data')})
    config.model.update(TINY_MODEL)
    with tfds.testing.mock_data(num_examples=96):
        state = train.run(config, str(tmp_path / 'run'))
    assert int(state.step) == 2
    assert np.isfinite(jax.tree.leaves(state.params)[0]).all()
