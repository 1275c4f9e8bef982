"""Input pipelines: shapes, ranges, determinism by step, per-host slices, epoch permutations, streams, CIFAR-10 on
tfds mock data and its absent-data error, synthetic sets against their defining geometry."""
import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.core.errors import UserError


class IndexSource(data.ArraySource):
    """A data set whose example i is the number i: batches expose the index sequence itself."""
    name = 'index'
    shape = ()

    def __init__(self, num_examples):
        self.num_examples = num_examples

    def get(self, indices):
        return {'image': indices.astype(np.float32), 'label': indices.astype(np.int32)}


@pytest.fixture(scope='module')
def digits():
    return data.build({'name': 'digits', 'shape': (16, 16, 1), 'augment_p': 0.0})


def test_build_rejects_unknown_name_and_field():
    with pytest.raises(ValueError, match='unknown data.name .*cifar10, digits, eight_gaussians'):
        data.build({'name': 'mnist'})
    with pytest.raises(ValueError, match='data.radius is not a field'):
        data.build({'name': 'digits', 'radius': 3.0})
    with pytest.raises(ValueError, match=r'data.shape \(2,\) does not match'):
        data.build({'name': 'cifar10', 'shape': (2,)})


def test_digits_shapes_range_labels(digits):
    batch = digits.batch(0, 64, seed=0)
    assert digits.shape == (16, 16, 1) and digits.num_examples == 1500
    assert batch['image'].shape == (64, 16, 16, 1) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['image'].min() == -1.0 and batch['image'].max() > 0.9  # uses the whole range (0 and 16 occur)
    assert set(np.unique(digits.labels)) == set(range(10))
    test = data.build({'name': 'digits', 'split': 'test'})
    assert test.num_examples == 297


def test_digits_resize_is_bilinear_upsampling():
    import jax
    from sklearn.datasets import load_digits
    native = data.build({'name': 'digits', 'shape': (8, 8, 1)})
    raw = load_digits().images[:1500]
    np.testing.assert_allclose(native.images[..., 0], raw / 8 - 1, atol=1e-6)
    upsampled = data.build({'name': 'digits', 'shape': (16, 16, 1)})
    expected = jax.image.resize(raw[:20, :, :, None] / 8 - 1, (20, 16, 16, 1), method='linear')
    np.testing.assert_allclose(upsampled.images[:20], np.asarray(expected), atol=1e-5)
    with pytest.raises(ValueError, match='must be \\(R, R, 1\\)'):
        data.build({'name': 'digits', 'shape': (16, 16, 3)})


def test_digits_deterministic_by_step(digits):
    first = digits.batch(7, 32, seed=3)
    again = digits.batch(7, 32, seed=3)
    np.testing.assert_array_equal(first['image'], again['image'])
    np.testing.assert_array_equal(first['label'], again['label'])
    assert not np.array_equal(first['image'], digits.batch(8, 32, seed=3)['image'])
    assert not np.array_equal(first['image'], digits.batch(7, 32, seed=4)['image'])


@pytest.mark.parametrize('name', ['digits', 'gmm', 'two_moons'])
def test_host_slices_are_disjoint_and_union_is_global_batch(name):
    source = data.build({'name': name})
    whole = source.batch(5, 24, seed=1)
    parts = [source.batch(5, 24, seed=1, process_index=i, process_count=4) for i in range(4)]
    assert all(part['image'].shape[0] == 6 for part in parts)
    for key in ('image', 'label'):
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
    if name == 'digits':  # disjoint examples: within one epoch no index repeats
        index = IndexSource(1500)
        rows = [index.batch(5, 24, seed=1, process_index=i, process_count=4)['label'] for i in range(4)]
        assert len(np.unique(np.concatenate(rows))) == 24


def test_indivisible_batch_names_both_numbers(digits):
    with pytest.raises(ValueError, match='batch size 10 is not divisible by the process count 3'):
        digits.batch(0, 10, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match='process_index 4'):
        digits.batch(0, 8, seed=0, process_index=4, process_count=4)


def test_epochs_are_permutations_in_step_order():
    source = IndexSource(10)
    sequence = np.concatenate([source.batch(step, 4, seed=0)['label'] for step in range(10)])  # 4 epochs
    epochs = sequence.reshape(4, 10)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
    assert len({tuple(epoch) for epoch in epochs}) == 4  # each epoch reshuffled
    np.testing.assert_array_equal(epochs[1], data.epoch_permutation(10, 0, 0, 1))


def test_streams_are_independent_permutations():
    source = IndexSource(1500)
    stream0 = np.concatenate([source.batch(s, 100, seed=0, stream=0)['label'] for s in range(15)])
    stream1 = np.concatenate([source.batch(s, 100, seed=0, stream=1)['label'] for s in range(15)])
    np.testing.assert_array_equal(np.sort(stream1), np.arange(1500))
    # independent uniform permutations agree at ~1 position on average (Poisson(1)); 10+ means coupled streams
    assert np.sum(stream0 == stream1) < 10
    assert abs(np.corrcoef(stream0, stream1)[0, 1]) < 0.1


