"""FID / KID: the Inception network against pytorch-fid, the torch weight reader, streaming statistics, KID.

The comparison with pytorch-fid runs when torch and pytorch-fid are installed and is skipped otherwise:

    pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu && pip install pytorch-fid

(or `pip install -e '.[fid]'`). It builds pytorch-fid's InceptionV3 on random weights written by `torch.save`, so
no download is needed; it compiles the full network once at batch 2 (slow: tens of seconds on a CPU).
"""
import io
import os

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxdiff.drivers import fid
from jaxdiff.core import metrics
from jaxdiff.convert import inception as convert_inception
from jaxdiff.convert import torch_file
from jaxdiff.core.errors import UserError
from jaxdiff.models import inception


def test_inception_variable_names_and_count():
    shapes = inception.variable_shapes()
    names = {convert_inception.torch_name(c, p) for c, tree in shapes.items() for p in flatten_dict(tree)}
    # A few literal names of pytorch-fid's FID Inception (torchvision's Inception3 layout).
    for name in ('Conv2d_1a_3x3.conv.weight', 'Conv2d_4a_3x3.bn.running_var', 'Mixed_5b.branch_pool.conv.weight',
                 'Mixed_6b.branch7x7dbl_5.bn.weight', 'Mixed_7a.branch7x7x3_4.conv.weight',
                 'Mixed_7c.branch3x3dbl_3b.bn.running_mean'):
        assert name in names
    params = shapes['params']
    assert params['Conv2d_1a_3x3']['conv']['kernel'].shape == (3, 3, 3, 32)
    assert params['Mixed_7c']['branch_pool']['conv']['kernel'].shape == (1, 1, 2048, 192)
    # 94 BasicConvs; 21,785,568 parameters in torchvision's Inception3 without fc and AuxLogits (23.8M - 2.05M fc
    # - the aux head), counting BatchNorm's scale and bias.
    assert sum(1 for p in flatten_dict(params) if p[-1] == 'kernel') == 94
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 21_785_568


def test_torch_reader_reads_torch_save_zip_and_legacy(tmp_path):
    torch = pytest.importorskip('torch')
    state = {'a.weight': torch.randn(4, 3, 2, 2), 'b.running_var': torch.rand(5),
             'b.num_batches_tracked': torch.tensor(3), 'view': torch.arange(12.).reshape(3, 4).t()[1:],
             'half': torch.randn(3).half(), 'bf16': torch.randn(2, 2).bfloat16()}
    for new_format in (True, False):
        path = tmp_path / f'state_{new_format}.pth'
        torch.save(state, path, _use_new_zipfile_serialization=new_format)
        loaded = torch_file.load(path)
        assert list(loaded) == list(state)
        for name, tensor in state.items():
            expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
            assert loaded[name].shape == expected.shape, name
            np.testing.assert_array_equal(np.asarray(loaded[name], expected.dtype), expected, err_msg=name)
        assert loaded['half'].dtype == np.float16 and loaded['b.num_batches_tracked'].dtype == np.int64


def test_torch_reader_refuses_code():
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    with pytest.raises(UserError, match='refuses to load'):
        torch_file.Unpickler(io.BytesIO(pickle.dumps({'x': Evil()}))).load()


def test_missing_weights_is_one_line_naming_file_and_url(tmp_path):
    missing = tmp_path / 'nowhere.pth'
    with pytest.raises(UserError) as error:
        convert_inception.load(missing)
    message = str(error.value)
    assert '\n' not in message and str(missing) in message
    assert convert_inception.WEIGHTS_FILE in message and convert_inception.WEIGHTS_URL in message


