"""Truth problems: distributions whose denoiser is exact (`jaxdiff.core.analytic`), one registry for the benchmark tables,
the tests and the notebooks.

    problem = problems.get('mixture_2d')                     # options: problems.get('digits', shape=(16, 16, 1))
    problem.denoiser(x, sigma)                               # exact E[x0 | x0 + sigma eps = x], float32
    problem.target(jnp.float64)                              # its float64 twin (under jax.enable_x64), e.g. for the
                                                             # reference solve (SPEC.md 'Ground truth')
    problem.exact_samples(key, n)                            # exact samples of the data distribution
    problem.noise_key(seed)                                  # fold_in(key(seed), problem.id): its own noise
    problem.moments()                                        # exact mean [D] and covariance [D, D], float64
    problem.mode_of(x0), problem.mode_weights                # mode of clean samples, and the true mode weights

`id` is a stable integer, distinct for every registered name, that keys the problem's noise: two problems never share
noise whatever their names (the tables used to key it on len(name), so 'mixture_2d' and any other 10-letter name
drew the same x_T). An id never changes: changing it changes every table drawn with it. The ids of mixture_2d,
gmm_16x16 and digits are the keys their noise had before (10, 9, 6), so the solver tables reproduce.

Modes: a mixture's component (argmax_k p(k | x0), `data.synthetic.MixtureSource.component`); for a finite set with
labels (digits), the label of the nearest data point.
"""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import analytic
from jaxdiff.core.errors import UserError


