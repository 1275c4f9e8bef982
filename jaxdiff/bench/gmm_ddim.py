"""GMM-DDIM (Gabbur, arXiv 2311.04938) vs DDIM on exact ground truth (configs/bench_gmm_ddim.py holds the command).

Truth problems (`bench.problems`): by default a Gaussian mixture of images with unequal weights, well-separated modes
('separated_mixture'; modes = its components) and the empirical distribution of the digits training set ('digits',
split 'train'; a sample's mode = the class of its nearest training image). For every steps x eta x method,
`num_seeds` seeds each draw `num_samples` samples on DDPM's discrete grid; DDIM and the GMM variants share x_T and the
sampler key of a seed (common random numbers: with scale = 0 the GMM samples would be DDIM's). Seed s of a problem
draws from fold_in(problem.noise_key(seed), s), so two problems never share noise. An 'exact' row (exact samples of
the same size) shows each metric's sampling-noise floor.

Metrics (`jaxdiff.core.metrics`, against the exact distribution): Frechet distance of the samples' Gaussian fit to the
exact moments (`problem.moments()`: the mixture's closed form; the digits set's own), sliced Wasserstein-2
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

from jaxdiff.core import metrics, samplers, schedules
from jaxdiff.bench import problems as problems_lib
from jaxdiff.core.errors import UserError

METRICS = ('fd', 'sw', 'mode_tv')
EXACT = 'exact'
REFERENCE_STREAM = 10_000        # fold_in of the problem's noise key for its exact reference set (seeds stay below)


class Target:
    """A truth problem with what the metrics compare against: exact moments and a reference set."""

    def __init__(self, problem, num_samples, seed):
        self.problem, self.name, self.shape = problem, problem.name, problem.shape
        self.denoiser, self.sample, self.mode_of = problem.denoiser, problem.exact_samples, problem.mode_of
        self.mode_weights = problem.mode_weights
        self.mean, self.cov = problem.moments()
        if problem.is_mixture:
            key = jax.random.fold_in(problem.noise_key(seed), REFERENCE_STREAM)
            self.reference = np.asarray(problem.exact_samples(key, num_samples), np.float32)
        else:
            self.reference = problem.data()


class Evaluator:
    """The metrics of a sample set against `target`: `metrics.frechet_distance_from_statistics` against the exact
    moments, `metrics.sliced_wasserstein` against the reference set (the same projections for every method)."""

    def __init__(self, target, num_projections, seed):
        self.target, self.num_projections = target, num_projections
        self.key = jax.random.key(seed)

    def __call__(self, samples):
        import warnings

        import scipy.linalg
        target = self.target
        fractions = np.bincount(target.mode_of(samples), minlength=len(target.mode_weights)) / samples.shape[0]
        # the digits' covariance is singular (border pixels are always blank): sqrtm warns, the value is still fine
        with warnings.catch_warnings():
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
    for name in b.problems:
        if name not in problems_lib.REGISTRY:
            raise UserError(f'bench.problems: unknown {name!r}; valid: {", ".join(problems_lib.REGISTRY)}')
    from jaxdiff.core.samplers import gmm_ddim
    for method in b.methods:
        if method != 'ddim' and method not in gmm_ddim.VARIANTS:
            raise UserError(f'bench.methods: unknown {method!r}; valid: ddim, {", ".join(gmm_ddim.VARIANTS)}')
    if b.num_seeds < 2:
        raise UserError(f'bench.num_seeds must be >= 2 for error bars, got {b.num_seeds}')


def run(config, workdir):
    if not workdir:
        raise UserError('--workdir is required for the GMM-DDIM benchmark (where the CSV and PNG go)')
    b = config.bench
    _check(b)
    gmm_options = dict(config.gmm_ddim)
    os.makedirs(workdir, exist_ok=True)
    rows, start = [], time.time()
    for dataset in b.problems:
        problem = problems_lib.get(dataset, **dict(b.problem_options.get(dataset, {})))
        target = Target(problem, b.num_samples, b.seed)
        keys = jax.vmap(lambda s: jax.random.fold_in(problem.noise_key(b.seed), s))(jnp.arange(b.num_seeds))
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
    for dataset in b.problems:
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
    rows = [(d, m) for d in b.problems for m in METRICS]
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
