"""Mode `bench_gmm_ddim`: GMM-DDIM (Gabbur, arXiv 2311.04938) vs DDIM on exact ground truth (configs/bench_gmm_ddim.py).

Targets with exact denoisers (`analytic`): a Gaussian mixture of images with unequal weights (modes = its components)
and the empirical distribution of the digits training set (a sample's mode = the class of its nearest training
image). For every steps x eta x method, `num_seeds` seeds each draw `num_samples` samples on DDPM's discrete grid;
DDIM and the GMM variants share x_T and the sampler key of a seed (common random numbers: with scale = 0 the GMM
samples would be DDIM's). An 'exact' row (exact samples of the same size) shows each metric's sampling-noise floor.

Metrics (`jaxdiff.metrics`, against the exact distribution): Frechet distance of the samples' Gaussian fit to the
exact moments (the mixture's closed-form mean and covariance; the digits set's moments), sliced Wasserstein-2
(`num_projections` directions, the same for every method) to an exact reference set (the whole digits training
set; `num_samples` exact mixture samples), and the mode-weight error
TV = 1/2 sum_m |fraction of samples in mode m - true weight of m|.
"""
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import analytic, metrics, samplers, schedules
from jaxdiff.errors import UserError

METRICS = ('fd', 'sw', 'mode_tv')
EXACT = 'exact'


# ---------------------------------------------------------------- targets
class Target:
    """An exact distribution: denoiser, exact sampler, moments and reference set for the metrics, mode labelling."""

    def __init__(self, name, shape, denoiser, sample, mode_of, mode_weights, reference, mean=None, cov=None):
        self.name, self.shape, self.denoiser, self.sample, self.mode_of = name, shape, denoiser, sample, mode_of
        self.mode_weights = np.asarray(mode_weights, np.float64)
        self.reference = np.asarray(reference, np.float32)
        if mean is None:
            mean, cov = metrics.gaussian_statistics(reference)
        self.mean, self.cov = mean, cov


def mixture_target(b):
    from jaxdiff.data import synthetic
    shape = tuple(b.mixture_shape)
    weights = np.asarray(b.mixture_weights, np.float64)
    weights = weights / weights.sum()
    num_modes = len(weights)
    means = synthetic.separated_means(shape, num_modes, synthetic.MIN_SEPARATION * b.mixture_std, b.seed)
    mixture = analytic.GaussianMixture(jnp.asarray(means), jnp.full((num_modes,), b.mixture_std, jnp.float32),
                                       jnp.asarray(weights, jnp.float32))
    labeller = synthetic.MixtureSource('gmm', mixture)
    flat = means.reshape(num_modes, -1).astype(np.float64)
    mean = weights @ flat                                   # exact moments of sum_m w_m N(mu_m, s^2 I)
    cov = (flat - mean).T @ ((flat - mean) * weights[:, None]) + b.mixture_std ** 2 * np.eye(flat.shape[1])
    reference = mixture.sample(jax.random.PRNGKey(b.seed + 10_000), b.num_samples)
    return Target('mixture', shape, mixture.denoiser, mixture.sample,
                  lambda x: np.asarray(labeller.component(jnp.asarray(x))), weights, reference, mean, cov)


def digits_target(b):
    from jaxdiff.data import digits
    source = digits.Digits(shape=tuple(b.digits_shape), split='train')
    images, labels = source.images, source.labels
    empirical = analytic.Empirical(jnp.asarray(images))
    flat = jnp.asarray(images.reshape(len(images), -1))

    def mode_of(x):   # the class of the nearest training image
        x = jnp.asarray(x).reshape(x.shape[0], -1)
        d2 = jnp.sum(x ** 2, 1)[:, None] - 2 * x @ flat.T + jnp.sum(flat ** 2, 1)[None]
        return labels[np.asarray(jnp.argmin(d2, axis=1))]

    weights = np.bincount(labels, minlength=10) / len(labels)
    return Target('digits', tuple(source.shape), empirical.denoiser, empirical.sample, mode_of, weights, images)