def test_cifar10_on_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=40):
        source = data.build({'name': 'cifar10', 'shape': (32, 32, 3), 'data_dir': str(tmp_path),
                             'augment_p': 0.12})
    assert source.shape == (32, 32, 3) and source.num_examples == 40
    batch = source.batch(3, 16, seed=0)
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (16,)
    assert -1.0 <= batch['image'].min() < -0.9 and 0.9 < batch['image'].max() <= 1.0
    # [-1, 1] is an exact affine image of the stored uint8 pixels
    pixels = np.rint((batch['image'] + 1) * 127.5)
    np.testing.assert_allclose((batch['image'] + 1) * 127.5, pixels, atol=1e-3)
    parts = [source.batch(3, 16, seed=0, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), batch['image'])


def test_cifar10_absent_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as error:
        data.build({'name': 'cifar10', 'data_dir': str(tmp_path)})
    message = str(error.value)
    assert '\n' not in message and str(tmp_path) in message
    assert 'tfds' in message and '--config.data.data_dir' in message


def test_synthetic_shapes_and_determinism():
    for name in ('eight_gaussians', 'two_moons', 'checkerboard', 'gmm'):
        source = data.build({'name': name, 'shape': (2,)})
        batch = source.batch(2, 32, seed=0)
        assert source.shape == (2,) and batch['image'].shape == (32, 2) and batch['image'].dtype == np.float32
        assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
        np.testing.assert_array_equal(batch['image'], source.batch(2, 32, seed=0)['image'])
        assert not np.array_equal(batch['image'], source.batch(3, 32, seed=0)['image'])
        assert not np.array_equal(batch['image'], source.batch(2, 32, seed=0, stream=1)['image'])
    with pytest.raises(ValueError, match=r'data.shape \(3,\) does not match'):
        data.build({'name': 'two_moons', 'shape': (3,)})


def test_eight_gaussians_has_eight_modes_at_the_right_places():
    source = data.build({'name': 'eight_gaussians', 'radius': 2.0, 'mode_std': 0.1})
    points = source.batch(0, 8000, seed=0)['image']
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    np.testing.assert_allclose(np.asarray(source.mixture.means), centres, atol=1e-6)
    nearest = np.argmin(np.linalg.norm(points[:, None] - centres[None], axis=-1), axis=1)
    counts = np.bincount(nearest, minlength=8)
    assert counts.min() > 800 and counts.max() < 1200  # 1000 each; a 4-sigma binomial band is +-120
    for k in range(8):
        cluster = points[nearest == k]
        np.testing.assert_allclose(cluster.mean(0), centres[k], atol=0.02)
        np.testing.assert_allclose(cluster.std(0), [0.1, 0.1], rtol=0.1)
    np.testing.assert_array_equal(source.batch(0, 8000, seed=0)['label'], nearest)


def test_gmm_in_image_shape_is_separated_and_exposes_its_mixture():
    source = data.build({'name': 'gmm', 'shape': (4, 4, 1), 'num_modes': 5, 'mode_std': 0.05})
    means = np.asarray(source.mixture.means)
    assert source.shape == (4, 4, 1) and means.shape == (5, 4, 4, 1)
    distances = np.linalg.norm(means.reshape(5, 1, -1) - means.reshape(1, 5, -1), axis=-1)
    assert distances[~np.eye(5, dtype=bool)].min() >= 8 * 0.05
    batch = source.batch(0, 2000, seed=0)
    for k in range(5):
        members = batch['image'][batch['label'] == k]
        assert len(members) > 300
        np.testing.assert_allclose(members.mean(0), means[k], atol=0.02)
    with pytest.raises(ValueError, match='cannot place data.num_modes=50'):
        data.build({'name': 'gmm', 'shape': (2,), 'num_modes': 50, 'mode_std': 0.2})


def test_two_moons_and_checkerboard_geometry():
    moons = data.build({'name': 'two_moons', 'noise': 0.0}).batch(0, 1000, seed=0)
    centre = np.where(moons['label'][:, None] == 0, [-0.5, -0.25], [0.5, 0.25])
    np.testing.assert_allclose(np.linalg.norm(moons['image'] - centre, axis=1), 1.0, atol=1e-5)
    upper_side = moons['image'][:, 1] - centre[:, 1]
    assert np.all(np.where(moons['label'] == 0, upper_side >= -1e-6, upper_side <= 1e-6))
    board = data.build({'name': 'checkerboard'}).batch(0, 4000, seed=0)['image']
    assert np.all(np.abs(board) <= 2.0)
    squares = np.floor(board).astype(int) + 2
    assert np.all((squares[:, 0] + squares[:, 1]) % 2 == 0)
    assert len({tuple(s) for s in squares}) == 8
