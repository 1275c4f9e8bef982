"""The STF paper's central claim on the digits set, with the exact posterior mean as truth (an experiment, not a test).

    .venv/bin/python benchmarks/stf_variance.py --out=/tmp/stf_variance

Xu, Tong, Jaakkola, Tian (ICLR 2023), Sec. 4 (bias and covariance of the targets): given x = y + sigma * eps,
the one-sample target y (drawn from the posterior p(y | x)) is unbiased for E[y | x] but has covariance
Cov[y | x]; the STF target sum_j w_j y_j over a reference batch {y_1 ~ p(y | x), y_2..y_R ~ p_0} trades a bias
that vanishes as R grows for a covariance that shrinks roughly like 1/R. For a finite data set both are exact to
sample: p_0 is uniform over the N images and p(y | x) is the softmax of -|x - y_n|^2 / (2 sigma^2)
(`stf.draw_reference_given_x`), and the truth E[y | x] is `analytic.Empirical(data).denoiser`.

For each sigma: `--num_points` points x ~ p_sigma (a random image plus noise); for each, `--draws` targets; we
report, averaged over the points,
  trace_cov = E_x Tr Cov[target | x]                 (unbiased sample covariance over the draws)
  bias_sq   = E_x |E[target | x] - E[y | x]|^2       (minus trace_cov / draws, which removes the sample-mean noise;
                                                      so it can come out slightly negative; bias_sq_se is its s.e.)
in x0 (denoiser) space; in score space, both are divided by sigma^4, which leaves every ratio unchanged.
'all' is the whole training set as reference: the target is then exactly E[y | x] (zero covariance and bias).
Writes stf_variance.csv and stf_variance.png to --out and prints the table.
"""
import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import analytic, stf


def load_digits(size):
    """Digits training images [N, size, size, 1] in [-1, 1], from jaxdiff.data (sklearn's set, no download)."""
    from jaxdiff import data
    return data.build({'name': 'digits', 'shape': (size, size, 1), 'split': 'train'}).images


def target_moments(key, x, sigma, images, reference_size, draws):
    """Per point x_i: mean [B, D] and unbiased trace of covariance [B] of the STF target over `draws` references.

    reference_size=1 is the plain denoising target (the reference is y_1 ~ p(y | x) alone)."""
    def one_draw(draw_key):
        reference = stf.draw_reference_given_x(draw_key, x, sigma, images, reference_size)        # [B, R, ...]
        return jax.vmap(lambda x_i, ref_i: stf.target(x_i[None], sigma, ref_i)[0])(x, reference)
    targets = jax.lax.map(one_draw, jax.random.split(key, draws)).reshape(draws, x.shape[0], -1)   # [K, B, D]
    mean = jnp.mean(targets, axis=0)
    trace_cov = jnp.sum((targets - mean) ** 2, axis=(0, 2)) / (draws - 1)
    return mean, trace_cov


def measure(images, sigmas, reference_sizes, num_points, draws, seed):
    """Rows (sigma, method, reference_size, trace_cov, bias_sq) for the plain target and each STF reference size."""
    empirical = analytic.Empirical(images)
    moments = jax.jit(target_moments, static_argnums=(4, 5))
    rows = []
    key = jax.random.key(seed)
    for sigma in sigmas:
        key, key_points, key_noise, key_draws = jax.random.split(key, 4)
        clean = images[jax.random.randint(key_points, (num_points,), 0, images.shape[0])]
        x = clean + sigma * jax.random.normal(key_noise, clean.shape)                      # x ~ p_sigma
        truth = empirical.denoiser(x, sigma).reshape(num_points, -1)
        for reference_size in [1] + list(reference_sizes):
            if reference_size == 'all':
                mean = stf.target(x, sigma, images).reshape(num_points, -1)
                trace_cov = jnp.zeros(num_points)
                bias_sq = jnp.sum((mean - truth) ** 2, axis=1)
                size = images.shape[0]
            else:
                mean, trace_cov = moments(key_draws, x, sigma, images, reference_size, draws)
                bias_sq = jnp.sum((mean - truth) ** 2, axis=1) - trace_cov / draws
                size = reference_size
            rows.append({'sigma': float(sigma), 'method': 'plain' if reference_size == 1 else f'stf_R{reference_size}',
                         'reference_size': int(size), 'trace_cov': float(jnp.mean(trace_cov)),
                         'bias_sq': float(jnp.mean(bias_sq)),
                         # each point's estimate is unbiased and independent: the spread over points gives the s.e.
                         'bias_sq_se': float(jnp.std(bias_sq) / np.sqrt(num_points))})
    return rows


def print_table(rows):
    methods = list(dict.fromkeys(r['method'] for r in rows))
    sigmas = list(dict.fromkeys(r['sigma'] for r in rows))
    by = {(r['sigma'], r['method']): r for r in rows}
    for quantity in ('trace_cov', 'bias_sq'):
        print(f'\n{quantity} (x0 space, mean over points)')
        print(f'{"sigma":>8} ' + ' '.join(f'{m:>11}' for m in methods))
        for sigma in sigmas:
            print(f'{sigma:8.3g} ' + ' '.join(f'{by[sigma, m][quantity]:11.3e}' for m in methods))
    print('\nbias_sq standard error (over points)')
    for sigma in sigmas:
        print(f'{sigma:8.3g} ' + ' '.join(f'{by[sigma, m]["bias_sq_se"]:11.1e}' for m in methods))


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r['method'] for r in rows):
        sel = [r for r in rows if r['method'] == method]
        sigma = [r['sigma'] for r in sel]
        axes[0].plot(sigma, [r['trace_cov'] for r in sel], marker='o', label=method)
        axes[1].errorbar(sigma, [r['bias_sq'] for r in sel], yerr=[2 * r['bias_sq_se'] for r in sel], marker='o',
                         capsize=2, label=method)
    for ax, title in zip(axes, ('trace of Cov[target | x]', 'squared bias |E[target | x] - E[y | x]|^2 (+-2 s.e.)')):
        ax.set(xscale='log', xlabel='sigma', title=title)
        ax.set_yscale('symlog', linthresh=1e-3)                      # zeros ('all', small sigma) and noisy ~0 bias
        ax.grid(True, which='both', alpha=0.3)
    axes[0].set_ylim(bottom=0)                                       # a trace of covariance is >= 0
    axes[0].legend()
    fig.suptitle('STF vs plain denoising target on digits (exact posterior mean as truth)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='directory for stf_variance.csv and stf_variance.png')
    parser.add_argument('--size', type=int, default=16, help='digits resolution (jaxdiff.data digits shape)')
    parser.add_argument('--sigmas', default='0.05,0.1,0.2,0.5,1,2,5,10,20,50')
    parser.add_argument('--reference_sizes', default='64,256,1024,all')
    parser.add_argument('--num_points', type=int, default=64)
    parser.add_argument('--draws', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    images = jnp.asarray(load_digits(args.size))
    sigmas = [float(s) for s in args.sigmas.split(',')]
    reference_sizes = [s if s == 'all' else int(s) for s in args.reference_sizes.split(',')]
    start = time.time()
    rows = measure(images, sigmas, reference_sizes, args.num_points, args.draws, args.seed)
    print(f'digits {tuple(images.shape)}, {args.num_points} points x {args.draws} draws per sigma, '
          f'{time.time() - start:.0f} s')
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'stf_variance.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, 'stf_variance.png'))
    print(f'\nwrote {args.out}/stf_variance.csv and stf_variance.png')


if __name__ == '__main__':
    main()
