"""Synthetic sets with fresh samples every step: 2-D toys and Gaussian mixtures of any shape.

Every batch draws the whole global batch from jax.random with key fold_in(fold_in(key(seed), stream), step)
and keeps this host's rows, so the data does not depend on the number of hosts. Points are float32, unscaled.
  eight_gaussians  8 isotropic Gaussians (std `mode_std`) at radius `radius` on the angles 2 pi k / 8, k = 0..7,
                   mode k at (radius cos(2 pi k / 8), radius sin(2 pi k / 8)); label = most probable mode
  two_moons        two interleaved half circles of radius 1 (upper: (cos t, sin t), lower: (1 - cos t, 1/2 - sin t),
                   t ~ U(0, pi)), centred at the origin, plus N(0, noise^2) jitter; label = moon (0 upper, 1 lower)
  checkerboard     uniform on the 8 dark squares of a 4 x 4 board covering [-2, 2]^2 (square (i, j) dark when
                   i + j is even, i, j = floor(coordinate) + 2); label 0
  gmm              `num_modes` equally weighted isotropic Gaussians (std `mode_std`) in any `shape`, means uniform in
                   [-1, 1]^d (fixed by `mixture_seed`) at least 8 mode_std apart; label = most probable mode
  two_gaussians    the Fast-ODE 2-D toy (Lee, Kim, Ye 2023, their train_reverse_2d_joint.py): N((-offset, offset),
                   diag(variance)) and N((offset, offset), diag(variance)), equal weights, offset 8, variance (3, 0.1)
                   (covariances); label = the Gaussian that drew the point
The mixtures expose `source.mixture`, an `analytic.GaussianMixture`, whose `denoiser` is the exact E[x0 | x].
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import analytic
from jaxdiff import data

NOMINAL_SIZE = 1 << 20  # `num_examples` of a set that has no finite size (used for epoch bookkeeping only)
MIN_SEPARATION = 8.0    # in units of mode_std: neighbouring modes overlap with probability < Phi(-4) ~ 3e-5


class SyntheticSource:
    """Subclasses set `name`, `shape` and implement `sample(key, n) -> (points [n, *shape], labels [n])`."""
    name = 'synthetic'
    shape = (2,)
    num_examples = NOMINAL_SIZE

    def sample(self, key, n):
        raise NotImplementedError

    @functools.cached_property
    def _sample_jit(self):
        return jax.jit(self.sample, static_argnums=1)

    def batch(self, step, size, *, seed, stream=0, process_index=0, process_count=1):
        start, stop = data.host_slice(size, process_index, process_count)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), data.check_step(step))
        points, labels = self._sample_jit(key, size)
        return {'image': np.asarray(points[start:stop], np.float32),
                'label': np.asarray(labels[start:stop], np.int32)}


class MixtureSource(SyntheticSource):
    """Samples of an `analytic.GaussianMixture` (exposed as `mixture`); label = the most probable component."""

    def __init__(self, name, mixture):
        self.name = name
        self.mixture = mixture
        self.shape = tuple(mixture.event_shape)

    def component(self, points):
        """argmax_k p(k | x0) of clean points [n, *shape] (the component that drew them, for separated modes)."""
        mixture = self.mixture
        flat = points.reshape(points.shape[0], -1)
        sq = jnp.sum((flat[:, None, :] - mixture.means.reshape(mixture.means.shape[0], -1)[None]) ** 2, -1)
        var = mixture.stds ** 2
        log_p = jnp.log(mixture.weights) - 0.5 * sq / var - 0.5 * flat.shape[1] * jnp.log(var)
        return jnp.argmax(log_p, axis=1)

    def sample(self, key, n):
        points = self.mixture.sample(key, n)
        return points, self.component(points)


def eight_gaussians(shape=(2,), radius=2.0, mode_std=0.1):
    data.check_shape('eight_gaussians', shape, (2,))
    angles = 2 * np.pi * np.arange(8) / 8
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    mixture = analytic.GaussianMixture(means.astype(np.float32), np.full(8, mode_std, np.float32),
                                       np.full(8, 1 / 8, np.float32))
    return MixtureSource('eight_gaussians', mixture)


def separated_means(shape, num_modes, min_distance, seed, max_tries=10000):
    """num_modes points uniform in [-1, 1]^shape, each at least min_distance from the others (dart throwing)."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(max_tries):
        candidate = rng.uniform(-1.0, 1.0, shape)
        if all(np.linalg.norm(candidate - mean) >= min_distance for mean in means):
            means.append(candidate)
            if len(means) == num_modes:
                return np.stack(means).astype(np.float32)
    raise ValueError(f'cannot place data.num_modes={num_modes} modes in [-1, 1]^{tuple(shape)} at least '
                     f'{min_distance:g} apart ({MIN_SEPARATION:g} * data.mode_std); lower num_modes or mode_std')


