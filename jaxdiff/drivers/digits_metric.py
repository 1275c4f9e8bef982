"""An offline quality metric for jaxdiff's digits models: Frechet distance and KID in the feature space of a small
digits classifier ("digits FD" / "digits KID"), the way FID / KID use Inception features.

    metric = digits_metric.get(resolution=16)   # trains the classifier once per process (seconds), prints accuracy
    metric.fd(samples)                          # samples [N, 16, 16, 1] in [-1, 1], as jaxdiff's digits models make
    metric.evaluate(samples)                    # {'digits_fd', 'digits_kid', 'digits_kid_std', ...}

The classifier (`jaxdiff.models.digits_classifier`) is trained deterministically on the 'train' split of
`jaxdiff.data.digits` (1500 images, resized to R x R exactly as the diffusion models see them): fixed init key,
full-batch Adam for a fixed number of steps, no data order. Its accuracy on the 297 held-out 'test' digits is
printed. The features are its penultimate layer (before the ReLU) times one fixed scalar (unit RMS over the training
digits). The reference statistics are the features of the same 1500 training digits; `data_fd` (the FD of the
held-out digits against them) is what real digits not trained on reach: a yardstick at that sample size, not a
floor (a generator that reproduces the training digits scores lower).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.drivers import fid
from jaxdiff.data import digits as digits_data
from jaxdiff.models.digits_classifier import DigitsClassifier

TRAIN_STEPS = 500
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2


def train_classifier(resolution=16, seed=0, steps=TRAIN_STEPS, verbose=True):
    """(model, params, test_accuracy): DigitsClassifier trained on the digits 'train' split at R = resolution.

    Deterministic: init from jax.random.key(seed), full-batch AdamW(LEARNING_RATE, WEIGHT_DECAY) on the softmax
    cross-entropy for `steps` steps. Prints the held-out accuracy when `verbose`."""
    start = time.perf_counter()
    train = digits_data.Digits(shape=(resolution, resolution, 1), split='train')
    test = digits_data.Digits(shape=(resolution, resolution, 1), split='test')
    model = DigitsClassifier()
    params = model.init(jax.random.key(seed), jnp.asarray(train.images[:1]))['params']
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)

    def loss_fn(params):
        logits = model.apply({'params': params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_all(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
        return params

    params = train_all(params)
    accuracy = accuracy_of(model, params, test.images, test.labels)
    if verbose:
        print(f'digits classifier ({resolution}x{resolution}): held-out accuracy {accuracy:.4f} on '
              f'{len(test.labels)} test digits (trained on {len(train.labels)} in '
              f'{time.perf_counter() - start:.1f} s)')
    return model, params, accuracy


def accuracy_of(model, params, images, labels):
    """Fraction of images whose arg-max class is the label."""
    logits = model.apply({'params': params}, jnp.asarray(images))
    return float(np.mean(np.asarray(jnp.argmax(logits, axis=-1)) == np.asarray(labels)))


def classifier_features(model, params, images):
    """The classifier's penultimate-layer features [B, feature_dim] of images (sown by `DigitsClassifier`)."""
    _, state = model.apply({'params': params}, images, mutable=['intermediates'])
    (features,) = state['intermediates']['penultimate']
    return features


class DigitsMetric:
    """digits FD / KID against the digits training set, in the features of a classifier trained at `resolution`."""

    def __init__(self, resolution=16, seed=0, verbose=True):
        self.resolution = resolution
        self.model, self.params, self.test_accuracy = train_classifier(resolution, seed, verbose=verbose)
        self._features = jax.jit(functools.partial(classifier_features, self.model))
        shape = (resolution, resolution, 1)
        self.feature_scale = 1.0
        train_features = self.features(digits_data.Digits(shape=shape, split='train').images)
        # One fixed scalar puts the training digits' features at unit RMS, so that x.y / d is O(1) in KID's
        # cubic kernel as it is for Inception features; FD scales by its square, rankings are unchanged.
        self.feature_scale = float(1 / np.sqrt(np.mean(train_features ** 2)))
        self.reference_features = train_features * self.feature_scale
        self.reference = fid.RunningStatistics().update(self.reference_features)
        self.data_fd = self.fd(digits_data.Digits(shape=shape, split='test').images)

    def features(self, images):
        """Classifier features [N, feature_dim] float64 of images [N, R, R, 1] in [-1, 1], times feature_scale.
        Samples are clipped to [-1, 1] first, as they are when shown or saved."""
        images = np.clip(np.asarray(images, np.float32), -1, 1)
        expected = (self.resolution, self.resolution, 1)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f'digits metric at resolution {self.resolution} expects images [N, '
                             f'{", ".join(map(str, expected))}], got shape {images.shape}')
        return fid.batched_features(lambda x: self._features(self.params, x), images, batch_size=500) * \
            self.feature_scale

    def fd(self, images):
        """Frechet distance of the images' feature Gaussian to the training digits' (needs >= 2 images)."""
        return fid.frechet_distance(fid.RunningStatistics().update(self.features(images)), self.reference)

    def kid(self, images, num_subsets=100, subset_size=1000, seed=0):
        """(mean, std) KID of the images' features against the training digits' (`jaxdiff.drivers.fid.kid`)."""
        return fid.kid(self.features(images), self.reference_features, num_subsets, subset_size, seed)

    def evaluate(self, images, **kid_options):
        """Everything at once: {'digits_fd', 'digits_kid', 'digits_kid_std', 'digits_data_fd',
        'digits_classifier_accuracy', 'num_samples'}."""
        features = self.features(images)
        kid_mean, kid_std = fid.kid(features, self.reference_features, **kid_options)
        return dict(digits_fd=fid.frechet_distance(fid.RunningStatistics().update(features), self.reference),
                    digits_kid=kid_mean, digits_kid_std=kid_std, digits_data_fd=self.data_fd,
                    digits_classifier_accuracy=self.test_accuracy, num_samples=len(features))


@functools.lru_cache(maxsize=None)
def get(resolution=16, seed=0):
    """The DigitsMetric for `resolution`, trained once per process (the classifier is retrained, deterministically,
    in each new process: a few seconds, no files)."""
    return DigitsMetric(resolution, seed)