TARGETS = {'mixture': mixture_target, 'digits': digits_target}


class Evaluator:
    """The metrics of a sample set against `target`: `metrics.frechet_distance_from_statistics` against the exact
    moments, `metrics.sliced_wasserstein` against the reference set (the same projections for every method)."""

    def __init__(self, target, num_projections, seed):
        self.target, self.num_projections = target, num_projections
        self.key = jax.random.PRNGKey(seed)

    def __call__(self, samples):
        import warnings

        import scipy.linalg
        from threadpoolctl import threadpool_limits       # one BLAS thread: the 2-core box is shared
        target = self.target
        fractions = np.bincount(target.mode_of(samples), minlength=len(target.mode_weights)) / samples.shape[0]
        # the digits' covariance is singular (border pixels are always blank): sqrtm warns, the value is still fine
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
            fd = metrics.frechet_distance_from_statistics(*metrics.gaussian_statistics(samples), target.mean,
                                                          target.cov)
        sw = metrics.sliced_wasserstein(samples, target.reference, self.key, self.num_projections)
        return {'fd': fd, 'sw': float(sw), 'mode_tv': 0.5 * float(np.abs(fractions - target.mode_weights).sum())}


# ---------------------------------------------------------------- runs
def make_sampler(method, eta, gmm_options):
    if method == 'ddim':
        return samplers.get('ddim', eta=eta)
    return samplers.get('gmm_ddim', eta=eta, variant=method, **gmm_options)


def generate(target, runs, sigmas, keys, num_samples):
    """Samples [S, N, ...] and NFE of every (name, sampler) in `runs` for seed keys [S], in ONE compiled function (one
    compile per grid instead of one per method and eta). Seed s: x_T = sigmas[0] N(0, I) from fold_in(key_s, 0),
    sampler key fold_in(key_s, 1), the same for every method (common random numbers)."""
    def one_seed(sampler, key):
        x_T = sigmas[0] * jax.random.normal(jax.random.fold_in(key, 0), (num_samples,) + target.shape)
        x0, info = sampler(target.denoiser, x_T, sigmas, key=jax.random.fold_in(key, 1))
        return x0, jnp.asarray(info['nfe'])

    def all_runs(keys):
        return {name: jax.vmap(lambda key, sampler=sampler: one_seed(sampler, key))(keys) for name, sampler in runs}

    samples = jax.jit(all_runs)(keys)
    return {name: (np.asarray(x), int(nfe[0])) for name, (x, nfe) in samples.items()}


def _check(b):
    for name in b.datasets:
        if name not in TARGETS:
            raise UserError(f'bench.datasets: unknown {name!r}; valid: {", ".join(TARGETS)}')
    from jaxdiff.samplers import gmm_ddim
    for method in b.methods:
        if method != 'ddim' and method not in gmm_ddim.VARIANTS:
            raise UserError(f'bench.methods: unknown {method!r}; valid: ddim, {", ".join(gmm_ddim.VARIANTS)}')
    if b.num_seeds < 2:
        raise UserError(f'bench.num_seeds must be >= 2 for error bars, got {b.num_seeds}')