def gmm(shape=(2,), num_modes=8, mode_std=0.05, mixture_seed=0):
    if shape is None or len(tuple(shape)) == 0:
        raise ValueError(f'data.shape for gmm must be a non-empty shape tuple, got {shape}')
    if num_modes < 1 or mode_std <= 0:
        raise ValueError(f'gmm needs data.num_modes >= 1 and data.mode_std > 0, got {num_modes}, {mode_std}')
    means = separated_means(tuple(shape), num_modes, MIN_SEPARATION * mode_std, mixture_seed)
    mixture = analytic.GaussianMixture(means, np.full(num_modes, mode_std, np.float32),
                                       np.full(num_modes, 1 / num_modes, np.float32))
    return MixtureSource('gmm', mixture)


class TwoMoons(SyntheticSource):
    name = 'two_moons'

    def __init__(self, shape=(2,), noise=0.05):
        data.check_shape(self.name, shape, (2,))
        self.noise = noise

    def sample(self, key, n):
        key_t, key_moon, key_noise = jax.random.split(key, 3)
        t = jax.random.uniform(key_t, (n,), minval=0.0, maxval=math.pi)
        moon = jax.random.bernoulli(key_moon, 0.5, (n,)).astype(jnp.int32)
        upper = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=1)
        lower = jnp.stack([1 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=1)
        points = jnp.where(moon[:, None] == 1, lower, upper) - jnp.array([0.5, 0.25])
        return points + self.noise * jax.random.normal(key_noise, (n, 2)), moon


class Checkerboard(SyntheticSource):
    name = 'checkerboard'

    def __init__(self, shape=(2,)):
        data.check_shape(self.name, shape, (2,))

    def sample(self, key, n):
        key_col, key_row, key_uv = jax.random.split(key, 3)
        col = jax.random.randint(key_col, (n,), 0, 4)
        row = 2 * jax.random.randint(key_row, (n,), 0, 2) + col % 2  # same parity as col: a dark square
        square = jnp.stack([col, row], axis=1).astype(jnp.float32)
        points = square + jax.random.uniform(key_uv, (n, 2)) - 2.0
        return points, jnp.zeros((n,), jnp.int32)


class TwoGaussians(SyntheticSource):
    """Two equally weighted Gaussians with diagonal covariance at (-offset, offset) and (offset, offset)."""
    name = 'two_gaussians'

    def __init__(self, shape=(2,), offset=8.0, variance=(3.0, 0.1)):
        data.check_shape(self.name, shape, (2,))
        if len(tuple(variance)) != 2 or min(variance) <= 0:
            raise ValueError(f'data.variance={tuple(variance)} must be two positive variances (x and y)')
        self.means = np.array([[-offset, offset], [offset, offset]], np.float32)
        self.std = np.sqrt(np.asarray(variance, np.float32))

    def sample(self, key, n):
        key_k, key_noise = jax.random.split(key)
        k = jax.random.bernoulli(key_k, 0.5, (n,)).astype(jnp.int32)
        return jnp.asarray(self.means)[k] + self.std * jax.random.normal(key_noise, (n, 2)), k
