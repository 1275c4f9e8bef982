"""The digits metric: the classifier reaches the accuracy it prints, and digits FD / KID order what they should."""
import re

import numpy as np
import pytest

from jaxdiff.drivers import digits_metric, fid
from jaxdiff.data import digits as digits_data

SHAPE = (16, 16, 1)  # the quickstart / digits configs' data.shape


@pytest.fixture(scope='module')
def metric_and_output():
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metric = digits_metric.DigitsMetric(resolution=16)
    return metric, printed.getvalue()


def test_classifier_reaches_its_printed_accuracy(metric_and_output):
    metric, printed = metric_and_output
    match = re.search(r'held-out accuracy ([0-9.]+) on (\d+) test digits', printed)
    assert match, printed
    test = digits_data.Digits(shape=SHAPE, split='test')
    recomputed = digits_metric.accuracy_of(metric.model, metric.params, test.images, test.labels)
    assert int(match.group(2)) == len(test.labels) == 297
    assert float(match.group(1)) == pytest.approx(recomputed, abs=5e-5)
    assert recomputed >= 0.90  # an RBF SVM reaches 0.95 on this split, logistic regression 0.91


def test_training_is_deterministic(metric_and_output):
    metric, _ = metric_and_output
    _, params, accuracy = digits_metric.train_classifier(16, seed=0, verbose=False)
    assert accuracy == metric.test_accuracy
    np.testing.assert_array_equal(params['features']['kernel'], metric.params['features']['kernel'])


def test_digits_fd_orders_real_noisy_and_wrong_digits(metric_and_output):
    metric, _ = metric_and_output
    train = digits_data.Digits(shape=SHAPE, split='train')
    test = digits_data.Digits(shape=SHAPE, split='test')
    rng = np.random.default_rng(0)
    assert metric.fd(train.images) == pytest.approx(0.0, abs=1e-6)  # the reference itself
    assert metric.fd(test.images) == pytest.approx(metric.data_fd)
    noisy = np.clip(test.images + 0.6 * rng.normal(size=test.images.shape), -1, 1).astype(np.float32)
    only_zeros = test.images[test.labels == 0]
    uniform = rng.uniform(-1, 1, test.images.shape).astype(np.float32)
    fds = [metric.fd(x) for x in (test.images, noisy, only_zeros, uniform)]
    assert fds == sorted(fds), fds
    assert fds[1] > 2 * fds[0]


def test_evaluate_and_kid(metric_and_output):
    metric, _ = metric_and_output
    test = digits_data.Digits(shape=SHAPE, split='test')
    result = metric.evaluate(test.images, num_subsets=5, subset_size=200)
    assert result['num_samples'] == 297 and result['digits_fd'] == pytest.approx(metric.data_fd)
    mean, std = fid.kid(metric.features(test.images), metric.reference_features, 5, 200, 0)
    assert result['digits_kid'] == mean and result['digits_kid_std'] == std
    assert np.sqrt(np.mean(metric.reference_features ** 2)) == pytest.approx(1.0)
    uniform = np.random.default_rng(0).uniform(-1, 1, test.images.shape).astype(np.float32)
    assert metric.kid(uniform, num_subsets=5, subset_size=200)[0] > 10 * abs(mean)


def test_wrong_shape_names_the_expected_one(metric_and_output):
    metric, _ = metric_and_output
    with pytest.raises(ValueError, match=r'expects images \[N, 16, 16, 1\]'):
        metric.fd(np.zeros((4, 8, 8, 1), np.float32))