def run(config, workdir):
    if not workdir:
        raise UserError('--workdir is required for --mode=bench_gmm_ddim (where the CSV and PNG go)')
    b = config.bench
    _check(b)
    gmm_options = dict(config.gmm_ddim)
    os.makedirs(workdir, exist_ok=True)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(b.seed), s))(jnp.arange(b.num_seeds))
    rows, start = [], time.time()
    for dataset in b.datasets:
        target = TARGETS[dataset](b)
        evaluate = Evaluator(target, b.num_projections, b.seed)
        for seed in range(b.num_seeds):     # the metrics' noise floor: exact samples of the same size
            exact = target.sample(jax.random.fold_in(keys[seed], 2), b.num_samples)
            rows.append(dict(dataset=dataset, method=EXACT, eta='', steps='', nfe=0, seed=seed,
                             **evaluate(exact)))
        for steps in b.steps:
            sigmas = schedules.get(b.schedule, num_steps=steps)
            runs = [((method, float(eta)), make_sampler(method, float(eta), gmm_options))
                    for eta in b.etas for method in b.methods]
            samples = generate(target, runs, sigmas, keys, b.num_samples)
            for (method, eta), (x, nfe) in samples.items():
                for seed in range(b.num_seeds):
                    rows.append(dict(dataset=dataset, method=method, eta=eta, steps=steps, nfe=nfe,
                                     seed=seed, **evaluate(x[seed])))
            print(f'[{time.time() - start:6.0f}s] {dataset}: {steps} steps done', flush=True)
    csv_path = os.path.join(workdir, 'bench_gmm_ddim.csv')
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    print_tables(summary, b)
    png_path = os.path.join(workdir, 'bench_gmm_ddim.png')
    plot(summary, b, png_path)
    print(f'wrote {csv_path} and {png_path} ({time.time() - start:.0f}s)')
    return summary


def summarize(rows):
    """{(dataset, method, eta, steps): {metric: (mean, std over seeds)}}."""
    groups = {}
    for r in rows:
        groups.setdefault((r['dataset'], r['method'], r['eta'], r['steps']), []).append(r)
    return {k: {m: (float(np.mean([r[m] for r in g])), float(np.std([r[m] for r in g], ddof=1)))
                for m in METRICS} for k, g in groups.items()}


def print_tables(summary, b):
    """One table per dataset and metric: rows (eta, steps), columns methods, 'mean+-std'; '*' marks the best mean
    and '>' a GMM variant whose mean beats DDIM's by more than the two standard errors combined."""
    width = 17
    for dataset in b.datasets:
        for metric in METRICS:
            floor = summary[(dataset, EXACT, '', '')][metric]
            print(f'\n{dataset} {metric}   (exact-sample floor {floor[0]:.4g}+-{floor[1]:.2g}; '
                  f'mean+-std over {b.num_seeds} seeds)')
            print(f'{"eta":>4} {"steps":>5} ' + ''.join(f'{m:>{width}}' for m in b.methods))
            for eta in b.etas:
                for steps in b.steps:
                    cells = [summary[(dataset, m, float(eta), steps)][metric] for m in b.methods]
                    best = int(np.argmin([c[0] for c in cells]))
                    ref = summary[(dataset, 'ddim', float(eta), steps)][metric] if 'ddim' in b.methods else None
                    text = []
                    for i, (m, (mean, std)) in enumerate(zip(b.methods, cells)):
                        mark = '*' if i == best else ' '
                        if ref is not None and m != 'ddim':
                            se = np.sqrt((std ** 2 + ref[1] ** 2) / b.num_seeds)
                            mark += '>' if mean < ref[0] - 2 * se else ' '
                        else:
                            mark += ' '
                        text.append(f'{mean:.4g}+-{std:.2g}{mark}'.rjust(width))
                    print(f'{eta:>4} {steps:>5} ' + ''.join(text))


def plot(summary, b, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [(d, m) for d in b.datasets for m in METRICS]
    fig, axes = plt.subplots(len(rows), len(b.etas), figsize=(3.2 * len(b.etas), 2.6 * len(rows)), squeeze=False)
    for r, (dataset, metric) in enumerate(rows):
        for c, eta in enumerate(b.etas):
            ax = axes[r, c]
            for method in b.methods:
                stats = [summary[(dataset, method, float(eta), s)][metric] for s in b.steps]
                ax.errorbar(b.steps, [m for m, _ in stats], yerr=[s for _, s in stats], label=method, capsize=2,
                            marker='o', markersize=3)
            floor = summary[(dataset, EXACT, '', '')][metric][0]
            ax.axhline(floor, color='gray', linestyle=':', label='exact samples')
            ax.set_xscale('log')
            ax.set_yscale('log' if metric != 'mode_tv' else 'linear')
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(b.steps, [str(s) for s in b.steps])
            ax.set_title(f'{dataset} {metric}, eta={eta}', fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel('steps (NFE)')
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
