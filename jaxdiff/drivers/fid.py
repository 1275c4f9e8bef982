"""FID and KID: feature statistics accumulated batch by batch, the Frechet distance, the kernel distance, and the
Inception feature extractor that feeds them.

    feature_fn = fid.inception_feature_fn(weights_path)          # jitted: images [B, H, W, C] in [-1, 1] -> [B, 2048]
    stats, feats = fid.features_and_statistics(feature_fn, batches)   # batches: an iterable of image arrays
    reference = fid.load_statistics('cifar10-32x32.npz')         # EDM's / pytorch-fid's npz: mu, sigma
    fid.frechet_distance(stats, reference)
    fid.kid(feats, reference_feats)                               # (mean, std) over subsets

FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to Inception pool features of the samples and
of the data (`metrics.frechet_distance_from_statistics`). KID (Binkowski et al. 2018, "Demystifying MMD GANs"):
the unbiased estimate of the squared MMD with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
Statistics are float64 NumPy on the host; only the network runs under jit.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import metrics
from jaxdiff.core.errors import UserError


class RunningStatistics:
    """Mean and covariance of feature vectors fed in batches, in float64.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979): for sets a, b with counts n_a, n_b,
    means mu_a, mu_b and scatter matrices M_a, M_b (sum of outer products of deviations),
      n = n_a + n_b,  delta = mu_b - mu_a,  mu = mu_a + delta n_b / n,  M = M_a + M_b + delta delta^T n_a n_b / n,
    which equals the statistics of the whole set in exact arithmetic and avoids the cancellation of sum-of-squares
    formulas. covariance = M / (n - 1) (the unbiased estimate, as np.cov and the FID reference code use).
    """

    def __init__(self, dim=None):
        self.count = 0
        self.dim = dim
        self._mean = None
        self._scatter = None

    def update(self, features):
        features = np.asarray(features, np.float64)
        features = features.reshape(len(features), -1)
        if not len(features):
            return self
        if self.dim is not None and features.shape[1] != self.dim:
            raise ValueError(f'RunningStatistics: features have dimension {features.shape[1]}, expected {self.dim}')
        self.dim = features.shape[1]
        n_b = len(features)
        mean_b = features.mean(axis=0)
        deviation = features - mean_b
        scatter_b = deviation.T @ deviation
        if self.count == 0:
            self.count, self._mean, self._scatter = n_b, mean_b, scatter_b
            return self
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n
        return self

    @property
    def mean(self):
        self._check(1)
        return self._mean

    @property
    def covariance(self):
        self._check(2)
        return self._scatter / (self.count - 1)

    def _check(self, needed):
        if self.count < needed:
            raise ValueError(f'RunningStatistics holds {self.count} samples; at least {needed} needed')


def frechet_distance(stats_a, stats_b):
    """FID-style Frechet distance between two statistics, each a RunningStatistics or a (mu, sigma) pair."""
    mu_a, sigma_a = _mu_sigma(stats_a)
    mu_b, sigma_b = _mu_sigma(stats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f'frechet_distance: feature dimensions differ, {mu_a.shape[0]} vs {mu_b.shape[0]}')
    return metrics.frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b)


def _mu_sigma(stats):
    if isinstance(stats, RunningStatistics):
        return stats.mean, stats.covariance
    mu, sigma = stats
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def save_statistics(path, stats):
    """Writes mu and sigma as an .npz in the layout EDM's `fid.py ref` and pytorch-fid use (keys 'mu', 'sigma')."""
    mu, sigma = _mu_sigma(stats)
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path):
    """(mu, sigma) float64 from an .npz with keys 'mu' and 'sigma' (EDM's reference files, e.g. its
    `cifar10-32x32.npz`, and pytorch-fid's). A missing file or key is a UserError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'reference statistics {path} not found (an .npz with mu and sigma, e.g. EDM\'s '
                        'cifar10-32x32.npz, or one written by jaxdiff.drivers.fid.save_statistics)')
    with np.load(path) as data:
        missing = [key for key in ('mu', 'sigma') if key not in data.files]
        if missing:
            raise UserError(f'reference statistics {path} lacks {", ".join(missing)} (has {", ".join(data.files)})')
        return np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)


# ---------------------------------------------------------------------------------------------- KID

def polynomial_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3 for all pairs of rows, d the feature dimension (Binkowski et al. 2018, Sec. 4)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
    """Unbiased estimate of MMD^2 between samples x [m, d] and y [n, d] (Gretton et al. 2012, Lemma 6):
      1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j) - 2/(mn) sum_{i, j} k(x_i, y_j)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError('mmd2_unbiased needs at least two samples per set')
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2 * k_xy.sum() / (m * n))