class Problem:
    """One registered problem built with its options; see the module docstring for the interface."""

    def __init__(self, name, id, build, options, description):
        self.name, self.id, self.options, self.description = name, id, dict(options), description
        self._build = build
        self._targets = {}

    def __repr__(self):
        options = ', '.join(f'{k}={v!r}' for k, v in self.options.items())
        return f'problems.get({self.name!r}{", " if options else ""}{options})'

    def target(self, dtype=jnp.float32):
        """The exact distribution (analytic.GaussianMixture or analytic.Empirical) in `dtype`; float64 needs x64."""
        dtype = jnp.dtype(dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(f'{self!r}: the float64 twin needs jax.enable_x64(True) (else it would be float32)')
        if dtype not in self._targets:
            self._targets[dtype] = self._build(dtype, **self.options)
        return self._targets[dtype]

    @property
    def denoiser(self):
        return self.target(jnp.float32).denoiser

    @property
    def shape(self):
        return tuple(self.target().event_shape)

    @property
    def is_mixture(self):
        return isinstance(self.target(), analytic.GaussianMixture)

    def noise_key(self, seed):
        """The root key of this problem's noise for `seed`: fold_in(key(seed), id)."""
        return jax.random.fold_in(jax.random.key(seed), self.id)

    def exact_samples(self, key, n):
        """n exact samples [n, *shape] (a finite set: n draws of its points)."""
        return self.target().sample(key, n)

    def data(self):
        """A finite set's points [N, *shape] (float32); ValueError for a mixture."""
        if self.is_mixture:
            raise ValueError(f'{self!r} is a mixture: it has exact samples, not a finite data set')
        return np.asarray(self.target().data)

    def moments(self):
        """Exact mean [D] and covariance [D, D] in float64: for an isotropic mixture sum_k w_k N(mu_k, s_k^2 I),
        mean = sum_k w_k mu_k, cov = sum_k w_k (mu_k - mean)(mu_k - mean)^T + (sum_k w_k s_k^2) I; for a finite
        set its own mean and (1/N) covariance."""
        target = self.target()
        if not self.is_mixture:
            data = np.asarray(target.data, np.float64).reshape(target.data.shape[0], -1)
            mean = data.mean(0)
            return mean, (data - mean).T @ (data - mean) / data.shape[0]
        weights = np.asarray(target.weights, np.float64)
        flat = np.asarray(target.means, np.float64).reshape(weights.shape[0], -1)
        mean = weights @ flat
        spread = weights @ np.asarray(target.stds, np.float64) ** 2
        return mean, (flat - mean).T @ ((flat - mean) * weights[:, None]) + spread * np.eye(flat.shape[1])

    @functools.cached_property
    def mode_weights(self):
        """True weight of each mode [M]: the mixture weights, or the label frequencies of a finite set."""
        if self.is_mixture:
            return np.asarray(self.target().weights, np.float64)
        labels = self._labels()
        return np.bincount(labels, minlength=labels.max() + 1) / labels.shape[0]

    def mode_of(self, x0):
        """Mode index [n] of clean samples x0 [n, *shape] (module docstring)."""
        x0 = jnp.asarray(x0, jnp.float32)
        if self.is_mixture:
            from jaxdiff.data import synthetic
            return np.asarray(synthetic.MixtureSource(self.name, self.target()).component(x0))
        data = jnp.asarray(self.data().reshape(self.data().shape[0], -1))
        flat = x0.reshape(x0.shape[0], -1)
        d2 = jnp.sum(flat ** 2, 1)[:, None] - 2 * flat @ data.T + jnp.sum(data ** 2, 1)[None]
        return self._labels()[np.asarray(jnp.argmin(d2, axis=1))]

    def _labels(self):
        labels = getattr(self.target(), 'labels', None)
        if labels is None:
            raise ValueError(f'{self!r} has no labels: its modes are not defined')
        return labels


# --- the problems ------------------------------------------------------------------------------------------------

def _mixture(dtype, means, stds, weights):
    return analytic.GaussianMixture(jnp.asarray(means, dtype), jnp.asarray(stds, dtype), jnp.asarray(weights, dtype))


def mixture_2d(dtype):
    """Eight 2-D Gaussians on a circle of radius 2, std 0.15, unequal weights 1 .. 2."""
    angles = np.arange(8) * 2 * np.pi / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return _mixture(dtype, means, np.full((8,), 0.15), np.linspace(1.0, 2.0, 8))


def eight_gaussians(dtype, radius=2.0, mode_std=0.1):
    """The eight_gaussians data set of jaxdiff.data (toy2d's): equal weights on a circle."""
    from jaxdiff.data import synthetic
    mixture = synthetic.eight_gaussians(radius=radius, mode_std=mode_std).mixture
    return _mixture(dtype, np.asarray(mixture.means), np.asarray(mixture.stds), np.asarray(mixture.weights))


def gmm_16x16(dtype, num_components=8):
    """Modes: random +-0.5 sign images of 16x16x1 (pairwise distances ~ 16), component std 0.1: well separated."""
    signs = np.random.default_rng(1).choice([-0.5, 0.5], size=(num_components, 16, 16, 1))
    return _mixture(dtype, signs, np.full((num_components,), 0.1), np.full((num_components,), 1.0))


def mixture_4d(dtype):
    """Three Gaussians in 4-D with unequal widths and weights (overlapping: a hard posterior)."""
    rng = np.random.default_rng(0)
    return _mixture(dtype, rng.normal(size=(3, 4)) * 2, [0.3, 0.5, 0.2], [0.2, 0.3, 0.5])


def mixture_4x4x3(dtype):
    """Three Gaussians of 4x4x3 images with unequal widths and weights."""
    rng = np.random.default_rng(0)
    return _mixture(dtype, rng.normal(size=(3, 4, 4, 3)), [0.2, 0.3, 0.1], [0.5, 0.3, 0.2])


def separated_mixture(dtype, shape=(8, 8, 3), weights=(0.35, 0.25, 0.2, 0.12, 0.08), std=0.2, seed=0):
    """len(weights) modes uniform in [-1, 1]^shape, at least data.synthetic.MIN_SEPARATION * std apart (dart
    throwing, `seed`), isotropic std, the given (unequal) weights."""
    from jaxdiff.data import synthetic
    weights = np.asarray(weights, np.float64)
    means = synthetic.separated_means(tuple(shape), len(weights), synthetic.MIN_SEPARATION * std, seed)
    return _mixture(dtype, means, np.full((len(weights),), std), weights / weights.sum())


def digits(dtype, shape=(8, 8, 1), split='all'):
    """The empirical distribution of scikit-learn's digits (jaxdiff.data.digits: 'train' 1500 images, 'test' 297,
    'all' both, in scikit-learn's order), resized to `shape`; its labels define the modes."""
    from jaxdiff.data import digits as digits_data
    splits = {'all': ('train', 'test'), 'train': ('train',), 'test': ('test',)}
    if split not in splits:
        raise UserError(f'problem digits: split must be one of {", ".join(splits)}, got {split!r}')
    sources = [digits_data.Digits(shape=shape, split=part) for part in splits[split]]
    images = np.concatenate([source.images for source in sources])
    target = analytic.Empirical(jnp.asarray(images, dtype), chunk_size=1024)
    target.labels = np.concatenate([source.labels for source in sources])
    return target


# name -> (id, build(dtype, **options)); ids are stable (module docstring)
REGISTRY = {
    'mixture_2d': (10, mixture_2d),
    'gmm_16x16': (9, gmm_16x16),
    'digits': (6, digits),
    'separated_mixture': (1, separated_mixture),
    'mixture_4x4x3': (2, mixture_4x4x3),
    'mixture_4d': (3, mixture_4d),
    'eight_gaussians': (4, eight_gaussians),
}


def names():
    return list(REGISTRY)


def get(name, **options):
    """The problem `name` built with `options` (keyword arguments of its builder); unknown name -> UserError."""
    if name not in REGISTRY:
        raise UserError(f'unknown truth problem {name!r}; valid problems: {", ".join(REGISTRY)}')
    problem_id, build = REGISTRY[name]
    valid = list(inspect.signature(build).parameters)[1:]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f'truth problem {name!r} has no option(s) {", ".join(unknown)}; valid options: '
                        f'{", ".join(valid) or "(none)"}')
    return Problem(name, problem_id, build, options, (build.__doc__ or '').strip().split('\n')[0])
