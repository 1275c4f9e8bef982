"""EDM's geometric augmentation: identity at p=0, exact flips / quarter turns / integer shifts against numpy,
the 9-column label layout and its ranges, firing rates, keys."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import augment

B, H, W, C = 6, 8, 8, 3


@pytest.fixture(scope='module')
def images():
    return np.asarray(jax.random.uniform(jax.random.key(0), (B, H, W, C), minval=-1, maxval=1))


def params_with(**values):
    params = {name: jnp.zeros(B) for name in augment.PARAM_NAMES}
    params.update({name: jnp.full(B, value, jnp.float32) for name, value in values.items()})
    return params


def test_label_layout_has_nine_columns():
    assert augment.NUM_AUGMENT_LABELS == augment.augment_dim() == len(augment.LABEL_NAMES) == 9
    labels = augment.labels(params_with(xflip=1, yflip=1, scale=0.5, rotate=math.pi / 2, aniso=2.0,
                                        aniso_angle=math.pi / 2, translate_x=0.3, translate_y=-0.4))
    np.testing.assert_allclose(labels[0], [1, 1, 0.5, -1, 1, 0, 2, 0.3, -0.4], atol=1e-6)


def test_p0_is_identity_with_zero_labels(images):
    out, labels = augment.augment(jax.random.key(1), images, p=0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(labels, np.zeros((B, 9)))
    # a traced p = 0 goes through the resampling: all-zero parameters must still be the identity
    out, labels = jax.jit(lambda key, x, p: augment.augment(key, x, p=p))(jax.random.key(1), images, 0.0)
    np.testing.assert_allclose(out, images, atol=1e-6)
    np.testing.assert_array_equal(labels, np.zeros((B, 9)))


def test_xflip_matches_numpy_and_labels_it(images):
    out, labels = jax.jit(lambda key, x: augment.augment(key, x, p=1.0, yflip=0, scale=0, rotate_frac=0, aniso=0,
                                                         translate_frac=0))(jax.random.key(2), images)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < B and np.all(np.isin(labels[:, 0], [0, 1]))
    np.testing.assert_array_equal(out[flipped], images[flipped][:, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], images[~flipped])
    np.testing.assert_array_equal(labels[:, 1:], 0)
    np.testing.assert_array_equal(augment.transform(images, params_with(xflip=1)), images[:, :, ::-1])
    np.testing.assert_array_equal(augment.transform(images, params_with(yflip=1)), images[:, ::-1])


@pytest.mark.parametrize('turns', [1, -1, 2])
def test_quarter_turns_match_rot90(images, turns):
    out = augment.transform(images, params_with(rotate=turns * math.pi / 2))
    np.testing.assert_allclose(out, np.rot90(images, turns, axes=(1, 2)), atol=1e-5)


def test_integer_translation_shifts_right_and_down(images):
    one_pixel = 1 / (W * 0.125)  # translate labels are in units of translate_frac_std * W pixels
    out = np.asarray(augment.transform(images, params_with(translate_x=one_pixel, translate_y=2 * one_pixel)))
    np.testing.assert_allclose(out[:, 2:, 1:], images[:, :-2, :-1], atol=1e-5)


def test_isotropic_scale_two_magnifies_about_the_centre():
    # a linear ramp in x: magnifying by s about the centre makes it s times steeper (bilinear is exact on ramps)
    ramp = np.broadcast_to(np.arange(W, dtype=np.float32) - (W - 1) / 2, (B, H, W))[..., None]
    out = np.asarray(augment.transform(ramp, params_with(scale=1 / 0.2)))  # s = 2**(w * scale_std) = 2
    np.testing.assert_allclose(out[:, :, 2:6, 0], ramp[:, :, 2:6, 0] / 2, atol=1e-5)


def test_labels_in_expected_ranges_and_firing_rates():
    images = jnp.zeros((4000, 4, 4, 1))
    _, labels = jax.jit(lambda key, x: augment.augment(key, x, p=0.5))(jax.random.key(3), images)
    labels = np.asarray(labels)
    assert labels.shape == (4000, 9) and labels.dtype == np.float32
    assert np.all(np.isin(labels[:, :2], [0, 1]))
    assert np.all((labels[:, 3] >= -2) & (labels[:, 3] <= 0)) and np.all(np.abs(labels[:, 4]) <= 1)
    np.testing.assert_allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, 1, atol=1e-5)
    # xflip multiplier 1e8: always enabled, flips half; others fire with probability p = 0.5
    np.testing.assert_allclose(labels[:, 0].mean(), 0.5, atol=0.04)
    np.testing.assert_allclose(labels[:, 1].mean(), 0.25, atol=0.04)
    for column in (2, 4, 5, 7):
        np.testing.assert_allclose(np.mean(labels[:, column] != 0), 0.5, atol=0.04)
    assert np.all((labels[:, 7] != 0) == (labels[:, 8] != 0))  # one gate for both translation axes
    fired = labels[:, 7] != 0
    np.testing.assert_allclose(labels[fired, 7].std(), 1, atol=0.08)  # N(0, 1) draws


def test_keys_and_consistency(images):
    run = jax.jit(lambda key, x: augment.augment(key, x, p=1.0))
    out1, labels1 = run(jax.random.key(4), images)
    out2, labels2 = run(jax.random.key(5), images)
    again, _ = run(jax.random.key(4), images)
    assert out1.shape == images.shape and out1.dtype == images.dtype
    np.testing.assert_array_equal(out1, again)
    assert not np.allclose(out1, out2) and not np.allclose(labels1, labels2)
    params = augment.sample_params(jax.random.key(4), B, p=1.0)
    np.testing.assert_allclose(augment.transform(images, params), out1, atol=1e-5)
    np.testing.assert_allclose(augment.labels(params), labels1, atol=1e-6)


def test_rejects_non_nhwc():
    with pytest.raises(ValueError, match=r'NHWC images \[B, H, W, C\]'):
        augment.augment(jax.random.key(0), jnp.zeros((8, 8, 3)), p=0.1)
    with pytest.raises(ValueError, match='augment_p must be >= 0'):
        augment.augment(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), p=-0.1)


def test_batch_sharded_over_8_devices_matches_one_device():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip('needs the 8 simulated devices of tests/conftest.py')
    images = jax.random.uniform(jax.random.key(6), (16, 8, 8, 1), minval=-1, maxval=1)
    run = lambda key, x: augment.augment(key, x, p=1.0)
    expected, expected_labels = jax.jit(run)(jax.random.key(7), images)
    mesh = Mesh(np.asarray(devices[:8]), ('data',))
    sharded = jax.device_put(images, NamedSharding(mesh, P('data')))
    out, labels = jax.jit(run, out_shardings=NamedSharding(mesh, P('data')))(jax.random.key(7), sharded)
    assert out.sharding.spec == P('data')
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(labels, expected_labels, atol=1e-6)