def kid(features_a, features_b, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018): mmd2_unbiased over `num_subsets` pairs of subsets of
    min(subset_size, len(a), len(b)) rows each, drawn without replacement by NumPy's PCG64 seeded with `seed`
    (the protocol of the KID paper's code and of StyleGAN's / clean-fid's metrics). Returns (mean, std)."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f'kid: feature dimensions differ, {features_a.shape[1:]} vs {features_b.shape[1:]}')
    size = min(subset_size, len(features_a), len(features_b))
    rng = np.random.Generator(np.random.PCG64(seed))
    values = []
    for _ in range(num_subsets):
        a = features_a[rng.choice(len(features_a), size, replace=False)]
        b = features_b[rng.choice(len(features_b), size, replace=False)]
        values.append(mmd2_unbiased(a, b))
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------- features

def quantize(images):
    """[-1, 1] floats -> the same pixels after a round trip through uint8, as samples saved as PNG are
    (EDM's x * 127.5 + 128, clipped and truncated; `jaxdiff.drivers.images.to_uint8`), back in [-1, 1] (u / 127.5 - 1)."""
    pixels = jnp.clip(jnp.floor(images * 127.5 + 128), 0, 255)
    return pixels / 127.5 - 1


def inception_input(images, quantize_input=True):
    """Images [B, H, W, 1 or 3] in [-1, 1] -> what the FID network takes: 3 channels (grey tiled, as an RGB
    conversion does), quantized to uint8 levels when `quantize_input`."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'FID features need images [B, H, W, 1 or 3], got shape {images.shape}')
    if quantize_input:
        images = quantize(images)
    if images.shape[-1] == 1:
        images = jnp.tile(images, (1, 1, 1, 3))
    return images


def inception_feature_fn(weights_path=None, quantize_input=True):
    """A jitted `features(images [B, H, W, C] in [-1, 1]) -> [B, 2048]` of the FID Inception network, its weights
    from `weights_path` (pytorch-fid's .pth or an .npz; None: `jaxdiff.convert.inception.default_path()`)."""
    from jaxdiff.convert import inception as convert_inception
    from jaxdiff.models.inception import InceptionV3
    variables = convert_inception.load(weights_path)
    return make_feature_fn(InceptionV3(), variables, functools.partial(inception_input,
                                                                       quantize_input=quantize_input))


def make_feature_fn(model, variables, preprocess=None):
    """jit(images -> model.apply(variables, preprocess(images))) with the variables closed over as arguments."""
    preprocess = preprocess or (lambda x: x)

    @jax.jit
    def apply(variables, images):
        return model.apply(variables, preprocess(images))

    return lambda images: apply(variables, images)


def batched_features(feature_fn, images, batch_size):
    """feature_fn over `images` in batches of `batch_size` (the last one padded, so one compilation serves all),
    as float64 [N, d]."""
    images = np.asarray(images)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        out.append(np.asarray(feature_fn(batch), np.float64)[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0))


def features_and_statistics(feature_fn, batches, batch_size=None, keep_features=True):
    """Runs feature_fn over an iterable of image batches: (RunningStatistics, features [N, d] or None).

    With `batch_size`, each incoming batch is split / padded to that size (one compilation); `keep_features=False`
    keeps only the statistics (FID on many samples without holding their features)."""
    stats = RunningStatistics()
    kept = []
    for batch in batches:
        features = (batched_features(feature_fn, batch, batch_size) if batch_size
                    else np.asarray(feature_fn(batch), np.float64))
        stats.update(features)
        if keep_features:
            kept.append(features)
    return stats, (np.concatenate(kept) if keep_features and kept else None)


def source_batches(source, batch_size, num_examples=None):
    """The images of a finite jaxdiff data source (`source.get(indices)['image']`) in order, in batches: the
    reference set of FID (e.g. all of CIFAR-10 train)."""
    total = source.num_examples if num_examples is None else min(num_examples, source.num_examples)
    for start in range(0, total, batch_size):
        yield source.get(np.arange(start, min(start + batch_size, total)))['image']


def reference_statistics(feature_fn, source, batch_size, num_examples=None, cache_path=None, keep_features=False):
    """((mu, sigma), features or None) of a finite data source's images (FID's reference set, e.g. CIFAR-10 train).

    With `cache_path`, a file written before is read instead (an .npz with mu, sigma and, when it was written with
    keep_features, 'features' float32), and a missing one is written after computing."""
    if cache_path is not None and os.path.isfile(cache_path):
        mu, sigma = load_statistics(cache_path)
        with np.load(cache_path) as data:
            features = np.asarray(data['features'], np.float64) if 'features' in data.files else None
        if not keep_features or features is not None:
            return (mu, sigma), features
    stats, features = features_and_statistics(feature_fn, source_batches(source, batch_size, num_examples),
                                              batch_size=batch_size, keep_features=keep_features)
    if cache_path is not None:
        extra = {'features': features.astype(np.float32)} if features is not None else {}
        np.savez(cache_path, mu=stats.mean, sigma=stats.covariance, **extra)
    return (stats.mean, stats.covariance), features


def scores(stats, reference, features=None, reference_features=None, **kid_options):
    """{'fid', 'num_samples'} and, when both feature sets are given, {'kid', 'kid_std'} (kid_options: num_subsets,
    subset_size, seed of `kid`). stats: RunningStatistics of the samples; reference: RunningStatistics or (mu, sigma)."""
    result = {'fid': frechet_distance(stats, reference), 'num_samples': stats.count}
    if features is not None and reference_features is not None:
        result['kid'], result['kid_std'] = kid(features, reference_features, **kid_options)
    return result