def test_npz_weights_round_trip(tmp_path):
    state = convert_inception.random_state_dict()
    path = tmp_path / 'weights.npz'
    np.savez(path, **state)
    variables = convert_inception.load(path)
    assert variables['params']['Mixed_6a']['branch3x3']['conv']['kernel'].shape == (3, 3, 288, 384)
    np.testing.assert_array_equal(variables['batch_stats']['Mixed_5b']['branch1x1']['bn']['var'],
                                  state['Mixed_5b.branch1x1.bn.running_var'])
    np.testing.assert_array_equal(variables['params']['Conv2d_2a_3x3']['conv']['kernel'],
                                  state['Conv2d_2a_3x3.conv.weight'].transpose(2, 3, 1, 0))
    again = tmp_path / 'again.npz'
    convert_inception.save_npz(variables, again)
    with np.load(again) as written:
        for name in written.files:
            np.testing.assert_array_equal(written[name], state[name])
    del state['Mixed_7b.branch1x1.bn.weight']
    np.savez(path, **state)
    with pytest.raises(UserError, match='missing'):
        convert_inception.load(path)


def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip('torch')
    x = np.random.default_rng(0).normal(size=(2, 3, 11, 7)).astype(np.float32)
    for size in (299, 5):
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode='bilinear',
                                                   align_corners=False).numpy()
        got = np.asarray(inception.resize_bilinear(x.transpose(0, 2, 3, 1), size)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_inception_features_match_pytorch_fid(tmp_path, monkeypatch):  # slow: compiles Inception-v3 (batch 2)
    torch = pytest.importorskip('torch')
    pytorch_fid_inception = pytest.importorskip('pytorch_fid.inception')
    state = convert_inception.random_state_dict()
    path = tmp_path / convert_inception.WEIGHTS_FILE
    torch.save({name: torch.from_numpy(value) for name, value in state.items()}, path)
    # pytorch-fid downloads its weights; hand it the file written above instead.
    monkeypatch.setattr(pytorch_fid_inception, 'load_state_dict_from_url',
                        lambda *args, **kwargs: torch.load(path))
    reference = pytorch_fid_inception.InceptionV3([3]).eval()

    # 8-bit images, as saved samples and data sets are: pytorch-fid reads u / 255, jaxdiff u / 127.5 - 1 (its
    # uint8 quantization then changes nothing).
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels.transpose(0, 3, 1, 2) / 255))[0].numpy()[:, :, 0, 0]
    feature_fn = fid.inception_feature_fn(path)
    got = np.asarray(feature_fn(pixels / 127.5 - 1))
    assert got.shape == (2, 2048)
    assert np.abs(expected).max() > 1e-2  # the random network is not degenerate
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, (257, 16)) @ rng.normal(size=(16, 16))
    stats = fid.RunningStatistics()
    for start, stop in ((0, 1), (1, 100), (100, 101), (101, 257)):
        stats.update(features[start:stop])
    mu, sigma = metrics.gaussian_statistics(features)
    assert stats.count == 257
    np.testing.assert_allclose(stats.mean, mu, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(stats.covariance, sigma, rtol=1e-12, atol=1e-12)
    other = fid.RunningStatistics().update(features[::2])
    assert fid.frechet_distance(stats, (mu, sigma)) == pytest.approx(0.0, abs=1e-8)
    assert fid.frechet_distance(stats, other) == pytest.approx(
        metrics.frechet_distance(features, features[::2]), rel=1e-10)


def test_statistics_file_round_trip_in_edm_layout(tmp_path):
    rng = np.random.default_rng(0)
    stats = fid.RunningStatistics().update(rng.normal(size=(50, 4)))
    path = tmp_path / 'ref.npz'
    fid.save_statistics(path, stats)
    with np.load(path) as data:
        assert sorted(data.files) == ['mu', 'sigma']
    mu, sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(mu, stats.mean)
    np.testing.assert_array_equal(sigma, stats.covariance)
    np.savez(path, mean=mu)
    with pytest.raises(UserError, match='mu, sigma'):
        fid.load_statistics(path)


def direct_mmd2(x, y):
    """Unbiased MMD^2 by explicit double loops over pairs (Gretton et al. 2012, Lemma 6)."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_against_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(9, 5))
    assert fid.mmd2_unbiased(x, y) == pytest.approx(direct_mmd2(x, y), rel=1e-12)
    # Subsets: the same draws as the documented protocol (PCG64(seed), without replacement, a then b).
    mean, std = fid.kid(x, y, num_subsets=3, subset_size=6, seed=5)
    draw = np.random.Generator(np.random.PCG64(5))
    values = []
    for _ in range(3):
        a, b = x[draw.choice(12, 6, replace=False)], y[draw.choice(9, 6, replace=False)]
        values.append(direct_mmd2(a, b))
    assert mean == pytest.approx(np.mean(values), rel=1e-12) and std == pytest.approx(np.std(values), rel=1e-10)
    # Unbiased: zero in expectation for equal distributions, clearly positive for shifted ones.
    same = fid.kid(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)), num_subsets=10, subset_size=200)[0]
    shifted = fid.kid(rng.normal(size=(400, 5)), rng.normal(1.0, 1.0, size=(400, 5)), num_subsets=10,
                      subset_size=200)[0]
    assert abs(same) < 0.02 < shifted


def test_batched_features_pad_and_stream():
    calls = []

    def feature_fn(images):
        calls.append(images.shape)
        return np.asarray(images).reshape(len(images), -1)[:, :3] * 2

    images = np.random.default_rng(0).uniform(-1, 1, (10, 4, 4, 1)).astype(np.float32)
    features = fid.batched_features(feature_fn, images, batch_size=4)
    np.testing.assert_array_equal(features, images.reshape(10, -1)[:, :3].astype(np.float64) * 2)
    assert calls == [(4, 4, 4, 1)] * 3  # the last batch of 2 is padded to 4
    stats, kept = fid.features_and_statistics(feature_fn, [images[:7], images[7:]], batch_size=4)
    np.testing.assert_array_equal(kept, features)
    np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-12, atol=1e-14)


def test_inception_input_quantizes_like_png_and_tiles_grey():
    images = np.array([-1.0, -0.99, 0.0, 0.5, 1.0], np.float32).reshape(1, 1, 5, 1)
    out = np.asarray(fid.inception_input(images))
    assert out.shape == (1, 1, 5, 3)
    from jaxdiff.drivers import images as images_lib
    np.testing.assert_allclose(out[..., 0], images_lib.to_uint8(images)[..., 0] / 127.5 - 1, atol=1e-6)


def test_reference_statistics_cache_and_scores(tmp_path):
    from jaxdiff.data import digits
    source = digits.Digits(shape=(8, 8, 1), split='test')
    feature_fn = lambda images: np.asarray(images)[:, 2:6, 2:6].reshape(len(images), -1)   # central pixels
    cache = tmp_path / 'reference.npz'
    (mu, sigma), features = fid.reference_statistics(feature_fn, source, batch_size=100, cache_path=cache,
                                                     keep_features=True)
    np.testing.assert_allclose(sigma, np.cov(feature_fn(source.images), rowvar=False), atol=1e-12)
    assert features.shape == (297, 16)
    with np.load(cache) as written:
        assert sorted(written.files) == ['features', 'mu', 'sigma']
    (mu_again, _), features_again = fid.reference_statistics(None, source, 100, cache_path=cache, keep_features=True)
    np.testing.assert_array_equal(mu_again, mu)   # read back, no feature_fn needed
    np.testing.assert_allclose(features_again, features, rtol=1e-6)
    stats = fid.RunningStatistics().update(features[:150])
    result = fid.scores(stats, (mu, sigma), features[:150], features, num_subsets=4, subset_size=100)
    assert result['num_samples'] == 150 and set(result) == {'fid', 'num_samples', 'kid', 'kid_std'}
    assert result['fid'] == pytest.approx(metrics.frechet_distance(features[:150], features), rel=1e-9)
